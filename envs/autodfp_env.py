"""The AutoDFP MDP: one episode prunes a model group by group; the reward is accuracy.

- Step ``t`` decides group ``t`` (forward order of :class:`autodfp.compress.graph.ChannelGraph`).
- Action ``Box(2)`` in [0, 1]: ``a[0]`` maps to a keep ratio in ``[keep_lower, 1]`` (by default
  0.5 is the group's keep under the data-free contribution allocation, ``action_mode``), projected
  (as AMC does) so that the MACs budget stays reachable if every later group is cut to
  ``keep_lower``; ``a[1]`` is the group's reconstruction coefficient.
- Observation (all in [0, 1]): static descriptors of the group (position, in/out channels,
  kernel, stride, MACs share), its DBSCAN similarity statistics (computed once per env), and
  dynamic features (MACs removed so far, MACs still prunable after this group, previous action).
- Mixed precision (``quantize`` set): the action gains ``a[2]``, mapped to weight bits in
  ``[min_bits, max_bits]`` for the group's producer and the layers that read only its channels
  (the other conv/linear layers stay at ``fixed_bits``); the budget is on ``macs``,
  ``weight_bytes`` or ``bitops`` (:class:`QuantSearch`), every budget projected as above (bits
  first, then the keep ratio); the observation gains the previous bits and the budget left.
- Reward (:mod:`envs.reward`): 0 on every step but the last, which gets the top-1 accuracy (a
  fraction) of the pruned, compensated and calibrated model on the reward split (training
  images), or with ``reward: synthetic`` how close its outputs stay to the unpruned model's
  (``exp(-KL)``) on held-out synthetic images (no labelled image is read). Identical
  strategies are evaluated once (cache); racing (``race_images``) scores a candidate that
  cannot reach the best rewards so far on a seeded subset of the images only.
- Calibration (``calibration``, default on): every candidate is calibrated as
  ``autodfp prune`` calibrates it (:mod:`autodfp.calibrate.refit`); the calibration images and the
  unpruned model's targets are made once per env, so an episode costs one calibration forward
  pass more than an uncalibrated one. ``a[1]`` then also sets each group's refit ridge
  (:func:`autodfp.calibrate.refit.ridge_for`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch.nn as nn

from autodfp.calibrate.refit import Calibrator, CalibrationConfig, default_calibration
from autodfp.calibrate.synthetic import default_config
from autodfp.compress.allocation import contribution_allocation
from autodfp.compress.graph import ChannelGraph
from autodfp.compress.similarity import similarity_stats
from autodfp.data import ImageSet, load_split, load_user_data, reward_split, split_user_data
from autodfp.errors import AutoDFPError
from autodfp.measure.budget import (ACTION_MODES, BUDGETS, Budget, BudgetProjector,
                                    bits_budget, check_reachable, layers_owned_by_groups,
                                    macs_budget)
from autodfp.measure.costmodel import MacsModel
from autodfp.measure.fidelity import agreement_set
from autodfp.measure.metrics import FLOAT_BITS, check_labelled_images, conv_and_linear_layers
from autodfp.measure.report import REPORT_SPLITS
from autodfp.models import InputSpec, ModelSpec
from autodfp.pipeline import checkpoint_digest, default_quant_images, load_base
from autodfp.quantize.weights import QuantConfig, check_bits
from autodfp.settings import check_choice, from_mapping
from autodfp.strategy import LayerAction, Strategy
from envs.reward import Racing, RewardEvaluator

REWARD_OBJECTIVES = {"labelled": "accuracy", "synthetic": "kl"}
"""Each ``reward`` setting and what :class:`envs.reward.RewardEvaluator` measures for it."""
REWARDS = tuple(REWARD_OBJECTIVES)
REWARD_NAMES = {"labelled": "reward-set accuracy", "synthetic": "synthetic reward exp(-KL)"}
"""How logs, plots and the CLI name each ``reward`` setting's value."""


