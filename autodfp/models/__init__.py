"""Model zoo, registry and checkpoint loading.

A model is named either from the registry (``resnet56``) or as ``pkg.module:factory`` (a
zero-argument callable returning an ``nn.Module``), with ``checkpoint`` a path to its weights.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from autodfp.data import shared_dir
from autodfp.errors import AutoDFPError
from autodfp.models import mobilenetv2_cifar, resnet_cifar, vgg_cifar

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """What the library needs to know about a model."""

    name: str
    factory: Callable[[], nn.Module]
    checkpoint: str | None = None
    """File name under ``shared/models/cifar10``; ``None`` when no pretrained weights ship."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: tuple[int, int, int] = (3, 32, 32)
    dataset: str = "cifar10"

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
    ]
}


def get_spec(name: str) -> ModelSpec:
    """The registry entry, or a spec for a ``pkg.module:factory`` user model."""
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        return ModelSpec(name, _import_factory(name))
    raise AutoDFPError(
        f"unknown model {name!r}; choose one of {', '.join(REGISTRY)} or give pkg.module:factory")


def _import_factory(target: str) -> Callable[[], nn.Module]:
    module_name, _, attr = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise AutoDFPError(f"cannot import model factory {target!r}: {exc}") from None
    if not callable(factory):
        raise AutoDFPError(f"model factory {target!r} is not callable")
    return factory


def build_model(name: str, checkpoint: str | Path | None = None, *,
                pretrained: bool = True) -> tuple[nn.Module, ModelSpec]:
    """Instantiate ``name`` in eval mode, loading ``checkpoint`` or the shipped weights.

    ``pretrained=False`` returns the random initialisation (for training or shape work).
    """
    spec = get_spec(name)
    model = spec.factory()
    if not isinstance(model, nn.Module):
        raise AutoDFPError(f"model factory for {name!r} returned {type(model).__name__}, "
                           "not an nn.Module")
    if pretrained:
        path = Path(checkpoint) if checkpoint else spec.default_checkpoint()
        if path is None:
            raise AutoDFPError(
                f"no pretrained weights ship for {name}; train it and pass --checkpoint")
        load_checkpoint(model, path)
    return model.eval(), spec


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (``weights_only``), unwrapped from ``state_dict`` and with
    a ``module.`` (DataParallel) prefix stripped."""
    path = Path(path)
    if not path.is_file():
        raise AutoDFPError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AutoDFPError(f"cannot load checkpoint {path}: {first_line}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AutoDFPError(f"checkpoint {path} holds no state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load weights into ``model``, naming the first key that does not fit."""
    load_state_dict_checked(model, read_state_dict(path), str(path))


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor],
                            source: str) -> None:
    expected = model.state_dict()
    state = dict(state)
    for key, value in expected.items():
        if key not in state and key.endswith("num_batches_tracked"):
            state[key] = value  # checkpoints from before PyTorch 0.4.1 lack this counter
        if key not in state:
            raise AutoDFPError(f"checkpoint {source} does not fit the model: missing key {key!r}")
        if state[key].shape != value.shape:
            raise AutoDFPError(
                f"checkpoint {source} does not fit the model: {key!r} has shape "
                f"{tuple(state[key].shape)}, the model expects {tuple(value.shape)}")
    for key in state:
        if key not in expected:
            raise AutoDFPError(f"checkpoint {source} does not fit the model: unexpected key {key!r}")
    model.load_state_dict(state, strict=True)
