"""Model zoo, registry and checkpoint loading.

A model is named either from the registry (``resnet56``) or as ``pkg.module:factory`` (a
zero-argument callable returning an ``nn.Module``), with ``checkpoint`` a path to its weights;
a factory without a checkpoint is taken with the weights it returns (a pretrained factory).

What the library needs to feed a model (:class:`InputSpec`: input size, mean and std on [0, 1]
RGB) comes, field by field, from the first of: what the caller gives (CLI flags, a model card,
a strategy's ``input``), attributes the factory's model carries (``input_size``, ``mean``,
``std``, or a timm-style ``pretrained_cfg`` / ``default_cfg`` dict), the registry, and the
CIFAR defaults (3x32x32, ImageNet statistics), which are then reported as assumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from autodfp.data import shared_dir
from autodfp.errors import AutoDFPError
from autodfp.models import efficientnet_lite, mobilenetv2_cifar, resnet_cifar, vgg_cifar
from autodfp.models.checkpoint import first_line, load_checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


INPUT_FIELDS = ("input_size", "mean", "std")


@dataclass(frozen=True)
class InputSpec:
    """How images are fed to a model: ``input_size`` (C, H, W) and the ``mean`` and ``std``
    (one per channel) subtracted from and divided into pixels scaled to [0, 1]. Any field may
    be None: not given here."""

    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        size, mean, std = self.input_size, self.mean, self.std
        if size is not None:
            size = tuple(size)
            if len(size) != 3 or not all(isinstance(d, int) and not isinstance(d, bool)
                                         and d > 0 for d in size):
                raise AutoDFPError(f"input size must be 3 whole numbers C,H,W > 0, got {size!r}")
            object.__setattr__(self, "input_size", size)
        for name, values, positive in (("mean", mean, False), ("std", std, True)):
            if values is None:
                continue
            values = tuple(values)
            if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                     and math.isfinite(v) and (v > 0 or not positive)
                                     for v in values):
                raise AutoDFPError(f"{name} must be finite numbers{' > 0' if positive else ''}"
                                   f", one per channel, got {values!r}")
            object.__setattr__(self, name, tuple(float(v) for v in values))

    @classmethod
    def from_dict(cls, data: dict | None) -> "InputSpec":
        if data is None:
            return cls()
        if not isinstance(data, dict) or set(data) - set(INPUT_FIELDS):
            raise AutoDFPError(f"a model input spec takes {', '.join(INPUT_FIELDS)}; got "
                               f"{data!r}")
        return cls(**data)

    def to_dict(self) -> dict:
        """The fields that are set, as JSON lists."""
        return {k: list(v) for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class ModelSpec:
    """What the library needs to know about a model."""

    name: str
    factory: Callable[[], nn.Module]
    checkpoint: str | None = None
    """File name under ``shared/models/cifar10``; ``None`` when no pretrained weights ship."""
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: tuple[int, int, int] = (3, 32, 32)
    dataset: str = "cifar10"
    pretrained_factory: bool = False
    """The factory returns the pretrained weights itself (no checkpoint file)."""
    sources: dict = field(default_factory=dict, compare=False)
    """Where each input field came from (``given``, ``model attributes``, ``registry``,
    ``assumed``)."""

    def describe_input(self) -> str:
        """One line: the input the model is fed, and where each part came from."""
        size = "x".join(map(str, self.input_size))
        numbers = lambda v: ",".join(f"{x:g}" for x in v)  # noqa: E731
        text = f"input {size}, mean {numbers(self.mean)}, std {numbers(self.std)}"
        assumed = [f for f in INPUT_FIELDS if self.sources.get(f) == "assumed"]
        given = sorted({v for k, v in self.sources.items() if v != "assumed"})
        if given:
            text += f" (from {', '.join(given)})"
        if assumed:
            text += (f"; ASSUMED {', '.join(assumed)}: say otherwise with input_size, mean"
                     " and std, or a model card")
        return text

    def default_checkpoint(self) -> Path | None:
        if self.checkpoint is None:
            return None
        return shared_dir() / "models" / self.dataset / self.checkpoint

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, *self.input_size, generator=torch.Generator().manual_seed(0))


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec for spec in [
        ModelSpec("resnet20", resnet_cifar.resnet20, "resnet20-12fca82f.th"),
        ModelSpec("resnet32", resnet_cifar.resnet32, "resnet32-d509ac18.th"),
        ModelSpec("resnet44", resnet_cifar.resnet44, "resnet44-014dd654.th"),
        ModelSpec("resnet56", resnet_cifar.resnet56, "resnet56-4bfd9763.th"),
        ModelSpec("resnet110", resnet_cifar.resnet110),
        ModelSpec("vgg16_bn", vgg_cifar.vgg16_bn),
        ModelSpec("vgg19_bn", vgg_cifar.vgg19_bn),
        ModelSpec("mobilenetv2", mobilenetv2_cifar.mobilenetv2),
        ModelSpec("efficientnet_lite1", efficientnet_lite.efficientnet_lite1,
                  mean=efficientnet_lite.LITE_MEAN, std=efficientnet_lite.LITE_STD,
                  input_size=(3, 240, 240), dataset="imagenet", pretrained_factory=True),
        ModelSpec("efficientnet_lite2", efficientnet_lite.efficientnet_lite2,
                  mean=efficientnet_lite.LITE_MEAN, std=efficientnet_lite.LITE_STD,
                  input_size=(3, 260, 260), dataset="imagenet", pretrained_factory=True),
    ]
}


def get_spec(name: str) -> ModelSpec:
    """The registry entry, or a spec for a ``pkg.module:factory`` user model."""
    if name in REGISTRY:
        return dataclasses.replace(REGISTRY[name],
                                   sources={f: "registry" for f in INPUT_FIELDS})
    if ":" in name:
        return ModelSpec(name, _import_factory(name), sources={f: "assumed" for f in INPUT_FIELDS})
    raise AutoDFPError(
        f"unknown model {name!r}; choose one of {', '.join(REGISTRY)} or give pkg.module:factory")


def batched_forward(model: nn.Module, images: torch.Tensor, batch_size: int | None = None, *,
                    channels_last: bool = True) -> torch.Tensor:
    """``model(images)``, ``batch_size`` images at a time (None: all at once). ``channels_last``
    (for a model that :func:`accepts_channels_last`): both in channels-last memory, the
    model's memory format restored after: 1.2-1.5x faster on CPU convolutions than NCHW (the
    outputs differ by ~1e-6, the same on every run). Call it under ``no_grad``, not
    ``inference_mode``: the parameters' memory-format copies made there could not be used
    with autograd afterwards."""
    step = batch_size or max(len(images), 1)
    batches = [images[start:start + step] for start in range(0, len(images), step)]
    if not channels_last:
        return torch.cat([model(batch) for batch in batches])
    weights = [p for p in model.parameters() if p.dim() == 4]
    was_channels_last = bool(weights) and weights[0].is_contiguous(
        memory_format=torch.channels_last) and not weights[0].is_contiguous()
    model.to(memory_format=torch.channels_last)
    try:
        return torch.cat([model(batch.contiguous(memory_format=torch.channels_last))
                          for batch in batches])
    finally:
        if not was_channels_last:
            model.to(memory_format=torch.contiguous_format)


def accepts_channels_last(model: nn.Module, example: torch.Tensor) -> bool:
    """Whether ``model`` runs on channels-last input: a forward that calls ``.view`` on a conv
    output with more than one pixel does not (it raises), and such a model is run in NCHW."""
    try:
        with torch.no_grad():
            batched_forward(model, example)
    except RuntimeError:
        return False
    return True


def _import_factory(target: str) -> Callable[[], nn.Module]:
    module_name, _, attr = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise AutoDFPError(f"cannot import model factory {target!r}: {exc}") from None
    if not callable(factory):
        raise AutoDFPError(f"model factory {target!r} is not callable")
    return factory


def build_model(name: str, checkpoint: str | Path | None = None, *, pretrained: bool = True,
                input_spec: InputSpec | dict | None = None) -> tuple[nn.Module, ModelSpec]:
    """Instantiate ``name`` in eval mode, loading ``checkpoint`` or the shipped weights (a
    user factory without a checkpoint keeps the weights it returns), fed as ``input_spec``
    says where it says anything (see the module docstring).

    ``pretrained=False`` returns the random initialisation (for training or shape work).
    A model that does not run on its input size is one clear error.
    """
    spec = get_spec(name)
    try:
        model = spec.factory()
    except Exception as exc:  # a user's factory may fail in any way
        raise AutoDFPError(f"model factory {name!r} failed: {type(exc).__name__}: "
                           f"{first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise AutoDFPError(f"model factory for {name!r} returned {type(model).__name__}, "
                           "not an nn.Module")
    spec = resolve_input(spec, model, input_spec)
    if pretrained and not weights_from_factory(spec, checkpoint):
        path = Path(checkpoint) if checkpoint else spec.default_checkpoint()
        if path is None:
            raise AutoDFPError(
                f"no pretrained weights ship for {name}; train it and give its checkpoint")
        load_checkpoint(model, path)
    _check_runs(model.eval(), spec)
    return model, spec


def weights_from_factory(spec: ModelSpec, checkpoint: str | Path | None) -> bool:
    """Whether the weights are the ones the factory returned (no checkpoint file)."""
    return checkpoint is None and (spec.pretrained_factory or spec.name not in REGISTRY)


def weights_sha256(model: nn.Module) -> str:
    """Digest of a model's parameters and buffers (names, shapes, bytes), in state_dict order:
    what a checkpoint digest is for a model whose factory returns its weights."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(f"{key}|{tuple(value.shape)}|{value.dtype}|".encode())
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resolve_input(spec: ModelSpec, model: nn.Module,
                   given: InputSpec | dict | None) -> ModelSpec:
    if not isinstance(given, InputSpec):
        given = InputSpec.from_dict(given)
    carried = _carried_input(model)
    values, sources = {}, dict(spec.sources)
    for name in INPUT_FIELDS:
        for source, value in (("given", getattr(given, name)),
                              ("model attributes", getattr(carried, name))):
            if value is not None:
                values[name], sources[name] = value, source
                break
    spec = dataclasses.replace(spec, **values, sources=sources)
    channels = spec.input_size[0]
    for name in ("mean", "std"):
        if len(getattr(spec, name)) != channels:
            raise AutoDFPError(f"{spec.name}: {name} has {len(getattr(spec, name))} value(s) "
                               f"but the input has {channels} channel(s)")
    return spec


