"""``python -m export``: a working run, and one clear line (no traceback, exit 1) for each bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.__main__ import main
from tests.conftest import REPO
from tests.export.conftest import MakeCkpt


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_cli_exports_and_prints_the_checks(
    make_ckpt: MakeCkpt, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "models" / "cli.onnx"
    code, stdout, _ = run_cli(capsys, str(make_ckpt("cli")), "--out", str(out), "--tta", "none", "--version", "3.1")
    assert code == 0 and out.is_file() and out.with_suffix(".md").is_file()
    assert "ORT vs PyTorch" in stdout and f"wrote {out}" in stdout


def test_corrupt_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00not a checkpoint" * 10)
    code, _, err = run_cli(capsys, str(bad), "--out", str(tmp_path / "x.onnx"))
    assert_one_line_error(code, err, str(bad), "not a readable PyTorch checkpoint")
    assert not (tmp_path / "x.onnx").exists()


def test_wrong_format_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "state_dict.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, foreign)
    code, _, err = run_cli(capsys, str(foreign), "--out", str(tmp_path / "x.onnx"))
    assert_one_line_error(code, err, str(foreign), "not a lesionserve checkpoint", "missing keys")


def test_mismatched_ensemble_members(make_ckpt: MakeCkpt, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, two = make_ckpt("ens-a"), make_ckpt("ens-2", classes=["mel", "nv"])
    code, _, err = run_cli(capsys, str(a), str(two), "--out", str(tmp_path / "x.onnx"))
    assert_one_line_error(code, err, "disagree on classes", str(two))


def test_unknown_tta(make_ckpt: MakeCkpt, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, str(make_ckpt("cli")), "--out", str(tmp_path / "x.onnx"), "--tta", "rot4")
    assert_one_line_error(code, err, "unknown TTA setting 'rot4'", "none, hflip, flips, dihedral")


def test_bad_threshold_is_refused_before_anything_is_written(
    make_ckpt: MakeCkpt, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        capsys, str(make_ckpt("cli")), "--out", str(tmp_path / "x.onnx"), "--tta", "none", "--malignancy-threshold", "2"
    )
    assert_one_line_error(code, err, "malignancy_threshold must be in [0, 1]")
    assert list(tmp_path.iterdir()) == []


def test_real_process_prints_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"garbage")
    proc = subprocess.run(
        [sys.executable, "-m", "export", str(bad), "--out", str(tmp_path / "x.onnx")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("export: error: ")
