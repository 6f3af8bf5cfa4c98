"""Baselines in the search's own harness: same env, same budget, same reward set.

- :func:`uniform_search`: one keep ratio for every group, the largest the MACs budget allows,
  with each candidate reconstruction (and coefficient) scored on the reward set; the best wins.
- :func:`allocation_search`: the data-free ``contribution`` allocation (per-group keeps from
  the BN statistics, :mod:`autodfp.compress.allocation`) with the ``contribution`` selection,
  each candidate reconstruction scored on the reward set; what ``autodfp prune --macs`` does
  without any search.
- :func:`random_search`: uniformly random actions through the same projection, as many
  episodes as the SAC run had.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from autodfp.compress.allocation import allocate_keeps, default_selection
from autodfp.strategy import LayerAction, Strategy
from envs.autodfp_env import AutoDFPEnv

UNIFORM_CANDIDATES = (("neuron-merging", 1.0), ("autodfp", 0.25), ("autodfp", 0.5),
                      ("autodfp", 0.75), ("autodfp", 1.0), ("none", 1.0))


@dataclass
class SearchOutcome:
    name: str
    strategy: Strategy
    reward: float
    """Accuracy (fraction) on the reward split, the quantity every search maximises."""
    macs_ratio: float
    curve: list[float] = field(default_factory=list)
    """Best reward so far after each episode."""


def uniform_search(env: AutoDFPEnv) -> SearchOutcome:
    if env.quant is not None:
        return uniform_bits_search(env)
    keep = largest_uniform_keep(env)
    if keep is None:
        raise ValueError("no uniform keep ratio fits the budget")
    return best_reconstruction(env, f"uniform keep {keep:.3f}",
                               {name: keep for name in env.group_names})


def allocation_search(env: AutoDFPEnv) -> SearchOutcome:
    model, spec = env.base
    keeps = allocate_keeps(model, spec, env.config.macs_budget, coupled=env.config.coupled)
    return best_reconstruction(env, "contribution allocation", keeps,
                               select=default_selection("contribution"))


def best_reconstruction(env: AutoDFPEnv, label: str, keeps: dict[str, float],
                        **fields) -> SearchOutcome:
    """These per-group keeps with each of :data:`UNIFORM_CANDIDATES`' reconstructions (and
    ``fields`` of the strategy changed); the best reward wins."""
    best = None
    for method, coef in UNIFORM_CANDIDATES:
        layers = {name: LayerAction(keeps[name], coef) for name in env.group_names}
        strategy = Strategy(**{**env.strategy_fields(), "reconstruct": method, **fields},
                            layers=layers)
        reward = env.evaluate(strategy)
        if best is None or reward > best.reward:
            best = SearchOutcome(f"{label} ({method}, coef {coef:g})", strategy, reward,
                                 env.macs_ratio_of(strategy))
    return best


def largest_uniform_keep(env: AutoDFPEnv, resolution: int = 512,
                         bits: int | None = None) -> float | None:
    """The largest k on a 1/resolution grid whose uniform strategy (at ``bits`` on every layer
    a step decides, for a mixed-precision env) fits every budget; None if none does."""
    for step in range(resolution, 0, -1):
        if env.fits_budgets(_uniform(env, step / resolution, 1.0, bits)):
            return step / resolution
    return None


def uniform_bits_search(env: AutoDFPEnv) -> SearchOutcome:
    """Mixed-precision env: for every bits b in [min_bits, max_bits], the largest uniform keep
    that fits every budget at b bits on every layer a step decides (env's reconstruction,
    coefficient 0.5); the best reward wins."""
    best = None
    for bits in range(env.quant.min_bits, env.quant.max_bits + 1):
        keep = largest_uniform_keep(env, bits=bits)
        if keep is None:
            continue
        strategy = _uniform(env, keep, 0.5, bits)
        reward = env.evaluate(strategy)
        if best is None or reward > best.reward:
            best = SearchOutcome(f"uniform keep {keep:.3f}, {bits}-bit", strategy, reward,
                                 env.macs_ratio_of(strategy))
    if best is None:
        raise ValueError("no uniform keep ratio and bits fit the budget")
    return best


def _uniform(env: AutoDFPEnv, keep: float, coef: float, bits: int | None) -> Strategy:
    layers = {n: LayerAction(keep, coef) for n in env.group_names}
    if bits is not None:
        layers = env.with_bits(layers, [bits] * len(env.group_names))
    return Strategy(**env.strategy_fields(), layers=layers)


def random_search(env: AutoDFPEnv, episodes: int, seed: int = 0) -> SearchOutcome:
    rng = np.random.default_rng(seed)
    best, curve = None, []
    for _ in range(episodes):
        env.reset()
        terminated = False
        while not terminated:
            _, reward, terminated, _, info = env.step(rng.random(env.action_space.shape[0]))
        if best is None or reward > best.reward:
            best = SearchOutcome("random search", Strategy.from_dict(info["strategy"]), reward,
                                 info["macs_ratio"])
        curve.append(best.reward)
    best.curve = curve
    return best
