"""The checkpoint file: the seam between ``train/`` and ``export/``.

A checkpoint is a ``torch.save`` dict (loaded with ``weights_only=True``: plain tensors,
numbers, strings, lists and dicts only) with these keys:

=================  ===============================================================
``format``         ``"lesionserve.checkpoint/1"``
``arch``           registry name (``train.models.ARCHITECTURES``)
``head``           ``"linear"`` or ``"mlp"``; ``dropout``, ``hidden`` for the head
``classes``        ordered class codes, e.g. ``["akiec", "bcc", ...]``
``class_names``    code -> display name
``img_size``       square input side S the model was trained at
``normalization``  ``{"mean": [3], "std": [3]}`` on [0, 1] pixels (absent in older files: the arch's own)
``model_state``    the model's state dict
``temperature``    fitted on validation (1.0 when not fitted)
``metrics``        validation metrics of this checkpoint (dict)
``config``         the resolved training config (dict)
``epoch``          epochs completed
``dataset``        ``{"name", "license", "citation"}``
``optimizer_state``/``scheduler_state``/``rng_state``: optional, for resume
=================  ===============================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from train.models import Classifier, build_model, input_normalization
from train.preprocess import Norm

FORMAT = "lesionserve.checkpoint/1"
REQUIRED = ("format", "arch", "classes", "img_size", "model_state")


class CheckpointError(ValueError):
    """A file that is not a usable lesionserve checkpoint; the message names the file."""


@dataclass
class Checkpoint:
    arch: str
    classes: list[str]
    img_size: int
    model_state: dict[str, torch.Tensor]
    head: str = "linear"
    dropout: float = 0.0
    hidden: int = 512
    class_names: dict[str, str] = field(default_factory=dict)
    temperature: float = 1.0
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    dataset: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # optimizer/scheduler/rng for resume
    normalization: dict[str, list[float]] = field(default_factory=dict)  # {} = the architecture's own

    def norm(self) -> Norm:
        """``(mean, std)`` the model was trained with: stored in the file, else the architecture's."""
        if self.normalization:
            return tuple(self.normalization["mean"]), tuple(self.normalization["std"])
        return input_normalization(self.arch)

    def build(self) -> Classifier:
        """The model with its weights loaded, in eval mode."""
        model = build_model(self.arch, len(self.classes), head=self.head, dropout=self.dropout, hidden=self.hidden)
        model.load_state_dict(self.model_state, strict=True)
        return model.eval()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": FORMAT,
            "arch": self.arch,
            "head": self.head,
            "dropout": self.dropout,
            "hidden": self.hidden,
            "classes": list(self.classes),
            "class_names": dict(self.class_names),
            "img_size": int(self.img_size),
            "model_state": self.model_state,
            "temperature": float(self.temperature),
            "metrics": self.metrics,
            "config": self.config,
            "epoch": int(self.epoch),
            "dataset": dict(self.dataset),
            "normalization": {"mean": list(self.norm()[0]), "std": list(self.norm()[1])},
        }
        d.update(self.extra)
        return d


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(ckpt.to_dict(), tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint; every failure is a :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(raw).__name__}")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise CheckpointError(f"{path}: not a lesionserve checkpoint (missing keys: {', '.join(missing)})")
    if raw["format"] != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {raw['format']!r} (expected {FORMAT!r})")
    known = {f for f in Checkpoint.__dataclass_fields__ if f != "extra"} | {"format"}
    ckpt = Checkpoint(
        arch=str(raw["arch"]),
        classes=[str(c) for c in raw["classes"]],
        img_size=int(raw["img_size"]),
        model_state=raw["model_state"],
        head=str(raw.get("head", "linear")),
        dropout=float(raw.get("dropout", 0.0)),
        hidden=int(raw.get("hidden", 512)),
        class_names={str(k): str(v) for k, v in raw.get("class_names", {}).items()},
        temperature=float(raw.get("temperature", 1.0)),
        metrics=dict(raw.get("metrics", {})),
        config=dict(raw.get("config", {})),
        epoch=int(raw.get("epoch", 0)),
        dataset={str(k): str(v) for k, v in raw.get("dataset", {}).items()},
        extra={k: v for k, v in raw.items() if k not in known},
        normalization={str(k): [float(x) for x in v] for k, v in raw.get("normalization", {}).items()},
    )
    if ckpt.normalization and (
        set(ckpt.normalization) != {"mean", "std"} or any(len(v) != 3 for v in ckpt.normalization.values())
    ):
        raise CheckpointError(f"{path}: normalization must be {{'mean': [3 floats], 'std': [3 floats]}}")
    if ckpt.temperature <= 0:
        raise CheckpointError(f"{path}: temperature must be > 0, found {ckpt.temperature}")
    try:
        ckpt.build()
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit architecture {ckpt.arch!r}: {exc}") from exc
    return ckpt
