"""When a test may skip: missing shared data (never under CI) and ``gpu`` tests without a CUDA device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CUDA, REPO, _cuda_skip_reason_here, cuda_skip_reason, in_ci, shared_data


@pytest.mark.parametrize("value", ["true", "1", "True", "yes"])
def test_missing_shared_data_fails_under_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str) -> None:
    monkeypatch.setenv("CI", value)
    # caught as BaseException: a skip raised here must fail this test, not skip it
    with pytest.raises(BaseException, match="missing under CI") as outcome:
        shared_data("ham10000", root=tmp_path)
    assert outcome.type is pytest.fail.Exception


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_missing_shared_data_skips_on_a_developers_clone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(BaseException, match="shared data set") as outcome:
        shared_data("ham10000", root=tmp_path)
    assert outcome.type is pytest.skip.Exception


def test_present_shared_data_is_returned_under_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CI", "true")
    (tmp_path / "ham10000").mkdir()
    assert shared_data("ham10000", root=tmp_path) == tmp_path / "ham10000"


def test_cuda_skip_reason() -> None:
    cpu_only = cuda_skip_reason(["CPUExecutionProvider"], 1)
    assert cpu_only is not None and "no CUDA device" in cpu_only and CUDA in cpu_only
    no_gpu = cuda_skip_reason([CUDA, "CPUExecutionProvider"], 0)
    assert no_gpu is not None and "no GPU is visible" in no_gpu
    assert cuda_skip_reason([CUDA, "CPUExecutionProvider"], None) is not None  # no nvidia-smi: no device
    assert cuda_skip_reason([CUDA, "CPUExecutionProvider"], 1) is None


@pytest.mark.slow
def test_gpu_tests_skip_with_the_reason_here_or_run(tmp_path: Path) -> None:
    # The real hook on the real gpu test, in its own pytest run: skipped with the reason where
    # there is no CUDA device, run (and passed) where there is one.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-rs", "-q", "-p", "no:cacheprovider", "tests/service/test_gpu.py"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    reason = _cuda_skip_reason_here()
    if reason is None:
        assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout
    else:
        assert proc.returncode == 0 and " skipped" in proc.stdout and reason in proc.stdout, proc.stdout
        assert " passed" not in proc.stdout
