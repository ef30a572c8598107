"""The package boundaries (docs/overview.md "Layout"), checked rather than trusted."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib

from tests.conftest import REPO


def _imports(package: str) -> set[str]:
    found: set[str] = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_service_imports_neither_torch_nor_train_nor_export() -> None:
    assert not _imports("service") & {"torch", "torchvision", "train", "export"}


def test_train_imports_neither_export_nor_service() -> None:
    assert not _imports("train") & {"export", "service"}


def test_serving_the_app_loads_no_torch() -> None:
    code = "import sys, service.app, service.__main__, service.bench.baseline; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_serve_and_gpu_extras_install_no_torch() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in ("serve", "gpu"):
        assert not [d for d in extras[name] if d.lower().startswith("torch")], name
    assert "torch==2.13.0" in extras["train"]  # exact pin: a looser one pulls CUDA wheels
