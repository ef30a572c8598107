"""deploy/kserve: the ServingRuntime and InferenceService valid against KServe's own CRD schemas, and wired to
what the service really accepts.

The schemas are the ``openAPIV3Schema`` of KServe's published CRDs (config/crd/full in kserve/kserve, the
commit named inside each file), vendored gzipped in tests/data/crds: no network at test time. Checked
strictly, as ``kubectl apply --validate=strict`` does: a field the CRD does not define is an error, except
where the CRD itself preserves unknown fields.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from service.cli import build_parser
from service.cli.options import settings_from
from tests.deploy.helpers import DEPLOY, crd_errors, load_yaml

KSERVE = DEPLOY / "kserve"


MANIFESTS = sorted(KSERVE.glob("*.yaml"))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_kserve_crd(path: Path) -> None:
    assert crd_errors(load_yaml(path)) == []


def test_the_validator_refuses_an_unknown_field_and_a_wrong_type() -> None:
    isvc = load_yaml(KSERVE / "inferenceservice.yaml")
    typo = copy.deepcopy(isvc)
    typo["spec"]["predictor"]["model"]["storageUrl"] = typo["spec"]["predictor"]["model"].pop("storageUri")
    assert any("storageUrl" in e for e in crd_errors(typo))
    wrong = copy.deepcopy(isvc)
    wrong["spec"]["predictor"]["minReplicas"] = "one"
    assert any("minReplicas" in e for e in crd_errors(wrong))


def test_runtime_and_service_are_wired_together() -> None:
    runtime, isvc = load_yaml(KSERVE / "servingruntime.yaml"), load_yaml(KSERVE / "inferenceservice.yaml")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    formats = {(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats


def test_runtime_args_are_accepted_by_lesionserve_serve(tmp_path: Path, tiny_onnx: Path) -> None:
    (container,) = load_yaml(KSERVE / "servingruntime.yaml")["spec"]["containers"]
    args = [a.replace("{{.Name}}", "lesionserve-reference") for a in container["args"]]
    parsed = build_parser().parse_args(["serve", *args])  # an unknown flag would exit here
    assert parsed.model_path.startswith("/mnt/models/")  # where KServe's storage initializer puts storageUri
    parsed.model_path = str(tiny_onnx)
    settings = settings_from(parsed)
    assert settings.port == container["ports"][0]["containerPort"] == 8080
    assert settings.served_model_name == "lesionserve-reference"
    probes = {container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")}
    assert probes == {"/v2/health/ready", "/v2/health/live"}
