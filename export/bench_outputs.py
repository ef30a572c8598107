"""``python -m export.bench_outputs MODEL.onnx``: what the optional outputs (``ood_score``, ``cam``) cost.

From one exported file with both outputs, sub-models are cut with ``onnx.utils.Extractor`` (the nodes each
set of outputs needs, nothing else): probabilities only (a file exported without them), + ``ood_score``,
+ ``cam``, and all three. Each is timed against the probabilities-only model, alternately, so load from
other processes hits both alike. Also prints the bytes each output adds per image.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx.utils import Extractor

from export.bench import paired_times_s, session
from service.contract import CAM_OUTPUT, INPUT_NAME, OOD_OUTPUT, OUTPUT_NAME

VARIANTS = {
    "probabilities": [OUTPUT_NAME],
    "+ ood_score": [OUTPUT_NAME, OOD_OUTPUT],
    "+ cam": [OUTPUT_NAME, CAM_OUTPUT],
    "+ ood_score + cam": [OUTPUT_NAME, OOD_OUTPUT, CAM_OUTPUT],
}


def cut(model: onnx.ModelProto, outputs: list[str], path: Path) -> Path:
    """The part of ``model`` that computes ``outputs`` from the image, saved to ``path``."""
    sub = Extractor(model).extract_model([INPUT_NAME], outputs)
    onnx.save(sub, str(path))
    return path


def bench(model_path: Path, batches: Sequence[int], repeats: int, threads: int) -> dict[str, Any]:
    model = onnx.load(str(model_path))
    names = {o.name for o in model.graph.output}
    if not {OOD_OUTPUT, CAM_OUTPUT} <= names:
        raise ValueError(f"{model_path} lacks {OOD_OUTPUT!r} or {CAM_OUTPUT!r}: export it with both")
    size = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {k: cut(model, v, Path(tmp) / f"{i}.onnx") for i, (k, v) in enumerate(VARIANTS.items())}
        base = session(paths["probabilities"], threads)
        rng = np.random.default_rng(0)
        for b in batches:
            x = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
            for name in list(VARIANTS)[1:]:
                variant = session(paths[name], threads)
                tv, tb = paired_times_s(variant, x, base, x, repeats)
                extra = variant.run(VARIANTS[name][1:], {INPUT_NAME: x})
                rows.append({
                    "variant": name, "batch": b, "ms": 1000 * min(tv), "base_ms": 1000 * min(tb),
                    "median_ms": 1000 * statistics.median(tv), "base_median_ms": 1000 * statistics.median(tb),
                    "overhead_pct": 100 * (min(tv) / min(tb) - 1),
                    "bytes_per_image": int(sum(a.nbytes for a in extra) // b),
                })  # fmt: skip
    return {"model": str(model_path), "size": size, "threads": threads, "repeats": repeats, "rows": rows}


def profile_shares(model_path: Path, batches: Sequence[int], runs: int, threads: int) -> list[dict[str, Any]]:
    """Share of ONNX Runtime kernel time spent in the nodes only ``ood_score`` or only ``cam`` need.

    Kernel times come from ORT's profiler (graph optimisations off, so the nodes keep the graph's names);
    a share of one run's own time is steady under outside load, where wall-clock differences are not.
    """
    model = onnx.load(str(model_path))
    nodes = {name: {n.name for n in Extractor(model).extract_model([INPUT_NAME], [name]).graph.node}
             for name in (OUTPUT_NAME, OOD_OUTPUT, CAM_OUTPUT)}  # fmt: skip
    size = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    rows = []
    for b in batches:
        opts = ort.SessionOptions()
        opts.enable_profiling, opts.intra_op_num_threads = True, threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        with tempfile.TemporaryDirectory() as tmp:
            opts.profile_file_prefix = f"{tmp}/profile"
            sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
            x = np.random.default_rng(0).integers(0, 256, (b, size, size, 3), dtype=np.uint8)
            for _ in range(runs):
                sess.run(None, {INPUT_NAME: x})
            events = json.loads(Path(sess.end_profiling()).read_text())
        kernel: dict[str, float] = {}
        for e in events:  # one event per node per run: summed over the runs
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                name = e["name"].removesuffix("_kernel_time")
                kernel[name] = kernel.get(name, 0.0) + e["dur"]
        total = sum(kernel.values())
        share = {
            out: sum(t for n, t in kernel.items() if n in nodes[out] and n not in nodes[OUTPUT_NAME]) / total
            for out in (OOD_OUTPUT, CAM_OUTPUT)
        }
        rows.append({"batch": b, "ood_score_pct": 100 * share[OOD_OUTPUT], "cam_pct": 100 * share[CAM_OUTPUT]})
    return rows


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"`{result['model']}` ({result['size']} px), ONNX Runtime CPU, {result['threads']} threads, best of"
        f" {result['repeats']} (median in brackets), each variant timed alternately with probabilities only",
        "",
        "| outputs | batch | ms | probabilities only, ms | overhead (best) | bytes per image added |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['variant']} | {r['batch']} | {r['ms']:.1f} ({r['median_ms']:.1f}) | {r['base_ms']:.1f}"
        f" ({r['base_median_ms']:.1f}) | {r['overhead_pct']:+.1f}% | {r['bytes_per_image']} |"
        for r in result["rows"]
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.bench_outputs", description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="an exported file with ood_score and cam")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--json", type=Path, help="also write the figures as JSON here")
    p.add_argument("--profile", action="store_true", help="kernel-time shares from ORT's profiler instead of timing")
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    try:
        if a.profile:
            rows = profile_shares(a.model, batches, a.repeats, a.threads)
            print("| batch | ood_score nodes, % of kernel time | cam nodes, % of kernel time |\n|---:|---:|---:|")
            print("\n".join(f"| {r['batch']} | {r['ood_score_pct']:.2f}% | {r['cam_pct']:.2f}% |" for r in rows))
            return 0
        result = bench(a.model, batches, a.repeats, a.threads)
    except (ValueError, OSError) as exc:
        print(f"export.bench_outputs: {exc}", file=sys.stderr)
        return 2
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
