"""export/ood.py, export/ood_eval.py, export/ood_set.py and the optional outputs of an exported file.

The exports use the tiny ResNet-18 checkpoints of conftest.py (32 px) and an ImageFolder built from the
committed CC0 ISIC images (rotated copies), with a split.json like ``python -m train`` writes.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from export.__main__ import main as export_main
from export.acquisition import ShiftPlan, shifted
from export.metadata import ExportError, read_metadata
from export.ood import OodConfig, choose_ood_threshold, fit_mahalanobis, labelled_part
from export.ood_eval import CARD_START
from export.ood_eval import main as ood_eval_main
from export.ood_set import GROUPS, ood_images
from export.parity import load_images
from service.contract import CamSpec, MetadataError, ModelMetadata, OodSpec
from service.inference import OnnxModel
from tests.export.conftest import CLASSES, ISIC, MakeCkpt
from tests.tiny_model import contract_metadata


def test_export_adds_ood_score_and_cam_outputs(ood_model: Path, lesion_folder: tuple[Path, Path]) -> None:
    sess = ort.InferenceSession(str(ood_model), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["probabilities", "ood_score", "cam"]
    data, _ = lesion_folder
    val = load_images(sorted(data.rglob("*.png"))[:5], 32)
    probs, score, cam = sess.run(None, {"image": val})
    assert probs.shape == (5, 2) and score.shape == (5,) and cam.shape == (5, 2, 1, 1)
    meta = read_metadata(ood_model)
    assert meta.ood is not None and meta.cam is not None
    assert meta.ood.method == "mahalanobis" and meta.cam.shape == [2, 1, 1] and meta.cam.head == "linear"
    assert meta.ood.fitted_on["training_images"] == 24 and meta.ood.fitted_on["validation_images"] == 8


def _val_paths(data: Path, split: Path) -> list[Path]:
    return list(labelled_part(OodConfig(data, split), CLASSES, "val").paths)  # the order the shift seeds follow


def test_threshold_covers_validation_images_and_their_acquisition_shifted_copies(
    ood_model: Path, lesion_folder: tuple[Path, Path]
) -> None:
    data, split = lesion_folder
    paths = _val_paths(data, split)
    plain = load_images(paths, 32)
    copies = [
        cv2.resize(c, (32, 32), interpolation=cv2.INTER_AREA)  # 48 px squares: the crop is the whole image
        for i, p in enumerate(paths)
        for c in shifted(np.ascontiguousarray(cv2.imread(str(p))[..., ::-1]), ShiftPlan(), i)
    ]
    sess = ort.InferenceSession(str(ood_model))
    scores = np.concatenate([sess.run(["ood_score"], {"image": x})[0] for x in (plain, np.stack(copies))])
    meta = read_metadata(ood_model)
    assert meta.ood is not None and len(scores) == 8 * (1 + ShiftPlan().copies)
    assert (scores <= meta.ood.threshold).mean() == pytest.approx(meta.ood.pass_rate) and meta.ood.pass_rate >= 0.95
    assert meta.ood.threshold == pytest.approx(float(np.sort(scores)[math.ceil(0.95 * 32) - 1]), rel=1e-5)
    assert meta.ood.fitted_on["acquisition_shifts"] == ShiftPlan().describe()


def test_ood_shifts_0_chooses_on_the_validation_images_alone(
    make_ckpt: MakeCkpt, lesion_folder: tuple[Path, Path], tmp_path: Path
) -> None:
    data, split = lesion_folder
    out = tmp_path / "plain-val.onnx"
    ckpt = make_ckpt("ood-r18", classes=CLASSES)
    argv = [str(ckpt), "--out", str(out), "--ood-data", str(data), "--ood-split", str(split), "--ood-shifts", "0"]
    assert export_main([*argv, "--no-cam"]) == 0
    scores = ort.InferenceSession(str(out)).run(["ood_score"], {"image": load_images(_val_paths(data, split), 32)})[0]
    meta = read_metadata(out)
    assert meta.ood is not None and "acquisition_shifts" not in meta.ood.fitted_on
    assert meta.ood.threshold == pytest.approx(float(np.max(scores)), rel=1e-5)  # 8 images: the 8th passes


def test_card_and_checks_cover_the_new_outputs(ood_model: Path) -> None:
    card = ood_model.with_suffix(".md").read_text()
    for text in ("ood_score: ORT vs PyTorch", "ood_score: dihedral, invariant", "cam: dihedral, map turns with"):
        assert text in card
    assert "## Out-of-distribution check" in card and "## Class activation map" in card


def test_service_loads_the_new_outputs(ood_model: Path) -> None:
    model = OnnxModel.load(ood_model, ["CPUExecutionProvider"])
    assert model.outputs == ("probabilities", "ood_score", "cam")
    out = model.run_outputs(np.zeros((3, 32, 32, 3), dtype=np.uint8))
    assert {k: v.shape for k, v in out.items()} == {"probabilities": (3, 2), "ood_score": (3,), "cam": (3, 2, 1, 1)}


def test_ood_eval_writes_the_card_section_once(
    ood_model: Path, lesion_folder: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, split = lesion_folder
    card = tmp_path / "card.md"
    card.write_text("# Model card\n")
    args = [str(ood_model), "--data", str(data), "--split", str(split), "--card", str(card), "--out", str(tmp_path)]
    assert ood_eval_main(args) == 0
    assert ood_eval_main(args) == 0
    text = card.read_text()
    assert text.count(CARD_START) == 1 and text.startswith("# Model card")
    assert "| **all OOD images** | 53 |" in capsys.readouterr().out
    m = json.loads((tmp_path / "ood_metrics.json").read_text())
    assert m["in_distribution"]["n"] == 16 and set(m["ood"]["groups"]) == set(GROUPS)
    assert 0.0 <= m["ood"]["auroc"] <= 1.0


def test_ood_eval_refuses_a_file_without_ood_score(
    tmp_path: Path, lesion_folder: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.tiny_model import make_tiny_onnx

    plain = make_tiny_onnx(tmp_path / "plain.onnx", classes=CLASSES)
    assert ood_eval_main([str(plain), "--data", str(lesion_folder[0])]) == 2
    assert "has no ood_score output" in capsys.readouterr().err


def test_energy_without_cam(make_ckpt: MakeCkpt, lesion_folder: tuple[Path, Path], tmp_path: Path) -> None:
    data, split = lesion_folder
    out = tmp_path / "energy.onnx"
    argv = [str(make_ckpt("ood-r18", classes=CLASSES)), "--out", str(out), "--tta", "none", "--no-cam"]
    assert export_main([*argv, "--ood-data", str(data), "--ood-split", str(split), "--ood-method", "energy"]) == 0
    assert [o.name for o in ort.InferenceSession(str(out)).get_outputs()] == ["probabilities", "ood_score"]
    meta = read_metadata(out)
    assert meta.cam is None and meta.ood is not None and meta.ood.method == "energy"
    assert "training_images" not in meta.ood.fitted_on


def test_no_cam_and_no_ood_is_the_plain_file(make_ckpt: MakeCkpt, tmp_path: Path) -> None:
    out = tmp_path / "plain.onnx"
    assert (
        export_main([str(make_ckpt("ood-r18", classes=CLASSES)), "--out", str(out), "--tta", "none", "--no-cam"]) == 0
    )
    assert [o.name for o in ort.InferenceSession(str(out)).get_outputs()] == ["probabilities"]
    meta = read_metadata(out)
    assert meta.ood is None and meta.cam is None
    assert "## Class activation map" not in out.with_suffix(".md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ood-data", "DATA"], "--ood-data needs --ood-split"),
        (["--ood-split", "SPLIT"], "--ood-split needs --ood-data"),
        (["--ood-data", "DATA", "--ood-split", "SPLIT", "--ood-method", "cosine"], "unknown --ood-method 'cosine'"),
        (["--ood-data", "DATA", "--ood-split", "SPLIT", "--ood-pass-rate", "1"], "--ood-pass-rate must be in"),
        (["--ood-data", "DATA", "--ood-split", "SPLIT", "--ood-fit-limit", "-1"], "--ood-fit-limit must be >= 0"),
        (["--ood-data", "DATA", "--ood-split", "MISSING"], "no such file"),
        (["--ood-data", "DATA", "--ood-split", "SPLIT", "--ood-shifts", "-1"], "--ood-shifts: acquisition copies"),
        (["--ood-data", "DATA", "--ood-split", "NOVAL"], "no images in part(s) val"),
        (["--ood-data", "DATA", "--ood-split", "NOTJSON"], "not a split.json"),
    ],
)
def test_ood_flag_errors_are_one_line_before_any_work(
    extra: list[str],
    message: str,
    lesion_folder: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, split = lesion_folder
    (tmp_path / "noval.json").write_text(json.dumps({"train": ["a"], "test": ["b"]}))
    (tmp_path / "bad.json").write_text("{not json")
    names = {"DATA": str(data), "SPLIT": str(split), "MISSING": str(tmp_path / "none.json")}
    names |= {"NOVAL": str(tmp_path / "noval.json"), "NOTJSON": str(tmp_path / "bad.json")}
    out = tmp_path / "x.onnx"
    assert export_main(["no-such.pt", "--out", str(out), *[names.get(a, a) for a in extra]]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_a_split_part_missing_from_the_data_is_an_export_error(
    make_ckpt: MakeCkpt, lesion_folder: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, _ = lesion_folder
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["nope"], "val": ["nope2"]}))
    ckpt = make_ckpt("ood-r18", classes=CLASSES)
    assert (
        export_main([str(ckpt), "--out", str(tmp_path / "x.onnx"), "--ood-data", str(data), "--ood-split", str(split)])
        == 1
    )
    assert "part 'train'" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()


def test_choose_ood_threshold() -> None:
    scores = np.arange(1, 101, dtype=np.float64)  # 1..100
    assert choose_ood_threshold(scores, 0.95) == (95.0, 0.95)
    assert choose_ood_threshold(np.array([3.0, 1.0, 2.0]), 0.5) == (2.0, pytest.approx(2 / 3))
    with pytest.raises(ExportError, match="finite"):
        choose_ood_threshold(np.array([1.0, np.nan]), 0.95)
    with pytest.raises(ExportError, match="finite"):
        choose_ood_threshold(np.array([]), 0.95)


def test_fit_mahalanobis_gives_the_distance_under_the_inverse_covariance() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5)) + 3.0
    labels = rng.integers(0, 2, 400)
    feats[labels == 1] += 4.0
    stats = fit_mahalanobis(feats, labels)
    from sklearn.covariance import LedoitWolf

    centred = feats - stats.means[labels]
    precision = np.linalg.inv(LedoitWolf(assume_centered=True).fit(centred).covariance_)
    x = rng.normal(size=(7, 5))
    expected = np.min([np.einsum("bf,fg,bg->b", x - m, precision, x - m) for m in stats.means], axis=0)
    got = (((x @ stats.whitening)[:, None] - (stats.means @ stats.whitening)[None]) ** 2).sum(-1).min(-1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(stats.means[1] - stats.means[0], 4.0, atol=0.5)
    with pytest.raises(ExportError, match="needs training images"):
        fit_mahalanobis(feats[:1], labels[:1])


def test_ood_config_validates(tmp_path: Path) -> None:
    split = tmp_path / "s.json"
    split.write_text(json.dumps({"val": ["a"]}))
    assert OodConfig(tmp_path, split, method="energy").pass_rate == 0.95  # energy needs no train part
    with pytest.raises(ExportError, match="part\\(s\\) train"):
        OodConfig(tmp_path, split, method="mahalanobis")


def test_ood_set_is_the_packaged_images() -> None:
    images = ood_images()
    assert len(images) == 53
    assert {o.group for o in images} == set(GROUPS)
    assert sum(o.group == GROUPS[2] for o in images) == 10
    for o in images:
        assert o.rgb.dtype == np.uint8 and o.rgb.ndim == 3 and o.rgb.shape[2] == 3, o.name
    scans = [o for o in images if o.group == GROUPS[2]]
    assert all(int(o.rgb.max()) >= 200 and int(o.rgb.min()) == 0 for o in scans)  # windowed to 8 bits


# --- metadata round trip (service/contract.py) --------------------------------------------------------


def _meta(**extras: object) -> ModelMetadata:
    return ModelMetadata.from_props(contract_metadata(CLASSES, 32, **extras))


def test_ood_and_cam_metadata_round_trip() -> None:
    ood = OodSpec(method="energy", threshold=-3.5, pass_rate=0.95, fitted_on={"validation_images": 8})
    meta = _meta(ood=ood, cam=CamSpec(shape=[2, 4, 4], head="mlp"))
    assert meta.ood == ood and meta.cam == CamSpec(shape=[2, 4, 4], head="mlp")
    assert ModelMetadata.from_props(meta.to_props()) == meta


def test_old_metadata_has_no_ood_or_cam() -> None:
    props = contract_metadata(CLASSES, 32)
    assert not any(k.endswith((".ood", ".cam")) for k in props)
    meta = ModelMetadata.from_props(props)
    assert meta.ood is None and meta.cam is None


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("ood", "{not json", "lesionserve.ood is not valid JSON"),
        ("ood", json.dumps({"method": "cosine", "threshold": 1, "pass_rate": 0.9}), "ood.method 'cosine'"),
        ("ood", json.dumps({"method": "energy", "threshold": "NaN", "pass_rate": 0.9}), "malformed lesionserve.ood"),
        ("ood", json.dumps({"method": "energy", "threshold": 1e999, "pass_rate": 0.9}), "finite"),
        ("ood", json.dumps({"method": "energy", "threshold": 1, "pass_rate": 0}), "pass_rate"),
        ("ood", json.dumps({"method": "energy"}), "malformed lesionserve.ood"),
        ("ood", json.dumps([1, 2]), "malformed lesionserve.ood"),
        ("cam", json.dumps({"shape": [2, 4]}), "cam.shape must be [K, h, w]"),
        ("cam", json.dumps({"shape": [3, 4, 4]}), "does not start with the 2 classes"),
        ("cam", json.dumps({"shape": [2, 4, 4], "output": "heat"}), "cam.output must be 'cam'"),
    ],
)
def test_malformed_ood_or_cam_metadata_is_refused(key: str, value: str, message: str) -> None:
    props = contract_metadata(CLASSES, 32)
    props[f"lesionserve.{key}"] = value
    with pytest.raises(MetadataError, match=message.replace("[", "\\[").replace("(", "\\(")):
        ModelMetadata.from_props(props, source="m.onnx")


def test_bench_outputs_times_and_profiles_the_optional_outputs(
    ood_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from export.bench_outputs import main as bench_main

    assert bench_main([str(ood_model), "--batches", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| + ood_score + cam | 1 |" in out and out.rstrip().endswith("| 12 |")  # score 4 + maps 2 x 1 x 1 x 4
    assert bench_main([str(ood_model), "--batches", "2", "--repeats", "1", "--profile"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    shares = [float(c.strip().rstrip("%")) for c in row.strip("|").split("|")[1:]]
    assert row.startswith("| 2 |") and all(0 < v < 50 for v in shares)


def test_bench_outputs_needs_both_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from export.bench_outputs import main as bench_main
    from tests.tiny_model import make_tiny_onnx

    assert bench_main([str(make_tiny_onnx(tmp_path / "plain.onnx"))]) == 2
    assert "lacks 'ood_score' or 'cam'" in capsys.readouterr().err


def test_int8_file_refits_the_ood_threshold_on_its_own_scores(
    ood_model: Path, lesion_folder: tuple[Path, Path], tmp_path: Path
) -> None:
    """INT8 features move the Mahalanobis scores: the INT8 file's threshold is refitted at the same pass rate."""
    from export.quantize import Calibration, Limits, load_calibration, quantize_file

    data, split = lesion_folder
    cal = Calibration(data, split, "val", images=4)
    out = quantize_file(ood_model, tmp_path / "ood-int8.onnx", cal, Limits(0.0, 1.0, 1.0, 1.0)).path
    fp32, int8 = read_metadata(ood_model), read_metadata(out)
    assert fp32.ood is not None and int8.ood is not None and int8.ood.method == fp32.ood.method
    refit = int8.ood.fitted_on["int8_refit"]
    assert (
        refit["fp32_threshold"] == fp32.ood.threshold
        and refit["images"] == 4
        and int8.ood.threshold != fp32.ood.threshold
    )
    _, verification, _ = load_calibration(cal, fp32)  # the 4 validation images the calibration did not see
    scores = ort.InferenceSession(str(out)).run(["ood_score"], {"image": verification})[0]
    k = math.ceil(fp32.ood.pass_rate * len(scores)) - 1  # the same rule as at the fp32 export
    assert int8.ood.threshold == pytest.approx(float(np.sort(scores)[k]), rel=1e-6)  # an INT8 score, not the fp32 one


