"""The CUDA provider to a lent GPU machine in parts: ``onnxruntime-gpu`` is too big for one call.

The GPU machine's onnxruntime has no CUDA provider (docs/gpu.md), and the ``onnxruntime-gpu`` wheel
(231 MB; its CUDA provider library alone 284 MB raw, 186 MB with xz) is over one call's 64 MiB. So:

* here, ``pack WHEEL`` writes the wheel's ``onnxruntime/`` package (less TensorRT, which the machine
  lacks) as one xz tar split into parts of at most ``--part-mib``, a ``manifest.json`` (every part's
  and the whole's sha256), and optionally the model to serve, all in an ignored folder; it measures
  each call's travelling size against the limit and prints the calls in order;
* there, each call carries the manifest and one part; the device tool keeps ignored files of earlier
  calls on a warm machine (a call within 30 s of the last), and ``check`` says which parts are there;
* the last call carries the model, and ``serve`` checks every part, unpacks into ``--into`` and runs
  ``python -m service.bench`` on the CUDA provider with that onnxruntime first on the path and the
  CUDA libraries of the machine's torch (``site-packages/nvidia/*/lib``) on the loader's path.

``python -m train.ortcarry pack WHEEL [--out .trip-ort] [--part-mib 54] [--model M.onnx]``
``python -m train.ortcarry check --parts .trip-ort``
``python -m train.ortcarry serve --parts .trip-ort --into /tmp/ort --out $OUT [-- bench args]``
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

FORMAT = "lesionserve.ortcarry/1"
MANIFEST = "manifest.json"
MODEL = "model.onnx"
CALL_LIMIT = 64 * 2**20  # what travels per call: the working tree plus the carried paths
SKIP = ("onnxruntime/capi/libonnxruntime_providers_tensorrt.so",)  # no TensorRT there: 1 MB saved, no risk


class CarryError(Exception):
    """A wheel, part or manifest that cannot be used; the message says which and why."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _package_tar_xz(wheel: Path) -> bytes:
    """The wheel's ``onnxruntime/`` tree (less :data:`SKIP`) as one xz-compressed tar, in memory."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise CarryError(f"{wheel}: not a wheel ({exc})") from exc
    names = [n for n in zf.namelist() if n.startswith("onnxruntime/") and not n.endswith("/") and n not in SKIP]
    if not any(n.startswith("onnxruntime/capi/") for n in names):
        raise CarryError(f"{wheel}: no onnxruntime/capi/ inside: not an onnxruntime wheel")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for n in sorted(names):
            data = zf.read(n)
            member = tarfile.TarInfo(n)
            member.size = len(data)
            member.mode = 0o755 if n.endswith(".so") or ".so." in n else 0o644
            member.mtime = 0  # the same wheel packs to the same bytes
            tar.addfile(member, io.BytesIO(data))
    return lzma.compress(raw.getvalue(), preset=9 | lzma.PRESET_EXTREME)


def pack(wheel: Path, out: Path, part_mib: float, model: Path | None = None) -> dict:
    """Write the parts, the manifest and (optionally) the model into ``out``; return the manifest."""
    blob = _package_tar_xz(wheel)
    size = int(part_mib * 2**20)
    if size < 1:
        raise CarryError(f"--part-mib must be positive, got {part_mib}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    parts = []
    for i in range(0, len(blob), size):
        chunk = blob[i : i + size]
        name = f"part-{len(parts):02d}.bin"
        (out / name).write_bytes(chunk)
        parts.append({"file": name, "bytes": len(chunk), "sha256": _sha256(chunk)})
    manifest = {
        "format": FORMAT,
        "wheel": wheel.name,
        "bytes": len(blob),
        "sha256": _sha256(blob),
        "parts": parts,
        "model": None,
    }
    if model is not None:
        shutil.copyfile(model, out / MODEL)
        manifest["model"] = {"file": MODEL, "source": str(model), "bytes": model.stat().st_size}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(parts_dir: Path) -> dict:
    path = parts_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CarryError(f"{path}: no readable manifest ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise CarryError(f"{path}: not a {FORMAT} manifest")
    return manifest


def present(parts_dir: Path, manifest: dict) -> tuple[list[str], list[str]]:
    """Parts that are here and intact, and those missing or damaged (with the reason)."""
    ok, bad = [], []
    for p in manifest["parts"]:
        f = parts_dir / p["file"]
        if not f.is_file():
            bad.append(f"{p['file']}: missing")
        elif _sha256(f.read_bytes()) != p["sha256"]:
            bad.append(f"{p['file']}: sha256 differs (damaged in transit?)")
        else:
            ok.append(p["file"])
    return ok, bad


def unpack(parts_dir: Path, into: Path) -> Path:
    """Join and check every part, then extract ``onnxruntime/`` into ``into``; returns ``into``."""
    manifest = read_manifest(parts_dir)
    _, bad = present(parts_dir, manifest)
    if bad:
        raise CarryError("cannot unpack: " + "; ".join(bad))
    blob = b"".join((parts_dir / p["file"]).read_bytes() for p in manifest["parts"])
    if _sha256(blob) != manifest["sha256"]:
        raise CarryError("the joined parts' sha256 differs from the manifest's")
    try:
        raw = lzma.decompress(blob)
    except lzma.LZMAError as exc:
        raise CarryError(f"the joined parts are not xz data ({exc})") from exc
    if into.exists():
        shutil.rmtree(into)
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        tar.extractall(into, filter="data")  # no absolute paths, no '..', no device files
    return into


def cuda_library_dirs() -> list[str]:
    """``nvidia/*/lib`` folders of the installed CUDA wheels (torch's cu13 stack brings cublas, cudnn...)."""
    found: list[str] = []
    for entry in sys.path:
        base = Path(entry) / "nvidia"
        if base.is_dir():
            found += [str(d) for d in sorted(base.glob("*/lib")) if d.is_dir() and str(d) not in found]
    return found


