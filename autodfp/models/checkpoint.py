"""Reading weights files (``weights_only``) into a model, naming what does not fit."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from autodfp.errors import AutoDFPError


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (``weights_only``), unwrapped from ``state_dict`` and with
    a ``module.`` (DataParallel) prefix stripped."""
    path = Path(path)
    if not path.is_file():
        raise AutoDFPError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise AutoDFPError(f"cannot load checkpoint {path}: {first_line(exc)}") from None
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