def test_external_check_counts_the_real_images_flagged(
    make_ckpt: MakeCkpt, lesion_folder: tuple[Path, Path], tmp_path: Path
) -> None:
    """export.external reports the share of another source's dermoscopy that the file's OOD check flags."""
    from export.external import card_section, evaluate_external

    data, split = lesion_folder
    renamed = tmp_path / "lesions"
    for src, dst in (("melanoma", "mel"), ("nevus", "nv")):
        shutil.copytree(data / src, renamed / dst)
    out = tmp_path / "mn.onnx"
    ckpt = make_ckpt("ood-mel-nv", classes=["mel", "nv"])
    assert export_main([str(ckpt), "--out", str(out), "--ood-data", str(renamed), "--ood-split", str(split)]) == 0
    m = evaluate_external(out, ISIC)
    meta = read_metadata(out)
    assert meta.ood is not None
    paths = sorted((ISIC / "melanoma").glob("*.jpg")) + sorted((ISIC / "nevus").glob("*.jpg"))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (scores,) = sess.run(["ood_score"], {"image": load_images(paths, meta.input_size)})
    assert m["ood_flagged"] == pytest.approx(float((scores > meta.ood.threshold).mean()))
    assert f"{m['ood_flagged']:.1%} of these images" in card_section(m)
