"""End to end: two-epoch runs on real images write every artifact, reproducibly; resume; folds; evaluate."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import TEST_DATA, shared_data
from train import engine
from train.__main__ import main as train_main
from train.checkpoint import load_checkpoint
from train.compare import table
from train.config import load_config
from train.evaluate import main as evaluate_main
from train.run import run

ISIC = TEST_DATA / "isic"
ARTIFACTS = ("best.pt", "last.pt", "metrics.json", "report.md", "config.yaml", "split.json")
PLOTS = ("confusion_matrix.png", "roc.png", "curves.png", "reliability.png")
METRIC_KEYS = (
    "balanced_accuracy", "accuracy", "macro_f1", "auc_macro", "top2_accuracy", "top3_accuracy", "ece",
    "per_class", "confusion_matrix",
)  # fmt: skip


def tiny(out: Path, **over: Any) -> dict[str, Any]:
    base = dict(data=str(ISIC), out=str(out), arch="resnet18", img_size=32, epochs=2, batch_size=4,
                val_frac=0.25, test_frac=0.2, progress=False, load_workers=1, seed=7, cutout=0.5,
                mixup_alpha=0.4, cutmix_alpha=1.0, loss="focal", focal_alpha="weights")  # fmt: skip
    return {**base, **over}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    a, b = tmp_path_factory.mktemp("run_a"), tmp_path_factory.mktemp("run_b")
    run(load_config(None, tiny(a)))
    run(load_config(None, tiny(b)))
    return a, b


def test_every_artifact_written(two_runs: tuple[Path, Path]) -> None:
    out = two_runs[0]
    for name in ARTIFACTS + PLOTS:
        assert (out / name).stat().st_size > 0, name
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((out / "metrics.json").read_text())
    for k in METRIC_KEYS:
        assert k in m, k
    assert m["evaluated_on"] == "test" and set(m["per_class"]) == {"melanoma", "nevus"}
    assert len(m["history"]) == 2 and "ece" in m["val_uncalibrated"]
    report = (out / "report.md").read_text()
    assert "| test, fitted T |" in report and "| melanoma |" in report and "![roc](roc.png)" in report


def test_checkpoint_contents(two_runs: tuple[Path, Path]) -> None:
    out = two_runs[0]
    ck = load_checkpoint(out / "best.pt")
    m = json.loads((out / "metrics.json").read_text())
    assert ck.classes == ["melanoma", "nevus"] and ck.img_size == 32 and ck.arch == "resnet18"
    assert ck.temperature > 0 and ck.temperature == pytest.approx(m["temperature"])
    assert ck.metrics["n"] == m["split_sizes"]["val"]  # metrics come from validation
    assert ck.metrics["balanced_accuracy"] == pytest.approx(m["val"]["balanced_accuracy"])
    assert "ece_before_temperature" in ck.metrics and ck.metrics["test"]["n"] == m["split_sizes"]["test"]
    assert ck.config["loss"] == "focal" and ck.epoch == m["best_epoch"]
    assert ck.class_names == {"melanoma": "Melanoma", "nevus": "Melanocytic nevus"}
    assert ck.dataset["name"] == "isic"
    logits = ck.build()(torch.zeros(1, 3, 32, 32))
    assert logits.shape == (1, 2)


def test_same_seed_same_result(two_runs: tuple[Path, Path]) -> None:
    a, b = (load_checkpoint(p / "best.pt") for p in two_runs)
    assert a.model_state.keys() == b.model_state.keys()
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in two_runs)
    for h in ma["history"] + mb["history"]:
        h.pop("train_images_per_s")  # wall-clock, the only thing allowed to differ
    ma["config"].pop("out")
    mb["config"].pop("out")
    assert ma == mb


@pytest.mark.slow
def test_resume_continues_exactly(two_runs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = engine.compute_metrics

    def crash_on_second(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:  # after epoch 2's training, before its checkpoint: a crash
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(engine, "compute_metrics", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run(load_config(None, tiny(tmp_path)))
    assert load_checkpoint(tmp_path / "last.pt").epoch == 1
    monkeypatch.setattr(engine, "compute_metrics", real)
    run(load_config(None, tiny(tmp_path, resume=True)))
    done, ref = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(two_runs[0] / "last.pt")
    assert done.epoch == 2
    assert all(torch.equal(done.model_state[k], ref.model_state[k]) for k in ref.model_state)


@pytest.mark.slow
def test_folds_write_one_checkpoint_each(tmp_path: Path) -> None:
    rc = train_main(["--data", str(ISIC), "--out", str(tmp_path), "--img-size", "32", "--epochs", "1",
                     "--batch-size", "4", "--folds", "2", "--test-frac", "0", "--no-progress", "--load-workers", "1"])  # fmt: skip
    assert rc == 0
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["folds"] == 2 and len(summary["per_fold"]) == 2
    val_sets = []
    for i in range(2):
        ck = load_checkpoint(tmp_path / f"fold{i}" / "best.pt")
        assert ck.temperature > 0
        val_sets.append(set(json.loads((tmp_path / f"fold{i}" / "split.json").read_text())["val"]))
    assert not (val_sets[0] & val_sets[1]) and len(val_sets[0] | val_sets[1]) == 12


def test_evaluate_cli(two_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = two_runs[0] / "best.pt"
    assert evaluate_main([str(ckpt), "--data", str(ISIC), "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["n"] == 12 and m["temperature"] == pytest.approx(load_checkpoint(ckpt).temperature)
    assert (tmp_path / "confusion_matrix.png").exists() and '"balanced_accuracy"' in capsys.readouterr().out
    wrong = tmp_path / "wrong"
    (wrong / "mel").mkdir(parents=True)
    (wrong / "mel" / "x.jpg").write_bytes(next(ISIC.glob("*/*.jpg")).read_bytes())
    assert evaluate_main([str(ckpt), "--data", str(wrong)]) == 2  # label 'mel' is not a class of this model
    assert evaluate_main([str(tmp_path / "none.pt"), "--data", str(ISIC)]) == 2


def test_cli_refuses_bad_data(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "tree"
    for c in ("a", "b"):
        (bad / c).mkdir(parents=True)
        for i in range(3):
            (bad / c / f"{c}{i}.jpg").write_bytes(next(ISIC.glob("*/*.jpg")).read_bytes())
    (bad / "b" / "b_broken.jpg").write_bytes(b"garbage")
    assert train_main(["--data", str(bad), "--out", str(tmp_path / "o"), "--img-size", "32"]) == 2
    assert "b_broken.jpg" in caplog.text


@pytest.mark.slow
def test_ham10000_few_dozen_images(tmp_path: Path) -> None:
    root = shared_data("ham10000")
    run(load_config(None, tiny(tmp_path, data=str(root), limit=60, val_frac=0.3, test_frac=0.0, epochs=1)))
    ck = load_checkpoint(tmp_path / "best.pt")
    assert ck.classes == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert ck.dataset["license"] == "CC BY-NC 4.0"
    split = json.loads((tmp_path / "split.json").read_text())
    assert not set(split["train"]) & set(split["val"])


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_agree(tmp_path: Path) -> None:
    """DDP (gloo on CPU): both ranks score the same model each epoch, rank 0 writes the checkpoint."""
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "2", "-m", "train", "--data", str(ISIC), "--img-size", "32",
           "--epochs", "2", "--batch-size", "2", "--test-frac", "0", "--val-frac", "0.25", "--out", str(tmp_path),
           "--no-progress", "--load-workers", "1", "--threads", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=TEST_DATA.parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = re.findall(r"epoch (\d)/2 train_loss \S+ val_loss (\S+)", proc.stderr)
    assert len(lines) == 4 and len(set(lines)) == 2  # per epoch: one val loss shared by both ranks
    assert "world size 2" in proc.stderr
    assert load_checkpoint(tmp_path / "best.pt").temperature > 0


def test_compare_same_split_only(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    text = table(list(two_runs))
    rows = [line for line in text.splitlines() if "| focal |" in line]
    assert len(rows) == 2 and rows[0].split("|")[3:] == rows[1].split("|")[3:]  # same seed: same figures
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.json").write_text((two_runs[0] / "metrics.json").read_text())
    (other / "split.json").write_text(json.dumps({"train": [], "val": [], "test": []}))
    with pytest.raises(ValueError, match="split differs"):
        table([two_runs[0], other])


@pytest.mark.slow
def test_resume_with_ema_continues_the_average(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --ema, a resumed run keeps averaging (not restarting from the raw weights): same as uninterrupted."""
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    over = dict(ema=0.9, mixup_alpha=0.0, cutmix_alpha=0.0)
    run(load_config(None, tiny(ref_dir, **over)))
    calls = {"n": 0}
    real = engine.compute_metrics

    def crash_on_second(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(engine, "compute_metrics", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run(load_config(None, tiny(crash_dir, **over)))
    monkeypatch.setattr(engine, "compute_metrics", real)
    run(load_config(None, tiny(crash_dir, resume=True, **over)))
    done, ref = load_checkpoint(crash_dir / "last.pt"), load_checkpoint(ref_dir / "last.pt")
    assert all(torch.equal(done.model_state[k], ref.model_state[k]) for k in ref.model_state)
    assert all(torch.equal(done.extra["raw_state"][k], ref.extra["raw_state"][k]) for k in ref.model_state)