def _carried_input(model: nn.Module) -> InputSpec:
    """Input fields a model carries as attributes, or in a timm-style config dict."""
    found = {}
    for holder in (getattr(model, "pretrained_cfg", None), getattr(model, "default_cfg", None),
                   {f: getattr(model, f, None) for f in INPUT_FIELDS}):
        if isinstance(holder, dict):
            found.update({f: tuple(holder[f]) for f in INPUT_FIELDS
                          if isinstance(holder.get(f), (tuple, list))})
    try:
        return InputSpec(**found)
    except AutoDFPError as exc:
        raise AutoDFPError(f"{type(model).__name__}'s own input attributes: {exc}") from None


def _check_runs(model: nn.Module, spec: ModelSpec) -> None:
    """One forward pass at the input size: a model that cannot take it fails here, in one line,
    not deep inside tracing; a model must return (batch, classes) logits."""
    size = "x".join(map(str, spec.input_size))
    try:
        with torch.no_grad():
            out = model(spec.example_input())
    except Exception as exc:  # shape errors surface as RuntimeError, ValueError, ...
        raise AutoDFPError(f"{spec.name} does not run on a {size} input ({first_line(exc)}); "
                           "give its input_size C,H,W (or a model card)") \
            from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise AutoDFPError(f"{spec.name} returns {shape} on a {size} input, not (batch, "
                           "classes) logits")
