"""Throughput: the full training pipeline vs a bare forward+backward loop on ready tensors.

``python -m train.bench --data ../shared/data/ham10000 --arch resnet18 --img-size 64 --batch-size 64``
``python -m train.bench --data ../shared/data/ham10000 --arch resnet18,efficientnet_lite0 --img-size 128 --batch-size 32``
``python -m train.bench --compare --data ../shared/data/ham10000 --arch efficientnet_lite0 --img-size 160 --batch-size 32``
(old vs new training path: train/bench_compare.py)

Both loops use the same model, batch size, optimiser and :func:`train.engine.train_step`.
"bare" feeds one ready, normalised float batch over and over; "pipeline" does what
``fit`` does per step: index the uint8 RAM cache, augment (flip, rot90, rotation, random
resized crop, colour jitter, cutout), CutMix/Mixup, then the same step. The two are
interleaved in rounds so that load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np
import torch

from train import bench_compare
from train.augment import AugmentParams, model_input, prepare_batch
from train.config import TrainConfig
from train.data import load_images, load_labelled
from train.engine import build_optimizer, train_step
from train.losses import build_loss
from train.models import build_model, input_normalization

log = logging.getLogger(__name__)


def measure(args: argparse.Namespace) -> dict[str, object]:
    torch.manual_seed(0)
    ds = load_labelled(args.data)
    idx = np.random.default_rng(0).permutation(len(ds.paths))[: args.images]
    ds = ds.subset(np.sort(idx))
    cache = torch.from_numpy(load_images(ds.paths, args.img_size, 2))
    labels = torch.from_numpy(ds.labels)
    cfg = TrainConfig(data=args.data, arch=args.arch, img_size=args.img_size, batch_size=args.batch_size)
    model = build_model(args.arch, len(ds.classes)).train()
    opt = build_optimizer(cfg, model)
    loss_fn = build_loss("focal", ds.counts().clip(min=1), focal_alpha="weights")
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    aug = AugmentParams(cutout=0.25, mixup_alpha=0.2, cutmix_alpha=1.0, mix_prob=0.5)
    gen = torch.Generator().manual_seed(0)
    norm = input_normalization(args.arch)
    ready_x = model_input(cache[: args.batch_size], norm)
    ready_y = labels[: args.batch_size]

    def bare() -> None:
        train_step(model, loss_fn, opt, scaler, ready_x, ready_y, ready_y, 1.0)

    def pipeline() -> None:
        bi = torch.randint(0, len(cache), (args.batch_size,), generator=gen)
        xb, ya, yb, lam = prepare_batch(cache[bi], labels[bi], aug, gen, norm=norm)
        train_step(model, loss_fn, opt, scaler, xb, ya, yb, lam)

    for f in (bare, pipeline):  # warm-up: allocator, oneDNN kernels
        for _ in range(2):
            f()
    times: dict[str, float] = {"bare": 0.0, "pipeline": 0.0}
    aug_only = 0.0
    for _ in range(args.rounds):
        for name, f in (("bare", bare), ("pipeline", pipeline)):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                f()
            times[name] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            bi = torch.randint(0, len(cache), (args.batch_size,), generator=gen)
            prepare_batch(cache[bi], labels[bi], aug, gen, norm=norm)
        aug_only += time.perf_counter() - t0
    n = args.rounds * args.steps * args.batch_size
    res = {
        "arch": args.arch,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "bare_images_per_s": n / times["bare"],
        "pipeline_images_per_s": n / times["pipeline"],
        "pipeline_over_bare": times["bare"] / times["pipeline"],
        "augment_only_images_per_s": n / aug_only,
        "load_average": os.getloadavg(),
    }
    return res


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--arch", default="resnet18",
                    help="one architecture, or several comma-separated (e.g. resnet18,efficientnet_lite0): measured in turn")  # fmt: skip
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=1024, help="images decoded into the cache")
    ap.add_argument("--steps", type=int, default=5, help="steps per loop per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--compare", action="store_true",
                    help="old vs new training path, alternating epochs (train/bench_compare.py)")  # fmt: skip
    bench_compare.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.compare:
        print(json.dumps(bench_compare.compare(args), indent=2))
        return 0
    results = []
    for arch in [a.strip() for a in args.arch.split(",") if a.strip()]:
        results.append(measure(argparse.Namespace(**{**vars(args), "arch": arch})))
    print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
