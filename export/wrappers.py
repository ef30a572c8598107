"""The torch modules that become the exported graph: preprocessing, TTA views, calibration, ensemble.

Everything between "a square uint8 RGB image" and "calibrated class probabilities" is written here
as plain tensor operations so that it exports to plain ONNX ops (Cast, Sub, Div, Transpose, Slice,
Concat, Softmax, ReduceMean): the service then only crops, resizes and runs the file.

Shapes: ``N`` images, ``V`` TTA views, ``M`` ensemble members, ``K`` classes, side ``S``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from service.contract import TTA_VIEWS

# ImageNet statistics: the ResNet family is (pre)trained with them, and training normalises the same way.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# The eight symmetries of the square on (B, C, H, W) tensors, written with flip/transpose only:
# each is an exact pixel permutation, so the dihedral view set of a rotated image is the same set.
def _rot90(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(2, 3).flip(2)  # == torch.rot90(x, 1, (2, 3)), counter-clockwise


def _rot270(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(2, 3).flip(3)  # == torch.rot90(x, 3, (2, 3))


VIEW_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "hflip": lambda x: x.flip(3),
    "vflip": lambda x: x.flip(2),
    "rot90": _rot90,
    "rot180": lambda x: x.flip(2).flip(3),
    "rot270": _rot270,
    "transpose": lambda x: x.transpose(2, 3),
    "antitranspose": lambda x: x.transpose(2, 3).flip(2).flip(3),
}


class UnknownTTAError(ValueError):
    """An unknown TTA setting; the message lists the known ones."""


def tta_views(tta: str) -> tuple[str, ...]:
    """The view names of a TTA setting (``none``, ``hflip``, ``flips``, ``dihedral``: 1, 2, 4 or 8 views).

    Args:
        tta: the setting's name, as in ``service.contract.TTA_VIEWS``.
    """
    if tta not in TTA_VIEWS:
        raise UnknownTTAError(f"unknown TTA setting {tta!r}: expected one of {', '.join(TTA_VIEWS)}")
    return TTA_VIEWS[tta]


def to_nchw_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, S, S, 3)`` RGB -> float32 ``(N, 3, S, S)`` on 0-255 (no scaling yet)."""
    return image.permute(0, 3, 1, 2).to(torch.float32)


class Normalize(nn.Module):
    """float ``(B, 3, S, S)`` on 0-255 -> the backbone's normalised input.

    Normalisation belongs to the backbone (ResNets: ImageNet mean/std; EfficientNet-Lite's ImageNet
    weights: (x - 127) / 128), so each ensemble member carries its own; the TTA views are pixel
    permutations and commute with it, so they run once on the raw pixels before.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        # Fold /255 into the constants: (x/255 - m)/s == (x - 255m)/(255s), one Sub and one Div.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TTAViews(nn.Module):
    """Stack the views along the batch axis: ``(N, C, S, S)`` -> ``(V*N, C, S, S)``, view-major.

    One backbone call on ``V*N`` images is as fast as ``V`` calls on ``N`` and keeps the graph small.

    Args:
        views: view names from :data:`VIEW_FNS`.
    """

    def __init__(self, views: Sequence[str]) -> None:
        super().__init__()
        unknown = [v for v in views if v not in VIEW_FNS]
        if unknown or not views:
            raise UnknownTTAError(f"unknown TTA views {unknown}: expected names from {', '.join(VIEW_FNS)}")
        self.views = tuple(views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.views) == 1:
            return VIEW_FNS[self.views[0]](x)
        return torch.cat([VIEW_FNS[v](x) for v in self.views], dim=0)


class CalibratedMember(nn.Module):
    """One ensemble member: its normalisation, backbone logits / temperature -> softmax, float32 out.

    Args:
        backbone: eval-mode classifier ``(B, 3, S, S) -> (B, K)`` logits.
        temperature: the member's fitted temperature (> 0).
        fp16: run the backbone in float16 (weights stored in half precision); softmax stays float32.
        mean, std: the input normalisation the backbone was trained with (on [0, 1] pixels).
        size: the side the member was trained at; ``input_size``: the graph's. When they differ (an
            ensemble of members trained at several sizes: the graph takes the largest), the member
            resizes its input first, bilinear with antialiasing (close to the INTER_AREA resize that
            made its training images; the difference is measured by the export's parity check).
    """

    def __init__(
        self,
        backbone: nn.Module,
        temperature: float,
        fp16: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        size: int | None = None,
        input_size: int | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.normalize = Normalize(mean, std)
        self.backbone = backbone.eval().half() if fp16 else backbone.eval()
        self.temperature = float(temperature)
        self.fp16 = fp16
        self.size = size if size is not None and size != input_size else None

    def prepare(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) on 0-255 -> normalised (B, 3, s, s)
        if self.size is not None:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return self.normalize(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) float32 on 0-255 -> (B, K) float32
        x = self.prepare(x)
        logits = self.backbone(x.half() if self.fp16 else x).to(torch.float32)
        return torch.softmax(logits / self.temperature, dim=-1)


class LesionModel(nn.Module):
    """The whole exported model: uint8 image -> mean over views and members of calibrated probabilities.

    Args:
        members: calibrated members; they must share classes and input size (checked by the caller).
        views: TTA view names.
    """

    def __init__(self, members: Sequence[CalibratedMember], views: Sequence[str]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an export needs at least one member")
        self.tta = TTAViews(views)
        self.members = nn.ModuleList(members)
        self.n_views = len(views)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (N, S, S, 3) uint8 -> (N, K) float32
        x = self.tta(to_nchw_float(image))  # (V*N, 3, S, S) on 0-255; each member normalises its own way
        n = image.shape[0]
        # Each member: (V*N, K) -> (V, N, K) -> mean over views; then the mean over members.
        per_member = [m(x).reshape(self.n_views, n, -1).mean(dim=0) for m in self.members]
        if len(per_member) == 1:
            return per_member[0]
        return torch.stack(per_member, dim=0).mean(dim=0)
