"""service.bench: the histogram arithmetic, and one short end-to-end run of the harness (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.bench.load import batch_histogram
from tests.conftest import REPO, TEST_DATA


def test_batch_histogram_differences_cumulative_buckets() -> None:
    before = {"1.0": 2, "2.0": 3, "4.0": 3, "8.0": 3, "+Inf": 3, "count": 3}
    after = {"1.0": 5, "2.0": 9, "4.0": 10, "8.0": 14, "+Inf": 14, "count": 14}
    assert batch_histogram(before, after) == {"1": 3, "2": 3, "3-4": 1, "5-8": 4}
    assert batch_histogram(before, {}) == {}


@pytest.mark.slow
def test_bench_runs_end_to_end(tmp_path: Path, tiny_onnx: Path) -> None:
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "service.bench", "--model", str(tiny_onnx), "--images", str(TEST_DATA / "isic" / "nevus"),
           "--workdir", str(tmp_path), "--repeats", "1", "--requests-c1", "5", "--requests-c16", "32",
           "--ceiling-seconds", "0.2", "--rss-requests", "50", "--rss-model", str(tiny_onnx), "--out", str(out),
           "--compare", str(tiny_onnx)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    names = {p["name"] for p in report["phases"]}
    assert names == {"service c1", "service c16", "baseline c1", "baseline c16", "compare c1", "compare c16"}
    assert report["compare_model"] == str(tiny_onnx) and len(report["compare_ceiling_img_s"]) == 1
    assert report["summary"]["compare / service throughput at c16"]["median"] > 0
    assert all(p["statuses"] == {"200": p["requests"]} for p in report["phases"])
    service_c16 = next(p for p in report["phases"] if p["name"] == "service c16")
    assert sum(service_c16["batch_hist"].values()) >= 1
    assert report["rss"]["requests"] == 50 and report["rss"]["after_requests_mb"] > 0
    assert set(report["ceiling_img_s"][0]) == {"1", "2", "4", "8"}


def test_ceiling_fills_batches_larger_than_the_image_folder(tiny_onnx: Path) -> None:
    from service.bench.__main__ import ceiling

    images = [p.read_bytes() for p in sorted((TEST_DATA / "isic" / "nevus").glob("*.jpg"))[:3]]
    out = ceiling(tiny_onnx, images, [1, 5], 0.05, "CPUExecutionProvider")
    assert set(out) == {"1", "5"} and all(v > 0 for v in out.values())


def test_bad_batches_are_refused_in_one_line(tmp_path: Path) -> None:
    for bad in ("1,x", "0,4"):
        cmd = [sys.executable, "-m", "service.bench", "--batches", bad, "--workdir", str(tmp_path)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "lesionserve bench: " in proc.stderr and "Traceback" not in proc.stderr
