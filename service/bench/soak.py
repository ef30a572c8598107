"""``python -m service.bench.soak``: a soak and fault run against a real ``python -m service`` process.

For ``--duration`` seconds it mixes, each kind on its own thread: good JPEG uploads at ``--rate`` per second;
the bad inputs the tests know (undecodable, truncated, unsupported type, multipart without an image, empty);
oversize bodies (declared and streamed); clients that hang up mid-upload and right after sending (mid-answer);
uploads that trickle and request heads that never end. Then one SIGTERM, under traffic. It asserts:

- every good request was answered 200 (or 503 with ``Retry-After`` / 504 under overload, counted apart);
- zero 500s, and zero unhandled-error or traceback lines in the server log;
- RSS growth between the end of the first quarter and the end under ``--rss-bound-mb``;
- open file descriptors back to the idle baseline once every client has gone;
- the server's metrics add up to what was sent (per status, 499s by stage, 408s, audit lines);
- SIGTERM while clients keep uploading: every request answered 200, or refused with 503 and ``Retry-After``
  (or a refused connection once the listener closed), none cut off; the drain exits 0.

Prints a JSON report; exits 1 when an assertion fails. ``tests/service/test_soak.py`` runs a short form in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from service.bench.load import Server

MAX_UPLOAD = 1024 * 1024  # small, so that oversize bodies cost little to send
CLASSIFY = "/v1/classify"
ROUTE = '"/v1/classify"'


def jpeg(seed: int, width: int = 600, height: int = 450) -> bytes:
    """A dermoscopy-sized JPEG: a smooth blob with noise (about 30-60 KB)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    blob = np.exp(-(((xx - width / 2) / (width / 3)) ** 2 + ((yy - height / 2) / (height / 3)) ** 2))
    base = rng.integers(60, 200, size=3)
    img = (base[None, None, :] * (0.5 + 0.5 * blob[..., None]) + rng.normal(0, 8, (height, width, 3))).clip(0, 255)
    ok, buf = cv2.imencode(".jpg", img.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


@dataclass
class Tally:
    """What the clients sent and saw, by kind; thread-safe."""

    sent: Counter[str] = field(default_factory=Counter)
    seen: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, status or error)
    missing_retry_after: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, outcome: str) -> None:
        with self.lock:
            self.sent[kind] += 1
            self.seen[(kind, outcome)] += 1


