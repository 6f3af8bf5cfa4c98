"""Choose among a run's best episodes on a larger, disjoint set of training images.

The reward set is small so that the search stays fast (1,000 images: a standard error of about
1.4 points), and the top of 400 noisy rewards is biased upward (the winner's curse): the
episode with the best reward is often not the best network. ``autodfp export --rerank K``
re-scores the K best distinct episodes on ``validation_split`` (training images the reward set
does not hold) and exports the best of those. Test images are never used.
"""

from __future__ import annotations

import copy
import sys

from autodfp.errors import AutoDFPError
from autodfp.strategy import LayerAction, Strategy
from launch.search import load_best, load_episodes, load_run_config


def episode_strategy(template: Strategy, names: list[str], episode: dict) -> Strategy:
    """The strategy an episode evaluated: ``template``'s settings with the episode's per-layer
    keep and coefficient (``names``: the env's group order)."""
    if len(episode["keep"]) != len(names) or len(episode["coef"]) != len(names):
        raise AutoDFPError(f"episode {episode.get('episode')} has {len(episode['keep'])} "
                           f"layers; the run's strategy has {len(names)}")
    strategy = copy.deepcopy(template)
    bits = episode.get("bits") or [None] * len(names)
    strategy.layers = {n: LayerAction(k, c, b)
                       for n, k, c, b in zip(names, episode["keep"], episode["coef"], bits)}
    return strategy


def top_strategies(run_dir, k: int, trial=None) -> list[tuple[dict, Strategy]]:
    """The ``k`` distinct episodes with the best rewards, best first, with their strategies
    (``trial``: the trial of a sweep; the run's only trial otherwise)."""
    best = load_best(run_dir, trial)
    names = list(best["strategy"]["layers"])
    template = Strategy.from_dict(best["strategy"])
    chosen, seen = [], set()
    for episode in sorted(load_episodes(run_dir, trial), key=lambda e: -e["accuracy"]):
        key = (tuple(episode["keep"]), tuple(episode["coef"]), tuple(episode.get("bits") or ()))
        if key not in seen:
            seen.add(key)
            chosen.append((episode, episode_strategy(template, names, episode)))
        if len(chosen) == k:
            break
    return chosen


def rerank(run_dir, k: int, images: int, trial=None):
    """Score the top ``k`` episodes on ``images`` validation images; returns the chosen
    episode, its pruned model (:class:`autodfp.pipeline.PrunedModel`), and one row per
    candidate (episode, reward, validation accuracy)."""
    from autodfp.calibrate.refit import Calibrator
    from autodfp.data import validation_split
    from autodfp.measure.metrics import accuracy
    from autodfp.pipeline import apply_strategy, load_base

    env = load_run_config(run_dir).env_config()
    if env.data is not None:
        raise AutoDFPError("--rerank draws its validation images from the CIFAR-10 training "
                           "images; a search on --data user images has none apart: export "
                           "without --rerank")
    candidates = top_strategies(run_dir, k, trial)
    if not candidates:
        raise AutoDFPError(f"{run_dir} has no complete episode to choose from")
    validation = validation_split(images, env.reward_size, env.reward_seed)
    base = load_base(candidates[0][1])
    calibration = candidates[0][1].calibration
    calibrator = (Calibrator.for_model(*base, calibration, progress=True,
                                       coupled=candidates[0][1].coupled)
                  if calibration is not None else None)
    rows, chosen, best_score = [], None, -1.0
    for i, (episode, strategy) in enumerate(candidates, start=1):
        if calibrator is not None:
            strategy.calibration = calibrator.config  # with the user images' digest, if any
        pruned = apply_strategy(strategy, (copy.deepcopy(base[0]), base[1]),
                                calibrator=calibrator)
        score = accuracy(pruned.model, validation, pruned.spec)
        rows.append({"episode": episode.get("episode"), "reward": episode["accuracy"],
                     "validation_percent": score, "macs_ratio": episode["macs_ratio"]})
        print(f"  candidate {i}/{len(candidates)}: episode {rows[-1]['episode']}, reward "
              f"{episode['accuracy']:.4f}, validation ({len(validation)} training images) "
              f"{score:.2f} %", file=sys.stderr, flush=True)
        if score > best_score:  # the first of equal scores: the better reward
            chosen, best_score = (episode, pruned), score
    return chosen[0], chosen[1], rows
