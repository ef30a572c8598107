"""One training run end to end: data -> split -> cache -> fit -> temperature -> artifacts.

With ``folds = K`` the non-test part is split into K lesion-grouped folds and one model is
trained per fold into ``OUT/fold{i}/`` (export/ can ensemble them); ``OUT/metrics.json``
then summarises the folds.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from train.checkpoint import Checkpoint, save_checkpoint
from train.config import TrainConfig
from train.data import LabelledSet, load_images, load_labelled
from train.distill import Distiller, load_teachers
from train.engine import Dist, Split, fit, predict_logits
from train.losses import build_loss
from train.metrics import compute_metrics, fit_temperature
from train.models import build_model, input_normalization, load_pretrained, resolve_pretrained
from train.report import write_plots, write_report
from train.splits import grouped_kfold, grouped_split, limit_indices

log = logging.getLogger(__name__)
SUMMARY_KEYS = ("n", "balanced_accuracy", "accuracy", "macro_f1", "auc_macro", "top2_accuracy", "ece", "nll")


def setup(cfg: TrainConfig) -> tuple[torch.device, Dist]:
    """Seeds, threads, device and (under ``torchrun``) the process group."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = Dist()
    if dist.is_torchelastic_launched() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        d = Dist(dist.get_rank(), dist.get_world_size())
    if cfg.device == "auto":
        device = torch.device(f"cuda:{d.rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"config: device {cfg.device!r} requested but CUDA is not available")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)  # reproducible on CPU
    log.info("device %s, world size %d, torch threads %d", device, d.world, torch.get_num_threads())
    return device, d


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in SUMMARY_KEYS}


