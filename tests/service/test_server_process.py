"""Issue 19 findings that only a real ``python -m service`` process shows: the audit trail during the
SIGTERM drain, and the bound on the request head (uvicorn's HTTP parser).

The process is ``tests.service.gated_server`` (the real entry point with a model whose runs a test
holds and releases), started by ``tests.service.test_lifecycle.served``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import jpeg_bytes
from tests.service.test_lifecycle import served


def post(base: str, request_id: str) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/classify",
        content=jpeg_bytes(),
        headers={"content-type": "image/jpeg", "x-request-id": request_id},
        timeout=30,
    )


@pytest.mark.slow
def test_every_request_answered_during_the_drain_is_audited(tmp_path: Path, tiny_onnx: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    with served(tmp_path, tiny_onnx, audit_log=str(audit), shutdown_grace_s="20") as server:
        server.hold.touch()
        entered = server.runs_entered()
        answers: dict[str, httpx.Response] = {}

        def send(request_id: str) -> None:
            answers[request_id] = post(server.base, request_id)

        threads = [threading.Thread(target=send, args=(f"held-{n}",)) for n in range(4)]
        for t in threads:
            t.start()
        # admitted = one inside the held model run, three queued (max batch 1); the in-flight gauge
        # would also count requests still being read, and the /metrics scrape itself
        server.wait_until(
            "4 requests admitted",
            lambda: server.runs_entered() > entered and server.metrics()[("lesionserve_queue_depth", ())] == 3,
        )
        server.proc.send_signal(signal.SIGTERM)
        server.wait_until("the drain", lambda: httpx.get(f"{server.base}/readyz", timeout=2).status_code == 503)
        answers["late"] = post(server.base, "late")  # refused during the drain: answered, so audited
        server.hold.unlink()  # the held requests finish now, inside the drain
        for t in threads:
            t.join(30)
        assert server.exit_code(within=30) == 0, server.output()
    assert answers["late"].status_code == 503
    assert sorted(r.status_code for k, r in answers.items() if k != "late") == [200] * 4
    lines = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
    audited = {line["request_id"]: line["outcome"]["status"] for line in lines}
    assert audited == {request_id: r.status_code for request_id, r in answers.items()}


def raw_request(port: int, header_bytes: int) -> bytes:
    """A GET /healthz whose one header carries ``header_bytes`` of value; the raw answer (or b'')."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * header_bytes + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the server gave up on the head early
            sock.sendall(head)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b"connection: close" not in b"".join(chunks).lower():
                    break
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks)


@pytest.mark.slow
def test_request_head_over_the_limit_is_refused_and_the_connection_closed(tmp_path: Path, tiny_onnx: Path) -> None:
    with served(tmp_path, tiny_onnx, max_header_bytes="8192") as server:
        port = int(server.base.rsplit(":", 1)[1])
        assert raw_request(port, 4_000).startswith(b"HTTP/1.1 200")  # a normal head is served
        refused = raw_request(port, 1_000_000)
        assert refused == b"" or refused.startswith(b"HTTP/1.1 400"), refused[:200]
        assert httpx.get(f"{server.base}/healthz", timeout=5).status_code == 200  # and the server lives on
