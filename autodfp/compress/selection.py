"""Selection criteria: which output channels of a group to keep.

A criterion is a small class with a ``name`` and ``select(weight, n_keep) -> keep indices``
(sorted, int64). Add one by subclassing :class:`Criterion` and registering it in
:data:`CRITERIA`.
"""

from __future__ import annotations

import numpy as np
import torch

from autodfp.errors import AutoDFPError
from autodfp.compress.graph import ChannelGroup
from autodfp.compress.reconstruction import BNStats, activation_moments
from autodfp.compress.similarity import cosine_similarity_matrix, dbscan_labels, filter_matrix


class Criterion:
    name = ""

    def select(self, weight: torch.Tensor, n_keep: int) -> torch.Tensor:
        raise NotImplementedError

    def select_group(self, group: ChannelGroup, n_keep: int) -> torch.Tensor:
        """What the pipeline calls; criteria that read more than the filters override it."""
        return self.select(group.selection_weight(), n_keep)


class _NormCriterion(Criterion):
    order = 1

    def select(self, weight: torch.Tensor, n_keep: int) -> torch.Tensor:
        scores = filter_matrix(weight)
        scores = np.linalg.norm(scores, ord=self.order, axis=1)
        return _top(scores, n_keep)


class L1Norm(_NormCriterion):
    """Keep the filters with the largest L1 norm (Li et al. 2017; Neuron Merging's default)."""

    name = "l1"
    order = 1


class L2Norm(_NormCriterion):
    name = "l2"
    order = 2


class DBSCANSimilarity(Criterion):
    """Keep cluster representatives and noise channels; prune the most redundant members.

    DBSCAN (see :mod:`autodfp.compress.similarity`) groups near-parallel filters. Each cluster's
    representative is its member with the largest L1 norm. Pruning order: non-representative
    cluster members first, most similar to their representative first; after those, the
    remaining channels by ascending L1 norm.
    """

    name = "similarity"

    def select(self, weight: torch.Tensor, n_keep: int) -> torch.Tensor:
        filters = filter_matrix(weight)
        l1 = np.abs(filters).sum(axis=1)
        similarity = cosine_similarity_matrix(filters)
        labels = dbscan_labels(1.0 - similarity)
        # Larger score = keep first. Redundant members score below every other channel.
        score = l1 / (l1.max() + 1e-12)
        for cluster in np.unique(labels[labels >= 0]):
            members = np.flatnonzero(labels == cluster)
            representative = members[np.argmax(l1[members])]
            for m in members[members != representative]:
                score[m] = -1.0 - similarity[m, representative]
        return _top(score, n_keep)


class REPruneCoverage(Criterion):
    """REPrune's selection (Park et al. 2024), data-free: kernel clusters, maximum coverage.

    For every input channel, the producer's kernels on that channel (one per filter) are
    clustered by Ward's method; every channel's dendrogram is cut at one layer-wide height, the
    one at which the channels have ``n_keep`` clusters on average. A filter *covers* the
    cluster its kernel falls in on each channel; filters are picked greedily for the most
    clusters not yet covered (the maximum-coverage problem's greedy (1 - 1/e) rule), ties and
    the picks after full coverage by L1 norm. Near-duplicate filters share their clusters, so
    after one is kept the others add nothing: the selection keeps diverse filters.
    (Ward linkage from SciPy, which also cuts a dendrogram at any height in one call.)
    """

    name = "reprune"

    def select(self, weight: torch.Tensor, n_keep: int) -> torch.Tensor:
        from scipy.cluster.hierarchy import fcluster, ward

        kernels = weight.detach().double().numpy()
        filters, channels = kernels.shape[:2]
        l1 = np.abs(kernels.reshape(filters, -1)).sum(axis=1)
        if n_keep >= filters or filters < 3:
            return _top(l1, n_keep)
        kernels = kernels.reshape(filters, channels, -1)
        trees = [ward(kernels[:, c, :]) for c in range(channels)]
        heights = np.sort(np.concatenate([tree[:, 2] for tree in trees]))
        merges = channels * (filters - n_keep)  # n_keep clusters per channel on average
        cut = heights[min(max(merges, 1), len(heights)) - 1]
        labels = np.stack([fcluster(tree, t=cut, criterion="distance") for tree in trees], 1)
        covers = [set(enumerate(labels[f])) for f in range(filters)]
        covered: set = set()
        chosen: list[int] = []
        for _ in range(n_keep):
            gain = np.array([-1.0 if f in chosen else len(covers[f] - covered)
                             for f in range(filters)])
            best = np.flatnonzero(gain == gain.max())
            pick = int(best[np.argmax(l1[best])])
            chosen.append(pick)
            covered |= covers[pick]
        return torch.from_numpy(np.sort(np.array(chosen))).long()


