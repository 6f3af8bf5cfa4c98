"""Write and read pruned models.

A pruned-model folder holds:

- ``model.pt``: ``{"format", "model", "channels", "strategy", "state_dict"}``, loadable with
  ``torch.load(weights_only=True)``; :func:`load_pruned` rebuilds the architecture from the
  base model and the recorded channel counts, then loads the weights.
- ``model.ts``: TorchScript (traced), loadable with ``torch.jit.load`` alone.
- ``model.onnx``: ONNX (opset 17, dynamic batch) when the exporter works here.
- ``model.q.pt`` (quantized models only): each quantized layer's integer codes packed at its
  bits into one uint8 buffer, the float32 steps (one per output channel) and every other
  float32 tensor in one float buffer, with their index; :func:`load_quantized` rebuilds the
  same fake-quantized weights bit for bit. Its size is in ``report.json``.
- ``strategy.json`` and ``report.json``.

The folder is assembled in a scratch folder and renamed into place: it appears whole or not at all.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from autodfp.errors import AutoDFPError
from autodfp.compress.graph import ChannelGraph
from autodfp.io import atomic_directory
from autodfp.models import ModelSpec, build_model
from autodfp.models.checkpoint import load_state_dict_checked
from autodfp.pipeline import PrunedModel
from autodfp.strategy import Strategy

MODEL_FORMAT = "autodfp-model/1"
QUANT_FORMAT = "autodfp-qmodel/1"


def write_model_folder(pruned: PrunedModel, report: dict, out: Path, *,
                       overwrite: bool = False, onnx: bool = True) -> dict:
    """Write every artefact of ``pruned`` into ``out`` atomically; returns the report written."""
    with atomic_directory(Path(out), overwrite=overwrite) as scratch:
        torch.save(_model_payload(pruned), scratch / "model.pt")
        exports = {"model.pt": "state_dict + architecture (autodfp.export.load_pruned)"}
        example = pruned.spec.example_input()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is what users load
            traced = torch.jit.trace(pruned.model.eval(), example)
            torch.jit.save(traced, str(scratch / "model.ts"))
        exports["model.ts"] = "TorchScript (torch.jit.load)"
        if onnx:
            exports["model.onnx"] = _try_onnx(pruned.model, example, scratch / "model.onnx")
        if pruned.quantized:
            torch.save(_quantized_payload(pruned), scratch / "model.q.pt")
            size = (scratch / "model.q.pt").stat().st_size
            exports["model.q.pt"] = (f"packed integer weights + per-channel steps "
                                     f"(autodfp.export.load_quantized), {size} bytes")
            report = {**report, "compact_file_bytes": size}
        (scratch / "strategy.json").write_text(pruned.strategy.to_json())
        report = {**report, "exports": exports}
        (scratch / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _model_payload(pruned: PrunedModel) -> dict:
    return {
        "format": MODEL_FORMAT,
        "model": pruned.strategy.model,
        "channels": dict(pruned.channels),
        "strategy": pruned.strategy.to_json(),
        "state_dict": {k: v.detach().clone() for k, v in pruned.model.state_dict().items()},
    }


def _quantized_payload(pruned: PrunedModel) -> dict:
    """Two flat buffers (every layer's packed codes; every float32 tensor: steps, biases, BN)
    and their index: one record each keeps the container's per-tensor overhead out."""
    from autodfp.quantize.weights import pack_codes

    codes, floats, layers, tensors, other = [], [], {}, {}, {}
    code_at = float_at = 0

    def add_float(tensor: torch.Tensor) -> list[int]:
        nonlocal float_at
        flat = tensor.detach().reshape(-1).to(torch.float32)
        floats.append(flat)
        float_at += flat.numel()
        return [float_at - flat.numel(), float_at]

    for name, q in pruned.quantized.items():
        packed = pack_codes(q)
        codes.append(packed)
        code_at += packed.numel()
        layers[name] = {"bits": q.bits, "shape": list(q.codes.shape),
                        "codes": [code_at - packed.numel(), code_at], "scale": add_float(q.scale)}
    weights = {f"{name}.weight" for name in pruned.quantized}
    for key, value in pruned.model.state_dict().items():
        if key in weights:
            continue
        if value.dtype == torch.float32:
            tensors[key] = {"shape": list(value.shape), "at": add_float(value)}
        else:
            other[key] = value.detach().clone()
    return {"format": QUANT_FORMAT, "model": pruned.strategy.model,
            "channels": dict(pruned.channels), "strategy": pruned.strategy.to_json(),
            "codes": torch.cat(codes) if codes else torch.zeros(0, dtype=torch.uint8),
            "floats": torch.cat(floats) if floats else torch.zeros(0),
            "layers": layers, "tensors": tensors, "other": other}


def load_quantized(path: str | Path) -> tuple[nn.Module, ModelSpec, Strategy]:
    """Rebuild a quantized model from ``model.q.pt`` (or the folder holding it)."""
    from autodfp.quantize.weights import QuantizedWeight, check_bits, unpack_codes

    path = Path(path)
    if path.is_dir():
        path = path / "model.q.pt"
    payload = _load_payload(path, QUANT_FORMAT)
    try:
        codes, floats = payload["codes"], payload["floats"]
        state = dict(payload["other"])
        for key, entry in payload["tensors"].items():
            start, end = entry["at"]
            state[key] = floats[start:end].reshape(entry["shape"]).clone()
        for name, entry in payload["layers"].items():
            bits, shape = check_bits(entry["bits"]), tuple(entry["shape"])
            start, end = entry["codes"]
            layer_codes = unpack_codes(codes[start:end], bits, shape)
            start, end = entry["scale"]
            state[f"{name}.weight"] = QuantizedWeight(layer_codes, floats[start:end].clone(),
                                                      bits).dequantize()
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise AutoDFPError(f"{path} is damaged: {type(exc).__name__}: {exc}") from None
    return _rebuild(payload, state, path)


def _load_payload(path: Path, expected: str) -> dict:
    if not path.is_file():
        raise AutoDFPError(f"pruned model not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AutoDFPError(f"cannot load {path}: {str(exc).strip().splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != expected:
        kind = "quantized" if expected == QUANT_FORMAT else "pruned"
        raise AutoDFPError(f"{path} is not an AutoDFP {kind} model ({expected})")
    return payload


def _rebuild(payload: dict, state: dict, path: Path) -> tuple[nn.Module, ModelSpec, Strategy]:
    strategy = Strategy.from_dict(json.loads(payload["strategy"]))
    model, spec = build_model(payload["model"], pretrained=False, input_spec=strategy.input)
    shrink_to(model, spec, payload["channels"])
    load_state_dict_checked(model, state, str(path))
    return model.eval(), spec, strategy


def _try_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        return "ONNX opset 17, dynamic batch"
    except Exception as exc:  # exporter availability varies by install; never fail the run
        path.unlink(missing_ok=True)
        return f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def load_pruned(path: str | Path) -> tuple[nn.Module, ModelSpec, Strategy]:
    """Rebuild a pruned model from ``model.pt`` (or the folder holding it)."""
    payload, path = read_model_file(path)
    return _rebuild(payload, payload["state_dict"], path)


def read_model_file(path: str | Path) -> tuple[dict, Path]:
    """The payload of ``model.pt`` (or of the folder holding it), and the file's path."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    return _load_payload(path, MODEL_FORMAT), path


def shrink_to(model: nn.Module, spec: ModelSpec, channels: dict[str, int]) -> None:
    """Give each group of a fresh model the recorded channel count (weights are loaded after)."""
    graph = ChannelGraph(model, spec.example_input(), coupled=True)  # names any group recorded
    for name, count in channels.items():
        group = graph.group(name)
        if not 0 < count <= group.channels:
            raise AutoDFPError(f"recorded channel count {count} for {name} does not fit "
                               f"its {group.channels} channels")
        graph.prune(name, torch.arange(count))
