"""The reward of a strategy (AMC keeps rewards in their own module): prune a copy of the
unpruned model as the strategy says, calibrate it, and score it. Identical strategies are
scored once (cache); each call records where its time went (``last_timing``)."""

from __future__ import annotations

import copy
import time

from autodfp.calibrate.refit import Calibrator
from autodfp.data import ImageSet
from autodfp.errors import AutoDFPError
from autodfp.measure.metrics import ResidentImages, accuracy, resident_accuracy
from autodfp.pipeline import apply_strategy
from autodfp.strategy import Strategy


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AutoDFPError(f"device {device!r} asked for, but no GPU is visible to this process")
    return device


class RewardEvaluator:
    """Top-1 accuracy (a fraction) of the pruned, compensated and calibrated model on the
    reward images. Off the CPU the images are normalised once and stay on the device."""

    def __init__(self, base_model, spec, images: ImageSet, calibrator: Calibrator | None,
                 quant_images=None, *, device: str = "auto", channels_last: bool = False,
                 autocast: bool = False):
        self.base_model, self.spec, self.images = base_model, spec, images
        self.calibrator = calibrator
        self.quant_images = quant_images
        self.device = resolve_device(device)
        self.autocast = autocast
        self.resident = (ResidentImages(images, spec, self.device, channels_last=channels_last)
                         if self.device != "cpu" else None)
        self.cache: dict[str, float] = {}
        self.last_timing: dict = {}

    def __call__(self, strategy: Strategy) -> float:
        key = strategy.to_json()
        self.last_timing = {"surgery_s": 0.0, "calibrate_s": 0.0, "eval_s": 0.0,
                            "cached": key in self.cache}
        if key not in self.cache:
            start = time.perf_counter()
            pruned = apply_strategy(strategy, (copy.deepcopy(self.base_model), self.spec),
                                    calibrator=self.calibrator, quant_images=self.quant_images)
            middle = time.perf_counter()
            self.cache[key] = self.accuracy_percent(pruned.model) / 100.0
            self.last_timing.update(surgery_s=middle - start - pruned.calibrate_s,
                                    calibrate_s=pruned.calibrate_s,
                                    eval_s=time.perf_counter() - middle)
        return self.cache[key]

    def accuracy_percent(self, model) -> float:
        """Top-1 in percent on the reward images."""
        if self.resident is not None:
            return resident_accuracy(model, self.resident, self.spec, autocast=self.autocast)
        return accuracy(model, self.images, self.spec)
