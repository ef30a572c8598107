"""The Storage SCP in the service process, against pynetdicom peers: a sending SCU and a receiving SCP for the SRs.

The real-PACS round trip (Orthanc) is in tests/e2e/test_orthanc.py; these run everywhere.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComprehensiveSRStorage,
    CTImageStorage,
    DermoscopicPhotographyImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
    VLPhotographicImageStorage,
)

from service.hospital.dicom import SECONDARY_CAPTURE
from service.hospital.sr import TOP_CLASS, class_concept
from tests.conftest import TEST_DATA
from tests.service.test_dicom import PATIENT_ID, PATIENT_NAME, make_dicom
from tests.service.test_lifecycle import free_port

DICOMS = sorted((TEST_DATA / "dicom").glob("*.dcm"))
SCU_AET, SCP_AET, DEST_AET = "TESTSCU", "LESIONSERVE", "SRSINK"


class SrSink:
    """A Storage SCP that keeps every SR it receives (the PACS side of the return path)."""

    def __init__(self, status: int = 0x0000) -> None:
        self.received: list[Dataset] = []
        self.status = status
        self.port = free_port()
        ae = AE(ae_title=DEST_AET)
        ae.add_supported_context(ComprehensiveSRStorage, [ExplicitVRLittleEndian])
        self.associations = 0
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_ACCEPTED, self._accepted)]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def _accepted(self, event: Any) -> None:
        self.associations += 1

    def _store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return self.status

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def sink() -> Iterator[SrSink]:
    s = SrSink()
    yield s
    s.close()


@pytest.fixture
def node(client_factory: Callable[..., TestClient], sink: SrSink, tmp_path: Path) -> tuple[TestClient, int, Path]:
    """A started service with its Storage SCP; (client, SCP port, audit file)."""
    port, audit = free_port(), tmp_path / "audit.jsonl"
    client = client_factory(
        dimse_enabled=True, dimse_port=port, dimse_host="127.0.0.1", dimse_allowed_aets=f"{SCU_AET}, OTHER",
        dimse_destination=f"{DEST_AET}@127.0.0.1:{sink.port}", audit_log=str(audit), dimse_timeout_s=10,
    )  # fmt: skip
    return client, port, audit


def scu(aet: str = SCU_AET) -> AE:
    ae = AE(ae_title=aet)
    # one context per transfer syntax, as PACS do: each object goes in its own syntax, without transcoding
    for sop in (DermoscopicPhotographyImageStorage, VLPhotographicImageStorage, SecondaryCaptureImageStorage):
        for ts in (pydicom.uid.JPEGBaseline8Bit, ExplicitVRLittleEndian):
            ae.add_requested_context(sop, [ts])
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    return ae


def send(port: int, datasets: list[Dataset], aet: str = SCU_AET) -> list[Dataset]:
    assoc = scu(aet).associate("127.0.0.1", port, ae_title=SCP_AET)
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def metric(client: TestClient, series: str) -> float:
    """One sample's value from /metrics (counters are process-wide: tests compare before and after)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not exported")