@dataclass(frozen=True)
class QuantSearch:
    """Mixed-precision search settings (``EnvConfig.quantize``)."""

    budget: str = "weight_bytes"
    """What ``budget_ratio`` bounds: ``macs``, ``weight_bytes`` (weight storage, see
    :func:`autodfp.quantize.weights.weight_bytes`) or ``bitops`` (MACs x weight bits x 32)."""
    budget_ratio: float = 0.1
    """Largest allowed share of the float model's cost (``macs``: ``macs_budget`` is used)."""
    min_bits: int = 2
    """Fewest weight bits an action can choose."""
    max_bits: int = 8
    """Most weight bits an action can choose."""
    fixed_bits: int = 8
    """Bits of the conv/linear layers no step decides (e.g. the stem conv and the classifier)."""
    compensate: str = "calibrate"
    """Quantization compensation (:class:`autodfp.quantize.weights.QuantConfig`)."""

    def __post_init__(self):
        check_choice(self.budget, BUDGETS, "quantize budget")
        for name in ("min_bits", "max_bits", "fixed_bits"):
            check_bits(getattr(self, name), f"quantize {name}")
        if self.min_bits > self.max_bits:
            raise AutoDFPError(f"quantize min_bits {self.min_bits} exceeds max_bits "
                               f"{self.max_bits}")
        if not 0.0 < self.budget_ratio <= 1.0:
            raise AutoDFPError(f"quantize budget_ratio must be in (0, 1], got {self.budget_ratio}")
        QuantConfig(compensate=self.compensate)


