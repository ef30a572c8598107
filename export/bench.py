"""``python -m export.bench``: ONNX Runtime cost of the wrapper per TTA setting, against the bare backbone.

For each TTA setting (V views) and wrapper batch size b, the wrapped model (uint8 NHWC in,
probabilities out) runs on b images and the bare backbone (float32 NCHW in, logits out, exported
the same way without the wrapper) on V*b images: the ratio minus one is the wrapper's overhead
beyond "views x backbone" (preprocessing, view construction, softmax and means). The two are timed
alternately so that load from other processes hits both alike. Random-init weights: timing only.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from export.metadata import ExportError, read_metadata
from export.onnx_export import DEFAULT_IMAGES, export_graph
from export.parity import VerificationError, load_images
from export.wrappers import CalibratedMember, LesionModel, tta_views
from service.contract import INPUT_NAME, MetadataError
from train.models import build_model

log = logging.getLogger(__name__)


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def paired_times_s(
    a: ort.InferenceSession, xa: np.ndarray, b: ort.InferenceSession, xb: np.ndarray, repeats: int
) -> tuple[list[float], list[float]]:
    """Seconds per run of ``a`` on ``xa`` and of ``b`` on ``xb``, timed alternately after one warm-up each."""
    feeds_a, feeds_b = {a.get_inputs()[0].name: xa}, {b.get_inputs()[0].name: xb}
    a.run(None, feeds_a)
    b.run(None, feeds_b)
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.run(None, feeds_a)
        t1 = time.perf_counter()
        b.run(None, feeds_b)
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return ta, tb


class PoolHead(nn.Module):
    """A near-free stand-in backbone (global average pool + linear): the wrapper around it costs what the wrapper costs."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, K)
        return self.fc(x.mean(dim=(2, 3)))


def export_models(arch: str, size: int, classes: int, ttas: Sequence[str], workdir: Path) -> dict[str, Path]:
    """Bare backbone, one wrapper per TTA setting, and an fp16 wrapper (for its size); returns name -> file."""
    torch.manual_seed(0)
    backbone = build_model(arch, classes).eval()
    files = {"bare": workdir / "bare.onnx"}
    export_graph(backbone, files["bare"], size, channels_last=False)
    for tta in ttas:
        files[tta] = workdir / f"wrapped-{tta}.onnx"
        export_graph(LesionModel([CalibratedMember(backbone, 1.0)], tta_views(tta)), files[tta], size)
        files[f"{tta}-wrapper-only"] = workdir / f"wrapper-only-{tta}.onnx"
        only = LesionModel([CalibratedMember(PoolHead(classes), 1.0)], tta_views(tta))
        export_graph(only, files[f"{tta}-wrapper-only"], size)
    files["none-fp16"] = workdir / "wrapped-none-fp16.onnx"
    half = CalibratedMember(copy.deepcopy(backbone), 1.0, fp16=True)
    export_graph(LesionModel([half], tta_views("none")), files["none-fp16"], size)
    return files


