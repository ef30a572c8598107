"""STOW-RS in and the WADO-RS route without an origin (the Orthanc round trip is tests/e2e/test_orthanc.py)."""

from __future__ import annotations

import http.server
import json
import threading
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
from tests.service.test_dimse import wait_for
from tests.service.test_lifecycle import free_port

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


# --- SRs back by STOW-RS, through the outbox ------------------------------------------------------------
class FakeOrigin:
    """A DICOMweb origin that answers each STOW-RS with ``status`` (and a Failed SOP Sequence on 202 and 409)."""

    def __init__(self, status: int = 200) -> None:
        self.status, self.bodies = status, []  # type: ignore[var-annotated]
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                owner.bodies.append(self.rfile.read(int(self.headers["content-length"])))
                body = b'{"00081198":{"vr":"SQ","Value":[{}]}}' if owner.status in (202, 409) else b"{}"
                self.send_response(owner.status)
                self.send_header("content-type", "application/dicom+json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def outbox_client(client_factory: Callable[..., TestClient], origin: str, **settings: Any) -> TestClient:
    return client_factory(
        dicomweb_enabled=True, dicomweb_push_sr=True, dicomweb_origin=origin, outbox_retry_base_s=0.05,
        outbox_retry_max_s=0.1, **settings,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("status", "state", "error"),
    [(200, "delivered", None), (409, "dead", "HTTP 409"), (202, "dead", "Failed SOP Sequence")],
)
def test_stow_srs_are_delivered_to_the_origin_or_dead_lettered(
    client_factory: Callable[..., TestClient], tmp_path: Path, status: int, state: str, error: str | None
) -> None:
    origin = FakeOrigin(status)
    try:
        audit = tmp_path / "audit.jsonl"
        client = outbox_client(client_factory, origin.url, audit_log=str(audit), outbox_retention_s=3600)
        r = stow(client, [("application/dicom", p.read_bytes()) for p in DICOMS])
        assert r.status_code == 200  # answered once the 3 SRs are in the outbox
        box = client.app.state.outbox.outbox  # type: ignore[attr-defined]
        wait_for(lambda: box.stats().pending == 0)
    finally:
        origin.close()
    assert len(origin.bodies) == len(DICOMS)  # one STOW-RS per SR, each tried once
    rows = box.letters(state)
    assert len(rows) == 3 and all(r.kind == "stow-rs" for r in rows)
    if state == "dead":
        assert {r.reason for r in rows} == {"refused"} and error in (rows[0].error or "")
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert [x["channel"]["sr"] for x in lines if x["channel"]["entry"] == "stow-rs"] == ["queued"] * 3


def test_stow_outbox_full_is_503_before_classifying_and_keeps_nothing(
    client_factory: Callable[..., TestClient], tmp_path: Path
) -> None:
    down = f"http://127.0.0.1:{free_port()}/dicom-web"  # the PACS is down: nothing leaves the outbox
    client = outbox_client(client_factory, down, outbox_max_items=2, audit_log=str(tmp_path / "a.jsonl"))
    box = client.app.state.outbox.outbox  # type: ignore[attr-defined]
    r = stow(client, [("application/dicom", p.read_bytes()) for p in DICOMS])  # 3 SRs, room for 2
    assert r.status_code == 503 and r.headers["retry-after"] == "60"
    assert r.json()["type"].endswith("/outbox-full") and "full (0 SRs wait" in r.json()["detail"]
    assert box.stats().pending == 0  # refused before any work: one audit line for the request, none per instance
    (line,) = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert line["outcome"]["status"] == 503 and line["outcome"]["problem"].endswith("/outbox-full")
    assert stow(client, [("application/dicom", p.read_bytes()) for p in DICOMS[:2]]).status_code == 200
    assert box.stats().pending == 2
    assert stow(client, [("application/dicom", DICOMS[2].read_bytes())]).status_code == 503
    assert box.stats().pending == 2


def test_stow_outbox_disk_full_is_503_and_every_instance_audited_as_failed(
    client_factory: Callable[..., TestClient], tmp_path: Path
) -> None:
    audit = tmp_path / "a.jsonl"
    client = outbox_client(client_factory, f"http://127.0.0.1:{free_port()}/dicom-web", audit_log=str(audit))
    box = client.app.state.outbox.outbox  # type: ignore[attr-defined]
    pages = box._db.execute("PRAGMA page_count").fetchone()[0]
    box._db.execute(f"PRAGMA max_page_count={pages}")  # the disk is full
    r = stow(client, [("application/dicom", p.read_bytes()) for p in DICOMS])
    assert r.status_code == 503 and r.json()["type"].endswith("/outbox-unavailable")
    assert "database or disk is full" in r.json()["detail"]
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert [(x["channel"]["sr"], x["channel"]["status"]) for x in lines] == [("failed", "0xA700")] * 3
    assert box.stats().pending == 0
