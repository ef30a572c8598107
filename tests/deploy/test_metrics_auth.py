"""deploy/: /metrics behind the API keys (issue 19). Compose, Kubernetes and both Prometheus scrape
configs agree: the service's default asks for a key whenever API keys are on, Prometheus always sends
one from a file, and that key id is metrics-only."""

from __future__ import annotations

from pathlib import Path

import yaml

from service.config import parse_api_keys
from tests.deploy.helpers import DEPLOY, REPO, find_tool, load_yaml, load_yaml_all, run_tool

PROM = DEPLOY / "prometheus"


def _lesionserve_job(path: str) -> dict[str, object]:
    (job,) = [j for j in load_yaml(PROM / path)["scrape_configs"] if j["job_name"] == "lesionserve"]
    return dict(job)


def test_compose_leaves_metrics_auth_to_the_secure_default() -> None:
    env = load_yaml(REPO / "docker-compose.yml")["services"]["lesionserve"]["environment"]
    assert env["LESIONSERVE_METRICS_AUTH"] == "${LESIONSERVE_METRICS_AUTH:-auto}"  # never a literal false
    assert "LESIONSERVE_METRICS_ONLY_KEY_IDS" in env


def test_compose_prometheus_sends_the_key_file_and_its_placeholder_is_no_key() -> None:
    auth = _lesionserve_job("prometheus.yml")["authorization"]
    assert isinstance(auth, dict) and auth["type"] == "Bearer"
    key_file = PROM / auth["credentials_file"]  # relative to the config, as Prometheus resolves it
    placeholder = key_file.read_text().strip()
    assert placeholder and len(placeholder) < 16  # the service refuses it as a key: it cannot be used by mistake
    try:
        parse_api_keys(f"prometheus:{placeholder}", "test")
    except ValueError as exc:
        assert "shorter than 16" in str(exc)
    else:
        raise AssertionError("the placeholder would be accepted as an API key")


def test_kubernetes_names_a_metrics_only_key_and_does_not_open_metrics() -> None:
    base = DEPLOY / "k8s" / "base"
    objects = {doc["kind"]: doc for path in sorted(base.glob("*.yaml")) for doc in load_yaml_all(path)}
    config = objects["ConfigMap"]["data"]
    assert config["LESIONSERVE_METRICS_ONLY_KEY_IDS"] == "prometheus"
    assert config.get("LESIONSERVE_METRICS_AUTH", "auto") in ("auto", "true")
    job = _lesionserve_job("kubernetes-scrape.yml")
    assert job["authorization"] == {
        "type": "Bearer",
        "credentials_file": "/etc/prometheus/secrets/lesionserve-metrics-key",
    }
    # the Prometheus Operator's scrape sends it too, from a Secret beside the pods
    (endpoint,) = objects["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["authorization"]["type"] == "Bearer"
    assert endpoint["authorization"]["credentials"] == {"name": "lesionserve-metrics-key", "key": "token"}


def test_promtool_accepts_the_kubernetes_scrape_job(tmp_path: Path) -> None:
    # Debian's Prometheus is built without Kubernetes discovery, so promtool checks everything else
    # (authorization, relabelling, paths) with the discovery block swapped for a static target.
    config = yaml.safe_load((PROM / "kubernetes-scrape.yml").read_text())
    for job in config["scrape_configs"]:
        assert [sd["role"] for sd in job.pop("kubernetes_sd_configs")] == ["pod"]
        job["static_configs"] = [{"targets": ["10.0.0.1:8000"]}]
    checked = tmp_path / "kubernetes-scrape.yml"
    checked.write_text(yaml.safe_dump(config))
    result = run_tool([find_tool("promtool"), "check", "config", "--syntax-only", str(checked)])
    assert result.returncode == 0, result.stdout + result.stderr