def runtime_env(into: Path, repo: Path) -> dict[str, str]:
    """The environment in which ``into``'s onnxruntime comes first and finds the CUDA libraries."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(into), str(repo), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    libs = cuda_library_dirs()
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    return env


def providers_there(env: dict[str, str]) -> tuple[str, list[str]]:
    """The version and providers of the onnxruntime that ``env`` imports (in a child: a fresh loader)."""
    code = "import json, onnxruntime as o; print(json.dumps([o.__version__, o.get_available_providers()]))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise CarryError(f"importing the carried onnxruntime failed: {proc.stderr.strip()[-600:]}")
    version, providers = json.loads(proc.stdout.strip().splitlines()[-1])
    return version, providers


def tree_bytes(repo: Path) -> int:
    from train.trip import travelling_bytes

    return travelling_bytes(repo)[0]


def call_plan(out: Path, manifest: dict, repo: Path) -> list[str]:
    """The calls in order, each with its carry and travelling size; raises when one is over the limit."""
    tree = tree_bytes(repo)
    rel = out.resolve().relative_to(repo.resolve()) if out.resolve().is_relative_to(repo.resolve()) else out
    lines, over = [], []
    man_bytes = (out / MANIFEST).stat().st_size
    for i, p in enumerate(manifest["parts"]):
        total = tree + man_bytes + p["bytes"]
        carry = [f"{rel}/{MANIFEST}", f"{rel}/{p['file']}"]
        lines.append(f"call {i + 1}: carry {carry}  ({total / 2**20:.1f} MiB)\n"
                     f"  python3 -m train.ortcarry check --parts {rel}")  # fmt: skip
        if total > CALL_LIMIT:
            over.append(f"call {i + 1}: {total / 2**20:.1f} MiB")
    if manifest.get("model"):
        total = tree + man_bytes + manifest["model"]["bytes"]
        carry = [f"{rel}/{MANIFEST}", f"{rel}/{MODEL}"]
        last = manifest["parts"][-1]
        if total + last["bytes"] <= CALL_LIMIT:  # the last part rides with the model: one call (a minute) fewer
            lines.pop()
            over = [o for o in over if not o.startswith(f"call {len(manifest['parts'])}:")]
            total += last["bytes"]
            carry.append(f"{rel}/{last['file']}")
        lines.append(f"call {len(lines) + 1}: carry {carry}  ({total / 2**20:.1f} MiB)\n"
                     f"  python3 -m train.ortcarry serve --parts {rel} --into /tmp/ort --out $OUT")  # fmt: skip
        if total > CALL_LIMIT:
            over.append(
                f"the serving call: {total / 2**20:.1f} MiB (export the model --fp16, or hide more of the tree)"
            )
    if over:
        raise CarryError(
            f"parts written to {out}, but calls would be over the {CALL_LIMIT / 2**20:.0f} MiB a call carries (working tree {tree / 2**20:.1f} MiB): "
            + "; ".join(over)
            + ". Hide what the trip does not need: git sparse-checkout set --no-cone '/*' '!/models/*.onnx' "
            "'!/models/members/' '!/tests/data/' '!/docs/img/'"
        )
    return lines


def serve(parts_dir: Path, into: Path, out: Path, bench_args: Sequence[str], repo: Path) -> int:
    """Unpack, check that the CUDA provider loads, and run ``service.bench`` on it; figures in ``out``."""
    manifest = read_manifest(parts_dir)
    model = parts_dir / MODEL
    if not manifest.get("model") or not model.is_file():
        raise CarryError(f"{model}: no model carried (pack with --model and carry it in the last call)")
    unpack(parts_dir, into)
    env = runtime_env(into, repo)
    version, providers = providers_there(env)
    out.mkdir(parents=True, exist_ok=True)
    report = {"onnxruntime": version, "providers": providers, "ld_library_path": env["LD_LIBRARY_PATH"]}
    (out / "ortcarry.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"onnxruntime {version} from {into}: {', '.join(providers)}", flush=True)
    if "CUDAExecutionProvider" not in providers:
        raise CarryError(f"the carried onnxruntime {version} has no CUDAExecutionProvider (has {providers})")
    cmd = [sys.executable, "-m", "service.bench", "--model", str(model), "--providers",
           "CUDAExecutionProvider,CPUExecutionProvider", "--skip-baseline", "--rss-requests", "0",
           "--max-batch", "32", "--batches", "1,2,4,8,16,32,64", "--out", str(out / "bench-cuda.json"),
           *bench_args]  # fmt: skip
    return subprocess.run(cmd, env=env, cwd=repo).returncode


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.ortcarry", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="here: the wheel's onnxruntime/ as parts, the manifest, the model")
    p.add_argument("wheel", type=Path)
    p.add_argument("--out", type=Path, default=Path(".trip-ort"))
    p.add_argument("--part-mib", type=float, default=54.0, help="largest part (the tree travels beside it)")
    p.add_argument("--model", type=Path, default=None, help="the .onnx to serve there (e.g. an --fp16 export)")
    c = sub.add_parser("check", help="there: which parts have arrived intact")
    c.add_argument("--parts", type=Path, default=Path(".trip-ort"))
    s = sub.add_parser("serve", help="there: unpack, check the CUDA provider, run service.bench on it")
    s.add_argument("--parts", type=Path, default=Path(".trip-ort"))
    s.add_argument("--into", type=Path, default=Path("/tmp/ort"))
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("bench_args", nargs="*", help="more service.bench arguments, after --")
    args = ap.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    try:
        if args.cmd == "pack":
            manifest = pack(args.wheel, args.out, args.part_mib, args.model)
            print(f"{args.wheel.name}: onnxruntime/ as {manifest['bytes'] / 2**20:.1f} MiB of xz in "
                  f"{len(manifest['parts'])} part(s) -> {args.out}")  # fmt: skip
            print("\n".join(call_plan(args.out, manifest, repo)))
            print("each call within 30 s of the last (a warm machine keeps the earlier parts); budget ~1 min each")
        elif args.cmd == "check":
            manifest = read_manifest(args.parts)
            ok, bad = present(args.parts, manifest)
            print(
                f"{len(ok)} of {len(manifest['parts'])} parts here and intact" + ("; " + "; ".join(bad) if bad else "")
            )
        else:
            return serve(args.parts, args.into, args.out, args.bench_args, repo)
    except CarryError as exc:
        print(f"train.ortcarry: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