@dataclass(frozen=True)
class EnvConfig:
    model: str = "resnet56"
    """Registry name or pkg.module:factory."""
    checkpoint: str | None = None
    """Weights file; None for the shipped weights (or what a pkg.module:factory returns)."""
    input_size: list | None = None
    """Model input [C, H, W]; None: what the model says of itself (autodfp.models)."""
    mean: list | None = None
    """Per-channel mean on [0, 1] RGB; None: the model's own."""
    std: list | None = None
    """Per-channel std on [0, 1] RGB; None: the model's own."""
    coupled: bool = False
    """Also decide residual-coupled groups (the same channels cut from every layer of an add;
    :class:`autodfp.compress.graph.ChannelGraph`)."""
    reward: str = "labelled"
    """``labelled``: top-1 accuracy on ``reward_size`` labelled training images (CIFAR-10's,
    or from ``data``). ``synthetic``: how close the pruned model's outputs stay to the
    unpruned model's, ``exp(-mean KL)``, on ``synthetic_reward_images`` held-out synthetic
    images (:func:`autodfp.measure.fidelity.agreement_set`; :data:`envs.reward.OBJECTIVES`),
    so a search needs the weights alone. Racing does not apply to it."""
    synthetic_reward_images: int = 256
    """Synthetic images of a ``synthetic`` reward (made once, then cached)."""
    reward_size: int = 5000
    """Images in the reward split (class-stratified, from the training images; with ``data``,
    a seeded random share of it, the rest being the test images)."""
    data: str | None = None
    """Labelled user images (ImageFolder tree, a .tar of one, or .npz) instead of CIFAR-10:
    the reward and the test images are both drawn from them, disjoint."""
    class_index: str | None = None
    """With ``data``: JSON mapping class folders to model output indices."""
    crop_ratio: float = 0.875
    """With ``data``: center crop share after resizing (autodfp.data.load_user_data)."""
    reward_seed: int = 0
    """Seed of the reward split."""
    macs_budget: float = 0.5
    """Largest allowed MACs of the pruned model, as a share of the original."""
    keep_lower: float = 0.2
    """Smallest keep ratio an action can choose."""
    action_mode: str = "allocation"
    """How ``a[0]`` maps to [keep_lower, 1]: ``allocation`` is piecewise linear through
    (0.5 -> the group's keep under the data-free contribution allocation, scaled with the
    later groups' to spend the remaining budget), so a neutral action is that allocation
    (:func:`autodfp.compress.allocation.contribution_allocation`, computed once per env);
    ``fair-share`` is piecewise linear through (0.5 -> the keep ratio that spends the
    remaining budget evenly over the remaining groups), so a neutral action is a uniform
    allocation; ``absolute`` is linear (AMC). Measured in docs/search.md."""
    select: str = "l1"
    """Selection criterion (autodfp.compress.selection)."""
    reconstruct: str = "autodfp"
    """Reconstruction method (autodfp.compress.reconstruction)."""
    calibration: dict | None = field(default_factory=dict)
    """Fields of :class:`autodfp.calibrate.refit.CalibrationConfig` ({} = its defaults: refit on
    256 synthetic images, made by the recipe for the model's input size unless ``synth`` is
    given); None: no calibration (the closed-form compensation alone)."""
    device: str = "auto"
    """Where rewards are evaluated: ``auto`` takes the GPU this process was given, if any.
    The reward images are normalised once and stay on the device."""
    channels_last: bool = True
    """Evaluate in channels-last memory layout (oneDNN's and cuDNN's fast path; on 2 CPU
    cores 1.2x faster on ResNet-56, the same predictions)."""
    fold_batchnorm: bool = True
    """Score each candidate with its BatchNorms folded into the convs before them (the same
    function up to rounding; on 2 CPU cores 1.1x faster on ResNet-56)."""
    autocast: bool = False
    """Evaluate under autocast: float16 on a GPU, bfloat16 on a CPU (check the reward against
    float32 first: ``bench/search.py --throughput-only`` prints both)."""
    race_images: int = 250
    """Racing (multi-fidelity rewards, :class:`envs.reward.Racing`): score this many reward
    images first and the rest only if the candidate can still reach the ``race_top_k`` best
    rewards so far; 0 scores every image of every candidate."""
    race_top_k: int = 10
    """How many of the best full rewards a candidate is raced against."""
    eval_batch_size: int = 0
    """Images per forward pass when scoring; 0: the device's measured fastest
    (:func:`autodfp.measure.metrics.cpu_eval_batch_size` on a CPU)."""
    torch_threads: int = 0
    """Torch CPU threads in this process; 0 leaves torch's default (set per env runner); -1:
    every CPU this process may run on (the in-process runner: Ray starts a trial with one
    thread, which halved its episodes/s on 2 cores)."""
    quantize: dict | None = None
    """Fields of :class:`QuantSearch` ({} = its defaults) for a joint pruning + mixed-precision
    search; None: float weights, the MACs budget alone."""

    @classmethod
    def from_dict(cls, env_config: dict | None) -> "EnvConfig":
        config = from_mapping(cls, dict(env_config or {}), "env_config")
        if not 0.0 < config.macs_budget <= 1.0:
            raise AutoDFPError(f"macs_budget must be in (0, 1], got {config.macs_budget}")
        if not 0.0 < config.keep_lower <= 1.0:
            raise AutoDFPError(f"keep_lower must be in (0, 1], got {config.keep_lower}")
        config.calibration_config()  # validates
        config.input_spec()
        config.quant_search()
        check_choice(config.reward, REWARDS, "reward")
        if not isinstance(config.torch_threads, int) or config.torch_threads < -1:
            raise AutoDFPError(f"torch_threads must be an integer >= -1, got "
                               f"{config.torch_threads!r}")
        for name, least in (("race_images", 0), ("race_top_k", 1), ("eval_batch_size", 0)):
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise AutoDFPError(f"{name} must be an integer >= {least}, got {value!r}")
        check_choice(config.action_mode, ACTION_MODES, "action_mode")
        return config

    def racing(self) -> Racing | None:
        return Racing(self.race_images, self.race_top_k) if self.race_images else None

    def input_spec(self) -> InputSpec | None:
        given = {k: v for k, v in (("input_size", self.input_size), ("mean", self.mean),
                                   ("std", self.std)) if v is not None}
        return InputSpec.from_dict(given) if given else None

    def quant_search(self) -> QuantSearch | None:
        if self.quantize is None:
            return None
        return from_mapping(QuantSearch, self.quantize, "quantize")

    def calibration_config(self, input_size: tuple[int, ...] | None = None
                           ) -> CalibrationConfig | None:
        """The calibration; with ``input_size``, the fields not set in ``calibration`` follow
        the default for that input size (:func:`default_calibration`)."""
        if self.calibration is None:
            return None
        config = CalibrationConfig.from_dict(self.calibration)  # bad fields fail here
        if input_size is None:
            return config
        return default_calibration(input_size,
                                   **{name: getattr(config, name) for name in self.calibration})


