"""``python -m service``: start-up refusals are one line with a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.tiny_model import HAM_CLASSES, contract_metadata, make_tiny_onnx


def run_service(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LESIONSERVE_")}
    return subprocess.run(
        [sys.executable, "-m", "service"], cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


def assert_one_line_refusal(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_model_without_metadata_is_refused(tmp_path: Path) -> None:
    bare = make_tiny_onnx(tmp_path / "bare.onnx", metadata={})
    proc = run_service({"LESIONSERVE_MODEL_PATH": str(bare), "LESIONSERVE_PROVIDERS": "CPUExecutionProvider"})
    assert_one_line_refusal(proc, "not a lesionserve model", "lesionserve.classes", "python -m export")


def test_model_with_wrong_input_size_is_refused(tmp_path: Path) -> None:
    lying = make_tiny_onnx(tmp_path / "lying.onnx", size=32, metadata=contract_metadata(HAM_CLASSES, 64))
    proc = run_service({"LESIONSERVE_MODEL_PATH": str(lying), "LESIONSERVE_PROVIDERS": "CPUExecutionProvider"})
    assert_one_line_refusal(proc, "input shape")


def test_not_an_onnx_file_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not protobuf")
    proc = run_service({"LESIONSERVE_MODEL_PATH": str(junk)})
    assert_one_line_refusal(proc, "not a loadable ONNX model")


def test_bad_settings_are_refused(tiny_onnx: Path) -> None:
    proc = run_service(
        {"LESIONSERVE_MODEL_PATH": str(tiny_onnx), "LESIONSERVE_MAX_BATCH_SIZE": "0", "LESIONSERVE_PORT": "x"}
    )
    assert_one_line_refusal(proc, "LESIONSERVE_MAX_BATCH_SIZE", "LESIONSERVE_PORT")


def test_missing_model_path_is_refused() -> None:
    assert_one_line_refusal(run_service({}), "LESIONSERVE_MODEL_PATH")


def test_unavailable_providers_are_refused(tiny_onnx: Path) -> None:
    proc = run_service({"LESIONSERVE_MODEL_PATH": str(tiny_onnx), "LESIONSERVE_PROVIDERS": "NoSuchExecutionProvider"})
    assert_one_line_refusal(proc, "NoSuchExecutionProvider")


def test_outbox_needed_and_unusable_outbox_are_refused(tiny_onnx: Path, tmp_path: Path) -> None:
    dimse = {
        "LESIONSERVE_MODEL_PATH": str(tiny_onnx), "LESIONSERVE_PROVIDERS": "CPUExecutionProvider",
        "LESIONSERVE_DIMSE_ENABLED": "true", "LESIONSERVE_DIMSE_ALLOWED_AETS": "PACS",
        "LESIONSERVE_DIMSE_DESTINATION": "PACS@127.0.0.1:104", "LESIONSERVE_DIMSE_PORT": "1",
    }  # fmt: skip
    assert_one_line_refusal(run_service(dimse), "LESIONSERVE_OUTBOX_PATH", "the SR outbox")
    missing = str(tmp_path / "no-such-folder" / "outbox.sqlite")
    assert_one_line_refusal(run_service({**dimse, "LESIONSERVE_OUTBOX_PATH": missing}), "no-such-folder", "not exist")
    junk = tmp_path / "outbox.sqlite"
    junk.write_bytes(b"not a database" * 100)  # e.g. a file restored from the wrong backup
    junk.chmod(0o600)
    proc = run_service({**dimse, "LESIONSERVE_OUTBOX_PATH": str(junk)})
    assert_one_line_refusal(proc, "outbox file", "cannot be opened")
