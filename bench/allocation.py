"""Per-group keeps under a MACs budget, side by side: the uniform keep against the data-free
``contribution`` allocation, each with the L1 and the contribution selection, then top-1.

    python bench/allocation.py --model resnet56 --macs 0.5            # lossless 1,017
    python bench/allocation.py --model resnet56 --macs 0.5 --calib refit
    python bench/allocation.py --model efficientnet_lite1 --macs 0.7 --calib refit \
        --calib-option ridge=0.3 --calib-option refit_after=0 --every 2 --data ... --class-index ...
    python bench/allocation.py --model efficientnet_lite1 --macs 0.7,0.85 --every 8 \
        --data ../shared/data/imagenette/imagenette2_val_224px.tar \
        --class-index ../shared/data/imagenette/imagenet_class_index.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from autodfp.calibrate.refit import default_calibration
    from autodfp.compress.allocation import ALLOCATIONS, allocate_keeps
    from autodfp.data import load_split, load_user_data
    from autodfp.measure.metrics import accuracy, count_macs
    from autodfp.pipeline import apply_strategy, group_layers, load_base, uniform_strategy

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--macs", default="0.5", help="budgets, comma-separated")
    parser.add_argument("--select", default="l1,contribution", help="criteria, comma-separated")
    parser.add_argument("--reconstruct", default="autodfp")
    parser.add_argument("--calib", choices=("none", "refit"), default="none",
                        help="refit: the default synthetic refit after the closed form")
    parser.add_argument("--calib-option", action="append", default=[], metavar="FIELD=VALUE",
                        help="with --calib refit: a CalibrationConfig field other than the "
                             "default for the input size, e.g. ridge=1 (repeatable)")
    parser.add_argument("--data", type=Path, help="labelled images (default: lossless 1,017)")
    parser.add_argument("--class-index", type=Path)
    parser.add_argument("--every", type=int, default=1, help="take every n-th image")
    parser.add_argument("--plot", type=Path, help="also draw top-1 against MACs into this PNG")
    args = parser.parse_args()

    options = calibration_options(args.calib_option)
    model, spec = load_base(uniform_strategy(args.model, 1.0))
    images = (load_user_data(args.data, input_size=spec.input_size, class_index=args.class_index,
                             progress=True) if args.data else load_split("test-lossless"))
    images = images.subset(np.arange(0, len(images), args.every), f"{images.name}/{args.every}")
    base_macs = count_macs(model, spec)
    base_top1 = accuracy(model, images, spec)
    print(f"{args.model} unpruned: {base_top1:.2f}% on {len(images)} "
          f"{images.name}; calibration {args.calib}")
    print("MACs budget  allocation    select        keeps min-mean-max  MACs   top-1 %  seconds")
    rows = []
    for budget in (float(m) for m in args.macs.split(",")):
        for allocation in reversed(ALLOCATIONS):  # uniform first
            keeps = allocate_keeps(model, spec, budget, allocation=allocation)
            shares = np.array(list(keeps.values()))
            for select in args.select.split(","):
                start = time.perf_counter()
                strategy = uniform_strategy(args.model, 1.0, select=select,
                                            reconstruct=args.reconstruct)
                strategy.layers = group_layers(keeps, model)
                if args.calib == "refit":
                    strategy.calibration = default_calibration(spec.input_size, **options)
                pruned = apply_strategy(strategy, load_base(strategy))
                top1 = accuracy(pruned.model, images, spec)
                macs_share = count_macs(pruned.model, spec) / base_macs
                rows.append((allocation, select, macs_share, top1))
                print(f"{budget:<11g}  {allocation:12s}  {select:12s}  "
                      f"{shares.min():.2f}-{shares.mean():.2f}-{shares.max():.2f}      "
                      f"{macs_share:.3f}  {top1:7.2f}  "
                      f"{time.perf_counter() - start:7.0f}", flush=True)
    if args.plot:
        title = (f"{args.model}, {len(images)} {images.name} images, calibration {args.calib}, "
                 "no fine-tuning")
        plot(rows, base_top1, args.plot, title)


def calibration_options(pairs: list[str]) -> dict:
    """FIELD=VALUE pairs as CalibrationConfig fields, each parsed as its default's type."""
    from autodfp.calibrate.refit import DEFAULT_CALIBRATION

    options = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        default = getattr(DEFAULT_CALIBRATION, name, None)
        if default is None or not value:
            sys.exit(f"error: --calib-option wants FIELD=VALUE with a calibration field, got {pair}")
        parse = (lambda v: v.lower() in ("1", "true")) if isinstance(default, bool) else type(default)
        options[name] = parse(value)
    return options


def plot(rows: list[tuple], base_top1: float, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from autodfp.io import atomic_writer

    fig, ax = plt.subplots(figsize=(6, 4))
    for allocation, select in sorted({(r[0], r[1]) for r in rows}, reverse=True):
        points = sorted((m, t) for a, s, m, t in rows if (a, s) == (allocation, select))
        ax.plot(*zip(*points), marker="o", label=f"{allocation} allocation, {select} selection")
    ax.axhline(base_top1, color="grey", linestyle="--", label="unpruned")
    ax.set(xlabel="MACs share of the unpruned model", ylabel="top-1 %", title=title)
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_writer(path) as fh:
        fig.savefig(fh, format="png", dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
