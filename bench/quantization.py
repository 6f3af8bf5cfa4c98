"""Data-free weight quantization on ResNet-56: plain rounding against each compensation.

    python bench/quantization.py [--keeps 1.0,0.8,0.5] [--bits 8,6,5,4,3]
                                 [--methods none,udfc,dfq,udfc+dfq,calibrate,calibrate-bias]
                                 [--splits test-lossless,test-jpeg] [--out bench/results]

Each keep ratio is pruned once (L1, ``autodfp`` coef 0.5 when pruned, the default refit on the
default 256 synthetic images; keep 1.0: the pretrained weights as they are), then every
bits x compensation is applied to a copy (the ``calibrate`` methods use the same synthetic
images). Clipping: ``auto`` (``mse`` under ``calibrate``, ``max`` otherwise). Accuracy on the
lossless 1,017 and the JPEG 10,000 test images (never used by any step).

Writes ``quantization.json`` and ``quantization.md`` under ``--out``; prints the table as rows
finish.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from autodfp.calibrate.refit import DEFAULT_CALIBRATION, calibration_images
from autodfp.data import load_split
from autodfp.io import atomic_write_text
from autodfp.measure.metrics import accuracy, model_cost
from autodfp.pipeline import apply_strategy, load_base, uniform_strategy
from autodfp.measure.metrics import conv_and_linear_layers
from autodfp.quantize.weights import QuantConfig, quantize_model

SPLIT_LABELS = {"test-lossless": "lossless 1,017", "test-jpeg": "JPEG 10,000"}


def pruned_float(model_name: str, keep: float):
    """The pruned, calibrated float model of a keep ratio (the pretrained one at 1.0)."""
    if keep >= 1.0:
        return load_base(uniform_strategy(model_name, 1.0))
    strategy = uniform_strategy(model_name, keep, reconstruct="autodfp", coef=0.5)
    strategy.calibration = DEFAULT_CALIBRATION
    pruned = apply_strategy(strategy)
    return pruned.model, pruned.spec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--keeps", default="1.0,0.8,0.5")
    parser.add_argument("--bits", default="8,6,5,4,3")
    parser.add_argument("--methods", default="none,udfc,dfq,udfc+dfq,calibrate,calibrate-bias")
    parser.add_argument("--clip", default="auto", help="clipping rule for every method")
    parser.add_argument("--splits", default="test-lossless,test-jpeg")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default="quantization", help="output file stem")
    args = parser.parse_args()

    splits = [load_split(name) for name in args.splits.split(",")]
    base, spec = load_base(uniform_strategy(args.model, 1.0))
    images, _ = calibration_images(DEFAULT_CALIBRATION, base, spec, progress=True)
    rows = []
    header = ("| keep | MACs | bits | compensation | KB | "
              + " | ".join(SPLIT_LABELS[s.name] for s in splits) + " |")
    print(header + "\n|" + "---|" * (header.count("|") - 1), flush=True)
    for keep in map(float, args.keeps.split(",")):
        model, spec = pruned_float(args.model, keep)
        floats = {s.name: accuracy(model, s, spec) for s in splits}
        cost = model_cost(model, spec)
        row = {"keep": keep, "macs": cost.macs, "bits": None, "method": "float",
               "weight_bytes": cost.weight_bytes, "accuracy": floats}
        rows.append(row)
        _print(row, splits)
        for bits in map(int, args.bits.split(",")):
            layer_bits = {name: bits for name in conv_and_linear_layers(model)}
            for method in args.methods.split(","):
                quantized = copy.deepcopy(model)
                start = time.perf_counter()
                quantize_model(quantized, layer_bits, QuantConfig(compensate=method,
                                                                  clip=args.clip),
                               spec.example_input(), images)
                seconds = time.perf_counter() - start
                row = {"keep": keep, "macs": cost.macs, "bits": bits, "method": method,
                       "clip": args.clip,
                       "weight_bytes": model_cost(quantized, spec, layer_bits).weight_bytes,
                       "quantize_s": round(seconds, 2),
                       "accuracy": {s.name: accuracy(quantized, s, spec) for s in splits}}
                rows.append(row)
                _print(row, splits)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{args.name}.json", json.dumps(
        {"model": args.model, "images": {s.name: len(s) for s in splits}, "rows": rows},
        indent=1) + "\n")
    atomic_write_text(args.out / f"{args.name}.md", "\n".join(
        [header, "|" + "---|" * (header.count("|") - 1)] + [_line(r, splits) for r in rows])
        + "\n")
    return 0


def _line(row: dict, splits) -> str:
    accs = " | ".join(f"{row['accuracy'][s.name]:.2f}" for s in splits)
    bits = "float" if row["bits"] is None else str(row["bits"])
    return (f"| {row['keep']:.1f} | {row['macs'] / 1e6:.1f}M | {bits} | {row['method']} | "
            f"{row['weight_bytes'] / 1e3:.0f} | {accs} |")


def _print(row: dict, splits) -> None:
    print(_line(row, splits) + f"  ({row.get('quantize_s', 0):.1f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
