"""Shared fixtures and the two places that decide whether a test may skip: shared data and a GPU.

A test that needs ``../shared/data`` skips on a user's clone (which has no such folder) but
FAILS under CI (``CI`` set): the data is there on CI, so a skip there would hide a broken path
behind a green run. Tests marked ``gpu`` skip, with the reason, wherever ONNX Runtime cannot
run the CUDA provider on a device.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import pytest

from tests.tiny_model import make_tiny_onnx

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
SHARED_DATA = REPO.parent / "shared" / "data"
CUDA = "CUDAExecutionProvider"


def in_ci() -> bool:
    """True under CI (``CI=true``, as CI services set it); ``CI=false``/``0``/empty is a developer's machine."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def shared_data(sub: str, root: Path = SHARED_DATA) -> Path:
    """Path under ../shared/data; when absent: skip on a developer's clone, fail under CI."""
    p = root / sub
    if not p.exists():
        if in_ci():
            pytest.fail(f"{p} is missing under CI, where the shared data set must be present")
        pytest.skip(f"{p} not present: this test needs the project's shared data set (CI has it)")
    return p


def cuda_skip_reason(available: list[str], device_count: int | None) -> str | None:
    """Why a ``gpu`` test cannot run here, or None when it can.

    Args:
        available: ``onnxruntime.get_available_providers()``.
        device_count: CUDA devices visible (None: unknown, e.g. no ``nvidia-smi``).
    """
    if CUDA not in available:
        return f"no CUDA device: this onnxruntime has no {CUDA} (install the gpu extra on a GPU node)"
    if not device_count:
        return f"no CUDA device: onnxruntime has {CUDA} but no GPU is visible"
    return None


@cache
def _cuda_skip_reason_here() -> str | None:
    import onnxruntime as ort

    return cuda_skip_reason(ort.get_available_providers(), _visible_gpus())


def _visible_gpus() -> int | None:
    """GPUs listed by ``nvidia-smi -L`` (None when the tool is absent)."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False).stdout
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None:
        reason = _cuda_skip_reason_here()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture(scope="session")
def isic_images() -> list[Path]:
    """The committed CC0 ISIC images (ImageFolder layout under tests/data/isic/)."""
    return sorted((TEST_DATA / "isic").glob("*/*.jpg"))


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32x32-input contract-following ONNX model (no torch needed)."""
    return make_tiny_onnx(tmp_path_factory.mktemp("models") / "tiny.onnx")
