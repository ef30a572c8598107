"""Classification losses for long-tailed data: CE, class-weighted CE, label smoothing, focal.

Normalisation (what ``docs/training.md`` states and the tests check):

* class weights ``w_c = N / (K * n_c)`` ("inverse") or effective-number weights
  ``w_c ∝ (1 - beta) / (1 - beta^n_c)`` (Cui et al. 2019), both rescaled so that the mean
  weight over the training images, ``sum_c n_c w_c / N``, is 1: the loss keeps the scale of
  plain CE and the learning rate needs no retuning;
* weighted CE = ``(1/B) * sum_i w[y_i] * CE_i``: a plain mean over the batch, *not*
  PyTorch's ``sum_i w[y_i] CE_i / sum_i w[y_i]``, which would cancel the weights of a
  batch that holds one class only;
* focal = ``(1/B) * sum_i -alpha[y_i] (1 - p_t,i)^gamma log p_t,i`` with ``log p_t`` taken
  per sample from ``log_softmax`` in float32 (never from an already weighted or reduced CE).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def class_weights(counts: np.ndarray | list[int], mode: str = "inverse", beta: float = 0.999) -> torch.Tensor:
    """Per-class weights with mean 1 over the training images (see module docstring).

    Args:
        counts: training images per class, ``n_c``; every class needs at least one.
        mode: ``"inverse"`` (N / (K n_c)) or ``"effective"`` (effective number of samples).
        beta: the effective-number hyper-parameter in [0, 1).
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or (n <= 0).any():
        raise ValueError(f"class_weights: every class needs >= 1 training image, got counts {n.tolist()}")
    if mode == "inverse":
        w = n.sum() / (len(n) * n)
    elif mode == "effective":
        if not 0 <= beta < 1:
            raise ValueError(f"class_weights: beta must be in [0, 1), got {beta}")
        w = (1 - beta) / (1 - np.power(beta, n))
    else:
        raise ValueError(f"class_weights: unknown mode {mode!r}; expected 'inverse' or 'effective'")
    w = w * n.sum() / (n * w).sum()  # mean weight over the training images = 1
    return torch.tensor(w, dtype=torch.float32)


class WeightedCrossEntropy(nn.Module):
    """CE with optional per-class weights and label smoothing, averaged over the batch.

    Args:
        weight: ``(K,)`` class weights or ``None``.
        label_smoothing: epsilon; the target is ``(1 - eps) one_hot + eps / K``.
    """

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.register_buffer("weight", weight if weight is None else weight.float(), persistent=False)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # (B, K), (B,)
        logp = F.log_softmax(logits.float(), dim=1)
        nll = -logp.gather(1, target[:, None]).squeeze(1)
        if self.label_smoothing:
            nll = (1 - self.label_smoothing) * nll - self.label_smoothing * logp.mean(dim=1)
        if self.weight is not None:
            nll = nll * self.weight[target]
        return nll.mean()


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al. 2017), per sample, averaged over the batch.

    Args:
        gamma: focusing parameter (0 gives CE).
        alpha: ``(K,)`` per-class weights or ``None``. A scalar alpha is refused: under
            softmax it only rescales the loss (it does not balance classes as it does for
            the sigmoid form), which is a known source of "focal loss does not help".
    """

    def __init__(self, gamma: float = 2.0, alpha: torch.Tensor | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        if alpha is not None and (not isinstance(alpha, torch.Tensor) or alpha.ndim != 1):
            raise ValueError("focal alpha must be a (K,) tensor of per-class weights, not a scalar")
        self.gamma = gamma
        self.register_buffer("alpha", alpha if alpha is None else alpha.float(), persistent=False)

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # (B,)
        if self.alpha is not None and self.alpha.numel() != logits.shape[1]:
            raise ValueError(f"focal alpha has {self.alpha.numel()} entries for {logits.shape[1]} classes")
        logp_t = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - logp_t.exp()).clamp(min=0) ** self.gamma) * logp_t
        if self.alpha is not None:
            loss = loss * self.alpha[target]
        return loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.per_sample(logits, target).mean()


def build_loss(
    name: str,
    counts: np.ndarray,
    weighting: str = "inverse",
    beta: float = 0.999,
    gamma: float = 2.0,
    focal_alpha: str = "none",
    label_smoothing: float = 0.0,
) -> nn.Module:
    """The configured loss; ``counts`` are the training images per class.

    Args:
        name: ``"ce"``, ``"weighted_ce"`` or ``"focal"``.
        focal_alpha: ``"none"``, ``"weights"`` (the class weights) or K comma-separated floats.
    """
    if name == "ce":
        return WeightedCrossEntropy(None, label_smoothing)
    if name == "weighted_ce":
        return WeightedCrossEntropy(class_weights(counts, weighting, beta), label_smoothing)
    if name == "focal":
        alpha: torch.Tensor | None = None
        if focal_alpha == "weights":
            alpha = class_weights(counts, weighting, beta)
        elif focal_alpha not in ("none", ""):
            vals = [float(v) for v in focal_alpha.split(",")]
            if len(vals) != len(counts):
                raise ValueError(
                    f"focal_alpha: {len(vals)} values given for {len(counts)} classes (need one per class)"
                )
            alpha = torch.tensor(vals)
        return FocalLoss(gamma, alpha)
    raise ValueError(f"unknown loss {name!r}; expected 'ce', 'weighted_ce' or 'focal'")
