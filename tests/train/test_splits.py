"""Lesion-grouped, class-stratified splits and folds."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import shared_data
from train.data import DataError, load_labelled
from train.splits import grouped_kfold, grouped_split, limit_indices

CLASSES = ["a", "b", "c"]


def synthetic(seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """300 images in ~150 lesions of 1-4 images each; class c is rare (6 lesions)."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for g in range(150):
        c = 2 if g % 25 == 0 else int(rng.integers(0, 2))
        for _ in range(int(rng.integers(1, 5))):
            labels.append(c)
            groups.append(f"L{g}")
    return np.array(labels), groups


def _sides(parts: dict[str, np.ndarray], groups: list[str]) -> dict[str, set[str]]:
    return {k: {groups[i] for i in v} for k, v in parts.items()}


def test_split_no_lesion_on_two_sides_every_class_in_train() -> None:
    labels, groups = synthetic()
    parts = grouped_split(labels, groups, CLASSES, 0.2, 0.2, seed=1)
    s = _sides(parts, groups)
    assert not (s["train"] & s["val"]) and not (s["train"] & s["test"]) and not (s["val"] & s["test"])
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(len(labels)))
    assert set(labels[parts["train"]]) == {0, 1, 2} and set(labels[parts["val"]]) == {0, 1, 2}
    assert 0.1 < len(parts["val"]) / len(labels) < 0.3  # close to the asked fraction


def test_split_is_seeded() -> None:
    labels, groups = synthetic()
    a = grouped_split(labels, groups, CLASSES, 0.2, 0.2, seed=3)
    b = grouped_split(labels, groups, CLASSES, 0.2, 0.2, seed=3)
    c = grouped_split(labels, groups, CLASSES, 0.2, 0.2, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["val"], c["val"])


def test_kfold_groups_once_in_val_every_class_everywhere() -> None:
    labels, groups = synthetic()
    folds = grouped_kfold(labels, groups, CLASSES, 5, seed=0)
    seen: list[str] = []
    for f in folds:
        s = _sides(f, groups)
        assert not (s["train"] & s["val"])
        assert set(labels[f["train"]]) == {0, 1, 2} and set(labels[f["val"]]) == {0, 1, 2}
        seen += sorted(s["val"])
    assert sorted(seen) == sorted(set(groups))  # every lesion validated exactly once


def test_class_with_no_images_in_a_fold_is_named() -> None:
    labels, groups = synthetic()
    with pytest.raises(DataError, match=r"fold \d of 8: split 'val' has no images of class\(es\) c"):
        grouped_kfold(labels, groups, CLASSES, 8, seed=0)  # class c has only 6 lesions
    labels2 = np.array([0, 0, 0, 0, 1])
    with pytest.raises(DataError, match=r"no images of class.*b"):
        grouped_split(labels2, [f"g{i}" for i in range(5)], ["a", "b"], 0.2, 0.0, seed=0)


def test_limit_keeps_groups_whole_and_every_class() -> None:
    labels, groups = synthetic()
    keep = limit_indices(labels, groups, 60, seed=0)
    kept_groups = {groups[i] for i in keep}
    assert all(groups[i] not in kept_groups for i in set(range(len(labels))) - set(keep.tolist()))
    assert set(labels[keep]) == {0, 1, 2} and len(keep) < 100


def test_ham10000_split_has_no_leak() -> None:
    ds = load_labelled(shared_data("ham10000"))
    parts = grouped_split(ds.labels, ds.groups, ds.classes, 0.15, 0.15, seed=0)
    s = _sides(parts, ds.groups)
    assert not (s["train"] & s["val"]) and not (s["train"] & s["test"]) and not (s["val"] & s["test"])
    for k in ("train", "val", "test"):
        assert len(set(ds.labels[parts[k]])) == 7
