"""python -m train.bench: ResNet and EfficientNet-Lite throughput side by side."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TEST_DATA
from train.bench import main


def test_bench_measures_each_architecture_in_turn(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--data", str(TEST_DATA / "isic"), "--arch", "resnet18,efficientnet_lite0", "--img-size", "32",
            "--batch-size", "4", "--images", "8", "--steps", "1", "--rounds", "1"]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["arch"] for r in out] == ["resnet18", "efficientnet_lite0"]
    assert all(r["bare_images_per_s"] > 0 and r["pipeline_images_per_s"] > 0 for r in out)


def test_compare_times_the_old_and_each_new_path(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--compare", "--data", str(TEST_DATA / "isic"), "--arch", "efficientnet_lite0", "--img-size", "32",
            "--batch-size", "4", "--images", "8", "--epochs", "2", "--no-progress",
            "--variant", "channels_last=1", "--variant", "channels_last=1,frozen_blocks=6,cache_views=2,"
            "progressive_start_size=24,progressive_epochs=1"]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["rows"]
    assert [r["path"] for r in rows] == ["old", "new1", "new2"]
    assert rows[0]["config"]["channels_last"] is False and rows[0]["config"]["frozen_blocks"] == 0
    assert rows[2]["config"]["cache_views"] == 2 and rows[2]["prepare_s"] > 0  # its cache builds are timed
    assert all(r["images_per_s"] > 0 for r in rows) and rows[0]["speedup"] == 1.0
    assert len(out["load_average_start"]) == 3


def test_compare_refuses_an_unknown_variant_key() -> None:
    with pytest.raises(ValueError, match="--variant: 'frozen=6'"):
        main(["--compare", "--data", str(TEST_DATA / "isic"), "--variant", "frozen=6"])
