"""Service test fixtures: a fake model that records batches, settings, an app client, odd images."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.config import Settings
from service.contract import ModelMetadata
from tests.tiny_model import HAM_CLASSES, contract_metadata

SIZE = 32


class FakeModel:
    """Implements service.inference.InferenceModel; records every batch it runs.

    Its probabilities are a function of each image's mean red value, so every row can be
    traced to its image. An image whose pixel [0, 0, 0] is 13 is poison: any batch holding
    it raises, like an ONNX Runtime failure on one bad input.
    """

    provider = "CPUExecutionProvider"
    sha256 = "f" * 64

    def __init__(self, size: int = SIZE, delay_s: float = 0.0) -> None:
        self.metadata = ModelMetadata.from_props(contract_metadata(HAM_CLASSES, size))
        self.delay_s = delay_s
        self.batches: list[int] = []
        self.gate = threading.Event()  # cleared: run() blocks (lets tests pile up a queue)
        self.gate.set()
        self.entered = threading.Event()  # set once run() has been called
        self.fail_all = False

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait(10)
        if self.delay_s:
            time.sleep(self.delay_s)
        self.batches.append(len(batch))
        if self.fail_all or (batch[:, 0, 0, 0] == 13).any():
            raise RuntimeError("ORT failure with internal details /opt/secret/path")
        k = len(self.metadata.classes)
        red = batch[..., 0].reshape(len(batch), -1).mean(axis=1) / 255.0  # (N,)
        logits = np.outer(red, np.arange(k, dtype=np.float32))  # (N, K)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def fake_model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def settings_factory(tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {"model_path": tiny_onnx, "providers": "CPUExecutionProvider", "log_format": "text"}
        if overrides.get("dimse_enabled") or overrides.get("dicomweb_push_sr"):  # each app its own SR outbox
            values["outbox_path"] = tmp_path_factory.mktemp("outbox") / "outbox.sqlite"
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make


def wait_ready(client: TestClient, timeout: float = 10.0) -> None:
    until = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        if time.monotonic() > until:
            raise AssertionError("service did not become ready")
        time.sleep(0.01)


@pytest.fixture
def client_factory(settings_factory: Callable[..., Settings]) -> Iterator[Callable[..., TestClient]]:
    """``make(model=None, **settings)`` -> a started, ready TestClient (closed after the test)."""
    clients: list[TestClient] = []

    def make(model: object = None, ready: bool = True, **overrides: object) -> TestClient:
        app = create_app(settings_factory(**overrides), model=model)  # type: ignore[arg-type]
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        if ready:
            wait_ready(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def jpeg_bytes(width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    return encode(Image.new("RGB", (width, height), color), "JPEG", quality=95)


def png_bytes(width: int = 64, height: int = 48, color: tuple[int, int, int] = (40, 200, 40)) -> bytes:
    return encode(Image.new("RGB", (width, height), color), "PNG")


def post_image(client: TestClient, data: bytes, content_type: str = "image/jpeg", **headers: str) -> object:
    return client.post("/v1/classify", content=data, headers={"content-type": content_type, **headers})
