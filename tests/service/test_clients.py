"""Flaky and hostile clients, in process (issue 16): a client that hangs up is not a server fault, an upload
that trickles is ended, and uploads being read at once are capped.

The requests here are driven by hand through the app's ASGI interface inside the TestClient's event loop:
the test decides when each body chunk and the disconnect arrive, so "the client left while its image was
queued" is a fact the test sets up, not a race. What only a real uvicorn process shows (header timeout,
connection cap, hundreds of slow sockets) is in ``test_slow_clients.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from service import clients
from service.errors import PROBLEM_BASE
from tests.service.conftest import FakeModel, jpeg_bytes

ClientFactory = Callable[..., TestClient]
Message = dict[str, Any]
Hand = Callable[..., "HandDriven"]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def requests_with(status: int) -> float:
    return sample("lesionserve_requests_total", route="/v1/classify", method="POST", status=str(status))


class HandDriven:
    """One ``POST /v1/classify`` whose body chunks and disconnect the test sends when it chooses.

    It runs as a task in the TestClient's event loop, so it shares the app's runtime, batcher and metrics.
    """

    def __init__(self, client: TestClient, content_type: str = "image/jpeg", length: int | None = None) -> None:
        assert client.portal is not None
        self.portal = client.portal
        self.inbox: asyncio.Queue[Message] = self.portal.call(self._make_inbox)
        self.sent: list[Message] = []
        self.responded = threading.Event()
        headers = [(b"content-type", content_type.encode()), (b"host", b"test")]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/v1/classify", "raw_path": b"/v1/classify", "query_string": b"", "root_path": "",
            "headers": headers, "client": ("127.0.0.1", 50000), "server": ("test", 80), "state": {},
        }  # fmt: skip
        self.done: Future[None] = self.portal.start_task_soon(client.app, scope, self._receive, self._send)

    @staticmethod
    async def _make_inbox() -> asyncio.Queue[Message]:
        return asyncio.Queue()

    async def _receive(self) -> Message:
        return await self.inbox.get()

    async def _send(self, message: Message) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.responded.set()

    def push(self, body: bytes, more: bool = True) -> None:
        self.portal.call(self.inbox.put, {"type": "http.request", "body": body, "more_body": more})

    def hang_up(self) -> None:
        self.portal.call(self.inbox.put, {"type": "http.disconnect"})

    def finish(self, within: float = 20) -> tuple[int, dict[str, str], bytes]:
        """Wait for the app to return; the status, headers and body it sent."""
        try:
            self.done.result(timeout=within)
        except TimeoutError:
            self.hang_up()  # end the task, or the TestClient's loop never closes
            raise AssertionError(f"no answer within {within} s") from None
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
        body = b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
        return start["status"], headers, body


@pytest.fixture
def hand(client_factory: ClientFactory) -> Iterator[Hand]:
    """``hand(client, ...)`` -> a :class:`HandDriven` request; any still open at the end is hung up, so a
    failing test ends instead of leaving the TestClient's loop waiting for it."""
    made: list[HandDriven] = []

    def make(client: TestClient, **kwargs: Any) -> HandDriven:
        made.append(HandDriven(client, **kwargs))
        return made[-1]

    yield make
    for conn in made:
        if not conn.done.done():
            conn.hang_up()


def wait_for(what: str, check: Callable[[], bool], timeout: float = 15) -> None:
    until = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < until, f"timed out waiting for {what}"
        time.sleep(0.005)


def service_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("service") and r.levelno >= level]


