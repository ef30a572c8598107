"""Compare finished runs on one split: ``python -m train.compare runs/ce runs/weighted_ce runs/focal``.

Prints a markdown table of balanced accuracy, macro-F1, AUC, ECE before/after temperature and
per-class recall on each run's held-out set. Refuses runs whose ``split.json`` differ: a
comparison across different splits would measure the split, not the method.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def load_run(path: Path) -> tuple[dict[str, Any], dict[str, list[str]]]:
    metrics = json.loads((path / "metrics.json").read_text())
    split = json.loads((path / "split.json").read_text())
    return metrics, split


def table(runs: list[Path]) -> str:
    """Markdown table for ``runs`` (folders written by ``python -m train``); ValueError if splits differ."""
    loaded = [load_run(r) for r in runs]
    first = loaded[0][1]
    for r, (_, split) in zip(runs[1:], loaded[1:], strict=True):
        if split != first:
            raise ValueError(f"{r}: split differs from {runs[0]}; compare runs with the same --data/--seed/--limit")
    classes = list(loaded[0][0]["per_class"])
    head = ["run", "loss", "balanced acc", "macro-F1", "AUC", "ECE T=1", "ECE fitted T", "T", *classes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, (m, _) in zip(runs, loaded, strict=True):
        raw = m.get("test_uncalibrated") or m["val_uncalibrated"]
        auc = "n/a" if m["auc_macro"] is None else f"{m['auc_macro']:.3f}"
        cells = [r.name, m["config"]["loss"], f"{m['balanced_accuracy']:.3f}", f"{m['macro_f1']:.3f}", auc,
                 f"{raw['ece']:.3f}", f"{m['ece']:.3f}", f"{m['temperature']:.2f}"]  # fmt: skip
        cells += [f"{m['per_class'][c]['recall']:.2f}" for c in classes]
        lines.append("| " + " | ".join(cells) + " |")
    m0 = loaded[0][0]
    lines.append("")
    support = ", ".join(f"{c} {m0['per_class'][c]['support']}" for c in classes)
    lines.append(f"Evaluated on {m0['evaluated_on']} (n={m0['n']}); per-class columns are recall; support: {support}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    a = ap.parse_args(argv)
    try:
        print(table(a.runs))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
