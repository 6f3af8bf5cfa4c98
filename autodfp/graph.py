"""Prunable channel groups, found by Torch-Pruning's dependency graph (no per-model lists).

A *group* is the set of channels that must be removed together: the output channels of one
producer conv, the BN after it, any depthwise convs that follow channel-for-channel, and the
input channels of every consumer. We keep a group prunable when it has exactly one producer.
Groups with several producers are outputs of layers that are *added* (ResNet block outputs,
MobileNetV2 residual stages); their channels are coupled across a whole stage and, with
option-A shortcuts, through a zero-pad that Torch-Pruning treats as channel-preserving, so we
exclude them and say why. For the CIFAR ResNets this leaves exactly the block-internal channels
(``conv1`` -> ``bn1`` -> ``conv2``), the layers Neuron Merging prunes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    @property
    def channels(self) -> int:
        return self.producer.out_channels

    @property
    def reconstructable(self) -> bool:
        """Compensation folds into consumers only across producer -> BN -> activation."""
        return self.bn is not None and not self.depthwise


@dataclass(frozen=True)
class ExcludedGroup:
    name: str
    reason: str


class ChannelGraph:
    """The prunable groups of ``model`` and the means to remove channels from them in place."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor):
        self.model = model
        self.names = {module: name for name, module in model.named_modules()}
        self._dg = tp.DependencyGraph().build_dependency(
            model, example_inputs=example_input, verbose=False)
        self.following_bn = following_batchnorms(model, example_input)
        self.groups: dict[str, ChannelGroup] = {}
        self.excluded: list[ExcludedGroup] = []
        self._classify()

    def _classify(self) -> None:
        seen: set[str] = set()
        found: dict[str, ChannelGroup] = {}
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
            if len(producers) != 1:
                label = producers[0] if producers else key
                self.excluded.append(ExcludedGroup(
                    label, f"residual-coupled: outputs of {len(producers)} layers are added "
                           f"({', '.join(producers[:3])}{', ...' if len(producers) > 3 else ''})"))
                continue
            producer = self.model.get_submodule(producers[0])
            if not consumers:
                self.excluded.append(ExcludedGroup(producers[0], "no consumer layer"))
                continue
            bn = self.following_bn.get(producer)
            found[producers[0]] = ChannelGroup(
                producers[0], producer, bn, consumers, sorted(set(depthwise)),
                {n: self.following_bn.get(m) for n, m in consumers.items()})
        order = [name for name, _ in self.model.named_modules()]
        self.groups = {n: found[n] for n in sorted(found, key=order.index)}
        self.excluded.sort(key=lambda g: order.index(g.name) if g.name in order else len(order))

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


def following_batchnorms(model: nn.Module, example_input: torch.Tensor) -> dict:
    """Map each conv/linear to the BatchNorm that consumes its output tensor directly."""
    produced_by: dict[int, nn.Module] = {}
    follows: dict[nn.Module, nn.Module] = {}

    def hook(module, inputs, output):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            produced_by[id(output)] = module
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and inputs:
            source = produced_by.get(id(inputs[0]))
            if source is not None:
                follows[source] = module

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm))]
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
