"""Readiness around warm-up and draining; real ``python -m service`` processes stopped by signals.

The signal tests run the real entry point (uvicorn, ``DrainingServer``, middleware, routes) in
its own process. Most use ``tests/service/gated_server.py``, whose model holds every request
while a file exists: "in flight when the signal comes" is then a fact the test sets up, not a
race it hopes to win, so each assertion can be exact. The last test runs an ONNX ResNet under
real load.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.errors import PROBLEM_BASE
from service.metrics import RejectReason
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


# --- real processes ----------------------------------------------------------------------------


@dataclass
class Held:
    """Requests sent by :meth:`Served.hold_requests`: their threads and, once answered, the answers."""

    threads: list[threading.Thread] = field(default_factory=list)
    answers: list[httpx.Response | str] = field(default_factory=list)  # a response, or the transport error's name

    def join(self) -> list[httpx.Response | str]:
        for t in self.threads:
            t.join(30)
        return self.answers


class Served:
    """A running ``python -m tests.service.gated_server`` and the handles a test needs."""

    def __init__(self, proc: subprocess.Popen[bytes], base: str, log: Path, hold: Path, runs: Path) -> None:
        self.proc, self.base, self.log, self.hold, self.runs = proc, base, log, hold, runs

    def output(self) -> str:
        return self.log.read_text()

    def runs_entered(self) -> int:
        return len(self.runs.read_text().split()) if self.runs.exists() else 0

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{self.base}/metrics", timeout=5).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def wait_until(self, what: str, check: Callable[[], bool], timeout: float = 15) -> None:
        until = time.monotonic() + timeout
        while not check():
            assert self.proc.poll() is None, f"server exited while waiting for {what}:\n{self.output()}"
            assert time.monotonic() < until, f"timed out waiting for {what}:\n{self.output()}"
            time.sleep(0.02)

    def hold_requests(self, n: int) -> Held:
        """Send ``n`` classify requests that the model holds: one inside ``run``, ``n - 1`` queued."""
        self.hold.touch()
        before = self.runs_entered()
        pending = Held()

        def send() -> None:
            with httpx.Client(base_url=self.base, timeout=60) as client:
                try:
                    pending.answers.append(post(client, jpeg_bytes()))
                except httpx.TransportError as exc:  # cut off by a forced stop
                    pending.answers.append(type(exc).__name__)

        pending.threads = [threading.Thread(target=send) for _ in range(n)]
        for t in pending.threads:
            t.start()
        self.wait_until("a request inside the model", lambda: self.runs_entered() > before)
        self.wait_until(f"{n - 1} requests queued", lambda: self.metrics()[("lesionserve_queue_depth", ())] == n - 1)
        return pending

    def exit_after(self, sig: signal.Signals, within: float) -> tuple[int | None, float]:
        """Send ``sig``: the exit code (None if still running ``within`` s later) and the seconds it took."""
        sent = time.monotonic()
        self.proc.send_signal(sig)
        return self.exit_code(within), time.monotonic() - sent

    def exit_code(self, within: float) -> int | None:
        """The exit code if the process ends within ``within`` seconds, else None."""
        try:
            return self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            return None


@contextmanager
def served(tmp_path: Path, tiny_onnx: Path, **settings: str) -> Iterator[Served]:
    """Start the gated server (max batch 1: one request in the model, the rest queued); kill it after."""
    port = free_port()
    hold, runs, log = tmp_path / "hold", tmp_path / "runs", tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LESIONSERVE_")}
    env.update(
        LESIONSERVE_MODEL_PATH=str(tiny_onnx), LESIONSERVE_HOST="127.0.0.1", LESIONSERVE_PORT=str(port),
        LESIONSERVE_PROVIDERS="CPUExecutionProvider", LESIONSERVE_MAX_BATCH_SIZE="1", LESIONSERVE_LOG_FORMAT="json",
        LESIONSERVE_AUDIT_LOG="off", GATED_MODEL_HOLD=str(hold), GATED_MODEL_RUNS=str(runs),
    )  # fmt: skip
    env.update({f"LESIONSERVE_{k.upper()}": v for k, v in settings.items()})
    with log.open("w") as log_file:  # a file, not a pipe: an unread pipe fills and blocks the server
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.service.gated_server"], cwd=REPO, env=env, stdout=log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = Served(proc, f"http://127.0.0.1:{port}", log, hold, runs)
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{server.base}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        server.wait_until("readiness", ready, timeout=60)
        yield server
    finally:
        hold.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.slow
def test_fresh_process_exports_every_metric_before_any_request(tmp_path: Path, tiny_onnx: Path) -> None:
    # A fresh process, not the test process: there, earlier tests have already created the
    # label series that the service must create itself at start (rate() needs a zero first).
    with served(tmp_path, tiny_onnx, queue_size="17") as server:
        samples = server.metrics()
    assert samples[("lesionserve_ready", ())] == 1
    assert samples[("lesionserve_queue_capacity", ())] == 17
    for reason in RejectReason:
        assert samples[("lesionserve_rejections_total", (("reason", reason.value),))] == 0, reason
    for name in ("lesionserve_in_flight_requests", "lesionserve_queue_depth", "lesionserve_malignancy_flagged_total"):
        assert (name, ()) in samples
    info = [dict(labels) for name, labels in samples if name == "lesionserve_model_info"]
    assert info and info[0]["provider"] == "CPUExecutionProvider"


def assert_draining_answers(server: Served) -> None:
    """While draining, the server still answers: not ready, new work refused, every answer closing."""
    ready = httpx.get(f"{server.base}/readyz", timeout=5)
    assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
    refused = httpx.post(f"{server.base}/v1/classify", content=jpeg_bytes(), headers={"content-type": "image/jpeg"})
    assert refused.status_code == 503 and refused.json()["type"] == PROBLEM_BASE + "shutting-down"
    assert refused.headers["retry-after"] == "1"
    alive = httpx.get(f"{server.base}/healthz", timeout=5)
    assert alive.status_code == 200
    # no client may send its next request down a connection that the shutdown is about to close
    for resp in (ready, refused, alive):
        assert resp.headers["connection"] == "close", resp.request.url


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_admitted_requests_and_refuses_new_work(
    tmp_path: Path, tiny_onnx: Path, sig: signal.Signals
) -> None:
    with served(tmp_path, tiny_onnx, shutdown_grace_s="30") as server:
        pending = server.hold_requests(3)
        server.proc.send_signal(sig)
        # uvicorn looks at should_exit every 0.1 s: a drain that ended at once would have closed
        # the port by now, and the answers below would be connection errors
        time.sleep(0.5)
        assert_draining_answers(server)
        assert server.proc.poll() is None  # still draining: three admitted requests are unanswered
        server.hold.unlink()
        answers = pending.join()
        rc = server.exit_code(within=15)
        output = server.output()
    assert [getattr(a, "status_code", a) for a in answers] == [200, 200, 200]
    assert all(isinstance(a, httpx.Response) and a.headers["connection"] == "close" for a in answers)
    assert rc == 0, output
    assert '"drained: every admitted request was answered"' in output.replace("'", '"')


@pytest.mark.slow
def test_second_signal_stops_at_once_without_finishing_the_drain(tmp_path: Path, tiny_onnx: Path) -> None:
    with served(tmp_path, tiny_onnx, shutdown_grace_s="60") as server:
        held_request = server.hold_requests(1)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.proc.poll() is None  # draining: the held request keeps it alive
        rc, took = server.exit_after(signal.SIGTERM, within=10)
        output = server.output()
    held_request.join()
    # the held request never finishes; a second signal must not wait for it (60 s grace)
    assert rc is not None and took < 5, output


@pytest.mark.slow
def test_grace_period_over_stops_the_server_with_requests_in_flight(tmp_path: Path, tiny_onnx: Path) -> None:
    with served(tmp_path, tiny_onnx, shutdown_grace_s="1") as server:
        held_request = server.hold_requests(1)
        rc, took = server.exit_after(signal.SIGTERM, within=20)
        output = server.output()
    held_request.join()
    assert rc == 0, output
    assert "grace period over with requests still in flight" in output
    # 1 s of drain, then uvicorn's own 1 s graceful shutdown; never the held request's forever
    assert took < 10, output
    assert re.search(r'"in_flight": 1\b', output), output


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
    # requests in flight when the signal came were finished during the drain, not cut off (how
    # many depends on the machine's speed; the gated tests above pin the exact count)
    finished_in_drain = [o for end, o in started_before if end > sigterm_at and o == 200]
    assert finished_in_drain, started_before
    # readiness never reads ready after the signal: 503 while draining, then the port closes
    # (the in-process drain test checks the 503 itself; here the drain may end before a poll lands)
    assert 200 not in ready_after, ready_after
    assert '"drained: every admitted request was answered"' in output.replace("'", '"')
