"""Verification run at every export: the ONNX file must be valid and compute what PyTorch computes.

Checks (tolerances from the issue): ``onnx.checker`` full check; ONNX Runtime vs PyTorch on real
images (fp32: max |dp| <= 1e-4; fp16: <= 1e-2 and the same top-1); a batch of 8 equals 8 single
images; with dihedral TTA an image and its rotations/flips agree to 1e-5; an ensemble equals the
mean of its members. :func:`verify` raises :class:`VerificationError` listing every failed check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from service.contract import INPUT_NAME, OUTPUT_NAME
from train.preprocess import center_crop_resize

log = logging.getLogger(__name__)

# Exact pixel permutations of NHWC images: the dihedral group acting on (H, W).
NHWC_SYMMETRIES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rot180": lambda x: np.rot90(x, 2, axes=(1, 2)),
    "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
    "hflip": lambda x: x[:, :, ::-1],
    "vflip": lambda x: x[:, ::-1],
    "transpose": lambda x: x.transpose(0, 2, 1, 3),
}


class VerificationError(RuntimeError):
    """The exported file failed a check; the message lists each failure with its measured value."""


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    tolerance: float
    passed: bool
    detail: str = ""

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.name}: {self.value:.3g} (tolerance {self.tolerance:g}) {verdict}{' - ' + self.detail if self.detail else ''}"


@dataclass(frozen=True)
class Tolerances:
    torch_parity: float = 1e-4  # fp16: 1e-2
    batch: float = 1e-5  # batch of 8 vs 8 singles
    dihedral: float = 1e-5
    ensemble: float = 1e-4
    dihedral_extras: float = 1e-4  # ood_score / cam under the views, relative to their scale; fp16: 1e-2

    @classmethod
    def for_precision(cls, fp16: bool) -> Tolerances:
        # fp16 backbones: rounding differs between kernels and batch layouts, hence the wider bounds.
        return cls(torch_parity=1e-2, batch=1e-3, ensemble=1e-2, dihedral_extras=1e-2) if fp16 else cls()


def load_images(paths: Sequence[Path], size: int) -> np.ndarray:
    """Decode, centre-crop to a square and resize with ``cv2.INTER_AREA``, as the service does.

    Args:
        paths: image files (JPEG/PNG).
        size: output side S.

    Returns:
        ``(B, S, S, 3)`` uint8 RGB.
    """
    out = []
    for p in paths:
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if bgr is None:
            raise VerificationError(f"{p}: not a readable image")
        out.append(center_crop_resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), size))
    if not out:
        raise VerificationError("no verification images given")
    return np.ascontiguousarray(np.stack(out), dtype=np.uint8)


def torch_outputs(model: nn.Module, images: np.ndarray) -> list[np.ndarray]:
    """Every output of the module (probabilities first, then the optional ones) as float32 arrays."""
    with torch.inference_mode():
        out = model(torch.from_numpy(np.ascontiguousarray(images)))
    return [t.float().numpy() for t in (out if isinstance(out, tuple) else (out,))]


def torch_probs(model: nn.Module, images: np.ndarray) -> np.ndarray:
    return torch_outputs(model, images)[0]


def _cam_symmetry(f: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """An NHWC symmetry applied to maps ``(N, K, h, w)``: the same permutation of the map's cells."""
    return lambda c: np.moveaxis(f(np.moveaxis(c, 1, -1)), -1, 1)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    """Max absolute difference over the reference's scale (OOD scores reach thousands, maps tens)."""
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))


