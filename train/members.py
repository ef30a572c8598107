"""Members that accumulate: committed fp16 checkpoints and the manifest that lists them.

``models/members/`` holds one checkpoint per trained member (the ``lesionserve.checkpoint/1``
format of :mod:`train.checkpoint`, float tensors stored as float16: half the bytes, and the
exported graph runs in float32 anyway) and ``manifest.json``, which says for each member what it
is (architecture, input size, seed, fold), how it was made (recipe, device, epochs, training
time) and how good it is on its own (its fold's held-out lesions and the fixed validation part).

Every member of one manifest shares one split file (``split_sha256``): the held-out test part
stays the same lesions for every member, so an ensemble of them can be tested on it honestly.
Members are added by ``python -m train.members add FILE...`` (from ``python -m train`` or the
GPU trip's output folder); ``models/build_reference.sh`` builds the served model from the
manifest without retraining. See docs/training.md, "Members".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint

MANIFEST = "manifest.json"
FORMAT = "lesionserve.members/1"
DEFAULT_DIR = Path("models/members")
# A clone should stay reasonable: the committed members' budget (docs/training.md, "Members").
BUDGET_BYTES = 60 * 1024 * 1024
SHORT_ARCH = {"efficientnet_lite0": "lite0", "efficientnet_lite1": "lite1", "efficientnet_lite2": "lite2"}


class MembersError(ValueError):
    """A member or manifest that cannot be used; the message names the file and the reason."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def to_half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float tensors as float16 (integer buffers such as BN's ``num_batches_tracked`` unchanged).

    ``load_state_dict`` copies into the model's float32 parameters, so a half checkpoint loads
    into the ordinary model; the rounding (relative 2^-11) is far below what TTA views differ by.
    """
    return {k: v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu() for k, v in state.items()}


def member_name(ckpt: Checkpoint) -> str:
    """``lite0-224-f0-s0``: architecture, input size, fold, seed (what makes members differ)."""
    info = ckpt.extra.get("member", {})
    fold = info.get("fold")
    arch = SHORT_ARCH.get(ckpt.arch, ckpt.arch)
    return f"{arch}-{ckpt.img_size}-{'f' + str(fold) if fold is not None else 'all'}-s{info.get('seed', 0)}"


def save_member(ckpt: Checkpoint, path: Path, info: dict[str, Any]) -> Path:
    """Write ``ckpt`` as a member file: fp16 weights, no resume state, ``info`` under the key ``member``."""
    half = Checkpoint(
        arch=ckpt.arch, classes=ckpt.classes, img_size=ckpt.img_size, model_state=to_half(ckpt.model_state),
        head=ckpt.head, dropout=ckpt.dropout, hidden=ckpt.hidden, class_names=ckpt.class_names,
        temperature=ckpt.temperature, metrics=ckpt.metrics, config=ckpt.config, epoch=ckpt.epoch,
        dataset=ckpt.dataset, extra={"member": info}, normalization=ckpt.normalization,
    )  # fmt: skip
    return save_checkpoint(half, path)


@dataclass
class Manifest:
    folder: Path
    data: dict[str, Any]

    @property
    def members(self) -> list[dict[str, Any]]:
        return list(self.data["members"])

    def paths(self) -> list[Path]:
        return [self.folder / m["file"] for m in self.members]

    def total_bytes(self) -> int:
        return sum(int(m["bytes"]) for m in self.members)

    def write(self) -> Path:
        path = self.folder / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=False) + "\n")
        tmp.replace(path)
        return path


def read_manifest(folder: Path) -> Manifest:
    """The folder's manifest, or an empty one when the folder has none yet."""
    path = folder / MANIFEST
    if not path.is_file():
        return Manifest(folder, {"format": FORMAT, "split_sha256": None, "members": []})
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MembersError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("members"), list):
        raise MembersError(f"{path}: not a {FORMAT} manifest")
    return Manifest(folder, data)


def _entry(ckpt: Checkpoint, file: Path) -> dict[str, Any]:
    info = dict(ckpt.extra.get("member", {}))
    metrics = {k: v for k, v in ckpt.metrics.items() if not isinstance(v, dict | list)}
    return {
        "name": file.stem,
        "file": file.name,
        "bytes": file.stat().st_size,
        "sha256": sha256_file(file),
        "arch": ckpt.arch,
        "img_size": ckpt.img_size,
        "seed": info.get("seed"),
        "fold": info.get("fold"),
        "folds": info.get("folds"),
        "split_sha256": info.get("split_sha256"),
        "temperature": ckpt.temperature,
        "best_epoch": ckpt.epoch,
        "epochs_trained": len(info.get("history", [])) or None,
        "recipe": info.get("recipe", {}),
        "trained_on": info.get("device"),
        "train_seconds": info.get("train_seconds"),
        "train_images_per_s": info.get("train_images_per_s"),
        "metrics": {"fold_holdout": metrics, "val": info.get("val_metrics", {})},
    }


