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
