"""deploy/k8s: each overlay, as ``kubectl kustomize`` builds it, valid against the Kubernetes schemas and wired together.

Built objects, not source files: what a cluster would receive is what is checked. Core kinds go through
kubernetes-validate (strict: an unknown field is an error) for the oldest and newest Kubernetes minor it
ships; the ServiceMonitor through the Prometheus Operator's own CRD schema (vendored, tests/data/crds).
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings
from service.imaging import decode_budget
from tests.deploy.helpers import DEPLOY, crd_errors, exported_metric_names, find_tool, load_yaml, run_tool

K8S = DEPLOY / "k8s"
BASE = K8S / "base"
OVERLAYS = ["cpu", "gpu"]
DOCKERFILE = {"cpu": DEPLOY / "Dockerfile", "gpu": DEPLOY / "Dockerfile.gpu"}
ADAPTER = K8S / "prometheus-adapter" / "config.yaml"
# The oldest Kubernetes minor still in common support, and the newest the validator ships.
K8S_VERSIONS = ["1.30.0", "1.37.0"]
CUSTOM_KINDS = {"ServiceMonitor"}
# Peak RSS of one CPU replica serving the reference model under 16 concurrent clients, max batch 16
# (VmHWM, docs/deploy.md "Memory of a replica"): what the memory limits are sized from.
MEASURED_PEAK_RSS_MIB = 782
# A second model session during a hot swap (docs/deploy.md, "Model updates"): 283 MB measured.
SWAP_SESSION_MIB = 283 * 10**6 / 2**20
QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "": 1}


@functools.cache
def _built(overlay: str) -> str:
    result = run_tool([find_tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)])
    assert result.returncode == 0, result.stderr
    return result.stdout


def _objects(overlay: str) -> dict[str, dict[str, Any]]:
    """kind -> object, fresh each call (tests may edit their copy)."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all(_built(overlay)) if doc}


def _pod(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return objs["Deployment"]["spec"]["template"]


def _container(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = _pod(objs)["spec"]["containers"]
    return container


def _bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMG]i)?", quantity).groups()  # type: ignore[union-attr]
    return int(number) * QUANTITY[unit or ""]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_built_objects_match_the_kubernetes_schema(overlay: str, version: str, tmp_path: Path) -> None:
    built = tmp_path / f"{overlay}.yaml"
    built.write_text(_built(overlay))
    result = run_tool([find_tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, str(built)])
    assert result.returncode == 0, result.stdout + result.stderr
    core = [kind for kind in _objects(overlay) if kind not in CUSTOM_KINDS]
    assert result.stdout.count("passed") == len(core), result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_their_crd(overlay: str) -> None:
    for kind in CUSTOM_KINDS:
        assert crd_errors(_objects(overlay)[kind]) == []


def test_validators_reject_an_unknown_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((BASE / "service.yaml").read_text().replace("  type: ClusterIP", "  type: ClusterIP\n  portz: []"))
    result = run_tool([find_tool("kubernetes-validate"), "--strict", str(bad)])
    assert result.returncode != 0
    assert "portz" in result.stdout + result.stderr
    monitor = copy.deepcopy(_objects("cpu")["ServiceMonitor"])
    monitor["spec"]["endpoints"][0]["bearerTokenSecrett"] = {"name": "x", "key": "y"}
    assert any("bearerTokenSecrett" in e for e in crd_errors(monitor))


