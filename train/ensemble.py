"""Which members to serve: every member's probabilities on one part of the split, the whole
ensemble's figures, and a greedy forward selection (Caruana et al., 2004) by balanced accuracy.

    python -m train.ensemble --members models/members --data ../shared/data/ham10000 \\
        --split models/reference-eval/split.json --part val --tta none --out runs/ensemble

Choices are made on ``val`` only: the members' own folds cover the training part, and ``test``
stays held out for the exported file (``python -m export.evaluate``). Probabilities are cached
per member, part and TTA in ``--out`` so that a second look costs nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.checkpoint import load_checkpoint
from train.data import load_images, load_labelled
from train.members import read_manifest
from train.metrics import compute_metrics

log = logging.getLogger("train.ensemble")
VIEWS = {"none": 1, "hflip": 2, "flips": 4, "dihedral": 8}


def _views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The TTA views of ``(B, 3, S, S)``, as export/wrappers.py makes them (dihedral: all 8 symmetries)."""
    out = [x]
    if tta == "hflip":
        out.append(x.flip(3))
    if tta in ("flips", "dihedral"):
        out += [x.flip(3), x.flip(2), x.flip(2).flip(3)]
    if tta == "dihedral":
        t = x.transpose(2, 3)
        out += [t, t.flip(2), t.flip(3), t.flip(2).flip(3)]
    return out


@torch.no_grad()
def member_view_probs(path: Path, images: np.ndarray, tta: str, batch: int = 64) -> np.ndarray:
    """Calibrated probabilities ``(V, N, K)`` of one member per TTA view, on uint8 ``(N, S, S, 3)`` at its size.

    View order: identity, hflip, vflip, rot180, then the four transposed views: the first 2, 4 and 8
    are the view budgets the model card reports (``VIEW_BUDGETS``).
    """
    ckpt = load_checkpoint(path)
    model = ckpt.build().float()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ckpt.norm())
    outs = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float().div(255)
        x = (x - mean) / std
        outs.append(torch.stack([torch.softmax(model(v) / ckpt.temperature, -1) for v in _views(x, tta)]).numpy())
    return np.concatenate(outs, axis=1)


def member_probs(path: Path, images: np.ndarray, tta: str, batch: int = 64) -> np.ndarray:
    """Calibrated probabilities ``(N, K)`` of one member, averaged over its TTA views."""
    return member_view_probs(path, images, tta, batch).mean(0)


VIEW_BUDGETS = (1, 2, 4, 8)


def greedy(probs: dict[str, np.ndarray], labels: np.ndarray, classes: list[str], rounds: int) -> list[dict[str, Any]]:
    """Caruana's forward selection with replacement: add the member that most raises balanced accuracy."""
    chosen: list[str] = []
    steps = []
    for _ in range(rounds):
        best, best_score = None, -1.0
        for name in probs:
            p = np.mean([probs[n] for n in [*chosen, name]], axis=0)
            score = compute_metrics(np.log(p + 1e-12), labels, classes)["balanced_accuracy"]
            if score > best_score:
                best, best_score = name, score
        assert best is not None
        chosen.append(best)
        steps.append({"members": list(chosen), "balanced_accuracy": best_score})
    return steps


