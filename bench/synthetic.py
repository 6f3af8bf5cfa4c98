"""Which synthetic-image settings calibrate best: the published refinements, one at a time.

    python bench/synthetic.py [--model resnet56] [--keeps 0.5,0.4] [--variants a,b] [--out bench/results]
                              [--threads 2]

For each variant of :class:`autodfp.calibrate.synthetic.SynthConfig`: generation time, then uniform L1
pruning at each keep ratio calibrated by the default refit on those images; accuracy on the
lossless 1,017 test images. A reference row uses the same count of real training images
(JPEG, class-stratified) instead. Writes ``synthetic.json`` and ``synthetic.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from autodfp.calibrate.refit import DEFAULT_CALIBRATION, Calibrator
from autodfp.data import load_split, reward_split, to_tensor
from autodfp.io import atomic_write_text
from autodfp.measure.metrics import accuracy
from autodfp.pipeline import apply_strategy, load_base, uniform_strategy
from autodfp.calibrate.synthetic import synthetic_images

BASE = DEFAULT_CALIBRATION.synth
VARIANTS = {
    "default": {},
    "squared loss": {"loss": "squared"},
    "constant lr": {"cosine": False},
    "+ class CE (1.0)": {"ce_weight": 1.0},
    "+ TV prior (0.05)": {"tv_weight": 0.05},
    "+ L2 prior (0.01)": {"l2_weight": 0.01},
    "+ jitter 2 px + flips": {"jitter": 2, "flip": True},
    "120 steps": {"steps": 120},
    "512 images": {"count": 512},
    "128 images": {"count": 128},
}


def score(base, images, keep: float, test) -> float:
    strategy = uniform_strategy(base[1].name, keep)
    strategy.calibration = dataclasses.replace(DEFAULT_CALIBRATION, count=len(images))
    calibrator = Calibrator.for_model(base[0], base[1], strategy.calibration, images=images)
    pruned = apply_strategy(strategy, (copy.deepcopy(base[0]), base[1]), calibrator=calibrator)
    return accuracy(pruned.model, test, pruned.spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--keeps", default="0.5,0.4")
    parser.add_argument("--variants", help="comma-separated variant names (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keeps = [float(k) for k in args.keeps.split(",")]
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    base = load_base(uniform_strategy(args.model, 1.0))
    test = load_split("test-lossless")
    rows = []
    header = "| images | count | steps | generation s | " + " | ".join(
        f"keep {k} refit %" for k in keeps) + " |"
    print(header + "\n|" + "---|" * (3 + len(keeps) + 1), flush=True)
    for name in names:
        config = dataclasses.replace(BASE, **VARIANTS[name])
        start = time.perf_counter()
        images = synthetic_images(base[0], base[1].input_size, config, use_cache=False)
        seconds = time.perf_counter() - start
        rows.append({"images": f"synthetic: {name}", "count": config.count,
                     "steps": config.steps, "seconds": round(seconds, 1),
                     "accuracy": {str(k): score(base, images, k, test) for k in keeps}})
        _print(rows[-1], keeps)
    real = reward_split(BASE.count, seed=1)
    images = to_tensor(real.x, base[1].mean, base[1].std)
    rows.append({"images": "real training JPEGs (stratified)", "count": len(real), "steps": 0,
                 "seconds": 0.0, "accuracy": {str(k): score(base, images, k, test) for k in keeps}})
    _print(rows[-1], keeps)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "synthetic.json", json.dumps(
        {"model": args.model, "base": BASE.to_dict(), "rows": rows}, indent=1) + "\n")
    table = [header, "|" + "---|" * (3 + len(keeps) + 1)] + [_row(r, keeps) for r in rows]
    atomic_write_text(args.out / "synthetic.md", "\n".join(table) + "\n")
    return 0


def _row(row: dict, keeps) -> str:
    return (f"| {row['images']} | {row['count']} | {row['steps']} | {row['seconds']:.0f} | "
            + " | ".join(f"{row['accuracy'][str(k)]:.2f}" for k in keeps) + " |")


def _print(row: dict, keeps) -> None:
    print(_row(row, keeps), flush=True)


if __name__ == "__main__":
    sys.exit(main())
