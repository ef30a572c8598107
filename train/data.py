"""Labelled image sets: readers, an explicit class order, and the in-memory uint8 cache.

Three layouts are read into one :class:`LabelledSet`:

* HAM10000-style CSV (``image_id``, ``dx``, optional ``lesion_id``) + an image folder;
* an ImageFolder tree (one sub-folder per class);
* an ISIC challenge ground-truth CSV (``image`` + one-hot class columns).

Splits live in ``train/splits.py``. Every failure is a :class:`DataError` naming the files,
rows or classes at fault.
"""

from __future__ import annotations

import csv
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from train.preprocess import center_crop_resize

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
DISPLAY_NAMES = {
    "akiec": "Actinic keratosis / intraepithelial carcinoma",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesion",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
    "melanoma": "Melanoma",
    "nevus": "Melanocytic nevus",
}
HAM_DATASET = {
    "name": "HAM10000",
    "license": "CC BY-NC 4.0",
    "citation": "Tschandl P., Rosendahl C., Kittler H. The HAM10000 dataset, a large collection of multi-source "
    "dermatoscopic images of common pigmented skin lesions. Sci. Data 5, 180161 (2018). doi:10.1038/sdata.2018.161",
}


class DataError(ValueError):
    """Unusable training data; the message names the files, rows or classes."""


@dataclass
class LabelledSet:
    """Image paths with integer labels in an explicit class order, and a group per image."""

    paths: list[Path]
    labels: np.ndarray  # (N,) int64 index into classes
    groups: list[str]  # lesion id; the image's own id when the source has none
    classes: list[str]
    dataset: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.paths:
            raise DataError("no images found")
        if not (len(self.paths) == len(self.labels) == len(self.groups)):
            raise DataError("paths, labels and groups differ in length")

    @property
    def class_names(self) -> dict[str, str]:
        return {c: DISPLAY_NAMES.get(c, c) for c in self.classes}

    def counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.classes))

    def subset(self, idx: np.ndarray) -> LabelledSet:
        return LabelledSet(
            [self.paths[i] for i in idx], self.labels[idx], [self.groups[i] for i in idx], self.classes, self.dataset
        )


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTS:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _image_dir(csv_path: Path, images: str | Path | None) -> Path:
    if images:
        return Path(images)
    for cand in (csv_path.parent / "images", csv_path.parent):
        if cand.is_dir() and any(cand.glob("*.jp*g")):
            return cand
    return csv_path.parent


def _resolve(folder: Path, stems: list[str], source: Path) -> list[Path]:
    found = [_find_image(folder, s) for s in stems]
    missing = [s for s, p in zip(stems, found, strict=True) if p is None]
    if missing:
        raise DataError(
            f"{source}: {len(missing)} image(s) listed but not found in {folder}: {', '.join(missing[:10])}"
            + (" ..." if len(missing) > 10 else "")
        )
    return [p for p in found if p is not None]


def _order(found: list[str], wanted: list[str] | None, source: Path) -> list[str]:
    """The explicit class order: ``wanted`` when given (must cover every label), else ``found``."""
    if not wanted:
        return found
    unknown = sorted(set(found) - set(wanted))
    if unknown:
        raise DataError(f"{source}: label(s) {', '.join(unknown)} not in the class list {wanted}")
    return list(wanted)


def read_ham_csv(csv_path: Path, images: str | Path | None = None, classes: list[str] | None = None) -> LabelledSet:
    """HAM10000 metadata CSV (``image_id``, ``dx``, ``lesion_id``); class order defaults to HAM's 7 codes."""
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "image_id" not in rows[0] or "dx" not in rows[0]:
        raise DataError(f"{csv_path}: expected columns image_id and dx (HAM10000 metadata)")
    found = sorted({r["dx"].strip() for r in rows})
    # Some HAM codes next to unknown ones is a typo, not a new taxonomy: refuse it (below).
    # A file with none of HAM's codes is a custom label set, ordered by name.
    default = HAM_CLASSES if set(found) & set(HAM_CLASSES) else found
    wanted = classes or default
    bad = [f"row {i + 2}: {r['dx']!r}" for i, r in enumerate(rows) if r["dx"].strip() not in wanted]
    if bad:
        raise DataError(f"{csv_path}: label(s) not in the class list {wanted}: {'; '.join(bad[:10])}")
    order = _order(found, wanted, csv_path)
    stems = [r["image_id"].strip() for r in rows]
    paths = _resolve(_image_dir(csv_path, images), stems, csv_path)
    labels = np.array([order.index(r["dx"].strip()) for r in rows], dtype=np.int64)
    groups = [(r.get("lesion_id") or "").strip() or s for r, s in zip(rows, stems, strict=True)]
    dataset = HAM_DATASET if set(found) <= set(HAM_CLASSES) else {"name": csv_path.stem}
    return LabelledSet(paths, labels, groups, order, dict(dataset))


