"""The members folder: fp16 member files, the manifest, and what it refuses (each refusal names the file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train import members
from train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from train.members import MembersError, add_members, main, read_manifest, save_member
from train.models import build_model

CLASSES = ["mel", "nv"]


def member_file(tmp: Path, name: str, split: str = "a" * 64, fold: int = 0, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model("resnet18", len(CLASSES))
    ckpt = Checkpoint(arch="resnet18", classes=CLASSES, img_size=32, model_state=model.state_dict(),
                      temperature=1.3, metrics={"balanced_accuracy": 0.7}, epoch=3)  # fmt: skip
    info = {"seed": seed, "fold": fold, "folds": 5, "split_sha256": split, "val_metrics": {"balanced_accuracy": 0.6}}
    return save_member(ckpt, tmp / f"{name}.pt", info)


def test_member_file_is_half_and_loads_into_the_float_model(tmp_path: Path) -> None:
    path = member_file(tmp_path, "m")
    ck = load_checkpoint(path)
    assert all(v.dtype == torch.float16 for v in ck.model_state.values() if v.is_floating_point())
    assert ck.model_state["bn1.num_batches_tracked"].dtype == torch.int64  # integer buffers untouched
    model = ck.build()
    assert next(model.parameters()).dtype == torch.float32
    assert ck.extra["member"]["fold"] == 0 and ck.temperature == 1.3


def test_add_lists_and_copies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = member_file(tmp_path, "lite-a"), member_file(tmp_path, "lite-b", fold=1, seed=1)
    folder = tmp_path / "members"
    assert main(["add", str(a), str(b), "--dir", str(folder)]) == 0
    man = read_manifest(folder)
    assert [m["name"] for m in man.members] == ["lite-a", "lite-b"]
    entry = man.members[1]
    assert entry["fold"] == 1 and entry["seed"] == 1 and entry["best_epoch"] == 3
    assert entry["metrics"]["fold_holdout"]["balanced_accuracy"] == 0.7
    assert entry["metrics"]["val"]["balanced_accuracy"] == 0.6
    assert entry["sha256"] == members.sha256_file(folder / "lite-b.pt")
    assert json.loads((folder / "manifest.json").read_text())["split_sha256"] == "a" * 64
    capsys.readouterr()
    assert main(["paths", "--dir", str(folder)]) == 0
    assert capsys.readouterr().out.split() == [str(folder / "lite-a.pt"), str(folder / "lite-b.pt")]


def test_a_member_of_another_split_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "members"
    add_members([member_file(tmp_path, "one")], folder)
    other = member_file(tmp_path, "two", split="b" * 64)
    with pytest.raises(MembersError, match=r"two\.pt: trained on split b+, .* test would leak"):
        add_members([other], folder)
    assert [m["name"] for m in read_manifest(folder).members] == ["one"]  # nothing half-added


def test_a_plain_checkpoint_and_a_corrupt_file_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "plain.pt"
    save_checkpoint(Checkpoint("resnet18", CLASSES, 32, build_model("resnet18", 2).state_dict()), plain)
    with pytest.raises(MembersError, match=r"plain\.pt: no member record"):
        add_members([plain], tmp_path / "m")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["add", str(bad), "--dir", str(tmp_path / "m")]) == 2
    assert "bad.pt: not a readable PyTorch checkpoint" in capsys.readouterr().err


def test_the_size_budget_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = member_file(tmp_path, "a")
    monkeypatch.setattr(members, "BUDGET_BYTES", a.stat().st_size + 10)
    add_members([a], tmp_path / "m")
    with pytest.raises(MembersError, match="over the"):
        add_members([member_file(tmp_path, "b", seed=1)], tmp_path / "m")


def test_replace_overwrites_a_listed_member(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    add_members([member_file(tmp_path, "a")], folder)
    again = member_file(tmp_path, "a", seed=2)
    with pytest.raises(MembersError, match="already listed"):
        add_members([again], folder)
    man = add_members([again], folder, replace=True)
    assert len(man.members) == 1 and man.members[0]["seed"] == 2


def test_empty_folder_has_no_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["paths", "--dir", str(tmp_path)]) == 2
    assert "no members" in capsys.readouterr().err


def test_remove_makes_room_but_keeps_what_the_reference_serves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = member_file(tmp_path, "lite-a"), member_file(tmp_path, "lite-b", fold=1, seed=1)
    folder = tmp_path / "members"
    add_members([a, b], folder)
    with pytest.raises(MembersError, match="lite-a served by the bundled reference"):
        members.remove_members(["lite-b", "lite-a"], folder, keep=["lite-a"])
    assert [m["name"] for m in read_manifest(folder).members] == ["lite-a", "lite-b"]  # nothing changed
    assert main(["remove", "nobody", "--dir", str(folder)]) == 2
    assert "nobody not listed" in capsys.readouterr().err
    assert main(["remove", "lite-b", "--dir", str(folder)]) == 0
    assert [m["name"] for m in read_manifest(folder).members] == ["lite-a"]
    assert not (folder / "lite-b.pt").exists() and (folder / "lite-a.pt").is_file()


def test_the_bundled_reference_names_its_served_members() -> None:
    served = members.served_members(Path(__file__).resolve().parents[2] / "models" / "reference-eval")
    listed = {m["name"] for m in read_manifest(Path(__file__).resolve().parents[2] / "models" / "members").members}
    assert served and set(served) <= listed