class Contribution(L1Norm):
    """Data-free, from the BN statistics: keep the channels whose removal would change the
    consumers' outputs most. A channel's activation under the training statistics is
    act(N(beta, gamma^2)) of the last BN before the consumers (the depthwise BN in an inverted
    residual block); its mean is compensated anyway (the reconstruction's shift, the depthwise
    means), so what is lost is its variance, reaching the consumers through their weights:
    score = Var[activation] * sum over consumers of ||W[:, c]||^2. A filter's own norm says
    nothing of this where a BN rescales it, and an expansion's L1 norm never sees the depthwise
    conv and BN after it. Groups without that BN, and residual-coupled ones, fall back to L1
    (``select``, inherited).
    """

    name = "contribution"

    def select_group(self, group: ChannelGroup, n_keep: int) -> torch.Tensor:
        scores = contribution_scores(group)
        if scores is None:
            return self.select(group.selection_weight(), n_keep)
        return _top(scores, n_keep)


def contribution_scores(group: ChannelGroup) -> np.ndarray | None:
    """Per channel: the variance it brings to the consumers' outputs (see :class:`Contribution`);
    None for a group without the BN that says it, or a residual-coupled one."""
    bn, act = ((group.depthwise_bn, group.depthwise_act) if group.depthwise
               else (group.bn, group.act))
    if bn is None or group.coupled:
        return None
    mu, sd = BNStats.of(bn).activation_gaussian()
    _, variance = activation_moments(mu, sd, act)
    return np.asarray(variance, dtype=float) * consumer_reach(group)


def consumer_reach(group: ChannelGroup) -> np.ndarray:
    """Per channel: the squared weights of every consumer reading it."""
    return sum(_input_energy(consumer.weight, group.channels)
               for consumer in group.consumers.values())


def _input_energy(weight: torch.Tensor, channels: int) -> np.ndarray:
    """Per input channel: the sum of squared weights reading it (every output, every tap; for
    a linear layer reading the flattened C x H x W map, every position of the channel)."""
    w = weight.detach().double()
    per_input = (w * w).sum(dim=[d for d in range(w.dim()) if d != 1])
    if per_input.numel() != channels:
        if w.dim() != 2 or per_input.numel() % channels:
            raise AutoDFPError(f"a consumer with {per_input.numel()} inputs reads a group of "
                               f"{channels} channels: not a flattened feature map")
        per_input = per_input.reshape(channels, -1).sum(1)  # flatten is channel-major
    return per_input.numpy()


def _top(scores: np.ndarray, n_keep: int) -> torch.Tensor:
    # A stable sort on the negated scores breaks ties by channel index: reproducible.
    order = np.argsort(-scores, kind="stable")[:n_keep]
    return torch.from_numpy(np.sort(order)).long()


CRITERIA: dict[str, type[Criterion]] = {c.name: c for c in (L1Norm, L2Norm, DBSCANSimilarity,
                                                             REPruneCoverage, Contribution)}


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise AutoDFPError(f"unknown selection criterion {name!r}; choose one of "
                           f"{', '.join(CRITERIA)}")
    return CRITERIA[name]()
