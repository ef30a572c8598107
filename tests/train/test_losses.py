"""Losses: focal loss correctness (and the known bugs it must not have), weighted-CE normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.losses import FocalLoss, WeightedCrossEntropy, build_loss, class_weights


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 5, generator=g) * 3, torch.randint(0, 5, (16,), generator=g)


def test_focal_gamma0_no_alpha_equals_ce(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, y = batch
    assert torch.allclose(FocalLoss(0.0)(logits, y), F.cross_entropy(logits, y), atol=1e-6)


def test_focal_hand_computed() -> None:
    # logits (0, ln 3) -> p = (1/4, 3/4). Sample 0 has y=1 (p_t=3/4), sample 1 has y=0 (p_t=1/4).
    logits = torch.tensor([[0.0, math.log(3)], [0.0, math.log(3)]])
    y = torch.tensor([1, 0])
    l0 = -((1 - 0.75) ** 2) * math.log(0.75)
    l1 = -((1 - 0.25) ** 2) * math.log(0.25)
    got = FocalLoss(2.0).per_sample(logits, y)
    assert got.tolist() == pytest.approx([l0, l1], rel=1e-6)
    assert float(FocalLoss(2.0)(logits, y)) == pytest.approx((l0 + l1) / 2, rel=1e-6)
    alpha = torch.tensor([0.25, 2.0])
    got_a = FocalLoss(2.0, alpha).per_sample(logits, y)
    assert got_a.tolist() == pytest.approx([2.0 * l0, 0.25 * l1], rel=1e-6)


def test_focal_is_per_sample(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Each sample's loss depends on that sample only, and the batch loss is their plain mean."""
    logits, y = batch
    fl = FocalLoss(2.0, torch.linspace(0.5, 2.0, 5))
    per = fl.per_sample(logits, y)
    singles = torch.stack([fl.per_sample(logits[i : i + 1], y[i : i + 1])[0] for i in range(len(y))])
    assert torch.allclose(per, singles, atol=1e-6)
    assert torch.allclose(fl(logits, y), per.mean(), atol=1e-6)
    # the bug of taking p_t from the batch-reduced CE gives one p_t for all samples
    p_t_reduced = torch.exp(-F.cross_entropy(logits, y))
    buggy = (-((1 - p_t_reduced) ** 2) * torch.log(p_t_reduced)).item()
    assert abs(buggy - float(FocalLoss(2.0)(logits, y))) > 1e-3


def test_focal_p_t_not_from_weighted_ce(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, y = batch
    alpha = torch.linspace(0.2, 3.0, 5)
    got = FocalLoss(2.0, alpha).per_sample(logits, y)
    logp_t = F.log_softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
    want = -alpha[y] * (1 - logp_t.exp()) ** 2 * logp_t
    assert torch.allclose(got, want, atol=1e-6)
    wce = F.cross_entropy(logits, y, weight=alpha, reduction="none")  # p_t from a weighted CE: wrong
    buggy = -((1 - torch.exp(-wce)) ** 2) * wce
    assert not torch.allclose(got, buggy, atol=1e-3)


def test_focal_float32_under_half_logits(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, y = batch
    out = FocalLoss(2.0)(logits.to(torch.bfloat16), y)
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_focal_refuses_scalar_alpha_and_wrong_length() -> None:
    with pytest.raises(ValueError, match="scalar"):
        FocalLoss(2.0, torch.tensor(0.25))
    with pytest.raises(ValueError, match="3 entries for 5 classes"):
        FocalLoss(2.0, torch.ones(3)).per_sample(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="one per class"):
        build_loss("focal", np.array([5, 5, 5]), focal_alpha="0.25")


def test_class_weights_inverse_normalisation() -> None:
    counts = np.array([100, 10, 40])
    w = class_weights(counts, "inverse")
    n, k = counts.sum(), len(counts)
    assert w.tolist() == pytest.approx((n / (k * counts)).tolist(), rel=1e-6)  # N / (K n_c)
    assert float((w * torch.tensor(counts)).sum() / n) == pytest.approx(1.0)  # mean weight over images = 1


def test_class_weights_effective_number() -> None:
    counts = np.array([1000, 100, 10])
    w = class_weights(counts, "effective", beta=0.99)
    raw = (1 - 0.99) / (1 - 0.99 ** counts.astype(float))
    assert (w / w[0]).tolist() == pytest.approx((raw / raw[0]).tolist(), rel=1e-5)
    assert float((w * torch.tensor(counts)).sum() / counts.sum()) == pytest.approx(1.0)
    assert w[2] > w[1] > w[0]
    with pytest.raises(ValueError, match="every class needs"):
        class_weights(np.array([3, 0, 2]))


def test_weighted_ce_is_plain_batch_mean(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, y = batch
    w = torch.linspace(0.5, 2.5, 5)
    got = WeightedCrossEntropy(w)(logits, y)
    want = (w[y] * F.cross_entropy(logits, y, reduction="none")).mean()
    assert torch.allclose(got, want, atol=1e-6)
    one_class = torch.full((4,), 4)  # PyTorch's weighted mean would cancel the weight here
    assert float(WeightedCrossEntropy(w)(logits[:4], one_class)) == pytest.approx(
        2.5 * float(F.cross_entropy(logits[:4], one_class)), rel=1e-5
    )


def test_label_smoothing_matches_torch(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, y = batch
    got = WeightedCrossEntropy(None, 0.1)(logits, y)
    assert torch.allclose(got, F.cross_entropy(logits, y, label_smoothing=0.1), atol=1e-6)


def test_build_loss_names() -> None:
    counts = np.array([10, 20])
    assert isinstance(build_loss("focal", counts, focal_alpha="weights"), FocalLoss)
    assert build_loss("weighted_ce", counts).weight is not None
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("hinge", counts)
