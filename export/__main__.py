"""``python -m export CKPT [CKPT ...] --out models/NAME.onnx --tta dihedral``: see docs/export.md."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from export.metadata import ExportError
from export.onnx_export import DEFAULT_IMAGES, DEFAULT_OPSET, export_checkpoints
from export.parity import VerificationError
from export.wrappers import UnknownTTAError
from service.contract import TTA_VIEWS, MetadataError
from train.checkpoint import CheckpointError

log = logging.getLogger("export")


def one_line(message: str, limit: int = 300) -> str:
    """Collapse a message to one line (torch's unpickling errors span many) and cap its length."""
    flat = " ".join(message.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export checkpoint(s) to one verified, self-describing ONNX file (several = an ensemble).",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint file(s) written by `python -m train`")
    p.add_argument("--out", required=True, help="output path, e.g. models/ham10000-r50.onnx (card: same stem, .md)")
    # Validated by export_checkpoints rather than argparse choices, so the API and the CLI give the same message.
    p.add_argument(
        "--tta", default="dihedral", help=f"test-time augmentation: {', '.join(TTA_VIEWS)} (default dihedral)"
    )
    p.add_argument("--name", help="model name (default: the output file's stem)")
    p.add_argument("--version", default="0.1.0", help="model version (default 0.1.0)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--fp16", action="store_true", help="run the backbones in float16 (half the file size)")
    p.add_argument("--malignancy-threshold", type=float, help="operating point on the malignancy score")
    p.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of real images for the parity checks")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Our own progress at INFO; the exporter's libraries (onnx_ir, onnxscript) only when something is wrong.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        result = export_checkpoints(
            args.checkpoints,
            args.out,
            tta=args.tta,
            name=args.name,
            version=args.version,
            opset=args.opset,
            fp16=args.fp16,
            malignancy_threshold=args.malignancy_threshold,
            images=args.images,
        )
    except (CheckpointError, ExportError, UnknownTTAError, MetadataError, VerificationError) as exc:
        # One line, no traceback: these are the user's inputs or a failed check, not a bug.
        print(f"export: error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    for check in result.checks:
        print(f"  {check}")
    print(f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB) and {result.card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
