"""service.hospital.fhir: the DiagnosticReport validates as FHIR R4 (fhir.resources.R4B) and says what the answer says."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from pydantic import ValidationError

from service.hospital.dicom import read_dicom
from service.hospital.fhir import DICOM_UID_SYSTEM, diagnostic_report
from service.schemas import ClassifyResponse
from service.version import SERVICE_VERSION
from tests.conftest import TEST_DATA
from tests.service.conftest import FakeModel, jpeg_bytes

ISSUED = datetime(2026, 11, 22, 9, 30, 5, tzinfo=UTC)
IDS = {
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.53814268210671232465866595232773018980",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.55883449113511453978570831658200370536",
    "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.90455823528976694600273313806055321760",
    "AccessionNumber": "ACC123",
}


def make_answer(**overrides: Any) -> dict[str, Any]:
    preds = [
        {"code": "nv", "name": "Melanocytic nevus", "probability": 0.62},
        {"code": "mel", "name": "Melanoma", "probability": 0.25},
        {"code": "bkl", "name": "Benign keratosis", "probability": 0.08},
        {"code": "bcc", "name": "Basal cell carcinoma", "probability": 0.05},
    ]
    answer: dict[str, Any] = {
        "request_id": "0b7c6f3e-9a51-4c1e-8f1e-2d7b1c9e4a10",
        "model": {"name": "resnet18-ham10000", "version": "1.2.0", "sha256": "ab" * 32},
        "predictions": preds,
        "top": preds[0],
        "malignancy": {"score": 0.30, "threshold": 0.35, "above_threshold": False, "classes": ["mel", "bcc"]},
        "image": {"width": 1022, "height": 767, "format": "dicom"},
        "timing_ms": {"decode": 30.0, "queue": 1.0, "inference": 12.0, "total": 45.0},
        "service_version": SERVICE_VERSION,
    }
    answer.update(overrides)
    return answer


def validate(report: dict[str, Any]) -> DiagnosticReport:
    """fhir.resources checks structure and datatypes; the R4 rules it does not check are asserted here."""
    parsed = DiagnosticReport.model_validate(json.loads(json.dumps(report)))  # JSON-serialisable, then valid
    contained = {r["id"]: r for r in report["contained"]}
    assert len(contained) == len(report["contained"])  # ids unique
    for resource in report["contained"]:
        {"Observation": Observation, "Device": Device}[resource["resourceType"]].model_validate(resource)
    assert report["status"] == "preliminary"
    # R4: DiagnosticReport.performer is Practitioner|PractitionerRole|Organization|CareTeam, never Device.
    assert "performer" not in report
    referenced = {ref["reference"][1:] for ref in report["result"]}
    for obs in (r for r in report["contained"] if r["resourceType"] == "Observation"):
        assert obs["device"]["reference"] == "#model"
        assert obs["valueQuantity"]["unit"] == "1" and obs["valueQuantity"]["code"] == "1"
        assert 0.0 <= obs["valueQuantity"]["value"] <= 1.0
        referenced.add("model")
    assert referenced == set(contained)  # dom-3: every contained resource is referenced
    return parsed


def observations(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in report["contained"] if r["resourceType"] == "Observation"}


def test_report_with_dicom_identifiers_validates_and_carries_the_answer() -> None:
    answer = make_answer()
    report = diagnostic_report(answer, identifiers=IDS, issued=ISSUED)
    parsed = validate(report)
    assert parsed.id == answer["request_id"]
    obs = observations(report)
    for p in answer["predictions"]:
        o = obs[f"p-{p['code']}"]
        assert o["valueQuantity"]["value"] == pytest.approx(p["probability"])
        assert o["code"]["coding"][0]["code"] == p["code"]
    assert sum(obs[f"p-{p['code']}"]["valueQuantity"]["value"] for p in answer["predictions"]) == pytest.approx(1.0)
    mal = obs["malignancy"]
    assert mal["valueQuantity"]["value"] == pytest.approx(0.30)
    assert mal["referenceRange"][0]["high"]["value"] == pytest.approx(0.35)
    assert mal["interpretation"][0]["coding"][0]["code"] == "N"
    study = report["imagingStudy"][0]
    assert study["identifier"] == {"system": DICOM_UID_SYSTEM, "value": "urn:oid:" + IDS["StudyInstanceUID"]}
    acsn = [i for i in report["identifier"] if i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN"]
    assert [i["value"] for i in acsn] == ["ACC123"]
    device = next(r for r in report["contained"] if r["resourceType"] == "Device")
    assert device["identifier"][0]["value"] == "ab" * 32
    assert device["deviceName"][0]["name"] == "resnet18-ham10000" and device["version"][0]["value"] == "1.2.0"
    assert "Melanocytic nevus" in report["conclusion"] and "below" in report["conclusion"]
    assert report["conclusionCode"][0]["coding"][0]["code"] == "nv"  # the top class, not the last
    assert parsed.issued is not None and parsed.issued.year == 2026


def test_report_without_identifiers_has_no_imaging_study() -> None:
    report = diagnostic_report(make_answer(), identifiers=None, issued=ISSUED)
    validate(report)
    assert "imagingStudy" not in report
    assert [i["value"] for i in report["identifier"]] == [make_answer()["request_id"]]


def test_above_threshold_is_interpreted_high() -> None:
    m = {"score": 0.8, "threshold": 0.35, "above_threshold": True, "classes": ["mel"]}
    report = diagnostic_report(make_answer(malignancy=m), identifiers=None, issued=ISSUED)
    validate(report)
    assert observations(report)["malignancy"]["interpretation"][0]["coding"][0]["code"] == "H"
    assert "at or above" in report["conclusion"]


def test_odd_class_codes_and_request_ids_still_give_valid_ids() -> None:
    preds = [{"code": "a b/c", "name": "Odd", "probability": 0.7}, {"code": "x", "name": "X", "probability": 0.3}]
    answer = make_answer(predictions=preds, top=preds[0], request_id="not a valid fhir id!")
    report = diagnostic_report(answer, identifiers={"StudyInstanceUID": "not-an-oid"}, issued=ISSUED)
    validate(report)
    assert "id" not in report and "imagingStudy" not in report
    assert set(observations(report)) == {"p-0", "p-x", "malignancy"}
    assert report["identifier"][0]["value"] == "not a valid fhir id!"


def test_accepts_the_services_response_model() -> None:
    model = ClassifyResponse.model_validate({**make_answer(), "batch_size": 1})
    report = diagnostic_report(model, identifiers=IDS, issued=ISSUED)
    validate(report)
    assert report == diagnostic_report(make_answer(), identifiers=IDS, issued=ISSUED)


def test_non_utc_issued_keeps_its_offset() -> None:
    issued = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=1)))
    report = diagnostic_report(make_answer(), identifiers=None, issued=issued)
    validate(report)
    assert report["issued"] == "2026-01-02T03:04:05+01:00"


def test_naive_issued_and_incomplete_answer_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        diagnostic_report(make_answer(), identifiers=None, issued=datetime(2026, 1, 1))
    incomplete = make_answer()
    del incomplete["malignancy"]
    with pytest.raises(ValueError, match="malignancy"):
        diagnostic_report(incomplete, identifiers=None, issued=ISSUED)


def test_validator_is_not_a_rubber_stamp() -> None:
    report = diagnostic_report(make_answer(), identifiers=None, issued=ISSUED)
    del report["status"]
    with pytest.raises(ValidationError):
        DiagnosticReport.model_validate(report)
    report = diagnostic_report(make_answer(), identifiers=None, issued=ISSUED)
    report["issued"] = "2026-11-22"  # an instant needs a time and zone
    with pytest.raises(ValidationError):
        DiagnosticReport.model_validate(report)


@pytest.mark.parametrize("path", sorted((TEST_DATA / "dicom").glob("*.dcm")), ids=lambda p: p.name)
def test_report_from_committed_dicom_identifiers_validates(path: Any) -> None:
    image = read_dicom(path.read_bytes(), max_pixels=40_000_000)
    report = diagnostic_report(make_answer(), identifiers=image.identifiers, issued=ISSUED)
    validate(report)
    assert report["imagingStudy"][0]["identifier"]["value"] == "urn:oid:" + image.identifiers["StudyInstanceUID"]
    text = json.dumps(report)
    assert "TEST^SYNTHETIC" not in text and "TEST-ISIC" not in text


def test_conclusion_code_is_the_most_likely_class_over_http(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(model=FakeModel())  # ranks the classes in a fixed order for a red image
    image = jpeg_bytes(color=(200, 40, 40))
    answer = client.post("/v1/classify", content=image, headers={"content-type": "image/jpeg"}).json()
    resp = client.post(
        "/v1/classify", content=image, headers={"content-type": "image/jpeg", "accept": "application/fhir+json"}
    )
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/fhir+json")
    report = resp.json()
    validate(report)
    values = {o["code"]["coding"][0]["code"]: o["valueQuantity"]["value"] for o in observations(report).values()}
    top = answer["top"]["code"]
    assert top == max((c for c in values if c != "malignancy-score"), key=values.__getitem__)
    assert report["conclusionCode"][0]["coding"][0]["code"] == top
    assert report["conclusionCode"][0]["text"] == answer["top"]["name"]
