"""``python -m train --data PATH --arch resnet50 --img-size 224 --loss focal --epochs 30 --out runs/NAME``.

Every field of :class:`train.config.TrainConfig` is a flag (``img_size`` -> ``--img-size``);
``--config FILE.yaml`` is read first and the flags given override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import typing
from pathlib import Path

from train.config import CHOICES, TrainConfig, load_config
from train.data import DataError


def field_comments() -> dict[str, str]:
    """Each TrainConfig field's trailing comment in train/config.py: one source for the code and ``--help``."""
    source = (Path(__file__).parent / "config.py").read_text()
    return dict(re.findall(r"^    (\w+): [^\n]*?#\s*(.+)$", source, flags=re.MULTILINE))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a lesion classifier (see docs/training.md). Runs in the virtualenv of `make train`.",
    )
    comments = field_comments()
    ap.add_argument("--config", help="YAML file of config fields; command-line flags override it")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else "[]"
        kind = hints[f.name]
        if kind is bool:
            ap.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                            help=f"{comments.get(f.name, '')} (default {default})".strip())  # fmt: skip
        elif f.name == "teacher":  # repeatable, one file per flag
            ap.add_argument(
                flag, dest=f.name, action="append", default=None, help="repeatable: --teacher a.pt --teacher b.onnx"
            )
        elif kind == list[str]:
            ap.add_argument(flag, dest=f.name, default=None, type=lambda s: [c.strip() for c in s.split(",") if c],
                            help="comma-separated, e.g. akiec,bcc,bkl,df,mel,nv,vasc")  # fmt: skip
        else:
            choices = CHOICES.get(f.name)
            what = comments.get(f.name, "")
            if choices:
                what = f"one of {{{','.join(choices)}}}"
            ap.add_argument(
                flag, dest=f.name, type=kind, default=None, metavar=f.name.upper(),
                help=f"{what} (default {default!r})".strip(),
            )  # fmt: skip
    return ap


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    try:
        cfg = load_config(config_file, args)
        from train.run import run  # deferred: --help and config errors should not wait for torch

        run(cfg)
    except (ValueError, DataError, FileNotFoundError) as exc:
        logging.getLogger("train").error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
