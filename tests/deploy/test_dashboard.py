"""deploy/grafana: the dashboard parses, uses the provisioned datasource, and reads only real metrics.

The fast tests compare against service/metrics.py; the slow one against a running service's
/metrics after a few requests, which is what Grafana will actually see.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import RunningService
from tests.deploy.helpers import DEPLOY, dashboard_exprs, exported_metric_names, load_yaml, promql_metric_names

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "lesionserve.json"


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _dashboard_metrics() -> set[str]:
    return set().union(*(promql_metric_names(e) for e in dashboard_exprs(_dashboard())))


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def test_metric_name_extractor_on_known_expressions() -> None:
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{route="/v1/x", b=~"c"}[$__rate_interval])))'
    ) == {"a_bucket"}
    assert promql_metric_names("sum(rate(x_total[5m])) / ignoring (k) group_left sum by (job) (y offset 1h) > 1e3") == {
        "x_total",
        "y",
    }
    assert promql_metric_names('abs(r:rule:ratio - q) > 0.15 and on (job) up{job="a"} >= 100') == {
        "r:rule:ratio",
        "q",
        "up",
    }


def test_dashboard_reads_only_exported_metrics() -> None:
    used = _dashboard_metrics()
    assert used, "no metric names found: the extractor is broken"
    assert used - exported_metric_names() == set()


def test_dashboard_shows_every_metric_the_service_exports() -> None:
    """Request rate, errors, latency, queue, batches, inference, rejections, predictions, model..."""
    families = {
        n.removesuffix(s) for n in exported_metric_names() for s in ("_bucket", "_sum", "_count") if n.endswith(s)
    }
    families |= {n for n in exported_metric_names() if not n.endswith(("_bucket", "_sum", "_count"))}
    shown = {
        n.removesuffix(s) for n in _dashboard_metrics() for s in ("_bucket", "_sum", "_count", "") if n.endswith(s)
    }
    assert families - shown == set()


def test_model_swaps_and_refused_reloads_are_annotated() -> None:
    """Grafana marks each model load (start or swap) with the new model's version, and each refused reload."""
    (datasource,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    annotations = {a["name"]: a for a in _dashboard()["annotations"]["list"]}
    loaded, refused = annotations["Model loaded"], annotations["Model reload refused"]
    assert promql_metric_names(loaded["expr"]) == {
        "lesionserve_model_loaded_timestamp_seconds",
        "lesionserve_model_info",
    }
    assert "{{version}}" in loaded["textFormat"] and "{{sha256}}" in loaded["textFormat"]
    assert promql_metric_names(refused["expr"]) == {"lesionserve_model_reloads_total"}
    assert 'result!~"success|unchanged"' in refused["expr"] and "{{result}}" in refused["textFormat"]
    for annotation in (loaded, refused):
        assert annotation["enable"] and annotation["datasource"]["uid"] == datasource["uid"]


def test_panels_use_the_provisioned_datasource() -> None:
    (datasource,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090"  # the compose service name and port
    for panel in _panels():
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]


def test_panels_fit_the_grid_without_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in _dashboard()["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_provider_loads_the_folder_compose_mounts() -> None:
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "lesionserve.yml")["providers"]
    compose = load_yaml(DEPLOY.parent / "docker-compose.yml")
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert len({p["id"] for p in _dashboard()["panels"]}) == len(_dashboard()["panels"])


@pytest.mark.slow
def test_dashboard_metrics_appear_in_the_running_service(running_service: RunningService) -> None:
    response = httpx.get(f"{running_service.base_url}/metrics", timeout=10)
    assert response.status_code == 200
    exposed = {s.name for fam in text_string_to_metric_families(response.text) for s in fam.samples}
    missing = _dashboard_metrics() - exposed
    assert missing == set(), f"dashboard queries metrics the service does not expose: {sorted(missing)}"
