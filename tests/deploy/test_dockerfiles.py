"""deploy/Dockerfile and deploy/Dockerfile.gpu: hadolint-clean, and built the way the issue asks.

No Docker engine runs here: the images are linted and their instructions checked. The CPU image is built
and run with podman by deploy/image/build-and-run.sh (`make image`, docs/deploy.md), outside the test suite.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.deploy.helpers import DEPLOY, REPO, find_tool, run_tool
from tools.lock import lock_path

DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.gpu"]


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_is_clean() -> None:
    result = run_tool([find_tool("hadolint"), *map(str, DOCKERFILES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter is not a no-op: an unpinned base and an unpinned apt install are findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = run_tool([find_tool("hadolint"), str(bad)])
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # "latest" tag


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_non_root_with_healthcheck(path: Path) -> None:
    ins = _instructions(path)
    assert sum(1 for word, _ in ins if word == "FROM") >= 2, "multi-stage: build and runtime"
    user = [arg for word, arg in ins if word == "USER"][-1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0, "numeric non-root uid (runAsNonRoot)"
    (health,) = [arg for word, arg in ins if word == "HEALTHCHECK"]
    assert "/healthz" in health
    (entry,) = [arg for word, arg in ins if word == "ENTRYPOINT"]
    assert entry == '["python", "-m", "service"]'
    env = " ".join(arg for word, arg in ins if word == "ENV")
    assert "LESIONSERVE_MODEL_PATH=/models/" in env
    assert "EXPOSE" in {word for word, _ in ins}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_installs_from_the_hash_locked_serve_extra_and_no_torch(path: Path) -> None:
    """Dependencies only from deploy/lock (tests/deploy/test_lock.py: it is the serve extra), every file
    hash-checked; then the project itself without resolving anything and with the locked build backend."""
    variant = "gpu" if path.name.endswith(".gpu") else "cpu"
    lock = lock_path(variant).relative_to(REPO).as_posix()
    ins = _instructions(path)
    runs = [arg for word, arg in ins if word == "RUN"]
    pip_runs = [" ".join(run.split()) for run in runs if "pip install" in run]
    assert pip_runs[0] == f"pip install --no-cache-dir --require-hashes --no-deps -r {lock}"
    assert pip_runs[1].startswith("pip install --no-cache-dir --no-deps --no-build-isolation . && pip check")
    assert len(pip_runs) == 2
    copies = [arg for word, arg in ins if word == "COPY"]
    assert f"{lock} {lock}" in copies
    # the lock's layer comes before the source's, so an edit of service/ reuses the installed dependencies
    assert copies.index(f"{lock} {lock}") < copies.index("service/ service/")
    assert not any(arg.split()[0] in {".", "models/", "train/", "export/"} for arg in copies)
    for forbidden in ("torch", "[train", "[dev", "train]", "dev]"):
        assert forbidden not in " ".join(runs), forbidden
    assert not re.search(r"^torch", lock_path(variant).read_text(), re.MULTILINE)


def test_gpu_image_has_onnxruntime_gpu_on_a_cuda_base() -> None:
    ins = _instructions(DEPLOY / "Dockerfile.gpu")
    assert "deploy/lock/gpu.txt" in " ".join(arg for word, arg in ins if word == "RUN")
    assert any("nvidia/cuda:12" in arg and "cudnn" in arg for word, arg in ins if word == "ARG")


def test_dockerignore_keeps_models_and_data_out() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and ln[0] != "#"]
    assert lines[0] == "*", "allow-list: ignore everything, then re-include"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "LICENSE", "service", "deploy/lock"}  # LICENSE: license-files
