"""``python -m train.bench --compare``: the old training path and the new one, epoch by epoch in one process.

Both paths are the trainer's own code (``train.batches.BatchSource`` + ``train.engine.train_step``
+ the EMA update), with the same recipe (augmentation, EMA, class-weighted CE with label
smoothing), model, batch size and threads. "old" is the trainer as it was: NCHW, every layer
trained, augmentation per step. "new" adds what is asked for: channels_last, frozen early
blocks (with BN recalibration), the feature cache, progressive resizing. The paths alternate
epoch by epoch so that load from other processes hits both alike; a new epoch's time includes
its cache (re)build, and the new path's total includes its BN recalibration. Validation (the
same full-size forward for both) is not timed here.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from train.batches import BatchSource
from train.config import TrainConfig
from train.data import load_images, load_labelled
from train.engine import build_optimizer, train_step
from train.losses import build_loss
from train.models import build_model, input_normalization, load_pretrained, resolve_pretrained

log = logging.getLogger(__name__)

# The augmentation of the reference members (models/members/manifest.json "recipe"), EMA and class-weighted CE.
RECIPE = dict(
    loss="weighted_ce", label_smoothing=0.05, ema=0.998, scale_min=0.4, rotate_deg=20.0, hsv=0.15, cutout=0.2,
    sharpness=1.0, white_balance=0.1, vignette=0.3,
)  # fmt: skip


@dataclass
class Lane:
    name: str
    cfg: TrainConfig
    model: torch.nn.Module
    source: BatchSource
    opt: torch.optim.Optimizer
    ema: AveragedModel
    loss_fn: torch.nn.Module
    setup_s: float
    seconds: float = 0.0
    prepare_s: float = 0.0
    images: int = 0


def _path(name: str, cfg: TrainConfig, x: torch.Tensor, counts: np.ndarray, n_classes: int) -> Lane:
    torch.manual_seed(cfg.seed)  # both paths start from the same weights
    model = build_model(cfg.arch, n_classes)
    if cfg.pretrained:
        load_pretrained(model, resolve_pretrained(cfg.arch, cfg.pretrained))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    t0 = time.perf_counter()
    source = BatchSource(cfg, model, model, x, input_normalization(cfg.arch), torch.device("cpu"))
    setup = time.perf_counter() - t0  # BN recalibration
    opt = build_optimizer(cfg, model, model.head_parameter_prefixes())
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    loss_fn = build_loss(cfg.loss, counts, label_smoothing=cfg.label_smoothing)
    return Lane(name, cfg, model, source, opt, ema, loss_fn, setup, seconds=setup)


def _epoch(p: Lane, epoch: int, y: torch.Tensor, gen: torch.Generator, steps: int) -> None:
    t0 = time.perf_counter()
    p.model.train()
    p.prepare_s += p.source.start_epoch(epoch, gen)
    idx = torch.randperm(len(y), generator=gen)
    b = p.cfg.batch_size
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    for s in range(steps):
        bi = idx[s * b : (s + 1) * b]
        xb, ra, rb, lam = p.source.batch(bi, gen)
        train_step(p.source.net, p.loss_fn, p.opt, scaler, xb, y[bi][ra], y[bi][rb], lam)
        p.ema.update_parameters(p.model)
    p.seconds += time.perf_counter() - t0
    p.images += steps * b


def compare(args: argparse.Namespace) -> dict[str, object]:
    """Old vs new path(s) on ``args.images`` images for ``args.epochs`` epochs, alternating epoch by epoch."""
    flags = {k: getattr(args, k) for k in NEW_FIELDS}
    variants = [parse_variant(v) for v in args.variant] or [flags]  # bad options fail before any decoding
    ds = load_labelled(args.data)
    idx = np.random.default_rng(0).permutation(len(ds.paths))[: args.images]
    ds = ds.subset(np.sort(idx))
    x = torch.from_numpy(load_images(ds.paths, args.img_size, 2))
    y = torch.from_numpy(ds.labels)
    base = TrainConfig(data=args.data, arch=args.arch, img_size=args.img_size, batch_size=args.batch_size,
                       epochs=args.epochs, pretrained=args.pretrained, progress=False, channels_last=False,
                       **RECIPE)  # type: ignore[arg-type]  # fmt: skip
    base.validate()
    counts = np.bincount(ds.labels, minlength=len(ds.classes)).clip(min=1)
    load_start = os.getloadavg()
    paths = [_path("old", base, x, counts, len(ds.classes))]
    for i, v in enumerate(variants):
        cfg = dataclasses.replace(base, **v)
        cfg.validate()
        paths.append(_path("new" if len(variants) == 1 else f"new{i + 1}", cfg, x, counts, len(ds.classes)))
    steps = max(1, len(y) // args.batch_size)
    gens = {p.name: torch.Generator().manual_seed(0) for p in paths}
    for epoch in tqdm(range(args.epochs), desc="old/new epochs", disable=not args.progress):
        for p in paths:  # alternate: the same load hits both
            _epoch(p, epoch, y, gens[p.name], steps)
        # a line per epoch: a run stopped early (shared machine) still leaves its figures so far
        log.info("epoch %d: %s; load %s", epoch + 1,
                 ", ".join(f"{p.name} {p.images / p.seconds:.2f} img/s" for p in paths), os.getloadavg())  # fmt: skip
    rows = [
        {
            "path": p.name,
            "images_per_s": p.images / p.seconds,
            "seconds": round(p.seconds, 2),
            "setup_s": round(p.setup_s, 2),
            "prepare_s": round(p.prepare_s, 2),
            "config": {k: getattr(p.cfg, k) for k in NEW_FIELDS},
        }
        for p in paths
    ]
    for r in rows:
        r["speedup"] = r["images_per_s"] / rows[0]["images_per_s"]
    return {
        "arch": args.arch,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "images": len(y),
        "epochs": args.epochs,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
    }


NEW_FIELDS = ("channels_last", "frozen_blocks", "recalibrate_bn", "cache_views", "cache_refresh",
              "progressive_start_size", "progressive_epochs")  # fmt: skip


def parse_variant(text: str) -> dict[str, object]:
    """``"frozen_blocks=6,cache_views=2"`` -> config overrides of one new path (the others keep the old values)."""
    out: dict[str, object] = {"channels_last": False}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in NEW_FIELDS or not value:
            raise ValueError(f"--variant: {item!r}; expected KEY=VALUE with KEY one of {', '.join(NEW_FIELDS)}")
        kind = type(getattr(TrainConfig(), key))
        out[key] = value.strip().lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The new path's options (same names as ``python -m train``'s)."""
    g = ap.add_argument_group("--compare: the new path")
    g.add_argument("--epochs", type=int, default=3, help="epochs per path, alternating")
    g.add_argument("--pretrained", default="", help="'imagenet' or a state dict ('' = random init; speed is the same)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--frozen-blocks", type=int, default=6)
    g.add_argument("--recalibrate-bn", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--cache-views", type=int, default=8)
    g.add_argument("--cache-refresh", type=int, default=0)
    g.add_argument("--progressive-start-size", type=int, default=0)
    g.add_argument("--progressive-epochs", type=int, default=0)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--variant", action="append", default=[],
                   help="repeatable: one new path per flag, e.g. channels_last=1,frozen_blocks=6 (unset = old value); "
                   "replaces the single new path of the flags above")  # fmt: skip
