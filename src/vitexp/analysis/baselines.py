"""The classic baselines a ViT on a small dataset B must beat: logistic regression and an
RBF SVM on the raw pixels of the same split (scikit-learn defaults, no tuning).

They are fitted on train + val (all the labelled data the ViT saw, and more: the ViT trains
on train only) and scored on the same test split as the ViT, so "above the baselines" is a
conservative claim. A run fits them only on small in-memory sources (digits: about a
second); `python -m vitexp.baselines data=fashion_mnist` fits them on any data set (an RBF
SVM on Fashion-MNIST's 60,000 images takes minutes) and prints them beside the published
numbers, which a run on that data set prints too.
"""

from __future__ import annotations

import numpy as np

BASELINE_SOURCES = ("digits",)  # where fitting on raw pixels takes seconds
NAMES = {"logistic_regression": "logistic regression", "rbf_svm": "RBF SVM"}
# published test accuracies: Fashion-MNIST's README (its submitted-benchmarks table) and its
# scikit-learn benchmark (Xiao, Rasul, Vollgraf 2017, github.com/zalandoresearch/fashion-mnist)
PUBLISHED = {
    "fashion_mnist": {
        "human (crowd, no fashion expertise)": 0.835,
        "logistic regression (sklearn benchmark)": 0.842,
        "MLP 256-128-100": 0.883,
        "RBF SVC, C=10 (sklearn benchmark)": 0.897,
        "2 conv + pooling (TensorFlow tutorial)": 0.916,
        "HOG + SVM": 0.926,
        "2 conv + pooling + BN": 0.934,
        "ResNet18 (flips, shifts, rotations)": 0.949,
        "WRN-28-10 (crops, flips)": 0.959,
        "WRN40-4 (crops, flips)": 0.967,
    }
}


def pixels(split) -> tuple[np.ndarray, np.ndarray]:
    """(N, H*W) grey pixels in [0, 1] and (N,) labels of a map-style split of PIL images."""
    items = [split[i] for i in range(len(split))]
    x = np.stack([np.asarray(img.convert("L"), np.float32).reshape(-1) / 255 for img, _ in items])
    return x, np.array([label for _, label in items], dtype=np.int64)


def pixel_baselines(train, val, test) -> dict[str, float]:
    """Test accuracy of each baseline, fitted on train + val."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    (x1, y1), (x2, y2), (xt, yt) = pixels(train), pixels(val), pixels(test)
    x, y = np.concatenate([x1, x2]), np.concatenate([y1, y2])
    models = {"logistic_regression": LogisticRegression(max_iter=5000), "rbf_svm": SVC()}
    return {name: float(m.fit(x, y).score(xt, yt)) for name, m in models.items()}


def side_by_side(model_acc: float, baselines: dict[str, float], data: str) -> str:
    """One line: the run's test accuracy next to the baselines'."""
    others = ", ".join(f"{NAMES[k]} {v:.4f}" for k, v in baselines.items())
    return f"{data} test accuracy: this run {model_acc:.4f} | raw-pixel baselines: {others}"


def beside_published(model_acc: float, source: str) -> str | None:
    """One line: the run's test accuracy between the published numbers just below and
    above it (None when nothing is published for this source)."""
    table = PUBLISHED.get(source)
    if not table:
        return None
    below = [(a, n) for n, a in table.items() if a <= model_acc]
    above = [(a, n) for n, a in table.items() if a > model_acc]
    parts = [f"above {n} {a:.3f}" for a, n in below[-1:]] + [
        f"below {n} {a:.3f}" for a, n in above[:1]
    ]
    return f"{source} test accuracy {model_acc:.4f}: {', '.join(parts)} (published)"
