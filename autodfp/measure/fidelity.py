"""A data-free estimate of how faithful a pruned model is to its parent.

No labelled image is needed: the two models classify held-out synthetic images (made from the
parent's BatchNorm statistics like the calibration images, with another seed, so never seen by
the refit) and the share of images on which their top-1 classes agree is reported. A pruned
model that collapsed (one class for everything, or noise) agrees on few of them, so every
prune can say so, with ``--no-eval`` too. How well the agreement tracks real accuracy is
measured in ``docs/calibration.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from autodfp.errors import AutoDFPError
from autodfp.calibrate.synthetic import SynthConfig, default_config, synthetic_images
from autodfp.models import accepts_channels_last, batched_forward

FIDELITY_IMAGES = 64
"""Held-out synthetic images the estimate uses by default."""
LOW_AGREEMENT_PERCENT = 25.0
"""Below this top-1 agreement a prune prints a ``warning:`` line. On ResNet-20 (30 random
uncalibrated strategies, ``bench/fidelity.py``) every strategy below it had lost at least 31
points of accuracy, and none above it had collapsed; see docs/calibration.md."""
SEED_OFFSET = 1
"""The held-out images' seed is the calibration images' seed plus this: other noise, other
jitter, never the refit's images."""
REWARD_SEED_OFFSET = 2
"""A search's synthetic reward images use the calibration seed + 2: never the refit's images
(seed + 0) nor the fidelity estimate's (seed + 1)."""


@dataclass(frozen=True)
class Fidelity:
    images: int
    """Held-out synthetic images scored."""
    agreement_percent: float
    """Share of them on which the pruned and the unpruned model agree on the top-1 class."""
    kl: float
    """Mean KL(unpruned || pruned) of the softmax outputs, in nats."""
    classes_predicted: int
    """Distinct classes the pruned model predicts on them (1: it collapsed to one class)."""

    @property
    def low(self) -> bool:
        return self.agreement_percent < LOW_AGREEMENT_PERCENT

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "low": self.low,
                "threshold_percent": LOW_AGREEMENT_PERCENT}

    def warning(self) -> str | None:
        if not self.low:
            return None
        return (f"the pruned model agrees with the unpruned one on only "
                f"{self.agreement_percent:.1f} % of {self.images} held-out synthetic images "
                f"(below {LOW_AGREEMENT_PERCENT:g} %; it predicts {self.classes_predicted} "
                "distinct class(es)): it has probably lost much of its accuracy; keep more channels "
                "or calibrate on real unlabeled images (calib_data)")


def fidelity_config(synth: SynthConfig, count: int = FIDELITY_IMAGES) -> SynthConfig:
    """How the held-out images are made: as ``synth`` (the calibration's settings), ``count``
    of them, another seed."""
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        raise AutoDFPError(f"fidelity image count must be a positive integer, got {count!r}")
    return dataclasses.replace(synth, count=count, seed=synth.seed + SEED_OFFSET)


def fidelity_images(model: nn.Module, spec, synth: SynthConfig, *,
                    count: int = FIDELITY_IMAGES, progress: bool = False) -> torch.Tensor:
    """The held-out synthetic images of the unpruned ``model`` (cached like any synthetic set)."""
    return synthetic_images(model, spec.input_size, fidelity_config(synth, count),
                            mean=spec.mean, std=spec.std, progress=progress)


def agreement_set(model: nn.Module, spec, synth: SynthConfig, count: int, *,
                  progress: bool = False):
    """``count`` synthetic images of ``model`` (seed + :data:`REWARD_SEED_OFFSET`) as 8-bit
    images labelled with ``model``'s own top-1 class on them: an
    :class:`autodfp.data.ImageSet` on which a pruned model's accuracy (a percent) is its
    top-1 agreement with ``model``. No labelled image is read."""
    from autodfp.data import ImageSet, to_tensor

    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        raise AutoDFPError(f"synthetic reward image count must be a positive integer, "
                           f"got {count!r}")
    config = dataclasses.replace(synth, count=count, seed=synth.seed + REWARD_SEED_OFFSET)
    images = synthetic_images(model, spec.input_size, config, mean=spec.mean, std=spec.std,
                              progress=progress)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    pixels = ((images * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    x = pixels.permute(0, 2, 3, 1).contiguous().numpy()
    labels = []
    was = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(x), 64):  # labelled on the 8-bit images the reward reads
            batch = to_tensor(x[start:start + 64], spec.mean, spec.std)
            labels.append(model(batch).argmax(1))
    model.train(was)
    return ImageSet(f"synthetic-agreement-{count}", x, torch.cat(labels).numpy(), None)


class FidelityProbe:
    """The unpruned model's log-probabilities on held-out synthetic images, computed when the
    probe is made (before a prune changes the model in place), to estimate a pruned model's
    fidelity after it: each estimate runs the pruned model alone."""

    def __init__(self, reference: torch.Tensor, images: torch.Tensor, channels_last: bool = True):
        self.reference = reference
        self.images = images
        self.channels_last = channels_last

    @classmethod
    def make(cls, model: nn.Module, spec, calibration=None, *, count: int = FIDELITY_IMAGES,
             progress: bool = False) -> "FidelityProbe":
        """Held-out images made like ``calibration``'s synthetic images (a
        :class:`autodfp.calibrate.refit.CalibrationConfig`), or, without synthetic calibration
        images, by the default recipe for the model's input size."""
        synth = (calibration.synth if calibration is not None and calibration.images == "synthetic"
                 else default_config(spec.input_size))
        images = fidelity_images(model, spec, synth, count=count, progress=progress)
        channels_last = accepts_channels_last(model.eval(), images[:1])
        return cls(log_probs(model, images, channels_last=channels_last), images, channels_last)

    def estimate(self, pruned: nn.Module) -> Fidelity:
        """Top-1 agreement and KL of ``pruned`` against the unpruned model."""
        candidate = log_probs(pruned, self.images, channels_last=self.channels_last)
        top = candidate.argmax(1)
        n = len(self.images)
        agree = int((self.reference.argmax(1) == top).sum())
        return Fidelity(n, 100.0 * agree / n, mean_kl(self.reference, candidate),
                        int(top.unique().numel()))


def mean_kl(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean over rows of KL(reference || candidate), in nats, from two N x classes tensors of
    log-probabilities (inf or nan where the candidate's outputs are not finite)."""
    return float(F.kl_div(candidate, reference, log_target=True, reduction="batchmean"))


@torch.no_grad()  # not inference_mode: the model's memory-format copies must stay usable
def log_probs(model: nn.Module, images: torch.Tensor, batch_size: int = 64, *,
              channels_last: bool = True) -> torch.Tensor:
    """Log-softmax outputs (float32) of ``model`` in eval mode on normalised ``images``."""
    was = model.training
    try:
        logits = batched_forward(model.eval(), images, batch_size, channels_last=channels_last)
    finally:
        model.train(was)
    return F.log_softmax(logits.float(), dim=1)
