"""The service's own version beside the model's, and the answer in the audit trail (issue 34, item 5)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import pydicom
from fastapi.testclient import TestClient

from service.version import SERVICE_VERSION
from tests.service.conftest import jpeg_bytes
from tests.service.test_hospital_http import DICOMS

ClientFactory = Callable[..., TestClient]


def test_the_service_version_is_the_installed_distributions() -> None:
    assert version("lesionserve") == SERVICE_VERSION


def test_models_openapi_and_answer_name_the_service_version_beside_the_models(client_factory: ClientFactory) -> None:
    client = client_factory()
    models = client.get("/v1/models").json()
    assert models["service_version"] == SERVICE_VERSION
    model_version = models["models"][0]["version"]
    assert client.get("/openapi.json").json()["info"]["version"] == SERVICE_VERSION
    answer = client.post("/v1/classify", content=jpeg_bytes(), headers={"content-type": "image/jpeg"}).json()
    assert answer["service_version"] == SERVICE_VERSION and answer["model"]["version"] == model_version
    # the metrics are the training run's validation figures, and the schema says so (not "test")
    spec = client.get("/openapi.json").json()["components"]["schemas"]["ModelInfo"]["properties"]["metrics"]
    assert "Validation" in spec["description"] and "not the held-out test set" in spec["description"]


def test_the_sr_names_the_service_and_the_model_in_software_versions(client_factory: ClientFactory) -> None:
    client = client_factory()
    r = client.post(
        "/v1/classify", content=DICOMS[0].read_bytes(),
        headers={"content-type": "application/dicom", "accept": "application/dicom"},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    sr = pydicom.dcmread(io.BytesIO(r.content))
    model = client.get("/v1/models").json()["models"][0]
    assert list(sr.SoftwareVersions) == [f"lesionserve {SERVICE_VERSION}", f"{model['name']} {model['version']}"]


def test_audit_lines_carry_the_answer_the_model_hash_and_the_service_version(
    client_factory: ClientFactory, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    client = client_factory(audit_log=str(audit))
    answer = client.post("/v1/classify", content=jpeg_bytes(), headers={"content-type": "image/jpeg"}).json()
    refused = client.post("/v1/classify", content=jpeg_bytes(3, 3), headers={"content-type": "image/jpeg"})
    assert refused.status_code == 422
    ok, bad = (json.loads(line) for line in audit.read_text().splitlines())
    assert ok["answer"] == {
        "top": answer["top"]["code"],
        "malignant": answer["malignancy"]["above_threshold"],
        "ood": answer["ood"].get("out_of_distribution"),  # None: this model has no OOD check
    }
    assert ok["model"]["sha256"] == answer["model"]["sha256"] and ok["service_version"] == SERVICE_VERSION
    assert "answer" not in bad and bad["service_version"] == SERVICE_VERSION  # nothing was answered
