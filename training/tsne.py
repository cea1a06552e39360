"""t-SNE of a model's penultimate-layer embedding on held-out images, coloured by label (a card plot).

van der Maaten & Hinton 2008, "Visualizing Data using t-SNE" (JMLR 9), with scikit-learn's ``TSNE``: the
128-dimensional ``embedding`` output (the input of the final linear layer) of every held-out image becomes a
point in 2-D such that near neighbours stay near. Positives and negatives that form separate clouds say the
features separate the finding; a positive inside the negative cloud is a case the model cannot tell apart.
t-SNE keeps neighbourhoods, not distances or cluster sizes, so the plot shows structure, not a metric; the
number the card reports beside it is the 5-nearest-neighbour label agreement in the 2-D map, and the same
in the original embedding (how much of the neighbourhood structure the map kept).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MAX_POINTS", "knn_agreement", "plot_tsne"]

MAX_POINTS = 2000
"""At most this many points (a seeded subsample beyond it): t-SNE is O(n log n), the plot stays readable."""
SEED = 0
NEIGHBOURS = 5


def knn_agreement(points: np.ndarray, labels: np.ndarray, k: int = NEIGHBOURS) -> float:
    """Fraction of each point's ``k`` nearest other points that share its label, averaged."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(points) - 1)
    if k < 1:
        return float("nan")
    index = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points, return_distance=False)
    return float(np.mean(labels[index[:, 1:]] == labels[:, None]))


def plot_tsne(
    embedding: np.ndarray, labels: np.ndarray, path: Path, title: str, label: str
) -> dict[str, Any]:
    """Write the 2-D t-SNE scatter PNG to ``path``; returns what the card records about it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from sklearn.manifold import TSNE

    x = np.asarray(embedding, dtype=np.float64).reshape(len(embedding), -1)
    y = np.asarray(labels).astype(int).ravel()
    if len(x) > MAX_POINTS:
        keep = np.sort(np.random.default_rng(SEED).choice(len(x), MAX_POINTS, replace=False))
        x, y = x[keep], y[keep]
    if len(x) < 5:
        raise ValueError(f"t-SNE needs at least 5 held-out images, got {len(x)}")
    perplexity = float(min(30.0, (len(x) - 1) / 3))
    scale = x.std(axis=0)
    standardised = (x - x.mean(axis=0)) / np.where(scale > 1e-9, scale, 1.0)
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=SEED).fit_transform(
        standardised
    )
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=100)
    for value, colour, name in ((0, "#1f77b4", f"no {label}"), (1, "#d62728", label)):
        chosen = y == value
        ax.scatter(
            points[chosen, 0], points[chosen, 1], s=8, c=colour, alpha=0.7, label=f"{name} ({chosen.sum()})"
        )
    ax.set_title(f"{title}: t-SNE of the held-out embedding", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {
        "plot": path.name,
        "points": len(x),
        "positives": int((y == 1).sum()),
        "perplexity": perplexity,
        "seed": SEED,
        "features": "standardised embedding output",
        "knn5_label_agreement_2d": knn_agreement(points, y),
        "knn5_label_agreement_embedding": knn_agreement(standardised, y),
    }