def test_client_gone_mid_upload_is_499_logged_at_info_without_traceback(
    client_factory: ClientFactory, hand: Hand, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Observation 2 of the issue: today a hang-up mid-upload is an ERROR with a traceback and a 500."""
    audit = tmp_path / "audit.jsonl"
    client = client_factory(audit_log=str(audit))
    before = {s: requests_with(s) for s in (499, 500)}
    gone_before = sample("lesionserve_client_disconnects_total", stage="upload")
    caplog.set_level(logging.INFO)
    conn = hand(client, length=5000)
    conn.push(jpeg_bytes()[:2])
    conn.hang_up()
    status, _, body = conn.finish()
    assert status == 499
    assert json.loads(body)["type"] == PROBLEM_BASE + "client-closed"
    assert requests_with(499) == before[499] + 1
    assert requests_with(500) == before[500]
    assert sample("lesionserve_client_disconnects_total", stage="upload") == gone_before + 1
    assert service_records(caplog, logging.WARNING) == []
    assert not any(r.exc_info for r in caplog.records)
    access = [r for r in caplog.records if r.name == "service.access" and getattr(r, "status", None) == 499]
    assert len(access) == 1 and access[0].levelno == logging.INFO
    assert getattr(access[0], "outcome", None) == "client_closed"
    client.__exit__(None, None, None)  # closes the audit trail (flushes the file)
    line = json.loads(audit.read_text().splitlines()[-1])
    assert line["outcome"] == {"status": 499, "problem": PROBLEM_BASE + "client-closed"}
    assert line["model"] is None


def test_client_gone_while_queued_is_skipped_by_the_batcher(
    client_factory: ClientFactory, hand: Hand, caplog: pytest.LogCaptureFixture
) -> None:
    """A request whose client left while its image waited in the queue costs no inference."""
    model = FakeModel()
    client = client_factory(model=model, max_batch_size=1)
    warm = len(model.batches)
    skipped_before = sample("lesionserve_inference_skipped_total", reason="client_closed")
    gone_before = sample("lesionserve_client_disconnects_total", stage="processing")
    caplog.set_level(logging.INFO)
    model.entered.clear()
    model.gate.clear()  # the first request's run blocks: the second waits in the queue
    first, second = hand(client), hand(client)
    first.push(jpeg_bytes(), more=False)
    wait_for("the first image inside the model", model.entered.is_set)
    second.push(jpeg_bytes(color=(10, 200, 10)), more=False)
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    wait_for("the second image queued", lambda: runtime.batcher.depth() == 1)
    second.hang_up()
    status, _, _ = second.finish()
    assert status == 499
    model.gate.set()
    assert first.finish()[0] == 200
    wait_for("the batcher to pass the queue", lambda: runtime.batcher.depth() == 0)
    time.sleep(0.2)  # let a wrongly run second batch show up in model.batches (never a pass condition)
    assert model.batches[warm:] == [1]  # the first image alone was run
    assert sample("lesionserve_inference_skipped_total", reason="client_closed") == skipped_before + 1
    assert sample("lesionserve_client_disconnects_total", stage="processing") == gone_before + 1
    assert service_records(caplog, logging.WARNING) == []


def test_trickling_upload_is_ended_with_408_and_the_connection_closed(
    client_factory: ClientFactory, hand: Hand
) -> None:
    """Observation 1 of the issue: two bytes, then silence, used to be kept open for as long as it lasted."""
    client = client_factory(body_rate_grace_s=0.2, body_min_rate_bytes_s=1024)
    before = sample("lesionserve_rejections_total", reason="upload_too_slow")
    conn = hand(client, length=50_000)
    conn.push(b"\xff\xd8")
    status, headers, body = conn.finish()
    problem = json.loads(body)
    assert status == 408 and headers["content-type"] == "application/problem+json"
    assert problem["type"] == PROBLEM_BASE + "upload-too-slow"
    assert headers["connection"] == "close"
    assert sample("lesionserve_rejections_total", reason="upload_too_slow") == before + 1


def test_upload_that_keeps_the_rate_but_never_ends_hits_the_total_deadline(
    client_factory: ClientFactory, hand: Hand
) -> None:
    client = client_factory(body_timeout_s=0.5, body_min_rate_bytes_s=1, body_rate_grace_s=0.1)
    conn = hand(client)

    def feed() -> None:  # fast enough for any rate rule, but the body never ends
        while not conn.responded.is_set():
            conn.push(b"\0" * 512)
            time.sleep(0.02)

    feeder = threading.Thread(target=feed)
    feeder.start()
    status, headers, body = conn.finish()
    feeder.join()
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body)["type"] == PROBLEM_BASE + "upload-timeout"


def test_uploads_beyond_the_cap_are_503_with_retry_after(client_factory: ClientFactory, hand: Hand) -> None:
    """Observation 3 of the issue: uploads being read had no cap."""
    client = client_factory(max_uploads=2, body_rate_grace_s=60)
    slow = [hand(client, length=len(jpeg_bytes())) for _ in range(2)]
    for conn in slow:
        conn.push(jpeg_bytes()[:10])
    # the app has taken the first chunk of each: both are being read (known without the service's gauge)
    wait_for("two uploads being read", lambda: all(conn.inbox.empty() for conn in slow))
    assert sample("lesionserve_uploads_reading") == 2
    refused = client.post("/v1/classify", content=jpeg_bytes(), headers={"content-type": "image/jpeg"})
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["type"] == PROBLEM_BASE + "too-many-uploads"
    for conn in slow:  # the two admitted uploads are not disturbed by the refusal
        conn.push(jpeg_bytes()[10:], more=False)
        assert conn.finish()[0] == 200
    assert sample("lesionserve_uploads_reading") == 0
    assert client.post("/v1/classify", content=jpeg_bytes(), headers={"content-type": "image/jpeg"}).status_code == 200


def test_fd_limit_is_raised_to_fit_the_connection_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = {"now": (1024, 4096)}
    monkeypatch.setattr(clients.resource, "getrlimit", lambda _: limits["now"])
    monkeypatch.setattr(clients.resource, "setrlimit", lambda _, value: limits.update(now=value))
    assert clients.raise_fd_limit(2048) == 2048 + 256  # room for the sockets and the process's own files
    assert limits["now"] == (2304, 4096)
    limits["now"] = (1024, 1500)  # the hard limit is lower: as far as it goes
    assert clients.raise_fd_limit(2048) == 1500
    limits["now"] = (65536, 65536)  # already enough: left alone
    assert clients.raise_fd_limit(2048) == 65536


@pytest.mark.parametrize(
    ("size", "elapsed_until", "error"),
    [(0, 5.0, "UploadTooSlow"), (40_960, 10.0, "UploadTooSlow"), (10**9, 30.0, "UploadTimeout")],
    ids=["nothing yet: the grace period", "10 s worth at 4 KiB/s", "fast: the total deadline"],
)
def test_upload_gives_up_at_the_rate_rule_or_the_deadline(
    settings_factory: Callable[..., Any], size: int, elapsed_until: float, error: str
) -> None:
    uploads = clients.Uploads(settings_factory())  # defaults: 30 s, 4096 bytes/s after 5 s
    at, exc = uploads.give_up_at(size, started=100.0)
    assert (at - 100.0, exc.__name__) == (elapsed_until, error)
