"""export.evaluate: metrics of an exported file and the malignancy operating point."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.evaluate import choose_threshold, evaluate_onnx, main, operating_point
from tests.conftest import TEST_DATA
from tests.tiny_model import contract_metadata, make_tiny_onnx


def test_operating_point_counts_by_hand() -> None:
    scores = np.array([0.9, 0.8, 0.4, 0.3, 0.2, 0.1])
    positive = np.array([True, False, True, False, False, True])
    op = operating_point(scores, positive, 0.35)  # flags 0.9, 0.8, 0.4
    assert op["sensitivity"] == pytest.approx(2 / 3)  # tp 2 of 3 positives
    assert op["specificity"] == pytest.approx(2 / 3)  # tn 0.3, 0.2 of 3 negatives
    assert op["ppv"] == pytest.approx(2 / 3) and op["npv"] == pytest.approx(2 / 3)
    assert op["positives"] == 3 and op["negatives"] == 3


def test_choose_threshold_is_the_highest_that_reaches_the_target() -> None:
    scores = np.array([0.95, 0.7, 0.6, 0.5, 0.1, 0.05])
    positive = np.array([True, True, False, True, True, False])
    t = choose_threshold(scores, positive, 0.75)  # 3 of 4 positives: 0.95, 0.7, 0.5
    assert t == pytest.approx(0.5)
    assert operating_point(scores, positive, t)["sensitivity"] >= 0.75
    assert operating_point(scores, positive, t + 1e-9)["sensitivity"] < 0.75
    with pytest.raises(ValueError, match="no malignant"):
        choose_threshold(scores, np.zeros(6, dtype=bool), 0.9)


def test_evaluate_onnx_on_real_images(tmp_path: Path) -> None:
    classes = ["melanoma", "nevus"]
    model = make_tiny_onnx(
        tmp_path / "m.onnx", size=32, classes=classes,
        metadata=contract_metadata(classes, 32, malignant_classes=["melanoma"]),
    )  # fmt: skip
    m = evaluate_onnx(model, TEST_DATA / "isic", out=tmp_path / "eval")
    assert m["n"] == 12 and sum(map(sum, m["confusion_matrix"])) == 12
    assert m["malignancy"]["positives"] == 6 and m["malignancy"]["negatives"] == 6
    for f in ("metrics.json", "confusion_matrix.png", "roc.png", "reliability.png"):
        assert (tmp_path / "eval" / f).stat().st_size > 0
    lo, hi = m["ci95"]["balanced_accuracy"]
    assert lo <= m["balanced_accuracy"] <= hi and set(m["ci95"]["recall"]) == set(classes)


def test_cli_refuses_unknown_split_part(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_tiny_onnx(tmp_path / "m.onnx", size=32, classes=["melanoma", "nevus"],
                           metadata=contract_metadata(["melanoma", "nevus"], 32))  # fmt: skip
    split = tmp_path / "split.json"
    split.write_text('{"train": [], "val": []}')
    assert main([str(model), "--data", str(TEST_DATA / "isic"), "--split", str(split), "--part", "test"]) == 2
    assert "no part 'test'" in capsys.readouterr().err


def test_card_section_is_inserted_once_and_replaced(tmp_path: Path) -> None:
    from export.evaluate import card_section, update_card

    classes = ["melanoma", "nevus"]
    model = make_tiny_onnx(tmp_path / "m.onnx", size=32, classes=classes,
                           metadata=contract_metadata(classes, 32, malignant_classes=["melanoma"]))  # fmt: skip
    m = evaluate_onnx(model, TEST_DATA / "isic")
    card = tmp_path / "m.md"
    card.write_text("# Model card\n\nintro\n")
    update_card(card, card_section(m, classes, {"roc": "eval/roc.png"}))
    update_card(card, card_section(m, classes, {"roc": "eval/roc.png"}))
    text = card.read_text()
    assert text.startswith("# Model card\n\nintro\n")
    assert text.count("## Held-out evaluation of this file") == 1
    assert f"| {m['balanced_accuracy']:.4f} |" in text and "![roc](eval/roc.png)" in text
    assert "95% intervals (lesion-clustered bootstrap" in text and "| recall 95% CI |" in text
