"""docker-compose.yml (+ the CPU override) against the Compose specification schema, and its wiring.

No Docker engine (nor the compose plugin) is on these machines, so the schema check uses
check-jsonschema with the compose-spec JSON schema it vendors (``vendor.compose-spec``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from service.config import Settings
from tests.deploy.helpers import REPO, find_tool, load_yaml, run_tool

COMPOSE = REPO / "docker-compose.yml"
CPU_OVERRIDE = REPO / "docker-compose.cpu.yml"
_RESET = object()


class _ComposeLoader(yaml.SafeLoader):
    """YAML loader that understands Compose's ``!reset`` merge tag."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: _RESET)


def _merge(base: Any, override: Any) -> Any:
    """Compose's override merge for mappings and scalars (``!reset`` removes the key).

    Compose appends some sequences (ports, volumes) instead of replacing them; the CPU override
    sets none, and a test below keeps it that way.
    """
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if value is _RESET:
                merged.pop(key, None)
            else:
                merged[key] = _merge(merged[key], value) if key in merged else value
        return merged
    return override


def _validate(path: Path) -> tuple[int, str]:
    result = run_tool([find_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)])
    return result.returncode, result.stdout + result.stderr


def _compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def _cpu_merged() -> dict[str, Any]:
    override = yaml.load(CPU_OVERRIDE.read_text(), Loader=_ComposeLoader)
    return _merge(_compose(), override)


def test_compose_file_matches_the_compose_spec() -> None:
    rc, out = _validate(COMPOSE)
    assert rc == 0, out


def test_cpu_override_merged_matches_the_compose_spec(tmp_path: Path) -> None:
    merged = _cpu_merged()
    target = tmp_path / "merged.json"
    target.write_text(json.dumps(merged))
    rc, out = _validate(target)
    assert rc == 0, out
    svc = merged["services"]["lesionserve"]
    assert "devices" not in svc["deploy"]["resources"]["reservations"]
    assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
    assert svc["environment"]["LESIONSERVE_PROVIDERS"] == "CPUExecutionProvider"


def test_cpu_override_sets_no_appending_sequences() -> None:
    override = yaml.load(CPU_OVERRIDE.read_text(), Loader=_ComposeLoader)
    for svc in override["services"].values():
        assert not {"ports", "volumes", "command", "tmpfs"} & set(svc), "merge rules differ for these keys"


def test_schema_validation_rejects_a_misspelt_key(tmp_path: Path) -> None:
    """The validator is not a no-op: a key the spec does not know must fail."""
    bad = _compose()
    bad["services"]["lesionserve"]["restart_policy"] = "always"  # belongs under deploy:, not here
    target = tmp_path / "bad.json"
    target.write_text(json.dumps(bad))
    rc, out = _validate(target)
    assert rc != 0
    assert "restart_policy" in out


def test_lesionserve_reserves_a_gpu_and_mounts_models_read_only() -> None:
    svc = _compose()["services"]["lesionserve"]
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert svc["build"]["dockerfile"] == "deploy/Dockerfile.gpu"
    (models,) = [v for v in svc["volumes"] if v["target"] == "/models"]
    assert models["read_only"] is True
    assert svc["environment"]["LESIONSERVE_MODEL_PATH"].startswith("/models/")


def test_every_service_restarts_and_has_a_healthcheck() -> None:
    for name, svc in _compose()["services"].items():
        assert svc.get("restart") in {"unless-stopped", "always", "on-failure"}, name
        assert svc["healthcheck"]["test"], name
    assert "/healthz" in " ".join(_compose()["services"]["lesionserve"]["healthcheck"]["test"])


def test_named_volumes_are_declared_and_used() -> None:
    compose = _compose()
    used = {
        v.split(":")[0] for svc in compose["services"].values() for v in svc.get("volumes", []) if isinstance(v, str)
    }
    declared = set(compose["volumes"])
    assert declared and declared <= used


def test_mounted_repository_paths_exist() -> None:
    for name, svc in _compose()["services"].items():
        for v in svc.get("volumes", []):
            source = v["source"] if isinstance(v, dict) else v.split(":")[0]
            if source.startswith("./deploy"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"


def test_grafana_password_has_no_default() -> None:
    env = _compose()["services"]["grafana"]["environment"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?.+\}", env["GF_SECURITY_ADMIN_PASSWORD"])


def test_lesionserve_settings_are_real_settings() -> None:
    """Every LESIONSERVE_* variable compose passes names a field of service.config.Settings."""
    for source in (_compose(), _cpu_merged()):
        env = source["services"]["lesionserve"]["environment"]
        names = {k.removeprefix("LESIONSERVE_").lower() for k in env}
        assert names <= set(Settings.model_fields), names - set(Settings.model_fields)


def test_stop_grace_outlasts_the_service_drain() -> None:
    svc = _compose()["services"]["lesionserve"]
    grace = float(svc["environment"]["LESIONSERVE_SHUTDOWN_GRACE_S"])
    assert int(svc["stop_grace_period"].removesuffix("s")) > grace


def test_ports_and_scrape_target_agree() -> None:
    compose = _compose()
    svc = compose["services"]["lesionserve"]
    port = svc["environment"]["LESIONSERVE_PORT"]
    assert any(p.endswith(f":{port}") for p in svc["ports"])
    scrape = load_yaml(REPO / "deploy" / "prometheus" / "prometheus.yml")
    targets = [t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert f"lesionserve:{port}" in targets
    # Prometheus has no login: it is published on loopback unless the operator says otherwise.
    assert compose["services"]["prometheus"]["ports"][0].startswith("${PROMETHEUS_BIND:-127.0.0.1}:")
