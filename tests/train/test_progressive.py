"""Progressive resizing: the size schedule and the uint8 resize (train/progressive.py)."""

from __future__ import annotations

import torch

from train.progressive import resize_uint8, size_for_epoch


def test_size_rises_linearly_then_stays_at_the_full_size() -> None:
    sizes = [size_for_epoch(e, 160, 112, 3) for e in range(6)]
    assert sizes == [112, 128, 144, 160, 160, 160]
    assert all(s % 8 == 0 for s in sizes)


def test_off_means_always_the_full_size() -> None:
    assert {size_for_epoch(e, 160, 0, 0) for e in range(4)} == {160}
    assert {size_for_epoch(e, 160, 112, 0) for e in range(4)} == {160}


def test_resize_keeps_a_flat_image_and_averages_areas() -> None:
    x = torch.full((3, 32, 32, 3), 77, dtype=torch.uint8)
    out = resize_uint8(x, 16, chunk=2)  # chunks smaller than N: every chunk written
    assert out.shape == (3, 16, 16, 3) and out.dtype == torch.uint8 and bool((out == 77).all())
    check = torch.zeros((1, 4, 4, 3), dtype=torch.uint8)
    check[0, ::2, ::2] = 200  # one bright pixel per 2x2 block -> a flat 50
    assert bool((resize_uint8(check, 2) == 50).all())
    assert resize_uint8(x, 32) is x
