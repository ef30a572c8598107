"""Acquisition shifts: how the same lesion looks when another dermatoscope, camera or export made the image.

The OOD threshold used to be the score that 95% of HAM10000 validation images stay below. HAM10000 is one
acquisition (200x150 downscaled JPEGs of a few dermatoscopes), so the threshold also learnt that look:
34% of real full-resolution ISIC Archive dermoscopy was flagged with reference 3.0.0. Measured on 240
validation images scored by that file (threshold 2535, 5.0% flagged unshifted), one shift at a time
flagged: JPEG q60 5.8%, cool cast 6.2%, gamma 0.8 7.1%, gamma 1.25 9.6%, sharpening 10.4%, warm cast
10.8%, vignetting 12.9%, blur 26.7%; 29 of those lesions at their original 600x450 flagged 20.7% against
6.9% for their 200x150 copies. Every non-dermoscopic image of :mod:`export.ood_set` scored above 3486.

So the threshold is chosen on validation images *and* shifted copies of them (the axes the issue names:
resolution and sharpness, JPEG quality, colour and illumination, vignetting). The shifts are
deterministic (a seed per image and copy), so a refit is reproducible. Nothing here looks at external
data: the ISIC Archive check in the card is measured after, never used to choose.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _jpeg(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    quality = int(rng.integers(40, 91))
    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # cv2 only fails here on an empty image, which the callers never pass
        return img
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


def _resolution(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Down- then up-sampling: a lower-resolution sensor or export, seen at the model's input size.
    h, w = img.shape[:2]
    f = float(rng.uniform(0.35, 0.7))
    small = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _sharpen(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Unsharp masking: a sharper, higher-resolution source than HAM10000's 4x-downscaled frames.
    amount = float(rng.uniform(0.4, 1.0))
    blurred = cv2.GaussianBlur(img, (0, 0), 1.5)
    return cv2.addWeighted(img, 1 + amount, blurred, -amount, 0)


def _blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.6, 1.4)))


def _colour(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Per-channel gains: another white balance or illuminant.
    gains = rng.uniform(0.85, 1.15, size=3)
    return np.clip(img * gains, 0, 255).astype(np.uint8)


def _gamma(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    g = float(np.exp(rng.uniform(np.log(0.75), np.log(1.33))))
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** g, 0, 255).astype(np.uint8)
    return cv2.LUT(img, lut)


def _vignette(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Dark corners of a round dermatoscope field, as a radial fall-off.
    h, w = img.shape[:2]
    k = float(rng.uniform(0.3, 0.7))
    yy, xx = np.mgrid[:h, :w]
    r2 = (((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2) / 2
    return np.clip(img * (1 - k * r2)[..., None], 0, 255).astype(np.uint8)


SHIFTS: dict[str, Shift] = {
    "jpeg": _jpeg,
    "resolution": _resolution,
    "sharpen": _sharpen,
    "blur": _blur,
    "colour": _colour,
    "gamma": _gamma,
    "vignette": _vignette,
}


@dataclass(frozen=True)
class ShiftPlan:
    """``copies`` shifted copies per image, each ``per_copy`` distinct shifts drawn with ``seed``."""

    copies: int = 3
    per_copy: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.copies < 0:
            raise ValueError(f"acquisition copies must be >= 0, got {self.copies}")
        if not 1 <= self.per_copy <= len(SHIFTS):
            raise ValueError(f"shifts per copy must be in [1, {len(SHIFTS)}], got {self.per_copy}")

    def describe(self) -> dict[str, object]:
        """What the metadata records (``ood.fitted_on.acquisition_shifts``)."""
        return {"copies_per_image": self.copies, "shifts_per_copy": self.per_copy, "seed": self.seed,
                "shifts": sorted(SHIFTS)}  # fmt: skip


def shifted(rgb: np.ndarray, plan: ShiftPlan, index: int) -> list[np.ndarray]:
    """``plan.copies`` shifted copies of one full-size RGB uint8 image (the ``index``-th of its set).

    The generator is seeded by (seed, index), so the same image gets the same copies in every run
    whatever order or subset the caller scores.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    rng = np.random.default_rng([plan.seed, index])
    names = sorted(SHIFTS)
    out = []
    for _ in range(plan.copies):
        img = rgb
        for name in rng.choice(names, plan.per_copy, replace=False):
            img = SHIFTS[str(name)](img, rng)
        out.append(img)
    return out
