"""The AutoDFP MDP: one episode prunes a model group by group; the reward is accuracy.

- Step ``t`` decides group ``t`` (forward order of :class:`autodfp.graph.ChannelGraph`).
- Action ``Box(2)`` in [0, 1]: ``a[0]`` maps to a keep ratio in ``[keep_lower, 1]``, projected
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
import dataclasses
import math
import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

from autodfp.calibration import Calibrator, CalibrationConfig
from autodfp.costmodel import MacsModel
from autodfp.data import ImageSet, load_split, load_user_data, reward_split, split_user_data
from autodfp.errors import AutoDFPError
from autodfp.graph import ChannelGraph
from autodfp.metrics import (ResidentImages, accuracy, check_labelled_images,
                             resident_accuracy)
from autodfp.models import InputSpec
from autodfp.pruning import (apply_strategy, checkpoint_digest, default_quant_images,
                             load_base)
from autodfp.report import REPORT_SPLITS
from autodfp.quantization import (FLOAT_BITS, QuantConfig, check_bits, layer_macs,
                                  quantizable_layers, weight_bytes)
from autodfp.settings import check_choice, from_mapping
from autodfp.similarity import similarity_stats
from autodfp.strategy import LayerAction, Strategy
from autodfp.synthetic import default_config


BUDGETS = ("macs", "weight_bytes", "bitops")


@dataclass(frozen=True)
class QuantSearch:
    """Mixed-precision search settings (``EnvConfig.quantize``)."""

    budget: str = "weight_bytes"
    """What ``budget_ratio`` bounds: ``macs``, ``weight_bytes`` (weight storage, see
    :func:`autodfp.quantization.weight_bytes`) or ``bitops`` (MACs x weight bits x 32)."""
    budget_ratio: float = 0.1
    """Largest allowed share of the float model's cost (``macs``: ``macs_budget`` is used)."""
    min_bits: int = 2
    """Fewest weight bits an action can choose."""
    max_bits: int = 8
    """Most weight bits an action can choose."""
    fixed_bits: int = 8
    """Bits of the conv/linear layers no step decides (e.g. the stem conv and the classifier)."""
    compensate: str = "calibrate"
    """Quantization compensation (:class:`autodfp.quantization.QuantConfig`)."""

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
    :class:`autodfp.graph.ChannelGraph`)."""
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
    256 synthetic images, made by the recipe for the model's input size unless ``synth`` is
    given); None: no calibration (the closed-form compensation alone)."""
    device: str = "auto"
    """Where rewards are evaluated: ``auto`` takes the GPU this process was given, if any.
    Off the CPU the reward images are normalised once and stay on the device."""
    channels_last: bool = False
    """Off the CPU: evaluate in channels-last memory layout (cuDNN's fast path)."""
    autocast: bool = False
    """Off the CPU: evaluate under float16 autocast (check the reward against float32 first:
    ``bench/search.py --throughput-only --autocast`` prints both)."""
    torch_threads: int = 0
    """Torch CPU threads in this process; 0 leaves torch's default (set per env runner)."""
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
        if config.action_mode not in ("fair-share", "absolute"):
            raise AutoDFPError(f"action_mode must be 'fair-share' or 'absolute', "
                               f"got {config.action_mode!r}")
        return config

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
        """The calibration; with ``input_size``, synthetic images not set in ``calibration``
        follow the default recipe for that input size (:func:`default_calibration`)."""
        if self.calibration is None:
            return None
        config = CalibrationConfig.from_dict(self.calibration)
        if input_size is not None and "synth" not in self.calibration:
            config = dataclasses.replace(config, synth=default_config(input_size))
        return config


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


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AutoDFPError(f"device {device!r} asked for, but no GPU is visible to this process")
    return device


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
        if self.config.torch_threads > 0:
            import torch
            torch.set_num_threads(self.config.torch_threads)
        assets = assets or EnvAssets.load(self.config)
        self._template = assets.template
        self._base_model, self._spec = assets.model, assets.spec
        self.device = _resolve_device(self.config.device)  # pruned copies are evaluated there
        self._images = assets.images
        self._resident = None
        if self.device != "cpu":
            self._resident = ResidentImages(self._images, self._spec, self.device,
                                            channels_last=self.config.channels_last)
        self.group_names, self._channels, self._static = self._describe_groups()
        self._macs = MacsModel.measure(self._base_model, self._spec, coupled=self.config.coupled)
        self.quant = self.config.quant_search()
        self._constraints = self._budget_constraints()
        self._check_budget_reachable()
        self._calibrator = assets.calibrator
        self._quant_images = assets.quant_images
        self._cache: dict[str, float] = {}
        self.last_timing: dict = {}
        self.action_space = gym.spaces.Box(0.0, 1.0, shape=(3 if self.quant else 2,),
                                           dtype=np.float32)
        obs_dim = self._static.shape[1] + (6 if self.quant else 4)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(obs_dim,), dtype=np.float32)

    # -- set-up --------------------------------------------------------------------------

    def _describe_groups(self):
        model = copy.deepcopy(self._base_model)
        graph = ChannelGraph(model, self._spec.example_input(), coupled=self.config.coupled)
        names = list(graph.groups)
        if not names:
            raise AutoDFPError(f"{self.config.model} has no prunable channel groups")
        self._owned = _layers_owned_by_groups(graph)
        channels = np.array([graph.groups[n].channels for n in names])
        max_in = max(g.producer.in_channels for g in graph.groups.values())
        rows = []
        for i, name in enumerate(names):
            conv = graph.groups[name].producer
            rows.append([i / max(len(names) - 1, 1), conv.in_channels / max_in,
                         conv.out_channels / channels.max(), conv.kernel_size[0] / 7,
                         conv.stride[0] / 4, *similarity_stats(conv.weight).as_list()])
        return names, channels, np.clip(np.array(rows), 0.0, 1.0)

    def strategy_fields(self) -> dict:
        t = self._template
        fields = {"model": t.model, "select": t.select, "reconstruct": t.reconstruct,
                  "checkpoint": t.checkpoint, "checkpoint_sha256": t.checkpoint_sha256,
                  "calibration": t.calibration, "input": t.input, "coupled": t.coupled}
        if self.config.quantize is not None:
            fields["quantization"] = QuantConfig(compensate=self.config.quant_search().compensate)
        return fields

    def _budget_constraints(self) -> list["_Budget"]:
        """The MACs budget, and with ``quantize`` the weight-bytes or BitOPs budget, each as
        ``fixed + sum_i unit[i] * keep_i * (bits_i / 32 if it depends on bits)``."""
        macs = _Budget("MACs", "macs_budget", self.config.macs_budget, self._macs.fixed,
                       self._macs.linear, self._macs.base, uses_bits=False, pair=self._macs.pair)
        if self.quant is None or self.quant.budget == "macs":
            return [macs]
        layers = quantizable_layers(self._base_model)
        owned = {name for names in self._owned for name in names}
        unowned = [n for n in layers if n not in owned]
        fixed_share = self.quant.fixed_bits / FLOAT_BITS
        if self.quant.budget == "weight_bytes":
            size = {n: 4 * m.weight.numel() for n, m in layers.items()}  # float32 bytes
            base = float(weight_bytes(self._base_model))
            unit = np.array([sum(size[n] for n in names) for names in self._owned], dtype=float)
            # conservative: other parameters and buffers, and one float32 step per output
            # channel, at their unpruned size; one byte per layer for packing to whole bytes
            fixed = (base - sum(size.values()) + sum(size[n] * fixed_share for n in unowned)
                     + sum(4 * m.weight.shape[0] + 1 for m in layers.values()))
            label = "weight bytes"
        else:
            per_layer = layer_macs(self._base_model, self._spec.example_input())
            per_bit = FLOAT_BITS * FLOAT_BITS  # float weights x float activations
            base = float(sum(per_layer.values()) * per_bit)
            unit = np.array([sum(per_layer[n] for n in names) * per_bit
                             for names in self._owned], dtype=float)
            fixed = sum(per_layer[n] * per_bit * fixed_share for n in unowned)
            label = "BitOPs"
        return [macs, _Budget(label, "quantize budget_ratio", self.quant.budget_ratio, fixed,
                              unit, base, uses_bits=True)]

    def _lower_channels(self) -> np.ndarray:
        return np.maximum(1, np.ceil(self.config.keep_lower * self._channels - 1e-9))

    def _min_bits(self) -> int:
        return self.quant.min_bits if self.quant else FLOAT_BITS

    def _check_budget_reachable(self) -> None:
        share = self._lower_channels() / self._channels
        bits = np.full(len(share), self._min_bits())
        for budget in self._constraints:
            floor = budget.cost(share, bits)
            if floor > budget.limit * (1 + 1e-12):
                at_bits = f" and min_bits={self._min_bits()}" if budget.uses_bits else ""
                raise AutoDFPError(
                    f"{budget.label} budget {budget.ratio:.3f} ({budget.setting}) is "
                    f"unreachable: with every group at keep_lower={self.config.keep_lower}"
                    f"{at_bits} the model keeps {floor / budget.base:.3f} of its {budget.label}")

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
        self._bits[t] = self._project_bits(action[2]) if self.quant else FLOAT_BITS
        self._kept[t] = self._project(action[0])
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
            budget = self._constraints[-1]
            dynamic.append(budget.left(self._t, self._kept / self._channels, self._bits)
                           / budget.base)
        obs = np.concatenate([self._static[t], dynamic])
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    # -- actions, strategy, reward -------------------------------------------------------

    def _most_channels(self, bits: int) -> int:
        """Most channels group t can keep at ``bits`` with every budget still reachable by
        cutting every later group to keep_lower at min_bits."""
        t, channels = self._t, int(self._channels[self._t])
        share = self._lower_channels() / self._channels
        share[:t] = self._kept[:t] / self._channels[:t]
        bits_now = np.full(len(share), self._min_bits())
        bits_now[:t] = self._bits[:t]
        most = channels
        for budget in self._constraints:
            share[t], bits_now[t] = 0.0, bits
            room = budget.limit - budget.cost(share, bits_now)
            unit = budget.slope(t, share, bits_now)
            if unit > 0:
                most = min(most, math.floor(room / unit * channels + 1e-9))
        return most

    def _project_bits(self, a: float) -> int:
        """Bits for group t: the wish ``a``, lowered until keep_lower fits every budget."""
        q = self.quant
        bits = int(math.floor(q.min_bits + a * (q.max_bits - q.min_bits) + 0.5))
        lower = int(self._lower_channels()[self._t])
        while bits > q.min_bits and self._most_channels(bits) < lower:
            bits -= 1
        return bits

    def _project(self, a: float) -> int:
        """Kept channels for group t: the wish ``a``, capped so the budget stays reachable."""
        t, channels = self._t, self._channels[self._t]
        lower = self._lower_channels()
        low = self.config.keep_lower
        if self.config.action_mode == "absolute":
            wish = low + a * (1.0 - low)
        else:
            fair = float(np.clip(self._fair_share(), low, 1.0))
            wish = low + 2 * a * (fair - low) if a <= 0.5 else fair + (2 * a - 1) * (1 - fair)
        most = self._most_channels(int(self._bits[t]))
        wanted = math.floor(wish * channels + 0.5)
        return int(np.clip(wanted, lower[t], max(lower[t], min(channels, most))))

    def _fair_share(self) -> float:
        """The uniform share of groups t.. that spends the MACs budget exactly (MACs are
        quadratic in a share common to those groups: solved from three evaluations)."""
        t = self._t
        share = self._kept / self._channels

        def macs_at(x: float) -> float:
            share[t:] = x
            return self._macs.macs(share)

        c, half, one = macs_at(0.0), macs_at(0.5), macs_at(1.0)
        a2 = 2 * (one - 2 * half + c)  # MACs(x) = c + a1 x + a2 x^2
        a1 = one - c - a2
        need = self.config.macs_budget * self._macs.base - c
        if abs(a2) < 1e-9 * max(abs(a1), 1.0):
            return need / a1 if a1 > 0 else 1.0
        return (-a1 + math.sqrt(max(a1 * a1 + 4 * a2 * need, 0.0))) / (2 * a2)

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
        kept, bits = self._kept_and_bits(strategy)
        return all(b.cost(kept / self._channels, bits) <= b.limit * (1 + 1e-12)
                   for b in self._constraints)

    def _kept_and_bits(self, strategy: Strategy) -> tuple[np.ndarray, np.ndarray]:
        actions = [strategy.layers.get(n) for n in self.group_names]
        kept = np.array([a.kept_channels(int(c)) if a else c
                         for a, c in zip(actions, self._channels)])
        bits = np.array([(a.bits or FLOAT_BITS) if a else FLOAT_BITS for a in actions])
        return kept, bits

    def _budget_ratio(self, kept: np.ndarray, bits: np.ndarray) -> float:
        budget = self._constraints[-1]
        return float(budget.cost(kept / self._channels, bits) / budget.base)

    def strategy(self) -> Strategy:
        layers = {name: LayerAction(float(k / c), float(coef))
                  for name, k, c, coef in zip(self.group_names, self._kept, self._channels, self._coefs)}
        if self.quant:
            layers = self.with_bits(layers, [int(b) for b in self._bits])
        return Strategy(**self.strategy_fields(), layers=layers)

    def strategy_layer_names(self) -> list[str]:
        """Layer names of this env's strategies, in their order."""
        return list(quantizable_layers(self._base_model)) if self.quant else list(self.group_names)

    def with_bits(self, layers: dict[str, LayerAction], bits: list[int]) -> dict:
        """Each group's bits on the layers it owns, ``fixed_bits`` on every other layer."""
        out = {}
        owner = {n: i for i, names in enumerate(self._owned) for n in names}
        for name in quantizable_layers(self._base_model):
            action = layers.get(name, LayerAction(1.0))
            b = bits[owner[name]] if name in owner else self.quant.fixed_bits
            out[name] = LayerAction(action.keep, action.coef, b)
        return out

    def evaluate(self, strategy: Strategy) -> float:
        """Accuracy (fraction) of ``strategy`` on the reward split, cached."""
        key = strategy.to_json()
        self.last_timing = {"surgery_s": 0.0, "calibrate_s": 0.0, "eval_s": 0.0, "cached": key in self._cache}
        if key not in self._cache:
            start = time.perf_counter()
            pruned = apply_strategy(strategy, (copy.deepcopy(self._base_model), self._spec),
                                    calibrator=self._calibrator,
                                    quant_images=self._quant_images)
            middle = time.perf_counter()
            self._cache[key] = self._accuracy(pruned.model) / 100.0
            self.last_timing.update(surgery_s=middle - start - pruned.calibrate_s,
                                    calibrate_s=pruned.calibrate_s,
                                    eval_s=time.perf_counter() - middle)
        return self._cache[key]

    def _accuracy(self, model) -> float:
        """Top-1 in percent on the reward set."""
        if self._resident is not None:
            return resident_accuracy(model, self._resident, self._spec,
                                     autocast=self.config.autocast)
        return accuracy(model, self._images, self._spec)


@dataclass(frozen=True)
class _Budget:
    """One budget: ``fixed + sum_i unit[i] * share_i * (bits_i / 32 if uses_bits)`` (plus
    ``share @ pair @ share`` for chained groups' MACs) must stay at most ``ratio * base``."""

    label: str
    setting: str
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


def _layers_owned_by_groups(graph: ChannelGraph) -> list[list[str]]:
    """Per group (graph order): its producer and the consumers that read only its channels
    and produce no group of their own; their bits are the group's action."""
    producers = set(graph.groups)
    readers: dict[str, int] = {}
    for group in graph.groups.values():
        for name in group.consumers:
            readers[name] = readers.get(name, 0) + 1
    return [[name, *(c for c in group.consumers if c not in producers and readers[c] == 1)]
            for name, group in graph.groups.items()]
