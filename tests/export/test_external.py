"""export.external: melanoma-vs-nevus figures of a file on images from another source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export.external import CARD_START, evaluate_external, main, read_external
from tests.conftest import TEST_DATA, shared_data

ISIC = TEST_DATA / "isic"


def test_reads_an_imagefolder_and_the_archive_csv(tmp_path: Path) -> None:
    paths, mel = read_external(ISIC)
    assert len(paths) == len(list(ISIC.glob("*/*.jpg"))) and 0 < mel.sum() < len(mel)
    assert all((p.parent.name == "melanoma") == m for p, m in zip(paths, mel, strict=True))
    root = tmp_path / "archive"
    root.mkdir()
    for p in paths[:2] + paths[-2:]:
        shutil.copy(p, root / p.name)
    rows = ["image_id,diagnosis"] + [
        f"{p.stem},{'melanoma' if m else 'nevus'}" for p, m in zip(paths, mel, strict=True)
    ]
    (root / "labels.csv").write_text("\n".join([rows[0], *rows[1:3], *rows[-2:]]) + "\n")
    got, flags = read_external(root)
    assert [p.name for p in got] == [p.name for p in paths[:2] + paths[-2:]]
    assert flags.tolist() == mel[:2].tolist() + mel[-2:].tolist()
    (root / paths[0].name).unlink()
    with pytest.raises(ValueError, match="1 listed images are missing"):
        read_external(root)


def test_figures_and_card_section(tiny_onnx: Path, tmp_path: Path) -> None:
    m = evaluate_external(tiny_onnx, ISIC)
    assert m["n"] == m["melanoma"] + m["nevus"] and 0 <= m["auc_mel_vs_nv"] <= 1
    card = tmp_path / "card.md"
    card.write_text("# card\n")
    assert main([str(tiny_onnx), "--data", str(ISIC), "--card", str(card), "--out", str(tmp_path)]) == 0
    assert CARD_START in card.read_text() and card.read_text().startswith("# card")
    assert json.loads((tmp_path / "external.json").read_text())["n"] == m["n"]
    assert main([str(tiny_onnx), "--data", str(tmp_path / "nothing")]) == 2


def test_the_shared_isic_archive_set_reads() -> None:
    paths, mel = read_external(shared_data("isic-archive-cc0"))
    assert len(paths) == 61 and int(mel.sum()) == 20
