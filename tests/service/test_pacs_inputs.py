"""Hospital inputs that used to fail late (issue 28, findings 10, 12 and 14): through a pynetdicom peer or STOW-RS."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset

from tests.conftest import TEST_DATA
from tests.service.test_dicom import PATIENT_ID, make_dicom
from tests.service.test_dicomweb import stow
from tests.service.test_dimse import DEST_AET, SCU_AET, SrSink, audit_lines, send, wait_for
from tests.service.test_lifecycle import free_port

JPEG_DICOM = sorted((TEST_DATA / "dicom").glob("*.dcm"))[0]  # encapsulated (JPEG) pixel data


@pytest.fixture
def sink() -> Iterator[SrSink]:
    s = SrSink()
    yield s
    s.close()


@pytest.fixture
def node(client_factory: Callable[..., TestClient], sink: SrSink, tmp_path: Path) -> tuple[TestClient, int, Path]:
    port, audit = free_port(), tmp_path / "audit.jsonl"
    client = client_factory(
        dimse_enabled=True, dimse_port=port, dimse_host="127.0.0.1", dimse_allowed_aets=SCU_AET,
        dimse_destination=f"{DEST_AET}@127.0.0.1:{sink.port}", audit_log=str(audit), dimse_timeout_s=10,
    )  # fmt: skip
    return client, port, audit


def source(**header: object) -> Dataset:
    return pydicom.dcmread(io.BytesIO(make_dicom(np.full((16, 16, 3), 120, np.uint8), **header)))


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=\033$B;3ED\033(B^\033$BB@O:\033(B"),
        (["", "ISO 2022 IR 149"], "Hong^Gildong=\033$)C\xfb\xf3^\033$)C\xd1\xce\xd4\xd7"),
    ],
    ids=["japanese", "korean"],
)
def test_sr_for_japanese_and_korean_character_sets(
    node: tuple[TestClient, int, Path], sink: SrSink, charset: list[str], name: str
) -> None:
    _, port, _ = node
    ds = source(SpecificCharacterSet=charset)
    ds.PatientName = name.encode("latin-1")  # the bytes a modality writes: ISO 2022 escapes, decoded by the set
    expected = str(pydicom.dcmread(io.BytesIO(_bytes(ds))).PatientName)
    assert "=" in expected and not expected.isascii()  # the ideographic part, decoded
    (status,) = send(port, [ds])
    assert int(status.Status) == 0x0000  # old code: 0x0110, highdicom refused the empty first value
    wait_for(lambda: len(sink.received) == 1)
    assert str(sink.received[0].PatientName) == expected


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_sr_copies_only_the_documented_patient_attributes(node: tuple[TestClient, int, Path], sink: SrSink) -> None:
    _, port, _ = node
    ds = source(PatientComments="history of melanoma in the family", AdditionalPatientHistory="on immunosuppressants",
                OtherPatientNames="Maiden^Name", EthnicGroup="X", PatientAddress="1 Street")  # fmt: skip
    (status,) = send(port, [ds])
    assert int(status.Status) == 0x0000
    wait_for(lambda: len(sink.received) == 1)
    sr = sink.received[0]
    assert sr.PatientID == PATIENT_ID  # what the PACS files it by
    for keyword in (
        "PatientComments",
        "AdditionalPatientHistory",
        "OtherPatientNames",
        "EthnicGroup",
        "PatientAddress",
    ):
        assert keyword not in sr, keyword  # old code: all five copied into the SR


def test_no_study_instance_uid_is_refused_c000_not_0110(node: tuple[TestClient, int, Path], sink: SrSink) -> None:
    _, port, audit = node
    ds = source()
    del ds.StudyInstanceUID
    (status,) = send(port, [ds])
    assert int(status.Status) == 0xC000 and "StudyInstanceUID" in str(status.ErrorComment)
    (line,) = [x for x in audit_lines(audit) if "dimse_status" in x.get("channel", {})]
    assert line["outcome"]["status"] == 400 and line["channel"]["sr"] == "failed"


@pytest.mark.parametrize("vr", [b"US", b"UN", b"SQ"])
def test_garbled_pixel_data_vr_is_400_and_c000_not_500(client_factory: Callable[..., TestClient], vr: bytes) -> None:
    data = JPEG_DICOM.read_bytes()
    at = data.rindex(b"\xe0\x7f\x10\x00")
    garbled = data[: at + 4] + vr + data[at + 6 :]
    client = client_factory(dicomweb_enabled=True)
    r = client.post("/v1/classify", content=garbled, headers={"content-type": "application/dicom"})
    assert r.status_code == 400 and "Pixel Data" in r.json()["detail"]  # old code: struct.error, 500
    s = stow(client, [("application/dicom", garbled)])
    assert s.status_code == 409 and s.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
