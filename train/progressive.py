"""Progressive resizing: the first epochs train at a lower resolution (a cheaper warm-up).

A step's cost grows with the pixel count, so an epoch at 112 px costs about half of one at
160 px. The early epochs mostly move the new head and the BatchNorm statistics; the last ones
run at the full size, the size validation, the checkpoint and export use (as in FixRes and
EfficientNetV2's progressive learning, without their regularisation schedule).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIZE_STEP = 8  # sizes are rounded to a multiple of this (stride-2 stages halve evenly for a while)


def size_for_epoch(epoch: int, img_size: int, start_size: int, ramp_epochs: int) -> int:
    """Training size of ``epoch`` (0-based): linear from ``start_size`` to ``img_size`` over ``ramp_epochs``.

    ``start_size == 0`` or ``ramp_epochs == 0`` = off (always ``img_size``); from epoch ``ramp_epochs`` on
    the size is ``img_size``.
    """
    if not start_size or not ramp_epochs or epoch >= ramp_epochs:
        return img_size
    size = start_size + (img_size - start_size) * epoch / ramp_epochs
    return max(SIZE_STEP, int(size) // SIZE_STEP * SIZE_STEP)


def resize_uint8(x: torch.Tensor, size: int, chunk: int = 512) -> torch.Tensor:
    """``(N, S, S, 3)`` uint8 -> ``(N, size, size, 3)`` uint8, area-averaged (like the decoder's INTER_AREA)."""
    if x.shape[1] == size:
        return x
    out = torch.empty((len(x), size, size, 3), dtype=torch.uint8, device=x.device)
    for i in range(0, len(x), chunk):  # in chunks: the float copy of all of HAM10000 would be GBs
        f = x[i : i + chunk].permute(0, 3, 1, 2).float()
        f = F.interpolate(f, size=(size, size), mode="area")
        out[i : i + chunk] = f.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out
