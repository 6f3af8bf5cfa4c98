"""Channel similarity of one layer: cosine distances between its filters and DBSCAN clusters.

Used by the similarity selection criterion and, in the search, as the layer's state.

DBSCAN parameters (the papers do not give them): ``metric="precomputed"`` on cosine distance,
``min_samples=2`` (a pair of near-duplicate filters already is redundancy), and ``eps`` the
median over channels of the distance to the nearest other channel, but at least
:data:`DUPLICATE_DISTANCE`. The median makes roughly the closer half of the channels join
clusters whatever the layer's overall spread (trained ResNet-56 filters sit 0.4-0.8 apart in
cosine distance, so a fixed eps would see one giant cluster or none); the floor makes every
near-duplicate join, however many there are. The absolute level of similarity is reported
separately (``mean_nearest_similarity``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.cluster import DBSCAN

MIN_SAMPLES = 2
DUPLICATE_DISTANCE = 0.05


def filter_matrix(weight: torch.Tensor) -> np.ndarray:
    """Producer weight ``(C_out, ...)`` as a float64 ``(C_out, fan_in)`` matrix."""
    return weight.detach().reshape(weight.shape[0], -1).double().cpu().numpy()


def cosine_similarity_matrix(filters: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(filters, axis=1, keepdims=True)
    unit = filters / np.maximum(norms, 1e-12)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def nearest_neighbour_eps(distance: np.ndarray) -> float:
    off_diagonal = distance + np.diag(np.full(len(distance), np.inf))
    return float(max(np.median(off_diagonal.min(axis=1)), DUPLICATE_DISTANCE))


def dbscan_labels(distance: np.ndarray, eps: float | None = None) -> np.ndarray:
    """Cluster label per channel, -1 for noise."""
    eps = nearest_neighbour_eps(distance) if eps is None else eps
    clusterer = DBSCAN(eps=eps, min_samples=MIN_SAMPLES, metric="precomputed")
    return clusterer.fit_predict(np.maximum(distance, 0.0))


@dataclass(frozen=True)
class SimilarityStats:
    """Summary of a layer's channel redundancy; every field lies in [0, 1]."""

    cluster_share: float
    """Number of clusters / channels."""
    noise_share: float
    """Channels DBSCAN leaves unclustered / channels."""
    largest_cluster_share: float
    """Size of the largest cluster / channels."""
    mean_intra_similarity: float
    """Mean cosine similarity between members of the same cluster (0 when none)."""
    mean_nearest_similarity: float
    """Mean, over channels, of the cosine similarity to the most similar other channel."""
    redundant_share: float
    """Clustered channels that are not their cluster's first member / channels: how many a
    similarity criterion can prune before touching a distinct filter."""

    def as_list(self) -> list[float]:
        return [float(v) for v in asdict(self).values()]


def similarity_stats(weight: torch.Tensor) -> SimilarityStats:
    filters = filter_matrix(weight)
    n = len(filters)
    similarity = cosine_similarity_matrix(filters)
    labels = dbscan_labels(1.0 - similarity)
    clusters = [np.flatnonzero(labels == c) for c in np.unique(labels[labels >= 0])]
    intra = [similarity[np.ix_(c, c)][~np.eye(len(c), dtype=bool)].mean() for c in clusters]
    nearest = (similarity - 2.0 * np.eye(n)).max(axis=1)
    return SimilarityStats(
        cluster_share=len(clusters) / n,
        noise_share=float(np.mean(labels < 0)),
        largest_cluster_share=max((len(c) for c in clusters), default=0) / n,
        mean_intra_similarity=float(np.clip(np.mean(intra), 0, 1)) if intra else 0.0,
        mean_nearest_similarity=float(np.clip(nearest.mean(), 0, 1)),
        redundant_share=sum(len(c) - 1 for c in clusters) / n,
    )
