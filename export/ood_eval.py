"""Measure a file's out-of-distribution check: in-distribution held-out images vs the packaged OOD set.

``python -m export.ood_eval MODEL.onnx --data DATA --split runs/x/split.json [--part test] [--limit N]
[--out DIR] [--card MODEL.md]``

Scores the in-distribution part (HAM10000 test: lesions the model never saw) and :mod:`export.ood_set` with the
file itself in ONNX Runtime, then reports AUROC (OOD = positive), the share of in-distribution images that pass
the file's threshold, and the detection rate (share flagged) per group of the OOD set. ``--card`` writes the
section into the model card; the markdown table is printed for docs/export.md.
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

from export.evaluate import select, update_card
from export.metadata import read_metadata
from export.ood_set import GROUPS, ood_images
from service.contract import INPUT_NAME, OOD_OUTPUT, OUTPUT_NAME, MetadataError, ModelMetadata
from train.data import DataError, load_images, load_labelled
from train.preprocess import center_crop_resize

log = logging.getLogger(__name__)

CARD_START, CARD_END = "<!-- ood evaluation: start -->", "<!-- ood evaluation: end -->"


def score(model: Path, images: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``ood_score`` ``(B,)`` and probabilities ``(B, K)`` of uint8 ``(B, S, S, 3)`` images."""
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    scores, probs = [], []
    for i in range(0, len(images), batch):
        p, s = sess.run([OUTPUT_NAME, OOD_OUTPUT], {INPUT_NAME: images[i : i + batch]})
        probs.append(p)
        scores.append(s)
    return np.concatenate(scores).astype(np.float64), np.concatenate(probs).astype(np.float64)


def evaluate_ood(
    model: Path, data: str | Path, split: Path | None, part: str = "test", limit: int = 0
) -> dict[str, Any]:
    """Every OOD figure of ``model`` (see the module docstring)."""
    meta = read_metadata(model)
    if meta.ood is None:
        raise ValueError(f"{model} has no {OOD_OUTPUT} output: export it with --ood-data and --ood-split")
    ind = select(load_labelled(data, None, meta.classes), split, part if split else None)
    if limit and len(ind.paths) > limit:
        ind = ind.subset(np.sort(np.random.default_rng(0).choice(len(ind.paths), limit, replace=False)))
    id_scores, _ = score(model, load_images(ind.paths, meta.input_size))
    ood = ood_images()
    ood_pixels = np.stack([center_crop_resize(o.rgb, meta.input_size) for o in ood])
    ood_scores, ood_probs = score(model, ood_pixels)
    t = meta.ood.threshold
    y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    groups = np.array([o.group for o in ood])
    mal = _malignancy(meta, ood_probs) >= meta.malignancy_threshold
    per_group = {
        g: {
            "n": int((groups == g).sum()),
            "detected": float((ood_scores[groups == g] > t).mean()),
            "auroc": float(
                roc_auc_score(y[: len(id_scores) + (groups == g).sum()], np.r_[id_scores, ood_scores[groups == g]])
            ),
            "malignancy_flagged": float(mal[groups == g].mean()),
        }
        for g in GROUPS
        if (groups == g).any()
    }
    return {
        "model": {"name": meta.name, "version": meta.version, "method": meta.ood.method, "threshold": t},
        "in_distribution": {
            "source": str(data),
            "split": str(split) if split else None,
            "part": part if split else None,
            "n": len(id_scores),
            "pass_rate": float((id_scores <= t).mean()),
            "score_median": float(np.median(id_scores)),
        },
        "ood": {
            "n": len(ood_scores),
            "detected": float((ood_scores > t).mean()),
            "auroc": float(roc_auc_score(y, np.r_[id_scores, ood_scores])),
            "score_median": float(np.median(ood_scores)),
            "malignancy_flagged": float(mal.mean()),
            "groups": per_group,
            "images": [
                {"group": o.group, "name": o.name, "score": float(s)} for o, s in zip(ood, ood_scores, strict=True)
            ],
        },
    }


def _malignancy(meta: ModelMetadata, probs: np.ndarray) -> np.ndarray:
    return probs[:, [meta.classes.index(c) for c in meta.malignant_classes]].sum(axis=1)


def table(m: dict[str, Any]) -> str:
    """The markdown table of one evaluation: a row per OOD group, then all of them."""
    ind, ood = m["in_distribution"], m["ood"]
    lines = [
        f"| OOD images ({m['model']['method']}, threshold {m['model']['threshold']:.4g}) | n | AUROC vs in-distribution"
        " | detected (score > threshold) | malignancy score >= threshold |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {g} | {r['n']} | {r['auroc']:.3f} | {r['detected']:.1%} | {r['malignancy_flagged']:.1%} |"
        for g, r in ood["groups"].items()
    ]
    lines += [
        f"| **all OOD images** | {ood['n']} | **{ood['auroc']:.3f}** | **{ood['detected']:.1%}** |"
        f" {ood['malignancy_flagged']:.1%} |",
        f"| in-distribution ({ind['part'] or 'all'}): passed | {ind['n']} | | {ind['pass_rate']:.1%} pass | |",
    ]
    return "\n".join(lines)


def card_section(m: dict[str, Any]) -> str:
    ind = m["in_distribution"]
    where = f"part `{ind['part']}` of `{ind['split']}`" if ind["split"] else "all images"
    return "\n".join([
        CARD_START,
        "## Out-of-distribution check, measured",
        "",
        f"Measured with `python -m export.ood_eval`: {ind['n']} in-distribution images ({where} of `{ind['source']}`)",
        "against the packaged OOD set (scikit-image photographs, pydicom CT/MR/US rendered to 8-bit, uniform",
        "colours, noise, a text page, heavily blurred CC0 lesions), scored by this file in ONNX Runtime.",
        "",
        table(m),
        CARD_END,
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python -m export.ood_eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", required=True, help="in-distribution labelled data (HAM10000 folder/CSV, ImageFolder)")
    ap.add_argument("--split", type=Path, default=None, help="split.json written by python -m train")
    ap.add_argument("--part", default="test", help="in-distribution part of the split (default test)")
    ap.add_argument("--limit", type=int, default=0, help="at most this many in-distribution images (seeded)")
    ap.add_argument("--out", type=Path, default=None, help="folder for ood_metrics.json")
    ap.add_argument("--card", type=Path, default=None, help="model card to add the OOD section to")
    a = ap.parse_args(argv)
    try:
        m = evaluate_ood(a.model, a.data, a.split, a.part, a.limit)
        if a.out is not None:
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / "ood_metrics.json").write_text(json.dumps(m, indent=2))
        if a.card is not None:
            update_card(a.card, card_section(m), CARD_START, CARD_END)
    except (DataError, MetadataError, ValueError, OSError) as exc:
        print(f"export.ood_eval: {exc}", file=sys.stderr)
        return 2
    print(table(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
