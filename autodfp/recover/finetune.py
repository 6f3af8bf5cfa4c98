"""Recovery training after the data-free prune, for users who have some data or accept training
on synthetic images: plain fine-tuning, PDP soft masks (:mod:`autodfp.recover.pdp`) and REPrune's
progressive loop (:mod:`autodfp.recover.reprune`).

Losses: cross-entropy on labels, distillation from the unpruned model (KL divergence of the
softened outputs, Hinton et al.), or both. Optimiser: SGD with Nesterov momentum, a linear
warm-up then cosine decay to 0; the learning rate is a pure function of the step, so a run
resumed from its checkpoint takes the same steps as one never stopped. Batches are drawn from a
seeded permutation per epoch and augmented (random crop with padding, horizontal flip) from a
seed per step, for the same reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from autodfp.data import ImageSet, to_tensor
from autodfp.errors import AutoDFPError
from autodfp.models import ModelSpec
from autodfp.recover.method import TrainingMethod
from autodfp.recover.pdp import PDPMasks, SparsityTarget
from autodfp.recover.reprune import REPruneLoop

METHODS = ("plain", "pdp", "reprune")
LOSSES = ("auto", "ce", "kd", "ce+kd")
CHECKPOINT_FORMAT = "autodfp-finetune-checkpoint/1"


@dataclass(frozen=True)
class FinetuneConfig:
    """One recovery run (every field is recorded in the report and the checkpoint)."""

    epochs: int = 1
    """Passes over the training images."""
    method: str = "plain"
    """``plain`` (train the pruned model as it is), ``pdp`` (PDP soft masks toward ``keep`` or
    ``sparsity``), ``reprune`` (REPrune's progressive loop toward ``keep``)."""
    loss: str = "auto"
    """``ce``, ``kd`` (distillation from the unpruned model), ``ce+kd``; ``auto``: ``ce+kd``
    with labelled images, ``kd`` on synthetic ones."""
    batch_size: int = 128
    """Images per step."""
    lr: float = 0.02
    """Peak learning rate (SGD, Nesterov momentum 0.9)."""
    weight_decay: float = 5e-4
    """L2 weight decay."""
    warmup: float = 0.03
    """Share of the steps over which the learning rate rises linearly to ``lr``."""
    kd_temperature: float = 4.0
    """Softening temperature of the distillation loss (scaled by T^2)."""
    kd_weight: float = 0.7
    """Weight of distillation in ``ce+kd`` (cross-entropy gets the rest)."""
    augment: bool = True
    """Random crop (padding of 1/8 of the side) and horizontal flip."""
    steps_per_epoch: int | None = None
    """Cap on steps per epoch (None: the whole set); for smoke tests."""
    keep: float | None = None
    """``pdp`` channel and ``reprune`` target: share of each prunable group's channels kept."""
    sparsity: str | None = None
    """``pdp`` weight target: a share of zero weights (``0.8``) or an ``N:M`` pattern."""
    tau: float = 0.05
    """PDP temperature on mean-normalised scores."""
    ramp: float = 0.5
    """PDP: share of the steps over which the target is approached."""
    seed: int = 0
    """Seed of the batch order and the augmentation."""

    def __post_init__(self):
        if not isinstance(self.epochs, int) or self.epochs <= 0:
            raise AutoDFPError(f"epochs must be a whole number >= 1, got {self.epochs!r}")
        if self.method not in METHODS:
            raise AutoDFPError(f"unknown method {self.method!r}; choose one of "
                               f"{', '.join(METHODS)}")
        if self.loss not in LOSSES:
            raise AutoDFPError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.batch_size <= 0 or (self.steps_per_epoch is not None and self.steps_per_epoch <= 0):
            raise AutoDFPError("batch size and steps per epoch must be positive")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise AutoDFPError(f"learning rate must be a positive number, got {self.lr}")
        for name, low, high in (("kd_weight", 0.0, 1.0), ("warmup", 0.0, 1.0),
                                ("ramp", 1e-9, 1.0), ("tau", 1e-9, math.inf)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and low <= value <= high):
                raise AutoDFPError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")
        if self.method == "plain" and (self.keep is not None or self.sparsity is not None):
            raise AutoDFPError("keep and sparsity go with method pdp or reprune")
        if self.keep is not None and not 0.0 < self.keep < 1.0:
            raise AutoDFPError(f"keep must be in (0, 1) to prune while training, got {self.keep}")
        if self.method == "reprune" and (self.keep is None or self.sparsity is not None):
            raise AutoDFPError("method reprune needs keep (and takes no sparsity)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainingImages:
    """What is trained on: uint8 NHWC images (real) or normalised NCHW tensors (synthetic)."""

    name: str
    x: np.ndarray | torch.Tensor
    y: np.ndarray | None = None
    """Labels, when the images have them."""

    def __len__(self) -> int:
        return len(self.x)

    @classmethod
    def from_image_set(cls, images: ImageSet) -> "TrainingImages":
        return cls(images.name, images.x, images.y)

    def digest(self) -> str:
        """A fingerprint of the labels and a strided sample of the images (a checkpoint must
        not resume onto other data under the same name)."""
        import hashlib

        step = max(1, len(self.x) // 64)
        sample = self.x[::step]
        digest = hashlib.sha256(np.ascontiguousarray(
            sample.numpy() if isinstance(sample, torch.Tensor) else sample).tobytes())
        if self.y is not None:
            digest.update(np.ascontiguousarray(self.y).tobytes())
        return digest.hexdigest()

    def batch(self, index: np.ndarray, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images ``index``, normalised NCHW, with their labels (None without)."""
        if isinstance(self.x, torch.Tensor):
            x = self.x[torch.from_numpy(index)]
        else:
            x = to_tensor(self.x[index], spec.mean, spec.std)
        y = torch.from_numpy(self.y[index]) if self.y is not None else None
        return x, y


def resolve_loss(config: FinetuneConfig, labelled: bool, data: str) -> str:
    """The loss ``auto`` stands for; cross-entropy on images without labels is an error."""
    if config.loss == "auto":
        return "ce+kd" if labelled else "kd"
    if "ce" in config.loss and not labelled:
        raise AutoDFPError(f"{data} has no labels: cross-entropy needs them; use loss kd "
                           "(distillation from the unpruned model)")
    return config.loss


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding (0 = the mean colour after normalisation) and flip."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    out[flip] = out[flip].flip(-1)
    return out


def learning_rate(config: FinetuneConfig, step: int, total: int) -> float:
    warm = max(1, int(config.warmup * total))
    if step < warm:
        return config.lr * (step + 1) / warm
    return 0.5 * config.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, temperature: float):
    return F.kl_div(F.log_softmax(logits / temperature, 1), F.softmax(teacher / temperature, 1),
                    reduction="batchmean") * temperature ** 2


@dataclass
class TrainResult:
    steps: int
    loss: str
    losses: list[float] = field(default_factory=list)
    """Mean training loss of each epoch."""
    method_summary: dict = field(default_factory=dict)
    resumed_from_step: int = 0


def make_method(config: FinetuneConfig, model: nn.Module, spec: ModelSpec):
    """The masks or loop a method drives during training."""
    if config.method == "pdp":
        target = SparsityTarget.parse(config.sparsity, config.keep)
        return PDPMasks(model, spec.example_input(), target, tau=config.tau, ramp=config.ramp)
    if config.method == "reprune":
        return REPruneLoop(model, spec.example_input(), config.keep)
    return TrainingMethod()


def train(model: nn.Module, spec: ModelSpec, images: TrainingImages, config: FinetuneConfig, *,
          teacher: nn.Module | None = None, checkpoint: Path | None = None,
          source_digest: str = "", checkpoint_every: int = 100, device: str = "cpu",
          progress: bool = False) -> TrainResult:
    """Train ``model`` in place on ``device`` (it ends on the CPU); with ``checkpoint``, resume
    from it when it was written by the same run (same config and source) and save to it every
    ``checkpoint_every`` steps."""
    from tqdm import tqdm

    if len(images) == 0:
        raise AutoDFPError(f"{images.name} holds no images to train on")
    loss_kind = resolve_loss(config, images.y is not None, images.name)
    if "kd" in loss_kind and teacher is None:
        raise AutoDFPError("distillation needs the unpruned model")
    method = make_method(config, model, spec)  # traced on the CPU, before the move
    model.to(device)
    per_epoch = math.ceil(len(images) / config.batch_size)
    if config.steps_per_epoch is not None:
        per_epoch = min(per_epoch, config.steps_per_epoch)
    total = per_epoch * config.epochs
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                                weight_decay=config.weight_decay)
    result = TrainResult(0, loss_kind)
    identity = {"config": config.to_dict(), "source": source_digest, "images": images.name,
                "count": len(images), "images_sha256": images.digest()}
    start = _resume(checkpoint, identity, model, optimizer, method, result)
    if teacher is not None:
        teacher.eval().to(device)
    bar = tqdm(total=total, initial=start, desc=f"{config.method} {loss_kind}", unit="step",
               disable=None if progress else True)
    running, started = [], time.perf_counter()
    for step in range(start, total):
        epoch, within = divmod(step, per_epoch)
        order = np.random.default_rng([config.seed, epoch]).permutation(len(images))
        index = np.sort(order[within * config.batch_size:(within + 1) * config.batch_size])
        x, y = images.batch(index, spec)
        if config.augment:
            x = augment(x, torch.Generator().manual_seed(config.seed * 1_000_003 + step))
        x, y = x.to(device), (y.to(device) if y is not None else None)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step, total)
        method.before_step(step, total)
        model.train()
        logits = model(x)
        loss = _loss(loss_kind, logits, y, teacher, x, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_step(step, total)
        running.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(running[-50:]):.3f}", epoch=epoch + 1)
        if progress and bar.disable and (step + 1) % max(1, total // 10) == 0:
            _log_line(step + 1, total, np.mean(running[-50:]), started)
        if within == per_epoch - 1:
            result.losses.append(float(np.mean(running)) if running else float("nan"))
            running = []
        result.steps = step + 1
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == total):
            _save_checkpoint(checkpoint, identity, model, optimizer, method, result)
    bar.close()
    model.eval()
    result.method_summary = method.finish()
    model.cpu()
    if teacher is not None:
        teacher.cpu()
    result.resumed_from_step = start
    return result


def _log_line(step: int, total: int, loss: float, started: float) -> None:
    """Progress for logs, where the bar is off (stderr is not a terminal)."""
    import sys

    print(f"step {step}/{total}, loss {loss:.3f}, {time.perf_counter() - started:.0f} s",
          file=sys.stderr, flush=True)


def _loss(kind: str, logits, labels, teacher, x, config: FinetuneConfig) -> torch.Tensor:
    terms = {}
    if "ce" in kind:
        terms["ce"] = F.cross_entropy(logits, labels)
    if "kd" in kind:
        with torch.no_grad():
            target = teacher(x)
        terms["kd"] = distillation_loss(logits, target, config.kd_temperature)
    if len(terms) == 2:
        return (1 - config.kd_weight) * terms["ce"] + config.kd_weight * terms["kd"]
    return next(iter(terms.values()))


def _save_checkpoint(path: Path, identity: dict, model, optimizer, method, result) -> None:
    from autodfp.io import atomic_writer

    state = {"format": CHECKPOINT_FORMAT, "identity": json.dumps(identity, sort_keys=True),
             "step": result.steps, "losses": result.losses, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(),
             "method": method.state_dict()}
    with atomic_writer(path) as fh:
        torch.save(state, fh)


def _resume(path: Path | None, identity: dict, model, optimizer, method, result) -> int:
    """The step to start from: 0, or the checkpoint's when it belongs to this same run."""
    if path is None or not path.is_file():
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AutoDFPError(f"cannot read the finetune checkpoint {path}: "
                           f"{str(exc).strip().splitlines()[0]}; delete it or restart") \
            from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise AutoDFPError(f"{path} is not an AutoDFP finetune checkpoint; delete it or "
                           "restart")
    if state.get("identity") != json.dumps(identity, sort_keys=True):
        raise AutoDFPError(f"the checkpoint {path} belongs to a different finetune (other "
                           "settings, source or data); restart to start afresh")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        method.load_state_dict(state["method"])
        result.losses = [float(v) for v in state["losses"]]
        result.steps = int(state["step"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise AutoDFPError(f"the finetune checkpoint {path} is damaged ({type(exc).__name__}); "
                           "restart") from None
    return result.steps



TRAIN_DATA_CIFAR = "cifar10-train"
SYNTHETIC_TRAIN_IMAGES = 1024


def training_images(data: str, teacher: nn.Module, spec: ModelSpec, *,
                    synthetic_count: int = SYNTHETIC_TRAIN_IMAGES,
                    progress: bool = False) -> TrainingImages:
    """The images ``--data`` names: the CIFAR-10 training JPEGs, synthetic images made from
    the unpruned ``teacher`` (no labels), or a user ImageFolder tree / ``.npz``."""
    from autodfp.data import load_split, load_user_data
    from autodfp.measure.metrics import check_labelled_images

    if data == "synthetic":
        from autodfp.calibrate.synthetic import default_config, synthetic_images

        config = dataclasses.replace(default_config(spec.input_size), count=synthetic_count)
        images = synthetic_images(teacher, spec.input_size, config, mean=spec.mean,
                                  std=spec.std, progress=progress)
        return TrainingImages(f"synthetic-{synthetic_count}", images)
    if data == TRAIN_DATA_CIFAR:
        if spec.dataset != "cifar10":
            raise AutoDFPError(f"{spec.name} is not a CIFAR-10 model; give your own labelled "
                               "images as data")
        images = load_split("train-jpeg")
    else:
        images = load_user_data(data, input_size=spec.input_size, progress=progress)
    check_labelled_images(images, teacher, spec)
    return TrainingImages.from_image_set(images)
