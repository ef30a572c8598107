"""``python -m export.bench`` on a tiny backbone: the figures it reports are complete and consistent."""

from __future__ import annotations

import pytest

from export.bench import bench, to_markdown


@pytest.mark.slow
def test_bench_reports_every_point_and_halves_the_file_in_fp16() -> None:
    result = bench("resnet18", 32, ttas=("none", "flips"), batches=(1, 2), max_images=4, repeats=1, threads=1)
    points = [(r["tta"], r["batch"]) for r in result["rows"]]
    assert points == [("none", 1), ("none", 2), ("flips", 1)]  # flips x 2 = 8 images > max_images
    for r in result["rows"]:
        assert r["wrapped_ms"] > 0 and r["bare_ms"] > 0
        assert r["images_per_s"] == pytest.approx(r["batch"] * 1e3 / r["wrapped_ms"])
        assert r["overhead_pct"] == pytest.approx((r["wrapped_ms"] / r["bare_ms"] - 1) * 100)
    sizes = result["file_bytes"]
    assert 0.45 < sizes["none-fp16"] / sizes["none"] < 0.55
    assert "| flips | 4 | 1 |" in to_markdown(result)