def test_base_kustomization_lists_every_manifest() -> None:
    resources = set(load_yaml(BASE / "kustomization.yaml")["resources"])
    assert resources == {p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_kinds_the_issue_asks_for(overlay: str) -> None:
    kinds = set(_objects(overlay))
    wanted = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}
    assert wanted | {"ServiceMonitor", "Ingress"} <= kinds
    assert {o["metadata"].get("namespace") for k, o in _objects(overlay).items() if k != "Namespace"} == {"lesionserve"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_and_references_agree(overlay: str) -> None:
    objs = _objects(overlay)
    labels = _pod(objs)["metadata"]["labels"]
    for selector in (
        objs["Deployment"]["spec"]["selector"]["matchLabels"],
        objs["Service"]["spec"]["selector"],
        objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        objs["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    target = objs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", objs["Deployment"]["metadata"]["name"])
    service = objs["Service"]
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    monitor = objs["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["endpoints"]} <= service_ports
    assert {e["path"] for e in monitor["endpoints"]} == {"/metrics"}
    for rule in objs["Ingress"]["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"]["name"] in service_ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_ingress_controller_and_prometheus_reach_the_pods(overlay: str) -> None:
    policy = _objects(overlay)["NetworkPolicy"]["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    container_ports = {p["name"] for p in _container(_objects(overlay))["ports"]}
    namespaces = set()
    for rule in policy["ingress"]:
        assert rule["from"], "a rule without peers admits every source"
        assert {p["port"] for p in rule["ports"]} <= container_ports
        for peer in rule["from"]:
            # both selectors in one peer = that namespace AND those pods; a namespace alone is wider
            assert peer.get("podSelector", {}).get("matchLabels"), peer
            namespaces.add(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
    assert namespaces == {"ingress-nginx", "monitoring"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tls_ends_at_the_ingress(overlay: str) -> None:
    ingress = _objects(overlay)["Ingress"]
    hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
    (tls,) = ingress["spec"]["tls"]
    assert tls["secretName"] and set(tls["hosts"]) == hosts
    annotations = ingress["metadata"]["annotations"]
    assert "cert-manager.io/cluster-issuer" in annotations
    assert annotations["nginx.ingress.kubernetes.io/ssl-redirect"] == "true"
    # the controller must pass on what the service accepts, so the service's own 413 is what clients see
    body = annotations["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert body.endswith("m") and int(body[:-1]) * 2**20 >= Settings.model_fields["max_upload_bytes"].default


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_accelerator(overlay: str) -> None:
    objs = _objects(overlay)
    c = _container(objs)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port_names = {p["name"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in port_names
    providers = objs["ConfigMap"]["data"]["LESIONSERVE_PROVIDERS"].split(",")
    if overlay == "gpu":
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert any(t["key"] == "nvidia.com/gpu" for t in _pod(objs)["spec"]["tolerations"])
        assert providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        assert "nvidia" not in _built(overlay)
        assert providers == ["CPUExecutionProvider"]
        assert c["image"].endswith("-cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_memory_limit_covers_the_measured_peak_and_every_decode(overlay: str) -> None:
    """limit >= measured peak + DECODE_THREADS x the per-decode budget + a second session (hot swap)."""
    objs = _objects(overlay)
    resources = _container(objs)["resources"]
    request, limit = _bytes(resources["requests"]["memory"]), _bytes(resources["limits"]["memory"])
    assert request >= MEASURED_PEAK_RSS_MIB * 2**20
    threads = int(objs["ConfigMap"]["data"]["LESIONSERVE_DECODE_THREADS"])
    budget = decode_budget(Settings.model_fields["max_pixels"].default)
    assert limit >= (MEASURED_PEAK_RSS_MIB + SWAP_SESSION_MIB) * 2**20 + threads * budget
    assert "cpu" in resources["requests"] and "cpu" not in resources.get("limits", {})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_prestop_and_drain(overlay: str) -> None:
    objs = _objects(overlay)
    drain = float(objs["ConfigMap"]["data"]["LESIONSERVE_SHUTDOWN_GRACE_S"])
    command = _container(objs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert _pod(objs)["spec"]["terminationGracePeriodSeconds"] > float(command[1]) + drain


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_and_ports_agree_with_the_service(overlay: str) -> None:
    objs = _objects(overlay)
    config = objs["ConfigMap"]["data"]
    env_names = set(config) | {e["name"] for e in _container(objs).get("env", [])}
    fields = {n.removeprefix("LESIONSERVE_").lower() for n in env_names}
    assert fields <= set(Settings.model_fields), fields - set(Settings.model_fields)
    (port,) = _container(objs)["ports"]
    assert str(port["containerPort"]) == config["LESIONSERVE_PORT"]
    models = next(m for m in _container(objs)["volumeMounts"] if m["name"] == "models")
    assert models["readOnly"] is True
    assert config["LESIONSERVE_MODEL_PATH"].startswith(models["mountPath"] + "/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_runs_locked_down_as_the_image_user(overlay: str) -> None:
    objs = _objects(overlay)
    pod = _pod(objs)["spec"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert f"USER {security['runAsUser']}:" in DOCKERFILE[overlay].read_text()
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    c = _container(objs)
    own = c["securityContext"]
    assert own["readOnlyRootFilesystem"] is True
    assert own["allowPrivilegeEscalation"] is False
    assert own["capabilities"]["drop"] == ["ALL"] and "add" not in own["capabilities"]
    assert own.get("privileged", False) is False
    # the one writable path: /tmp on an emptyDir
    tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    assert "emptyDir" in volume
    assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_custom_metric_is_served_by_the_adapter(overlay: str) -> None:
    metrics = _objects(overlay)["HorizontalPodAutoscaler"]["spec"]["metrics"]
    custom = {m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"}
    assert custom and custom <= exported_metric_names()
    served = {rule["name"]["as"] for rule in load_yaml(ADAPTER)["rules"]}
    assert custom <= served, f"no prometheus-adapter rule serves {custom - served}"


def test_adapter_rule_maps_series_to_pods() -> None:
    for rule in load_yaml(ADAPTER)["rules"]:
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group()  # type: ignore[union-attr]
        assert series in exported_metric_names()
        assert re.fullmatch(rule["name"]["matches"], series)
        overrides = rule["resources"]["overrides"]
        assert overrides == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"]
