"""Lesion-grouped, class-stratified splits: train/val/test and K folds.

Images of one lesion never land on two sides of a split (HAM10000 has 1,956 lesions with
2 to 6 images: a per-image split leaks). Each group is stratified by its majority label.
Every class must keep images in training and in validation; otherwise a :class:`DataError`
names the classes.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from train.data import DataError


def _groups_by_class(labels: np.ndarray, groups: list[str]) -> tuple[dict[int, list[str]], dict[str, list[int]]]:
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    by_class: dict[int, list[str]] = defaultdict(list)
    for g, idx in members.items():  # insertion order = first appearance: deterministic
        label = Counter(int(labels[i]) for i in idx).most_common(1)[0][0]
        by_class[label].append(g)
    return by_class, members


def _check(parts: dict[str, np.ndarray], labels: np.ndarray, classes: list[str], need: tuple[str, ...]) -> None:
    for name in need:
        present = set(labels[parts[name]].tolist())
        lacking = [classes[c] for c in range(len(classes)) if c not in present and (labels == c).any()]
        if lacking:
            raise DataError(
                f"split '{name}' has no images of class(es) {', '.join(lacking)}: too few lesions"
                f" ({', '.join(f'{classes[c]}={int((labels == c).sum())}' for c in range(len(classes)))} images)"
            )
    absent = [classes[c] for c in range(len(classes)) if not (labels == c).any()]
    if absent:
        raise DataError(f"class(es) {', '.join(absent)} have no images at all")


def grouped_split(
    labels: np.ndarray, groups: list[str], classes: list[str], val_frac: float, test_frac: float, seed: int
) -> dict[str, np.ndarray]:
    """Split indices into train/val/test by group, stratified by class.

    Per class, groups are shuffled and handed to val, then test, until each holds its
    fraction of that class's images; the rest train. A class with few groups keeps its
    first group for training, so training always sees every class.

    Returns:
        ``{"train", "val", "test"}`` -> sorted index arrays (test may be empty).
    """
    rng = np.random.default_rng(seed)
    by_class, members = _groups_by_class(labels, groups)
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c in sorted(by_class):
        gs = list(by_class[c])
        rng.shuffle(gs)
        total = sum(len(members[g]) for g in gs)
        targets = {"test": test_frac * total, "val": val_frac * total}
        got = {"test": 0, "val": 0}
        train_first = gs.pop(0)  # guarantees training sees this class
        parts["train"] += members[train_first]
        for g in gs:
            n = len(members[g])
            # val before test: with few lesions, validation (early stopping) needs the class most
            if got["val"] + n / 2 <= targets["val"] or (got["val"] == 0 and targets["val"] > 0):
                side = "val"
            elif got["test"] + n / 2 <= targets["test"]:
                side = "test"
            else:
                side = "train"
            if side != "train":
                got[side] += n
            parts[side] += members[g]
    out = {k: np.array(sorted(v), dtype=np.int64) for k, v in parts.items()}
    _check(out, labels, classes, ("train", "val") if val_frac > 0 else ("train",))
    return out


def grouped_kfold(
    labels: np.ndarray, groups: list[str], classes: list[str], k: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """K grouped, class-stratified folds: fold i validates on part i and trains on the rest.

    Per class, groups (largest first, ties shuffled) go to the part with the fewest images
    of that class so far, which balances both class counts and group sizes.
    """
    rng = np.random.default_rng(seed)
    by_class, members = _groups_by_class(labels, groups)
    fold_of: dict[str, int] = {}
    for c in sorted(by_class):
        gs = list(by_class[c])
        rng.shuffle(gs)
        gs.sort(key=lambda g: -len(members[g]))  # stable: shuffled order breaks ties
        load = np.zeros(k)
        for g in gs:
            f = int(np.argmin(load + rng.random(k) * 1e-3))
            fold_of[g] = f
            load[f] += len(members[g])
    part = np.array([fold_of[g] for g in groups])
    folds = []
    for i in range(k):
        fold = {"train": np.flatnonzero(part != i), "val": np.flatnonzero(part == i)}
        try:
            _check(fold, labels, classes, ("train", "val"))
        except DataError as exc:
            raise DataError(f"fold {i} of {k}: {exc}") from None
        folds.append(fold)
    return folds


def limit_indices(labels: np.ndarray, groups: list[str], limit: int, seed: int) -> np.ndarray:
    """At most ~``limit`` images, whole groups, proportional per class but >= 3 groups per class when possible."""
    if limit <= 0 or limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    by_class, members = _groups_by_class(labels, groups)
    keep: list[int] = []
    for c in sorted(by_class):
        gs = list(by_class[c])
        rng.shuffle(gs)
        quota = max(round(limit * int((labels == c).sum()) / len(labels)), 1)
        taken = 0
        for j, g in enumerate(gs):
            if taken >= quota and j >= 3:
                break
            keep += members[g]
            taken += len(members[g])
    return np.array(sorted(keep), dtype=np.int64)
