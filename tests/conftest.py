"""Shared fixtures. Tests that need ../shared/data skip with a reason when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_model import make_tiny_onnx

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(sub: str) -> Path:
    """Path under ../shared/data, or skip the test: a user's clone has no shared data."""
    p = SHARED_DATA / sub
    if not p.exists():
        pytest.skip(f"{p} not present: this test needs the project's shared data set (CI has it)")
    return p


@pytest.fixture(scope="session")
def isic_images() -> list[Path]:
    """The committed CC0 ISIC images (ImageFolder layout under tests/data/isic/)."""
    return sorted((TEST_DATA / "isic").glob("*/*.jpg"))


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32x32-input contract-following ONNX model (no torch needed)."""
    return make_tiny_onnx(tmp_path_factory.mktemp("models") / "tiny.onnx")
