"""Readers (HAM10000 CSV, ImageFolder, ISIC one-hot CSV), the image cache, and bad-data errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TEST_DATA, shared_data
from train.data import HAM_CLASSES, DataError, load_images, load_labelled, read_image_folder

ISIC = TEST_DATA / "isic"


def _ham_folder(tmp: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A HAM10000-style folder from the committed images: metadata CSV + images/."""
    (tmp / "images").mkdir(parents=True)
    for src in ISIC.glob("*/*.jpg"):
        shutil.copy(src, tmp / "images" / src.name)
    lines = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    lines += [f"{lesion},{img},{dx},histo,50.0,male,back" for lesion, img, dx in rows]
    (tmp / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n")
    return tmp


def test_image_folder(isic_images: list[Path]) -> None:
    ds = read_image_folder(ISIC)
    assert ds.classes == ["melanoma", "nevus"]
    assert len(ds.paths) == len(isic_images) == 12
    assert ds.counts().tolist() == [6, 6]
    assert all(ds.classes[label] == p.parent.name for p, label in zip(ds.paths, ds.labels, strict=True))
    assert ds.groups == [p.stem for p in ds.paths]  # no lesion ids: each image is its own group


def test_explicit_class_order_is_kept() -> None:
    ds = load_labelled(ISIC, classes=["nevus", "melanoma"])
    assert ds.classes == ["nevus", "melanoma"]
    assert all(ds.classes[label] == p.parent.name for p, label in zip(ds.paths, ds.labels, strict=True))
    with pytest.raises(DataError, match="melanoma"):
        load_labelled(ISIC, classes=["nevus", "mel"])


def test_ham_csv_folder(tmp_path: Path) -> None:
    rows = [("HAM_1", "ISIC_0000002", "mel"), ("HAM_1", "ISIC_0000160", "mel"), ("HAM_2", "ISIC_0000017", "nv")]
    ds = load_labelled(_ham_folder(tmp_path, rows))
    assert ds.classes == HAM_CLASSES  # the stored HAM order, not the order seen in the file
    assert [ds.classes[i] for i in ds.labels] == ["mel", "mel", "nv"]
    assert ds.groups == ["HAM_1", "HAM_1", "HAM_2"]
    assert ds.dataset["license"] == "CC BY-NC 4.0" and "10.1038/sdata.2018.161" in ds.dataset["citation"]
    assert ds.class_names["nv"] == "Melanocytic nevus"


def test_ham_unknown_label_names_the_row(tmp_path: Path) -> None:
    rows = [("HAM_1", "ISIC_0000002", "mel"), ("HAM_2", "ISIC_0000017", "naevus")]
    with pytest.raises(DataError, match=r"row 3: 'naevus'"):
        load_labelled(_ham_folder(tmp_path, rows))


def test_ham_missing_image_names_it(tmp_path: Path) -> None:
    rows = [("HAM_1", "ISIC_0000002", "mel"), ("HAM_2", "ISIC_9999999", "nv")]
    with pytest.raises(DataError, match="ISIC_9999999"):
        load_labelled(_ham_folder(tmp_path, rows))


def test_isic_ground_truth_csv(tmp_path: Path) -> None:
    img = tmp_path / "imgs"
    img.mkdir()
    for name in ("ISIC_0000002", "ISIC_0000017"):
        shutil.copy(next(ISIC.glob(f"*/{name}.jpg")), img / f"{name}.jpg")
    csv = tmp_path / "gt.csv"
    csv.write_text("image,MEL,NV,BCC\nISIC_0000002,1.0,0.0,0.0\nISIC_0000017,0.0,1.0,0.0\n")
    ds = load_labelled(csv, images=img)
    assert ds.classes == ["mel", "nv", "bcc"]  # the CSV's column order, lower-cased
    assert ds.labels.tolist() == [0, 1]
    csv.write_text("image,MEL,NV\nISIC_0000002,1.0,1.0\n")
    with pytest.raises(DataError, match=r"ISIC_0000002.*exactly one class"):
        load_labelled(csv, images=img)


def test_cache_shape_and_unreadable_file_named(tmp_path: Path, isic_images: list[Path]) -> None:
    x = load_images(isic_images[:3], 24)
    assert x.shape == (3, 24, 24, 3) and x.dtype == np.uint8
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=r"broken\.jpg"):
        load_images([isic_images[0], bad], 24)


def test_missing_path_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_labelled(tmp_path / "nope")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_labelled(tmp_path)


def test_real_ham10000_reader() -> None:
    root = shared_data("ham10000")
    ds = load_labelled(root)
    assert len(ds.paths) == 10015
    assert dict(zip(ds.classes, ds.counts().tolist(), strict=True)) == {
        "akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142,
    }  # fmt: skip
    assert len(set(ds.groups)) == 7470
