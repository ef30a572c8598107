"""Config resolution (YAML then CLI), metrics and the guarded temperature fit, preprocessing parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from train.__main__ import build_parser
from train.config import CHOICES, TrainConfig, load_config
from train.metrics import compute_metrics, expected_calibration_error, fit_temperature, nll
from train.preprocess import center_crop_resize


def test_yaml_then_cli_overrides(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("data: /d\narch: resnet34\nepochs: 7\nloss: focal\n")
    args = vars(build_parser().parse_args(["--epochs", "3", "--no-augment", "--classes", "mel,nv"]))
    args.pop("config")
    cfg = load_config(y, args)
    assert (cfg.arch, cfg.epochs, cfg.loss, cfg.augment, cfg.classes) == ("resnet34", 3, "focal", False, ["mel", "nv"])
    saved = cfg.save(tmp_path / "out" / "config.yaml")
    assert load_config(saved) == cfg  # the saved config reproduces the run's config


@pytest.mark.parametrize(
    ("over", "msg"),
    [
        ({"arch": "vgg"}, "arch"),
        ({"loss": "hinge"}, "loss"),
        ({"img_size": 8}, "img_size"),
        ({"folds": 1}, "folds"),
        ({"loss": "focal", "label_smoothing": 0.1}, "label_smoothing"),
        ({"colour": 1}, "unknown field"),
    ],
)
def test_bad_config_is_refused(over: dict[str, object], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        load_config(None, {"data": "/d", **over})


def test_metrics_hand_example() -> None:
    classes = ["a", "b", "c"]
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2])
    logits = np.eye(3)[pred] * 5.0
    m = compute_metrics(logits, labels, classes)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    assert m["confusion_matrix"] == [[3, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert m["per_class"]["a"]["precision"] == pytest.approx(3 / 4) and m["per_class"]["c"]["support"] == 1
    assert m["top3_accuracy"] == 1.0 and m["top2_accuracy"] >= m["accuracy"]
    assert 0 < m["auc_macro"] <= 1


def test_absent_class_left_out_of_balanced_accuracy() -> None:
    m = compute_metrics(np.array([[3.0, 0, 0], [0, 3.0, 0]]), np.array([0, 1]), ["a", "b", "c"])
    assert m["balanced_accuracy"] == 1.0 and m["absent_classes"] == ["c"]


def test_temperature_fixes_overconfidence_and_is_guarded() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    logits = rng.normal(size=(400, 4))
    logits[np.arange(400), labels] += 1.0
    hot = logits * 6  # the same ranking, far too confident
    t = fit_temperature(hot, labels)
    assert 3 < t < 12 and nll(hot, labels, t) < nll(hot, labels)
    probs = np.exp(hot / t) / np.exp(hot / t).sum(1, keepdims=True)
    raw = np.exp(hot) / np.exp(hot).sum(1, keepdims=True)
    assert expected_calibration_error(probs, labels) < expected_calibration_error(raw, labels)
    # degenerate: one sample already perfectly fitted -> T hits the bound, NLL cannot rise, T > 0
    t2 = fit_temperature(np.array([[10.0, -10.0]]), np.array([0]))
    assert t2 > 0 and nll(np.array([[10.0, -10.0]]), np.array([0]), t2) <= nll(np.array([[10.0, -10.0]]), np.array([0]))


def test_center_crop_resize_takes_the_centre() -> None:
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 10:50] = 200  # the centred 40x40 square
    out = center_crop_resize(img, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8 and (out == 200).all()
    with pytest.raises(ValueError, match="RGB"):
        center_crop_resize(np.zeros((5, 5), np.uint8), 4)


def test_preprocessing_identical_to_service() -> None:
    imaging = pytest.importorskip("service.imaging", reason="service/imaging.py not importable")
    if not hasattr(imaging, "center_crop_resize"):
        pytest.skip("service.imaging has no center_crop_resize yet")
    rng = np.random.default_rng(0)
    for h, w, s in [(450, 600, 224), (150, 200, 96), (301, 299, 64), (50, 50, 80)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert np.array_equal(center_crop_resize(img, s), imaging.center_crop_resize(img, s))


def test_help_lists_every_choice_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m train --help` names the allowed values of each fixed-set field and every default."""
    help_text = " ".join(build_parser().format_help().split())  # argparse wraps lines anywhere
    for name, choices in CHOICES.items():
        assert "{" + ",".join(choices) + "}" in help_text.replace(" ", ""), name
    defaults = TrainConfig()
    for name in ("arch", "loss", "epochs", "img_size", "lr", "out"):
        assert f"(default {getattr(defaults, name)!r})" in help_text, name
    assert "(default True)" in help_text  # booleans too (--augment)
    assert "square training size S" in help_text  # the field's own comment in train/config.py
