"""Canonical preprocessing: the one definition used by training (the service keeps its own copy).

A test compares this function with ``service/imaging.py``'s copy on the same pixels, so the
two cannot drift apart silently.
"""

from __future__ import annotations

import cv2
import numpy as np


def center_crop_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop an image to a square, then resize it to ``size`` x ``size``.

    INTER_AREA is used because dermoscopy frames are almost always downscaled, and area
    averaging is the alias-free choice for shrinking.

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB image.
        size: output side S in pixels.

    Returns:
        ``(S, S, 3)`` uint8 RGB, C-contiguous.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = rgb[top : top + side, left : left + side]
    out = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(out, dtype=np.uint8)


# ImageNet statistics: the ResNet family's input normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (mean, std) per RGB channel on [0, 1] pixels; each architecture declares its own
# (train.models.input_normalization), the checkpoint stores it and export bakes it into the graph.
Norm = tuple[tuple[float, ...], tuple[float, ...]]
IMAGENET_NORM: Norm = (IMAGENET_MEAN, IMAGENET_STD)
