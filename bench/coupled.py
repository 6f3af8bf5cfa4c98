"""Residual-coupled groups pruned or kept, at one MACs budget: the largest uniform keep that fits
with and without them, top-1 of each, and for the coupled groups with and without their mean
folded into the consumers.

    python bench/coupled.py --model efficientnet_lite1 --data IMAGENETTE.tar \
        --class-index imagenet_class_index.json --every 8
    python bench/coupled.py --model resnet56          # option A: nothing coupled is prunable
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from autodfp.measure.costmodel import uniform_keep_for_macs
    from autodfp.data import load_split, load_user_data
    from autodfp.compress.graph import ChannelGraph
    from autodfp.measure.metrics import accuracy, count_macs
    from autodfp.pipeline import apply_strategy, load_base, uniform_strategy

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--macs", type=float, default=0.5)
    parser.add_argument("--reconstruct", default="autodfp")
    parser.add_argument("--data", type=Path, help="labelled images (default: lossless 1,017)")
    parser.add_argument("--class-index", type=Path)
    parser.add_argument("--every", type=int, default=1, help="take every n-th image")
    args = parser.parse_args()

    base_strategy = uniform_strategy(args.model, 1.0)
    model, spec = load_base(base_strategy)
    images = (load_user_data(args.data, input_size=spec.input_size, class_index=args.class_index,
                             progress=True) if args.data else load_split("test-lossless"))
    images = images.subset(np.arange(0, len(images), args.every), f"{images.name}/{args.every}")
    base_macs = count_macs(model, spec)
    graph = ChannelGraph(model, spec.example_input(), coupled=True)
    print(f"{args.model}: {len(graph.groups)} groups with --coupled, "
          f"{sum(1 for g in graph.groups.values() if g.coupled)} of them coupled; "
          f"excluded: {[(g.name, g.reason[:60]) for g in graph.excluded][:2]}")
    print(f"unpruned: {accuracy(model, images, spec, progress=True):.2f}% on {len(images)}")
    print("coupled  coupled-compensation  keep    MACs   top-1 %   seconds")
    for coupled, compensate in ((False, None), (True, True), (True, False)):
        start = time.perf_counter()
        keep = uniform_keep_for_macs(model, spec, base_macs, args.macs, coupled=coupled)
        strategy = uniform_strategy(args.model, keep, reconstruct=args.reconstruct,
                                    coupled=coupled, coupled_mean=bool(compensate))
        pruned = apply_strategy(strategy, load_base(strategy))
        top1 = accuracy(pruned.model, images, spec, progress=True)
        print(f"{str(coupled):7s}  {str(compensate):20s}  {keep:.4f}  "
              f"{count_macs(pruned.model, spec) / base_macs:.3f}  {top1:7.2f}  "
              f"{time.perf_counter() - start:7.0f}", flush=True)


if __name__ == "__main__":
    main()
