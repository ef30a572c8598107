"""Batched augmentation: identity when off, exact 90-degree rotations, CutMix/Mixup targets and loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from train.augment import AugmentParams, augment, mix, model_input, to_float

OFF = AugmentParams(flip=False, rot90=False, rotate_deg=0.0, scale_min=1.0, hsv=0.0)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_all_off_is_identity(images: torch.Tensor) -> None:
    out = augment(images, OFF, torch.Generator().manual_seed(0))
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out, model_input(images), atol=1e-4)


def test_rot90_and_flip_are_exact(images: torch.Tensor) -> None:
    p = AugmentParams(flip=True, rot90=True, rotate_deg=0.0, scale_min=1.0, hsv=0.0)
    out = augment(images, p, torch.Generator().manual_seed(3))
    ref = model_input(images)
    for i in range(len(images)):
        cands = [torch.rot90(r, k, dims=(1, 2)) for r in (ref[i], ref[i].flip(2)) for k in range(4)]
        assert min(float((out[i] - c).abs().max()) for c in cands) < 1e-4


def test_augment_reproducible_and_changes_pixels(images: torch.Tensor) -> None:
    p = AugmentParams(cutout=1.0)
    a = augment(images, p, torch.Generator().manual_seed(5))
    b = augment(images, p, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert not torch.allclose(a, model_input(images), atol=1e-2)
    assert torch.isfinite(a).all()


def test_mixup_targets_and_loss(images: torch.Tensor) -> None:
    x = to_float(images)
    y = torch.arange(6)
    p = AugmentParams(mixup_alpha=0.4, mix_prob=1.0)
    g = torch.Generator().manual_seed(0)
    xm, ya, yb, lam = mix(x, y, p, g)
    assert 0.0 < lam < 1.0 and torch.equal(ya, y)
    perm = yb  # labels are 0..5, so y_b is the permutation itself
    assert torch.allclose(xm, lam * x + (1 - lam) * x[perm], atol=1e-6)
    logits = torch.randn(6, 6)
    mixed = lam * F.cross_entropy(logits, ya) + (1 - lam) * F.cross_entropy(logits, yb)
    soft = lam * F.one_hot(ya, 6) + (1 - lam) * F.one_hot(yb, 6)  # the same loss as a soft target
    assert torch.allclose(mixed, -(soft * F.log_softmax(logits, 1)).sum(1).mean(), atol=1e-6)


def test_cutmix_lambda_is_the_kept_area(images: torch.Tensor) -> None:
    x = to_float(images)
    y = torch.arange(6)
    p = AugmentParams(cutmix_alpha=1.0, mix_prob=1.0)
    for seed in range(5):
        xm, ya, yb, lam = mix(x, y, p, torch.Generator().manual_seed(seed))
        from_a = (xm == x).all(1).float().mean(dim=(1, 2))  # per image: fraction of pixels kept
        same = ya == yb
        assert torch.allclose(from_a[~same], torch.full_like(from_a[~same], lam), atol=1e-6)


def test_mix_prob_zero_never_mixes(images: torch.Tensor) -> None:
    x, y = to_float(images), torch.arange(6)
    out = mix(x, y, AugmentParams(mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.0), torch.Generator())
    assert out[3] == 1.0 and out[0] is x