def bench(
    arch: str = "resnet50",
    size: int = 224,
    classes: int = 7,
    ttas: Sequence[str] = ("none", "flips", "dihedral"),
    batches: Sequence[int] = (1, 2, 4, 8),
    max_images: int = 32,
    repeats: int = 7,
    threads: int = 2,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Export, time and return the figures (see the module docstring).

    Args:
        arch, size, classes: the backbone (random init) and its input side.
        ttas: TTA settings to time.
        batches: wrapper batch sizes to try; a size is skipped when views x batch exceeds ``max_images``.
        max_images: cap on backbone images per run, to keep the run short on a shared CPU.
        repeats: timed runs per point (minimum reported, median kept).
        threads: ONNX Runtime intra-op threads.
        workdir: where the models go (default: a temporary folder, removed afterwards).
    """
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        files = export_models(arch, size, classes, ttas, Path(workdir or tmp))
        rng = np.random.default_rng(0)
        bare = session(files["bare"], threads)
        rows = []
        for tta in ttas:
            views = len(tta_views(tta))
            wrapped = session(files[tta], threads)
            only = session(files[f"{tta}-wrapper-only"], threads)
            for b in (b for b in batches if b * views <= max_images):
                image = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
                x = rng.standard_normal((b * views, 3, size, size)).astype(np.float32)
                ta, tb = paired_times_s(wrapped, image, bare, x, repeats)
                # On a shared CPU the fastest run is the one least disturbed by other processes, so the
                # figures (and the overhead) use the minimum; the median is kept to show the spread.
                tw, tbare = min(ta), min(tb)
                # The wrapper's own work (cast, normalise, views, softmax, means) timed alone: milliseconds
                # that many repeats measure well, unlike a small difference of two noisy seconds.
                t_only = min(paired_times_s(only, image, only, image, 3 * repeats)[0])
                rows.append(
                    {
                        "tta": tta,
                        "views": views,
                        "batch": b,
                        "wrapped_ms": tw * 1e3,
                        "bare_ms": tbare * 1e3,
                        "wrapped_median_ms": statistics.median(ta) * 1e3,
                        "bare_median_ms": statistics.median(tb) * 1e3,
                        "images_per_s": b / tw,
                        "overhead_pct": (tw / tbare - 1.0) * 100.0,
                        "wrapper_only_ms": t_only * 1e3,
                        "wrapper_only_pct": t_only / tbare * 100.0,
                    }
                )
                log.info("%s", rows[-1])
        sizes = {name: p.stat().st_size for name, p in files.items()}
    return {
        "command": " ".join(["python -m export.bench", *sys.argv[1:]]),
        "arch": arch,
        "size": size,
        "threads": threads,
        "repeats": repeats,
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "rows": rows,
        "file_bytes": sizes,
    }


def compare_files(paths: Sequence[Path], repeats: int, threads: int, images: Path = DEFAULT_IMAGES) -> dict[str, Any]:
    """Contract files of the same model (e.g. fp32 and int8) on the same real images, timed in turns.

    Latency at batch 1 and throughput at batch 16 (what the service's batcher forms under load), each
    repeat running every file once before the next repeat, so outside load hits all of them alike.
    """
    metas = [read_metadata(p) for p in paths]
    sizes = {m.input_size for m in metas}
    if len(sizes) != 1:
        raise ExportError(f"the files take different input sizes {sorted(sizes)}: not the same model")
    files = sorted(q for q in Path(images).rglob("*") if q.suffix.lower() in (".jpg", ".jpeg", ".png"))
    x = load_images(files, sizes.pop())
    batch16 = np.ascontiguousarray(np.concatenate([x] * -(-16 // len(x)))[:16])
    sessions = [session(p, threads) for p in paths]
    feeds = {1: {INPUT_NAME: batch16[:1]}, 16: {INPUT_NAME: batch16}}
    times: dict[int, list[list[float]]] = {b: [[] for _ in paths] for b in feeds}
    for s in sessions:  # warm-up: first runs allocate
        for feed in feeds.values():
            s.run(None, feed)
    before = os.getloadavg()
    for _ in range(repeats):
        for b, feed in feeds.items():
            for i, s in enumerate(sessions):
                t0 = time.perf_counter()
                s.run(None, feed)
                times[b][i].append(time.perf_counter() - t0)
    rows = []
    for i, (p, m) in enumerate(zip(paths, metas, strict=True)):
        b1, b16 = times[1][i], times[16][i]
        rows.append({
            "file": str(p), "precision": m.precision, "mb": p.stat().st_size / 1e6,
            "b1_ms": 1000 * min(b1), "b1_median_ms": 1000 * statistics.median(b1),
            "b16_img_s": 16 / min(b16), "b16_median_img_s": 16 / statistics.median(b16),
        })  # fmt: skip
    for r in rows:
        r["b16_speedup_vs_first"] = rows[0]["b16_median_img_s"] and r["b16_median_img_s"] / rows[0]["b16_median_img_s"]
    return {"cpu": _cpu_name(), "cpus": os.cpu_count(), "threads": threads, "repeats": repeats,
            "onnxruntime": ort.__version__, "images": f"{len(files)} images from {images}",
            "loadavg_before": before, "loadavg_after": os.getloadavg(), "rows": rows}  # fmt: skip


def compare_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"ONNX Runtime {result['onnxruntime']} CPU EP, {result['threads']} threads, {result['cpu']} ({result['cpus']}"
        f" cores), {result['repeats']} repeats in turns, best (median); load average before"
        f" {result['loadavg_before'][0]:.2f}, after {result['loadavg_after'][0]:.2f}",
        "",
        "| file | precision | MB | batch 1 ms | batch 16 img/s | batch-16 speed-up (medians) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['file']} | {r['precision']} | {r['mb']:.1f} | {r['b1_ms']:.1f} ({r['b1_median_ms']:.1f})"
        f" | {r['b16_img_s']:.1f} ({r['b16_median_img_s']:.1f}) | {r['b16_speedup_vs_first']:.2f}x |"
        for r in result["rows"]
    ]
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def to_markdown(result: dict[str, Any]) -> str:
    """The figures as the tables in docs/export.md."""
    lines = [
        f"{result['arch']} at {result['size']}, ONNX Runtime {result['onnxruntime']} CPU EP, {result['threads']} threads,"
        f" {result['cpu']} ({result['cpus']} cores), best of {result['repeats']} (median in brackets);"
        f" load average before {result['loadavg_before'][0]:.2f}, after {result['loadavg_after'][0]:.2f}",
        "",
        "| TTA | views | batch | wrapped ms | bare backbone ms (views x batch) | images/s | overhead (best) |"
        " wrapper alone ms | wrapper alone / bare |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['tta']} | {r['views']} | {r['batch']} | {r['wrapped_ms']:.1f} ({r['wrapped_median_ms']:.0f})"
        f" | {r['bare_ms']:.1f} ({r['bare_median_ms']:.0f}) |"
        f" {r['images_per_s']:.2f} | {r['overhead_pct']:+.1f}% | {r['wrapper_only_ms']:.2f} | {r['wrapper_only_pct']:.2f}% |"
        for r in result["rows"]
    ]
    lines += ["", "| file | MB |", "|---|---:|"]
    lines += [f"| {name} | {n / 1e6:.1f} |" for name, n in result["file_bytes"].items() if "wrapper-only" not in name]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.bench", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--tta", default="none,flips,dihedral", help="comma-separated TTA settings")
    p.add_argument("--batches", default="1,2,4,8", help="comma-separated wrapper batch sizes")
    p.add_argument("--max-images", type=int, default=32, help="cap on views x batch per run")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--json", help="also write the figures as JSON here")
    p.add_argument("--models", help="comma-separated contract files of one model (e.g. fp32,int8): compare those"
                   " on the committed images instead of the TTA study")  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.models:
        try:
            compared = compare_files([Path(m) for m in args.models.split(",")], args.repeats, args.threads)
        except (ExportError, MetadataError, VerificationError, OSError) as exc:
            print(f"export.bench: error: {exc}", file=sys.stderr)
            return 1
        if args.json:
            Path(args.json).write_text(json.dumps(compared, indent=2))
        print(compare_markdown(compared))
        return 0
    result = bench(
        args.arch,
        args.size,
        ttas=args.tta.split(","),
        batches=[int(b) for b in args.batches.split(",")],
        max_images=args.max_images,
        repeats=args.repeats,
        threads=args.threads,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