def view_budget(args: argparse.Namespace, man: Any, chosen: list[dict[str, Any]], data: Any) -> int:
    """Balanced accuracy and AUC of the chosen members' mean at each view budget, written as JSON."""
    per_view = []
    for m in chosen:
        cache = args.out / f"{m['name']}-{args.part}-views.npy"
        if not cache.is_file():
            images = load_images(data.paths, int(m["img_size"]))
            np.save(cache, member_view_probs(man.folder / m["file"], images, "dihedral"))
        per_view.append(np.load(cache))  # (8, N, K)
    rows = []
    for v in VIEW_BUDGETS:
        p = np.mean([pv[:v].mean(0) for pv in per_view], axis=0)
        r = compute_metrics(np.log(p + 1e-12), data.labels, data.classes)
        rows.append({"views": v, "balanced_accuracy": r["balanced_accuracy"], "auc_macro": r["auc_macro"]})
        print(f"{v} view(s): bacc {r['balanced_accuracy']:.4f}  auc {r['auc_macro']:.4f}")
    report = {"part": args.part, "members": [m["name"] for m in chosen], "view_budget": rows}
    (args.out / f"view-budget-{args.part}.json").write_text(json.dumps(report, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.ensemble", description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=Path, default=Path("models/members"))
    p.add_argument("--data", type=Path, default=Path("../shared/data/ham10000"))
    p.add_argument("--split", type=Path, default=Path("models/reference-eval/split.json"))
    p.add_argument("--part", default="val", choices=("val", "train"))
    p.add_argument("--tta", default="none", choices=tuple(VIEWS))
    p.add_argument("--out", type=Path, default=Path("runs/ensemble"))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--only", nargs="*", default=None, help="these members only (names from the manifest)")
    p.add_argument("--view-budget", action="store_true",
                   help="the --only members' ensemble at 1, 2, 4 and 8 views (runs the 8 dihedral views once)")  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    man = read_manifest(args.members)
    if not man.members:
        print(f"train.ensemble: {args.members}: no members", file=sys.stderr)
        return 2
    ids = set(json.loads(args.split.read_text())[args.part])
    data = load_labelled(args.data, None, man.data.get("classes"))
    data = data.subset(np.array([i for i, q in enumerate(data.paths) if q.stem in ids]))
    args.out.mkdir(parents=True, exist_ok=True)
    probs: dict[str, np.ndarray] = {}
    cache_imgs: dict[int, np.ndarray] = {}
    chosen = [m for m in man.members if args.only is None or m["name"] in args.only]
    if args.view_budget:
        return view_budget(args, man, chosen, data)
    for m in chosen:
        cache = args.out / f"{m['name']}-{args.part}-{args.tta}.npy"
        if cache.is_file():
            probs[m["name"]] = np.load(cache)
            continue
        size = int(m["img_size"])
        if size not in cache_imgs:
            cache_imgs = {size: load_images(data.paths, size)}
        probs[m["name"]] = member_probs(man.folder / m["file"], cache_imgs[size], args.tta)
        np.save(cache, probs[m["name"]])
        log.info("%s: %s balanced accuracy %.4f", m["name"], args.part,
                 compute_metrics(np.log(probs[m["name"]] + 1e-12), data.labels, data.classes)["balanced_accuracy"])  # fmt: skip
    rows = {n: compute_metrics(np.log(q + 1e-12), data.labels, data.classes) for n, q in probs.items()}
    everything = compute_metrics(np.log(np.mean(list(probs.values()), 0) + 1e-12), data.labels, data.classes)
    steps = greedy(probs, data.labels, data.classes, args.rounds)
    report = {
        "part": args.part, "tta": args.tta, "n": len(data.labels),
        "members": {n: {k: r[k] for k in ("balanced_accuracy", "auc_macro", "accuracy")} for n, r in rows.items()},
        "all_members": {k: everything[k] for k in ("balanced_accuracy", "auc_macro", "accuracy")},
        "greedy": steps,
    }  # fmt: skip
    (args.out / f"ensemble-{args.part}-{args.tta}.json").write_text(json.dumps(report, indent=2))
    for n, r in report["members"].items():
        print(f"{n:<22} bacc {r['balanced_accuracy']:.4f}  auc {r['auc_macro']:.4f}")
    print(
        f"{'all ' + str(len(probs)):<22} bacc {everything['balanced_accuracy']:.4f}  auc {everything['auc_macro']:.4f}"
    )
    for s in steps:
        print(f"greedy {len(s['members'])}: {s['balanced_accuracy']:.4f}  {'+'.join(s['members'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
