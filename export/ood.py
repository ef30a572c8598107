"""Fit the out-of-distribution check at export: Mahalanobis statistics on training features, the threshold on validation.

``python -m export CKPT --out X.onnx --ood-data DATA --ood-split runs/x/split.json`` reads two parts of the
split written by ``python -m train``: ``train`` (class means and the shared covariance of the pooled features,
Mahalanobis only) and ``val`` (the threshold: the score that ``--ood-pass-rate`` of in-distribution
validation images stay at or below). The test part is never read here; ``python -m export.ood_eval`` uses it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import torch
from sklearn.covariance import LedoitWolf

from export.acquisition import ShiftPlan, shifted
from export.evaluate import select
from export.explain import MahalanobisStats, OodHead, feature_map
from export.metadata import ExportError
from export.wrappers import CalibratedMember, to_nchw_float
from service.contract import INPUT_NAME, OOD_METHODS, OOD_OUTPUT, OodSpec
from train.data import DataError, LabelledSet, load_images, load_labelled
from train.preprocess import center_crop_resize

log = logging.getLogger(__name__)

DEFAULT_METHOD = "mahalanobis"  # measured against energy in docs/export.md ("Out-of-distribution check")
DEFAULT_PASS_RATE = 0.95


@dataclass(frozen=True)
class OodConfig:
    """What ``--ood-*`` asked for.

    Attributes:
        data: labelled in-distribution data (the training data's folder or CSV).
        split: ``split.json`` written by ``python -m train`` (parts ``train`` and ``val``).
        method: ``mahalanobis`` or ``energy``.
        pass_rate: share of validation images that must pass the threshold.
        fit_limit: at most this many training images for the Mahalanobis fit (0: all).
        shifts: acquisition-shifted copies of each validation image scored with it for the threshold
            (:mod:`export.acquisition`); ``copies=0`` chooses on the validation images alone.
    """

    data: Path
    split: Path
    method: str = DEFAULT_METHOD
    pass_rate: float = DEFAULT_PASS_RATE
    fit_limit: int = 0
    shifts: ShiftPlan = field(default_factory=ShiftPlan)

    def __post_init__(self) -> None:
        if self.method not in OOD_METHODS:
            raise ExportError(f"unknown --ood-method {self.method!r}: expected one of {', '.join(OOD_METHODS)}")
        if not 0.5 <= self.pass_rate < 1.0:
            raise ExportError(f"--ood-pass-rate must be in [0.5, 1), got {self.pass_rate}")
        if self.fit_limit < 0:
            raise ExportError(f"--ood-fit-limit must be >= 0, got {self.fit_limit}")
        if not self.split.is_file():
            raise ExportError(f"--ood-split {self.split}: no such file")
        try:
            parts = json.loads(self.split.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ExportError(f"--ood-split {self.split}: not a split.json ({exc})") from exc
        needed = ["val"] + (["train"] if self.method == "mahalanobis" else [])
        missing = [p for p in needed if not isinstance(parts, dict) or not parts.get(p)]
        if missing:
            raise ExportError(f"--ood-split {self.split}: no images in part(s) {', '.join(missing)}")


def labelled_part(cfg: OodConfig, classes: list[str], part: str, limit: int = 0) -> LabelledSet:
    """One part of the split, in the model's class order (a seeded random subset of ``limit`` images)."""
    try:
        data = select(load_labelled(cfg.data, None, classes), cfg.split, part)
    except (DataError, ValueError, OSError) as exc:
        raise ExportError(f"--ood-data/--ood-split, part {part!r}: {exc}") from exc
    if limit and len(data.paths) > limit:
        idx = np.sort(np.random.default_rng(0).choice(len(data.paths), limit, replace=False))
        data = data.subset(idx)
    return data


def _load(data: LabelledSet, size: int) -> np.ndarray:
    try:
        return load_images(data.paths, size)
    except DataError as exc:
        raise ExportError(f"--ood-data: {exc}") from exc


def pooled_features(member: CalibratedMember, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """``(B, F)`` float64 pooled features of uint8 ``(B, S, S, 3)`` images (identity view), as the graph computes them."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = member.prepare(to_nchw_float(torch.from_numpy(np.ascontiguousarray(images[i : i + batch]))))
            a = feature_map(member.backbone, x.half() if member.fp16 else x)
            out.append(a.mean(dim=(2, 3)).to(torch.float64).numpy())
    return np.concatenate(out)


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray) -> MahalanobisStats:
    """Class means and a whitening of the shared (Ledoit-Wolf shrunk) covariance of the class-centred features.

    Args:
        features: ``(B, F)`` pooled training features.
        labels: ``(B,)`` class indices; classes without images get no mean.

    Raises:
        ExportError: fewer than two images.
    """
    if len(features) < 2:
        raise ExportError(f"the Mahalanobis fit needs training images, got {len(features)}")
    present = np.unique(labels)
    means = np.stack([features[labels == k].mean(axis=0) for k in present])  # (K', F)
    centred = features - means[np.searchsorted(present, labels)]
    # Shrinkage keeps the covariance invertible when F (512-2048) is near the number of images.
    cov = LedoitWolf(assume_centered=True).fit(centred).covariance_
    eigval, eigvec = np.linalg.eigh(cov)
    eigval = np.maximum(eigval, eigval.max() * 1e-10)
    return MahalanobisStats(means=means, whitening=eigvec / np.sqrt(eigval))  # (f W)(f W)^T = f cov^-1 f^T


def ood_heads(
    cfg: OodConfig, members: Sequence[CalibratedMember], classes: list[str], size: int
) -> tuple[list[OodHead], int | None]:
    """One OOD head per member (the Mahalanobis ones fitted on the split's training part), and that part's size."""
    if cfg.method == "energy":
        return [OodHead("energy") for _ in members], None
    train = labelled_part(cfg, classes, "train", cfg.fit_limit)
    images = _load(train, size)
    heads = []
    for member in members:
        stats = fit_mahalanobis(pooled_features(member, images), np.asarray(train.labels))
        heads.append(OodHead("mahalanobis", stats))
    log.info("Mahalanobis statistics fitted on %d training images", len(images))
    return heads, len(images)


def choose_ood_threshold(scores: np.ndarray, pass_rate: float) -> tuple[float, float]:
    """The smallest observed score that at least ``pass_rate`` of ``scores`` are <= to; and the share that is.

    Raises:
        ExportError: no scores, or a score that is not finite.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0 or not np.isfinite(scores).all():
        raise ExportError("the OOD threshold needs finite scores of validation images")
    ordered = np.sort(scores)
    threshold = float(ordered[math.ceil(pass_rate * len(ordered)) - 1])
    return threshold, float((scores <= threshold).mean())


def fitted_on(cfg: OodConfig, n_val: int, n_train: int | None) -> dict[str, Any]:
    """The ``ood.fitted_on`` metadata: where the threshold and statistics came from."""
    facts: dict[str, Any] = {
        "data": str(cfg.data),
        "split": str(cfg.split),
        "threshold_part": "val",
        "validation_images": n_val,
        "target_pass_rate": cfg.pass_rate,
        "aggregation": "mean over TTA views and ensemble members",
    }
    if cfg.shifts.copies:
        facts["acquisition_shifts"] = cfg.shifts.describe()
    if n_train is not None:
        facts.update(statistics_part="train", training_images=n_train, covariance="Ledoit-Wolf, shared, class-centred")
    return facts


def onnx_output(model: Path, images: np.ndarray, name: str, batch: int = 32) -> np.ndarray:
    """One output of an exported file for uint8 ``(B, S, S, 3)`` images, run in batches on the CPU."""
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    if name not in {o.name for o in sess.get_outputs()}:
        raise ExportError(f"{model} has no output {name!r}")
    return np.concatenate(
        [sess.run([name], {INPUT_NAME: images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    )


def shifted_images(data: LabelledSet, size: int, plan: ShiftPlan) -> np.ndarray:
    """The images of ``data`` and ``plan.copies`` acquisition-shifted copies of each, at the model's input size.

    Shifts apply to the full-size image before the canonical crop and resize, as a different camera would.
    """
    out = np.empty((len(data.paths) * (1 + plan.copies), size, size, 3), dtype=np.uint8)
    n = 0
    for i, path in enumerate(data.paths):
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ExportError(f"--ood-data: {path}: unreadable or not an image")
        rgb = np.ascontiguousarray(bgr[..., ::-1])
        for img in [rgb, *shifted(rgb, plan, i)]:
            out[n] = center_crop_resize(img, size)
            n += 1
    return out


def validation_scores(path: Path, cfg: OodConfig, classes: list[str], size: int) -> tuple[np.ndarray, int]:
    """``ood_score`` of the validation part and its shifted copies by the file at ``path``; and the part's size."""
    val = labelled_part(cfg, classes, "val")
    images = shifted_images(val, size, cfg.shifts) if cfg.shifts.copies else _load(val, size)
    return onnx_output(path, images, OOD_OUTPUT), len(val.paths)


def threshold_ood(path: Path, cfg: OodConfig, classes: list[str], size: int, n_train: int | None) -> OodSpec:
    """Score the validation part (and its acquisition-shifted copies) with the exported file; choose the threshold."""
    scores, n_val = validation_scores(path, cfg, classes, size)
    threshold, rate = choose_ood_threshold(scores, cfg.pass_rate)
    log.info("OOD threshold %.4g: %.1f%% of %d validation scores pass (%d images, %d shifted copies each)",
             threshold, 100 * rate, len(scores), n_val, cfg.shifts.copies)  # fmt: skip
    return OodSpec(method=cfg.method, threshold=threshold, pass_rate=rate, fitted_on=fitted_on(cfg, n_val, n_train))
