"""service.config: one settings object from LESIONSERVE_* variables, refusing bad values at start."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings, describe_validation_error


def test_env_names_and_defaults(monkeypatch: pytest.MonkeyPatch, tiny_onnx: Path) -> None:
    monkeypatch.setenv("LESIONSERVE_MODEL_PATH", str(tiny_onnx))
    monkeypatch.setenv("LESIONSERVE_PROVIDERS", "CPUExecutionProvider, CUDAExecutionProvider")
    monkeypatch.setenv("LESIONSERVE_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("LESIONSERVE_METRICS_AUTH", "true")
    monkeypatch.setenv("LESIONSERVE_API_KEYS", "ris:" + "k" * 16)  # METRICS_AUTH=true needs keys
    monkeypatch.setenv("LESIONSERVE_MALIGNANCY_THRESHOLD", "0.3")
    s = Settings()  # type: ignore[call-arg]
    assert s.model_path == tiny_onnx and s.host == "0.0.0.0" and s.port == 8000
    assert s.provider_list == ["CPUExecutionProvider", "CUDAExecutionProvider"]
    assert s.max_batch_size == 16 and s.metrics_auth is True and s.malignancy_threshold == 0.3
    assert s.log_format == "json" and s.pad_batches == "auto"


def test_padding_and_threads_follow_the_provider(tiny_onnx: Path) -> None:
    s = Settings(model_path=tiny_onnx)
    assert s.pad_enabled("CUDAExecutionProvider") and not s.pad_enabled("CPUExecutionProvider")
    assert Settings(model_path=tiny_onnx, pad_batches="on").pad_enabled("CPUExecutionProvider")
    assert s.resolved_intra_op_threads("CUDAExecutionProvider") == 1
    assert s.resolved_intra_op_threads("CPUExecutionProvider") >= 1
    assert Settings(model_path=tiny_onnx, intra_op_threads=3).resolved_intra_op_threads("CPUExecutionProvider") == 3


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"model_path": "/nonexistent/model.onnx"}, "LESIONSERVE_MODEL_PATH"),
        ({"max_batch_size": 0}, "LESIONSERVE_MAX_BATCH_SIZE"),
        ({"max_batch_size": 65}, "LESIONSERVE_MAX_BATCH_SIZE"),
        ({"request_timeout_s": 0}, "LESIONSERVE_REQUEST_TIMEOUT_S"),
        ({"providers": " , "}, "LESIONSERVE_PROVIDERS"),
        ({"log_format": "xml"}, "LESIONSERVE_LOG_FORMAT"),
        ({"log_level": "LOUD"}, "LESIONSERVE_LOG_LEVEL"),
        ({"pad_batches": "maybe"}, "LESIONSERVE_PAD_BATCHES"),
        ({"malignancy_threshold": 1.5}, "LESIONSERVE_MALIGNANCY_THRESHOLD"),
        ({"api_keys": "k1:short"}, "settings"),
        ({"api_keys_file": "/nonexistent/keys"}, "settings"),
    ],
)
def test_bad_values_are_refused_in_one_line(tiny_onnx: Path, overrides: dict[str, object], field: str) -> None:
    values: dict[str, object] = {"model_path": tiny_onnx, **overrides}
    with pytest.raises(ValidationError) as err:
        Settings(**values)  # type: ignore[arg-type]
    line = describe_validation_error(err.value)
    assert "\n" not in line and line.startswith(field)
