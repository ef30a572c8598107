"""deploy/k8s: manifests valid against the Kubernetes schemas (kubernetes-validate, strict) and wired together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from tests.deploy.helpers import DEPLOY, exported_metric_names, find_tool, load_yaml, load_yaml_all, run_tool

K8S = DEPLOY / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p != KUSTOMIZATION)
# The oldest Kubernetes minor still in common support, and the newest the validator ships.
K8S_VERSIONS = ["1.30.0", "1.37.0"]


def _objects() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for path in MANIFESTS for doc in load_yaml_all(path)}


def _pod() -> dict[str, Any]:
    return _objects()["Deployment"]["spec"]["template"]


def _container() -> dict[str, Any]:
    (container,) = _pod()["spec"]["containers"]
    return container


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schema(version: str) -> None:
    tool = find_tool("kubernetes-validate")
    result = run_tool([tool, "--strict", "--kubernetes-version", version, *map(str, MANIFESTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == sum(len(load_yaml_all(p)) for p in MANIFESTS)


def test_validator_rejects_an_unknown_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((K8S / "service.yaml").read_text().replace("  type: ClusterIP", "  type: ClusterIP\n  portz: []"))
    result = run_tool([find_tool("kubernetes-validate"), "--strict", str(bad)])
    assert result.returncode != 0
    assert "portz" in result.stdout + result.stderr


def test_kustomization_lists_every_manifest() -> None:
    resources = set(load_yaml(KUSTOMIZATION)["resources"])
    assert resources == {p.name for p in MANIFESTS}


def test_the_kinds_the_issue_asks_for() -> None:
    kinds = set(_objects())
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds


def test_selectors_match_the_pod_labels() -> None:
    objs = _objects()
    labels = _pod()["metadata"]["labels"]
    for selector in (
        objs["Deployment"]["spec"]["selector"]["matchLabels"],
        objs["Service"]["spec"]["selector"],
        objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    target = objs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", objs["Deployment"]["metadata"]["name"])


def test_probes_and_gpu() -> None:
    c = _container()
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port_names = {p["name"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in port_names
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_termination_grace_covers_prestop_and_drain() -> None:
    config = _objects()["ConfigMap"]["data"]
    drain = float(config["LESIONSERVE_SHUTDOWN_GRACE_S"])
    command = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    grace = _pod()["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(command[1]) + drain


def test_settings_and_ports_agree_with_the_service() -> None:
    config = _objects()["ConfigMap"]["data"]
    env_names = set(config) | {e["name"] for e in _container().get("env", [])}
    fields = {n.removeprefix("LESIONSERVE_").lower() for n in env_names}
    assert fields <= set(Settings.model_fields), fields - set(Settings.model_fields)
    (port,) = _container()["ports"]
    assert str(port["containerPort"]) == config["LESIONSERVE_PORT"]
    models = next(m for m in _container()["volumeMounts"] if m["name"] == "models")
    assert models["readOnly"] is True
    assert config["LESIONSERVE_MODEL_PATH"].startswith(models["mountPath"] + "/")


def test_pod_runs_as_the_image_user() -> None:
    security = _pod()["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert f"USER {security['runAsUser']}:" in (DEPLOY / "Dockerfile.gpu").read_text()
    assert _container()["securityContext"]["readOnlyRootFilesystem"] is True


def test_autoscaler_custom_metric_is_exported() -> None:
    metrics = _objects()["HorizontalPodAutoscaler"]["spec"]["metrics"]
    custom = [m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"]
    assert custom and set(custom) <= exported_metric_names()
