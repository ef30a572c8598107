"""End-to-end exports of tiny checkpoints: the file follows the contract and the checks hold (and can fail)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.metadata import read_metadata, weights_sha256
from export.onnx_export import ExportResult, build_module, export_checkpoints
from export.parity import NHWC_SYMMETRIES, VerificationError, load_images, torch_probs, verify
from service.contract import INPUT_NAME, OUTPUT_NAME, TTA_VIEWS, ModelMetadata
from tests.export.conftest import SIZE, MakeCkpt
from train.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def dihedral(make_ckpt: MakeCkpt, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    ckpt = make_ckpt("single", temperature=1.5)
    out = tmp_path_factory.mktemp("out") / "derm.onnx"
    return export_checkpoints([ckpt], out, tta="dihedral", name="derm-test", version="2.0.0")


@pytest.fixture(scope="module")
def images(isic_images: list[Path]) -> np.ndarray:
    return load_images(isic_images, SIZE)


def test_file_follows_the_contract(dihedral: ExportResult) -> None:
    model = onnx.load(str(dihedral.path))
    (inp,), out = model.graph.input, model.graph.output[0]  # probabilities first; optional cam/ood_score after
    assert (inp.name, inp.type.tensor_type.elem_type) == (INPUT_NAME, onnx.TensorProto.UINT8)
    assert (out.name, out.type.tensor_type.elem_type) == (OUTPUT_NAME, onnx.TensorProto.FLOAT)
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(in_dims[0], str) and in_dims[1:] == [SIZE, SIZE, 3]  # dynamic batch
    assert [d.dim_value for d in out.type.tensor_type.shape.dim][1] == 7
    # Self-contained: every weight inside the file, nothing beside it but the card.
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert sorted(p.name for p in dihedral.path.parent.iterdir()) == ["derm.md", "derm.onnx"]
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)  # eval mode, folded


def test_metadata_is_readable_without_export(dihedral: ExportResult) -> None:
    sess = ort.InferenceSession(str(dihedral.path), providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_props(sess.get_modelmeta().custom_metadata_map)
    assert meta == read_metadata(dihedral.path) == dihedral.metadata
    assert (meta.name, meta.version, meta.input_size) == ("derm-test", "2.0.0", SIZE)
    assert meta.tta == list(TTA_VIEWS["dihedral"]) and meta.temperature == [1.5]
    assert meta.weights_sha256 == weights_sha256(onnx.load(str(dihedral.path)))


def test_ort_matches_torch_on_real_images(dihedral: ExportResult, images: np.ndarray, make_ckpt: MakeCkpt) -> None:
    reference = build_module([load_checkpoint(make_ckpt("single", temperature=1.5))], "dihedral", False)[1]
    sess = ort.InferenceSession(str(dihedral.path), providers=["CPUExecutionProvider"])
    ours = sess.run(None, {INPUT_NAME: images})[0]
    assert ours.shape == (len(images), 7) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, torch_probs(reference, images), atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours.sum(1), 1.0, atol=1e-5)
    # Real images give different answers (the graph is not constant).
    assert np.abs(ours - ours.mean(0)).max() > 1e-4
    singles = np.concatenate([sess.run(None, {INPUT_NAME: images[i : i + 1]})[0] for i in range(8)])
    np.testing.assert_allclose(sess.run(None, {INPUT_NAME: images[:8]})[0], singles, atol=1e-5, rtol=0)
    for flip in NHWC_SYMMETRIES.values():
        np.testing.assert_allclose(sess.run(None, {INPUT_NAME: flip(images[:3]).copy()})[0], ours[:3], atol=1e-5)


def test_export_reports_its_checks_and_writes_the_card(dihedral: ExportResult) -> None:
    names = [c.name for c in dihedral.checks]
    assert names[0] == "onnx.checker full_check" and any("dihedral" in n for n in names)
    assert all(c.passed and c.value <= c.tolerance for c in dihedral.checks)
    card = dihedral.card.read_text()
    for fact in ("derm-test 2.0.0", "Intended use", "CC BY-NC 4.0", "Sci. Data 5, 180161", "arXiv:1902.03368",
                 "resnet18 (T=1.5)", "rot270", "balanced_accuracy", "Melanoma", dihedral.metadata.weights_sha256):  # fmt: skip
        assert fact in card, fact


@pytest.mark.slow
def test_fp16_ensemble_of_mixed_architectures(make_ckpt: MakeCkpt, tmp_path: Path, images: np.ndarray) -> None:
    paths = [make_ckpt("e1", seed=1, temperature=1.2), make_ckpt("e2", arch="resnet34", seed=2, temperature=2.0)]
    result = export_checkpoints(paths, tmp_path / "ens.onnx", tta="flips", fp16=True)
    assert "ensemble vs mean of 2 members" in [c.name for c in result.checks]
    assert result.metadata.architecture == ["resnet18", "resnet34"] and result.metadata.ensemble_size == 2
    fp16_weights = [t for t in onnx.load(str(result.path)).graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert sum(int(np.prod(t.dims)) for t in fp16_weights) > 1_000_000  # the backbones really are half precision
    # Independently of the export's own checks: the file equals the mean of the fp32 members within 1e-2.
    members = [build_module([load_checkpoint(p)], "flips", False)[1] for p in paths]
    mean = np.mean([torch_probs(m, images) for m in members], axis=0)
    ours = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: images})[0]
    np.testing.assert_allclose(ours, mean, atol=1e-2, rtol=0)


def test_verification_fails_loudly_on_a_wrong_graph(
    dihedral: ExportResult, images: np.ndarray, make_ckpt: MakeCkpt
) -> None:
    other = build_module([load_checkpoint(make_ckpt("other", seed=7))], "dihedral", False)[1]
    with pytest.raises(VerificationError, match=r"ORT vs PyTorch.*FAILED"):
        verify(dihedral.path, other, images, fp16=False, dihedral=True)


def test_a_non_invariant_graph_fails_the_dihedral_check(
    make_ckpt: MakeCkpt, tmp_path: Path, images: np.ndarray
) -> None:
    result = export_checkpoints([make_ckpt("single", temperature=1.5)], tmp_path / "plain.onnx", tta="none")
    reference = build_module([load_checkpoint(make_ckpt("single", temperature=1.5))], "none", False)[1]
    with pytest.raises(VerificationError, match=r"dihedral invariance.*FAILED"):
        verify(result.path, reference, images, fp16=False, dihedral=True)


def test_failed_check_leaves_no_model(make_ckpt: MakeCkpt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(*args: object, **kwargs: object) -> None:
        raise VerificationError("simulated failure")

    monkeypatch.setattr("export.onnx_export.verify", failing)
    with pytest.raises(VerificationError, match="simulated"):
        export_checkpoints([make_ckpt("single", temperature=1.5)], tmp_path / "bad.onnx", tta="none")
    assert list(tmp_path.iterdir()) == []


def test_ensemble_mean_check_catches_a_wrong_member(
    dihedral: ExportResult, images: np.ndarray, make_ckpt: MakeCkpt
) -> None:
    own = build_module([load_checkpoint(make_ckpt("single", temperature=1.5))], "dihedral", False)[1]
    other = build_module([load_checkpoint(make_ckpt("other", seed=7))], "dihedral", False)[1]
    with pytest.raises(VerificationError, match=r"ensemble vs mean of 2 members.*FAILED"):
        verify(dihedral.path, own, images, fp16=False, dihedral=False, members=[own, other])


def test_mixed_resnet_and_lite_ensemble_normalises_per_member(
    make_ckpt: MakeCkpt, tmp_path: Path, images: np.ndarray
) -> None:
    """A ResNet (ImageNet mean/std) and an EfficientNet-Lite ((x - 127) / 128) in one file, each normalised its way."""
    paths = [make_ckpt("mix_r", seed=3), make_ckpt("mix_l", arch="efficientnet_lite0", seed=4)]
    result = export_checkpoints(paths, tmp_path / "mixed.onnx", tta="flips")
    norms = result.metadata.preprocessing["normalization"]
    assert [n["arch"] for n in norms] == ["resnet18", "efficientnet_lite0"]
    assert norms[1]["mean"][0] == pytest.approx(127 / 255) and norms[0]["mean"][0] == pytest.approx(0.485)
    members = [build_module([load_checkpoint(p)], "flips", False)[1] for p in paths]
    lite_norm = members[1].members[0].normalize  # type: ignore[index]
    assert float(lite_norm.mean.flatten()[0]) == pytest.approx(127.0) and float(lite_norm.std.flatten()[0]) == 128.0
    mean = np.mean([torch_probs(m, images) for m in members], axis=0)
    ours = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: images})[0]
    np.testing.assert_allclose(ours, mean, atol=1e-4, rtol=0)


def test_members_of_several_sizes_share_the_largest_input(
    make_ckpt: MakeCkpt, tmp_path: Path, isic_images: list[Path]
) -> None:
    """Members trained at 32 and 40 px: the graph takes 40, the 32-px member resizes (antialiased) inside it."""
    small, big = make_ckpt("size32", seed=5), make_ckpt("size40", seed=6, size=40)
    result = export_checkpoints([small, big], tmp_path / "sizes.onnx", tta="flips")
    assert result.metadata.input_size == 40
    graph = onnx.load(str(result.path)).graph
    assert any(n.op_type == "Resize" for n in graph.node)
    imgs = load_images(isic_images, 40)
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {INPUT_NAME: imgs}), strict=True))
    assert outs["cam"].shape[-2:] == (2, 2)  # the finer grid of the two (40 px -> 2x2; 32 px -> 1x1, resized)
    members = [build_module([load_checkpoint(p)], "flips", False)[1] for p in (small, big)]
    small_in = torch.nn.functional.interpolate(
        torch.from_numpy(imgs).permute(0, 3, 1, 2).float(), size=(32, 32), mode="bilinear", antialias=True
    )  # what the graph gives the 32-px member, as uint8 NHWC for its own module
    small_imgs = small_in.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    expected = (torch_probs(members[0], small_imgs) + torch_probs(members[1], imgs)) / 2
    np.testing.assert_allclose(outs[OUTPUT_NAME], expected, atol=2e-3, rtol=0)
    unresized = (torch_probs(members[0], imgs) + torch_probs(members[1], imgs)) / 2
    assert np.abs(outs[OUTPUT_NAME] - unresized).max() > 1e-3  # the small member really sees 32 px
