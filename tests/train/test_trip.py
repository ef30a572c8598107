"""The GPU trip's dry run: the very same pack and run commands on the CPU (``--tiny``), checked
against the device tool's limits, and what comes back added to a members folder and exported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from train import trip
from train.checkpoint import load_checkpoint
from train.data import HAM_CLASSES
from train.members import MembersError, add_members, read_manifest

ROOT = Path(__file__).resolve().parents[2]


def fake_ham(root: Path, lesions: int = 6, images: int = 2) -> tuple[Path, Path]:
    """A HAM10000-shaped folder (200x150 JPEGs, metadata CSV) and a lesion-grouped split.json.

    Per class: lesions 0-3 train, 4 val, 5 test; each lesion has ``images`` pictures.
    """
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows, split = ["lesion_id,image_id,dx"], {"train": [], "val": [], "test": []}
    for c, dx in enumerate(HAM_CLASSES):
        for le in range(lesions):
            for k in range(images):
                iid = f"ISIC_{c:02d}{le:02d}{k:02d}"
                img = np.full((150, 200, 3), (120, 140, 190), np.uint8)  # BGR skin tone
                colour = tuple(int(v) for v in rng.integers(0, 255, 3))
                cv2.circle(img, (100 + int(rng.integers(-20, 20)), 75), 20 + 5 * c, colour, -1)
                cv2.imwrite(str(root / "images" / f"{iid}.jpg"), img)
                rows.append(f"HAM_{c:02d}{le:02d},{iid},{dx}")
                split["train" if le < 4 else "val" if le == 4 else "test"].append(iid)
    (root / "HAM10000_metadata.csv").write_text("\n".join(rows) + "\n")
    (root / "split.json").write_text(json.dumps(split))
    return root, root / "split.json"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("trip")
    data, split = fake_ham(tmp / "ham")
    pack_dir, out = tmp / "pack", tmp / "out"
    # The pack's size check reads this repository's travelling tree (git), so it runs from the repo root.
    proc = subprocess.run(
        [sys.executable, "-m", "train.trip", "pack", "--tiny", "--data", str(data), "--split", str(split),
         "--out", str(pack_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode in (0, 3), proc.stderr[-2000:]
    proc_run = subprocess.run(
        [sys.executable, "-m", "train.trip", "run", "--tiny", "--pack", str(pack_dir), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc_run.returncode == 0, proc_run.stderr[-3000:]
    return {"tmp": tmp, "data": data, "split": split, "pack": pack_dir, "out": out, "pack_stdout": Path(proc.stdout)}


def test_pack_holds_no_test_image(dry_run: dict[str, Path]) -> None:
    index = json.loads((dry_run["pack"] / "data" / "index.json").read_text())
    split = json.loads(dry_run["split"].read_text())
    assert set(index["ids"]) == set(split["train"]) | set(split["val"])
    assert not set(index["ids"]) & set(split["test"])
    assert set(index["parts"]) == {"train", "val"}
    weights = sorted(p.name for p in (dry_run["pack"] / "weights").iterdir())
    assert weights == ["efficientnet_lite0.pt"]


def test_pack_reports_travelling_size(dry_run: dict[str, Path]) -> None:
    text = str(dry_run["pack_stdout"])
    assert "working tree that travels" in text
    assert "MiB of 64 MiB" in text


def test_what_comes_back_fits_the_file_limits(dry_run: dict[str, Path]) -> None:
    files = [p for p in dry_run["out"].rglob("*") if p.is_file()]
    assert len(files) <= trip.FILES_BACK
    assert all(p.stat().st_size <= trip.FILE_LIMIT for p in files)
    assert sum(p.stat().st_size for p in files) <= trip.BACK_LIMIT
    assert all(p.parent == dry_run["out"] for p in files)  # flat: nothing too deep to come back
    report = json.loads((dry_run["out"] / "trip.json").read_text())
    assert len(report["members"]) == 2 and not report["skipped"]
    assert report["environment"]["cuda_available"] in (True, False)
    for row in report["members"]:
        assert row["epochs"] == 1 and row["train_images_per_s"] > 0
        assert (dry_run["out"] / row["file"]).is_file()


def test_members_are_fp16_and_self_describing(dry_run: dict[str, Path]) -> None:
    pts = sorted(dry_run["out"].glob("*.pt"))
    assert [p.name for p in pts] == ["lite0-64-f0-s0.pt", "lite0-64-f1-s1.pt"]
    ck = load_checkpoint(pts[0])
    floats = [v for v in ck.model_state.values() if v.is_floating_point()]
    assert floats and all(str(v.dtype) == "torch.float16" for v in floats)
    info = ck.extra["member"]
    assert info["fold"] == 0 and info["folds"] == 2 and info["seed"] == 0
    assert info["split_sha256"] == trip._sha256(dry_run["split"])
    assert "balanced_accuracy" in info["val_metrics"] and "test" not in ck.metrics


def test_members_plug_into_the_manifest_and_export(dry_run: dict[str, Path], tmp_path: Path) -> None:
    members = tmp_path / "members"
    man = add_members(sorted(dry_run["out"].glob("*.pt")), members)
    assert [m["name"] for m in man.members] == ["lite0-64-f0-s0", "lite0-64-f1-s1"]
    assert read_manifest(members).data["split_sha256"] == trip._sha256(dry_run["split"])
    with pytest.raises(MembersError, match="already listed"):
        add_members([members / "lite0-64-f0-s0.pt"], members)
    # The build script's first step: export the manifest's members as one ensemble.
    paths = subprocess.run([sys.executable, "-m", "train.members", "paths", "--dir", str(members)],
                           capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "export", *paths, "--out", str(tmp_path / "m.onnx"), "--tta", "none", "--no-cam"],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "m.onnx").stat().st_size > 1_000_000


def test_what_comes_back_builds_a_reference_with_the_build_script(dry_run: dict[str, Path], tmp_path: Path) -> None:
    """models/build_reference.sh end to end on the dry run's members: threshold, export, evaluation, card."""
    members, out = tmp_path / "members", tmp_path / "built"
    man = add_members(sorted(dry_run["out"].glob("*.pt")), members)
    names = [m["name"] for m in man.members]
    env = {
        **os.environ, "PY": sys.executable, "OUT": str(out), "SPLIT": str(dry_run["split"]),
        "MEMBERS_DIR": str(members), "SERVE": " ".join(names), "TTA": "none", "INT8": "0",
        "VERSION": "0.0.1-dry", "EXTERNAL": str(ROOT / "tests" / "data" / "isic"),
    }  # fmt: skip
    out.mkdir()
    proc = subprocess.run(
        ["bash", "models/build_reference.sh", str(dry_run["data"]), str(tmp_path / "run")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    card = (out / "reference.md").read_text()
    assert "Model card: reference 0.0.1-dry" in card and "## Held-out evaluation of this file" in card
    assert "## External check" in card and all(f"| `{n}` |" in card for n in names)
    assert json.loads((out / "reference-eval" / "members.json").read_text())["served"]["members"] == names
    assert json.loads((out / "reference-eval" / "metrics.json").read_text())["n"] == 14  # the fake test part
    assert not (out / "reference-int8.onnx").exists()
    # a member that is not in the manifest stops the build before anything is written
    bad = subprocess.run(["bash", "models/build_reference.sh", str(dry_run["data"]), str(tmp_path / "run2")],
                         cwd=ROOT, env={**env, "SERVE": "nobody", "OUT": str(tmp_path / "none")},
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode != 0 and "nobody not in" in bad.stderr


def test_the_gpu_plan_fits_epochs_to_the_time_and_the_dry_run_does_not() -> None:
    gpu = trip.gpu_plan()
    assert gpu.time_budget and not trip.tiny_plan().time_budget
    # 1,000 images at 100 img/s, 1.3x for augmentation and EMA: 13 s an epoch
    assert trip.plan_epochs(100, 1000, 0, 100.0, gpu, 0.0) == 7
    assert trip.plan_epochs(10, 1000, 0, 100.0, gpu, 0.0) == 0
