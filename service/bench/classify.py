"""``python -m service.bench.classify``: ``lesionserve classify`` on a folder beside the bench's c16 load
generator, alternating on one server (the figure of docs/integration.md, section 8).

Both send the same images to the same ``/v1/classify`` at the same concurrency; the difference is the
command's own cost: reading files, hashing, writing rows, its interpreter start and ``/v1/models``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from service.bench.__main__ import DEFAULT_IMAGES, load_avg, phase, spread
from service.bench.load import Server, run_load


def classify_once(url: str, images: Path, concurrency: int, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "classify", str(images), "--url", url, "--out", str(out),
         "--concurrency", str(concurrency), "--quiet"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"lesionserve classify exited {proc.returncode}: {proc.stderr.strip()}")
    rows = len(out.read_text().splitlines()) - 1  # the header
    # its summary line: "N sent in S s (R images/s); ..."
    sending = float(proc.stderr.split(" images/s")[0].rsplit("(", 1)[1])
    return {"images": rows, "wall_s": round(wall, 2), "img_s_whole_command": round(rows / wall, 2),
            "img_s_sending": sending, "load_after": load_avg()}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", type=Path, default=Path("models/reference-int8.onnx"))
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--providers", default="CPUExecutionProvider")
    args = p.parse_args()
    images = [path.read_bytes() for path in sorted(args.images.glob("*.jpg"))]
    with tempfile.TemporaryDirectory() as tmp:
        server = Server.service(args.model, Path(tmp) / "service.log", providers=args.providers, audit_log="off")
        try:
            server.wait_ready()
            run_load(server.url, images, args.concurrency, 32)  # warm-up, as python -m service.bench does
            report: dict[str, Any] = {"model": str(args.model), "images": len(images), "load_start": load_avg()}
            cli, bench = [], []
            for r in range(args.rounds):
                cli.append(classify_once(server.url, args.images, args.concurrency, Path(tmp) / f"r{r}.csv"))
                bench.append(phase("bench c16", server, images, args.concurrency, len(images)))
            report["classify"] = cli
            report["classify_img_s_sending"] = spread([c["img_s_sending"] for c in cli])
            report["classify_img_s_whole_command"] = spread([c["img_s_whole_command"] for c in cli])
            report["bench_rps"] = spread([b["throughput_rps"] for b in bench])
        finally:
            server.stop()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
