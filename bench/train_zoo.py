"""Train zoo models that ship without weights (VGG-16-BN, MobileNetV2) on the CIFAR-10 training
JPEGs, and write their weights (fp16) with the accuracy on the lossless 1,017 test images.

A few minutes a model on one GPU (30 epochs, SGD with Nesterov momentum, lr 0.1, cosine, crop +
flip: the recovery trainer of ``autodfp finetune`` from a random start); on a 2-core CPU one
epoch of VGG-16-BN takes about half an hour, so run it where a GPU is.

    python bench/train_zoo.py --models vgg16_bn,mobilenetv2 --epochs 30 --device cuda
    autodfp eval --model vgg16_bn --checkpoint out/zoo/vgg16_bn-cifar10.pt

Checkpoints are resumable: rerunning the same command continues from the last 100 steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train_one(name: str, args) -> dict:
    from autodfp.data import load_split
    from autodfp.recover.finetune import FinetuneConfig, TrainingImages, train
    from autodfp.io import atomic_writer
    from autodfp.measure.metrics import accuracy
    from autodfp.models import build_model

    model, spec = build_model(name, pretrained=False)
    config = FinetuneConfig(epochs=args.epochs, loss="ce", lr=args.lr, batch_size=args.batch_size,
                            steps_per_epoch=args.steps_per_epoch, seed=args.seed)
    images = TrainingImages.from_image_set(load_split("train-jpeg"))
    out = args.out / f"{name}-cifar10.pt"
    start = time.perf_counter()
    result = train(model, spec, images, config, checkpoint=out.with_suffix(".train-checkpoint.pt"),
                   source_digest=f"random-init-{name}", device=args.device, progress=True)
    seconds = time.perf_counter() - start
    top1 = {split: accuracy(model, load_split(split), spec) for split in args.splits}
    with atomic_writer(out) as fh:
        torch.save({k: v.half() if v.is_floating_point() else v
                    for k, v in model.state_dict().items()}, fh)
    out.with_suffix(".train-checkpoint.pt").unlink(missing_ok=True)
    record = {"model": name, "weights": str(out), "bytes": out.stat().st_size,
              "epochs": args.epochs, "steps": result.steps, "device": _device_name(args.device),
              "seconds": round(seconds, 1), "epoch_losses": result.losses,
              "top1_pct": top1}
    # fp16 weights must score as the fp32 model did
    reloaded, _ = build_model(name, out)
    record["top1_fp16_pct"] = {split: accuracy(reloaded, load_split(split), spec)
                               for split in args.splits}
    return record


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vgg16_bn,mobilenetv2")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help="cap on steps per epoch (smoke tests)")
    parser.add_argument("--splits", default="test-lossless",
                        help="comma-separated test splits to report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "zoo")
    args = parser.parse_args()
    args.splits = args.splits.split(",")
    records = [train_one(name, args) for name in args.models.split(",")]
    print(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
