"""How well the data-free fidelity estimate tracks real accuracy.

Random per-layer strategies (keep ratios uniform in [--low, 1], seeded) of one model are pruned,
optionally calibrated, and scored twice: top-1 agreement with the unpruned model on held-out
synthetic images (:mod:`autodfp.measure.fidelity`, no labelled image) and real top-1 accuracy. Prints
each strategy and the Spearman rank correlation, and how many collapsed strategies the warning
caught.

    python bench/fidelity.py --model resnet20 --strategies 30 --calib none
    python bench/fidelity.py --model resnet20 --strategies 30 --calib refit
    python bench/fidelity.py --model efficientnet_lite1 --strategies 30 --low 0.6 \\
        --select contribution \\
        --data ../shared/data/imagenette/imagenette2_val_224px.tar \\
        --class-index ../shared/data/imagenette/imagenet_class_index.json --score-images 400

``--out FILE`` writes the scores after every strategy; ``--resume`` with the same arguments
measures only the strategies FILE does not hold yet.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from autodfp.calibrate.refit import Calibrator, default_calibration
    from autodfp.data import load_split, load_user_data
    from autodfp.measure.fidelity import LOW_AGREEMENT_PERCENT, FidelityProbe
    from autodfp.measure.metrics import accuracy
    from autodfp.pipeline import apply_strategy, load_base, uniform_strategy
    from autodfp.strategy import LayerAction

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--strategies", type=int, default=30)
    parser.add_argument("--low", type=float, default=0.2, help="lowest per-layer keep")
    parser.add_argument("--calib", choices=("none", "refit"), default="none")
    parser.add_argument("--select", default="l1", help="selection criterion of every strategy")
    parser.add_argument("--fidelity-images", type=int, default=64)
    parser.add_argument("--data", default=None, help="labelled images (default: the lossless "
                                                     "CIFAR-10 1,017)")
    parser.add_argument("--class-index", default=None)
    parser.add_argument("--score-images", type=int, default=0, help="score on this many "
                                                                    "(seeded) images; 0: all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write every strategy's scores and the "
                                                   "correlations to this JSON file")
    parser.add_argument("--resume", action="store_true",
                        help="keep the strategies --out already holds (same arguments) and "
                             "measure only the rest")
    args = parser.parse_args()
    done = resumed_rows(args) if args.resume else []

    template = uniform_strategy(args.model, 1.0, select=args.select, reconstruct="autodfp")
    model, spec = load_base(template)
    if args.data:
        images = load_user_data(args.data, input_size=spec.input_size,
                                class_index=args.class_index)
    else:
        images = load_split("test-lossless")
    if args.score_images:
        pick = np.random.default_rng(args.seed).permutation(len(images))[:args.score_images]
        images = images.subset(np.sort(pick), f"{images.name}-{args.score_images}")
    calibration = default_calibration(spec.input_size) if args.calib == "refit" else None
    probe = FidelityProbe.make(model, spec, calibration, count=args.fidelity_images,
                               progress=True)
    calibrator = (Calibrator.for_model(model, spec, calibration, progress=True)
                  if calibration else None)
    base_acc = accuracy(model, images, spec)
    print(f"{args.model}: unpruned {base_acc:.2f} % on {len(images)} {images.name}; "
          f"calibration {args.calib}; {args.fidelity_images} held-out synthetic images")
    rng = np.random.default_rng(args.seed)
    rows = done[:args.strategies]
    for i in range(args.strategies):
        strategy = copy.deepcopy(template)
        strategy.layers = {name: LayerAction(float(rng.uniform(args.low, 1.0)), 1.0)
                           for name in template.layers}
        if i < len(rows):
            continue  # measured in the run resumed (its keeps drawn to keep the seed's order)
        strategy.calibration = calibrator.config if calibrator else None
        pruned = apply_strategy(strategy, (copy.deepcopy(model), spec), calibrator=calibrator)
        fidelity = probe.estimate(pruned.model)
        acc = accuracy(pruned.model, images, spec)
        rows.append((fidelity.agreement_percent, fidelity.kl, acc))
        print(f"{i:3d}  agreement {fidelity.agreement_percent:6.2f} %  KL {fidelity.kl:7.3f}  "
              f"accuracy {acc:6.2f} %", flush=True)
        write_results(args, base_acc, rows)
    agreement, kl, acc = np.array(rows).T
    rho, rho_kl = write_results(args, base_acc, rows)
    collapsed = acc < base_acc / 2
    warned = agreement < LOW_AGREEMENT_PERCENT
    print(f"Spearman rank correlation (agreement vs accuracy) over {len(rows)} strategies: "
          f"{rho:.3f}; mean KL (the env's synthetic reward is exp(-KL)) vs accuracy: "
          f"{rho_kl:.3f}")
    print(f"accuracy below half the unpruned: {int(collapsed.sum())}, of them warned "
          f"{int((collapsed & warned).sum())}; warned but not collapsed: "
          f"{int((warned & ~collapsed).sum())}")


RESULT_ARGS = ("model", "low", "calib", "select", "fidelity_images", "data", "class_index",
               "score_images", "seed")
"""The arguments a resumed run must share with the one that wrote ``--out``."""


def resumed_rows(args) -> list[tuple[float, float, float]]:
    """The rows ``--out`` holds, if it was written with the same :data:`RESULT_ARGS`."""
    if not args.out or not args.out.is_file():
        return []
    saved = json.loads(args.out.read_text())
    differ = [k for k in RESULT_ARGS if saved["args"].get(k) != str(getattr(args, k))]
    if differ:
        raise SystemExit(f"error: {args.out} was written with other {', '.join(differ)}; "
                         "not resuming it")
    return [(r["agreement_percent"], r["kl"], r["accuracy_percent"]) for r in saved["strategies"]]


def write_results(args, base_acc: float, rows: list[tuple[float, float, float]]
                  ) -> tuple[float, float]:
    """Spearman of the agreement and of the KL against accuracy; with ``--out``, every row and
    both written (after each strategy, so a stopped run keeps what it measured)."""
    from scipy.stats import spearmanr

    agreement, kl, acc = np.array(rows).T
    rho = spearmanr(agreement, acc).statistic if len(rows) > 1 else float("nan")
    rho_kl = spearmanr(kl, acc).statistic if len(rows) > 1 else float("nan")
    if args.out:
        from autodfp.io import atomic_write_text

        atomic_write_text(args.out, json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "unpruned_accuracy_percent":
            base_acc, "spearman_agreement": rho, "spearman_kl": rho_kl,
            "strategies": [{"agreement_percent": a, "kl": k, "accuracy_percent": c}
                           for a, k, c in rows]}, indent=1))
    return rho, rho_kl


if __name__ == "__main__":
    main()
