"""Tiny checkpoints for export tests: untrained ResNets at 32 px (BatchNorm statistics made non-trivial)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.tiny_model import HAM_CLASSES, HAM_NAMES
from train.checkpoint import Checkpoint, save_checkpoint
from train.models import build_model

SIZE = 32

MakeCkpt = Callable[..., Path]


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory: pytest.TempPathFactory) -> MakeCkpt:
    """Factory: ``make_ckpt(name, arch=..., classes=..., size=..., temperature=..., seed=...)`` -> checkpoint path."""
    root = tmp_path_factory.mktemp("ckpts")

    def make(
        name: str,
        arch: str = "resnet18",
        classes: list[str] | None = None,
        size: int = SIZE,
        temperature: float = 1.5,
        seed: int = 0,
        metrics: dict[str, float] | None = None,
    ) -> Path:
        classes = classes or HAM_CLASSES
        torch.manual_seed(seed)
        model = build_model(arch, len(classes))
        model.train()
        with torch.no_grad():  # one forward pass in train mode moves the BN running stats off 0/1
            model(torch.randn(8, 3, size, size) * 2 + 0.5)
        ckpt = Checkpoint(
            arch=arch,
            classes=classes,
            img_size=size,
            model_state=model.eval().state_dict(),
            class_names={c: HAM_NAMES.get(c, c) for c in classes},
            temperature=temperature,
            metrics=metrics if metrics is not None else {"balanced_accuracy": 0.61, "accuracy": 0.8},
            dataset={"name": "HAM10000"},
        )
        return save_checkpoint(ckpt, root / f"{name}.pt")

    return make
