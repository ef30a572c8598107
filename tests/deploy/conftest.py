"""Fixtures for tests/deploy: a real ``python -m service`` on a loopback port, stopped afterwards."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.deploy.helpers import REPO
from tests.tiny_model import make_tiny_onnx

START_TIMEOUT_S = 60.0  # model load + warm-up of a tiny model takes ~2 s; the machine is shared


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL: never leave a server behind."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = START_TIMEOUT_S) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode} before {url} was up:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"{url} not OK after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@dataclass(frozen=True)
class RunningService:
    """A lesionserve process serving the tiny model."""

    base_url: str
    port: int


@pytest.fixture(scope="session")
def running_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """``python -m service`` with the tiny contract model on a free loopback port, after a few requests.

    The requests (one classification, one refused upload, one /v1/models) make the labelled
    series (route, status, class_code) appear in /metrics, as they would after real traffic.
    """
    work = tmp_path_factory.mktemp("lesionserve")
    model = make_tiny_onnx(work / "tiny.onnx")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LESIONSERVE_")}
    env.update(
        LESIONSERVE_MODEL_PATH=str(model),
        LESIONSERVE_HOST="127.0.0.1",
        LESIONSERVE_PORT=str(port),
        LESIONSERVE_PROVIDERS="CPUExecutionProvider",
        LESIONSERVE_MAX_BATCH_SIZE="2",
        LESIONSERVE_INTRA_OP_THREADS="1",
        LESIONSERVE_DECODE_THREADS="1",
        LESIONSERVE_SHUTDOWN_GRACE_S="2",
        LESIONSERVE_LOG_FORMAT="text",
        LESIONSERVE_LOG_LEVEL="WARNING",
    )
    log = work / "service.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{base}/readyz", proc, log)
        image = (REPO / "tests" / "data" / "isic" / "nevus" / "ISIC_0000017.jpg").read_bytes()
        with httpx.Client(base_url=base, timeout=10) as client:
            ok = client.post("/v1/classify", content=image, headers={"Content-Type": "image/jpeg"})
            assert ok.status_code == 200, ok.text
            refused = client.post("/v1/classify", content=b"not an image", headers={"Content-Type": "text/plain"})
            assert refused.status_code == 415, refused.text
            assert client.get("/v1/models").status_code == 200
        yield RunningService(base_url=base, port=port)
    finally:
        stop_process(proc)
