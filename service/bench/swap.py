"""``python -m service.bench.swap``: what a model swap does to latency under load.

Starts the service on ``--model``, drives it with ``--concurrency`` closed-loop clients for
``--seconds``, and meanwhile swaps the model ``--swaps`` times through ``POST /v1/admin/models/reload``
(alternating between the model and a second file with another sha256: ``--other``, or the same
weights with another version written into the metadata, which needs the ``onnx`` package).
Requests are split by whether they overlapped a reload (load + checks + warm-up + canary + switch);
both groups are reported (count, p50, p99, max, failures) from the same run, with each reload's own time.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from service.bench.load import Server
from service.swap.checks import canary_images

RELOAD = "/v1/admin/models/reload"


@dataclass(frozen=True)
class Call:
    start: float
    end: float
    outcome: str  # "200" or the failure


def other_file(model: Path, out: Path) -> Path:
    """The same model with ``+swap`` appended to its version: another sha256, the same cost to load and run."""
    try:
        import onnx
    except ImportError:
        raise SystemExit("give --other (a second .onnx file): making one needs the onnx package") from None
    proto = onnx.load(model)
    for prop in proto.metadata_props:
        if prop.key == "lesionserve.version":
            prop.value = json.dumps(json.loads(prop.value) + "+swap")
    onnx.save(proto, out)
    return out


def summarise(calls: list[Call]) -> dict[str, object]:
    ms = [(c.end - c.start) * 1000 for c in calls if c.outcome == "200"]
    failed = [c.outcome for c in calls if c.outcome != "200"]
    if not ms:
        return {"requests": len(calls), "failed": failed}
    return {
        "requests": len(calls), "failed": failed, "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(max(ms), 1),
        "mean_ms": round(statistics.fmean(ms), 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/reference.onnx"))
    parser.add_argument("--other", type=Path, help="the second file (default: --model with another version)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--swaps", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("runs/bench/swap"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench/swap.json"))
    args = parser.parse_args()

    models = args.work / "models"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.model, models / "a.onnx")
    if args.other:
        shutil.copyfile(args.other, models / "b.onnx")
    else:
        other_file(args.model, models / "b.onnx")
    key = secrets.token_urlsafe(24)
    auth = {"authorization": f"Bearer {key}"}
    server = Server.service(
        models / "a.onnx", args.work / "server.log", api_keys=f"ops:{key}", admin_key_ids="ops",
        max_batch_size=str(args.max_batch), audit_log="off", log_format="json",
    )  # fmt: skip
    images = [data for _, data in canary_images()]
    calls: list[Call] = []
    reloads: list[dict[str, object]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60, headers=auth) as http:
            n = i
            while not stop.is_set():
                start = time.monotonic()
                try:
                    resp = http.post(
                        "/v1/classify", content=images[n % len(images)], headers={"content-type": "image/jpeg"}
                    )
                    outcome = str(resp.status_code)
                except httpx.TransportError as exc:
                    outcome = type(exc).__name__
                with lock:
                    calls.append(Call(start, time.monotonic(), outcome))
                n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.concurrency)]
    try:
        server.wait_ready()
        for t in threads:
            t.start()
        gap = args.seconds / (args.swaps + 1)
        for n in range(args.swaps):
            time.sleep(gap)
            start = time.monotonic()
            resp = httpx.post(
                server.url + RELOAD, json={"path": "b.onnx" if n % 2 == 0 else "a.onnx"}, headers=auth, timeout=300
            )
            body = resp.json()
            reloads.append({
                "start": start, "end": time.monotonic(), "status": resp.status_code,
                "server_seconds": body.get("seconds"), "result": body.get("result", body.get("check")),
                "steps": body.get("step_seconds"),
            })  # fmt: skip
        time.sleep(gap)
    finally:
        stop.set()
        for t in threads:  # every client's last request answered before the server drains (no 503 of ours)
            t.join(120)
        server.stop()

    def overlaps(c: Call) -> bool:
        return any(c.start < float(r["end"]) and c.end > float(r["start"]) for r in reloads)  # type: ignore[arg-type]

    during = [c for c in calls if overlaps(c)]
    outside = [c for c in calls if not overlaps(c)]
    result = {
        "model": str(args.model), "concurrency": args.concurrency, "max_batch": args.max_batch,
        "seconds": args.seconds, "reloads": [
            {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k not in ("start", "end")}
            | {"wall_seconds": round(float(r["end"]) - float(r["start"]), 3)} for r in reloads  # type: ignore[arg-type]
        ],
        "during_reload": summarise(during), "outside_reload": summarise(outside), "all": summarise(calls),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
