"""Budgets of a layer-by-layer search, and the projection that keeps them reachable (AMC's):
each group's wish is capped so that cutting every later group to the lowest keep (at the
fewest bits) still meets every budget.

A budget is ``fixed + sum_i unit[i] * share_i * (bits_i / 32 if it depends on bits)``, plus
``share @ pair @ share`` for the MACs of convs between two groups
(:class:`autodfp.measure.costmodel.MacsModel`), at most ``ratio x base``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch.nn as nn

from autodfp.compress.graph import ChannelGraph
from autodfp.errors import AutoDFPError
from autodfp.measure.costmodel import MacsModel
from autodfp.measure.metrics import FLOAT_BITS, conv_and_linear_layers, layer_macs, weight_bytes
from autodfp.settings import check_choice

BUDGETS = ("macs", "weight_bytes", "bitops")
ACTION_MODES = ("fair-share", "allocation", "absolute")


@dataclass(frozen=True)
class Budget:
    label: str
    setting: str
    """The setting that sets ``ratio`` (named in errors)."""
    ratio: float
    fixed: float
    unit: np.ndarray
    base: float
    uses_bits: bool
    pair: np.ndarray | None = None
    """MACs of convs between two groups, ``pair[i, j] * share_i * share_j`` (i < j)."""

    @property
    def limit(self) -> float:
        return self.ratio * self.base

    def cost(self, share: np.ndarray, bits: np.ndarray) -> float:
        factor = np.asarray(bits, dtype=float) / FLOAT_BITS if self.uses_bits else 1.0
        chained = share @ self.pair @ share if self.pair is not None else 0.0
        return float(self.fixed + (self.unit * share * factor).sum() + chained)

    def slope(self, t: int, share: np.ndarray, bits) -> float:
        """d cost / d share_t (the cost is linear in each share alone)."""
        factor = bits[t] / FLOAT_BITS if self.uses_bits else 1.0
        chained = (self.pair[t] @ share + self.pair[:, t] @ share
                   if self.pair is not None else 0.0)
        return float(self.unit[t] * factor + chained)

    def left(self, t: int, share: np.ndarray, bits: np.ndarray) -> float:
        """Budget not yet spent by the first ``t`` groups (later ones counted at zero)."""
        share, bits = share.copy(), np.asarray(bits, dtype=float).copy()
        share[t:] = 0.0
        return self.limit - self.cost(share, bits)


def macs_budget(macs: MacsModel, ratio: float) -> Budget:
    return Budget("MACs", "macs_budget", ratio, macs.fixed, macs.linear, macs.base,
                  uses_bits=False, pair=macs.pair)


def bits_budget(kind: str, ratio: float, fixed_bits: int, model: nn.Module, example_input,
                owned: list[list[str]]) -> Budget:
    """The weight-bytes or BitOPs budget of a mixed-precision search; ``owned``: per group, the
    layers whose bits its action sets (:func:`layers_owned_by_groups`); every other conv and
    linear layer stays at ``fixed_bits``."""
    layers = conv_and_linear_layers(model)
    unowned = [n for n in layers if n not in {name for names in owned for name in names}]
    fixed_share = fixed_bits / FLOAT_BITS
    if kind == "weight_bytes":
        size = {n: 4 * m.weight.numel() for n, m in layers.items()}  # float32 bytes
        base = float(weight_bytes(model))
        unit = np.array([sum(size[n] for n in names) for names in owned], dtype=float)
        # conservative: other parameters and buffers, and one float32 step per output
        # channel, at their unpruned size; one byte per layer for packing to whole bytes
        fixed = (base - sum(size.values()) + sum(size[n] * fixed_share for n in unowned)
                 + sum(4 * m.weight.shape[0] + 1 for m in layers.values()))
        return Budget("weight bytes", "quantize budget_ratio", ratio, fixed, unit, base, True)
    if kind != "bitops":
        raise AutoDFPError(f"a bits budget is weight_bytes or bitops, got {kind!r}")
    per_layer = layer_macs(model, example_input)
    per_bit = FLOAT_BITS * FLOAT_BITS  # float weights x float activations
    base = float(sum(per_layer.values()) * per_bit)
    unit = np.array([sum(per_layer[n] for n in names) * per_bit for names in owned], dtype=float)
    fixed = sum(per_layer[n] * per_bit * fixed_share for n in unowned)
    return Budget("BitOPs", "quantize budget_ratio", ratio, fixed, unit, base, True)


def layers_owned_by_groups(graph: ChannelGraph) -> list[list[str]]:
    """Per group (graph order): its producer and the consumers that read only its channels
    and produce no group of their own; their bits are the group's action."""
    producers = set(graph.groups)
    readers: dict[str, int] = {}
    for group in graph.groups.values():
        for name in group.consumers:
            readers[name] = readers.get(name, 0) + 1
    return [[name, *(c for c in group.consumers if c not in producers and readers[c] == 1)]
            for name, group in graph.groups.items()]


