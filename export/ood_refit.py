"""``python -m export.ood_refit MODEL.onnx --data DATA --split SPLIT``: choose an exported file's OOD threshold again.

The graph (Mahalanobis statistics included) is not touched: only ``lesionserve.ood`` in the metadata changes,
so ``weights_sha256`` stays and no re-export (minutes to hours of feature extraction on a CPU) is needed.
The threshold is chosen on the split's validation part and, by default, acquisition-shifted copies of it
(:mod:`export.acquisition`): the fix for a threshold that flagged real dermoscopy from other sources.
The previous threshold is kept in ``fitted_on.refit`` so the card can say what changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from export.acquisition import ShiftPlan
from export.card import replace_ood_section
from export.metadata import ExportError, read_metadata
from export.ood import OodConfig, choose_ood_threshold, validation_scores
from service.contract import MetadataError, OodSpec

log = logging.getLogger(__name__)


def refit(model: Path, data: Path, split: Path, *, pass_rate: float | None, shifts: ShiftPlan, out: Path) -> OodSpec:
    """Write ``model`` with its OOD threshold chosen again to ``out`` (may be ``model``); return the new spec.

    Raises:
        ExportError: the file has no OOD check, or the data/split cannot be read.
    """
    try:
        meta = read_metadata(model)
    except (MetadataError, OSError, DecodeError) as exc:
        raise ExportError(f"{model}: not a lesionserve model ({exc})") from exc
    old = meta.ood
    if old is None:
        raise ExportError(f"{model} has no ood_score output: export it with --ood-data/--ood-split first")
    rate = float(old.fitted_on.get("target_pass_rate", old.pass_rate)) if pass_rate is None else pass_rate
    cfg = OodConfig(data, split, old.method, rate, shifts=shifts)
    scores, n_val = validation_scores(model, cfg, meta.classes, meta.input_size)
    threshold, achieved = choose_ood_threshold(scores, rate)
    # The unshifted images come first for each image: index 0 of every (1 + copies) group.
    plain = scores[:: 1 + shifts.copies]
    facts = {k: v for k, v in old.fitted_on.items() if k not in ("acquisition_shifts", "refit")}
    facts.update(validation_images=n_val, target_pass_rate=rate)
    if shifts.copies:
        facts["acquisition_shifts"] = shifts.describe()
    facts["refit"] = {
        "previous_threshold": old.threshold,
        "previous_pass_rate": old.pass_rate,
        "validation_pass_rate_unshifted": float(np.mean(plain <= threshold)),
        "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    spec = OodSpec(method=old.method, threshold=threshold, pass_rate=achieved, fitted_on=facts)
    new_meta = dataclasses.replace(meta, ood=spec)
    proto = onnx.load(str(model))
    del proto.metadata_props[:]
    for key, value in new_meta.to_props().items():
        proto.metadata_props.add(key=key, value=value)
    partial = out.with_name(out.name + ".partial")
    try:
        onnx.save(proto, str(partial))
        os.replace(partial, out)  # a reader never sees a half-written model
    finally:
        partial.unlink(missing_ok=True)
    # The card beside the file (MODEL.md) says the threshold: its section follows the file.
    card = model.with_suffix(".md")
    if card.is_file():
        out.with_suffix(".md").write_text(replace_ood_section(card.read_text(), new_meta))
    log.info("OOD threshold %.6g -> %.6g (%.1f%% of %d scores pass; %.1f%% of the unshifted images)",
             old.threshold, threshold, 100 * achieved, len(scores), 100 * facts["refit"]["validation_pass_rate_unshifted"])  # fmt: skip
    return spec


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.ood_refit", description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path, help="an exported file with an ood_score output")
    p.add_argument("--data", type=Path, required=True, help="the labelled data the split names (folder or CSV)")
    p.add_argument("--split", type=Path, required=True, help="split.json of the members' training (part val is read)")
    p.add_argument(
        "--pass-rate", type=float, help="share of validation scores below the threshold (default: the file's)"
    )
    p.add_argument("--shifts", type=int, default=ShiftPlan().copies, help="shifted copies per image (0: none)")
    p.add_argument("--out", type=Path, help="write here instead of rewriting MODEL in place")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if not args.model.is_file():
            raise ExportError(f"{args.model}: no such file")
        try:
            plan = ShiftPlan(copies=args.shifts)
        except ValueError as exc:
            raise ExportError(f"--shifts: {exc}") from exc
        spec = refit(args.model, args.data, args.split, pass_rate=args.pass_rate, shifts=plan,
                     out=args.out or args.model)  # fmt: skip
    except ExportError as exc:
        print(f"export.ood_refit: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out or args.model}: OOD threshold {spec.threshold:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
