"""The checks a new model passes before it takes traffic; each failure is a ModelRejected naming its check.

Loading already checks the file against the contract's schema (:meth:`service.inference.OnnxModel.load`).
These checks compare it with the model that serves now and run it: every batch shape once (warm-up),
then the bundled canary images (CC0 dermoscopy, ``canary/``), which must give finite probabilities
that sum to 1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.batcher import PROBABILITIES, ModelOutput, Target
from service.errors import ModelRejected
from service.imaging import decode_image
from service.inference import InferenceModel
from service.metrics import ReloadResult

if TYPE_CHECKING:  # service.runtime runs the canary at start: no import cycle at run time
    from service.runtime import Served

# How a check's model run is executed: directly (at start), or by the batcher's worker between two batches
# (a swap: service.batcher.Batcher.run_between), so that serving and checking never run at the same time.
Execute = Callable[[Callable[[], ModelOutput]], ModelOutput]
CANARY_DIR = Path(__file__).with_name("canary")
CANARY_MAX_PIXELS = 1 << 24  # our own 320x240 files: LESIONSERVE_MAX_PIXELS is a limit on callers, not on them
# float32 softmax rows sum to 1 within ~1e-6; 1e-3 tolerates a sum of per-view means, never a missing softmax.
SUM_TOLERANCE = 1e-3
# The canary images' diagnoses (canary/ATTRIBUTION.txt). A new model that gets fewer of them right than the serving
# one (a model answering "nevus 100%" for everything: 2 of 4) needs force; so does one whose slowest check run
# takes over this fraction of REQUEST_TIMEOUT_S (it would answer 504s once serving).
CANARY_LABELS = {
    "ISIC_0000002.jpg": "mel",
    "ISIC_0000160.jpg": "mel",
    "ISIC_0000017.jpg": "nv",
    "ISIC_0000212.jpg": "nv",
}
SLOW_RUN_FRACTION = 0.25


def contract_changes(serving: Served, new: InferenceModel) -> list[str]:
    """What differs between the serving model and ``new`` that callers or this process depend on.

    Empty: the same contract (a retrained model). Otherwise each entry is one change, e.g.
    ``class list [...] -> [...]``; a reload accepts them only with ``force``.
    """
    old, meta = serving.meta, new.metadata
    changes = []
    if old.classes != meta.classes:  # callers map columns / codes to their own lists
        changes.append(f"class list {old.classes} -> {meta.classes}")
    if old.input_size != meta.input_size:
        changes.append(f"input size {old.input_size} -> {meta.input_size}")
    if old.malignant_classes != meta.malignant_classes:  # what the malignancy score sums
        changes.append(f"malignant classes {old.malignant_classes} -> {meta.malignant_classes}")
    for name, had, has in (("ood_score", old.ood, meta.ood), ("cam", old.cam, meta.cam)):
        if had is not None and has is None:  # answers would say "check unavailable"; OOD_POLICY=reject would stop
            changes.append(f"output {name!r} removed")
    if serving.model.provider != new.provider:  # e.g. CUDA out of memory beside the old session: CPU fallback
        changes.append(f"execution provider {serving.model.provider} -> {new.provider}")
    return changes


def _probabilities(out: ModelOutput) -> np.ndarray:
    return np.asarray(out if isinstance(out, np.ndarray) else out.get(PROBABILITIES))


def _check_output(out: ModelOutput, n: int, k: int) -> str | None:
    """Why ``out`` is not a model answer for a batch of ``n`` (None: it is)."""
    probs = _probabilities(out)
    if probs.shape != (n, k):
        return f"probabilities have shape {list(probs.shape)}, expected [{n}, {k}]"
    outputs = out if isinstance(out, Mapping) else {}
    for name, value in outputs.items():
        if np.asarray(value).shape[:1] != (n,):
            return f"output {name!r} has shape {list(np.asarray(value).shape)} for a batch of {n}"
    return None


def direct(fn: Callable[[], ModelOutput]) -> ModelOutput:
    return fn()


def _run(target: Target, batch: np.ndarray, check: ReloadResult, execute: Execute) -> ModelOutput:
    try:
        return execute(lambda: target.run(batch))
    except Exception as exc:  # ORT raises several types; one line for the operator
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise ModelRejected(
            check, f"{check} failed on a batch of {len(batch)}: {type(exc).__name__}: {reason}"
        ) from exc


def warm_up(target: Target, sizes: list[int], classes: int, execute: Execute = direct) -> None:
    """Run every batch shape the batcher can form once (first runs allocate and tune), checking each answer."""
    for n in sizes:
        out = _run(target, np.zeros((n, *target.input_shape), dtype=np.uint8), ReloadResult.WARM_UP, execute)
        problem = _check_output(out, n, classes)
        if problem is not None:
            raise ModelRejected(ReloadResult.WARM_UP, f"warm-up, batch of {n}: {problem}")


def canary_right(tops: list[str] | None, classes: list[str]) -> int | None:
    """How many canary images got their known diagnosis as top class (None: unknown, or the classes lack them)."""
    images = [name for name, _ in canary_images()]
    if tops is None or len(tops) != len(images) or not set(CANARY_LABELS.values()) <= set(classes):
        return None
    return sum(CANARY_LABELS.get(name) == top for name, top in zip(images, tops, strict=True))


def canary_images() -> list[tuple[str, bytes]]:
    """The bundled canary images: (file name, JPEG bytes)."""
    return [(p.name, p.read_bytes()) for p in sorted(CANARY_DIR.glob("*.jpg"))]


def canary(target: Target, classes: list[str], execute: Execute = direct) -> list[str]:
    """Run the canary images (one at a time: batch 1 is a warmed-up shape); returns each one's top class.

    Raises:
        ModelRejected: a row is not finite, leaves [0, 1], or does not sum to 1.
    """
    images = canary_images()
    if not images:  # an install without the package data would otherwise pass every model unchecked
        raise ModelRejected(ReloadResult.CANARY, f"no canary images in {CANARY_DIR}: the installation is incomplete")
    size = target.input_shape[0]
    tops = []
    for name, data in images:
        pixels = decode_image(data, size, CANARY_MAX_PIXELS).pixels
        out = _run(target, pixels[None], ReloadResult.CANARY, execute)
        problem = _check_output(out, 1, len(classes))
        row = _probabilities(out)[0] if problem is None else None
        if row is not None and not np.isfinite(row).all():
            problem = "probabilities are not finite"
        elif row is not None and ((row < -SUM_TOLERANCE).any() or (row > 1 + SUM_TOLERANCE).any()):
            problem = f"probabilities outside [0, 1] (min {row.min():.4g}, max {row.max():.4g})"
        elif row is not None and abs(float(row.sum()) - 1.0) > SUM_TOLERANCE:
            problem = f"probabilities sum to {float(row.sum()):.6g}, not 1"
        if problem is not None:
            raise ModelRejected(ReloadResult.CANARY, f"canary image {name}: {problem}")
        assert row is not None
        tops.append(classes[int(np.argmax(row))])
    return tops