def raw_exchange(port: int, data: bytes, *, then: str, timeout: float = 60) -> str:
    """Send ``data`` on a fresh socket; ``then`` = "read" (the status line's code, or "closed"), "close" (hang up)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if then == "close":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset
            return "hung-up"
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        answer = b"".join(chunks)
    return answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1 ") else "closed"


def head(length: int, content_type: str = "image/jpeg") -> bytes:
    return (
        f"POST {CLASSIFY} HTTP/1.1\r\nHost: soak\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


class Soak:
    def __init__(self, server: Server, duration_s: float, rate: float, images: list[bytes]) -> None:
        self.server, self.duration_s, self.rate, self.images = server, duration_s, rate, images
        self.port = int(server.url.rsplit(":", 1)[1])
        self.tally = Tally()
        self.stop = threading.Event()

    # ---- the kinds of client -------------------------------------------------------------------
    def good(self, client: httpx.Client, n: int) -> None:
        resp = client.post(CLASSIFY, content=self.images[n % len(self.images)], headers={"content-type": "image/jpeg"})
        if resp.status_code == 503 and "retry-after" not in resp.headers:
            self.tally.missing_retry_after += 1
        self.tally.record("good", str(resp.status_code))

    def bad(self, client: httpx.Client, n: int) -> None:
        image = self.images[n % len(self.images)]
        kinds: list[tuple[str, Callable[[], httpx.Response]]] = [
            ("undecodable", lambda: client.post(CLASSIFY, content=b"not an image" * 50, headers={"content-type": "image/jpeg"})),
            ("truncated", lambda: client.post(CLASSIFY, content=image[: len(image) // 3], headers={"content-type": "image/jpeg"})),
            ("unsupported", lambda: client.post(CLASSIFY, content=image, headers={"content-type": "image/gif"})),
            ("no-image-field", lambda: client.post(CLASSIFY, files={"other": ("x.jpg", image, "image/jpeg")})),
            ("empty", lambda: client.post(CLASSIFY, content=b"", headers={"content-type": "image/jpeg"})),
        ]  # fmt: skip
        kind, call = kinds[n % len(kinds)]
        self.tally.record(kind, str(call().status_code))

    def oversize(self, client: httpx.Client, n: int) -> None:
        if n % 2:  # declared: refused before a byte of the body is read
            self.tally.record("oversize-declared", raw_exchange(self.port, head(MAX_UPLOAD + 1), then="read"))
            return

        def stream() -> Any:  # chunked, no length: refused once it passes the limit while streaming
            for _ in range(MAX_UPLOAD // 65536 + 2):
                yield b"\0" * 65536

        try:
            status = str(client.post(CLASSIFY, content=stream(), headers={"content-type": "image/jpeg"}).status_code)
        except httpx.TransportError as exc:  # the server may close before the client has sent everything
            status = type(exc).__name__
        self.tally.record("oversize-streamed", status)

    def hang_ups(self, _: httpx.Client, n: int) -> None:
        image = self.images[n % len(self.images)]
        if n % 2:  # mid-upload: half the body, then a reset
            self.tally.record(
                "gone-mid-upload", raw_exchange(self.port, head(len(image)) + image[: len(image) // 2], then="close")
            )
        else:  # mid-answer: the whole request, then a reset before the answer comes
            self.tally.record("gone-mid-answer", raw_exchange(self.port, head(len(image)) + image, then="close"))  # fmt: skip

    def slow(self, _: httpx.Client, n: int) -> None:
        """Eight at once: uploads that send two bytes and go quiet, and heads that never end."""

        def one(i: int) -> None:
            if i % 4 == 3:
                partial = f"POST {CLASSIFY} HTTP/1.1\r\nHost: soak\r\n".encode()
                self.tally.record("slow-head", raw_exchange(self.port, partial, then="read"))
            else:
                self.tally.record("slow-upload", raw_exchange(self.port, head(50_000) + b"\xff\xd8", then="read"))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    # ---- driving ---------------------------------------------------------------------------------
    def loop(self, work: Callable[[httpx.Client, int], None], period_s: float) -> None:
        with httpx.Client(base_url=self.server.url, timeout=60) as client:
            n, next_at = 0, time.monotonic()
            while not self.stop.is_set():
                try:
                    work(client, n)
                except httpx.TransportError as exc:
                    self.tally.record(work.__name__, type(exc).__name__)
                n += 1
                next_at += period_s
                self.stop.wait(max(0.0, next_at - time.monotonic()))

    def run(self) -> None:
        plan = [
            (self.good, 1 / self.rate),
            (self.bad, 0.5),
            (self.oversize, 1.0),
            (self.hang_ups, 0.25),
            (self.slow, 1.0),
        ]
        threads = [threading.Thread(target=self.loop, args=plan_item, daemon=True) for plan_item in plan]
        for t in threads:
            t.start()
        self.stop.wait(self.duration_s)
        self.stop.set()
        for t in threads:
            t.join(120)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def idle_fds(server: Server, within: float = 30) -> int:
    """Open fds once every client has gone: no connection open but the scrape's own, then without it."""
    until = time.monotonic() + within
    while time.monotonic() < until:
        samples = scrape(server.url)
        if samples.get(("lesionserve_open_connections", ()), 0) <= 1 and not samples.get(
            ("lesionserve_uploads_reading", ())
        ):
            time.sleep(0.5)  # the scrape's socket closes
            return fd_count(server.proc.pid)
        time.sleep(0.2)
    return fd_count(server.proc.pid)


def sigterm_under_traffic(server: Server, images: list[bytes], clients: int = 6) -> tuple[int | None, Counter[str]]:
    """SIGTERM while ``clients`` keep uploading; the exit code and what they saw.

    Each client sends until it is refused: an admitted request must be answered 200, a refused one 503 with
    ``Retry-After`` (draining) or, once the listener has closed, a refused connection. A request cut off
    after it was sent (a read error) would be a lost one.
    """
    seen: Counter[str] = Counter()
    lock = threading.Lock()
    first_answers = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            waited = False
            for n in range(10_000):
                try:
                    resp = http.post(
                        CLASSIFY, content=images[(i + n) % len(images)], headers={"content-type": "image/jpeg"}
                    )
                    outcome = str(resp.status_code)
                    if resp.status_code == 503 and "retry-after" not in resp.headers:
                        outcome = "503-without-retry-after"
                except httpx.ConnectError:
                    outcome = "refused-connection"
                except httpx.TransportError as exc:
                    outcome = f"cut-off-{type(exc).__name__}"
                with lock:
                    seen[outcome] += 1
                if not waited:
                    waited = True
                    first_answers.wait(60)
                if outcome != "200":
                    return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    first_answers.wait(60)  # every client has had one answer: traffic is flowing
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    return server.proc.wait(60), seen


