"""The lesion-clustered bootstrap: lesions are the unit, intervals cover the point estimate, and
correlated images of one lesion widen the interval (an image bootstrap would not)."""

from __future__ import annotations

import numpy as np

from export.bootstrap import bootstrap_ci, lesion_weights


def test_weights_draw_whole_lesions() -> None:
    groups = ["a", "a", "a", "b", "c"]
    w = lesion_weights(groups, 200, seed=1)
    assert w.shape == (200, 5)
    assert np.all(w[:, 0] == w[:, 1]) and np.all(w[:, 1] == w[:, 2])  # one lesion, one weight
    # As many lesions drawn as there are (3): the weights of one image per lesion sum to 3.
    assert np.all(w[:, [0, 3, 4]].sum(1) == 3)


def _problem(n_lesions: int, images_per_lesion: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    labels_l = rng.integers(0, 3, n_lesions)
    right_l = rng.random(n_lesions) < 0.7  # a lesion is right or wrong in all its images
    labels = np.repeat(labels_l, images_per_lesion)
    right = np.repeat(right_l, images_per_lesion)
    pred = np.where(right, labels, (labels + 1) % 3)
    probs = np.full((len(labels), 3), 0.1)
    probs[np.arange(len(labels)), pred] = 0.8
    groups = [f"L{i}" for i in np.repeat(np.arange(n_lesions), images_per_lesion)]
    return probs, labels, np.asarray(groups)


def test_interval_covers_the_estimate_and_names_every_class() -> None:
    probs, labels, groups = _problem(200, 1)
    positive = labels == 0
    scores = probs[:, 0]
    ci = bootstrap_ci(probs, labels, list(groups), ["x", "y", "z"], positive, scores, 0.5, n=300)
    recall = [((probs.argmax(1) == labels) & (labels == c)).sum() / (labels == c).sum() for c in range(3)]
    lo, hi = ci["balanced_accuracy"]
    assert lo < np.mean(recall) < hi and hi - lo < 0.3
    assert set(ci["recall"]) == {"x", "y", "z"}
    assert ci["auc_macro"][0] < ci["auc_macro"][1]
    s_lo, s_hi = ci["malignancy_sensitivity"]
    assert 0 <= s_lo <= s_hi <= 1


def test_correlated_images_widen_the_interval() -> None:
    """100 lesions x 5 identical images: the clustered interval is as wide as for 100 single images,
    far wider than if the 500 images were independent."""
    probs, labels, groups = _problem(100, 5)
    pos = labels == 0
    clustered = bootstrap_ci(probs, labels, list(groups), ["x", "y", "z"], pos, probs[:, 0], 0.5, n=400, auc=False)
    as_images = bootstrap_ci(probs, labels, [str(i) for i in range(len(labels))], ["x", "y", "z"], pos,
                             probs[:, 0], 0.5, n=400, auc=False)  # fmt: skip
    width = lambda c: c["balanced_accuracy"][1] - c["balanced_accuracy"][0]  # noqa: E731
    assert width(clustered) > 1.7 * width(as_images)
