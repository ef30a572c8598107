"""export/acquisition.py (the shifted copies) and ``python -m export.ood_refit`` (a threshold chosen again in place).

Uses the tiny OOD export and the lesion ImageFolder of test_ood.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.acquisition import SHIFTS, ShiftPlan, shifted
from export.metadata import read_metadata
from export.ood import OodConfig, validation_scores
from export.ood_refit import main as refit_main
from tests.export.conftest import CLASSES
from tests.tiny_model import make_tiny_onnx

IMG = np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)


def test_shifted_copies_are_deterministic_per_image_and_differ_from_the_original() -> None:
    plan = ShiftPlan(copies=4)
    a, b = shifted(IMG, plan, 7), shifted(IMG, plan, 7)
    assert len(a) == 4 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(x.shape == IMG.shape and x.dtype == np.uint8 for x in a)
    assert all(not np.array_equal(x, IMG) for x in a)
    assert not all(np.array_equal(x, y) for x, y in zip(a, shifted(IMG, plan, 8), strict=True))  # another image
    assert shifted(IMG, ShiftPlan(copies=0), 0) == []


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_every_shift_keeps_the_image_shape_and_changes_it(name: str) -> None:
    out = SHIFTS[name](IMG, np.random.default_rng(0))
    assert out.shape == IMG.shape and out.dtype == np.uint8 and not np.array_equal(out, IMG)


def test_bad_plans_and_images_are_refused() -> None:
    with pytest.raises(ValueError, match="copies must be >= 0"):
        ShiftPlan(copies=-1)
    with pytest.raises(ValueError, match="shifts per copy"):
        ShiftPlan(per_copy=len(SHIFTS) + 1)
    with pytest.raises(ValueError, match="uint8 image"):
        shifted(IMG[..., 0], ShiftPlan(), 0)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_refit_rewrites_only_the_threshold(ood_model: Path, lesion_folder: tuple[Path, Path], tmp_path: Path) -> None:
    data, split = lesion_folder
    model = Path(shutil.copy(ood_model, tmp_path / "m.onnx"))
    card = Path(shutil.copy(ood_model.with_suffix(".md"), tmp_path / "m.md"))
    before = read_metadata(model)
    assert before.ood is not None
    assert refit_main([str(model), "--data", str(data), "--split", str(split), "--shifts", "0"]) == 0
    after = read_metadata(model)
    assert after.ood is not None
    # The card follows: its OOD section names the new threshold and the old one; the rest is as it was.
    old_card, new_card = ood_model.with_suffix(".md").read_text(), card.read_text()
    assert f"above **{after.ood.threshold:.6g}**" in new_card and f"it was {before.ood.threshold:.6g}" in new_card
    assert f"above **{before.ood.threshold:.6g}**" not in new_card
    head = "## Out-of-distribution check"
    assert new_card.split(head)[0] == old_card.split(head)[0]
    assert new_card.split(head)[1].split("\n## ", 1)[1] == old_card.split(head)[1].split("\n## ", 1)[1]
    # The threshold is chosen on the 8 validation images alone now: the largest of their scores.
    cfg = OodConfig(data, split, "mahalanobis", 0.95, shifts=ShiftPlan(copies=0))
    scores, n_val = validation_scores(model, cfg, CLASSES, 32)
    assert n_val == 8 and after.ood.threshold == pytest.approx(float(np.max(scores)), rel=1e-6)
    assert after.ood.fitted_on["refit"]["previous_threshold"] == before.ood.threshold
    assert "acquisition_shifts" not in after.ood.fitted_on
    # Nothing but the metadata changed: the same graph, weights hash and answers.
    old, new = onnx.load(str(ood_model)), onnx.load(str(model))
    assert old.graph.SerializeToString() == new.graph.SerializeToString()
    assert after.weights_sha256 == before.weights_sha256 and after.classes == before.classes
    assert (after.name, after.version, after.malignancy_threshold) == (
        before.name,
        before.version,
        before.malignancy_threshold,
    )
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    run = [ort.InferenceSession(str(p)).run(None, {"image": x}) for p in (ood_model, model)]
    assert all(np.array_equal(a, b) for a, b in zip(*run, strict=True))


def test_refit_with_shifts_gives_the_exports_threshold(
    ood_model: Path, lesion_folder: tuple[Path, Path], tmp_path: Path
) -> None:
    """The export (default shifts) and a refit with the same plan choose the same threshold: one code path."""
    data, split = lesion_folder
    out = tmp_path / "again.onnx"
    assert refit_main([str(ood_model), "--data", str(data), "--split", str(split), "--out", str(out)]) == 0
    exported, refitted = read_metadata(ood_model).ood, read_metadata(out).ood
    assert exported is not None and refitted is not None
    assert refitted.threshold == pytest.approx(exported.threshold, rel=1e-6)
    assert refitted.fitted_on["acquisition_shifts"] == ShiftPlan().describe()
    plain_pass = refitted.fitted_on["refit"]["validation_pass_rate_unshifted"]
    assert 0 < plain_pass <= 1 and refitted.pass_rate >= 0.95
    k = math.ceil(0.95 * 8 * (1 + ShiftPlan().copies)) - 1
    scores, _ = validation_scores(ood_model, OodConfig(data, split), CLASSES, 32)
    assert refitted.threshold == pytest.approx(float(np.sort(scores)[k]), rel=1e-6)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("plain", "has no ood_score output"),
        ("notonnx", "not a lesionserve model"),
        ("missing", "no such file"),
        ("badsplit", "no images in part(s) val"),
        ("shifts", "--shifts: acquisition copies"),
        ("passrate", "--ood-pass-rate must be in"),
    ],
)
def test_refit_errors_are_one_line_and_leave_the_file_as_it_was(
    case: str,
    message: str,
    ood_model: Path,
    lesion_folder: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, split = lesion_folder
    model = Path(shutil.copy(ood_model, tmp_path / "m.onnx"))
    extra: list[str] = []
    if case == "plain":
        model = make_tiny_onnx(tmp_path / "plain.onnx")
    elif case == "notonnx":
        model.write_text("not a model")
    elif case == "missing":
        model = tmp_path / "none.onnx"
    elif case == "badsplit":
        split = tmp_path / "noval.json"
        split.write_text(json.dumps({"train": ["a"]}))
    elif case == "shifts":
        extra = ["--shifts", "-2"]
    else:
        extra = ["--pass-rate", "1.5"]
    before = _sha(model) if model.exists() else None
    assert refit_main([str(model), "--data", str(data), "--split", str(split), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert (_sha(model) if model.exists() else None) == before
    assert not list(tmp_path.glob("*.partial"))