def read_isic_csv(csv_path: Path, images: str | Path | None = None, classes: list[str] | None = None) -> LabelledSet:
    """ISIC challenge ground truth: ``image`` + one-hot columns (e.g. MEL,NV,BCC,AKIEC,BKL,DF,VASC).

    Codes are lower-cased; the stored order is the CSV's column order unless ``classes`` is given.
    """
    with csv_path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        rows = list(reader)
    if not header or header[0].strip().lower() not in ("image", "image_id", "image_name"):
        raise DataError(f"{csv_path}: expected an ISIC ground-truth CSV with 'image' then one-hot class columns")
    cols = [h.strip().lower() for h in header[1:]]
    order = _order(cols, classes, csv_path)
    stems, labels = [], []
    for i, row in enumerate(rows):
        try:
            hot = [float(v) for v in row[1:]]
        except ValueError as exc:
            raise DataError(f"{csv_path}: row {i + 2}: non-numeric one-hot value ({exc})") from exc
        if len(hot) != len(cols) or sum(1 for v in hot if v > 0.5) != 1:
            raise DataError(f"{csv_path}: row {i + 2} ({row[0]}): expected exactly one class set to 1")
        stems.append(row[0].strip())
        labels.append(order.index(cols[int(np.argmax(hot))]))
    paths = _resolve(_image_dir(csv_path, images), stems, csv_path)
    return LabelledSet(paths, np.array(labels, dtype=np.int64), stems, order, {"name": csv_path.stem})


def read_image_folder(root: Path, classes: list[str] | None = None) -> LabelledSet:
    """One sub-folder per class; class order = sorted folder names unless ``classes`` is given."""
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DataError(f"{root}: no class sub-folders (expected an ImageFolder tree or a CSV)")
    order = _order(found, classes, root)
    paths: list[Path] = []
    labels: list[int] = []
    for c in found:
        files = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_EXTS)
        paths += files
        labels += [order.index(c)] * len(files)
    return LabelledSet(paths, np.array(labels, dtype=np.int64), [p.stem for p in paths], order, {"name": root.name})


def load_labelled(path: str | Path, images: str | Path | None = None, classes: list[str] | None = None) -> LabelledSet:
    """Read any supported layout; a folder holding a HAM10000/ISIC CSV is read through that CSV."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_dir():
        csvs = sorted(p.glob("*.csv"))
        if not csvs:
            return read_image_folder(p, classes)
        if len(csvs) > 1:
            raise DataError(f"{p}: several CSV files ({', '.join(c.name for c in csvs)}); pass one with --data")
        p = csvs[0]
    with p.open(newline="") as fh:
        header = [h.strip().lower() for h in next(csv.reader(fh), [])]
    if "image_id" in header and "dx" in header:
        return read_ham_csv(p, images, classes)
    return read_isic_csv(p, images, classes)


def decode(path: Path, size: int) -> np.ndarray:
    """Read one file as RGB and apply the canonical preprocessing; raises DataError naming the file."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DataError(f"{path}: unreadable or not an image")
    return center_crop_resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), size)


def load_images(paths: list[Path], size: int, workers: int = 2) -> np.ndarray:
    """Decode every image once into one ``(N, S, S, 3)`` uint8 array (the RAM cache).

    OpenCV releases the GIL while decoding, so a thread pool scales with cores. All
    unreadable files are collected and named in one error rather than failing on the first.
    """
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    bad: list[str] = []

    def work(i: int) -> None:
        try:
            out[i] = decode(paths[i], size)
        except DataError:
            bad.append(str(paths[i]))

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(work, range(len(paths))))
    if bad:
        raise DataError(f"{len(bad)} unreadable image(s): {', '.join(sorted(bad)[:10])}")
    log.info("cached %d images at %dx%d (%.0f MB uint8)", len(paths), size, size, out.nbytes / 1e6)
    return out
