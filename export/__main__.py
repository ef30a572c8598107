"""``python -m export CKPT [CKPT ...] --out models/NAME.onnx --tta dihedral``: see docs/export.md."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from export.acquisition import ShiftPlan
from export.metadata import ExportError, one_line, print_written
from export.onnx_export import DEFAULT_IMAGES, DEFAULT_OPSET, export_checkpoints
from export.ood import DEFAULT_METHOD, DEFAULT_PASS_RATE, OodConfig
from export.parity import VerificationError
from export.quantize import add_arguments, default_out, from_arguments, quantize_file
from export.wrappers import UnknownTTAError
from service.contract import OOD_METHODS, TTA_VIEWS, MetadataError
from train.checkpoint import CheckpointError
from train.data import DataError

log = logging.getLogger("export")


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
    g = p.add_argument_group("out-of-distribution check and class activation maps (docs/export.md)")
    g.add_argument("--ood-data", help="labelled training data (folder/CSV): adds the ood_score output")
    g.add_argument("--ood-split", help="split.json of the training run: threshold on part val, statistics on train")
    g.add_argument(
        "--ood-method", default=DEFAULT_METHOD, help=f"{' or '.join(OOD_METHODS)} (default {DEFAULT_METHOD})"
    )
    g.add_argument("--ood-pass-rate", type=float, default=DEFAULT_PASS_RATE,
                   help=f"share of validation images below the threshold (default {DEFAULT_PASS_RATE})")  # fmt: skip
    g.add_argument("--ood-fit-limit", type=int, default=0, help="at most this many training images for Mahalanobis")
    g.add_argument("--ood-shifts", type=int, default=ShiftPlan().copies,
                   help="acquisition-shifted copies of each validation image the threshold also covers (0: none;"
                        f" default {ShiftPlan().copies}; export/acquisition.py)")  # fmt: skip
    g.add_argument("--no-cam", dest="cam", action="store_false", help="leave out the cam output")
    q = p.add_argument_group("INT8 for CPU-only servers (docs/export.md): also write NAME-int8.onnx beside --out")
    q.add_argument("--int8", action="store_true", help="quantise the exported file, calibrated on --calibration")
    add_arguments(q)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def ood_config(args: argparse.Namespace) -> OodConfig | None:
    """``--ood-*`` as an :class:`OodConfig`; None when ``--ood-data`` is not given."""
    if args.ood_data is None:
        if args.ood_split is not None:
            raise ExportError("--ood-split needs --ood-data (the images the split names)")
        return None
    if args.ood_split is None:
        raise ExportError("--ood-data needs --ood-split (split.json: part val for the threshold, train for statistics)")
    try:
        shifts = ShiftPlan(copies=args.ood_shifts)
    except ValueError as exc:
        raise ExportError(f"--ood-shifts: {exc}") from exc
    return OodConfig(
        Path(args.ood_data), Path(args.ood_split), args.ood_method, args.ood_pass_rate, args.ood_fit_limit, shifts
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Our own progress at INFO; the exporter's libraries (onnx_ir, onnxscript) only when something is wrong.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        if args.int8 and args.fp16:
            raise ExportError("--int8 quantises a float32 export; leave out --fp16 (fp16 is the GPU option)")
        int8 = from_arguments(args) if args.int8 else None  # calibration flags checked before the export
        ood = ood_config(args)
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
            ood=ood,
            cam=args.cam,
        )
        quantized = quantize_file(result.path, default_out(result.path), *int8) if int8 else None
    except (CheckpointError, ExportError, UnknownTTAError, MetadataError, VerificationError, DataError) as exc:
        # One line, no traceback: these are the user's inputs or a failed check, not a bug.
        print(f"export: error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    print_written(result.checks, result.path, result.size_bytes, result.card)
    if quantized is not None:
        print_written(quantized.checks, quantized.path, quantized.size_bytes, quantized.card)
    return 0


if __name__ == "__main__":
    sys.exit(main())
