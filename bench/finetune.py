"""Recovery after the data-free prune, at one MACs budget: each method through `autodfp
finetune`, as a user runs it, on one table.

Rows: the data-free result (uniform keep at the budget, default calibration on synthetic
images); then, at equal epochs on the CIFAR-10 training JPEGs, fine-tuning with cross-entropy,
distillation and both; distillation on synthetic images (as many steps as a real epoch); PDP
channel masks and REPrune's loop, both from the unpruned model toward the same budget. Accuracy
on the lossless 1,017 and the JPEG 10,000 test images; MACs counted on each exported model.

    python bench/finetune.py --model resnet20 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TRAIN_IMAGES = 50_000


def autodfp(*args) -> None:
    done = subprocess.run([sys.executable, "-m", "launch.cli", *map(str, args)], cwd=ROOT,
                          text=True, stderr=subprocess.PIPE)
    if done.returncode:
        raise SystemExit(f"autodfp {' '.join(map(str, args))} failed:\n{done.stderr[-2000:]}")


def row(name: str, folder: Path, seconds: float) -> dict:
    report = json.loads((folder / "report.json").read_text())
    acc = report["pruned"]["accuracy"]
    return {"method": name, "macs_ratio": report["ratios"]["macs"],
            "lossless_pct": acc["test-lossless"], "jpeg_pct": acc["test-jpeg"],
            "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--macs", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--methods", default="ce,kd,ce+kd,synthetic-kd,pdp,reprune")
    parser.add_argument("--synthetic-images", type=int, default=1024)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench-finetune")
    args = parser.parse_args()
    work = args.work / f"{args.model}-macs{args.macs:g}"
    work.mkdir(parents=True, exist_ok=True)
    start_folder = work / "data-free"
    rows = []
    if not (start_folder / "report.json").is_file():
        from autodfp.measure.costmodel import uniform_keep_for_macs
        from autodfp.measure.metrics import model_cost
        from autodfp.models import build_model

        model, spec = build_model(args.model)
        keep = uniform_keep_for_macs(model, spec, model_cost(model, spec).macs, args.macs)
        start = time.perf_counter()
        autodfp("prune", "--model", args.model, "--keep", keep, "--no-onnx", "--force",
                "--out", start_folder)
        rows.append(row(f"data-free (uniform keep {keep:.3f}, refit)", start_folder,
                        time.perf_counter() - start))
    else:
        strategy = json.loads((start_folder / "strategy.json").read_text())
        keep = max(layer["keep"] for layer in strategy["layers"].values())
        rows.append({**row(f"data-free (uniform keep {keep:.3f}, refit)", start_folder, 0.0),
                     "reused": True})
    synthetic_epochs = args.epochs * math.ceil(TRAIN_IMAGES / args.synthetic_images)
    runs = {
        "ce": ([start_folder, "--data", "cifar10-train", "--loss", "ce"], "fine-tune CE"),
        "kd": ([start_folder, "--data", "cifar10-train", "--loss", "kd"], "fine-tune KD"),
        "ce+kd": ([start_folder, "--data", "cifar10-train", "--loss", "ce+kd"],
                  "fine-tune CE+KD"),
        "synthetic-kd": ([start_folder, "--data", "synthetic", "--synthetic-images",
                          args.synthetic_images, "--epochs", synthetic_epochs],
                         f"KD on {args.synthetic_images} synthetic images"),
        "pdp": (["--model", args.model, "--method", "pdp", "--macs", args.macs, "--data",
                 "cifar10-train"], "PDP channel masks from unpruned, CE+KD"),
        "reprune": (["--model", args.model, "--method", "reprune", "--macs", args.macs,
                     "--data", "cifar10-train"], "REPrune loop from unpruned, CE+KD"),
    }
    for method in args.methods.split(","):
        command, label = runs[method]
        out = work / f"{method}-{args.epochs}ep"
        extra = [] if "--epochs" in command else ["--epochs", args.epochs]
        start = time.perf_counter()
        autodfp("finetune", *command, *extra, "--no-onnx", "--force", "--restart", "--out", out)
        rows.append(row(f"{label}, {args.epochs} epoch-equivalent(s)", out,
                        time.perf_counter() - start))
        print(json.dumps(rows[-1]), flush=True)
    write(rows, args)


def write(rows: list[dict], args) -> None:
    """Write this run's rows, keeping earlier rows of the same file for other methods."""
    name = f"finetune-{args.model}-{args.epochs}ep"
    earlier = RESULTS / f"{name}.json"
    if earlier.is_file():
        before = json.loads(earlier.read_text())["rows"]
        known = {r["method"].split(" (")[0] for r in before}
        rows = [r for r in rows if not (r.pop("reused", False) and r["method"].split(" (")[0]
                                        in known)]
        fresh = {r["method"].split(" (")[0] for r in rows}
        rows = [r for r in before if r["method"].split(" (")[0] not in fresh] + rows
    rows = sorted(({k: v for k, v in r.items() if k != "reused"} for r in rows),
                  key=lambda r: not r["method"].startswith("data-free"))
    header = (f"{args.model} at <= {args.macs:g} of the MACs, {args.epochs} epoch(s) of "
              "recovery (2-core CPU)")
    lines = [header, "", "| method | MACs | lossless % | JPEG % | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['macs_ratio']:.3f} | {r['lossless_pct']:.2f} | "
              f"{r['jpeg_pct']:.2f} | {r['seconds']:.0f} |" for r in rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"header": header, "rows": rows},
                                                     indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
