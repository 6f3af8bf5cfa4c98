"""Apply a :class:`Strategy` to a pretrained model: select, reconstruct, cut (in that order),
then calibrate and quantize when the strategy says so.

Groups are processed in forward order on the current weights, so a consumer that is itself the
producer of a later group is selected on its already-compensated filters (the same order as the
official Neuron Merging code). Every step is deterministic on the CPU: replaying a strategy
gives bit-identical weights.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from autodfp.calibrate.refit import DEFAULT_CALIBRATION, Calibrator, calibration_images, ridge_for
from autodfp.errors import AutoDFPError
from autodfp.compress.graph import ChannelGraph
from autodfp.models import (InputSpec, ModelSpec, build_model, get_spec, weights_from_factory,
                            weights_sha256)
from autodfp.measure.metrics import conv_and_linear_layers
from autodfp.quantize.weights import QuantizedWeight, quantize_model
from autodfp.compress.reconstruction import ReconstructionOptions, reconstruct
from autodfp.compress.selection import get_criterion
from autodfp.strategy import LayerAction, Strategy, file_sha256


@dataclass
class PrunedModel:
    model: nn.Module
    spec: ModelSpec
    strategy: Strategy
    channels: dict[str, int]
    """Channels each prunable group has after pruning (all groups, pruned or not)."""
    compensated: list[str] = field(default_factory=list)
    """Groups whose pruned channels were folded into their consumers."""
    excluded: dict[str, str] = field(default_factory=dict)
    """Groups the graph would not prune, with the reason."""
    refitted: list[str] = field(default_factory=list)
    """Layers the calibration refitted."""
    calibrate_s: float = 0.0
    """Seconds the calibration took (images and targets excluded when a calibrator was given)."""
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    """Integer codes and steps of the quantized layers (their weights are ``codes * scale``)."""
    base_cost: object | None = None
    """Cost of the unpruned model (:class:`autodfp.measure.metrics.Cost`), when known."""
    fidelity: object | None = None
    """The data-free fidelity estimate (:class:`autodfp.measure.fidelity.Fidelity`), when one
    was made."""

    @property
    def cost(self):
        """MACs, parameters, bytes and BitOPs of the pruned model
        (:class:`autodfp.measure.metrics.Cost`)."""
        from autodfp.measure.metrics import model_cost

        return model_cost(self.model, self.spec, self.strategy.layer_bits)


def load_base(strategy: Strategy) -> tuple[nn.Module, ModelSpec]:
    """The unpruned model a strategy starts from, checking the checkpoint digest."""
    model, spec = build_model(strategy.model, strategy.checkpoint, input_spec=strategy.input)
    if strategy.checkpoint_sha256:
        if weights_from_factory(spec, strategy.checkpoint):
            if weights_sha256(model) != strategy.checkpoint_sha256:
                raise AutoDFPError(f"{strategy.model} returns other weights than the ones this "
                                   "strategy was made on (sha256 mismatch)")
            return model, spec
        path = Path(strategy.checkpoint) if strategy.checkpoint else spec.default_checkpoint()
        if file_sha256(path) != strategy.checkpoint_sha256:
            raise AutoDFPError(f"checkpoint {path} differs from the one this strategy was made "
                               "on (sha256 mismatch)")
    return model, spec


def checkpoint_digest(model_name: str, checkpoint: str | None) -> str | None:
    """sha256 of the weights file, or of the weights a pretrained factory returns."""
    spec = get_spec(model_name)
    if weights_from_factory(spec, checkpoint):
        return weights_sha256(build_model(model_name, checkpoint, pretrained=False)[0])
    path = Path(checkpoint) if checkpoint else spec.default_checkpoint()
    return file_sha256(path) if path is not None and path.is_file() else None


def apply_strategy(strategy: Strategy, base: tuple[nn.Module, ModelSpec] | None = None, *,
                   calibrator: Calibrator | None = None, quant_images=None,
                   progress: bool = False) -> PrunedModel:
    """Prune ``base`` (or a freshly loaded model) in place according to ``strategy`` in three
    steps: :func:`cut_channels`, :func:`calibrate` and quantize (each when the strategy says
    so). ``calibrator`` (made for the same
    unpruned model and the strategy's calibration) saves recomputing the calibration images and
    targets; ``quant_images`` (the default synthetic images of the unpruned model) saves
    reading them for a ``calibrate`` quantization without a calibration."""
    model, spec = base if base is not None else load_base(strategy)
    if strategy.calibration is not None and calibrator is None:
        calibrator = Calibrator.for_model(model, spec, strategy.calibration, progress=progress,
                                          coupled=strategy.coupled)
        strategy = dataclasses.replace(strategy, calibration=calibrator.config)  # + image digest
    elif calibrator is not None and calibrator.config != strategy.calibration:
        raise ValueError("the calibrator was made for another calibration than the strategy's")
    if calibrator is not None:
        quant_images = calibrator.images
    if (strategy.layer_bits and quant_images is None
            and strategy.quant_config().compensate.startswith("calibrate")):
        # made from the unpruned model, like a calibration's (read from the cache after once)
        quant_images = default_quant_images(model, spec, progress=progress)
    graph = ChannelGraph(model, spec.example_input(), coupled=strategy.coupled)
    cut = cut_channels(strategy, graph)
    refitted, seconds = [], 0.0
    if strategy.calibration is not None:
        start = time.perf_counter()
        refitted = calibrate(strategy, calibrator, model, cut)
        seconds = time.perf_counter() - start
    quantized = {}
    if strategy.layer_bits:
        quantized = quantize_model(model, strategy.layer_bits, strategy.quant_config(),
                                   spec.example_input(), quant_images, graph)
    return PrunedModel(model, spec, strategy,
                       {n: g.channels for n, g in graph.groups.items()}, cut.compensated,
                       {g.name: g.reason for g in graph.excluded}, refitted, seconds, quantized)


@dataclass
class Cut:
    """What :func:`cut_channels` did, as the calibration needs it."""

    compensated: list[str] = field(default_factory=list)
    """Groups whose pruned channels were folded into their consumers."""
    kept_outputs: dict[str, list[int]] = field(default_factory=dict)
    """Producer layer -> indices of the output channels it kept."""
    coefs: dict[str, list[float]] = field(default_factory=dict)
    """Layer -> reconstruction coefficients of the groups it produces or consumes."""


def cut_channels(strategy: Strategy, graph: ChannelGraph) -> Cut:
    """Step 1: per group in forward order, select the kept channels, compensate for the
    others (the strategy's reconstruction) and remove them from the model in place."""
    layers = conv_and_linear_layers(graph.model)
    unknown = [name for name, action in strategy.layers.items()
               if name not in graph.groups and (action.keep < 1.0 or name not in layers)]
    if unknown:
        graph.group(unknown[0])  # raises with the reason
    criterion = get_criterion(strategy.select)
    cut = Cut()
    for name, group in graph.groups.items():
        action = strategy.layers.get(name)
        if action is None:
            continue
        n_keep = action.kept_channels(group.channels)
        if n_keep == group.channels:
            continue
        keep = criterion.select_group(group, n_keep)
        if reconstruct(strategy.reconstruct, group, keep, action.coef, strategy.options):
            cut.compensated.append(name)
        for producer in group.coupled or [name]:
            cut.kept_outputs[producer] = sorted(keep.tolist())
        for layer in (*(group.coupled or [name]), *group.consumers):
            cut.coefs.setdefault(layer, []).append(action.coef)
        graph.prune(name, keep)
    return cut


def calibrate(strategy: Strategy, calibrator: Calibrator, model: nn.Module, cut: Cut
              ) -> list[str]:
    """Step 2: refit the layers the cut touched (ridge from their groups' mean coefficient)
    and re-estimate BN statistics, as the strategy's calibration says; the layers refitted."""
    refit = {name: ridge_for(strategy.calibration, sum(coefs) / len(coefs))
             for name, coefs in cut.coefs.items()}
    return calibrator.calibrate(model, refit, cut.kept_outputs)


def default_quant_images(model: nn.Module, spec: ModelSpec, *, progress: bool = False):
    """The images a ``calibrate`` quantization uses when the strategy has no calibration: the
    default synthetic ones of the unpruned ``model`` (made once, then read from the cache)."""
    return calibration_images(DEFAULT_CALIBRATION, model, spec, progress=progress)[0]


def prunable_groups(model_name: str, checkpoint: str | None = None,
                    input_spec: InputSpec | None = None, coupled: bool = False) -> dict[str, int]:
    """Name -> channel count of every prunable group of a model."""
    model, spec = build_model(model_name, checkpoint, pretrained=False, input_spec=input_spec)
    graph = ChannelGraph(model, spec.example_input(), coupled=coupled)
    return {n: g.channels for n, g in graph.groups.items()}


def uniform_layers(model: nn.Module, spec: ModelSpec, keep: float, *, coef: float = 1.0,
                   bits: int | None = None, coupled: bool = False) -> dict[str, LayerAction]:
    """The same keep ratio for every prunable group of ``model``; with ``bits``, every conv and
    linear layer quantized to that many bits."""
    graph = ChannelGraph(model, spec.example_input(), coupled=coupled)
    return group_layers({name: keep for name in graph.groups}, model, coef=coef, bits=bits)


def group_layers(keeps: dict[str, float], model: nn.Module, *, coef: float = 1.0,
                 bits: int | None = None) -> dict[str, LayerAction]:
    """Each prunable group's keep share as its layer action; with ``bits``, every conv and
    linear layer of ``model`` quantized to that many bits."""
    layers = {name: LayerAction(keep, coef, bits) for name, keep in keeps.items()}
    if bits is not None:
        layers = {name: layers.get(name, LayerAction(1.0, coef, bits))
                  for name in conv_and_linear_layers(model)}
    return layers


def uniform_strategy(model_name: str, keep: float, *, select: str = "l1",
                     reconstruct: str = "neuron-merging", coef: float = 1.0,
                     checkpoint: str | None = None, bits: int | None = None,
                     input_spec: InputSpec | None = None, coupled: bool = False,
                     **option_overrides) -> Strategy:
    """:func:`uniform_layers` of a registry model (or ``pkg.module:factory``)."""
    model, spec = build_model(model_name, checkpoint, pretrained=False, input_spec=input_spec)
    layers = uniform_layers(model, spec, keep, coef=coef, bits=bits, coupled=coupled)
    return Strategy(model_name, layers, select, reconstruct, checkpoint,
                    checkpoint_digest(model_name, checkpoint),
                    ReconstructionOptions(**option_overrides), input=input_spec,
                    coupled=coupled)
