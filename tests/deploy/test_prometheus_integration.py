"""A real Prometheus, with this repository's scrape config and rules, scrapes a running lesionserve.

Only the targets are rewritten (lesionserve -> the test's loopback port, Prometheus' self-scrape
-> its own test port) and the rule glob and key file made absolute; job name, metrics path, scheme,
intervals and labels are the repository's. Everything listens on 127.0.0.1 and is stopped.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.conftest import RunningService, free_port, stop_process, wait_http_ok
from tests.deploy.helpers import DEPLOY, find_tool, load_yaml

pytestmark = pytest.mark.slow
# The repository scrapes every 15 s and Prometheus spreads first scrapes over one interval.
SCRAPE_WAIT_S = 60.0


def _test_config(service_port: int, prom_port: int) -> dict[str, Any]:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    config["rule_files"] = [str(DEPLOY / "prometheus" / f) for f in config["rule_files"]]
    for job in config["scrape_configs"]:
        if "authorization" in job:  # relative to the repository's config, which is not where this one is
            auth = job["authorization"]
            auth["credentials_file"] = str(DEPLOY / "prometheus" / auth["credentials_file"])
        port = service_port if job["job_name"] == "lesionserve" else prom_port
        for static in job["static_configs"]:
            static["targets"] = [f"127.0.0.1:{port}"]
    return config


@pytest.fixture()
def prometheus(running_service: RunningService, tmp_path: Path) -> Iterator[str]:
    binary = find_tool("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(_test_config(running_service.port, port)))
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{base}/-/ready", proc, log, timeout=30)
        yield base
    finally:
        stop_process(proc)


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=5)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_prometheus_scrapes_lesionserve(prometheus: str, running_service: RunningService) -> None:
    instance = f"127.0.0.1:{running_service.port}"
    deadline = time.monotonic() + SCRAPE_WAIT_S
    ready: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not ready:
        ready = _query(prometheus, 'lesionserve_ready{job="lesionserve"}')
        if not ready:
            time.sleep(1)
    assert ready, f"no lesionserve_ready series after {SCRAPE_WAIT_S:.0f} s"
    (series,) = ready
    assert series["metric"]["instance"] == instance
    assert series["metric"]["deployment"] == "compose"  # the static label from the repo's config
    assert float(series["value"][1]) == 1.0

    (up,) = _query(prometheus, f'up{{job="lesionserve", instance="{instance}"}}')
    assert float(up["value"][1]) == 1.0
    # The request the fixture made is counted, with its route template as a label.
    classify = _query(prometheus, 'sum(lesionserve_requests_total{route="/v1/classify", status="200"})')
    assert classify and float(classify[0]["value"][1]) >= 1
    (info,) = _query(prometheus, "lesionserve_model_info")
    assert info["metric"]["name"] == "tiny-test-model"
    assert info["metric"]["provider"] == "CPUExecutionProvider"


def test_prometheus_loads_the_repository_rules(prometheus: str) -> None:
    response = httpx.get(f"{prometheus}/api/v1/rules", timeout=5)
    response.raise_for_status()
    groups = response.json()["data"]["groups"]
    alerts = {r["name"] for g in groups for r in g["rules"] if r["type"] == "alerting"}
    assert {"LesionserveInstanceDown", "LesionserveClassDrift", "LesionserveHighErrorRatio"} <= alerts
    assert all(r["health"] != "err" for g in groups for r in g["rules"]), groups
