"""``python -m service.bench``: the service's throughput and latency against its ceilings.

Measures, in one run: ONNX Runtime alone on ready tensors at each batch size (the ceiling);
the service over HTTP at concurrency 1 and 16 (throughput, p50/p99, batch-size histogram);
the plain FastAPI baseline (``service.bench.baseline``) the same way; and the service's RSS
after warm-up and after many requests. Results are printed and written as JSON.

Without ``--model`` a ResNet-50-shaped model is built with ``python -m tests.resnet_onnx``
(needs the repository checkout and the ``onnx`` package, i.e. the dev/train extras).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.bench.load import LoadResult, Server, run_load
from service.imaging import decode_image
from service.inference import OnnxModel

log = logging.getLogger("service.bench")
DEFAULT_IMAGES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ham10000-600x450"


class BenchError(RuntimeError):
    """Something the user must fix; printed as one line."""


def build_model(path: Path, width: int) -> Path:
    if path.exists():
        return path
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("tests.resnet_onnx") is None:
        raise BenchError("no --model given and cannot build one here (needs the repository's tests/ and `onnx`)")
    log.info("building %s", path)
    subprocess.run([sys.executable, "-m", "tests.resnet_onnx", str(path), "--width", str(width)], check=True)
    return path


def ceiling(
    model_path: Path, images: list[bytes], batches: list[int], seconds: float, providers: str = "CPUExecutionProvider"
) -> dict[str, float]:
    """Images/s of ONNX Runtime alone on preprocessed tensors, per batch size, in this process."""
    chosen = [p.strip() for p in providers.split(",") if p.strip()]
    threads = None if chosen[0] == "CUDAExecutionProvider" else os.cpu_count() or 1
    model = OnnxModel.load(model_path, chosen, intra_op_threads=threads)
    size = model.metadata.input_size
    # the images cycle to fill batches larger than the folder (12 committed images; GPU batches go to 64)
    picked = [images[i % len(images)] for i in range(max(batches))]
    tensors = np.stack([decode_image(data, size, 10**9).pixels for data in picked])
    out = {}
    for b in batches:
        model.run(tensors[:b])  # first run allocates
        runs, start = 0, time.perf_counter()
        while runs < 2 or time.perf_counter() - start < seconds:
            model.run(tensors[:b])
            runs += 1
        out[str(b)] = round(runs * b / (time.perf_counter() - start), 2)
    return out


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def phase(
    name: str, server: Server, images: list[bytes], concurrency: int, requests: int, path: str = "/v1/classify"
) -> dict[str, Any]:
    load_before = load_avg()
    result: LoadResult = run_load(server.url, images, concurrency, requests, path)
    summary = {"name": name, **result.summary(), "load_before": load_before, "load_after": load_avg()}
    log.info("%s", json.dumps(summary))
    return summary


def spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2)}


def compare_summary(
    phases: list[dict[str, Any]], ceilings: list[dict[str, float]], compare_ceilings: list[dict[str, float]]
) -> dict[str, object]:
    """``--compare`` figures as ratios compare / service, each from one repeat (same outside load)."""

    def paired(name: str, key: str) -> list[float]:
        return [
            float(a[key]) / float(b[key])
            for a in phases for b in phases
            if a["name"] == f"compare {name}" and b["name"] == f"service {name}" and a["repeat"] == b["repeat"]
        ]  # fmt: skip

    ceiling_ratio = [max(c.values()) / max(s.values()) for c, s in zip(compare_ceilings, ceilings, strict=True)]
    return {
        "compare ceiling best batch img/s": spread([max(c.values()) for c in compare_ceilings]),
        "compare / service ceiling": spread(ceiling_ratio),
        "compare / service throughput at c16": spread(paired("c16", "throughput_rps")),
        "compare / service p50 at c1": spread(paired("c1", "p50_ms")),
    }


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python -m service.bench",
        description="lesionserve load-test harness (make bench)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", type=Path, help="contract .onnx; None: a ResNet-50-shaped one is built")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of JPEGs sent as requests")
    p.add_argument("--workdir", type=Path, default=Path("runs/bench"), help="where models and results go")
    p.add_argument("--repeats", type=int, default=3, help="runs of every phase, the servers' order alternating")
    p.add_argument("--requests-c1", type=int, default=30, help="requests at concurrency 1")
    p.add_argument("--requests-c16", type=int, default=160, help="requests at concurrency 16")
    p.add_argument("--max-batch", type=int, default=8, help="the service's LESIONSERVE_MAX_BATCH_SIZE")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the service's LESIONSERVE_MAX_WAIT_MS")
    p.add_argument("--ceiling-seconds", type=float, default=2.0, help="per batch size, per repeat")
    p.add_argument("--rss-requests", type=int, default=5000, help="0 skips the RSS run")
    p.add_argument("--rss-model", type=Path, help="model for the RSS run; None: ResNet-50-shaped, width 16")
    p.add_argument("--skip-baseline", action="store_true", help="leave out the plain FastAPI baseline")
    p.add_argument("--explain", action="store_true", help="also time the service with ?explain=true (heatmaps)")
    p.add_argument("--compare", type=Path, metavar="MODEL",
                   help="a second file of the same model (e.g. models/reference-int8.onnx): served and timed in turns")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("runs/bench/results.json"), help="results file")
    p.add_argument(
        "--providers",
        default="CPUExecutionProvider",
        help="ONNX Runtime providers of the ceiling and the services, in order (e.g. CUDAExecutionProvider)",
    )
    p.add_argument(
        "--batches", default="", help="ceiling batch sizes, comma-separated (default: 1, 2, 4 and --max-batch)"
    )
    args = p.parse_args()
    try:
        batches = sorted({int(b) for b in args.batches.split(",") if b.strip()} or {1, 2, 4, args.max_batch})
    except ValueError:
        print(f"lesionserve bench: --batches wants comma-separated integers, got {args.batches!r}", file=sys.stderr)
        return 2
    if batches[0] < 1:
        print(f"lesionserve bench: batch sizes must be >= 1, got {batches[0]}", file=sys.stderr)
        return 2
    # SIGTERM (e.g. timeout) must still run the finally blocks that stop the server processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would flood the output
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = sorted(args.images.glob("*.jpg"))
    if not paths:
        print(f"lesionserve bench: no JPEGs in {args.images} (use --images DIR)", file=sys.stderr)
        return 2
    images = [path.read_bytes() for path in paths]
    model = args.model or build_model(args.workdir / "resnet50-224.onnx", 64)
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, shared with other users",
        "model": str(model), "images": f"{len(images)} JPEGs from {args.images}", "load_start": load_avg(),
        "settings": {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms},
    }  # fmt: skip
    report["providers"] = args.providers
    svc = Server.service(model, args.workdir / "service.log", providers=args.providers,
                         max_batch_size=str(args.max_batch), max_wait_ms=str(args.max_wait_ms), queue_size="256")  # fmt: skip
    servers = {"service": svc}
    if args.compare:
        report["compare_model"] = str(args.compare)
        servers["compare"] = Server.service(args.compare, args.workdir / "compare.log", providers=args.providers,
                                            max_batch_size=str(args.max_batch), max_wait_ms=str(args.max_wait_ms),
                                            queue_size="256")  # fmt: skip
    if not args.skip_baseline:
        servers["baseline"] = Server.baseline(model, args.workdir / "baseline.log")
    phases: list[dict[str, Any]] = []
    ceilings: list[dict[str, float]] = []
    compare_ceilings: list[dict[str, float]] = []
    try:
        for server in servers.values():
            server.wait_ready()
            run_load(server.url, images, 16, 32)  # warm-up: first requests, thread pools, arenas
        rss_warm = svc.rss_mb()
        # The CPU is shared: every repeat measures the ceiling and both servers back to back (the
        # order alternating), so each ratio compares figures taken under the same outside load.
        for r in range(args.repeats):
            ceilings.append(ceiling(model, images, batches, args.ceiling_seconds, args.providers))
            log.info("ceiling %s (load %s)", ceilings[-1], load_avg())
            if args.compare:
                compare_ceilings.append(ceiling(args.compare, images, batches, args.ceiling_seconds, args.providers))
                log.info("compare ceiling %s", compare_ceilings[-1])
            order = list(servers.items()) if r % 2 == 0 else list(reversed(servers.items()))
            for name, server in order:
                phases.append({"repeat": r, **phase(f"{name} c1", server, images, 1, args.requests_c1)})
                phases.append({"repeat": r, **phase(f"{name} c16", server, images, 16, args.requests_c16)})
            if args.explain:  # same server, same repeat: the heatmap's cost is the difference
                explain = "/v1/classify?explain=true"
                phases.append({"repeat": r, **phase("service c1 explain", svc, images, 1, args.requests_c1, explain)})
                phases.append(
                    {"repeat": r, **phase("service c16 explain", svc, images, 16, args.requests_c16, explain)}
                )
        report["service_rss_mb"] = {"after_warm_up": round(rss_warm, 1), "after_runs": round(svc.rss_mb(), 1)}
    finally:
        for server in servers.values():
            server.stop()
    report["ceiling_img_s"] = ceilings
    if compare_ceilings:
        report["compare_ceiling_img_s"] = compare_ceilings
    report["phases"] = phases
    summary: dict[str, object] = {"ceiling best batch img/s": spread([max(c.values()) for c in ceilings])}
    for name in sorted({str(ph["name"]) for ph in phases}):
        runs = [ph for ph in phases if ph["name"] == name]
        tp = [float(ph["throughput_rps"]) for ph in runs]
        ratios = [float(ph["throughput_rps"]) / max(ceilings[int(ph["repeat"])].values()) for ph in runs]
        summary[name] = {
            "throughput_rps": spread(tp), "ratio_to_ceiling": spread(ratios),
            "p50_ms": spread([float(ph["p50_ms"]) for ph in runs]), "p99_ms": spread([float(ph["p99_ms"]) for ph in runs]),
        }  # fmt: skip
    if not args.skip_baseline:
        pairs = [
            float(a["throughput_rps"]) / float(b["throughput_rps"])
            for a in phases for b in phases
            if a["name"] == "service c16" and b["name"] == "baseline c16" and a["repeat"] == b["repeat"]
        ]  # fmt: skip
        summary["service / baseline at c16"] = spread(pairs)
    if args.compare:
        summary.update(compare_summary(phases, ceilings, compare_ceilings))
    report["summary"] = summary

    if args.rss_requests:
        rss_model = args.rss_model or build_model(args.workdir / "resnet50-w16-224.onnx", 16)
        rss = Server.service(rss_model, args.workdir / "service-rss.log", providers="CPUExecutionProvider",
                             max_batch_size=str(args.max_batch), max_wait_ms=str(args.max_wait_ms), queue_size="256")  # fmt: skip
        try:
            rss.wait_ready()
            run_load(rss.url, images, 16, 300)
            warm = rss.rss_mb()
            run_ = phase("rss run", rss, images, 16, args.rss_requests)
            after = rss.rss_mb()
        finally:
            rss.stop()
        report["rss"] = {"model": str(rss_model), "requests": args.rss_requests, "after_warm_up_mb": round(warm, 1),
                         "after_requests_mb": round(after, 1), "growth_mb": round(after - warm, 1), "run": run_}  # fmt: skip
    report["load_end"] = load_avg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("summary", "service_rss_mb", "load_start", "load_end")}, indent=2))
    if "rss" in report:
        print(json.dumps({k: v for k, v in report["rss"].items() if k != "run"}))
    print(f"full results: {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"lesionserve bench: {exc}", file=sys.stderr)
        sys.exit(2)
