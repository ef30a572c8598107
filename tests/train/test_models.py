"""Model family: shapes, finiteness, torchvision state-dict names, SimAM parameter-free, --pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train.models import ARCHITECTURES, SimAM, build_model, load_pretrained

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_keys(layers: list[int], bottleneck: bool) -> list[str]:
    """torchvision.models.resnet's state-dict keys, written out from its layout (torchvision is not installable here)."""
    keys = ["conv1.weight"] + [f"bn1.{b}" for b in BN]
    convs = 3 if bottleneck else 2
    for stage, n in enumerate(layers, start=1):
        for j in range(n):
            p = f"layer{stage}.{j}"
            for c in range(1, convs + 1):
                keys += [f"{p}.conv{c}.weight"] + [f"{p}.bn{c}.{b}" for b in BN]
            if j == 0 and (stage > 1 or bottleneck):  # resnet18's layer1 keeps 64 channels: no downsample
                keys += [f"{p}.downsample.0.weight"] + [f"{p}.downsample.1.{b}" for b in BN]
    return [*keys, "fc.weight", "fc.bias"]


@pytest.mark.parametrize(
    ("arch", "layers", "bottleneck", "n"),
    [("resnet18", [2, 2, 2, 2], False, 122), ("resnet50", [3, 4, 6, 3], True, 320)],
)
def test_state_dict_keys_equal_torchvision(arch: str, layers: list[int], bottleneck: bool, n: int) -> None:
    keys = list(build_model(arch, 1000).state_dict())
    assert len(keys) == n  # torchvision's resnet18 / resnet50 have 122 / 320 entries
    assert sorted(keys) == sorted(torchvision_keys(layers, bottleneck))


# EfficientNet-Lite has a linear head only (build_model refuses mlp: tested in test_efficientnet).
@pytest.mark.parametrize(
    ("arch", "head"),
    [(a, h) for a in ARCHITECTURES for h in ("linear", "mlp") if h == "linear" or not a.startswith("efficientnet")],
)
def test_forward_shape_no_nan(arch: str, head: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 7, head=head, dropout=0.2, hidden=32).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_simam_adds_no_parameters() -> None:
    assert sum(1 for _ in SimAM().parameters()) == 0 and sum(1 for _ in SimAM().buffers()) == 0
    ds = build_model("ds_resnet50", 7)
    plain = build_model("resnet50", 7)
    extra = {k: v.numel() for k, v in ds.named_parameters() if k not in dict(plain.named_parameters())}
    assert extra and all("_d3." in k for k in extra)  # only the dilated branch is new
    assert any(isinstance(m, SimAM) for m in ds.modules())


def test_unknown_arch_and_head() -> None:
    with pytest.raises(ValueError, match="known: resnet18"):
        build_model("vgg16", 2)
    with pytest.raises(ValueError, match="unknown head"):
        build_model("resnet18", 2, head="attention")


def test_load_pretrained_strict_backbone_new_head(tmp_path: Path) -> None:
    src = build_model("resnet18", 1000)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(src.state_dict(), path)
    model = build_model("resnet18", 7, head="mlp", hidden=16)
    head_before = model.fc2.weight.clone()
    loaded = load_pretrained(model, path)
    assert "conv1.weight" in loaded and not any(k.startswith("fc") for k in loaded)
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    assert torch.equal(model.fc2.weight, head_before)
    with pytest.raises(ValueError, match="does not match this backbone"):
        load_pretrained(build_model("resnet34", 7), path)


def test_simam_on_a_1x1_map_is_finite() -> None:
    """layer4 of a 32-px input is 1x1: the variance denominator H*W-1 is 0 there."""
    out = SimAM()(torch.randn(2, 8, 1, 1))
    assert torch.isfinite(out).all()