def statuses(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, int]:
    out: dict[str, int] = {}
    for (name, labels), value in samples.items():
        d = dict(labels)
        if name == "lesionserve_requests_total" and d.get("route") == CLASSIFY and value:
            out[d["status"]] = out.get(d["status"], 0) + int(value)
    return out


def check(
    report: dict[str, Any],
    tally: Tally,
    samples: dict[Any, float],
    log_text: str,
    audit_lines: list[dict[str, Any]],
    rss_bound_mb: float,
) -> list[str]:
    """The soak's assertions; each failure is one line."""
    failures = []
    seen = tally.seen
    good_ok = seen[("good", "200")]
    good_other = {k[1]: v for k, v in seen.items() if k[0] == "good" and k[1] not in ("200", "503", "504")}
    if good_other:
        failures.append(f"good requests answered otherwise than 200/503/504: {good_other}")
    if tally.missing_retry_after:
        failures.append(f"{tally.missing_retry_after} 503s without Retry-After")
    server = statuses(samples)
    if server.get("500"):
        failures.append(f"{server['500']} requests answered 500")
    bad_lines = [
        line
        for line in log_text.splitlines()
        if '"level": "ERROR"' in line or "Traceback" in line or "unhandled error" in line
    ]
    if bad_lines:
        failures.append(f"{len(bad_lines)} error lines in the server log, e.g. {bad_lines[0][:300]}")
    expected = {
        "undecodable": "400", "truncated": "400", "unsupported": "415", "no-image-field": "400", "empty": "400",
        "oversize-declared": "413", "oversize-streamed": "413", "slow-upload": "408", "slow-head": "408",
    }  # fmt: skip
    for kind, status in expected.items():
        wrong = {k[1]: v for k, v in seen.items() if k[0] == kind and k[1] != status}
        if wrong:
            failures.append(f"{kind}: expected {status} every time, also saw {wrong}")
    # the metrics add up to what was sent
    gone_upload = samples.get(("lesionserve_client_disconnects_total", (("stage", "upload"),)), 0)
    gone_processing = samples.get(("lesionserve_client_disconnects_total", (("stage", "processing"),)), 0)
    mid_answer, mid_upload = tally.sent["gone-mid-answer"], tally.sent["gone-mid-upload"]
    want = {
        "200": good_ok + mid_answer - gone_processing,
        "400": sum(tally.sent[k] for k in ("undecodable", "truncated", "no-image-field", "empty")),
        "408": tally.sent["slow-upload"],
        "413": tally.sent["oversize-declared"] + tally.sent["oversize-streamed"],
        "415": tally.sent["unsupported"],
        "499": mid_upload + gone_processing,
    }
    for code in ("503", "504"):
        want[code] = seen[("good", code)]
    got = {k: server.get(k, 0) for k in want}
    if got != {k: int(v) for k, v in want.items()} or set(server) - set(want):
        failures.append(f"server statuses {server} do not add up to what was sent {want}")
    if gone_upload != mid_upload:
        failures.append(f"{mid_upload} clients hung up mid-upload; the server counted {gone_upload}")
    header_timeouts = samples.get(("lesionserve_rejections_total", (("reason", "header_timeout"),)), 0)
    if header_timeouts != tally.sent["slow-head"]:
        failures.append(
            f"{tally.sent['slow-head']} heads never ended; the server counted {header_timeouts} header timeouts"
        )
    answered_in_drain = sum(v for k, v in report.get("sigterm_under_traffic", {}).items() if k in ("200", "503"))
    if len(audit_lines) != sum(server.values()) + answered_in_drain:
        failures.append(
            f"{len(audit_lines)} audit lines for {sum(server.values()) + answered_in_drain} classify requests"
        )
    closed = [a for a in audit_lines if a["outcome"]["status"] == 499]
    if any(a["outcome"]["problem"] != "https://lesionserve.dev/problems/client-closed" for a in closed):
        failures.append("a 499 audit line does not say the client closed")
    if report["rss_growth_mb"] > rss_bound_mb:
        failures.append(f"RSS grew {report['rss_growth_mb']} MB (bound {rss_bound_mb})")
    if report["fds_end"] > report["fds_baseline"]:
        failures.append(f"{report['fds_end'] - report['fds_baseline']} file descriptors more than at the start")
    if report["exit_code"] != 0:
        failures.append(f"SIGTERM: exit code {report['exit_code']}")
    lost = {
        k: v
        for k, v in report.get("sigterm_under_traffic", {}).items()
        if k not in ("200", "503", "refused-connection")
    }
    if lost:
        failures.append(f"SIGTERM under traffic: requests neither answered nor cleanly refused: {lost}")
    return failures


