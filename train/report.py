"""Run artifacts: ``metrics.json``, ``report.md`` and the PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on training nodes
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_curve

from train.metrics import reliability_bins, softmax

log = logging.getLogger(__name__)


def plot_confusion(cm: list[list[int]], classes: list[str], path: Path) -> None:
    m = np.asarray(cm, dtype=float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)  # row-normalised: the diagonal is per-class recall
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(classes), 1 + 0.7 * len(classes)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(m[i, j])}\n{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xticks(range(len(classes)), classes, rotation=45)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (count, row fraction)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(probs: np.ndarray, labels: np.ndarray, classes: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for c, name in enumerate(classes):
        y = labels == c
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, probs[:, c])
            ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("one-vs-rest ROC")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(history: list[dict[str, float]], monitor: str, path: Path) -> None:
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    a.plot(ep, [h["val_loss"] for h in history], "o-", label="val NLL")
    a.set_xlabel("epoch")
    a.legend()
    for key in ("balanced_accuracy", "macro_f1", "accuracy"):
        b.plot(ep, [h[key] for h in history], "o-", label=f"val {key}")
    b.set_xlabel("epoch")
    b.set_title(f"selection metric: {monitor}")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(logits: np.ndarray, labels: np.ndarray, temperature: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for t, name in ((1.0, "before"), (temperature, f"after (T={temperature:.2f})")):
        r = reliability_bins(softmax(logits, t), labels)
        ax.plot(r["confidence"], r["accuracy"], "o-", label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability (validation)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row(name: str, m: dict[str, Any]) -> str:
    auc = "n/a" if m.get("auc_macro") is None else f"{m['auc_macro']:.4f}"
    return (
        f"| {name} | {m['n']} | {m['balanced_accuracy']:.4f} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {auc} |"
        f" {m['top2_accuracy']:.4f} | {m['ece']:.4f} |"
    )


def write_report(out: Path, summary: dict[str, Any], classes: list[str]) -> None:
    """``metrics.json`` and ``report.md`` from a run summary (see ``train/run.py``)."""
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"# Training report: {summary['config']['arch']} at {summary['config']['img_size']} px",
        "",
        f"Data: {summary['dataset'].get('name', '?')} ({summary['dataset'].get('license', 'licence unknown')}),"
        f" split: {summary['split_sizes']}. Loss: {summary['config']['loss']}. Best epoch {summary['best_epoch']}"
        f" of {len(summary['history'])} by validation {summary['config']['monitor']}."
        f" Temperature {summary['temperature']:.3f} (fitted on validation).",
        "",
        "| set | n | balanced acc | accuracy | macro-F1 | AUC (macro OvR) | top-2 | ECE |",
        "|---|---|---|---|---|---|---|---|",
        _row("validation, T=1", summary["val_uncalibrated"]),
        _row("validation, fitted T", summary["val"]),
    ]
    if summary.get("test"):
        lines += [_row("test, T=1", summary["test_uncalibrated"]), _row("test, fitted T", summary["test"])]
    main = summary.get("test") or summary["val"]
    lines += ["", f"Per class ({'test' if summary.get('test') else 'validation'}):", ""]
    lines += ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for c in classes:
        p = main["per_class"][c]
        lines.append(f"| {c} | {p['precision']:.3f} | {p['recall']:.3f} | {p['f1']:.3f} | {p['support']} |")
    lines += ["", "![confusion](confusion_matrix.png) ![roc](roc.png)", "", "![curves](curves.png)"]
    lines += ["![reliability](reliability.png)", ""]
    if summary["dataset"].get("citation"):
        lines += [f"Data citation: {summary['dataset']['citation']}", ""]
    (out / "report.md").write_text("\n".join(lines))


def write_plots(
    out: Path,
    classes: list[str],
    history: list[dict[str, float]],
    monitor: str,
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    temperature: float,
    eval_logits: np.ndarray,
    eval_labels: np.ndarray,
    cm: list[list[int]],
) -> None:
    """The four PNGs; confusion and ROC on the evaluation set (test when there is one)."""
    plot_confusion(cm, classes, out / "confusion_matrix.png")
    plot_roc(softmax(eval_logits, temperature), eval_labels, classes, out / "roc.png")
    plot_curves(history, monitor, out / "curves.png")
    plot_reliability(val_logits, val_labels, temperature, out / "reliability.png")
