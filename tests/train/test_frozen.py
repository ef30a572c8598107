"""Frozen early blocks, their BN recalibration and the feature cache (train/frozen.py, train/batches.py)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from train.augment import model_input
from train.batches import BatchSource
from train.checkpoint import load_checkpoint
from train.config import TrainConfig, load_config
from train.efficientnet import build_lite
from train.engine import build_optimizer, train_step
from train.frozen import (
    DIHEDRAL_VIEWS,
    FeatureCache,
    TrainablePart,
    dihedral,
    freeze,
    frozen_forward,
    recalibrate_bn,
)
from train.losses import build_loss
from train.run import run

NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
N = 6  # the stem and blocks 0-5: three stride-2 stages, so SAME padding is asymmetric in them


def lite() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_lite("efficientnet_lite0", 3)


def images(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_dihedral_views_are_the_eight_distinct_symmetries() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = [dihedral(x, v) for v in range(8)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert torch.equal(views[1], x.flip(3)) and torch.equal(views[2], x.flip(2))  # the first four: the flips group
    assert len(DIHEDRAL_VIEWS) == 8


def test_cached_features_equal_the_frozen_forward_of_each_view_exactly() -> None:
    m, x = lite(), images()
    freeze(m, N)
    cache = FeatureCache(m, N, 8, NORM, batch=len(x))
    feats = cache.build(x, None, torch.Generator(), progress=False)
    inp = model_input(x, NORM)
    for v in range(8):
        assert torch.equal(feats[:, v], frozen_forward(m, dihedral(inp, v), N)), v
    # Why each view is computed: the features of a rotated image are not the rotated features (SAME padding).
    assert not torch.equal(feats[:, 4], torch.rot90(feats[:, 0], 1, dims=(2, 3)))


def test_trainable_part_on_cached_features_is_the_rest_of_the_model() -> None:
    m, x = lite(), images()
    m.eval()
    inp = model_input(x, NORM)
    assert torch.allclose(TrainablePart(m, N)(frozen_forward(m, inp, N)), m(inp), atol=1e-5)


def test_recalibration_replaces_the_frozen_bn_statistics_with_the_training_images() -> None:
    m, x = lite(), images(8)
    before = m._blocks[N - 1]._bn1.running_var.clone()
    late = m._blocks[N]._bn1.running_var.clone()
    assert recalibrate_bn(m, N, x, NORM, batch=8, progress=False) == 8
    # one batch with momentum None: the stem's BN mean is exactly the batch mean of the stem's output
    stem = m._conv_stem(model_input(x, NORM))
    assert torch.allclose(m._bn0.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-5)
    assert not torch.allclose(m._blocks[N - 1]._bn1.running_var, before)
    assert torch.equal(m._blocks[N]._bn1.running_var, late)  # the trainable part is left alone
    assert m._bn0.momentum == 0.01 and not m._bn0.training  # momentum restored, frozen again


def _cfg(**over: object) -> TrainConfig:
    base = TrainConfig(data="x", arch="efficientnet_lite0", img_size=32, batch_size=4, epochs=2, progress=False,
                       ema=0.9, frozen_blocks=N)  # fmt: skip
    return dataclasses.replace(base, **over)  # type: ignore[arg-type]


@pytest.mark.parametrize("views", [0, 2])
def test_a_step_trains_only_the_unfrozen_part(views: int) -> None:
    m, x = lite(), images(8)
    cfg = _cfg(cache_views=views)
    m.train()
    src = BatchSource(cfg, m, m, x, NORM, torch.device("cpu"))
    opt = build_optimizer(cfg, m, m.head_parameter_prefixes())
    before = copy.deepcopy(m.state_dict())
    gen = torch.Generator().manual_seed(0)
    m.train()  # as fit does each epoch: this thaws BN modes, start_epoch freezes again
    src.start_epoch(0, gen)
    xb, ra, rb, lam = src.batch(torch.arange(4), gen)
    y = torch.tensor([0, 1, 2, 0])
    train_step(src.net, build_loss("ce", torch.ones(3).numpy()), opt, torch.amp.GradScaler("cuda", enabled=False),
               xb, y[ra], y[rb], lam)  # fmt: skip
    after = m.state_dict()
    frozen_keys = [k for k in after if k.startswith(("_conv_stem", "_bn0", *(f"_blocks.{i}." for i in range(N))))]
    assert frozen_keys and all(torch.equal(before[k], after[k]) for k in frozen_keys)  # weights AND BN buffers
    assert not torch.equal(before[f"_blocks.{N}._project_conv.weight"], after[f"_blocks.{N}._project_conv.weight"])
    assert not torch.equal(before["_fc.weight"], after["_fc.weight"])
    if views:
        assert xb.shape[1:] == src.cache.feats.shape[2:]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (dict(arch="resnet18"), "frozen_blocks: only for efficientnet_lite"),
        (dict(frozen_blocks=0, cache_views=2), "set frozen_blocks"),
        (dict(cache_views=3), "cache_views: 3"),
        (dict(cache_views=2, mixup_alpha=0.2), "Mixup/CutMix"),
        (dict(progressive_start_size=32), "progressive_start_size: 32"),
        (dict(progressive_start_size=16), "go together"),
    ],
)
def test_bad_speed_options_are_refused_by_name(over: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _cfg(**over).validate()


def test_too_many_frozen_blocks_is_refused() -> None:
    with pytest.raises(ValueError, match="frozen_blocks: 17"):
        freeze(lite(), 17)


def test_a_run_with_frozen_blocks_cache_refresh_and_progressive_sizes(tmp_path: Path) -> None:
    from tests.train.test_run import tiny

    over = dict(arch="efficientnet_lite0", epochs=3, frozen_blocks=N, cache_views=2, cache_refresh=1,
                progressive_start_size=24, progressive_epochs=1, mixup_alpha=0.0, cutmix_alpha=0.0, ema=0.9)  # fmt: skip
    summary = run(load_config(None, tiny(tmp_path, **over)))
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    ck = load_checkpoint(tmp_path / "best.pt")
    assert ck.img_size == 32 and "_blocks.0._bn1.running_mean" in ck.model_state  # the whole model, as before


def test_the_cache_is_rebuilt_when_the_size_changes_and_when_a_refresh_is_due() -> None:
    m, x = lite(), images(4, 64)
    src = BatchSource(_cfg(img_size=64, epochs=4, cache_views=1, cache_refresh=2, progressive_start_size=32,
                           progressive_epochs=1), m, m, x, NORM, torch.device("cpu"))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    src.start_epoch(0, gen)
    assert src.size == 32 and src.cache.feats.shape[-1] == 2  # type: ignore[union-attr]  # 32 px / 16
    src.start_epoch(1, gen)
    first = src.cache.feats.clone()  # type: ignore[union-attr]
    assert src.size == 64 and first.shape[-1] == 4 and src.built_at == 1
    src.start_epoch(2, gen)
    assert src.built_at == 1  # refresh every 2 epochs: not yet
    src.start_epoch(3, gen)
    assert src.built_at == 3 and not torch.equal(src.cache.feats, first)  # type: ignore[union-attr]  # fresh draw