def soak(
    model: Path, duration_s: float, rate: float, rss_bound_mb: float, workdir: Path, **settings: str
) -> dict[str, Any]:
    """Run the soak; the report (``report["failures"]`` empty when every assertion held)."""
    audit = workdir / "audit.jsonl"
    log = workdir / "server.log"
    env = {
        "providers": "CPUExecutionProvider", "log_format": "json", "audit_log": str(audit),
        "max_upload_bytes": str(MAX_UPLOAD), "body_rate_grace_s": "1", "header_timeout_s": "2",
        "shutdown_grace_s": "20", **settings,
    }  # fmt: skip
    server = Server.service(model, log, **env)
    try:
        server.wait_ready()
        images = [jpeg(seed) for seed in range(16)]
        fds_baseline = idle_fds(server)
        soak = Soak(server, duration_s, rate, images)
        sampler_stop = threading.Event()
        rss: list[tuple[float, float]] = []

        def sample_rss() -> None:
            start = time.monotonic()
            while not sampler_stop.wait(1.0):
                rss.append((time.monotonic() - start, server.rss_mb()))

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        started = time.monotonic()
        soak.run()
        took = time.monotonic() - started
        sampler_stop.set()
        sampler.join()
        fds_end = idle_fds(server)
        samples = scrape(server.url)
        quarter = [mb for t, mb in rss if t >= took / 4] or [server.rss_mb()]
        rss_growth = round(max(quarter) - quarter[0], 1)
        pid = server.proc.pid
        exit_code, drain_seen = sigterm_under_traffic(server, images)
    finally:
        server.stop()
    log_text = log.read_text()
    audit_lines = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
    skipped = samples.get(("lesionserve_inference_skipped_total", (("reason", "client_closed"),)), 0)
    gone_processing = samples.get(("lesionserve_client_disconnects_total", (("stage", "processing"),)), 0)
    report: dict[str, Any] = {
        "pid": pid, "duration_s": round(took, 1), "sent": dict(soak.tally.sent),
        "seen": {f"{k} {s}": v for (k, s), v in sorted(soak.tally.seen.items())},
        "server_statuses": statuses(samples),
        "hung_up_after_upload": int(gone_processing), "queued_images_skipped": int(skipped),
        "rss_mb_start": rss[0][1] if rss else None, "rss_mb_end": rss[-1][1] if rss else None,
        "rss_growth_mb": rss_growth, "fds_baseline": fds_baseline, "fds_end": fds_end, "exit_code": exit_code,
        "drained": "drained: every admitted request was answered" in log_text, "sigterm_under_traffic": dict(drain_seen),
    }  # fmt: skip
    report["failures"] = check(report, soak.tally, samples, log_text, audit_lines, rss_bound_mb)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/reference.onnx"))
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of mixed traffic (default 60)")
    parser.add_argument("--rate", type=float, default=5.0, help="good requests per second (default 5)")
    parser.add_argument("--rss-bound-mb", type=float, default=64.0, help="allowed RSS growth after the first quarter")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    parser.add_argument("--workdir", type=Path, help="server log and audit trail (default: a temporary folder)")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        print(f"soak: model {args.model} not found (make it, or pass --model)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="lesionserve-soak-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        report = soak(args.model, args.duration, args.rate, args.rss_bound_mb, workdir)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
