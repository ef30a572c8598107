"""Multi-teacher knowledge distillation: specialist or generalist teachers -> one fast student.

Teachers are lesionserve checkpoints (``.pt``) or exported models (``.onnx``, their TTA,
temperature and preprocessing inside). A teacher may cover a subset of the student's classes
(a specialist, e.g. ``mel``/``nv`` only): its classes are mapped by code onto the student's
order, and the student is distilled on that subset, renormalised.

Teacher outputs are computed once per image before training ("offline" distillation) on
the un-augmented image: the lesion's class does not change under the flips, rotations,
crops and colour jitter used here, and a teacher forward per step would cost more than the
student's own step on a CPU. A CutMix/Mixup batch mixes the teacher targets with the same
``lam`` as the labels.

Loss per batch: ``(1 - alpha) * hard + alpha * mean_t T^2 * KL(q_t^T || p_s^T restricted to C_t)``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from train.checkpoint import load_checkpoint
from train.data import load_images

log = logging.getLogger(__name__)


@dataclass
class Teacher:
    """One teacher's log-probabilities over its classes, for every image of the run (in run order)."""

    source: str
    logp: torch.Tensor  # (N, K_t) float32, log-probabilities at T = 1
    index: torch.Tensor  # (K_t,) int64: the student's class index of each teacher class


def _map_classes(source: str, teacher_classes: Sequence[str], student: Sequence[str]) -> torch.Tensor:
    unknown = [c for c in teacher_classes if c not in student]
    if unknown:
        raise ValueError(
            f"teacher {source}: classes {unknown} are not among the student's ({', '.join(student)});"
            " a teacher may cover a subset of the student's classes, not others"
        )
    if len(teacher_classes) < 2:
        raise ValueError(f"teacher {source}: needs at least 2 classes to distil, has {list(teacher_classes)}")
    return torch.tensor([list(student).index(c) for c in teacher_classes], dtype=torch.int64)


def _onnx_logp(path: Path, paths: Sequence[Path], batch: int) -> tuple[list[str], np.ndarray]:
    """Log-probabilities of an exported lesionserve model (read with ONNX Runtime, no export/ import)."""
    import onnxruntime as ort  # the train extra installs it; imported here so .pt-only runs do not need it

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    props = sess.get_modelmeta().custom_metadata_map
    try:
        classes = [str(c) for c in json.loads(props["lesionserve.classes"])]
        size = int(json.loads(props["lesionserve.input_size"]))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"teacher {path}: not a lesionserve model (metadata {exc} missing or invalid)") from exc
    images = load_images(list(paths), size)
    name = sess.get_inputs()[0].name
    probs = np.concatenate([sess.run(None, {name: images[i : i + batch]})[0] for i in range(0, len(images), batch)])
    return classes, np.log(np.clip(probs, 1e-8, 1.0)).astype(np.float32)


def _checkpoint_logp(
    path: Path, paths: Sequence[Path], batch: int, device: torch.device
) -> tuple[list[str], np.ndarray]:
    from train.engine import predict_logits  # deferred: engine imports this module

    ck = load_checkpoint(path)
    x = torch.from_numpy(load_images(list(paths), ck.img_size))
    logits = predict_logits(ck.build().to(device), x, batch, device, norm=ck.norm())
    return ck.classes, torch.log_softmax(torch.from_numpy(logits) / ck.temperature, dim=1).numpy()


def load_teachers(
    sources: Sequence[str], paths: Sequence[Path], student_classes: Sequence[str], device: torch.device, batch: int = 64
) -> list[Teacher]:
    """Run every teacher once over ``paths`` (all images of the run); raises ``ValueError`` on a bad teacher."""
    teachers = []
    for src in sources:
        p = Path(src)
        if not p.is_file():
            raise ValueError(f"teacher {src}: no such file")
        if p.suffix == ".onnx":
            classes, logp = _onnx_logp(p, paths, batch)
        else:
            classes, logp = _checkpoint_logp(p, paths, batch, device)
        index = _map_classes(src, classes, student_classes)
        log.info("teacher %s: %d classes %s, outputs for %d images", src, len(classes), classes, len(logp))
        teachers.append(Teacher(src, torch.from_numpy(logp), index))
    return teachers


class Distiller:
    """The distillation term for batches of the training part.

    Args:
        teachers: from :func:`load_teachers`, already restricted to the training part's rows.
        alpha: weight of the distillation term (the hard-label loss gets ``1 - alpha``).
        temperature: softening temperature.
    """

    def __init__(self, teachers: Sequence[Teacher], alpha: float, temperature: float) -> None:
        if not teachers:
            raise ValueError("Distiller needs at least one teacher")
        self.teachers = list(teachers)
        self.alpha = alpha
        self.t = temperature

    def to(self, device: torch.device) -> Distiller:
        for t in self.teachers:
            t.logp, t.index = t.logp.to(device), t.index.to(device)
        return self

    def loss(self, logits: torch.Tensor, rows_a: torch.Tensor, rows_b: torch.Tensor, lam: float) -> torch.Tensor:
        """``T^2 * KL`` averaged over teachers and the batch.

        Args:
            logits: student logits ``(B, K)``.
            rows_a, rows_b: training-part rows of the two mixed images per sample (equal when not mixed).
            lam: share of ``rows_a`` in the mix.
        """
        total = logits.new_zeros(())
        for t in self.teachers:
            q = torch.softmax(t.logp[rows_a] / self.t, dim=1)  # (B, K_t)
            if lam != 1.0:
                q = lam * q + (1 - lam) * torch.softmax(t.logp[rows_b] / self.t, dim=1)
            log_p = torch.log_softmax(logits.float()[:, t.index] / self.t, dim=1)  # student on the teacher's classes
            total = total + F.kl_div(log_p, q, reduction="batchmean") * self.t**2
        return total / len(self.teachers)

    def select(self, rows: np.ndarray) -> Distiller:
        """A distiller over a subset of rows (e.g. the training part of a split)."""
        sel = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        return Distiller([Teacher(t.source, t.logp[sel], t.index) for t in self.teachers], self.alpha, self.t)
