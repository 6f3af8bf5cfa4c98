"""Uniform data-free baselines on ResNet-56: every selection x reconstruction pair.

    python bench/baselines.py [--model resnet56] [--keeps 0.8,0.6,0.5,0.4] [--out bench/results]
    python bench/baselines.py --calibrated [--keeps ...]     # the calibration rows

``--calibrated``: L1 selection, every closed-form compensation x calibration order
(:data:`CALIBRATIONS`) on the default synthetic images, plus the default calibration on as many
real training images (the reward split's images, never the test images); writes
``calibrated.json`` and ``calibrated.md`` instead.

Prints a Markdown table (accuracy on the lossless 1,017 and the JPEG 10,000, MACs, params)
and the evaluation throughput beside the fp32 matmul rate measured in the same run; writes
``baselines.json`` and ``baselines.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from autodfp.calibrate.refit import DEFAULT_CALIBRATION, Calibrator
from autodfp.data import load_split, reward_split
from autodfp.io import atomic_write_text
from autodfp.measure.metrics import accuracy, matmul_gflops, model_cost
from autodfp.models import build_model
from autodfp.pipeline import apply_strategy, uniform_strategy

# (label, reconstruct, options, coef)
RECONSTRUCTIONS = [
    ("none", "none", {}, 1.0),
    ("neuron-merging (official: sigma=var)", "neuron-merging", {"nm_sigma": "var"}, 1.0),
    ("neuron-merging (sigma=std, default)", "neuron-merging", {"nm_sigma": "std"}, 1.0),
    ("udfc", "udfc", {}, 1.0),
    ("autodfp coef=0.25 (uniform)", "autodfp", {}, 0.25),
    ("autodfp coef=0.5 (uniform)", "autodfp", {}, 0.5),
]
SELECTIONS = ["l1", "l2", "similarity"]
# (label, reconstruct, coef, calibration order); the full order x compensation grid at keep 0.5
# is in docs/calibration.md
CALIBRATIONS = [
    ("neuron-merging + refit (default)", "neuron-merging", 1.0, "refit"),
    ("none + refit", "none", 1.0, "refit"),
    ("neuron-merging + bn", "neuron-merging", 1.0, "bn"),
    ("neuron-merging + bn+refit", "neuron-merging", 1.0, "bn+refit"),
]


def images_per_second(model, images, spec) -> tuple[float, float]:
    start = time.perf_counter()
    acc = accuracy(model, images, spec)
    return acc, len(images) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--keeps", default="0.8,0.6,0.5,0.4")
    parser.add_argument("--selections", default=",".join(SELECTIONS))
    parser.add_argument("--methods", help="only reconstructions whose label contains this")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw baselines.png from an earlier baselines.json")
    parser.add_argument("--calibrated", action="store_true",
                        help="the calibration rows (L1 selection) instead")
    args = parser.parse_args()
    if args.calibrated:
        return calibrated_rows(args)
    if args.plot_only:
        plot(json.loads((args.out / "baselines.json").read_text())["rows"], args.out)
        return 0
    keeps = [float(k) for k in args.keeps.split(",")]
    selections = args.selections.split(",")
    lossless, jpeg = load_split("test-lossless"), load_split("test-jpeg")

    base, spec = build_model(args.model)
    base_cost = model_cost(base, spec)
    gflops = matmul_gflops()
    base_lossless = accuracy(base, lossless, spec)
    base_jpeg, base_ips = images_per_second(base, jpeg, spec)
    print(f"# {args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cpus", flush=True)
    print(f"fp32 matmul 1024^3: {gflops:.1f} GFLOP/s; unpruned evaluation {base_ips:.0f} images/s "
          f"= {base_ips * base_cost.flops / 1e9:.1f} GFLOP/s "
          f"({base_ips * base_cost.flops / 1e9 / gflops:.0%} of matmul)", flush=True)
    rows = [{"keep": 1.0, "select": "-", "reconstruct": "unpruned", "lossless": base_lossless,
             "jpeg": base_jpeg, "macs": base_cost.macs, "params": base_cost.params,
             "images_per_s": base_ips}]
    print("| keep | select | reconstruct | lossless 1,017 % | JPEG 10,000 % | MACs (M) | "
          "params (K) | eval img/s |")
    print("|---|---|---|---|---|---|---|---|")
    print(_row(rows[0]), flush=True)
    for keep in keeps:
        for select in selections:
            for label, method, options, coef in RECONSTRUCTIONS:
                if args.methods and args.methods not in label:
                    continue
                strategy = uniform_strategy(args.model, keep, select=select,
                                            reconstruct=method, coef=coef, **options)
                pruned = apply_strategy(strategy)
                cost = model_cost(pruned.model, spec)
                jpeg_acc, ips = images_per_second(pruned.model, jpeg, spec)
                row = {"keep": keep, "select": select, "reconstruct": label,
                       "lossless": accuracy(pruned.model, lossless, spec), "jpeg": jpeg_acc,
                       "macs": cost.macs, "params": cost.params, "images_per_s": ips}
                rows.append(row)
                print(_row(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "matmul_gflops": gflops, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    atomic_write_text(args.out / "baselines.json", json.dumps({"meta": meta, "rows": rows},
                                                              indent=1))
    plot(rows, args.out)
    return 0


def calibrated_rows(args) -> int:
    import copy
    import dataclasses

    from autodfp.data import to_tensor
    from autodfp.pipeline import load_base

    keeps = [float(k) for k in args.keeps.split(",")]
    lossless, jpeg = load_split("test-lossless"), load_split("test-jpeg")
    base = load_base(uniform_strategy(args.model, 1.0))
    spec = base[1]
    start = time.perf_counter()
    synthetic = Calibrator.for_model(base[0], spec, DEFAULT_CALIBRATION, progress=True).images
    synth_s = time.perf_counter() - start
    real_set = reward_split(DEFAULT_CALIBRATION.count, seed=1)
    real = to_tensor(real_set.x, spec.mean, spec.std)
    print(f"# {args.model}: {len(synthetic)} synthetic images ({synth_s:.0f} s, cached if 0), "
          f"{len(real)} real training images for the reference rows", flush=True)
    print("| keep | reconstruct + calibration | images | lossless 1,017 % | JPEG 10,000 % | "
          "MACs (M) | calibration s |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    jobs = [(label, method, coef, order, "synthetic", synthetic)
            for label, method, coef, order in CALIBRATIONS]
    jobs.append(("neuron-merging + refit (default)", "neuron-merging", 1.0, "refit", "real", real))
    for keep in keeps:
        for label, method, coef, order, kind, images in jobs:
            strategy = uniform_strategy(args.model, keep, reconstruct=method, coef=coef)
            strategy.calibration = dataclasses.replace(DEFAULT_CALIBRATION, order=order)
            calibrator = Calibrator.for_model(base[0], spec, strategy.calibration, images=images)
            pruned = apply_strategy(strategy, (copy.deepcopy(base[0]), spec),
                                    calibrator=calibrator)
            row = {"keep": keep, "method": label, "images": kind,
                   "lossless": accuracy(pruned.model, lossless, spec),
                   "jpeg": accuracy(pruned.model, jpeg, spec),
                   "macs": model_cost(pruned.model, spec).macs,
                   "calibrate_s": pruned.calibrate_s}
            rows.append(row)
            print(_calibrated_row(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "calibrated.json", json.dumps(
        {"model": args.model, "synthetic_s": synth_s, "calibration":
         DEFAULT_CALIBRATION.to_dict(), "rows": rows}, indent=1))
    table = ["| keep | reconstruct + calibration | images | lossless 1,017 % | JPEG 10,000 % | "
             "MACs (M) | calibration s |", "|---|---|---|---|---|---|---|"]
    atomic_write_text(args.out / "calibrated.md",
                      "\n".join(table + [_calibrated_row(r) for r in rows]) + "\n")
    return 0


def _calibrated_row(r: dict) -> str:
    return (f"| {r['keep']} | {r['method']} | {r['images']} | {r['lossless']:.2f} | "
            f"{r['jpeg']:.2f} | {r['macs'] / 1e6:.1f} | {r['calibrate_s']:.2f} |")


def plot(rows: list[dict], out: Path) -> None:
    """Accuracy (lossless 1,017) against MACs, one panel per selection criterion."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    base = rows[0]
    selections = sorted({r["select"] for r in rows[1:]})
    fig, axes = plt.subplots(1, len(selections), figsize=(5 * len(selections), 4), sharey=True)
    for ax, select in zip(np.atleast_1d(axes), selections):
        for label in dict.fromkeys(r["reconstruct"] for r in rows[1:]):
            pts = sorted((r["macs"] / 1e6, r["lossless"]) for r in rows[1:]
                         if r["select"] == select and r["reconstruct"] == label)
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.axhline(base["lossless"], color="grey", linestyle="--", label="unpruned")
        ax.set(title=f"select={select}", xlabel="MACs (M)")
    np.atleast_1d(axes)[0].set_ylabel("top-1 %, lossless 1,017")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "baselines.png", dpi=110)
    print(f"wrote {out / 'baselines.png'}", file=sys.stderr)


def _row(r: dict) -> str:
    return (f"| {r['keep']} | {r['select']} | {r['reconstruct']} | {r['lossless']:.2f} | "
            f"{r['jpeg']:.2f} | {r['macs'] / 1e6:.1f} | {r['params'] / 1e3:.1f} | "
            f"{r['images_per_s']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
