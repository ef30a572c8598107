"""DICOM in, FHIR out and the audit trail through the HTTP API (the modules wired into the routes)."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from service.hospital.dicom import DERMOSCOPIC_PHOTOGRAPHY
from tests.conftest import TEST_DATA
from tests.service.conftest import jpeg_bytes
from tests.service.test_dicom import PATIENT_ID, PATIENT_NAME, gradient, make_dicom

ClientFactory = Callable[..., TestClient]
DICOMS = sorted((TEST_DATA / "dicom").glob("*.dcm"))
FHIR = "application/fhir+json"


def post(client: TestClient, data: bytes, content_type: str, **headers: str) -> object:
    return client.post("/v1/classify", content=data, headers={"content-type": content_type, **headers})


def audit_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("path", DICOMS, ids=lambda p: p.name)
def test_committed_dicom_classifies_and_returns_its_uids(client_factory: ClientFactory, path: Path) -> None:
    assert len(DICOMS) == 3
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    r = post(client_factory(), path.read_bytes(), "application/dicom")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] == {"width": ds.Columns, "height": ds.Rows, "format": "dicom"}
    ids = body["dicom"]["identifiers"]
    assert ids["StudyInstanceUID"] == ds.StudyInstanceUID
    assert ids["SeriesInstanceUID"] == ds.SeriesInstanceUID
    assert ids["SOPInstanceUID"] == ds.SOPInstanceUID
    assert body["dicom"]["sop_class_uid"] == ds.SOPClassUID
    assert abs(sum(p["probability"] for p in body["predictions"]) - 1) < 1e-4
    assert str(ds.PatientName) not in r.text and str(ds.PatientID) not in r.text


def test_multipart_dicom_part_is_sniffed_even_when_labelled_generically(client_factory: ClientFactory) -> None:
    data = DICOMS[0].read_bytes()
    client = client_factory()
    for part_type in ("application/dicom", "application/octet-stream"):
        r = client.post("/v1/classify", files={"image": ("x.dcm", data, part_type)})
        assert r.status_code == 200, r.text
        assert r.json()["image"]["format"] == "dicom"


def test_jpeg_answer_has_no_dicom_field(client_factory: ClientFactory) -> None:
    r = post(client_factory(), jpeg_bytes(), "image/jpeg")
    assert r.status_code == 200 and "dicom" not in r.json()


@pytest.mark.parametrize(
    ("data", "status", "slug"),
    [
        (make_dicom(gradient(), SOPClassUID="1.2.840.10008.5.1.4.1.1.2"), 415, "unsupported-media-type"),  # CT
        (make_dicom(None, sop=DERMOSCOPIC_PHOTOGRAPHY), 400, "invalid-image"),  # no pixel data
        (jpeg_bytes(), 400, "invalid-image"),  # declared DICOM, is a JPEG
    ],
    ids=["ct-415", "no-pixels-400", "not-dicom-400"],
)
def test_refused_dicom_gets_problem_json(client_factory: ClientFactory, data: bytes, status: int, slug: str) -> None:
    r = post(client_factory(), data, "application/dicom")
    assert r.status_code == status, r.text
    assert r.json()["type"].endswith("/" + slug)


def test_declared_30000_square_is_413(client_factory: ClientFactory) -> None:
    small = make_dicom(gradient(4, 4))
    ds = pydicom.dcmread(io.BytesIO(small))
    ds.Rows = ds.Columns = 30000
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    r = post(client_factory(), buf.getvalue(), "application/dicom")
    assert r.status_code == 413, r.text


@pytest.mark.parametrize("path", [DICOMS[0], None], ids=["dicom", "jpeg"])
def test_fhir_answer_validates_and_links_the_study(client_factory: ClientFactory, path: Path | None) -> None:
    data, ctype = (path.read_bytes(), "application/dicom") if path else (jpeg_bytes(), "image/jpeg")
    r = post(client_factory(), data, ctype, accept=FHIR)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(FHIR)
    report = r.json()
    DiagnosticReport.model_validate(report)  # raises on an invalid R4(B) resource
    assert report["status"] == "preliminary"
    observations = [c for c in report["contained"] if c["resourceType"] == "Observation"]
    assert len(observations) == 7 + 1  # one per class + malignancy
    if path is not None:
        study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
        assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study}"
    else:
        assert "imagingStudy" not in report


def test_audit_line_per_request_with_hashes_and_no_phi(client_factory: ClientFactory, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    client = client_factory(audit_log=str(log), api_keys="hospital-a:" + "k" * 24)
    auth = {"authorization": "Bearer " + "k" * 24}
    dicom = make_dicom(gradient(40, 40))  # carries PATIENT_NAME / PATIENT_ID in its header
    jpeg = jpeg_bytes()
    ok_dicom = post(client, dicom, "application/dicom", **auth, **{"x-request-id": "req-dicom-1"})
    ok_jpeg = post(client, jpeg, "image/jpeg", **auth)
    refused = post(client, jpeg, "image/jpeg")  # no key
    bad = post(client, b"not an image", "image/png", **auth)
    assert [r.status_code for r in (ok_dicom, ok_jpeg, refused, bad)] == [200, 200, 401, 400]
    client.get("/healthz")  # not a classify request: not audited
    lines = audit_lines(log)
    assert len(lines) == 4
    first = lines[0]
    assert first["request_id"] == "req-dicom-1" and first["key_id"] == "hospital-a"
    assert first["input"] == {"sha256": hashlib.sha256(dicom).hexdigest(), "bytes": len(dicom),
                              "content_type": "application/dicom"}  # fmt: skip
    assert first["outcome"] == {"status": 200, "problem": None}
    assert first["model"]["name"] == "tiny-test-model"
    uid = ok_dicom.json()["dicom"]["identifiers"]["StudyInstanceUID"]
    assert uid not in log.read_text()  # UIDs are hashed in the trail
    assert first["dicom"]["StudyInstanceUID"] == hashlib.sha256(uid.encode()).hexdigest()
    assert lines[2]["outcome"]["status"] == 401 and lines[2]["outcome"]["problem"].endswith("/unauthorized")
    assert lines[2]["key_id"] is None and lines[2]["model"] is None
    assert lines[3]["outcome"]["problem"].endswith("/invalid-image")
    text = log.read_text()
    assert PATIENT_NAME not in text and PATIENT_ID not in text and "ACC123" not in text
    assert np.all([line["latency_ms"] >= 0 for line in lines])


def test_audit_can_be_turned_off(
    client_factory: ClientFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = client_factory(audit_log="off")
    assert post(client, jpeg_bytes(), "image/jpeg").status_code == 200
    assert '"audit":' not in capsys.readouterr().err
