"""train/ortcarry.py: onnxruntime-gpu to the GPU machine in parts, checked and unpacked there.

A fake wheel stands in for the 231 MB one: an ``onnxruntime`` package whose provider list is fixed,
with a megabyte of random bytes (incompressible, like the CUDA library) so that it takes several parts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from train import ortcarry

ROOT = Path(__file__).resolve().parents[2]
FAKE_INIT = '__version__ = "9.9.9"\n\ndef get_available_providers():\n    return {providers!r}\n'


def fake_wheel(path: Path, providers: list[str]) -> Path:
    blob = np.random.default_rng(0).integers(0, 256, 3 * 2**20 // 2, dtype=np.uint8).tobytes()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("onnxruntime/__init__.py", FAKE_INIT.format(providers=providers))
        zf.writestr("onnxruntime/capi/libonnxruntime_providers_cuda.so", blob)
        zf.writestr("onnxruntime/capi/libonnxruntime_providers_tensorrt.so", b"x" * 1000)
        zf.writestr("onnxruntime_gpu-9.9.9.dist-info/METADATA", "Name: onnxruntime-gpu\n")
    return path


def test_parts_rejoin_into_the_package_and_import_first(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path / "ort.whl", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    model = tmp_path / "m.onnx"
    model.write_bytes(b"onnx")
    out = tmp_path / "carry"
    manifest = ortcarry.pack(wheel, out, part_mib=0.5, model=model)
    assert len(manifest["parts"]) >= 3 and all(p["bytes"] <= 0.5 * 2**20 for p in manifest["parts"])
    assert json.loads((out / "manifest.json").read_text()) == manifest and (out / "model.onnx").read_bytes() == b"onnx"
    into = ortcarry.unpack(out, tmp_path / "ort")
    assert (into / "onnxruntime" / "capi" / "libonnxruntime_providers_cuda.so").stat().st_size == 3 * 2**20 // 2
    assert not (into / "onnxruntime" / "capi" / "libonnxruntime_providers_tensorrt.so").exists()  # left out
    version, providers = ortcarry.providers_there(ortcarry.runtime_env(into, ROOT))
    assert version == "9.9.9" and providers[0] == "CUDAExecutionProvider"  # the carried package wins


def test_a_missing_or_damaged_part_is_named_and_nothing_unpacks(tmp_path: Path) -> None:
    out = tmp_path / "carry"
    manifest = ortcarry.pack(fake_wheel(tmp_path / "ort.whl", ["CPUExecutionProvider"]), out, part_mib=0.5)
    first, second = (out / p["file"] for p in manifest["parts"][:2])
    data = bytearray(first.read_bytes())
    data[100] ^= 0xFF
    first.write_bytes(bytes(data))
    second.unlink()
    ok, bad = ortcarry.present(out, manifest)
    assert len(ok) == len(manifest["parts"]) - 2
    assert any("part-00.bin: sha256 differs" in b for b in bad) and any("part-01.bin: missing" in b for b in bad)
    with pytest.raises(ortcarry.CarryError, match="cannot unpack"):
        ortcarry.unpack(out, tmp_path / "ort")
    assert not (tmp_path / "ort").exists()
    proc = subprocess.run([sys.executable, "-m", "train.ortcarry", "check", "--parts", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and "parts here and intact" in proc.stdout and "missing" in proc.stdout


def test_serve_refuses_an_onnxruntime_without_cuda_in_one_line(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"onnx")
    out = tmp_path / "carry"
    ortcarry.pack(fake_wheel(tmp_path / "ort.whl", ["CPUExecutionProvider"]), out, part_mib=1, model=model)
    proc = subprocess.run(
        [sys.executable, "-m", "train.ortcarry", "serve", "--parts", str(out), "--into", str(tmp_path / "ort"),
         "--out", str(tmp_path / "figures")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "has no CUDAExecutionProvider" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "figures" / "ortcarry.json").read_text())["providers"] == ["CPUExecutionProvider"]


def test_not_a_wheel_and_calls_over_the_limit_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ortcarry.CarryError, match="not a wheel"):
        ortcarry.pack(bad, tmp_path / "x", 1)
    out = tmp_path / "carry"
    manifest = ortcarry.pack(fake_wheel(tmp_path / "ort.whl", ["CPUExecutionProvider"]), out, part_mib=1)
    monkeypatch.setattr(ortcarry, "tree_bytes", lambda repo: 10 * 2**20)
    plan = ortcarry.call_plan(out, manifest, ROOT)
    assert len(plan) == len(manifest["parts"]) and "train.ortcarry check" in plan[0]
    monkeypatch.setattr(ortcarry, "tree_bytes", lambda repo: 63.5 * 2**20)
    with pytest.raises(ortcarry.CarryError, match="over the 64 MiB"):
        ortcarry.call_plan(out, manifest, ROOT)


def test_cuda_library_dirs_are_found_on_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for lib in ("cublas", "cudnn"):
        (tmp_path / "nvidia" / lib / "lib").mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    dirs = ortcarry.cuda_library_dirs()
    assert dirs[:2] == [str(tmp_path / "nvidia" / "cublas" / "lib"), str(tmp_path / "nvidia" / "cudnn" / "lib")]
    env = ortcarry.runtime_env(tmp_path / "ort", ROOT)
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[:2] == dirs[:2]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path / "ort")


def test_the_last_part_rides_with_the_model_when_both_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"onnx")
    out = tmp_path / "carry"
    manifest = ortcarry.pack(fake_wheel(tmp_path / "ort.whl", ["CPUExecutionProvider"]), out, 1, model=model)
    monkeypatch.setattr(ortcarry, "tree_bytes", lambda repo: 10 * 2**20)
    plan = ortcarry.call_plan(out, manifest, ROOT)
    last = manifest["parts"][-1]["file"]
    assert len(plan) == len(manifest["parts"]) and last in plan[-1] and "ortcarry serve" in plan[-1]
    assert all("ortcarry check" in line for line in plan[:-1])