def audit_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_committed_dicoms_come_back_as_srs_in_their_study(
    node: tuple[TestClient, int, Path], sink: SrSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client, port, audit = node
    sources = [pydicom.dcmread(p) for p in DICOMS]
    counted = ('lesionserve_dicom_instances_total{entry="dimse",outcome="classified"}',
               'lesionserve_sr_deliveries_total{entry="dimse",outcome="stored"}',
               'lesionserve_dimse_associations_total{outcome="accepted"}')  # fmt: skip
    before = [metric(client, c) for c in counted]
    statuses = send(port, sources)
    assert [int(s.Status) for s in statuses] == [0x0000] * len(DICOMS)
    assert len(sink.received) == len(DICOMS)
    assert sink.associations == 1  # the SRs of one incoming association travel over one outgoing association
    by_source = {}
    for sr in sink.received:
        assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
        ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        by_source[ref.ReferencedSOPInstanceUID] = sr
    for path, src in zip(DICOMS, sources, strict=True):
        sr = by_source[src.SOPInstanceUID]
        assert (sr.StudyInstanceUID, sr.PatientID, sr.PatientName) == (
            src.StudyInstanceUID,
            src.PatientID,
            src.PatientName,
        )
        assert sr.SeriesInstanceUID != src.SeriesInstanceUID
        # the same image through the REST API gives the same top class
        top = client.post("/v1/classify", content=path.read_bytes(), headers={"content-type": "application/dicom"})
        doc = hd.sr.srread(io.BytesIO(_bytes(sr)))
        group = doc.content.get_image_measurement_groups()[0]
        (top_item,) = [q for q in group.get_qualitative_evaluations() if q.name == TOP_CLASS]
        assert top_item.value == class_concept(top.json()["top"]["code"], top.json()["top"]["name"])
    lines = audit_lines(audit)
    stores = [line for line in lines if "dimse_status" in line.get("channel", {})]
    assert len(stores) == len(DICOMS)
    for line in stores:
        assert line["channel"] == {"entry": "dimse", "calling_ae": SCU_AET, "dimse_status": "0x0000", "sr": "stored"}
        assert len(line["dicom"]["SOPInstanceUID"]) == 64  # hashed
        assert line["model"]["sha256"] == client.get("/v1/models").json()["models"][0]["sha256"]
    # patient attributes go into the SR only: not into the audit trail, not into any log record
    for text in (audit.read_text(), caplog.text):
        assert all(str(s.PatientName) not in text and str(s.PatientID) not in text for s in sources)
    after = [metric(client, c) for c in counted]
    assert [a - b for a, b in zip(after, before, strict=True)] == [len(DICOMS), len(DICOMS), 1]


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_unknown_calling_ae_is_rejected_with_the_reason(node: tuple[TestClient, int, Path], sink: SrSink) -> None:
    client, port, audit = node
    before = metric(client, 'lesionserve_dimse_associations_total{outcome="rejected"}')
    assoc = scu("STRANGER").associate("127.0.0.1", port, ae_title=SCP_AET)
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    # rejected-permanent (1), service user (1), calling AE title not recognised (3): PS3.8 9.3.4
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    assert sink.received == []
    (line,) = [x for x in audit_lines(audit) if x.get("channel", {}).get("entry") == "dimse"]
    assert line["outcome"]["problem"].endswith("/dimse-association-rejected")
    assert line["channel"] == {"entry": "dimse", "calling_ae": "STRANGER", "reason": "calling AE title not recognised"}
    assert metric(client, 'lesionserve_dimse_associations_total{outcome="rejected"}') == before + 1


def test_wrong_called_ae_is_rejected(node: tuple[TestClient, int, Path]) -> None:
    _, port, _ = node
    assoc = scu().associate("127.0.0.1", port, ae_title="SOMEONEELSE")
    assert assoc.is_rejected and assoc.acceptor.primitive.diagnostic == 0x07  # called AE title not recognised


def test_unsupported_sop_class_is_refused_per_instance_with_0122(
    node: tuple[TestClient, int, Path], sink: SrSink
) -> None:
    client, port, audit = node
    ct = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    before = metric(client, 'lesionserve_dicom_instances_total{entry="dimse",outcome="refused"}')
    (status,) = send(port, [ct])
    assert int(status.Status) == 0x0122  # Refused: SOP Class not supported
    assert str(status.ErrorComment) == "CT Image Storage is not accepted"
    assert sink.received == []
    (line,) = [x for x in audit_lines(audit) if "dimse_status" in x.get("channel", {})]
    assert line["channel"]["dimse_status"] == "0x0122" and line["outcome"]["status"] == 415
    assert line["dicom"]["SOPInstanceUID"] and line["input"]["content_type"] == "application/dicom"
    assert metric(client, 'lesionserve_dicom_instances_total{entry="dimse",outcome="refused"}') == before + 1


def test_accepted_sop_class_in_an_undecodable_syntax_is_refused_at_negotiation(
    node: tuple[TestClient, int, Path],
) -> None:
    client, port, audit = node
    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context(VLPhotographicImageStorage, [pydicom.uid.DeflatedExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    before = metric(client, "lesionserve_dimse_contexts_refused_total")
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AET)
    assert assoc.is_established
    try:
        assert {str(c.abstract_syntax): c.result for c in assoc.rejected_contexts} == {
            VLPhotographicImageStorage: 0x04  # transfer syntaxes not supported
        }
    finally:
        assoc.release()
    (line,) = [x for x in audit_lines(audit) if x.get("channel", {}).get("refused_sop_class")]
    assert line["channel"]["refused_sop_class"] == "VL Photographic Image Storage" and line["outcome"]["status"] == 415
    assert metric(client, "lesionserve_dimse_contexts_refused_total") == before + 1


def test_greyscale_secondary_capture_gets_a_failure_status_and_no_sr(
    node: tuple[TestClient, int, Path], sink: SrSink
) -> None:
    client, port, audit = node
    grey = np.full((16, 16, 1), 90, np.uint8)
    ds = pydicom.dcmread(io.BytesIO(make_dicom(grey, sop=SECONDARY_CAPTURE, photometric="MONOCHROME2")))
    before = metric(client, 'lesionserve_dicom_instances_total{entry="dimse",outcome="refused"}')
    (status,) = send(port, [ds])
    assert int(status.Status) == 0xC000  # Error: cannot understand
    assert "MONOCHROME2" in str(status.ErrorComment)
    assert sink.received == []
    (line,) = [x for x in audit_lines(audit) if "dimse_status" in x.get("channel", {})]
    assert line["channel"]["dimse_status"] == "0xC000" and line["outcome"]["status"] == 415
    assert line["dicom"]["SOPInstanceUID"]  # hashed UID of the refused instance
    assert PATIENT_NAME not in audit.read_text() and PATIENT_ID not in audit.read_text()
    assert metric(client, 'lesionserve_dicom_instances_total{entry="dimse",outcome="refused"}') == before + 1


def test_sr_not_stored_at_the_destination_fails_the_c_store(
    client_factory: Callable[..., TestClient], tmp_path: Path
) -> None:
    refusing = SrSink(status=0xA700)  # the PACS is out of resources
    try:
        port = free_port()
        client_factory(
            dimse_enabled=True, dimse_port=port, dimse_host="127.0.0.1", dimse_allowed_aets=SCU_AET,
            dimse_destination=f"{DEST_AET}@127.0.0.1:{refusing.port}", audit_log=str(tmp_path / "a.jsonl"),
        )  # fmt: skip
        (status,) = send(port, [pydicom.dcmread(DICOMS[0])])
    finally:
        refusing.close()
    assert int(status.Status) == 0x0110  # processing failure: the sender keeps the image and can resend
    assert "0xA700" in str(status.ErrorComment)
    (line,) = [x for x in audit_lines(tmp_path / "a.jsonl") if "dimse_status" in x.get("channel", {})]
    assert line["channel"]["sr"] == "failed" and line["outcome"]["problem"].endswith("/result-not-delivered")


def test_sr_destination_down_fails_the_c_store(client_factory: Callable[..., TestClient], tmp_path: Path) -> None:
    port = free_port()
    client_factory(
        dimse_enabled=True, dimse_port=port, dimse_host="127.0.0.1", dimse_allowed_aets=SCU_AET,
        dimse_destination=f"{DEST_AET}@127.0.0.1:{free_port()}", dimse_timeout_s=5,
    )  # fmt: skip
    (status,) = send(port, [pydicom.dcmread(DICOMS[0])])
    assert int(status.Status) == 0x0110 and "refused or did not answer" in str(status.ErrorComment)


def test_concurrent_associations_share_batches(node: tuple[TestClient, int, Path], sink: SrSink) -> None:
    _, port, _ = node
    results: list[int] = []

    def one() -> None:
        results.extend(int(s.Status) for s in send(port, [pydicom.dcmread(DICOMS[0])]))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [0] * 4 and len(sink.received) == 4
    # the same source gives the same SR UID every time: the PACS replaces it rather than filing copies
    assert len({sr.SOPInstanceUID for sr in sink.received}) == 1


def test_dimse_settings_are_checked_at_start(settings_factory: Callable[..., Any]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="DIMSE_ALLOWED_AETS"):
        settings_factory(dimse_enabled=True, dimse_destination="A@h:1")
    with pytest.raises(ValidationError, match="DIMSE_DESTINATION"):
        settings_factory(dimse_enabled=True, dimse_allowed_aets="A")
    with pytest.raises(ValidationError, match="AE_TITLE@host:port"):
        settings_factory(dimse_enabled=True, dimse_allowed_aets="A", dimse_destination="nohost")
    with pytest.raises(ValidationError, match="AE title"):
        settings_factory(dimse_ae_title="MUCH_TOO_LONG_AE_TITLE")
    with pytest.raises(ValidationError, match="AE title"):
        settings_factory(dimse_allowed_aets="GOOD,BAD\\AET")