def lowest_channels(channels: np.ndarray, keep_lower: float) -> np.ndarray:
    """Fewest channels each group keeps at ``keep_lower`` (at least one)."""
    return np.maximum(1, np.ceil(keep_lower * np.asarray(channels) - 1e-9))


def check_reachable(channels: np.ndarray, budgets: list[Budget], keep_lower: float,
                    min_bits: int = FLOAT_BITS) -> None:
    """Every budget can be met with every group at the lowest keep and bits (one clear error
    naming the setting otherwise)."""
    channels = np.asarray(channels)
    share = lowest_channels(channels, keep_lower) / channels
    bits = np.full(len(share), min_bits)
    for budget in budgets:
        floor = budget.cost(share, bits)
        if floor > budget.limit * (1 + 1e-12):
            at_bits = f" and min_bits={min_bits}" if budget.uses_bits else ""
            raise AutoDFPError(
                f"{budget.label} budget {budget.ratio:.3f} ({budget.setting}) is "
                f"unreachable: with every group at keep_lower={keep_lower}"
                f"{at_bits} the model keeps {floor / budget.base:.3f} of its {budget.label}")


class BudgetProjector:
    """Turns each step's wish into kept channels (and bits) that keep every budget reachable.

    ``kept``/``bits`` arrays hold the decisions of groups ``0..t-1``; later entries are
    ignored. ``action_mode`` (:data:`ACTION_MODES`): ``fair-share`` maps a wish of 0.5 to the
    uniform share that spends the MACs budget over the groups left; ``allocation`` maps it to
    the ``prior`` share of the group (a per-group allocation, e.g. the data-free contribution
    allocation), scaled with every later group's prior so the groups left spend the MACs
    budget; both are piecewise linear through (0, keep_lower), (0.5, that share), (1, 1).
    ``absolute`` maps [0, 1] linearly (AMC)."""

    def __init__(self, channels: np.ndarray, budgets: list[Budget], macs: MacsModel,
                 keep_lower: float, action_mode: str = "fair-share",
                 bit_range: tuple[int, int] | None = None, prior: np.ndarray | None = None):
        check_choice(action_mode, ACTION_MODES, "action_mode")
        if (action_mode == "allocation") != (prior is not None):
            raise AutoDFPError("a prior allocation goes with action_mode 'allocation' only")
        self.channels = np.asarray(channels)
        self.budgets = budgets
        self.macs = macs
        self.keep_lower = keep_lower
        self.action_mode = action_mode
        self.prior = None if prior is None else np.asarray(prior, dtype=float)
        """Per-group keep share a neutral wish stands for (``allocation`` mode)."""
        self.bit_range = bit_range
        """(min_bits, max_bits) of a mixed-precision search; None: float weights."""
        self.lower = lowest_channels(self.channels, keep_lower)
        """Fewest channels each group keeps."""

    @property
    def min_bits(self) -> int:
        return self.bit_range[0] if self.bit_range else FLOAT_BITS

    @property
    def macs_ratio_limit(self) -> float:
        return self.budgets[0].ratio

    def keep(self, t: int, wish: float, kept: np.ndarray, bits: np.ndarray) -> int:
        """Kept channels of group ``t`` for the wish ``wish`` in [0, 1] at ``bits[t]``."""
        channels, low = self.channels[t], self.keep_lower
        if self.action_mode == "absolute":
            share = low + wish * (1.0 - low)
        else:
            neutral = (self.fair_share(t, kept) if self.action_mode == "fair-share"
                       else self.prior_share(t, kept))
            neutral = float(np.clip(neutral, low, 1.0))
            share = (low + 2 * wish * (neutral - low) if wish <= 0.5
                     else neutral + (2 * wish - 1) * (1 - neutral))
        most = self.most_channels(t, int(bits[t]), kept, bits)
        wanted = math.floor(share * channels + 0.5)
        return int(np.clip(wanted, self.lower[t], max(self.lower[t], min(channels, most))))

    def bits(self, t: int, wish: float, kept: np.ndarray, bits: np.ndarray) -> int:
        """Bits of group ``t``: the wish, lowered until its lowest keep fits every budget."""
        low, high = self.bit_range
        chosen = int(math.floor(low + wish * (high - low) + 0.5))
        while chosen > low and self.most_channels(t, chosen, kept, bits) < self.lower[t]:
            chosen -= 1
        return chosen

    def most_channels(self, t: int, bits_t: int, kept: np.ndarray, bits: np.ndarray) -> int:
        """Most channels group ``t`` can keep at ``bits_t`` with every budget still reachable
        by cutting every later group to the lowest keep at the fewest bits."""
        channels = int(self.channels[t])
        share = self.lower / self.channels
        share[:t] = kept[:t] / self.channels[:t]
        bits_now = np.full(len(share), self.min_bits)
        bits_now[:t] = bits[:t]
        most = channels
        for budget in self.budgets:
            share[t], bits_now[t] = 0.0, bits_t
            room = budget.limit - budget.cost(share, bits_now)
            unit = budget.slope(t, share, bits_now)
            if unit > 0:
                most = min(most, math.floor(room / unit * channels + 1e-9))
        return most

    def fair_share(self, t: int, kept: np.ndarray) -> float:
        """The uniform share of groups t.. that spends the MACs budget exactly (MACs are
        quadratic in a share common to those groups: solved from three evaluations)."""
        share = kept / self.channels

        def macs_at(x: float) -> float:
            share[t:] = x
            return self.macs.macs(share)

        c, half, one = macs_at(0.0), macs_at(0.5), macs_at(1.0)
        a2 = 2 * (one - 2 * half + c)  # MACs(x) = c + a1 x + a2 x^2
        a1 = one - c - a2
        need = self.macs_ratio_limit * self.macs.base - c
        if abs(a2) < 1e-9 * max(abs(a1), 1.0):
            return need / a1 if a1 > 0 else 1.0
        return (-a1 + math.sqrt(max(a1 * a1 + 4 * a2 * need, 0.0))) / (2 * a2)

    def prior_share(self, t: int, kept: np.ndarray, iterations: int = 60) -> float:
        """Group ``t``'s prior share times the scale ``x`` at which the groups ``t..`` (each at
        ``x`` times its prior, within [keep_lower, 1]) spend the MACs budget exactly; found by
        bisection (the MACs rise with ``x``). With the earlier groups at their priors, ``x``
        is 1 up to channel rounding."""
        share = kept / self.channels
        prior = self.prior[t:]
        lowest = self.lower[t:] / self.channels[t:]

        def macs_at(scale: float) -> float:
            share[t:] = np.clip(scale * prior, lowest, 1.0)
            return self.macs.macs(share)

        limit = self.macs_ratio_limit * self.macs.base
        low, high = 0.0, 1.0 / max(float(prior.min()), 1e-12)
        if macs_at(high) <= limit:
            return 1.0
        for _ in range(iterations):
            middle = (low + high) / 2
            if macs_at(middle) > limit:
                high = middle
            else:
                low = middle
        return low * float(prior[0])

    def fits(self, kept: np.ndarray, bits: np.ndarray) -> bool:
        return all(b.cost(kept / self.channels, bits) <= b.limit * (1 + 1e-12)
                   for b in self.budgets)

    def ratio(self, budget: Budget, kept: np.ndarray, bits: np.ndarray) -> float:
        """Share of ``budget``'s quantity that these decisions keep."""
        return float(budget.cost(kept / self.channels, bits) / budget.base)