def add_members(files: Sequence[Path], folder: Path = DEFAULT_DIR, replace: bool = False) -> Manifest:
    """Copy member checkpoints into ``folder`` and list them in its manifest (all checked before any copy).

    Refuses, naming the file: anything :func:`load_checkpoint` refuses, a checkpoint without the
    ``member`` record (train it with ``python -m train.trip`` or ``python -m train --member``), a
    member whose split differs from the manifest's (its test part would not be held out for the
    others), a name already listed (unless ``replace``), classes that differ from the others,
    and a total over :data:`BUDGET_BYTES`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    man = read_manifest(folder)
    listed = {m["name"] for m in man.members}
    split = man.data.get("split_sha256")
    classes = man.data.get("classes")
    staged: list[tuple[Path, Checkpoint, str]] = []
    for f in files:
        try:
            ckpt = load_checkpoint(f)
        except CheckpointError as exc:
            raise MembersError(str(exc)) from exc
        info = ckpt.extra.get("member")
        if not isinstance(info, dict):
            raise MembersError(f"{f}: no member record (a checkpoint from python -m train.trip run or --member)")
        s = info.get("split_sha256")
        if split is not None and s != split:
            raise MembersError(f"{f}: trained on split {s}, the manifest's members on {split}: test would leak")
        if classes is not None and ckpt.classes != classes:
            raise MembersError(f"{f}: classes {ckpt.classes} differ from the manifest's {classes}")
        name = Path(f).stem
        if name in listed and not replace:
            raise MembersError(f"{f}: a member named {name} is already listed (--replace to overwrite it)")
        split, classes = s, ckpt.classes
        staged.append((Path(f), ckpt, name))
    incoming = sum(f.stat().st_size for f, _, _ in staged)
    kept = sum(int(m["bytes"]) for m in man.members if m["name"] not in {n for _, _, n in staged})
    if kept + incoming > BUDGET_BYTES:
        raise MembersError(
            f"members would take {(kept + incoming) / 2**20:.1f} MiB, over the {BUDGET_BYTES / 2**20:.0f} MiB budget"
        )
    entries = [m for m in man.members if m["name"] not in {n for _, _, n in staged}]
    for f, ckpt, name in staged:
        dest = folder / f"{name}.pt"
        if f.resolve() != dest.resolve():
            shutil.copyfile(f, dest)
        entries.append(_entry(ckpt, dest))
    man.data.update(split_sha256=split, classes=classes, members=entries)
    man.write()
    return man


def remove_members(names: Sequence[str], folder: Path = DEFAULT_DIR, keep: Sequence[str] = ()) -> Manifest:
    """Delete members from ``folder`` and its manifest: how room is made under :data:`BUDGET_BYTES` for
    the next trip's members. Refuses (nothing changed) an unlisted name and any name in ``keep`` (the
    members the bundled reference serves: without them it could not be rebuilt)."""
    man = read_manifest(folder)
    listed = {m["name"]: m for m in man.members}
    unknown = [n for n in names if n not in listed]
    if unknown:
        raise MembersError(f"{folder}: {', '.join(unknown)} not listed in {MANIFEST}")
    served = [n for n in names if n in keep]
    if served:
        raise MembersError(f"{', '.join(served)} served by the bundled reference (rebuild it without them first)")
    man.data["members"] = [m for m in man.members if m["name"] not in set(names)]
    man.write()  # the manifest first: a crash between the two leaves a stray file, never a listed missing one
    for n in names:
        (folder / listed[n]["file"]).unlink(missing_ok=True)
    return man


def served_members(eval_dir: Path = DEFAULT_DIR.parent / "reference-eval") -> list[str]:
    """The members the bundled reference serves, as models/build_reference.sh recorded them."""
    path = eval_dir / "members.json"
    if not path.is_file():
        return []
    return list(json.loads(path.read_text()).get("served", {}).get("members", []))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.members", description="The committed ensemble members.")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="copy member checkpoints into the folder and list them in its manifest")
    a.add_argument("files", nargs="+", type=Path)
    a.add_argument("--replace", action="store_true", help="overwrite members of the same name")
    r = sub.add_parser("remove", help="delete members (not those the bundled reference serves) to make room")
    r.add_argument("names", nargs="+")
    for s in (a, r, sub.add_parser("list", help="one line per member"), sub.add_parser("paths", help="member files")):
        s.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"members folder (default {DEFAULT_DIR})")
    args = p.parse_args(argv)
    try:
        if args.cmd == "add":
            man = add_members(args.files, args.dir, args.replace)
            print(f"{args.dir / MANIFEST}: {len(man.members)} member(s), {man.total_bytes() / 2**20:.1f} MiB")
        elif args.cmd == "remove":
            keep = served_members() if args.dir.resolve() == DEFAULT_DIR.resolve() else []
            man = remove_members(args.names, args.dir, keep)
            print(f"{args.dir / MANIFEST}: {len(man.members)} member(s), {man.total_bytes() / 2**20:.1f} MiB")
        elif args.cmd == "paths":
            man = read_manifest(args.dir)
            if not man.members:
                raise MembersError(f"{args.dir}: no members listed in {MANIFEST}")
            print("\n".join(str(p) for p in man.paths()))
        else:
            for m in read_manifest(args.dir).members:
                fh, va = m["metrics"]["fold_holdout"], m["metrics"]["val"]
                print(
                    f"{m['name']:<22} {m['arch']:<19} {m['img_size']:>4}px"
                    f"  epochs {m['best_epoch']:>3}/{m['epochs_trained'] or '?':<3}"
                    f"  fold bacc {fh.get('balanced_accuracy', float('nan')):.3f}"
                    f"  val bacc {va.get('balanced_accuracy', float('nan')):.3f}  {m['bytes'] / 2**20:.1f} MiB"
                )
    except MembersError as exc:
        print(f"train.members: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
