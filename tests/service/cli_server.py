"""A real server for the CLI and OIP v2 tests: ``python -m service.cli serve`` with flags, on a free port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import REPO
from tests.service.test_lifecycle import free_port


@contextmanager
def cli_server(model: Path, log: Path, *flags: str) -> Iterator[str]:
    """Serve ``model`` with ``lesionserve serve --model ... FLAGS``; yields the base URL; kills it after."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LESIONSERVE_")}
    env["LESIONSERVE_PORT"] = "1"  # overridden by --port below: flags win over variables
    args = ["--model", str(model), "--host", "127.0.0.1", "--port", str(port), "--providers", "CPUExecutionProvider",
            "--audit-log", "off", "--log-format", "text", *flags]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", *args], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        until = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < until, log.read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        yield base
    finally:
        proc.kill()
        proc.wait()
