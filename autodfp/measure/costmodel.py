"""MACs as an exact function of every prunable group's kept channels.

A conv's MACs are ``in/groups x out x kh x kw x H x W``. Its output channels belong to at most
one prunable group (or none) and so do its input channels, so the counted MACs of a pruned
model are

    MACs(s) = fixed + sum_i linear[i] * s_i + sum_(i<j) pair[i, j] * s_i * s_j

with ``s_i`` = kept / channels of group ``i``: a product ``s_i s_j`` wherever a conv consumes
group ``i`` and produces group ``j`` (VGG, MobileNetV2's expansion convs), linear terms for
depthwise convs, BNs and convs with one side fixed. The coefficients are measured with the
same counter as :func:`autodfp.measure.metrics.model_cost` on pruned copies (one per group and one per
chained pair), so the model reproduces that counter, not an approximation of it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from autodfp.errors import AutoDFPError
from autodfp.compress.graph import ChannelGraph
from autodfp.measure.metrics import count_macs
from autodfp.models import ModelSpec


@dataclass(frozen=True)
class MacsModel:
    """``macs(share) = fixed + linear @ share + share @ pair @ share`` (``pair`` strictly upper
    triangular)."""

    names: tuple[str, ...]
    channels: np.ndarray
    fixed: float
    linear: np.ndarray
    pair: np.ndarray
    base: float
    """MACs of the unpruned model."""

    @classmethod
    def measure(cls, model: nn.Module, spec: ModelSpec, *, coupled: bool = False,
                graph: ChannelGraph | None = None) -> "MacsModel":
        """Fit the coefficients on pruned copies of ``model`` (weights untouched), over the
        groups of ``graph`` (a :class:`ChannelGraph` of ``model`` or of a copy, not pruned;
        default: a new one with ``coupled``)."""
        if graph is None:
            graph = ChannelGraph(copy.deepcopy(model), spec.example_input(), coupled=coupled)
        names = tuple(graph.groups)
        channels = np.array([graph.groups[n].channels for n in names])
        half = np.maximum(1, channels // 2)
        probe_share = half / channels
        base = float(count_macs(model, spec))

        def saved(*indices: int) -> float:
            counts = {names[i]: int(half[i]) for i in indices}
            return base - counted_macs(model, spec, counts)

        index = {n: i for i, n in enumerate(names)}
        pairs = sorted({tuple(sorted((i, index[c])))
                        for i, n in enumerate(names) for c in graph.groups[n].consumers
                        if c in index})
        # a group's saving alone: (1 - h_i) * (linear_i + sum_j pair_ij), pairs counted at 1
        alone = np.array([saved(i) for i in range(len(names))])
        pair = np.zeros((len(names), len(names)))
        for i, j in pairs:
            both = saved(i, j)
            cut = (1 - probe_share[i]) * (1 - probe_share[j])
            pair[i, j] = (alone[i] + alone[j] - both) / cut
        touching = pair.sum(axis=0) + pair.sum(axis=1)
        linear = alone / (1 - probe_share) - touching
        fixed = base - linear.sum() - pair.sum()
        return cls(names, channels, float(fixed), linear, pair, base)

    def macs(self, share: np.ndarray) -> float:
        share = np.asarray(share, dtype=float)
        return float(self.fixed + self.linear @ share + share @ self.pair @ share)

    def macs_of_kept(self, kept: dict[str, int] | np.ndarray) -> float:
        if isinstance(kept, dict):
            kept = np.array([kept.get(n, c) for n, c in zip(self.names, self.channels)])
        return self.macs(np.asarray(kept) / self.channels)

    def slope(self, t: int, share: np.ndarray) -> float:
        """d MACs / d share_t at ``share`` (MACs are linear in each share alone)."""
        share = np.asarray(share, dtype=float)
        return float(self.linear[t] + self.pair[t] @ share + self.pair[:, t] @ share)


def counted_macs(model: nn.Module, spec: ModelSpec, counts: dict[str, int]) -> float:
    """MACs of a copy of ``model`` with the first ``counts[name]`` channels of each group kept."""
    pruned = copy.deepcopy(model)
    graph = ChannelGraph(pruned, spec.example_input(), coupled=True)  # names every group
    for name, count in counts.items():
        graph.prune(name, torch.arange(count))
    return float(count_macs(pruned, spec))


def uniform_keep_for_macs(model: nn.Module, spec: ModelSpec, base_macs: int, ratio: float,
                          resolution: int = 256, *, coupled: bool = False) -> float:
    """The largest keep share on a 1/``resolution`` grid whose uniform prune of ``model``
    (every prunable group) has at most ``ratio`` x ``base_macs`` MACs, counted on the pruned
    copy (so chained groups and depthwise convs count exactly)."""
    from autodfp.strategy import kept_channels

    graph = ChannelGraph(model, spec.example_input(), coupled=coupled)
    channels = {n: g.channels for n, g in graph.groups.items()}

    def macs_at(keep: float) -> float:
        return counted_macs(model, spec, {n: kept_channels(keep, c) for n, c in channels.items()})

    low, high = 0, resolution  # invariant: low fits (0 = nothing found), high may not
    if macs_at(1 / resolution) > ratio * base_macs:
        raise AutoDFPError(f"no uniform keep reaches {ratio:g} of the MACs: the layers that "
                           "cannot be pruned already cost more")
    low = 1
    while high - low > 1:
        mid = (low + high) // 2
        if macs_at(mid / resolution) <= ratio * base_macs:
            low = mid
        else:
            high = mid
    if macs_at(high / resolution) <= ratio * base_macs:
        low = high
    if low == resolution:
        raise AutoDFPError(f"the model already has at most {ratio:g} of the MACs; nothing to "
                           "prune")
    return low / resolution
