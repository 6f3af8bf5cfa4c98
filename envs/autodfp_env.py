"""The AutoDFP MDP: one episode prunes a model group by group; the reward is accuracy.

- Step ``t`` decides group ``t`` (forward order of :class:`autodfp.graph.ChannelGraph`).
- Action ``Box(2)`` in [0, 1]: ``a[0]`` maps to a keep ratio in ``[keep_lower, 1]``, projected
  (as AMC does) so that the MACs budget stays reachable if every later group is cut to
  ``keep_lower``; ``a[1]`` is the group's reconstruction coefficient.
- Observation (all in [0, 1]): static descriptors of the group (position, in/out channels,
  kernel, stride, MACs share), its DBSCAN similarity statistics (computed once per env), and
  dynamic features (MACs removed so far, MACs still prunable after this group, previous action).
- Reward: 0 on every step but the last, which gets the top-1 accuracy (a fraction) of the
  pruned, compensated and calibrated model on the reward split (training images). Identical
  strategies are evaluated once (cache).
- Calibration (``calibration``, default on): every candidate is calibrated as
  ``autodfp prune`` calibrates it (:mod:`autodfp.calibration`); the calibration images and the
  unpruned model's targets are made once per env, so an episode costs one calibration forward
  pass more than an uncalibrated one. ``a[1]`` then also sets each group's refit ridge
  (:func:`autodfp.calibration.ridge_for`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

from autodfp.calibration import Calibrator, CalibrationConfig
from autodfp.data import reward_split
from autodfp.errors import AutoDFPError
from autodfp.graph import ChannelGraph
from autodfp.metrics import accuracy, model_cost
from autodfp.pruning import apply_strategy, checkpoint_digest, load_base
from autodfp.settings import from_mapping
from autodfp.similarity import similarity_stats
from autodfp.strategy import LayerAction, Strategy


@dataclass(frozen=True)
class EnvConfig:
    model: str = "resnet56"
    """Registry name or pkg.module:factory."""
    checkpoint: str | None = None
    """Weights file; None for the shipped weights."""
    reward_size: int = 5000
    """Images in the reward split (class-stratified, from the training images)."""
    reward_seed: int = 0
    """Seed of the reward split."""
    macs_budget: float = 0.5
    """Largest allowed MACs of the pruned model, as a share of the original."""
    keep_lower: float = 0.2
    """Smallest keep ratio an action can choose."""
    action_mode: str = "fair-share"
    """How ``a[0]`` maps to [keep_lower, 1]: ``fair-share`` is piecewise linear through
    (0.5 -> the keep ratio that spends the remaining budget evenly over the remaining groups),
    so a neutral action is a uniform allocation; ``absolute`` is linear (AMC)."""
    select: str = "l1"
    """Selection criterion (autodfp.selection)."""
    reconstruct: str = "autodfp"
    """Reconstruction method (autodfp.reconstruction)."""
    calibration: dict | None = field(default_factory=dict)
    """Fields of :class:`autodfp.calibration.CalibrationConfig` ({} = its defaults: refit on
    256 synthetic images); None: no calibration (the closed-form compensation alone)."""
    device: str = "auto"
    """Where rewards are evaluated: ``auto`` takes the GPU this process was given, if any."""
    torch_threads: int = 0
    """Torch CPU threads in this process; 0 leaves torch's default (set per env runner)."""

    @classmethod
    def from_dict(cls, env_config: dict | None) -> "EnvConfig":
        config = from_mapping(cls, dict(env_config or {}), "env_config")
        if not 0.0 < config.macs_budget <= 1.0:
            raise AutoDFPError(f"macs_budget must be in (0, 1], got {config.macs_budget}")
        if not 0.0 < config.keep_lower <= 1.0:
            raise AutoDFPError(f"keep_lower must be in (0, 1], got {config.keep_lower}")
        config.calibration_config()  # validates
        if config.action_mode not in ("fair-share", "absolute"):
            raise AutoDFPError(f"action_mode must be 'fair-share' or 'absolute', "
                               f"got {config.action_mode!r}")
        return config

    def calibration_config(self) -> CalibrationConfig | None:
        if self.calibration is None:
            return None
        return CalibrationConfig.from_dict(self.calibration)


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AutoDFPError(f"device {device!r} asked for, but no GPU is visible to this process")
    return device


class AutoDFPEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, env_config: dict | None = None):
        self.config = EnvConfig.from_dict(env_config)
        if self.config.torch_threads > 0:
            import torch
            torch.set_num_threads(self.config.torch_threads)
        base_strategy = Strategy(self.config.model, {}, self.config.select,
                                 self.config.reconstruct, self.config.checkpoint,
                                 checkpoint_digest(self.config.model, self.config.checkpoint),
                                 calibration=self.config.calibration_config())
        self._template = base_strategy
        self._base_model, self._spec = load_base(base_strategy)
        self.device = _resolve_device(self.config.device)  # pruned copies are evaluated there
        self._images = reward_split(self.config.reward_size, self.config.reward_seed)
        self.group_names, self._channels, self._static = self._describe_groups()
        self._fixed_macs, self._group_macs = self._macs_model()
        self._check_budget_reachable()
        self._calibrator = None
        if base_strategy.calibration is not None:
            self._calibrator = Calibrator.for_model(self._base_model, self._spec,
                                                    base_strategy.calibration)
            base_strategy.calibration = self._calibrator.config  # with the user images' digest
        self._cache: dict[str, float] = {}
        self.last_timing: dict = {}
        self.action_space = gym.spaces.Box(0.0, 1.0, shape=(2,), dtype=np.float32)
        obs_dim = self._static.shape[1] + 4
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(obs_dim,), dtype=np.float32)

    # -- set-up --------------------------------------------------------------------------

    def _describe_groups(self):
        model = copy.deepcopy(self._base_model)
        graph = ChannelGraph(model, self._spec.example_input())
        names = list(graph.groups)
        if not names:
            raise AutoDFPError(f"{self.config.model} has no prunable channel groups")
        channels = np.array([graph.groups[n].channels for n in names])
        max_in = max(g.producer.in_channels for g in graph.groups.values())
        rows = []
        for i, name in enumerate(names):
            conv = graph.groups[name].producer
            rows.append([i / max(len(names) - 1, 1), conv.in_channels / max_in,
                         conv.out_channels / channels.max(), conv.kernel_size[0] / 7,
                         conv.stride[0] / 4, *similarity_stats(conv.weight).as_list()])
        return names, channels, np.clip(np.array(rows), 0.0, 1.0)

    def _macs_model(self) -> tuple[float, np.ndarray]:
        """MACs = fixed + sum_i group_macs[i] * keep_i (exact for groups that share no conv)."""
        base_macs = model_cost(self._base_model, self._spec).macs
        per_group = []
        for name, channels in zip(self.group_names, self._channels):
            half = Strategy(**{**self.strategy_fields(), "calibration": None,
                               "layers": {name: LayerAction(0.5)}})
            pruned = apply_strategy(half, (copy.deepcopy(self._base_model), self._spec))
            kept = LayerAction(0.5).kept_channels(int(channels)) / channels
            saved = base_macs - model_cost(pruned.model, self._spec).macs
            per_group.append(saved / (1.0 - kept))
        group_macs = np.array(per_group)
        self._base_macs = float(base_macs)
        return float(base_macs - group_macs.sum()), group_macs

    def strategy_fields(self) -> dict:
        t = self._template
        return {"model": t.model, "select": t.select, "reconstruct": t.reconstruct,
                "checkpoint": t.checkpoint, "checkpoint_sha256": t.checkpoint_sha256,
                "calibration": t.calibration}

    def _lower_channels(self) -> np.ndarray:
        return np.maximum(1, np.ceil(self.config.keep_lower * self._channels - 1e-9))

    def _check_budget_reachable(self) -> None:
        floor = self._fixed_macs + (self._group_macs * self._lower_channels() / self._channels).sum()
        if floor > self.config.macs_budget * self._base_macs:
            raise AutoDFPError(
                f"MACs budget {self.config.macs_budget:.3f} is unreachable: with every group at "
                f"keep_lower={self.config.keep_lower} the model keeps "
                f"{floor / self._base_macs:.3f} of its MACs")

    # -- gym API -------------------------------------------------------------------------

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        self._kept = np.zeros(len(self.group_names), dtype=np.int64)
        self._coefs = np.zeros(len(self.group_names))
        self._prev_action = np.zeros(2)
        return self._get_obs(), {}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64), 0.0, 1.0)
        self._kept[self._t] = self._project(action[0])
        self._coefs[self._t] = action[1]
        self._prev_action = np.array([self._kept[self._t] / self._channels[self._t], action[1]])
        self._t += 1
        if self._t < len(self.group_names):
            return self._get_obs(), 0.0, False, False, {}
        strategy = self.strategy()
        reward = self.evaluate(strategy)
        info = {"accuracy": reward, "macs_ratio": self.macs_ratio(),
                "strategy": strategy.to_dict(), "timing": dict(self.last_timing)}
        return self._get_obs(), reward, True, False, info

    def _get_obs(self) -> np.ndarray:
        t = min(self._t, len(self.group_names) - 1)
        done = self._kept[: self._t]
        removed = (self._group_macs[: self._t] * (1 - done / self._channels[: self._t])).sum()
        later = self._group_macs[t + 1:].sum() if self._t < len(self.group_names) else 0.0
        dynamic = [removed / self._base_macs, later / self._base_macs, *self._prev_action]
        obs = np.concatenate([self._static[t], dynamic])
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    # -- actions, strategy, reward -------------------------------------------------------

    def _project(self, a: float) -> int:
        """Kept channels for group t: the wish ``a``, capped so the budget stays reachable."""
        t, channels = self._t, self._channels[self._t]
        lower = self._lower_channels()
        low = self.config.keep_lower
        spent = self._fixed_macs + (self._group_macs[:t] * self._kept[:t] / self._channels[:t]).sum()
        left = self.config.macs_budget * self._base_macs - spent
        if self.config.action_mode == "absolute":
            wish = low + a * (1.0 - low)
        else:
            fair = float(np.clip(left / self._group_macs[t:].sum(), low, 1.0))
            wish = low + 2 * a * (fair - low) if a <= 0.5 else fair + (2 * a - 1) * (1 - fair)
        reserve = (self._group_macs[t + 1:] * lower[t + 1:] / self._channels[t + 1:]).sum()
        room = left - reserve
        most = math.floor(room / self._group_macs[t] * channels + 1e-9) if self._group_macs[t] else channels
        wanted = math.floor(wish * channels + 0.5)
        return int(np.clip(wanted, lower[t], max(lower[t], min(channels, most))))

    def macs_ratio(self) -> float:
        return self._macs_ratio(self._kept)

    def macs_ratio_of(self, strategy: Strategy) -> float:
        """MACs share of a strategy under this env's cost model (no pruning done)."""
        kept = [strategy.layers[n].kept_channels(int(c)) if n in strategy.layers else c
                for n, c in zip(self.group_names, self._channels)]
        return self._macs_ratio(np.array(kept))

    def _macs_ratio(self, kept: np.ndarray) -> float:
        share = kept / self._channels
        return float((self._fixed_macs + (self._group_macs * share).sum()) / self._base_macs)

    def strategy(self) -> Strategy:
        layers = {name: LayerAction(float(k / c), float(coef))
                  for name, k, c, coef in zip(self.group_names, self._kept, self._channels, self._coefs)}
        return Strategy(**self.strategy_fields(), layers=layers)

    def evaluate(self, strategy: Strategy) -> float:
        """Accuracy (fraction) of ``strategy`` on the reward split, cached."""
        key = strategy.to_json()
        self.last_timing = {"surgery_s": 0.0, "calibrate_s": 0.0, "eval_s": 0.0, "cached": key in self._cache}
        if key not in self._cache:
            start = time.perf_counter()
            pruned = apply_strategy(strategy, (copy.deepcopy(self._base_model), self._spec),
                                    calibrator=self._calibrator)
            middle = time.perf_counter()
            self._cache[key] = accuracy(pruned.model, self._images, self._spec,
                                        device=self.device) / 100.0
            self.last_timing.update(surgery_s=middle - start - pruned.calibrate_s,
                                    calibrate_s=pruned.calibrate_s,
                                    eval_s=time.perf_counter() - middle)
        return self._cache[key]
