"""Metadata built from checkpoints: member checks, defaults, HAM10000 facts, the weights hash."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from export.metadata import ExportError, build_metadata, check_members, member_metrics, read_metadata, weights_sha256
from service.contract import ModelMetadata
from tests.export.conftest import MakeCkpt
from tests.tiny_model import make_tiny_onnx
from train.checkpoint import load_checkpoint


def test_members_must_share_classes_not_input_size(make_ckpt: MakeCkpt) -> None:
    a = make_ckpt("a")
    two = make_ckpt("two", classes=["mel", "nv"])
    big = make_ckpt("big", size=40)
    ckpts = {p: load_checkpoint(p) for p in (a, two, big)}
    with pytest.raises(ExportError, match=rf"disagree on classes: {a} has .*, {two} has \['mel', 'nv'\]"):
        check_members([ckpts[a], ckpts[two]], [a, two])
    check_members([ckpts[a], ckpts[big]], [a, big])  # several sizes: the graph takes the largest
    assert build_metadata([ckpts[a], ckpts[big]], tta="none", name="m", version="1", weights_hash="").input_size == 40
    check_members([ckpts[a], ckpts[a]], [a, a])  # identical members are fine


def test_metadata_from_checkpoints_round_trips(make_ckpt: MakeCkpt) -> None:
    ckpt = load_checkpoint(make_ckpt("meta", temperature=1.7, metrics={"balanced_accuracy": 0.7}))
    meta = build_metadata([ckpt], tta="flips", name="m", version="1.2.3", weights_hash="ab" * 32, fp16=True)
    assert meta.malignant_classes == ["mel", "bcc", "akiec"]
    assert meta.class_names["mel"] == "Melanoma"
    assert meta.tta == ["identity", "hflip", "vflip", "rot180"]
    assert meta.temperature == [1.7] and meta.architecture == ["resnet18"] and meta.input_size == 32
    assert meta.preprocessing["backbone_dtype"] == "float16"
    assert meta.training_data["license"] == "CC BY-NC 4.0"
    assert "180161" in meta.training_data["citation"] and "1902.03368" in meta.training_data["citation"]
    assert meta.metrics == {"balanced_accuracy": 0.7} and meta.malignancy_threshold == 0.5
    assert meta.exported_at.endswith("Z")
    assert ModelMetadata.from_props(meta.to_props()) == meta


def test_threshold_and_malignant_classes_can_be_set(make_ckpt: MakeCkpt) -> None:
    ckpt = load_checkpoint(make_ckpt("thr", metrics={"malignancy_threshold": 0.3}))
    assert build_metadata([ckpt], tta="none", name="m", version="1", weights_hash="").malignancy_threshold == 0.3
    meta = build_metadata(
        [ckpt], tta="none", name="m", version="1", weights_hash="", malignancy_threshold=0.2, malignant_classes=["mel"]
    )
    assert meta.malignancy_threshold == 0.2 and meta.malignant_classes == ["mel"]


def test_ensemble_metrics_keep_members_and_their_mean(make_ckpt: MakeCkpt) -> None:
    a = load_checkpoint(make_ckpt("ma", metrics={"balanced_accuracy": 0.6, "note": "x"}))
    b = load_checkpoint(make_ckpt("mb", metrics={"balanced_accuracy": 0.8}))
    metrics = member_metrics([a, b])
    assert metrics["mean_of_members"] == {"balanced_accuracy": pytest.approx(0.7)}
    assert metrics["members"][0]["note"] == "x"


def test_a_checkpoints_own_test_split_is_not_shipped_as_test(make_ckpt: MakeCkpt) -> None:
    """A checkpoint alone on its training run's test split is another number than the exported file's held-out
    result (export.evaluate, the card): /v1/models shows it as ``training_run_test``, never as ``test``."""
    own = {"balanced_accuracy": 0.6949, "n": 1502}
    one = load_checkpoint(make_ckpt("rt1", metrics={"balanced_accuracy": 0.7, "test": own}))  # type: ignore[dict-item]
    two = load_checkpoint(make_ckpt("rt2", metrics={"balanced_accuracy": 0.8, "test": own}))  # type: ignore[dict-item]
    single = member_metrics([one])
    assert "test" not in single and single["training_run_test"] == own
    assert all("test" not in m and m["training_run_test"] == own for m in member_metrics([one, two])["members"])


def test_weights_hash_follows_the_weights(tmp_path: Path) -> None:
    model = onnx.load(make_tiny_onnx(tmp_path / "t.onnx"))
    before = weights_sha256(model)
    assert len(before) == 64 and weights_sha256(model) == before
    w = next(i for i in model.graph.initializer if i.name == "w")
    arr = numpy_helper.to_array(w).copy()
    arr[0, 0] += 1e-3
    w.CopyFrom(numpy_helper.from_array(arr, "w"))
    assert weights_sha256(model) != before


def test_read_metadata_needs_only_onnx(tiny_onnx: Path) -> None:
    assert read_metadata(tiny_onnx).name == "tiny-test-model"
