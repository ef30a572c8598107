"""The torch modules that become the graph: views, preprocessing, calibration, averaging."""

from __future__ import annotations

import pytest
import torch

from export.wrappers import (
    VIEW_FNS,
    CalibratedMember,
    LesionModel,
    Normalize,
    TTAViews,
    UnknownTTAError,
    to_nchw_float,
    tta_views,
)
from service.contract import TTA_VIEWS
from train.models import build_model


def test_views_match_torch_rot90_and_are_eight_distinct_symmetries() -> None:
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    assert torch.equal(VIEW_FNS["rot90"](x), torch.rot90(x, 1, (2, 3)))
    assert torch.equal(VIEW_FNS["rot180"](x), torch.rot90(x, 2, (2, 3)))
    assert torch.equal(VIEW_FNS["rot270"](x), torch.rot90(x, 3, (2, 3)))
    assert torch.equal(VIEW_FNS["antitranspose"](x), torch.rot90(x.transpose(2, 3), 2, (2, 3)))
    outs = [VIEW_FNS[v](x) for v in TTA_VIEWS["dihedral"]]
    assert all(not torch.equal(a, b) for i, a in enumerate(outs) for b in outs[i + 1 :])
    # The group is closed: the views of a rotated image are the views of the image, permuted.
    rotated = [VIEW_FNS[v](torch.rot90(x, 1, (2, 3))) for v in TTA_VIEWS["dihedral"]]
    assert all(any(torch.equal(r, o) for o in outs) for r in rotated)


def test_tta_setting_names() -> None:
    assert [len(tta_views(t)) for t in ("none", "hflip", "flips", "dihedral")] == [1, 2, 4, 8]
    with pytest.raises(UnknownTTAError, match=r"unknown TTA setting 'd4'.*none, hflip, flips, dihedral"):
        tta_views("d4")
    with pytest.raises(UnknownTTAError, match="spin"):
        TTAViews(["identity", "spin"])


def test_preprocess_is_imagenet_normalisation_in_nchw() -> None:
    image = torch.randint(0, 256, (2, 4, 6, 3), dtype=torch.uint8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = ((image.float() / 255 - mean) / std).permute(0, 3, 1, 2)
    torch.testing.assert_close(Normalize()(to_nchw_float(image)), expected, atol=1e-5, rtol=1e-5)


def test_member_divides_logits_by_its_temperature() -> None:
    backbone = build_model("resnet18", 3).eval()
    x = torch.rand(2, 3, 32, 32) * 255  # members take 0-255 pixels and normalise them their own way
    with torch.no_grad():
        expected = torch.softmax(backbone(Normalize()(x)) / 2.5, dim=-1)
        torch.testing.assert_close(CalibratedMember(backbone, 2.5)(x), expected)
    with pytest.raises(ValueError, match="temperature"):
        CalibratedMember(backbone, 0.0)


def test_model_averages_views_then_members() -> None:
    torch.manual_seed(0)
    a, b = (CalibratedMember(build_model("resnet18", 4).eval(), t) for t in (1.0, 2.0))
    image = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    views = TTA_VIEWS["flips"]
    with torch.no_grad():
        out = LesionModel([a, b], views)(image)
        x = to_nchw_float(image)
        by_hand = torch.stack([torch.stack([m(VIEW_FNS[v](x)) for v in views]).mean(0) for m in (a, b)]).mean(0)
    assert out.shape == (3, 4)
    torch.testing.assert_close(out, by_hand, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.sum(1), torch.ones(3))


def test_dihedral_model_is_invariant_in_torch() -> None:
    model = LesionModel([CalibratedMember(build_model("resnet18", 5).eval(), 1.0)], TTA_VIEWS["dihedral"])
    image = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        base = model(image)
        torch.testing.assert_close(model(torch.rot90(image, 1, (1, 2))), base, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(image.flip(2)), base, atol=1e-6, rtol=0)


def test_each_member_normalises_with_its_own_statistics() -> None:
    """A mixed ensemble (ResNet: ImageNet mean/std; Lite: (x - 127) / 128) normalises per member."""

    class ChannelMeans(torch.nn.Module):  # a backbone whose output moves with any change of input scale
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    lite_mean, lite_std = (127 / 255,) * 3, (128 / 255,) * 3
    res = CalibratedMember(ChannelMeans().eval(), 1.0)
    lite = CalibratedMember(ChannelMeans().eval(), 1.0, False, lite_mean, lite_std)
    image = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    with torch.no_grad():
        out = LesionModel([res, lite], ("identity",))(image)
        lite_in = (image.permute(0, 3, 1, 2).float() - 127.0) / 128.0
        imagenet_in = Normalize()(to_nchw_float(image))
        expected = (torch.softmax(res.backbone(imagenet_in), -1) + torch.softmax(lite.backbone(lite_in), -1)) / 2
        wrong = (torch.softmax(res.backbone(imagenet_in), -1) + torch.softmax(lite.backbone(imagenet_in), -1)) / 2
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, wrong, atol=1e-3)
