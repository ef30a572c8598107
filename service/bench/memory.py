"""``python -m service.bench.memory``: peak RSS of one decode, per input kind, against the service's estimate.

Each input is built here (:mod:`service.bench.streams`), written to a file, and decoded by a fresh
child process through the service's own decoder (``decode_image`` / ``decode_dicom``, crop and
resize included) at the default ``MAX_PIXELS``. The child reads the file, resets its peak-RSS mark
(``/proc/self/clear_refs``, Linux), decodes, and reports ``VmHWM - VmRSS before``: the memory the
decode itself added, to compare with the budget every decode must fit (:func:`service.imaging.decode_budget`). Results go to
``runs/bench/memory.json``; the table is in docs/service.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from pydicom.uid import UID

from service.bench import streams
from service.bench.streams import TS, pattern

MB = 1 << 20
DEFAULT_MAX_PIXELS = 50_000_000
SIZE = 224

_CHILD = r"""
import json, sys, time
from service import codecs, imaging
from service.hospital import dicom
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
kind, path, max_pixels, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data = open(path, "rb").read()
decoder = dicom.decode_dicom if kind == "dicom" else imaging.decode_image
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
start = time.perf_counter()
try:
    out = decoder(data, size, max_pixels)
    result = {"status": 200, "shape": list(out.pixels.shape)}
except Exception as exc:
    result = {"status": getattr(exc, "status", 500), "error": type(exc).__name__, "detail": getattr(exc, "detail", "")}
result.update(seconds=round(time.perf_counter() - start, 3), peak_bytes=status("VmHWM") - before, input_bytes=len(data))
print(json.dumps(result))
"""


def _inputs(scale: float) -> dict[str, tuple[str, Callable[[], bytes], str]]:
    """name -> (decoder kind, builder, what it is). ``scale`` shrinks every side (1.0: near the limits)."""

    def img(rows: int, cols: int) -> np.ndarray:
        return pattern(max(64, int(rows * scale)), max(64, int(cols * scale)))

    def dcm(encode: Callable[[np.ndarray], bytes], ts: UID, rows: int, cols: int, photometric: str = "RGB") -> bytes:
        rgb = img(rows, cols)
        frame = encode(rgb)
        pixel_data = frame if ts == TS.ExplicitVRLittleEndian else [frame]
        return streams.dicom(pixel_data, rgb.shape[0], rgb.shape[1], ts, photometric)

    tiny = pattern(64, 64)
    return {
        "jpeg-baseline": ("image", lambda: streams.jpeg(img(6000, 8000)), "plain JPEG, 8000x6000 (48 Mpx), 4:4:4"),
        "jpeg-progressive": ("image", lambda: streams.jpeg(img(6000, 8000), progressive=True), "plain progressive JPEG, 8000x6000, 4:4:4"),
        "png": ("image", lambda: _png(img(6400, 6400)), "plain PNG, 6400x6400 (41 Mpx), RGB 8-bit"),
        "dicom-jpeg-baseline": ("dicom", lambda: dcm(streams.jpeg, TS.JPEGBaseline8Bit, 6000, 8000, "YBR_FULL_422"), "DICOM JPEG baseline, 8000x6000"),
        "dicom-jpeg-lossless": ("dicom", lambda: dcm(streams.jpeg_lossless, TS.JPEGLosslessSV1, 1500, 2000), "DICOM JPEG lossless SV1, 2000x1500"),
        "dicom-jpeg-ls": ("dicom", lambda: dcm(streams.jpeg_ls, TS.JPEGLSLossless, 5000, 5000), "DICOM JPEG-LS lossless, 5000x5000 (25 Mpx)"),
        "dicom-j2k": ("dicom", lambda: dcm(streams.j2k, TS.JPEG2000Lossless, 4000, 4000), "DICOM JPEG 2000 lossless, 4000x4000 (16 Mpx)"),
        "dicom-rle": ("dicom", lambda: dcm(streams.rle, TS.RLELossless, 3000, 3000), "DICOM RLE, 3000x3000 (9 Mpx)"),
        "dicom-native": ("dicom", lambda: dcm(lambda a: a.tobytes(), TS.ExplicitVRLittleEndian, 2500, 2500), "DICOM native RGB, 2500x2500 (18.75 MB)"),
        "bomb-dicom-jpeg": ("dicom", lambda: streams.dicom([streams.forge_jpeg_size(streams.jpeg(tiny), 30000, 30000)], 64, 64, TS.JPEGBaseline8Bit, "YBR_FULL_422"), "64x64 header, JPEG declaring 30000x30000"),
        "bomb-dicom-j2k": ("dicom", lambda: streams.dicom([streams.forge_j2k_size(streams.j2k(tiny), 30000, 30000)], 64, 64, TS.JPEG2000Lossless), "64x64 header, J2K declaring 30000x30000"),
        "short-jpeg": ("image", lambda: streams.forge_jpeg_size(streams.jpeg(tiny), 4000, 4000), "JPEG declaring 4000x4000 with 64x64 data"),
    }  # fmt: skip


def _png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", rgb[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encode failed")
    return bytes(buf.tobytes())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every input's sides (quick runs)")
    parser.add_argument("--only", nargs="*", help="input names to run")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/memory.json"))
    args = parser.parse_args()
    from service.imaging import decode_budget

    budget = decode_budget(DEFAULT_MAX_PIXELS)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kind, build, what) in _inputs(args.scale).items():
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            data = build()
            path = Path(tmp) / name
            path.write_bytes(data)
            del data
            built = time.perf_counter() - t0
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD, kind, str(path), str(DEFAULT_MAX_PIXELS), str(SIZE)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            row = {"input": name, "what": what, **json.loads(proc.stdout.strip().splitlines()[-1])}
            row["peak_mb"] = round(row["peak_bytes"] / MB, 1)
            results.append(row)
            print(f"{name:22s} {row['status']} peak +{row['peak_mb']:7.1f} MB  decode {row['seconds']:.2f} s  "
                  f"input {row['input_bytes'] / MB:.2f} MB  (built in {built:.1f} s)", flush=True)  # fmt: skip
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "max_pixels": DEFAULT_MAX_PIXELS,
        "budget_mb": round(budget / MB, 1),
        "size": SIZE,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"budget per decode at MAX_PIXELS={DEFAULT_MAX_PIXELS}: {budget / MB:.0f} MiB; written {args.out}")
    return 0 if all(r["peak_bytes"] <= budget for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
