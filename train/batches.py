"""Where a training epoch's batches come from: augmented pixels, or cached frozen-stage features.

``fit`` (train/engine.py) and the side-by-side benchmark (train/bench_compare.py) both use
:class:`BatchSource`, so the benchmark times the trainer's own path, not a copy of it.

* pixels (the old path, and ``--frozen-blocks`` without a cache): index the uint8 RAM cache,
  augment and mix per step; with frozen blocks the model's early part just runs without a backward.
* features (``--cache-views V``): the frozen part's outputs for V dihedral views of every image
  are computed at the start (and every ``--cache-refresh R`` epochs, from a fresh draw of the
  other augmentations); a step indexes them, one random view per image, and runs only the rest.

Progressive resizing (``--progressive-start-size``) picks the epoch's size and resizes the
images (and rebuilds the feature cache) when it changes.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from torch import nn

from train.augment import AugmentParams, prepare_batch
from train.config import TrainConfig
from train.frozen import FeatureCache, TrainablePart, freeze, recalibrate_bn
from train.preprocess import Norm
from train.progressive import resize_uint8, size_for_epoch

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]  # (input, y_a rows, y_b rows, lam)


class BatchSource:
    """Batches for ``fit``: ``start_epoch`` once per epoch, then ``batch`` per step; ``net`` is what they go through.

    Args:
        model: the model to train (DDP-wrapped or not); ``core`` the bare module.
        x: training images ``(N, S, S, 3)`` uint8 at ``cfg.img_size``, on ``device``.
    """

    def __init__(
        self, cfg: TrainConfig, model: nn.Module, core: nn.Module, x: torch.Tensor, norm: Norm, device: torch.device
    ) -> None:
        self.cfg, self.core, self.x_full, self.norm = cfg, core, x, norm
        self.aug = AugmentParams(**{k: getattr(cfg, k) for k in AugmentParams.__dataclass_fields__})
        self.cl = cfg.channels_last
        self.n = cfg.frozen_blocks
        self.size = cfg.img_size
        self.x = x
        self.cache: FeatureCache | None = None
        self.net: nn.Module = model
        if self.n:
            freeze(core, self.n)
            if cfg.recalibrate_bn:
                recalibrate_bn(core, self.n, x, norm, progress=cfg.progress)
        if cfg.cache_views:
            self.cache = FeatureCache(core, self.n, cfg.cache_views, norm, batch=max(cfg.batch_size, 64))
            self.net = TrainablePart(core, self.n)
        self.built_at = -1  # epoch of the last cache build

    def start_epoch(self, epoch: int, gen: torch.Generator) -> float:
        """Re-freeze after ``model.train()``, resize for this epoch, (re)build the cache when due; seconds spent."""
        t0 = time.perf_counter()
        if self.n:
            freeze(self.core, self.n)
        size = size_for_epoch(epoch, self.cfg.img_size, self.cfg.progressive_start_size, self.cfg.progressive_epochs)
        resized = size != self.size
        if resized:
            self.x, self.size = resize_uint8(self.x_full, size), size
            log.info("epoch %d: training at %d px", epoch + 1, size)
        if self.cache is not None:
            refresh = self.cfg.cache_refresh
            due = self.built_at < 0 or resized or (refresh > 0 and epoch - self.built_at >= refresh)
            if due:
                # the views do the flips and quarter turns; a refreshed cache draws the rest per image
                aug = dataclasses.replace(self.aug, flip=False, rot90=False) if refresh and self.cfg.augment else None
                self.cache.build(self.x, aug, gen, self.cfg.progress)
                self.built_at = epoch
        return time.perf_counter() - t0

    def batch(self, bi: torch.Tensor, gen: torch.Generator) -> Batch:
        """Rows ``bi`` of the training set -> ``(input, y_a, y_b, lam)`` with ``y_*`` as batch rows (0..B-1)."""
        rows = torch.arange(len(bi), device=bi.device)
        if self.cache is not None:
            return self.cache.batch_features(bi, gen, self.cl), rows, rows, 1.0
        return prepare_batch(self.x[bi], rows, self.aug if self.cfg.augment else None, gen, self.cl, self.norm)
