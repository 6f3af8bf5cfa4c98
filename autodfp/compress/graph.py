"""Prunable channel groups, found by Torch-Pruning's dependency graph (no per-model lists).

A *group* is the set of channels that must be removed together: the output channels of one
producer conv, the BN after it, any depthwise convs that follow channel-for-channel, and the
input channels of every consumer. A group with exactly one producer is always prunable.

Groups with several producers are outputs of layers that are *added* (ResNet block outputs,
MobileNetV2 and EfficientNet residual stages): their channels are coupled across a whole stage.
By default they are excluded, and said why; with ``coupled=True`` they are prunable too, the
same channels removed from every producer, BN and consumer of the add (as Torch-Pruning and
DFPC do). One case stays excluded: producers of different widths in one group, which is what an
option-A shortcut (a zero-pad from one stage's width to the next's, which Torch-Pruning treats
as channel-preserving) ties together: the CIFAR ResNets' block outputs, where removing a channel
would need the pad itself to change. For those ResNets the block-internal channels (``conv1``
-> ``bn1`` -> ``conv2``) are what remains, the layers Neuron Merging prunes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch_pruning as tp

from autodfp.errors import AutoDFPError


def is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


@dataclass
class ChannelGroup:
    """One prunable group, named after its producer conv."""

    name: str
    producer: nn.Conv2d
    bn: nn.BatchNorm2d | None
    """The BN directly after the producer, when there is one."""
    consumers: dict[str, nn.Module]
    """Modules reading these channels as input: convs and linears, by module name."""
    depthwise: list[str] = field(default_factory=list)
    """Depthwise convs between producer and consumers; they are pruned along."""
    consumer_bn: dict[str, nn.BatchNorm2d | None] = field(default_factory=dict)
    """The BN right after each consumer (where a constant input shift can be folded)."""
    coupled: dict[str, nn.Conv2d] = field(default_factory=dict)
    """For a residual-coupled group: every producer whose outputs are added (``producer`` is
    the first); empty for a group with one producer."""
    coupled_bn: dict[str, nn.BatchNorm2d | None] = field(default_factory=dict)
    """The BN after each coupled producer."""
    depthwise_bn: nn.BatchNorm2d | None = None
    """The BN after the (last) depthwise conv, when there is one."""
    depthwise_act: str = "relu"
    """The activation after that BN, as a module shows it (``relu6``, ``relu``; functional
    activations cannot be seen and are taken as ``relu``)."""
    probe_sources: Callable[[], dict[str, list[str]]] | None = field(
        default=None, repr=False, compare=False)
    """For a coupled group: finds :meth:`consumer_sources` (forward passes, so on demand)."""

    act: str = "relu"
    """The activation after ``bn``, as a module shows it (``relu`` when none is seen)."""

    def consumer_sources(self) -> dict[str, list[str]]:
        """For a coupled group: which producers' outputs have been added into each consumer's
        input (a block's expansion reads the stream before that block adds its own)."""
        if self.probe_sources is None:
            return {}
        if not hasattr(self, "_sources"):
            self._sources = self.probe_sources()
        return self._sources

    @property
    def channels(self) -> int:
        return self.producer.out_channels

    @property
    def reconstructable(self) -> bool:
        """Compensation folds into consumers only across producer -> BN -> activation."""
        return self.bn is not None and not self.depthwise and not self.coupled

    def selection_weight(self) -> torch.Tensor:
        """What a selection criterion scores, one row per channel: the producer's filters, or
        for a coupled group every producer's filters side by side."""
        if not self.coupled:
            return self.producer.weight
        weights = [p.weight.detach() for p in self.coupled.values()]
        if len({w.shape[2:] for w in weights}) > 1:  # mixed kernel sizes: 1x1 "kernels"
            weights = [w.flatten(1)[..., None, None] for w in weights]
        return torch.cat(weights, dim=1)


@dataclass(frozen=True)
class ExcludedGroup:
    name: str
    reason: str


class ChannelGraph:
    """The prunable groups of ``model`` and the means to remove channels from them in place."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, *, coupled: bool = False):
        self.model = model
        self.allow_coupled = coupled
        self._example = example_input
        self.names = {module: name for name, module in model.named_modules()}
        self._dg = tp.DependencyGraph().build_dependency(
            model, example_inputs=example_input, verbose=False)
        self.following_bn, self.following_act = following_layers(model, example_input)
        self.groups: dict[str, ChannelGroup] = {}
        self.excluded: list[ExcludedGroup] = []
        self._classify()

    def _classify(self) -> None:
        seen: set[str] = set()
        found: dict[str, ChannelGroup] = {}
        order = {n: i for i, (n, _) in enumerate(self.model.named_modules())}
        for group in self._dg.get_all_groups(root_module_types=[nn.Conv2d]):
            producers, bns, depthwise, consumers = [], [], [], {}
            for dep, _ in group:
                module, handler = dep.target.module, dep.handler
                name = self.names.get(module)
                if name is None:
                    continue  # functional ops (relu, add, pad, flatten) have no parameters
                if handler == tp.prune_depthwise_conv_out_channels or (
                        handler == tp.prune_conv_out_channels and is_depthwise(module)):
                    depthwise.append(name)
                elif handler == tp.prune_conv_out_channels:
                    producers.append(name)
                elif handler == tp.prune_batchnorm_out_channels:
                    bns.append(name)
                elif handler in (tp.prune_conv_in_channels, tp.prune_linear_in_channels):
                    if not is_depthwise(module):
                        consumers[name] = module
            key = ",".join(sorted(producers))
            if key in seen:
                continue
            seen.add(key)
            producers.sort(key=lambda n: order[n])
            reason = self._why_not_prunable(producers, consumers)
            if reason:
                self.excluded.append(ExcludedGroup(producers[0] if producers else key, reason))
                continue
            producer = self.model.get_submodule(producers[0])
            coupled = ({n: self.model.get_submodule(n) for n in producers}
                       if len(producers) > 1 else {})
            depthwise = sorted(set(depthwise), key=lambda n: order[n])
            depthwise_bn = (self.following_bn.get(self.model.get_submodule(depthwise[-1]))
                            if depthwise else None)
            found[producers[0]] = ChannelGroup(
                producers[0], producer, self.following_bn.get(producer), consumers, depthwise,
                {n: self.following_bn.get(m) for n, m in consumers.items()}, coupled,
                {n: self.following_bn.get(m) for n, m in coupled.items()},
                depthwise_bn, self.following_act.get(depthwise_bn, "relu"),
                partial(self._consumer_sources, coupled, consumers) if coupled else None,
                act=self.following_act.get(self.following_bn.get(producer), "relu"))
        order = [name for name, _ in self.model.named_modules()]
        self.groups = {n: found[n] for n in sorted(found, key=order.index)}
        self.excluded.sort(key=lambda g: order.index(g.name) if g.name in order else len(order))

    def _why_not_prunable(self, producers: list[str], consumers: dict) -> str | None:
        if not producers:
            return "no producer conv"
        if len(producers) > 1:
            listed = f"{', '.join(producers[:3])}{', ...' if len(producers) > 3 else ''}"
            widths = {self.model.get_submodule(n).out_channels for n in producers}
            if len(widths) > 1:
                return (f"residual-coupled across widths {sorted(widths)} (a zero-pad "
                        f"shortcut): outputs of {len(producers)} layers are added ({listed})")
            if not self.allow_coupled:
                return (f"residual-coupled: outputs of {len(producers)} layers are added "
                        f"({listed}); coupled pruning prunes them together")
        if not consumers:
            return "no consumer layer"
        return None

    @torch.no_grad()
    def _consumer_sources(self, producers: dict[str, nn.Module],
                          consumers: dict[str, nn.Module]) -> dict[str, list[str]]:
        """Which producers reach each consumer's input, found by adding 1 to one producer's
        output (after its BN) at a time and watching the consumers' mean inputs move by 1."""
        means: dict[str, torch.Tensor] = {}

        def watch(name):
            return lambda module, inputs: means.__setitem__(name, inputs[0].mean())

        def run(bump: nn.Module | None) -> dict[str, torch.Tensor]:
            handles = [m.register_forward_pre_hook(watch(n)) for n, m in consumers.items()]
            if bump is not None:
                handles.append(bump.register_forward_hook(lambda m, i, out: out + 1.0))
            try:
                self.model.eval()(self._example)
            finally:
                for handle in handles:
                    handle.remove()
            return dict(means)

        was_training = self.model.training
        base = run(None)
        sources: dict[str, list[str]] = {n: [] for n in consumers}
        for name, producer in producers.items():
            moved = run(self.following_bn.get(producer) or producer)
            for consumer in consumers:
                if abs(float(moved[consumer] - base[consumer]) - 1.0) < 0.5:
                    sources[consumer].append(name)
        self.model.train(was_training)
        return sources

    def group(self, name: str) -> ChannelGroup:
        if name not in self.groups:
            why = {g.name: g.reason for g in self.excluded}.get(name, "no such layer")
            raise AutoDFPError(f"layer {name!r} is not a prunable group ({why})")
        return self.groups[name]

    def prune(self, name: str, keep: torch.Tensor) -> None:
        """Physically remove every channel of group ``name`` not listed in ``keep``."""
        group = self.group(name)
        keep_set = set(keep.tolist())
        drop = [i for i in range(group.channels) if i not in keep_set]
        if not drop:
            return
        if len(drop) == group.channels:
            raise AutoDFPError(f"cannot remove every channel of {name}")
        self._dg.get_pruning_group(group.producer, tp.prune_conv_out_channels, idxs=drop).prune()


ACTIVATIONS = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Identity: "none"}
_BATCHNORM = nn.modules.batchnorm._BatchNorm


