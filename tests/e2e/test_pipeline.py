"""The whole path, real at every step: train -> checkpoint -> export -> ONNX -> service over HTTP.

Runs the three command-line entry points as a user would (``python -m train``, ``python -m
export``, ``python -m service``) on the committed CC0 ISIC images, then classifies every image
through a real uvicorn process.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, TEST_DATA

pytestmark = pytest.mark.slow


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("e2e")
    _run(
        "train", "--data", str(TEST_DATA / "isic"), "--arch", "resnet18", "--img-size", "32", "--epochs", "2",
        "--batch-size", "4", "--out", str(work / "run"), "--seed", "0", "--no-progress", "--load-workers", "0",
    )  # fmt: skip
    ckpt = work / "run" / "best.pt"
    assert ckpt.is_file()
    onnx_path = work / "model.onnx"
    _run("export", str(ckpt), "--out", str(onnx_path), "--tta", "flips", "--name", "e2e", "--version", "0.0.1")
    assert onnx_path.is_file() and onnx_path.with_suffix(".md").is_file()
    return onnx_path


@pytest.fixture(scope="module")
def service_url(exported: Path) -> Iterator[str]:
    port = _free_port()
    env = {**os.environ, "LESIONSERVE_MODEL_PATH": str(exported), "LESIONSERVE_HOST": "127.0.0.1",
           "LESIONSERVE_PORT": str(port), "LESIONSERVE_LOG_FORMAT": "text"}  # fmt: skip
    log = exported.parent / "service.log"  # a file, not a pipe: an unread pipe would block the server
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"service exited early:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail("service did not become ready within 60 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_every_image_classifies_through_http(service_url: str, isic_images: list[Path]) -> None:
    assert len(isic_images) >= 8
    seen_tops = set()
    for path in isic_images:
        r = httpx.post(service_url + "/v1/classify", files={"image": (path.name, path.read_bytes(), "image/jpeg")},
                       timeout=30)  # fmt: skip
        assert r.status_code == 200, r.text
        body = r.json()
        probs = [p["probability"] for p in body["predictions"]]
        assert {p["code"] for p in body["predictions"]} == {"melanoma", "nevus"}
        assert math.isclose(sum(probs), 1.0, abs_tol=1e-4)
        assert probs == sorted(probs, reverse=True)
        assert body["top"] == body["predictions"][0]
        assert body["model"]["name"] == "e2e" and len(body["model"]["sha256"]) == 64
        assert body["malignancy"]["classes"] == ["melanoma"]  # ISIC Archive label, malignant by default
        melanoma = next(p["probability"] for p in body["predictions"] if p["code"] == "melanoma")
        assert abs(body["malignancy"]["score"] - melanoma) < 1e-6
        seen_tops.add(round(probs[0], 6))
    assert len(seen_tops) > 1, "every image got the same answer: the pixels do not reach the model"


def test_models_endpoint_describes_the_exported_file(service_url: str) -> None:
    info = httpx.get(service_url + "/v1/models", timeout=10).json()["models"][0]
    assert info["classes"] == ["melanoma", "nevus"]
    assert info["input_size"] == 32
    assert info["tta"] == ["identity", "hflip", "vflip", "rot180"]
    assert info["provider"] == "CPUExecutionProvider"


def test_metrics_count_the_requests(service_url: str, isic_images: list[Path]) -> None:
    httpx.post(
        service_url + "/v1/classify", content=isic_images[0].read_bytes(), headers={"Content-Type": "image/jpeg"}
    )
    text = httpx.get(service_url + "/metrics", timeout=10).text
    line = next(x for x in text.splitlines() if x.startswith("lesionserve_requests_total{") and "/v1/classify" in x)
    assert float(line.rsplit(" ", 1)[1]) >= 1, json.dumps(line)