class Verifier:
    """Runs the checks on one exported file.

    Args:
        path: the ``.onnx`` file.
        model: the PyTorch module that was exported.
        images: ``(B, S, S, 3)`` uint8 real images (8 or more for the batch check; fewer are tiled).
        tol: tolerances.
    """

    def __init__(self, path: Path, model: nn.Module, images: np.ndarray, tol: Tolerances) -> None:
        self.path = path
        self.model = model.eval()
        reps = -(-8 // len(images))  # ceil: the batch check needs 8 images
        self.images = np.concatenate([images] * reps)[: max(8, len(images))]
        self.tol = tol
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.run_all(images)[0]

    def run_all(self, images: np.ndarray) -> list[np.ndarray]:
        return list(self.session.run(None, {INPUT_NAME: np.ascontiguousarray(images)}))

    def extra_outputs(self, names: Sequence[str], dihedral: bool) -> list[Check]:
        """The optional outputs (``ood_score``, ``cam``): vs PyTorch, batch vs singles, and under the
        dihedral views the score invariant and the map rotating with the image (relative differences)."""
        ours, ref = self.run_all(self.images)[1:], torch_outputs(self.model, self.images)[1:]
        batch = self.run_all(self.images[:8])[1:]
        singles = [self.run_all(self.images[i : i + 1])[1:] for i in range(8)]
        tol, checks = self.tol, []
        for j, name in enumerate(names[1:]):
            diff = _relative(ours[j], ref[j])
            checks.append(Check(f"{name}: ORT vs PyTorch (relative)", diff, tol.torch_parity, diff <= tol.torch_parity))
            diff = _relative(batch[j], np.concatenate([s[j] for s in singles]))
            checks.append(Check(f"{name}: batch of 8 vs 8 singles", diff, tol.batch, diff <= tol.batch))
            if not dihedral:
                continue
            base = batch[j][:4]
            diffs = {}
            for sym, f in NHWC_SYMMETRIES.items():
                moved = self.run_all(f(self.images[:4]))[1 + j]
                diffs[sym] = _relative(moved, _cam_symmetry(f)(base) if base.ndim == 4 else base)
            worst = max(diffs, key=diffs.__getitem__)
            what = "map turns with the image" if base.ndim == 4 else "invariant"
            ok = diffs[worst] <= tol.dihedral_extras
            checks.append(Check(f"{name}: dihedral, {what}", diffs[worst], tol.dihedral_extras, ok, f"worst: {worst}"))
        return checks

    def checker(self) -> Check:
        try:
            onnx.checker.check_model(str(self.path), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            return Check("onnx.checker full_check", 1.0, 0.0, False, str(exc).splitlines()[0])
        return Check("onnx.checker full_check", 0.0, 0.0, True)

    def torch_parity(self, fp16: bool) -> Check:
        ours, ref = self.run(self.images), torch_probs(self.model, self.images)
        diff = float(np.abs(ours - ref).max())
        rows_ok = bool(np.allclose(ours.sum(axis=1), 1.0, atol=1e-4))
        # Same top-1 wherever the reference decides it: a near-tie (margin within twice the measured
        # error) is not a disagreement, and untrained test models have many near-ties.
        top2 = np.sort(ref, axis=1)[:, -2:]
        decided = (top2[:, 1] - top2[:, 0]) > 2 * diff
        flips = int(((ours.argmax(1) != ref.argmax(1)) & decided).sum())
        passed = diff <= self.tol.torch_parity and rows_ok and (flips == 0 or not fp16)
        detail = "" if passed else f"rows sum to 1: {rows_ok}, top-1 changed on {flips} image(s)"
        return Check(
            f"ORT vs PyTorch fp32 on {len(self.images)} real images", diff, self.tol.torch_parity, passed, detail
        )

    def batch_consistency(self) -> Check:
        batch = self.run(self.images[:8])
        singles = np.concatenate([self.run(self.images[i : i + 1]) for i in range(8)])
        diff = float(np.abs(batch - singles).max())
        return Check("batch of 8 vs 8 singles", diff, self.tol.batch, diff <= self.tol.batch)

    def dihedral_invariance(self) -> Check:
        base = self.run(self.images[:4])
        diffs = {name: float(np.abs(self.run(f(self.images[:4])) - base).max()) for name, f in NHWC_SYMMETRIES.items()}
        worst = max(diffs, key=diffs.__getitem__)
        return Check(
            "dihedral invariance (6 symmetries)",
            diffs[worst],
            self.tol.dihedral,
            diffs[worst] <= self.tol.dihedral,
            f"worst: {worst}",
        )

    def ensemble_mean(self, members: Sequence[nn.Module]) -> Check:
        mean = np.mean([torch_probs(m, self.images) for m in members], axis=0)
        diff = float(np.abs(self.run(self.images) - mean).max())
        return Check(f"ensemble vs mean of {len(members)} members", diff, self.tol.ensemble, diff <= self.tol.ensemble)


def verify(
    path: Path,
    model: nn.Module,
    images: np.ndarray,
    *,
    fp16: bool,
    dihedral: bool,
    members: Sequence[nn.Module] = (),
    outputs: Sequence[str] = (OUTPUT_NAME,),
) -> list[Check]:
    """Run every check that applies; raise :class:`VerificationError` if any fails.

    Args:
        path: the exported file.
        model: the exported PyTorch module (reference).
        images: real images at the model's input size.
        fp16: the file runs its backbones in float16 (wider tolerances, same top-1 required).
        dihedral: the TTA is the full dihedral group, so the output must be invariant under it.
        members: single-member modules (same TTA) of an ensemble; empty for one model.
        outputs: the file's output names, probabilities first; the optional ones get their own checks.
    """
    v = Verifier(path, model, images, Tolerances.for_precision(fp16))
    checks = [v.checker(), v.torch_parity(fp16), v.batch_consistency()]
    if dihedral:
        checks.append(v.dihedral_invariance())
    if len(members) > 1:
        checks.append(v.ensemble_mean(members))
    if len(outputs) > 1:
        checks += v.extra_outputs(outputs, dihedral)
    for c in checks:
        log.info("check %s", c)
    failed = [c for c in checks if not c.passed]
    if failed:
        raise VerificationError(f"{path}: verification failed: " + "; ".join(str(c) for c in failed))
    return checks
