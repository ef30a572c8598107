"""Evaluate any checkpoint on any labelled set.

``python -m train.evaluate runs/x/best.pt --data PATH [--out DIR]`` prints the metrics as
JSON (with the checkpoint's fitted temperature applied) and, with ``--out``, writes
``metrics.json``, ``confusion_matrix.png`` and ``roc.png`` there. The data's labels are
mapped onto the checkpoint's stored class order; a label the model does not know is an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from train.checkpoint import CheckpointError, load_checkpoint
from train.data import DataError, load_images, load_labelled
from train.engine import predict_logits
from train.metrics import compute_metrics, softmax
from train.report import plot_confusion, plot_roc

log = logging.getLogger(__name__)


def evaluate(
    ckpt_path: str | Path,
    data: str | Path,
    images: str | None = None,
    out: str | Path | None = None,
    batch_size: int = 128,
    device: str = "cpu",
    use_temperature: bool = True,
) -> dict[str, Any]:
    """Metrics of a checkpoint on a labelled set.

    Args:
        ckpt_path: a ``best.pt`` written by ``python -m train``.
        data: any layout ``train.data.load_labelled`` reads.
        out: optional folder for ``metrics.json`` and plots.
        use_temperature: divide logits by the checkpoint's fitted temperature.
    """
    ck = load_checkpoint(ckpt_path)
    labelled = load_labelled(data, images, ck.classes)
    model = ck.build().to(device)
    x = torch.from_numpy(load_images(labelled.paths, ck.img_size))
    logits = predict_logits(model, x, batch_size, torch.device(device))
    t = ck.temperature if use_temperature else 1.0
    m = compute_metrics(logits, labelled.labels, ck.classes, t)
    m["checkpoint"] = str(ckpt_path)
    m["data"] = str(data)
    if out:
        o = Path(out)
        o.mkdir(parents=True, exist_ok=True)
        (o / "metrics.json").write_text(json.dumps(m, indent=2))
        plot_confusion(m["confusion_matrix"], ck.classes, o / "confusion_matrix.png")
        plot_roc(softmax(logits, t), labelled.labels, ck.classes, o / "roc.png")
    return m


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data", required=True, help="HAM10000 folder/CSV, ImageFolder tree or ISIC CSV")
    ap.add_argument("--images", default=None, help="image folder for a CSV when it is not next to it")
    ap.add_argument("--out", default=None, help="folder for metrics.json and plots")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-temperature", action="store_true", help="ignore the fitted temperature")
    a = ap.parse_args(argv)
    try:
        m = evaluate(a.checkpoint, a.data, a.images, a.out, a.batch_size, a.device, not a.no_temperature)
    except (CheckpointError, DataError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    print(json.dumps({k: v for k, v in m.items() if k != "per_class"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
