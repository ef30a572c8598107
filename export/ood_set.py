"""The out-of-distribution evaluation set: real images that ship inside installed packages, plus synthetic cases.

Nothing is downloaded: scikit-image's bundled photographs (``skimage.data``, the ones in the wheel itself),
the CT, MR and ultrasound images among pydicom's test files (``pydicom.data.get_testdata_file``) rendered to
8-bit with their own windowing, and simple synthetic images (uniform colours, noise, a rendered text page, the
committed CC0 dermoscopy images blurred until no structure is left). Every image is returned at full size;
the caller centre-crops and resizes it like the service does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
LESIONS = REPO / "tests" / "data" / "isic"  # committed CC0 dermoscopy images (the blurred-lesion cases)

# Bundled in the scikit-image wheel (no pooch download); colour photographs first.
SKIMAGE_COLOUR = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "colorwheel", "logo",
)  # fmt: skip
SKIMAGE_GREY = ("camera", "coins", "brick", "grass", "gravel", "moon", "clock", "cell", "page", "text")
# pydicom 3.0 test files: (file, frame) of each CT, MR and ultrasound image used.
PYDICOM_FILES = (
    ("CT_small.dcm", 0), ("693_J2KI.dcm", 0), ("J2K_pixelrep_mismatch.dcm", 0), ("MR_small.dcm", 0),
    ("examples_overlay.dcm", 0), ("examples_rgb_color.dcm", 0), ("examples_palette.dcm", 0),
    ("examples_jpeg2k.dcm", 0), ("examples_ybr_color.dcm", 0), ("examples_ybr_color.dcm", 15),
)  # fmt: skip

GROUPS = ("photo (scikit-image)", "greyscale photo (scikit-image)", "CT / MR / US (pydicom)", "synthetic")


@dataclass(frozen=True)
class OodImage:
    group: str
    name: str
    rgb: np.ndarray  # (H, W, 3) uint8


def _rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3], dtype=np.uint8)


def skimage_photos() -> Iterator[OodImage]:
    import skimage.data

    for group, names in ((GROUPS[0], SKIMAGE_COLOUR), (GROUPS[1], SKIMAGE_GREY)):
        for name in names:
            yield OodImage(group, name, _rgb(getattr(skimage.data, name)()))
    left, right, _ = skimage.data.stereo_motorcycle()
    yield OodImage(GROUPS[0], "stereo_motorcycle (left)", _rgb(left))
    yield OodImage(GROUPS[0], "stereo_motorcycle (right)", _rgb(right))


def to_8bit(ds: object, frame: int = 0) -> np.ndarray:
    """A DICOM image as a viewer shows it: modality LUT, VOI window (or min-max), palette or colour -> RGB uint8."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    arr = ds.pixel_array  # type: ignore[attr-defined]
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        arr = arr[frame]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        return _rgb(arr / max(1, arr.max()) * 255 if arr.max() > 255 else arr)
    if arr.ndim == 3:  # RGB (pydicom already converted YBR)
        return _rgb(arr)
    arr = apply_modality_lut(arr, ds)
    arr = apply_voi_lut(arr, ds) if "WindowCenter" in ds else arr  # type: ignore[operator]
    lo, hi = float(np.min(arr)), float(np.max(arr))
    grey = (arr - lo) / max(hi - lo, 1e-6) * 255
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return _rgb(np.round(grey))


def pydicom_images() -> Iterator[OodImage]:
    import pydicom
    from pydicom.data import get_testdata_file

    for name, frame in PYDICOM_FILES:
        path = get_testdata_file(name)
        if path is None:
            log.warning("pydicom test file %s is not installed; skipped", name)
            continue
        ds = pydicom.dcmread(path)
        label = f"{name} ({ds.Modality}{f', frame {frame}' if frame else ''})"
        yield OodImage(GROUPS[2], label, to_8bit(ds, frame))


def text_page(size: int = 512) -> np.ndarray:
    """A white page with lines of black text, rendered with OpenCV."""
    page = np.full((size, size, 3), 255, dtype=np.uint8)
    lines = ["Patient referral letter", "Dear colleague, thank you for", "seeing this patient with a", "pigmented"]
    lines += ["lesion on the left forearm.", "History: 3 months, growing.", "Kind regards,", "Dr. A. Example"]
    for i, line in enumerate(lines):
        cv2.putText(page, line, (20, 50 + i * 58), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (0, 0, 0), 2, cv2.LINE_AA)
    return page


def synthetic_images(size: int = 512, lesions: Path = LESIONS) -> Iterator[OodImage]:
    group = GROUPS[3]
    colours = {"black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128), "skin tone": (224, 172, 138),
               "red": (200, 30, 30), "blue": (30, 60, 200)}  # fmt: skip
    for name, rgb in colours.items():
        yield OodImage(group, f"uniform {name}", np.full((size, size, 3), rgb, dtype=np.uint8))
    rng = np.random.default_rng(0)
    noises: dict[str, Callable[[], np.ndarray]] = {
        "uniform noise": lambda: rng.integers(0, 256, (size, size, 3)),
        "gaussian noise": lambda: np.clip(rng.normal(128, 50, (size, size, 3)), 0, 255),
        "salt and pepper": lambda: (rng.random((size, size, 1)) > 0.5).repeat(3, axis=2) * 255,
    }
    for name, make in noises.items():
        yield OodImage(group, name, make().astype(np.uint8))
    yield OodImage(group, "text page", text_page(size))
    for path in sorted(lesions.rglob("*.jpg")):
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        sigma = min(bgr.shape[:2]) / 10  # a tenth of the short side: no lesion structure survives
        blurred = cv2.GaussianBlur(bgr, (0, 0), sigma)
        yield OodImage(group, f"heavy blur of {path.stem}", cv2.cvtColor(blurred, cv2.COLOR_BGR2RGB))


def ood_images() -> list[OodImage]:
    """The whole OOD evaluation set (about 50 images), in a fixed order."""
    return [*skimage_photos(), *pydicom_images(), *synthetic_images()]
