"""Classification metrics and temperature scaling.

Balanced accuracy (mean per-class recall) is the ISIC 2018 Task 3 metric and the default
model-selection metric: plain accuracy rewards predicting the majority class ``nv``.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

log = logging.getLogger(__name__)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with ``bins`` equal-width confidence bins (Guo et al. 2017)."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and count, for the reliability diagram."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    out: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": [], "lower": [], "upper": []}
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        out["lower"].append(float(lo))
        out["upper"].append(float(hi))
        out["count"].append(float(m.sum()))
        out["confidence"].append(float(conf[m].mean()) if m.any() else math.nan)
        out["accuracy"].append(float(correct[m].mean()) if m.any() else math.nan)
    return out


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    t = torch.from_numpy(logits).double() / temperature
    return float(F.cross_entropy(t, torch.from_numpy(labels).long()))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits).double() / temperature, dim=1).numpy()


def compute_metrics(
    logits: np.ndarray, labels: np.ndarray, classes: list[str], temperature: float = 1.0
) -> dict[str, Any]:
    """Every reported metric for ``(N, K)`` logits and ``(N,)`` integer labels.

    Classes without images in ``labels`` are left out of balanced accuracy, macro-F1 and
    AUC (their recall is undefined) and listed under ``absent_classes``.
    """
    k = len(classes)
    probs = softmax(logits, temperature)
    pred = probs.argmax(1)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    support = cm.sum(1)
    predicted = cm.sum(0)
    tp = np.diag(cm).astype(np.float64)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    present = support > 0
    ranks = np.argsort(-probs, axis=1)
    aucs = []
    for c in np.flatnonzero(present):
        y = labels == c
        if 0 < y.sum() < len(y):
            aucs.append(roc_auc_score(y, probs[:, c]))
    return {
        "n": len(labels),
        "balanced_accuracy": float(recall[present].mean()),
        "accuracy": float((pred == labels).mean()),
        "macro_f1": float(f1[present].mean()),
        "auc_macro": float(np.mean(aucs)) if aucs else None,
        "top2_accuracy": float((ranks[:, :2] == labels[:, None]).any(1).mean()),
        "top3_accuracy": float((ranks[:, :3] == labels[:, None]).any(1).mean()),
        "ece": expected_calibration_error(probs, labels),
        "nll": nll(logits, labels, temperature),
        "temperature": float(temperature),
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
        "absent_classes": [c for i, c in enumerate(classes) if not present[i]],
    }


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T minimising validation NLL of ``softmax(logits / T)``.

    Guarded: optimises log T (so T > 0), bounds T to [0.05, 20], and returns 1.0 when the
    fit is not finite or does not lower the NLL (a tiny or degenerate validation set).
    """
    x = torch.from_numpy(logits).double()
    y = torch.from_numpy(labels).long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x / log_t.clamp(math.log(0.05), math.log(20)).exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().clamp(math.log(0.05), math.log(20)).exp())
    before, after = nll(logits, labels), nll(logits, labels, t) if math.isfinite(t) else math.inf
    if not math.isfinite(t) or t <= 0 or not after <= before:
        log.warning("temperature fit rejected (T=%s, NLL %.4f -> %.4f); keeping T=1", t, before, after)
        return 1.0
    log.info("temperature T=%.3f: validation NLL %.4f -> %.4f", t, before, after)
    return t