def following_layers(model: nn.Module, example_input: torch.Tensor) -> tuple[dict, dict]:
    """In one forward pass: each conv/linear -> the BatchNorm that consumes its output directly,
    and each BatchNorm -> the kind of activation module that consumes its output directly."""
    bn_after, act_after = _direct_successors(model, example_input, [
        (lambda m: isinstance(m, (nn.Conv2d, nn.Linear)), lambda m: isinstance(m, _BATCHNORM)),
        (lambda m: isinstance(m, _BATCHNORM), lambda m: type(m) in ACTIVATIONS)])
    return bn_after, {bn: ACTIVATIONS[type(act)] for bn, act in act_after.items()}


def _direct_successors(model: nn.Module, example_input: torch.Tensor,
                       kinds: list[tuple]) -> list[dict]:
    """For each (is_source, is_sink) pair: source module -> the sink module whose first input
    is that source's output tensor, all seen in one forward pass (a module called twice keeps
    its last successor)."""
    produced = [{} for _ in kinds]  # id -> (module, tensor): the tensor kept, ids stay unique
    follows: list[dict] = [{} for _ in kinds]

    def hook(module, inputs, output):
        for (is_source, is_sink), made, found in zip(kinds, produced, follows):
            if is_sink(module) and inputs and id(inputs[0]) in made:
                found[made[id(inputs[0])][0]] = module
            if is_source(module):
                made[id(output)] = (module, output)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if any(src(m) or sink(m) for src, sink in kinds)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return follows