def train_one(
    cfg: TrainConfig, data: LabelledSet, x: torch.Tensor, parts: dict[str, np.ndarray], out: Path,
    device: torch.device, d: Dist, distiller: Distiller | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Fit one model on ``parts['train']``, select and calibrate on ``parts['val']``, report on test."""
    out.mkdir(parents=True, exist_ok=True)
    y = torch.from_numpy(data.labels)
    classes = data.classes
    model = build_model(cfg.arch, len(classes), head=cfg.head, dropout=cfg.dropout, hidden=cfg.hidden)
    if cfg.pretrained:
        load_pretrained(model, resolve_pretrained(cfg.arch, cfg.pretrained))
    mean, std = norm = input_normalization(cfg.arch)
    model = model.to(device)
    if cfg.channels_last:  # CPU too (oneDNN): docs/training.md measures it
        model = model.to(memory_format=torch.channels_last)
    counts = np.bincount(data.labels[parts["train"]], minlength=len(classes))
    loss_fn = build_loss(
        cfg.loss, counts, cfg.class_weighting, cfg.effective_beta, cfg.focal_gamma, cfg.focal_alpha,
        cfg.label_smoothing,
    ).to(device)  # fmt: skip
    net: torch.nn.Module = model
    if d.world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def make_ckpt(state: dict[str, torch.Tensor], epoch: int, metrics: dict[str, Any], t: float = 1.0) -> Checkpoint:
        return Checkpoint(
            arch=cfg.arch, classes=list(classes), img_size=cfg.img_size,
            model_state={k: v.detach().cpu().clone() for k, v in state.items()},
            head=cfg.head, dropout=cfg.dropout, hidden=cfg.hidden, class_names=data.class_names,
            temperature=t, metrics=metrics, config=cfg.to_dict(), epoch=epoch, dataset=data.dataset,
            normalization={"mean": list(mean), "std": list(std)},
        )  # fmt: skip

    tr, va, te = (Split(x[parts[k]], y[parts[k]]) for k in ("train", "val", "test"))
    kd = distiller.select(parts["train"]) if distiller is not None else None
    res = fit(cfg, net, loss_fn, tr, va, classes, out, make_ckpt, device, d, kd)
    model.load_state_dict(res.best_state)
    batch = max(cfg.batch_size, 128)
    cl = cfg.channels_last
    val_logits = predict_logits(model, va.x, batch, device, cl, norm)
    val_y = va.y.numpy()
    t = fit_temperature(val_logits, val_y)
    val_raw, val_cal = compute_metrics(val_logits, val_y, classes), compute_metrics(val_logits, val_y, classes, t)
    summary: dict[str, Any] = {
        "evaluated_on": "test" if len(te.y) else "val",
        "temperature": t,
        "best_epoch": res.best_epoch,
        "split_sizes": {k: len(v) for k, v in parts.items()},
        "val": val_cal,
        "val_uncalibrated": val_raw,
        "history": res.history,
        "dataset": data.dataset,
        "config": cfg.to_dict(),
    }
    eval_logits, eval_y, eval_m = val_logits, val_y, val_cal
    if len(te.y):
        eval_logits, eval_y = predict_logits(model, te.x, batch, device, cl, norm), te.y.numpy()
        summary["test_uncalibrated"] = compute_metrics(eval_logits, eval_y, classes)
        summary["test"] = eval_m = compute_metrics(eval_logits, eval_y, classes, t)
    # metrics.json's top level = the held-out set (test when there is one) for quick reading
    summary = {**{k: v for k, v in eval_m.items()}, **summary}
    ck_metrics = {**val_cal, "ece_before_temperature": val_raw["ece"], "nll_before_temperature": val_raw["nll"]}
    if "test" in summary:
        ck_metrics["test"] = _summary(summary["test"])
    if d.main:
        save_checkpoint(make_ckpt(res.best_state, res.best_epoch, ck_metrics, t), out / "best.pt")
        write_report(out, summary, classes)
        write_plots(
            out,
            classes,
            res.history,
            cfg.monitor,
            val_logits,
            val_y,
            t,
            eval_logits,
            eval_y,
            eval_m["confusion_matrix"],
        )
        log.info(
            "%s: balanced accuracy %.4f, macro-F1 %.4f, ECE %.4f -> %.4f (T=%.3f); wrote %s",
            summary["evaluated_on"], eval_m["balanced_accuracy"], eval_m["macro_f1"],
            (summary.get("test_uncalibrated") or val_raw)["ece"], eval_m["ece"], t, out / "best.pt",
        )  # fmt: skip
    return summary


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train as configured; returns the run summary (also written to ``OUT/metrics.json``)."""
    device, d = setup(cfg)
    out = Path(cfg.out)
    data = load_labelled(cfg.data, cfg.images or None, cfg.classes or None)
    data = data.subset(limit_indices(data.labels, data.groups, cfg.limit, cfg.seed))
    log.info("%d images, classes %s, counts %s", len(data.paths), data.classes, data.counts().tolist())
    if d.main:
        cfg.save(out / "config.yaml")
    x = torch.from_numpy(load_images(data.paths, cfg.img_size, cfg.load_workers))
    distiller = None
    if cfg.teacher:  # teacher outputs for every image once; each fold takes its training rows
        distiller = Distiller(load_teachers(cfg.teacher, data.paths, data.classes, device), cfg.kd_alpha,
                              cfg.kd_temperature)  # fmt: skip
    if cfg.folds < 2:
        parts = grouped_split(data.labels, data.groups, data.classes, cfg.val_frac, cfg.test_frac, cfg.seed)
        _write_split(out, data, parts, d)
        return train_one(cfg, data, x, parts, out, device, d, distiller)
    outer = grouped_split(data.labels, data.groups, data.classes, 0.0, cfg.test_frac, cfg.seed)
    rest = outer["train"]
    folds = grouped_kfold(data.labels[rest], [data.groups[i] for i in rest], data.classes, cfg.folds, cfg.seed)
    results = []
    for i, f in enumerate(folds):
        parts = {"train": rest[f["train"]], "val": rest[f["val"]], "test": outer["test"]}
        log.info("fold %d/%d: %s", i + 1, cfg.folds, {k: len(v) for k, v in parts.items()})
        _write_split(out / f"fold{i}", data, parts, d)
        results.append(train_one(cfg, data, x, parts, out / f"fold{i}", device, d, distiller))
    keys = ("balanced_accuracy", "macro_f1", "auc_macro", "accuracy", "ece")
    summary = {
        "folds": cfg.folds,
        "mean": {k: float(np.mean([r[k] for r in results if r[k] is not None])) for k in keys},
        "std": {k: float(np.std([r[k] for r in results if r[k] is not None])) for k in keys},
        "per_fold": [{**_summary(r), "temperature": r["temperature"]} for r in results],
        "checkpoints": [str(out / f"fold{i}" / "best.pt") for i in range(cfg.folds)],
    }
    if d.main:
        (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def _write_split(out: Path, data: LabelledSet, parts: dict[str, np.ndarray], d: Dist) -> None:
    """Image ids per side, so a split can be audited and reused (e.g. the loss comparison)."""
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        split = {k: [data.paths[i].stem for i in v] for k, v in parts.items()}
        (out / "split.json").write_text(json.dumps(split))
