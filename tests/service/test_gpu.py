"""The CUDA provider path: the real ONNX Runtime session on a GPU, with padded batch shapes.

Marked ``gpu``: skipped, with the reason, where ONNX Runtime cannot use a CUDA device (see
``tests/conftest.py``); runs on a GPU node with the ``gpu`` extra installed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.imaging import decode_image
from service.inference import CUDA, OnnxModel
from tests.service.conftest import SIZE, jpeg_bytes, wait_ready

pytestmark = pytest.mark.gpu


def test_cuda_session_is_used_and_matches_cpu(tiny_onnx: Path) -> None:
    model = OnnxModel.load(tiny_onnx, [CUDA, "CPUExecutionProvider"])
    assert model.provider == CUDA  # not a silent fall-back to the CPU
    batch = np.random.default_rng(0).integers(0, 256, size=(3, SIZE, SIZE, 3), dtype=np.uint8)
    cpu = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(model.run(batch), cpu.run(None, {"image": batch})[0], atol=1e-5)


def test_cuda_service_pads_batches_and_answers(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(providers=f"{CUDA},CPUExecutionProvider", max_batch_size=8)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        info = client.get("/v1/models").json()["models"][0]
        assert info["provider"] == CUDA
        assert info["batch_sizes"] == [1, 2, 4, 8]  # "auto" padding is on for CUDA
        image = jpeg_bytes()
        resp = client.post("/v1/classify", content=image, headers={"content-type": "image/jpeg"})
        assert resp.status_code == 200
        cpu = ort.InferenceSession(str(settings.model_path), providers=["CPUExecutionProvider"])
        expected = cpu.run(None, {"image": decode_image(image, SIZE, 10**8).pixels[None]})[0][0]
        got = {p["code"]: p["probability"] for p in resp.json()["predictions"]}
        classes = info["classes"]
        np.testing.assert_allclose([got[c] for c in classes], expected, atol=1e-5)
