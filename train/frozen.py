"""Frozen early stages of EfficientNet-Lite, their BatchNorm recalibration and a cache of their outputs.

On a 2-core CPU most of a Lite step is spent in the stem and first blocks, which run at the
highest resolution. Freezing them (no gradient, BatchNorm in eval mode) removes their backward
pass; caching their outputs removes their forward too. The cache is exact, not approximate:
each image's features are computed once for each dihedral view used (dermoscopy has no
orientation), never by rotating the features of another view; TF "SAME" padding is asymmetric
at stride 2, so a rotated feature map is *not* the features of the rotated image.

A frozen BatchNorm uses its running statistics. Those are ImageNet's; ``recalibrate_bn``
re-estimates them on the training images first (a 3-epoch run lost 0.055 validation and 0.147
test balanced accuracy without it, docs/training.md).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from train.augment import AugmentParams, augment, model_input
from train.config import CACHE_VIEW_COUNTS
from train.efficientnet import EfficientNetLite
from train.preprocess import Norm

log = logging.getLogger(__name__)

# The dihedral group D4 as (quarter turns, horizontal flip first). Ordered so that the first 2
# are the horizontal flips, the first 4 the flips group {id, hflip, vflip, rot180}, all 8 = D4.
DIHEDRAL_VIEWS: tuple[tuple[int, bool], ...] = (
    (0, False), (0, True), (2, True), (2, False), (1, False), (3, False), (1, True), (3, True),
)  # fmt: skip


def dihedral(x: torch.Tensor, view: int) -> torch.Tensor:
    """View ``view`` (0-7) of a ``(B, C, H, W)`` batch: optional horizontal flip, then quarter turns."""
    k, flip = DIHEDRAL_VIEWS[view]
    if flip:
        x = x.flip(3)
    return torch.rot90(x, k, dims=(2, 3)) if k else x


def _lite(model: nn.Module, n: int) -> EfficientNetLite:
    if not isinstance(model, EfficientNetLite):
        raise ValueError(f"frozen_blocks: only EfficientNet-Lite can freeze early blocks, not {type(model).__name__}")
    if not 0 < n <= len(model._blocks):
        raise ValueError(f"frozen_blocks: {n} not in [1, {len(model._blocks)}] for this architecture")
    return model


def frozen_modules(model: nn.Module, n: int) -> list[nn.Module]:
    """The stem and the first ``n`` blocks (the frozen part), in order."""
    m = _lite(model, n)
    return [m._conv_stem, m._bn0, *m._blocks[:n]]


def freeze(model: nn.Module, n: int) -> None:
    """No gradient and eval mode (BatchNorm on running statistics, no drop-connect) for the frozen part.

    Call again after every ``model.train()``: that call switches every submodule back to training.
    """
    for mod in frozen_modules(model, n):
        mod.eval()
        for p in mod.parameters():
            p.requires_grad_(False)


@torch.no_grad()
def frozen_forward(model: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    """Normalised ``(B, 3, S, S)`` -> the frozen part's output ``(B, C, S/r, S/r)``."""
    m = _lite(model, n)
    h = F.relu6(m._bn0(m._conv_stem(x)))
    for block in m._blocks[:n]:
        h = block(h)
    return h


class TrainablePart(nn.Module):
    """The rest of the network after ``n`` frozen blocks: cached features -> logits.

    It holds the same modules as the model (no copy), so the model's state dict, EMA and export
    are unchanged; only the training forward starts later.
    """

    def __init__(self, model: nn.Module, n: int) -> None:
        super().__init__()
        self.model = _lite(model, n)
        self.n = n

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, K)
        m = self.model
        for block in m._blocks[self.n :]:
            h = block(h)
        f = F.relu6(m._bn1(m._conv_head(h))).mean(dim=(2, 3))
        return m.forward_head(f)


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, n: int, x: torch.Tensor, norm: Norm, batch: int = 64, limit: int = 2048, progress: bool = True
) -> int:
    """Re-estimate the frozen part's BatchNorm statistics on training images (a cumulative average).

    Args:
        x: cached uint8 training images ``(N, S, S, 3)``; the first ``limit`` are used.
    Returns:
        the number of images used.
    """
    bns = [m for mod in frozen_modules(model, n) for m in mod.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # None = exact average over every batch seen, not an exponential one
        bn.train()
    used = min(len(x), limit)
    dev = next(model.parameters()).device
    for i in tqdm(range(0, used, batch), desc="BN recalibration", disable=not progress, leave=False):
        frozen_forward(model, model_input(x[i : min(i + batch, used)].to(dev), norm), n)
    for bn, mom in zip(bns, saved, strict=True):
        bn.momentum = mom
    freeze(model, n)
    log.info("recalibrated %d BatchNorm layers of the frozen part on %d training images", len(bns), used)
    return used


class FeatureCache:
    """The frozen part's outputs for every training image and each of its first ``views`` dihedral views.

    ``feats[i, v]`` is exactly ``frozen_forward(dihedral(input_i, v))``: computed, not derived.
    With ``aug`` the input is a fresh draw of the non-dihedral augmentation (crop, rotation,
    colour, ...; the caller rebuilds the cache every ``cache_refresh`` epochs), without it the plain image.
    """

    def __init__(self, model: nn.Module, n: int, views: int, norm: Norm, batch: int = 64) -> None:
        if views not in CACHE_VIEW_COUNTS[1:]:
            raise ValueError(f"cache_views: {views}; expected one of {CACHE_VIEW_COUNTS[1:]}")
        self.model, self.n, self.views, self.norm, self.batch = model, n, views, norm, batch
        self.feats: torch.Tensor | None = None  # (N, V, C, h, w) float32

    def build(
        self, x: torch.Tensor, aug: AugmentParams | None, gen: torch.Generator, progress: bool = True
    ) -> torch.Tensor:
        """Compute ``feats`` for uint8 images ``x`` ``(N, S, S, 3)``; ``aug`` with flip/rot90 off (the views do those)."""
        dev = next(self.model.parameters()).device
        self.feats = None  # free the old cache before the new one is allocated
        out: torch.Tensor | None = None
        for i in tqdm(range(0, len(x), self.batch), desc=f"feature cache x{self.views}", disable=not progress,
                      leave=False):  # fmt: skip
            xb = x[i : i + self.batch].to(dev)
            inp = augment(xb, aug, gen, self.norm) if aug is not None else model_input(xb, self.norm)
            for v in range(self.views):
                f = frozen_forward(self.model, dihedral(inp, v), self.n)
                if out is None:
                    out = torch.empty((len(x), self.views, *f.shape[1:]), dtype=f.dtype, device=dev)
                out[i : i + len(xb), v] = f
        assert out is not None
        self.feats = out
        log.info("feature cache: %s float32, %.0f MB", tuple(out.shape), out.numel() * 4 / 1e6)
        return out

    def batch_features(self, bi: torch.Tensor, gen: torch.Generator, channels_last: bool) -> torch.Tensor:
        """Features of rows ``bi``, each in one dihedral view drawn uniformly from the cached ones."""
        assert self.feats is not None, "build() first"
        v = torch.randint(0, self.views, (len(bi),), generator=gen).to(bi.device)
        h = self.feats[bi, v]
        return h.contiguous(memory_format=torch.channels_last) if channels_last else h