def search_images(config: EnvConfig, spec) -> tuple[ImageSet, list[ImageSet]]:
    """A search's reward images and its test images: from ``config.data`` (disjoint, seeded),
    or the CIFAR-10 training images (reward) and the two test splits."""
    if config.data is None:
        return (reward_split(config.reward_size, config.reward_seed),
                [load_split(name) for name in REPORT_SPLITS])
    images = load_user_data(config.data, input_size=spec.input_size,
                            crop_ratio=config.crop_ratio, class_index=config.class_index,
                            progress=True)
    reward, test = split_user_data(images, config.reward_size, config.reward_seed)
    return reward, [test]


@dataclass
class EnvAssets:
    """What an env loads before its first episode: the unpruned model, the reward images and
    the calibration set. Loaded once where the search starts and handed to every env runner
    (through the Ray object store, :mod:`launch.search`), so that a worker needs neither the
    weights file nor the images."""

    template: Strategy
    """The strategy fields every episode shares (model, checkpoint digest, calibration...)."""
    model: object
    """The unpruned model (a torch module)."""
    spec: object
    images: ImageSet
    """The reward split."""
    calibrator: Calibrator | None
    quant_images: object | None

    @classmethod
    def load(cls, config: EnvConfig) -> "EnvAssets":
        template = Strategy(config.model, {}, config.select, config.reconstruct,
                            config.checkpoint, checkpoint_digest(config.model, config.checkpoint),
                            input=config.input_spec(), coupled=config.coupled)
        model, spec = load_base(template)
        template.calibration = config.calibration_config(spec.input_size)
        if config.reward == "synthetic":
            synth = (template.calibration.synth if template.calibration is not None
                     and template.calibration.images == "synthetic"
                     else default_config(spec.input_size))
            images = agreement_set(model, spec, synth, config.synthetic_reward_images)
        else:
            images = search_images(config, spec)[0]
            check_labelled_images(images, model, spec)  # before any search
        calibrator = None
        if template.calibration is not None:
            calibrator = Calibrator.for_model(model, spec, template.calibration,
                                              coupled=config.coupled)
            template.calibration = calibrator.config  # with the user images' digest
        quant = config.quant_search()
        quant_images = None
        if quant and calibrator is None and quant.compensate.startswith("calibrate"):
            quant_images = default_quant_images(model, spec)
        return cls(template, model, spec, images, calibrator, quant_images)

    def portable(self) -> "EnvAssets":
        """The same, with the reward images in memory (a memory-mapped cache is a file on
        this machine only)."""
        images = self.images
        if not isinstance(images.x, np.ndarray) or isinstance(images.x, np.memmap):
            images = ImageSet(images.name, np.array(images.x[:]), np.asarray(images.y),
                              images.num_classes)
        return dataclasses.replace(self, images=images)


class AutoDFPEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, env_config: dict | None = None, assets: EnvAssets | None = None):
        self.config = EnvConfig.from_dict(env_config)
        if self.config.torch_threads:
            import os

            import torch
            torch.set_num_threads(self.config.torch_threads if self.config.torch_threads > 0
                                  else len(os.sched_getaffinity(0)))
        assets = assets or EnvAssets.load(self.config)
        self._template = assets.template
        self._base_model, self._spec = assets.model, assets.spec
        graph = ChannelGraph(copy.deepcopy(self._base_model), self._spec.example_input(),
                             coupled=self.config.coupled)  # traced once per env
        self.group_names, self._channels, self._static = self._describe_groups(graph)
        self._owned = layers_owned_by_groups(graph)
        self._macs = MacsModel.measure(self._base_model, self._spec, graph=graph)
        self.quant = self.config.quant_search()
        budgets = self._budgets()
        bit_range = (self.quant.min_bits, self.quant.max_bits) if self.quant else None
        check_reachable(self._channels, budgets, self.config.keep_lower,
                        bit_range[0] if bit_range else FLOAT_BITS)  # before the allocation
        self.projector = BudgetProjector(self._channels, budgets, self._macs,
                                         self.config.keep_lower, self.config.action_mode,
                                         bit_range, prior=self._prior(graph))
        self.reward = RewardEvaluator(self._base_model, self._spec, assets.images,
                                      assets.calibrator, assets.quant_images,
                                      device=self.config.device,
                                      channels_last=self.config.channels_last,
                                      autocast=self.config.autocast,
                                      fold_batchnorm=self.config.fold_batchnorm,
                                      racing=self.config.racing(),
                                      batch_size=self.config.eval_batch_size or None,
                                      objective=REWARD_OBJECTIVES[self.config.reward])
        self.action_space = gym.spaces.Box(0.0, 1.0, shape=(3 if self.quant else 2,),
                                           dtype=np.float32)
        obs_dim = self._static.shape[1] + (6 if self.quant else 4)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(obs_dim,), dtype=np.float32)

    # -- set-up --------------------------------------------------------------------------

    def _describe_groups(self, graph: ChannelGraph):
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

    def _prior(self, graph: ChannelGraph) -> np.ndarray | None:
        """Per-group keep share of the neutral action in ``allocation`` mode, else None."""
        if self.config.action_mode != "allocation":
            return None
        if self._macs.macs(np.ones(len(self.group_names))) <= (self.config.macs_budget
                                                              * self._macs.base):
            return np.ones(len(self.group_names))  # a MACs budget that cuts nothing
        keeps = contribution_allocation(graph, self._macs, self.config.macs_budget,
                                        self.config.keep_lower)
        return np.array([keeps[name] for name in self.group_names])

    @property
    def base(self) -> tuple[nn.Module, ModelSpec]:
        """The unpruned model (never changed) and how it is fed."""
        return self._base_model, self._spec

    def strategy_fields(self) -> dict:
        t = self._template
        fields = {"model": t.model, "select": t.select, "reconstruct": t.reconstruct,
                  "checkpoint": t.checkpoint, "checkpoint_sha256": t.checkpoint_sha256,
                  "calibration": t.calibration, "input": t.input, "coupled": t.coupled}
        if self.config.quantize is not None:
            fields["quantization"] = QuantConfig(compensate=self.config.quant_search().compensate)
        return fields

    def _budgets(self) -> list[Budget]:
        """The MACs budget, and with ``quantize`` the weight-bytes or BitOPs budget."""
        budgets = [macs_budget(self._macs, self.config.macs_budget)]
        if self.quant is not None and self.quant.budget != "macs":
            budgets.append(bits_budget(self.quant.budget, self.quant.budget_ratio,
                                       self.quant.fixed_bits, self._base_model,
                                       self._spec.example_input(), self._owned))
        return budgets

    # -- gym API -------------------------------------------------------------------------

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        self._kept = np.zeros(len(self.group_names), dtype=np.int64)
        self._coefs = np.zeros(len(self.group_names))
        self._bits = np.full(len(self.group_names), FLOAT_BITS)
        self._prev_action = np.zeros(self.action_space.shape[0])
        return self._get_obs(), {}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64), 0.0, 1.0)
        t = self._t
        if self.quant:
            self._bits[t] = self.projector.bits(t, action[2], self._kept, self._bits)
        self._kept[t] = self.projector.keep(t, action[0], self._kept, self._bits)
        self._coefs[t] = action[1]
        self._prev_action = np.array([self._kept[t] / self._channels[t], action[1]])
        if self.quant:
            span = max(self.quant.max_bits - self.quant.min_bits, 1)
            self._prev_action = np.append(self._prev_action,
                                          (self._bits[t] - self.quant.min_bits) / span)
        self._t += 1
        if self._t < len(self.group_names):
            return self._get_obs(), 0.0, False, False, {}
        strategy = self.strategy()
        reward = self.evaluate(strategy)
        # strategy_json, a string, is what crosses a vector env: gymnasium's DictInfoToList
        # (RLlib's env runners) drops every nested key that starts with "_" as a mask, which
        # takes EfficientNet's layer names (_blocks.0...) out of the strategy dict.
        info = {"accuracy": reward, "macs_ratio": self.macs_ratio(),
                "strategy": strategy.to_dict(), "strategy_json": strategy.to_json(),
                "timing": dict(self.last_timing)}
        if self.quant:
            info["budget_ratio"] = self.budget_ratio()
        return self._get_obs(), reward, True, False, info

    def _get_obs(self) -> np.ndarray:
        t = min(self._t, len(self.group_names) - 1)
        done = self._kept[: self._t]
        removed = (self._macs.linear[: self._t] * (1 - done / self._channels[: self._t])).sum()
        later = self._macs.linear[t + 1:].sum() if self._t < len(self.group_names) else 0.0
        dynamic = [removed / self._macs.base, later / self._macs.base, *self._prev_action]
        if self.quant:
            budget = self.projector.budgets[-1]
            dynamic.append(budget.left(self._t, self._kept / self._channels, self._bits)
                           / budget.base)
        obs = np.concatenate([self._static[t], dynamic])
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    # -- actions, strategy, reward -------------------------------------------------------

    def macs_ratio(self) -> float:
        return self._macs_ratio(self._kept)

    def macs_ratio_of(self, strategy: Strategy) -> float:
        """MACs share of a strategy under this env's cost model (no pruning done)."""
        return self._macs_ratio(self._kept_and_bits(strategy)[0])

    def _macs_ratio(self, kept: np.ndarray) -> float:
        return self._macs.macs_of_kept(kept) / self._macs.base

    def budget_ratio(self) -> float:
        """Share of the quantize budget's quantity the current episode's strategy keeps."""
        return self._budget_ratio(self._kept, self._bits)

    def budget_ratio_of(self, strategy: Strategy) -> float:
        """The same for any strategy of this env (no pruning done)."""
        return self._budget_ratio(*self._kept_and_bits(strategy))

    def fits_budgets(self, strategy: Strategy) -> bool:
        return self.projector.fits(*self._kept_and_bits(strategy))

    def _kept_and_bits(self, strategy: Strategy) -> tuple[np.ndarray, np.ndarray]:
        actions = [strategy.layers.get(n) for n in self.group_names]
        kept = np.array([a.kept_channels(int(c)) if a else c
                         for a, c in zip(actions, self._channels)])
        bits = np.array([(a.bits or FLOAT_BITS) if a else FLOAT_BITS for a in actions])
        return kept, bits

    def _budget_ratio(self, kept: np.ndarray, bits: np.ndarray) -> float:
        return self.projector.ratio(self.projector.budgets[-1], kept, bits)

    def strategy(self) -> Strategy:
        layers = {name: LayerAction(float(k / c), float(coef))
                  for name, k, c, coef in zip(self.group_names, self._kept, self._channels, self._coefs)}
        if self.quant:
            layers = self.with_bits(layers, [int(b) for b in self._bits])
        return Strategy(**self.strategy_fields(), layers=layers)

    def strategy_layer_names(self) -> list[str]:
        """Layer names of this env's strategies, in their order."""
        return list(conv_and_linear_layers(self._base_model)) if self.quant else list(self.group_names)

    def with_bits(self, layers: dict[str, LayerAction], bits: list[int]) -> dict:
        """Each group's bits on the layers it owns, ``fixed_bits`` on every other layer."""
        out = {}
        owner = {n: i for i, names in enumerate(self._owned) for n in names}
        for name in conv_and_linear_layers(self._base_model):
            action = layers.get(name, LayerAction(1.0))
            b = bits[owner[name]] if name in owner else self.quant.fixed_bits
            out[name] = LayerAction(action.keep, action.coef, b)
        return out

    def evaluate(self, strategy: Strategy) -> float:
        """The reward of ``strategy`` (:class:`envs.reward.RewardEvaluator`, cached)."""
        return self.reward(strategy)

    @property
    def last_timing(self) -> dict:
        return self.reward.last_timing
