"""Slow and silent clients against a real ``python -m service`` process (issue 16): what uvicorn's protocol
layer does, which the in-process tests (``test_clients.py``) cannot show.

Each test uses raw sockets, so "sent the head and two bytes, then went quiet" is exactly what the server
sees. Waits are bounded (a server that never ends a slow client fails the test) but nothing asserts a speed.
"""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path

import httpx
import pytest

from service.errors import PROBLEM_BASE
from tests.service.conftest import jpeg_bytes
from tests.service.test_lifecycle import Served, served

HEAD = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 50000\r\n\r\n"


def connect(server: Served) -> socket.socket:
    port = int(server.base.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    return sock


def read_answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (b'' if it closes without a word)."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def problem_of(answer: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def error_lines(server: Served) -> list[str]:
    return [line for line in server.output().splitlines() if '"level": "ERROR"' in line or "Traceback" in line]


@pytest.mark.slow
def test_hundreds_of_slow_clients_do_not_starve_normal_ones(tmp_path: Path, tiny_onnx: Path) -> None:
    """The issue's first observation: 300 clients send a head and two bytes and go quiet. Under the default
    caps, normal clients are served meanwhile; each slow one is then ended with 408 by the rate rule.
    (The grace period is raised from 5 s so that the normal requests surely meet the slow ones.)"""
    with served(tmp_path, tiny_onnx, body_rate_grace_s="20", max_batch_size="8") as server:
        slow = []
        for _ in range(300):
            sock = connect(server)
            sock.sendall(HEAD + b"\xff\xd8")
            slow.append(sock)
        server.wait_until(
            "300 uploads being read", lambda: server.metrics()[("lesionserve_uploads_reading", ())] == 300
        )
        with httpx.Client(base_url=server.base, timeout=30) as client:
            answers = [
                client.post("/v1/classify", content=jpeg_bytes(), headers={"content-type": "image/jpeg"}).status_code
                for _ in range(20)
            ]
        assert server.metrics()[("lesionserve_uploads_reading", ())] == 300  # the slow ones were there throughout
        assert answers == [200] * 20
        ended = [problem_of(read_answer(sock)) for sock in slow]
        for sock in slow:
            sock.close()
        samples = server.metrics()
        assert error_lines(server) == []
    assert {(status, problem["type"]) for status, _, problem in ended} == {(408, PROBLEM_BASE + "upload-too-slow")}
    assert all(headers["connection"] == "close" for _, headers, _ in ended)
    assert samples[("lesionserve_rejections_total", (("reason", "upload_too_slow"),))] == 300
    assert samples[("lesionserve_uploads_reading", ())] == 0


@pytest.mark.slow
def test_head_that_never_ends_is_408_and_a_silent_connection_is_closed(tmp_path: Path, tiny_onnx: Path) -> None:
    with served(tmp_path, tiny_onnx, header_timeout_s="1") as server:
        partial, silent = connect(server), connect(server)
        partial.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")  # and the rest never comes
        status, headers, problem = problem_of(read_answer(partial))
        assert read_answer(silent) == b""  # closed without a word: it never asked anything
        samples = server.metrics()
        alive = httpx.get(f"{server.base}/healthz", timeout=10).status_code
        assert error_lines(server) == []
    assert (status, problem["type"], headers["connection"]) == (408, PROBLEM_BASE + "header-timeout", "close")
    assert samples[("lesionserve_rejections_total", (("reason", "header_timeout"),))] == 2
    assert alive == 200


@pytest.mark.slow
def test_connections_beyond_the_cap_are_503_with_retry_after(tmp_path: Path, tiny_onnx: Path) -> None:
    with served(tmp_path, tiny_onnx, max_connections="4", header_timeout_s="60") as server:
        # accepted in the order they connect: the first four are held open (silent), the fifth is over the cap
        held = [connect(server) for _ in range(4)]
        extra = connect(server)
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, problem = problem_of(read_answer(extra))
        for sock in held:
            sock.close()

        def served_again() -> bool:
            try:
                return httpx.get(f"{server.base}/healthz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        server.wait_until("a connection served once the held ones closed", served_again)
        refused = server.metrics()[("lesionserve_rejections_total", (("reason", "too_many_connections"),))]
        assert error_lines(server) == []
    assert (status, problem["type"]) == (503, PROBLEM_BASE + "too-many-connections")
    assert headers["retry-after"] == "1" and headers["connection"] == "close"
    assert refused == 1


@pytest.mark.slow
def test_kept_alive_connection_gets_the_header_timeout_for_its_next_head(tmp_path: Path, tiny_onnx: Path) -> None:
    """After one answer the connection idles under uvicorn's keep-alive timeout; once the next head starts
    arriving, the header timeout runs again (a slow head cannot hide behind an earlier request)."""
    with served(tmp_path, tiny_onnx, header_timeout_s="1") as server:
        sock = connect(server)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the second head never ends
        status, headers, problem = problem_of(read_answer(sock))
        sock.close()
    assert first.startswith(b"HTTP/1.1 200")
    assert (status, problem["type"], headers["connection"]) == (408, PROBLEM_BASE + "header-timeout", "close")
