"""The training loop: optimiser, schedule, epochs over the RAM cache, checkpoints, resume.

The decoded uint8 images live in one tensor (on the GPU when there is one); a batch is an
index into it, augmented in one batched pass (``train/augment.py``). There is no DataLoader:
nothing is decoded during training, so the loop runs at the model's own speed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from train.augment import model_input
from train.batches import BatchSource
from train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from train.config import TrainConfig
from train.distill import Distiller
from train.metrics import compute_metrics
from train.models import input_normalization
from train.preprocess import IMAGENET_NORM, Norm

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Cached images ``(N, S, S, 3)`` uint8 and labels ``(N,)`` int64 for one side of a split."""

    x: torch.Tensor
    y: torch.Tensor


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_metrics: dict[str, Any]
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def build_optimizer(cfg: TrainConfig, model: nn.Module, head_prefixes: tuple[str, ...] = ()) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD with four groups: {backbone, head} x {decay, no decay}.

    No weight decay on BN and biases: decaying them only fights the normalisation. The backbone
    runs at ``lr * backbone_lr_mult``: a pretrained backbone needs smaller steps than a new head.
    """
    groups = []
    for is_head in (False, True):
        named = [
            (n, p)
            for n, p in model.named_parameters()
            if n.removeprefix("module.").startswith(head_prefixes) == is_head and p.requires_grad
        ]  # frozen early blocks (--frozen-blocks) have requires_grad False and stay out
        lr = cfg.lr if is_head or not head_prefixes else cfg.lr * cfg.backbone_lr_mult
        decay = [p for _, p in named if p.ndim > 1]
        no_decay = [p for _, p in named if p.ndim <= 1]
        groups += [
            {"params": decay, "weight_decay": cfg.weight_decay, "lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr},
        ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr)


def set_backbone_trainable(model: nn.Module, head_prefixes: tuple[str, ...], trainable: bool) -> None:
    """Freeze or unfreeze every parameter outside the head (frozen: no gradient, the optimiser skips it).

    Unfreezing also thaws ``--frozen-blocks``; ``BatchSource.start_epoch`` freezes those again.
    """
    for n, p in model.named_parameters():
        if not n.removeprefix("module.").startswith(head_prefixes):
            p.requires_grad_(trainable)


def cosine_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor per step: linear warm-up then cosine decay to 1% of the base LR."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, batch: int, device: torch.device, cl: bool = False, norm: Norm = IMAGENET_NORM
) -> np.ndarray:
    """Float32 logits ``(N, K)`` for cached uint8 images, in eval mode without augmentation."""
    model.eval()
    outs = []
    for i in range(0, len(x), batch):
        xb = model_input(x[i : i + batch].to(device, non_blocking=True), norm)
        if cl:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            outs.append(model(xb).float().cpu())
    return torch.cat(outs).numpy()


def train_step(
    model: nn.Module,
    loss_fn: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    xb: torch.Tensor,
    ya: torch.Tensor,
    yb: torch.Tensor,
    lam: float,
    amp_dtype: torch.dtype | None = None,
    kd: Callable[[torch.Tensor], torch.Tensor] | None = None,
    kd_alpha: float = 0.0,
) -> torch.Tensor:
    """One optimiser step; a mixed batch's loss is ``lam * L(y_a) + (1 - lam) * L(y_b)``.

    With ``kd`` (logits -> distillation term): ``(1 - kd_alpha) * that + kd_alpha * kd(logits)``.
    """
    with torch.autocast(xb.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(xb)
    loss = loss_fn(logits, ya) if lam == 1.0 else lam * loss_fn(logits, ya) + (1 - lam) * loss_fn(logits, yb)
    if kd is not None:
        loss = (1 - kd_alpha) * loss + kd_alpha * kd(logits)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def _epoch_indices(cfg: TrainConfig, y: torch.Tensor, gen: torch.Generator, d: Dist) -> torch.Tensor:
    n = len(y)
    if cfg.sampler == "balanced":
        counts = torch.bincount(y).float()
        w = (1.0 / counts.clamp(min=1))[y]
        idx = torch.multinomial(w, n, replacement=True, generator=gen)
    else:
        idx = torch.randperm(n, generator=gen)
    per_rank = n // d.world  # every rank takes the same number of steps (DDP all-reduce)
    return idx[d.rank * per_rank : (d.rank + 1) * per_rank]


def _score(metrics: dict[str, Any], monitor: str) -> float:
    v = metrics[monitor]
    return -float(v) if monitor == "val_loss" else float(v if v is not None else -math.inf)


def fit(
    cfg: TrainConfig,
    model: nn.Module,
    loss_fn: nn.Module,
    train: Split,
    val: Split,
    classes: list[str],
    out: Path,
    make_ckpt: Callable[[dict[str, torch.Tensor], int, dict[str, Any]], Checkpoint],
    device: torch.device,
    d: Dist | None = None,
    distiller: Distiller | None = None,
) -> FitResult:
    """Train ``model``; writes ``out/best.pt`` (best monitored epoch) and ``out/last.pt`` (resume).

    Args:
        make_ckpt: ``(state, epoch, val_metrics) -> Checkpoint`` filling the run's metadata.
        d: rank and world size under ``torchrun``; the model is then already DDP-wrapped.
        distiller: teacher targets for the rows of ``train`` (knowledge distillation), or ``None``.
    """
    d = d or Dist()
    core = model.module if hasattr(model, "module") else model
    norm = input_normalization(cfg.arch)
    heads: tuple[str, ...] = core.head_parameter_prefixes() if hasattr(core, "head_parameter_prefixes") else ()
    if distiller is not None:
        distiller = distiller.to(device)
    cuda = device.type == "cuda"
    cl = cfg.channels_last  # on CPU too: oneDNN's convolutions are faster in NHWC (docs/training.md)
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and cfg.amp and amp_dtype == torch.float16)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = max(1, (len(train.y) // d.world) // cfg.batch_size)  # drop the ragged last batch: BN needs > 1
    if cfg.cache_views and d.world > 1:
        raise ValueError(
            "config: cache_views is single-process (each rank would cache every image); use 0 under torchrun"
        )
    # Freezing (and BN recalibration) happen here, before the optimiser and the EMA copy are made.
    source = BatchSource(cfg, model, core, train.x.to(device), norm, device)
    # EMA of the weights (and BN buffers): validation, best.pt and the exported model use it.
    ema = AveragedModel(core, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None
    scored: nn.Module = ema.module if ema is not None else core
    opt = build_optimizer(cfg, model, heads)
    sched: Any = None
    if cfg.scheduler == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, cosine_warmup(cfg.epochs * steps, int(cfg.warmup_epochs * steps))
        )
    elif cfg.scheduler == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3, patience=cfg.plateau_patience)
    history: list[dict[str, float]] = []
    best_score, best_epoch, bad, start = -math.inf, 0, 0, 0
    best_metrics: dict[str, Any] = {}
    last = out / "last.pt"
    if cfg.resume and last.exists():
        ck = load_checkpoint(last)
        core.load_state_dict(ck.extra.get("raw_state", ck.model_state))
        if ema is not None:
            ema.module.load_state_dict(ck.model_state)
            ema.n_averaged.fill_(1)  # 0 would make the next update copy the raw weights over the average
        opt.load_state_dict(ck.extra["optimizer_state"])
        if sched is not None and "scheduler_state" in ck.extra:
            sched.load_state_dict(ck.extra["scheduler_state"])
        gen.set_state(ck.extra["rng_state"])
        history = list(ck.extra.get("history", []))
        best_score, best_epoch, bad = float(ck.extra["best_score"]), int(ck.extra["best_epoch"]), int(ck.extra["bad"])
        best_metrics = dict(ck.extra.get("best_metrics", {}))
        start = ck.epoch
        log.info("resumed from %s at epoch %d (best %s=%.4f)", last, start, cfg.monitor, best_score)
    ytr = train.y.to(device)
    for epoch in range(start, cfg.epochs):
        frozen = epoch < cfg.freeze_epochs and bool(heads)
        set_backbone_trainable(core, heads, not frozen)
        if frozen:
            log.info("epoch %d: backbone frozen, training the head only", epoch + 1)
        model.train()
        t0, seen, total = time.perf_counter(), 0, 0.0
        source.start_epoch(epoch, gen)  # inside the timed epoch: a cache build is part of its cost
        idx = _epoch_indices(cfg, train.y, gen, d)
        bar = tqdm(
            range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and d.main), leave=False
        )
        for s in bar:
            bi = idx[s * cfg.batch_size : (s + 1) * cfg.batch_size].to(device)
            # Labels are the batch rows 0..B-1 so that the mix's pairing is known (the teachers need it).
            xb, ra, rb, lam = source.batch(bi, gen)
            kd = None
            if distiller is not None:
                kd = partial(distiller.loss, rows_a=bi[ra], rows_b=bi[rb], lam=lam)
            loss = train_step(
                source.net, loss_fn, opt, scaler, xb, ytr[bi][ra], ytr[bi][rb], lam,
                amp_dtype if cuda and cfg.amp else None, kd, cfg.kd_alpha,
            )  # fmt: skip
            if ema is not None:
                ema.update_parameters(core)
            if cfg.scheduler == "cosine":
                sched.step()
            total += loss.item() * len(bi)
            seen += len(bi)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        train_time = time.perf_counter() - t0
        if d.world > 1:  # BN running stats are per rank: take rank 0's so every rank scores one model
            for buf in core.buffers():
                dist.broadcast(buf, 0)
        logits = predict_logits(scored, val.x, max(cfg.batch_size, 128), device, cl, norm)
        metrics = compute_metrics(logits, val.y.numpy(), classes)
        metrics["val_loss"] = metrics["nll"]
        if cfg.scheduler == "plateau":
            sched.step(_score(metrics, cfg.monitor))
        row = {
            "epoch": epoch + 1,
            "train_loss": total / max(seen, 1),
            "val_loss": metrics["nll"],
            "balanced_accuracy": metrics["balanced_accuracy"],
            "macro_f1": metrics["macro_f1"],
            "accuracy": metrics["accuracy"],
            "lr": opt.param_groups[0]["lr"],
            "train_images_per_s": seen * d.world / train_time,
        }
        history.append(row)
        score = _score(metrics, cfg.monitor)
        improved = score > best_score
        if improved:
            best_score, best_epoch, bad, best_metrics = score, epoch + 1, 0, metrics
            if d.main:
                save_checkpoint(make_ckpt(scored.state_dict(), epoch + 1, metrics), out / "best.pt")
        else:
            bad += 1
        log.info(
            "epoch %d/%d train_loss %.4f val_loss %.4f bal_acc %.4f macro_f1 %.4f %.0f img/s%s",
            epoch + 1, cfg.epochs, row["train_loss"], row["val_loss"], row["balanced_accuracy"],
            row["macro_f1"], row["train_images_per_s"], " *" if improved else "",
        )  # fmt: skip
        if d.main:
            ck = make_ckpt(scored.state_dict(), epoch + 1, metrics)
            ck.extra = {
                **({"raw_state": {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}} if ema else {}),
                "optimizer_state": opt.state_dict(),
                "scheduler_state": sched.state_dict() if sched is not None else {},
                "rng_state": gen.get_state(),
                "history": history,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "bad": bad,
                "best_metrics": best_metrics,
            }
            save_checkpoint(ck, last)
        if cfg.patience and bad >= cfg.patience:
            log.info("early stop: %s did not improve for %d epochs (best epoch %d)", cfg.monitor, bad, best_epoch)
            break
    if d.world > 1:
        dist.barrier()
    best = load_checkpoint(out / "best.pt")
    return FitResult(best.model_state, best_metrics, best_epoch, history)
