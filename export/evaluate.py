"""Evaluate an exported ``.onnx`` file, the artifact users run, on a labelled set with ONNX Runtime.

``python -m export.evaluate MODEL.onnx --data PATH [--split runs/x/split.json --part test]
[--out DIR] [--target-sensitivity 0.9 --threshold-part val]``

Unlike ``python -m train.evaluate`` (a checkpoint in PyTorch, no TTA), this measures the file
with everything inside it: preprocessing, TTA views, temperature, ensemble mean. It also
measures the malignancy score (sum of the malignant classes' probabilities) as a binary
test: AUC, and sensitivity/specificity at the file's threshold, or picks the threshold that
reaches a target sensitivity on another part of the split (validation, never test).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from sklearn.metrics import roc_auc_score

from export.bootstrap import bootstrap_ci
from export.metadata import read_metadata
from service.contract import INPUT_NAME
from train.data import DataError, LabelledSet, load_images, load_labelled
from train.metrics import compute_metrics
from train.report import plot_confusion, plot_reliability, plot_roc

log = logging.getLogger(__name__)


def onnx_probabilities(model: Path, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """``(N, K)`` probabilities of the file for uint8 ``(N, S, S, 3)`` images."""
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out = [sess.run(None, {INPUT_NAME: images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    return np.concatenate(out).astype(np.float64)


def malignancy_scores(probs: np.ndarray, classes: list[str], malignant: list[str]) -> np.ndarray:
    idx = [classes.index(c) for c in malignant]
    return probs[:, idx].sum(1)


def operating_point(scores: np.ndarray, positive: np.ndarray, threshold: float) -> dict[str, Any]:
    """Binary figures of ``score >= threshold`` against ``positive`` (a boolean per image)."""
    flagged = scores >= threshold
    tp, fn = int((flagged & positive).sum()), int((~flagged & positive).sum())
    tn, fp = int((~flagged & ~positive).sum()), int((flagged & ~positive).sum())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    both = 0 < positive.sum() < len(positive)
    return {
        "threshold": float(threshold),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "positives": tp + fn,
        "negatives": tn + fp,
        "auc": float(roc_auc_score(positive, scores)) if both else None,
    }


def choose_threshold(scores: np.ndarray, positive: np.ndarray, target_sensitivity: float) -> float:
    """The highest threshold whose sensitivity is still >= the target (fewest false alarms)."""
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    pos = np.sort(scores[positive])[::-1]
    if len(pos) == 0:
        raise ValueError("no malignant images to choose a threshold on")
    k = int(np.ceil(target_sensitivity * len(pos)))  # flag at least k of the positives
    return float(pos[k - 1])


def select(data: LabelledSet, split: Path | None, part: str | None) -> LabelledSet:
    """The images of one part of a ``split.json`` written by ``python -m train`` (all when none)."""
    if split is None:
        return data
    parts = json.loads(split.read_text())
    if part not in parts:
        raise ValueError(f"{split}: no part {part!r}; it has {', '.join(parts)}")
    wanted = set(parts[part])
    idx = np.array([i for i, p in enumerate(data.paths) if p.stem in wanted], dtype=np.int64)
    if len(idx) != len(wanted):
        raise ValueError(f"{split}: {len(wanted) - len(idx)} images of part {part!r} are not in the data")
    return data.subset(idx)


def evaluate_onnx(
    model: Path,
    data: str | Path,
    split: Path | None = None,
    part: str | None = None,
    out: Path | None = None,
    threshold: float | None = None,
    bootstrap: int = 1000,
) -> dict[str, Any]:
    """Every metric of the file on one labelled set; plots into ``out`` when given.

    ``bootstrap``: resamples of the lesion-clustered bootstrap for 95% intervals (``ci95``; 0 = none).
    """
    meta = read_metadata(model)
    labelled = select(load_labelled(data, None, meta.classes), split, part)
    images = load_images(labelled.paths, meta.input_size)
    probs = onnx_probabilities(model, images)
    labels = np.asarray(labelled.labels)
    logp = np.log(np.clip(probs, 1e-12, 1.0))  # softmax(log p) == p: reuse train's metric code
    m = compute_metrics(logp, labels, meta.classes)
    m.pop("temperature", None)  # the file's temperature is inside the graph
    pos = np.isin(labels, [meta.classes.index(c) for c in meta.malignant_classes])
    scores = malignancy_scores(probs, meta.classes, meta.malignant_classes)
    m["malignancy"] = operating_point(scores, pos, meta.malignancy_threshold if threshold is None else threshold)
    if bootstrap > 0:
        m["ci95"] = bootstrap_ci(
            probs, labels, labelled.groups, meta.classes, pos, scores, m["malignancy"]["threshold"], bootstrap
        )
    m["model"] = {"name": meta.name, "version": meta.version, "tta": meta.tta}
    m["data"] = {"source": str(data), "split": str(split) if split else None, "part": part}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(m, indent=2))
        plot_confusion(m["confusion_matrix"], meta.classes, out / "confusion_matrix.png")
        plot_roc(probs, labels, meta.classes, out / "roc.png")
        plot_reliability(logp, labels, 1.0, out / "reliability.png")
    return m


CARD_START, CARD_END = "<!-- held-out evaluation: start -->", "<!-- held-out evaluation: end -->"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _ci(v: list[float] | None) -> str:
    return "n/a" if not v else f"{v[0]:.3f}-{v[1]:.3f}"


def card_section(m: dict[str, Any], classes: list[str], plots: dict[str, str]) -> str:
    """Markdown for the model card: the file's own measured figures on held-out images."""
    mal = m["malignancy"]
    d = m["data"]
    where = f"part `{d['part']}` of `{d['split']}`" if d["split"] else "all images"
    lines = [
        CARD_START,
        "## Held-out evaluation of this file",
        "",
        f"Measured with `python -m export.evaluate` on {m['n']} images ({where} of `{d['source']}`): the",
        "exported file itself in ONNX Runtime, with its TTA views and temperature, as the service runs it.",
        "",
        "| balanced accuracy | accuracy | macro-F1 | AUC (macro, one-vs-rest) | top-2 | ECE (15 bins) | NLL |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {m['balanced_accuracy']:.4f} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {_pct(m['auc_macro'])}"
        f" | {m['top2_accuracy']:.4f} | {m['ece']:.4f} | {m['nll']:.4f} |",
        "",
    ]
    ci = m.get("ci95")
    if ci:
        lines += [
            f"95% intervals ({ci['method']}): balanced accuracy {_ci(ci['balanced_accuracy'])},"
            f" macro AUC {_ci(ci.get('auc_macro'))}, malignancy sensitivity {_ci(ci['malignancy_sensitivity'])},"
            f" specificity {_ci(ci['malignancy_specificity'])}.",
            "",
        ]
    lines += ["| class | precision | recall | recall 95% CI | F1 | support |", "|---|---:|---:|---:|---:|---:|"]
    lines += [
        f"| `{c}` | {r['precision']:.3f} | {r['recall']:.3f} | {_ci(ci['recall'].get(c)) if ci else 'n/a'}"
        f" | {r['f1']:.3f} | {r['support']} |"
        for c, r in m["per_class"].items()
    ]
    lines += [
        "",
        "Confusion matrix (rows: true class, columns: predicted):",
        "",
        "| | " + " | ".join(f"`{c}`" for c in classes) + " |",
        "|---" + "|---:" * len(classes) + "|",
        *[
            f"| `{c}` | " + " | ".join(map(str, row)) + " |"
            for c, row in zip(classes, m["confusion_matrix"], strict=True)
        ],
        "",
        "### Malignancy operating point",
        "",
        f"Score = sum of the malignant classes' probabilities; flagged when score >= {mal['threshold']:.4f}.",
        "",
        "| threshold | sensitivity | specificity | PPV | NPV | malignant | benign | AUC |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {mal['threshold']:.4f} | {_pct(mal['sensitivity'])} | {_pct(mal['specificity'])} | {_pct(mal['ppv'])}"
        f" | {_pct(mal['npv'])} | {mal['positives']} | {mal['negatives']} | {_pct(mal['auc'])} |",
        "",
        *[f"![{name}]({path})" for name, path in plots.items()],
        CARD_END,
    ]
    return "\n".join(lines)


