"""Batched augmentation on uint8 image tensors, cheap enough to never be the bottleneck.

All random parameters are drawn from one seeded ``torch.Generator`` on the CPU, so a run is
reproducible; the pixels are then transformed for the whole batch at once (one
``grid_sample`` for every geometric op, a 3x3 colour matrix per image), on the batch's own
device. No DataLoader workers are needed: the images already sit decoded in RAM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from train.preprocess import IMAGENET_NORM, Norm


@dataclass
class AugmentParams:
    """What to apply; see ``train.config.TrainConfig`` for the meaning of each."""

    flip: bool = True
    rot90: bool = True
    rotate_deg: float = 15.0
    scale_min: float = 0.7
    hsv: float = 0.1
    cutout: float = 0.0
    sharpness: float = 0.0
    white_balance: float = 0.0
    vignette: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 0.5


def to_float(x: torch.Tensor) -> torch.Tensor:
    """``(B, S, S, 3)`` uint8 -> ``(B, 3, S, S)`` float in [0, 1]."""
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: torch.Tensor, norm: Norm = IMAGENET_NORM) -> torch.Tensor:
    """``(B, 3, S, S)`` in [0, 1] -> model input normalised with the architecture's ``(mean, std)``."""
    mean = torch.tensor(norm[0], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(norm[1], device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def model_input(x: torch.Tensor, norm: Norm = IMAGENET_NORM) -> torch.Tensor:
    """Evaluation path: uint8 NHWC -> normalised float NCHW, no augmentation."""
    return normalize(to_float(x), norm)


def _rand(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def geometric(x: torch.Tensor, p: AugmentParams, gen: torch.Generator) -> torch.Tensor:
    """Flip, 90-degree rotation, small rotation and random resized crop as one affine warp per image."""
    b = x.shape[0]
    angle = _rand(gen, b, -p.rotate_deg, p.rotate_deg) * math.pi / 180
    if p.rot90:
        angle = angle + torch.randint(0, 4, (b,), generator=gen) * (math.pi / 2)
    area = _rand(gen, b, p.scale_min, 1.0)
    log_r = _rand(gen, b, math.log(3 / 4), math.log(4 / 3)) * (p.scale_min < 1)  # aspect jitter only when cropping
    sx = (area * log_r.exp()).sqrt().clamp(max=1.0)  # crop width as a fraction of the image
    sy = (area / log_r.exp()).sqrt().clamp(max=1.0)
    if p.flip:
        sx = sx * torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    tx = _rand(gen, b, -1, 1) * (1 - sx.abs())  # crop centre stays inside the image
    ty = _rand(gen, b, -1, 1) * (1 - sy)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos * sx, -sin * sy, tx], 1), torch.stack([sin * sx, cos * sy, ty], 1)], 1).to(
        x.device
    )  # (B, 2, 3): output grid -> input sampling coordinates
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # reflection: dermoscopy borders are skin, a black wedge would be a spurious feature
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def colour(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """HSV-style jitter: value (brightness) and saturation scaled by 1 +- s, hue rotated by +- s*90 degrees.

    Hue rotation is done as a rotation about the grey axis in YIQ space: one 3x3 matrix
    per image, far cheaper than a round trip through HSV.
    """
    b = x.shape[0]
    v = _rand(gen, b, 1 - strength, 1 + strength)
    s = _rand(gen, b, 1 - strength, 1 + strength)
    h = _rand(gen, b, -strength, strength) * (math.pi / 2)
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rot = torch.zeros(b, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = h.cos() * s, -h.sin() * s
    rot[:, 2, 1], rot[:, 2, 2] = h.sin() * s, h.cos() * s
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq * v[:, None, None]  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m.to(x.device), x).clamp_(0, 1)


def cutout(x: torch.Tensor, prob: float, gen: torch.Generator) -> torch.Tensor:
    """With probability ``prob`` per image, grey out one square of side S/4 at a random place."""
    b, _, h, w = x.shape
    side = max(1, h // 4)
    on = torch.rand(b, generator=gen) < prob
    cy = torch.randint(0, h, (b,), generator=gen)
    cx = torch.randint(0, w, (b,), generator=gen)
    ys, xs = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    box = ((ys - cy[:, None, None]).abs() <= side // 2) & ((xs - cx[:, None, None]).abs() <= side // 2)
    mask = (box & on[:, None, None]).to(x.device)[:, None]
    return x.masked_fill(mask, 0.5)


def sharpness(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Blur or sharpen each image: ``x + a * (x - blur(x))`` with ``a`` in ``[-strength, strength]``.

    ``a = -1`` is a 3x3 binomial blur, ``a > 0`` an unsharp mask: dermatoscopes and their exports
    differ most in resolution and sharpness (HAM10000's 600x450 frames against 3000-px archive
    images), and a model that has only seen one sharpness reads the other as a different lesion.
    """
    b, c = x.shape[:2]
    a = _rand(gen, b, -strength, strength).clamp(min=-1.0).to(x.device).view(b, 1, 1, 1)
    k1 = torch.tensor([1.0, 2.0, 1.0], device=x.device)
    k = (k1[:, None] * k1[None, :] / 16).expand(c, 1, 3, 3)
    blur = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=c)
    return (x + a * (x - blur)).clamp_(0, 1)


def white_balance(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """A per-channel gain in ``1 +- strength`` (the illuminant and white balance of another camera)."""
    b = x.shape[0]
    gain = _rand(gen, b * 3, 1 - strength, 1 + strength).view(b, 3, 1, 1).to(x.device)
    return (x * gain).clamp_(0, 1)


def vignette(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Dark corners: brightness falls off with the squared distance from the centre, by up to ``strength``."""
    b, _, h, w = x.shape
    depth = _rand(gen, b, 0.0, strength).to(x.device).view(b, 1, 1, 1)
    ys = torch.linspace(-1, 1, h, device=x.device).view(1, 1, h, 1)
    xs = torch.linspace(-1, 1, w, device=x.device).view(1, 1, 1, w)
    r2 = (ys**2 + xs**2) / 2  # 0 at the centre, 1 in the corners
    return x * (1 - depth * r2)


def augment(x_uint8: torch.Tensor, p: AugmentParams, gen: torch.Generator, norm: Norm = IMAGENET_NORM) -> torch.Tensor:
    """Training path: uint8 ``(B, S, S, 3)`` -> augmented, normalised float ``(B, 3, S, S)``."""
    x = to_float(x_uint8)
    x = geometric(x, p, gen)
    if p.sharpness > 0:
        x = sharpness(x, p.sharpness, gen)
    if p.hsv > 0:
        x = colour(x, p.hsv, gen)
    if p.white_balance > 0:
        x = white_balance(x, p.white_balance, gen)
    if p.vignette > 0:
        x = vignette(x, p.vignette, gen)
    if p.cutout > 0:
        x = cutout(x, p.cutout, gen)
    return normalize(x, norm)


def mix(
    x: torch.Tensor, y: torch.Tensor, p: AugmentParams, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """CutMix or Mixup on a batch (with probability ``mix_prob``).

    Returns:
        ``(x, y_a, y_b, lam)``: train with ``lam * L(out, y_a) + (1 - lam) * L(out, y_b)``.
        For CutMix, ``lam`` is recomputed from the pasted box's exact area.
    """
    modes = [m for m, a in (("mixup", p.mixup_alpha), ("cutmix", p.cutmix_alpha)) if a > 0]
    if not modes or x.shape[0] < 2 or float(torch.rand(1, generator=gen)) >= p.mix_prob:
        return x, y, y, 1.0
    mode = modes[int(torch.randint(0, len(modes), (1,), generator=gen))]
    alpha = p.mixup_alpha if mode == "mixup" else p.cutmix_alpha
    lam = _beta(alpha, gen)
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    if mode == "mixup":
        return lam * x + (1 - lam) * x[perm], y, y[perm], lam
    h, w = x.shape[2:]
    cut = math.sqrt(1 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(0, h, (1,), generator=gen)), int(torch.randint(0, w, (1,), generator=gen))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return x, y, y[perm], lam


def _beta(alpha: float, gen: torch.Generator) -> float:
    """Beta(alpha, alpha) drawn reproducibly: torch.distributions ignores generators, so seed numpy from ``gen``."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def prepare_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    aug: AugmentParams | None,
    gen: torch.Generator,
    channels_last: bool = False,
    norm: Norm = IMAGENET_NORM,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Cached uint8 batch -> augmented, mixed model input ``(xb, y_a, y_b, lam)``; ``aug=None``: no augmentation."""
    if aug is None:
        xb, ya, yb, lam = model_input(x, norm), y, y, 1.0
    else:
        xb, ya, yb, lam = mix(augment(x, aug, gen, norm), y, aug, gen)
    if channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    return xb, ya, yb, lam
