"""Reports: how a pruned model compares with its parent, as a dict and as a printed table."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch.nn as nn

from autodfp.data import ImageSet, cache_dir, load_split
from autodfp.io import atomic_write_text
from autodfp.measure.metrics import Cost, accuracy, latency_ms, model_cost
from autodfp.models import ModelSpec
from autodfp.pipeline import PrunedModel, load_base

REPORT_SPLITS = ("test-lossless", "test-jpeg")


def evaluate_splits(model: nn.Module, spec: ModelSpec, splits: list[ImageSet], *,
                    progress: bool = False) -> dict[str, float]:
    return {s.name: accuracy(model, s, spec, progress=progress) for s in splits}


def base_accuracies(pruned: PrunedModel, splits: list[ImageSet], *,
                    progress: bool = False) -> dict[str, float]:
    """Accuracy of the unpruned parent, cached by checkpoint digest (it never changes)."""
    digest = pruned.strategy.checkpoint_sha256
    fed = pruned.strategy.input.to_dict() if pruned.strategy.input else {}
    if digest and fed:  # the same weights fed another way score differently
        digest += "-" + hashlib.sha256(json.dumps(fed, sort_keys=True).encode()).hexdigest()[:12]
    cache = cache_dir() / f"base-accuracy-{pruned.strategy.model.replace(':', '_')}-{digest}.json"
    known = {}
    if digest and cache.is_file():
        try:
            known = json.loads(cache.read_text())
        except (OSError, json.JSONDecodeError):
            known = {}
    missing = [s for s in splits if s.name not in known or len(s) != known[s.name]["n"]
               or known[s.name].get("digest") != s.digest()]
    if missing:
        model, spec = load_base(pruned.strategy)
        for split in missing:
            known[split.name] = {"n": len(split), "digest": split.digest(),
                                 "acc": accuracy(model, split, spec, progress=progress)}
        if digest:
            atomic_write_text(cache, json.dumps(known, indent=1))
    return {s.name: known[s.name]["acc"] for s in splits}


def build_report(pruned: PrunedModel, splits: list[ImageSet] | None = None, *,
                 base_cost: Cost | None = None, latency: bool = False,
                 progress: bool = False) -> dict:
    if splits is None:
        splits = [load_split(name) for name in REPORT_SPLITS]
    if base_cost is None:
        base_model, _ = load_base(pruned.strategy)
        base_cost = model_cost(base_model, pruned.spec)
    cost = model_cost(pruned.model, pruned.spec, pruned.strategy.layer_bits)
    report = {
        "model": pruned.strategy.model,
        "select": pruned.strategy.select,
        "reconstruct": pruned.strategy.reconstruct,
        "base": {**base_cost.as_dict(),
                 "accuracy": base_accuracies(pruned, splits, progress=progress)},
        "pruned": {**cost.as_dict(),
                   "accuracy": evaluate_splits(pruned.model, pruned.spec, splits,
                                               progress=progress)},
        "ratios": {"macs": cost.macs / base_cost.macs, "params": cost.params / base_cost.params,
                   "weight_bytes": cost.weight_bytes / base_cost.weight_bytes,
                   "bitops": cost.bitops / base_cost.bitops},
        "images": {s.name: len(s) for s in splits},
        "channels": pruned.channels,
        "compensated": pruned.compensated,
        "excluded": pruned.excluded,
        "calibration": (pruned.strategy.calibration.order if pruned.strategy.calibration
                        else "none"),
        "refitted": pruned.refitted,
        "quantized": {"layers": len(pruned.quantized),
                      "bits": sorted({q.bits for q in pruned.quantized.values()}),
                      "compensate": pruned.strategy.quant_config().compensate}
        if pruned.quantized else None,
    }
    if latency:
        report["pruned"]["latency_ms"] = {
            f"batch{b}": latency_ms(pruned.model, pruned.spec, b) for b in (1, 256)}
    return report


def format_report(report: dict) -> str:
    base, pruned = report["base"], report["pruned"]
    rows = [("", "base", "pruned", "ratio"),
            ("MACs (M)", f"{base['macs'] / 1e6:.2f}", f"{pruned['macs'] / 1e6:.2f}",
             f"{report['ratios']['macs']:.3f}"),
            ("params (K)", f"{base['params'] / 1e3:.1f}", f"{pruned['params'] / 1e3:.1f}",
             f"{report['ratios']['params']:.3f}")]
    if report.get("quantized"):
        rows += [("weights (KB)", f"{base['weight_bytes'] / 1e3:.1f}",
                  f"{pruned['weight_bytes'] / 1e3:.1f}",
                  f"{report['ratios']['weight_bytes']:.3f}"),
                 ("BitOPs (G)", f"{base['bitops'] / 1e9:.1f}", f"{pruned['bitops'] / 1e9:.1f}",
                  f"{report['ratios']['bitops']:.3f}")]
    for split, acc in pruned["accuracy"].items():
        before = base["accuracy"][split]
        n = report["images"][split]
        rows.append((f"top-1 {split} ({n}) %", f"{before:.2f}", f"{acc:.2f}",
                     f"{acc - before:+.2f} pt"))
    fidelity = report.get("fidelity")
    if fidelity:
        rows.append((f"top-1 agreement, {fidelity['images']} held-out synthetic %", "100.00",
                     f"{fidelity['agreement_percent']:.2f}",
                     "LOW" if fidelity["low"] else ""))
    for key, value in pruned.get("latency_ms", {}).items():
        rows.append((f"latency {key} (ms)", "", f"{value:.2f}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{report['model']}  select={report['select']}  "
             f"reconstruct={report['reconstruct']}  calibration={report.get('calibration', 'none')}"
             + (f"  weights={'/'.join(map(str, report['quantized']['bits']))}-bit "
                f"({report['quantized']['compensate']})" if report.get("quantized") else "")]
    lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    if report.get("finetune"):
        lines += _finetune_lines(report["finetune"], pruned["accuracy"])
    if not pruned["accuracy"]:
        lines.append("accuracy not measured: no image was read")
    if report.get("excluded"):
        lines.append(f"not pruned: {len(report['excluded'])} group(s), e.g. "
                     f"{next(iter(report['excluded'].items()))[0]}: "
                     f"{next(iter(report['excluded'].values()))}")
    return "\n".join(lines)


def _finetune_lines(record: dict, after: dict) -> list[str]:
    config = record["config"]
    lines = [f"recovery: {config['method']}, {config['epochs']} epoch(s) on {record['data']} "
             f"({record['images']} images, loss {record['loss']}), {record['steps']} steps in "
             f"{record['seconds']:.0f} s"]
    lines += [f"  top-1 {split}: {acc:.2f}% before training -> {after[split]:.2f}% after"
              for split, acc in record["accuracy_before"].items() if split in after]
    method = record.get("method") or {}
    if "zero_share" in method:
        dense = method["dense_layers"]
        lines.append(f"  {method['pattern']}: {method['zero_share']:.1%} of the weights of "
                     f"{method['layers']} layer(s) are zero"
                     + (f"; dense (input count not a multiple of M): {', '.join(dense)}"
                        if dense else ""))
    return lines


def read_report(folder: Path) -> dict:
    return json.loads((Path(folder) / "report.json").read_text())