def update_card(card: Path, section: str, start: str = CARD_START, end: str = CARD_END) -> None:
    """Insert or replace one marked section of a model card (everything else is left alone)."""
    text = card.read_text() if card.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    card.write_text(text)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python -m export.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", required=True, help="HAM10000 folder/CSV, ImageFolder tree or ISIC CSV")
    ap.add_argument("--split", type=Path, default=None, help="split.json written by python -m train")
    ap.add_argument("--part", default="test", help="part of the split to evaluate (default test)")
    ap.add_argument("--out", type=Path, default=None, help="folder for metrics.json and plots")
    ap.add_argument("--target-sensitivity", type=float, default=None,
                    help="choose the malignancy threshold reaching this sensitivity on --threshold-part")  # fmt: skip
    ap.add_argument("--threshold-part", default="val", help="part used to choose the threshold (default val)")
    ap.add_argument("--card", type=Path, default=None,
                    help="model card to add the held-out section to (plots go beside it; needs --out)")  # fmt: skip
    ap.add_argument("--bootstrap", type=int, default=1000,
                    help="resamples of the lesion-clustered bootstrap for 95%% intervals (default 1000; 0 = none)")  # fmt: skip
    a = ap.parse_args(argv)
    try:
        if a.bootstrap < 0:
            raise ValueError(f"--bootstrap must be >= 0, got {a.bootstrap}")
        threshold = None
        if a.target_sensitivity is not None:
            meta = read_metadata(a.model)
            tune = select(load_labelled(a.data, None, meta.classes), a.split, a.threshold_part)
            probs = onnx_probabilities(a.model, load_images(tune.paths, meta.input_size))
            labels = np.asarray(tune.labels)
            pos = np.isin(labels, [meta.classes.index(c) for c in meta.malignant_classes])
            threshold = choose_threshold(malignancy_scores(probs, meta.classes, meta.malignant_classes), pos,
                                         a.target_sensitivity)  # fmt: skip
            log.info("threshold %.4f reaches sensitivity >= %.2f on part %r", threshold, a.target_sensitivity,
                     a.threshold_part)  # fmt: skip
        m = evaluate_onnx(a.model, a.data, a.split, a.part if a.split else None, a.out, threshold, a.bootstrap)
        if a.card is not None:
            if a.out is None:
                raise ValueError("--card needs --out (the plots it links)")
            rel = {n: f"{a.out.resolve().relative_to(a.card.resolve().parent)}/{n}.png"
                   for n in ("confusion_matrix", "reliability", "roc")}  # fmt: skip
            update_card(a.card, card_section(m, read_metadata(a.model).classes, rel))
    except (DataError, ValueError, OSError) as exc:
        print(f"export.evaluate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in m.items() if k not in ("per_class", "confusion_matrix")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
