"""Readiness around warm-up, draining, and a real uvicorn process stopped by SIGTERM under load."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import REPO
from tests.resnet_onnx import make_resnet_onnx
from tests.service.conftest import FakeModel, jpeg_bytes

ClientFactory = Callable[..., TestClient]


def post(client: TestClient | httpx.Client, data: bytes) -> httpx.Response:
    return client.post("/v1/classify", content=data, headers={"content-type": "image/jpeg"})


def test_ready_only_after_every_batch_size_warmed_up(client_factory: ClientFactory) -> None:
    model = FakeModel()
    model.gate.clear()
    client = client_factory(model=model, ready=False, max_batch_size=4)
    resp = client.get("/readyz")
    assert resp.status_code == 503 and resp.json() == {"status": "warming up"}
    model.gate.set()
    until = time.monotonic() + 5
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < until
        time.sleep(0.01)
    assert model.batches[:4] == [1, 2, 3, 4]


def test_failed_warm_up_keeps_the_service_not_ready(client_factory: ClientFactory) -> None:
    model = FakeModel()
    model.fail_all = True
    client = client_factory(model=model, ready=False)
    until = time.monotonic() + 5
    while client.get("/readyz").json()["status"] == "warming up":
        assert time.monotonic() < until
        time.sleep(0.01)
    resp = client.get("/readyz")
    assert resp.status_code == 503 and resp.json() == {"status": "warm-up failed"}
    assert client.get("/healthz").status_code == 200


def test_drain_waits_for_admitted_requests_and_refuses_new_ones(client_factory: ClientFactory) -> None:
    model = FakeModel()
    client = client_factory(model=model)
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    model.gate.clear()
    answers: list[int] = []
    worker = threading.Thread(target=lambda: answers.append(post(client, jpeg_bytes()).status_code))
    worker.start()
    until = time.monotonic() + 5
    while runtime.in_flight == 0:
        assert time.monotonic() < until
        time.sleep(0.01)
    runtime.begin_drain()
    assert runtime.wait_idle(0.2) is False  # the admitted request is still running
    assert post(client, jpeg_bytes()).status_code == 503  # new work is refused
    model.gate.set()
    assert runtime.wait_idle(5) is True
    worker.join(5)
    assert answers == [200]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_sigterm_under_load_answers_every_admitted_request(tmp_path: Path, isic_images: list[Path]) -> None:
    # A small ResNet so that inference takes real time and requests pile up in the queue.
    model = make_resnet_onnx(tmp_path / "resnet.onnx", size=128, width=32, blocks=(2, 2, 2, 2))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LESIONSERVE_")}
    env.update(
        LESIONSERVE_MODEL_PATH=str(model), LESIONSERVE_HOST="127.0.0.1", LESIONSERVE_PORT=str(port),
        LESIONSERVE_PROVIDERS="CPUExecutionProvider", LESIONSERVE_MAX_BATCH_SIZE="2", LESIONSERVE_INTRA_OP_THREADS="1",
        LESIONSERVE_SHUTDOWN_GRACE_S="20", LESIONSERVE_LOG_FORMAT="json",
    )  # fmt: skip
    log_path = tmp_path / "server.log"  # a file, not a pipe: an unread pipe fills and blocks the server
    log_file = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        until = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < until, "server did not become ready"
            time.sleep(0.1)

        images = [p.read_bytes() for p in isic_images]
        records: list[tuple[float, float, int | str]] = []  # (client start, end, status or error)
        lock = threading.Lock()

        def load(i: int) -> None:
            with httpx.Client(base_url=base, timeout=30) as client:
                n = 0
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        outcome: int | str = post(client, images[(i + n) % len(images)]).status_code
                    except httpx.TransportError as exc:
                        outcome = type(exc).__name__
                    with lock:
                        records.append((started, time.monotonic(), outcome))
                    n += 1
                    if outcome != 200:
                        return  # like a load balancer, send this client's work elsewhere from now on

        threads += [threading.Thread(target=load, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        time.sleep(2.0)  # let the queue fill
        sigterm_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        ready_after: list[int | str] = []
        for _ in range(5):
            try:
                ready_after.append(httpx.get(f"{base}/readyz", timeout=2).status_code)
            except httpx.TransportError as exc:
                ready_after.append(type(exc).__name__)
            time.sleep(0.01)
        rc = proc.wait(timeout=30)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for t in threads:
            t.join(30)
        log_file.close()
    output = log_path.read_text()
    assert rc == 0, output
    # Nothing admitted is lost: every request sent before the signal got an answer, 200 or (if it
    # reached the server after the drain began) 503. Requests sent later may also find the port
    # closing (a connection error) - they were never admitted - but never get any other status.
    started_before = [(end, o) for start, end, o in records if start < sigterm_at]
    assert len(started_before) > 20 and {o for _, o in started_before} <= {200, 503}, started_before
    assert not {o for _, _, o in records if isinstance(o, int)} - {200, 503}
    # those clearly admitted before the signal all succeeded
    assert all(o == 200 for start, _, o in records if start < sigterm_at - 0.5)
    # requests in flight when the signal came were finished during the drain, not cut off
    finished_in_drain = [o for end, o in started_before if end > sigterm_at and o == 200]
    assert len(finished_in_drain) >= 6, finished_in_drain
    # readiness never reads ready after the signal: 503 while draining, then the port closes
    # (the in-process drain test checks the 503 itself; here the drain may end before a poll lands)
    assert 200 not in ready_after, ready_after
    assert '"drained: every admitted request was answered"' in output.replace("'", '"')
