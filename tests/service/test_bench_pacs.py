"""service.bench.pacs: one short end-to-end run (a real service process with its SCP, and an SR sink)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_pacs_bench_runs_end_to_end(tmp_path: Path, tiny_onnx: Path) -> None:
    out = tmp_path / "pacs.json"
    cmd = [
        sys.executable,
        "-m",
        "service.bench.pacs",
        "--model",
        str(tiny_onnx),
        "-n",
        "3",
        "-c",
        "2",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    paths = {r["path"] for r in results}
    assert paths == {"REST /v1/classify, JSON", "REST /v1/classify, SR", "DIMSE C-STORE, SR back"}
    assert sorted({r["concurrency"] for r in results}) == [1, 2]
    for r in results:  # every instance answered, and answered with success (C-STORE: once its SR was in the outbox)
        assert (r["ok"], r["failures"]) == (3, []), r
        assert r["per_s"] > 0
        if r["path"].startswith("DIMSE"):  # and every SR then delivered, each with its delivery latency
            assert r["srs_delivered"] == 3 and 0 < r["delivery_p50_ms"] <= r["delivery_p99_ms"], r
    # the sink (the PACS side) got one SR per C-STORE: 3 at each concurrency plus the 6 of the warm-up
    assert "SRs received by the sink: 12;" in proc.stdout
