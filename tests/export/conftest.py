"""Tiny checkpoints for export tests: untrained ResNets at 32 px (BatchNorm statistics made non-trivial)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from export.__main__ import main as export_main
from tests.tiny_model import HAM_CLASSES, HAM_NAMES
from train.checkpoint import Checkpoint, save_checkpoint
from train.models import build_model

SIZE = 32
ISIC = Path(__file__).resolve().parents[1] / "data" / "isic"
CLASSES = ["melanoma", "nevus"]  # the OOD exports of test_ood.py and test_ood_refit.py

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


@pytest.fixture(scope="session")
def lesion_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An ImageFolder (melanoma/, nevus/) of 48 PNGs and its split.json (train 24, val 8, test 16)."""
    root = tmp_path_factory.mktemp("lesions")
    stems = []
    for cls in CLASSES:
        (root / cls).mkdir()
        for p in sorted((ISIC / cls).glob("*.jpg")):
            img = cv2.resize(cv2.imread(str(p)), (48, 48), interpolation=cv2.INTER_AREA)
            for k in range(4):
                cv2.imwrite(str(root / cls / f"{p.stem}_r{k}.png"), np.rot90(img, k))
                stems.append(f"{p.stem}_r{k}")
    np.random.default_rng(0).shuffle(stems)
    split = root / "split.json"
    split.write_text(json.dumps({"train": stems[:24], "val": stems[24:32], "test": stems[32:]}))
    return root, split


@pytest.fixture(scope="session")
def ood_model(make_ckpt: MakeCkpt, lesion_folder: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    data, split = lesion_folder
    out = tmp_path_factory.mktemp("ood") / "ood.onnx"
    ckpt = make_ckpt("ood-r18", classes=CLASSES)
    rc = export_main([str(ckpt), "--out", str(out), "--ood-data", str(data), "--ood-split", str(split)])
    assert rc == 0
    return out
