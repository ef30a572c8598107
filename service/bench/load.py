"""Closed-loop HTTP load, server processes and /metrics scraping for the bench."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    seconds: float
    latencies_ms: list[float]
    statuses: dict[str, int]
    batch_hist: dict[str, float] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))

    def summary(self) -> dict[str, object]:
        return {
            "concurrency": self.concurrency, "requests": self.requests, "seconds": round(self.seconds, 2),
            "throughput_rps": round(self.throughput, 2), "p50_ms": round(self.pct(50), 1),
            "p99_ms": round(self.pct(99), 1), "statuses": self.statuses, "batch_hist": self.batch_hist,
        }  # fmt: skip


async def _drive(url: str, images: list[bytes], concurrency: int, requests: int, path: str) -> LoadResult:
    counter = iter(range(requests))
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            for i in counter:
                start = time.perf_counter()
                try:
                    resp = await client.post(
                        path, content=images[i % len(images)], headers={"content-type": "image/jpeg"}
                    )
                    key = str(resp.status_code)
                except httpx.TransportError as exc:
                    key = type(exc).__name__
                latencies.append((time.perf_counter() - start) * 1000)
                statuses[key] = statuses.get(key, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return LoadResult(concurrency, requests, seconds, latencies, statuses)


def run_load(url: str, images: list[bytes], concurrency: int, requests: int, path: str = "/v1/classify") -> LoadResult:
    """``requests`` POSTs to ``path`` from ``concurrency`` closed-loop clients (each waits for its answer)."""
    before = scrape_batches(url)
    result = asyncio.run(_drive(url, images, concurrency, requests, path))
    result.batch_hist = batch_histogram(before, scrape_batches(url))
    return result


def scrape_batches(url: str) -> dict[str, float]:
    """Cumulative ``lesionserve_batch_size`` buckets (empty for servers without the metric)."""
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("lesionserve_batch_size_bucket") or line.startswith("lesionserve_batch_size_count"):
            name, value = line.rsplit(" ", 1)
            label = name.split('le="')[1].rstrip('"}') if "le=" in name else "count"
            out[label] = float(value)
    return out


def batch_histogram(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-bucket batch counts between two scrapes: ``{"1": n, "2": n, "3-4": n, "5-8": n, ...}``."""
    if not after:
        return {}
    edges = sorted((float(k), k) for k in after if k not in ("count", "+Inf"))
    hist, prev_edge, prev_cum = {}, 0.0, 0.0
    for edge, key in edges:
        cum = after[key] - before.get(key, 0.0)
        lo = int(prev_edge) + 1
        label = str(int(edge)) if lo == int(edge) else f"{lo}-{int(edge)}"
        if cum - prev_cum:
            hist[label] = cum - prev_cum
        prev_edge, prev_cum = edge, cum
    return hist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server subprocess (the service or the baseline) on a free local port."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self._log = log.open("w")
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @classmethod
    def service(cls, model: Path, log: Path, **settings: str) -> Server:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LESIONSERVE_")}
        env.update({f"LESIONSERVE_{k.upper()}": v for k, v in settings.items()})
        env.update(LESIONSERVE_MODEL_PATH=str(model), LESIONSERVE_HOST="127.0.0.1", LESIONSERVE_PORT=str(port))
        return cls([sys.executable, "-m", "service"], env, log, port)

    @classmethod
    def baseline(cls, model: Path, log: Path) -> Server:
        port = free_port()
        return cls([sys.executable, "-m", "service.bench.baseline", str(model), str(port)], dict(os.environ), log, port)

    def wait_ready(self, timeout: float = 120) -> None:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self._log.name}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout} s")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
