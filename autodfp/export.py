"""Write and read pruned models.

A pruned-model folder holds:

- ``model.pt``: ``{"format", "model", "channels", "strategy", "state_dict"}``, loadable with
  ``torch.load(weights_only=True)``; :func:`load_pruned` rebuilds the architecture from the
  base model and the recorded channel counts, then loads the weights.
- ``model.ts``: TorchScript (traced), loadable with ``torch.jit.load`` alone.
- ``model.onnx``: ONNX (opset 17, dynamic batch) when the exporter works here.
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
from autodfp.graph import ChannelGraph
from autodfp.io import atomic_directory
from autodfp.models import ModelSpec, build_model, load_state_dict_checked
from autodfp.pruning import PrunedModel
from autodfp.strategy import Strategy

MODEL_FORMAT = "autodfp-model/1"


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
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise AutoDFPError(f"pruned model not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AutoDFPError(f"cannot load {path}: {str(exc).strip().splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise AutoDFPError(f"{path} is not an AutoDFP pruned model ({MODEL_FORMAT})")
    strategy = Strategy.from_dict(json.loads(payload["strategy"]))
    model, spec = build_model(payload["model"], pretrained=False)
    shrink_to(model, spec, payload["channels"])
    load_state_dict_checked(model, payload["state_dict"], str(path))
    return model.eval(), spec, strategy


def shrink_to(model: nn.Module, spec: ModelSpec, channels: dict[str, int]) -> None:
    """Give each group of a fresh model the recorded channel count (weights are loaded after)."""
    graph = ChannelGraph(model, spec.example_input())
    for name, count in channels.items():
        group = graph.group(name)
        if not 0 < count <= group.channels:
            raise AutoDFPError(f"recorded channel count {count} for {name} does not fit "
                               f"its {group.channels} channels")
        graph.prune(name, torch.arange(count))
