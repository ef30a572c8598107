"""The optional graph outputs beside the probabilities: an out-of-distribution score and class activation maps.

Both come from one backbone pass per member: the last feature map ``A`` (B, F, h, w) is pooled into the
features ``f`` (B, F) that the head turns into logits, and

- ``cam``: the class activation map (Zhou et al. 2016), ``CAM_c = sum_f W[c, f] A[f]``. For a linear head on
  global-average-pooled features it is exact: ``mean(CAM_c) + b_c`` is the logit of class c. The ReLU MLP
  head (``fc2(relu(fc(f)))``) is piecewise linear: with the image's own ReLU pattern ``D`` its effective
  weight ``W2 D W1`` gives a map that is exact in the same sense, image by image.
- ``ood_score``: ``energy`` = -logsumexp(logits) (Liu et al. 2020), or ``mahalanobis`` = squared distance of
  ``f`` to the nearest class mean under a shared covariance fitted on training features (Lee et al. 2018),
  stored as a whitening matrix. Higher = less like the training data.

Each TTA view's map is mapped back with the view's inverse before the views are averaged, so the map lines
up with the input; with the dihedral views, the map of a rotated image is exactly the rotated map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.wrappers import VIEW_FNS, CalibratedMember, LesionModel, TTAViews, to_nchw_float
from service.contract import CAM_OUTPUT, OOD_METHODS, OOD_OUTPUT, OUTPUT_NAME
from train.efficientnet import EfficientNetLite
from train.models import ResNet

# The inverse of each view: a map computed on view v is brought back to the input's frame by INVERSE[v].
INVERSE_VIEW: dict[str, str] = {
    "identity": "identity",
    "hflip": "hflip",
    "vflip": "vflip",
    "rot90": "rot270",
    "rot180": "rot180",
    "rot270": "rot90",
    "transpose": "transpose",
    "antitranspose": "antitranspose",
}


class ExplainError(ValueError):
    """A backbone or head this module cannot take apart; the message names it."""


def feature_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last feature map before global average pooling: ``(B, 3, S, S) -> (B, F, h, w)``.

    Mirrors ``forward_features`` of ``train/`` without its pooling; :func:`check_feature_map` proves the
    two agree for a given backbone, so a change in ``train/`` fails the export instead of skewing maps.
    """
    if isinstance(backbone, ResNet):
        x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
        return backbone.layer4(backbone.layer3(backbone.layer2(backbone.layer1(x))))
    if isinstance(backbone, EfficientNetLite):
        x = F.relu6(backbone._bn0(backbone._conv_stem(x)))
        for block in backbone._blocks:
            x = block(x)
        return F.relu6(backbone._bn1(backbone._conv_head(x)))
    raise ExplainError(f"no feature map for a {type(backbone).__name__}: expected a ResNet or an EfficientNet-Lite")


def check_feature_map(backbone: nn.Module, size: int, tol: float = 1e-4) -> tuple[int, int, int]:
    """Raise :class:`ExplainError` unless pooling :func:`feature_map` gives ``forward_features``; returns (F, h, w)."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    dtype = next(backbone.parameters()).dtype
    with torch.inference_mode():
        a = feature_map(backbone, x.to(dtype)).float()
        f = backbone.forward_features(x.to(dtype)).float()  # type: ignore[operator]
    diff = float((a.mean(dim=(2, 3)) - f).abs().max())
    if diff > tol * max(1.0, float(f.abs().max())):
        raise ExplainError(f"feature map pooled differs from forward_features by {diff:.3g}: train/ changed?")
    return int(a.shape[1]), int(a.shape[2]), int(a.shape[3])


def head_type(backbone: nn.Module) -> str:
    return str(getattr(backbone, "head_type", "linear"))


def linear_head(backbone: nn.Module, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The head as an (effective) linear map of the pooled features: weight ``(B, K, F)``, bias ``(B, K)``.

    Linear heads: the same ``W``, ``b`` for every image. The MLP head ``fc2(relu(fc(f)))``: with the
    image's ReLU pattern ``D``, ``W2 D W1`` and ``W2 D b1 + b2``, so ``weight @ f + bias`` is the logit exactly.
    """
    if isinstance(backbone, EfficientNetLite):
        fc = backbone._fc
    elif isinstance(backbone, ResNet):
        fc = backbone.fc
    else:
        raise ExplainError(f"no head weights for a {type(backbone).__name__}")
    b = f.shape[0]
    if head_type(backbone) == "linear":
        return fc.weight.expand(b, -1, -1), fc.bias.expand(b, -1)
    if head_type(backbone) != "mlp":
        raise ExplainError(f"unknown head {head_type(backbone)!r}")
    fc2 = backbone.fc2  # type: ignore[union-attr]
    hidden = fc(f)  # (B, H)
    on = (hidden > 0).to(f.dtype)  # (B, H): the ReLU pattern D of each image
    weight = torch.einsum("kh,bh,hf->bkf", fc2.weight, on, fc.weight)  # (B, K, F)
    bias = (on * fc.bias) @ fc2.weight.T + fc2.bias  # (B, K)
    return weight, bias


@dataclass(frozen=True)
class MahalanobisStats:
    """Class means and the whitening of a shared covariance, fitted on training features (numpy, float64).

    Attributes:
        means: ``(K, F)`` class means.
        whitening: ``(F, F)`` with ``whitening @ whitening.T`` = the inverse covariance.
    """

    means: np.ndarray
    whitening: np.ndarray


