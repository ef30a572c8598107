"""External check of an exported file on melanoma/nevus images from another source than its training data.

``python -m export.external MODEL.onnx --data ../shared/data/isic-archive-cc0 [--out DIR] [--card CARD]``

The ISIC Archive images (CC0) come from other clinics, cameras and resolutions (up to
3072x2304) than HAM10000's 600x450 exports: this is a distribution-shift check, not a
held-out-of-HAM figure, and the card says so. Measured, with the file as the service runs it
(ONNX Runtime, TTA and temperature inside):

* melanoma vs nevus AUC of the malignancy score (sum of the malignant classes' probabilities)
  and of ``P(mel) / (P(mel) + P(nv))``;
* sensitivity/specificity of the malignancy flag at the file's own threshold (chosen on HAM
  validation; not re-tuned here);
* how often the top class is ``mel`` for melanomas and ``nv`` for nevi;
* when the file has an ``ood_score`` output: the share of these real dermoscopic images that it
  flags out of distribution at its own threshold (they should pass).

Data: a folder with ``labels.csv`` (``image_id``, ``diagnosis`` in {melanoma, nevus}; the
ISIC Archive export) or an ImageFolder tree with ``melanoma/`` and ``nevus/`` sub-folders.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from export.evaluate import malignancy_scores, onnx_probabilities, operating_point, update_card
from export.metadata import read_metadata
from export.ood_eval import score as ood_scores
from train.data import load_images

DIAGNOSES = ("melanoma", "nevus")
CARD_START, CARD_END = "<!-- external check: start -->", "<!-- external check: end -->"


def read_external(root: Path) -> tuple[list[Path], np.ndarray]:
    """Image paths and ``is_melanoma`` flags from ``labels.csv`` or ``melanoma/``+``nevus/`` folders."""
    labels = root / "labels.csv"
    if labels.is_file():
        with labels.open(newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("diagnosis") in DIAGNOSES]
        paths = [root / f"{r['image_id']}.jpg" for r in rows]
        flags = [r["diagnosis"] == "melanoma" for r in rows]
    else:
        found = [(p, d == "melanoma") for d in DIAGNOSES for p in sorted((root / d).glob("*.jpg"))]
        paths, flags = [p for p, _ in found], [f for _, f in found]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"{root}: {len(missing)} listed images are missing, e.g. {missing[:3]}")
    if not paths or all(flags) or not any(flags):
        raise ValueError(f"{root}: needs both melanoma and nevus images (labels.csv or melanoma/, nevus/ folders)")
    return paths, np.asarray(flags, dtype=bool)


def evaluate_external(model: Path, data: Path) -> dict[str, Any]:
    meta = read_metadata(model)
    for code in ("mel", "nv"):
        if code not in meta.classes:
            raise ValueError(f"{model}: the external check needs classes 'mel' and 'nv'; it has {meta.classes}")
    paths, melanoma = read_external(data)
    images = load_images(paths, meta.input_size)
    flagged: float | None = None
    if meta.ood is not None:
        ood, probs = ood_scores(model, images)
        flagged = float((ood > meta.ood.threshold).mean())
    else:
        probs = onnx_probabilities(model, images)
    mel, nv = probs[:, meta.classes.index("mel")], probs[:, meta.classes.index("nv")]
    scores = malignancy_scores(probs, meta.classes, meta.malignant_classes)
    top = np.asarray(meta.classes)[probs.argmax(1)]
    return {
        "n": len(paths),
        "melanoma": int(melanoma.sum()),
        "nevus": int((~melanoma).sum()),
        "auc_malignancy_score": float(roc_auc_score(melanoma, scores)),
        "auc_mel_vs_nv": float(roc_auc_score(melanoma, mel / np.clip(mel + nv, 1e-12, None))),
        "malignancy": operating_point(scores, melanoma, meta.malignancy_threshold),
        "top1_mel_for_melanoma": float((top[melanoma] == "mel").mean()),
        "top1_nv_for_nevus": float((top[~melanoma] == "nv").mean()),
        "ood_flagged": flagged,
        "data": str(data),
        "model": {"name": meta.name, "version": meta.version, "tta": meta.tta},
    }


def card_section(m: dict[str, Any]) -> str:
    mal = m["malignancy"]
    return "\n".join([
        CARD_START,
        "## External check: ISIC Archive melanoma vs nevus (another source, not held-out HAM10000)",
        "",
        f"`python -m export.external` on {m['n']} dermoscopic images ({m['melanoma']} melanoma, {m['nevus']} nevus)",
        f"of `{m['data']}`: CC0 ISIC Archive images from other clinics, cameras and resolutions than",
        "HAM10000 (up to 3072x2304), centre-cropped and resized as the service does. A distribution-shift",
        "check on few images (wide confidence intervals), not a held-out figure.",
        "",
        "| AUC malignancy score | AUC P(mel)/(P(mel)+P(nv)) | threshold (from HAM validation) | sensitivity | specificity"
        " | top-1 `mel` on melanomas | top-1 `nv` on nevi |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {m['auc_malignancy_score']:.3f} | {m['auc_mel_vs_nv']:.3f} | {mal['threshold']:.4f}"
        f" | {mal['sensitivity']:.3f} | {mal['specificity']:.3f} | {m['top1_mel_for_melanoma']:.3f}"
        f" | {m['top1_nv_for_nevus']:.3f} |",
        *(
            []
            if m.get("ood_flagged") is None
            else ["", f"Flagged out of distribution at the file's OOD threshold: {m['ood_flagged']:.1%} of these images."]
        ),
        CARD_END,
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.external", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="labels.csv folder or melanoma/ + nevus/ tree")
    ap.add_argument("--out", type=Path, default=None, help="folder for external.json")
    ap.add_argument("--card", type=Path, default=None, help="model card to add the section to")
    a = ap.parse_args(argv)
    try:
        m = evaluate_external(a.model, a.data)
    except (ValueError, OSError) as exc:
        print(f"export.external: {exc}", file=sys.stderr)
        return 2
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "external.json").write_text(json.dumps(m, indent=2))
    if a.card is not None:
        update_card(a.card, card_section(m), CARD_START, CARD_END)
    print(json.dumps(m, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
