"""REPrune's progressive training-pruning loop (Park et al. 2024), as a recovery method.

Training runs in two phases. In the first (``1 - hard`` of the steps), every prunable group is
re-selected ``reselections`` times, evenly spaced, with the kernel-coverage criterion
(:class:`autodfp.compress.selection.REPruneCoverage`) at a keep share that falls linearly from 1 to the
target; the channels not selected are switched off by zeroing their BN scaling factor and
shift. They still get gradients, so a channel switched off can regrow and win its place back at
the next re-selection. In the second phase the last selection (at the target) is fixed and
re-applied after every step, so the network learns to do without those channels; :meth:`finish`
then removes them physically. That removal is exact: a channel whose BN scale and shift are
zero outputs 0, which the ReLU after it passes on as 0 (every zoo model has ReLU or ReLU6 there).

Departures from the paper: selection uses the data-free kernel-coverage criterion alone (no
gradient or data term), and groups without a BN after their producer are left unpruned.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from autodfp.errors import AutoDFPError
from autodfp.recover.method import TrainingMethod
from autodfp.compress.graph import ChannelGraph
from autodfp.compress.selection import REPruneCoverage
from autodfp.strategy import kept_channels


class REPruneLoop(TrainingMethod):
    def __init__(self, model: nn.Module, example_input: torch.Tensor, keep: float, *,
                 hard: float = 0.25, reselections: int = 6):
        if not 0.0 < keep < 1.0:
            raise AutoDFPError(f"keep must be in (0, 1) for the REPrune loop, got {keep}")
        self.keep, self.hard, self.reselections = keep, hard, reselections
        self.graph = ChannelGraph(model, example_input)
        self.groups = {n: g for n, g in self.graph.groups.items() if g.bn is not None}
        if not self.groups:
            raise AutoDFPError("this model has no prunable channel group with a BN after its "
                               "producer: nothing for the REPrune loop to prune")
        self.selected: dict[str, list[int]] = {}
        self.reselected = 0
        self._criterion = REPruneCoverage()

    @functools.lru_cache(maxsize=4)
    def _schedule(self, total: int) -> dict[int, float]:
        """Step -> keep share of each re-selection; the last one, at the target, opens the
        hard phase (asked every step: cached)."""
        soft_end = int((1.0 - self.hard) * total)
        if soft_end < self.reselections:
            return {0: self.keep}
        return {soft_end * i // self.reselections: 1.0 - (1.0 - self.keep) * i / self.reselections
                for i in range(1, self.reselections + 1)}

    def before_step(self, step: int, total: int) -> None:
        share = self._schedule(total).get(step)
        if share is not None:
            self._reselect(share)
            self.reselected += 1
            self._switch_off()  # then left to regrow until the next re-selection

    def after_step(self, step: int, total: int) -> None:
        if step >= max(self._schedule(total)):  # the hard phase: the last selection holds
            self._switch_off()

    @torch.no_grad()
    def _reselect(self, share: float) -> None:
        for name, group in self.groups.items():
            n_keep = kept_channels(share, group.channels)
            self.selected[name] = self._criterion.select(group.producer.weight, n_keep).tolist()

    @torch.no_grad()
    def _switch_off(self) -> None:
        for name, kept in self.selected.items():
            bn = self.groups[name].bn
            off = torch.ones(bn.num_features, dtype=torch.bool, device=bn.weight.device)
            off[kept] = False
            bn.weight[off] = 0.0
            bn.bias[off] = 0.0

    @torch.no_grad()
    def finish(self) -> dict:
        """Remove the switched-off channels; returns a summary for the report."""
        if len(self.selected) != len(self.groups) or any(
                len(kept) != kept_channels(self.keep, self.groups[n].channels)
                for n, kept in self.selected.items()):
            self._reselect(self.keep)  # a run too short to reach the target ends on it
        self._switch_off()
        for name, kept in self.selected.items():
            self.graph.prune(name, torch.tensor(kept))
        return {"groups": len(self.selected), "reselections": self.reselected,
                "channels": {n: len(k) for n, k in self.selected.items()},
                "unpruned_without_bn": sorted(set(self.graph.groups) - set(self.groups))}

    def state_dict(self) -> dict:
        return {"selected": self.selected, "reselected": self.reselected}

    def load_state_dict(self, state: dict) -> None:
        self.selected = {str(n): [int(i) for i in kept] for n, kept in state["selected"].items()}
        self.reselected = int(state["reselected"])