class OodHead(nn.Module):
    """Per-image OOD score of one member from its pooled features and logits (float32)."""

    whitening: torch.Tensor
    white_means: torch.Tensor

    def __init__(self, method: str, stats: MahalanobisStats | None = None) -> None:
        super().__init__()
        if method not in OOD_METHODS:
            raise ExplainError(f"unknown OOD method {method!r}: expected {', '.join(OOD_METHODS)}")
        if (method == "mahalanobis") != (stats is not None):
            raise ExplainError("the mahalanobis method needs fitted statistics (and only it)")
        self.method = method
        if stats is not None:
            w = torch.from_numpy(np.asarray(stats.whitening, dtype=np.float32))
            self.register_buffer("whitening", w)
            self.register_buffer("white_means", torch.from_numpy(np.asarray(stats.means, dtype=np.float32)) @ w)

    def forward(self, f: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:  # (B, F), (B, K) -> (B,)
        if self.method == "energy":
            return -torch.logsumexp(logits, dim=-1)
        z = f @ self.whitening  # (B, F) whitened features
        d = (z.unsqueeze(1) - self.white_means.unsqueeze(0)).pow(2).sum(dim=-1)  # (B, K) squared distances
        return d.min(dim=-1).values


class ExplainedMember(nn.Module):
    """One calibrated member that also returns its OOD score and class activation maps (one backbone pass).

    Args:
        member: the calibrated member (its normalisation, backbone, temperature, fp16 setting).
        ood: the member's OOD head, or None.
        cam: compute the class activation maps.
    """

    def __init__(
        self, member: CalibratedMember, ood: OodHead | None, cam: bool, cam_hw: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        self.member = member
        self.ood = ood
        self.cam = cam
        self.cam_hw = cam_hw  # the ensemble's common map size; None: this member's own

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        m = self.member
        z = m.prepare(x)
        a = feature_map(m.backbone, z.half() if m.fp16 else z)  # (B, F, h, w)
        f = a.mean(dim=(2, 3))  # (B, F): forward_features
        logits = m.backbone.forward_head(f).to(torch.float32)  # type: ignore[operator]
        probs = torch.softmax(logits / m.temperature, dim=-1)
        score = self.ood(f.to(torch.float32), logits) if self.ood is not None else None  # (B,)
        cam = None
        if self.cam:
            weight, _ = linear_head(m.backbone, f)  # (B, K, F)
            cam = torch.einsum("bkf,bfhw->bkhw", weight, a).to(torch.float32)  # (B, K, h, w)
            if self.cam_hw is not None and tuple(cam.shape[-2:]) != self.cam_hw:
                # A member trained at a smaller size has a coarser map: bring it to the ensemble's grid.
                cam = F.interpolate(cam, size=self.cam_hw, mode="bilinear", align_corners=False)
        return probs, score, cam


class ExplainedLesionModel(nn.Module):
    """:class:`~export.wrappers.LesionModel` plus the optional outputs, averaged like the probabilities.

    ``forward(image)`` returns a tuple in :meth:`output_names` order: probabilities ``(N, K)``, then
    ``ood_score`` ``(N,)`` when ``ood`` is set, then ``cam`` ``(N, K, h, w)`` when ``cam`` is set.

    Args:
        base: the plain model (its TTA views and calibrated members).
        ood: one OOD head per member, or None for no ``ood_score`` output.
        cam: add the ``cam`` output.
    """

    def __init__(
        self, base: LesionModel, ood: Sequence[OodHead] | None, cam: bool, cam_hw: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        members = list(base.members)
        if ood is not None and len(ood) != len(members):
            raise ExplainError(f"{len(ood)} OOD heads for {len(members)} members")
        heads: Sequence[OodHead | None] = ood if ood is not None else [None] * len(members)
        self.tta: TTAViews = base.tta
        self.members = nn.ModuleList(
            ExplainedMember(m, h, cam, cam_hw)
            for m, h in zip(members, heads, strict=True)  # type: ignore[arg-type]
        )
        self.views = base.tta.views
        self.with_ood = ood is not None
        self.with_cam = cam

    def output_names(self) -> list[str]:
        return [OUTPUT_NAME] + ([OOD_OUTPUT] if self.with_ood else []) + ([CAM_OUTPUT] if self.with_cam else [])

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:  # (N, S, S, 3) uint8
        x = self.tta(to_nchw_float(image))  # (V*N, 3, S, S), view-major
        n, v = image.shape[0], len(self.views)
        probs, scores, cams = [], [], []
        for member in self.members:
            p, s, c = member(x)
            probs.append(p.reshape(v, n, -1).mean(dim=0))
            if s is not None:
                scores.append(s.reshape(v, n).mean(dim=0))
            if c is not None:
                # (V*N, K, h, w): view i's maps are rows [i*N, (i+1)*N); each goes back to the input's frame.
                back = [VIEW_FNS[INVERSE_VIEW[name]](c[i * n : (i + 1) * n]) for i, name in enumerate(self.views)]
                cams.append(torch.stack(back, dim=0).mean(dim=0))
        return tuple(_mean(t) for t in (probs, scores, cams) if t)


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors, dim=0).mean(dim=0)


def cam_shape(members: Sequence[CalibratedMember], size: int) -> tuple[int, int]:
    """``(h, w)`` of the members' feature maps (checked against ``forward_features``), each at its own input
    size; members trained at several sizes share the finest grid (the others' maps are resized to it)."""
    shapes = {check_feature_map(m.backbone, m.size or size)[1:] for m in members}
    return max(shapes)
