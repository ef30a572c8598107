"""STOW-RS in and the WADO-RS route without an origin (the Orthanc round trip is tests/e2e/test_orthanc.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient

from service.errors import BadRequest, UnsupportedMediaType
from service.hospital.dicomweb import split_related
from tests.conftest import TEST_DATA
from tests.service.conftest import jpeg_bytes
from tests.service.test_dicom import gradient, make_dicom

DICOMS = sorted((TEST_DATA / "dicom").glob("*.dcm"))
CT = Path(pydicom.data.get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]


def related(parts: list[tuple[str, bytes]], boundary: str | None = None) -> tuple[bytes, str]:
    boundary = boundary or uuid.uuid4().hex
    body = b"preamble, ignored\r\n"
    for kind, data in parts:
        body += f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary="{boundary}"'


def stow(client: TestClient, parts: list[tuple[str, bytes]]) -> Any:
    body, content_type = related(parts)
    return client.post("/dicomweb/studies", content=body, headers={"content-type": content_type})


def test_split_related_keeps_each_part_byte_exact() -> None:
    data = [p.read_bytes() for p in DICOMS]
    body, content_type = related([("application/dicom", d) for d in data])
    assert [d for _, d in split_related(content_type, body)] == data


@pytest.mark.parametrize(
    ("content_type", "body", "error"),
    [
        ("application/dicom", b"x", UnsupportedMediaType),
        ('multipart/related; type="application/dicom+json"; boundary=b', b"--b\r\n\r\n\r\n--b--", UnsupportedMediaType),
        ('multipart/related; type="application/dicom"', b"--b\r\n\r\nx\r\n--b--", BadRequest),  # no boundary
        ('multipart/related; type="application/dicom"; boundary=b', b"--b\r\n\r\nx\r\n--b", BadRequest),  # cut
        ('multipart/related; type="application/dicom"; boundary=b', b"--b--\r\n", BadRequest),  # no part
    ],
    ids=["not-multipart", "json-type", "no-boundary", "truncated", "empty"],
)
def test_split_related_refuses_bad_bodies(content_type: str, body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        split_related(content_type, body)


def test_stow_classifies_every_instance(client_factory: Callable[..., TestClient], tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    client = client_factory(dicomweb_enabled=True, audit_log=str(audit))
    r = stow(client, [("application/dicom", p.read_bytes()) for p in DICOMS])
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+json"
    refs = r.json()["00081199"]["Value"]
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in DICOMS]
    assert sorted(x["00081155"]["Value"][0] for x in refs) == sorted(s.SOPInstanceUID for s in sources)
    assert "00081198" not in r.json()
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert [x["channel"]["entry"] for x in lines] == ["stow-rs"] * 3
    assert all(x["channel"]["sr"] == "none" and x["outcome"]["status"] == 200 for x in lines)


def test_stow_mixed_is_202_with_failure_reasons(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(dicomweb_enabled=True)
    grey = make_dicom(gradient()[..., :1].copy(), photometric="MONOCHROME2")
    parts = [("application/dicom", DICOMS[0].read_bytes()), ("application/dicom", CT.read_bytes()),
             ("application/dicom", grey), ("image/jpeg", jpeg_bytes())]  # fmt: skip
    r = stow(client, parts)
    assert r.status_code == 202, r.text
    assert len(r.json()["00081199"]["Value"]) == 1
    failed = r.json()["00081198"]["Value"]
    ct = pydicom.dcmread(CT, stop_before_pixels=True)
    reasons = {(f.get("00081155", {}).get("Value", [None])[0]): f["00081197"]["Value"][0] for f in failed}
    assert reasons[ct.SOPInstanceUID] == 0x0122  # SOP class not supported, as by C-STORE
    assert reasons[pydicom.dcmread(pydicom.filebase.DicomBytesIO(grey)).SOPInstanceUID] == 0xC000
    assert reasons[None] == 0xC000  # the JPEG part: no UIDs to quote


def test_stow_none_classified_is_409(client_factory: Callable[..., TestClient]) -> None:
    r = stow(client_factory(dicomweb_enabled=True), [("application/dicom", CT.read_bytes())])
    assert r.status_code == 409 and "00081199" not in r.json()


def test_stow_bad_content_type_is_415_problem(client_factory: Callable[..., TestClient]) -> None:
    r = client_factory(dicomweb_enabled=True).post(
        "/dicomweb/studies", content=DICOMS[0].read_bytes(), headers={"content-type": "application/dicom"}
    )
    assert r.status_code == 415 and r.headers["content-type"] == "application/problem+json"


def test_dicomweb_routes_are_off_by_default(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory()
    assert stow(client, [("application/dicom", DICOMS[0].read_bytes())]).status_code == 404
    assert client.post("/v1/classify/dicomweb", json={}).status_code == 404


def test_wado_route_without_an_origin_is_501(client_factory: Callable[..., TestClient]) -> None:
    uids = {"study_instance_uid": "1.2.3", "series_instance_uid": "1.2.4", "sop_instance_uid": "1.2.5"}
    r = client_factory(dicomweb_enabled=True).post("/v1/classify/dicomweb", json=uids)
    assert r.status_code == 501 and r.json()["type"].endswith("/not-configured")


def test_wado_route_refuses_malformed_uids(client_factory: Callable[..., TestClient]) -> None:
    uids = {"study_instance_uid": "1.2.3", "series_instance_uid": "x", "sop_instance_uid": "1.2.5"}
    r = client_factory(dicomweb_enabled=True, dicomweb_origin="http://127.0.0.1:9/dicom-web").post(
        "/v1/classify/dicomweb", json=uids
    )
    assert r.status_code == 400


def test_wado_route_origin_down_is_502(client_factory: Callable[..., TestClient]) -> None:
    uids = {"study_instance_uid": "1.2.3", "series_instance_uid": "1.2.4", "sop_instance_uid": "1.2.5"}
    r = client_factory(dicomweb_enabled=True, dicomweb_origin="http://127.0.0.1:9/dicom-web").post(
        "/v1/classify/dicomweb", json=uids
    )
    assert r.status_code == 502 and r.json()["type"].endswith("/dicomweb-origin-failed")
