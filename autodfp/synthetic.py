"""Synthetic calibration images from the pretrained model alone (no training or test image).

Images are optimised from Gaussian noise so that, at every BatchNorm layer, the batch mean and
variance of the BN *input* match the ``running_mean`` / ``running_var`` the layer stored during
training (ZeroQ, Cai et al. 2020; DeepInversion, Yin et al. 2020). Refinements from those
papers are options of :class:`SynthConfig`; the defaults are the ones measured best under a
laptop budget (``docs/calibration.md``).

Images live in the model's input space (already normalised, float32, N x C x H x W). They are
generated deterministically on the CPU (every random draw comes from one seeded generator) and
cached under ``$AUTODFP_CACHE/synthetic`` keyed by a digest of the model's weights and the
settings, so a second run (a replay, every env runner on a machine) reads them back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from autodfp.data import cache_dir
from autodfp.errors import AutoDFPError
from autodfp.io import atomic_writer

LOSSES = ("norm", "squared")


@dataclass(frozen=True)
class SynthConfig:
    """How synthetic images are made; part of a calibrated strategy (it fixes the images)."""

    count: int = 256
    """Images generated."""
    batch_size: int = 128
    """Images optimised together: BN statistics are matched per batch."""
    steps: int = 60
    """Adam steps per batch (the references use 500-2,000; see docs/calibration.md)."""
    lr: float = 0.1
    """Adam learning rate on the pixels (normalised input space)."""
    cosine: bool = True
    """Cosine decay of the learning rate to 0 over ``steps``."""
    loss: str = "norm"
    """Per BN layer: ``norm`` = ||mean - mu||_2 + ||var - sigma^2||_2 (ZeroQ, DeepInversion),
    ``squared`` = the squared norms."""
    ce_weight: float = 0.0
    """Weight of cross-entropy toward balanced target labels (DeepInversion's class prior)."""
    tv_weight: float = 0.0
    """Weight of the total-variation image prior (mean absolute neighbour difference)."""
    l2_weight: float = 0.0
    """Weight of the L2 image prior (mean squared pixel)."""
    jitter: int = 0
    """Random shifts of up to this many pixels each step (DeepInversion uses 2 at 32 px)."""
    flip: bool = False
    """Random horizontal flips each step."""
    seed: int = 0
    """Seed of the initial noise and the per-step jitter and flips."""

    def __post_init__(self):
        for name in ("count", "batch_size", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise AutoDFPError(f"synthetic image {name} must be a positive integer, "
                                   f"got {value!r}")
        if self.loss not in LOSSES:
            raise AutoDFPError(f"synthetic loss must be one of {', '.join(LOSSES)}, "
                               f"got {self.loss!r}")
        for name in ("lr", "ce_weight", "tv_weight", "l2_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise AutoDFPError(f"synthetic {name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.jitter, int) or self.jitter < 0:
            raise AutoDFPError(f"synthetic jitter must be an integer >= 0, got {self.jitter!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def weights_digest(model: nn.Module) -> str:
    """sha256 of a model's state_dict (names, shapes, dtypes, bytes): the cache key of images
    made from it, whatever file or factory the weights came from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()


def cache_path(model: nn.Module, input_size: tuple[int, ...], config: SynthConfig) -> Path:
    key = json.dumps({"weights": weights_digest(model), "input": list(input_size),
                      "config": config.to_dict(), "version": 1}, sort_keys=True)
    name = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cache_dir() / "synthetic" / f"{name}.pt"


def synthetic_images(model: nn.Module, input_size: tuple[int, ...], config: SynthConfig = SynthConfig(),
                     *, progress: bool = False, use_cache: bool = True) -> torch.Tensor:
    """``config.count`` images for ``model`` (from the cache when made before)."""
    path = cache_path(model, input_size, config)
    if use_cache and path.is_file():
        try:
            images = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(images, torch.Tensor) and images.shape == (config.count, *input_size):
                return images
        except Exception:  # a torn or foreign cache file is regenerated, not trusted
            pass
        path.unlink(missing_ok=True)
    images = generate(model, input_size, config, progress=progress)
    if use_cache:
        with atomic_writer(path) as fh:
            torch.save(images, fh)
    return images


def generate(model: nn.Module, input_size: tuple[int, ...], config: SynthConfig = SynthConfig(),
             *, progress: bool = False) -> torch.Tensor:
    """Optimise ``config.count`` images from noise against the model's BN statistics."""
    from tqdm import tqdm

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.running_mean is not None]
    if not bns:
        raise AutoDFPError("the model has no BatchNorm layer with running statistics: "
                           "synthetic images need them (pass --calib-data instead)")
    generator = torch.Generator().manual_seed(config.seed)
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    batches = []
    sizes = [min(config.batch_size, config.count - s) for s in range(0, config.count, config.batch_size)]
    bar = tqdm(total=len(sizes) * config.steps, desc="synthesising calibration images",
               unit="step", disable=None if progress else True, leave=False)
    try:
        for size in sizes:
            batches.append(_optimise_batch(model, bns, size, input_size, config, generator, bar))
    finally:
        bar.close()
        for p in model.parameters():
            p.requires_grad_(True)
        model.train(was_training)
    return torch.cat(batches)


def _optimise_batch(model, bns, size, input_size, config, generator, bar) -> torch.Tensor:
    x = torch.randn(size, *input_size, generator=generator).requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=config.lr)
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, config.steps)
                if config.cosine else None)
    stats: list[tuple[torch.Tensor, torch.Tensor, nn.Module]] = []

    def hook(module, inputs, output):
        inp = inputs[0]
        dims = [0] + list(range(2, inp.dim()))
        stats.append((inp.mean(dims), inp.var(dims, unbiased=False), module))

    handles = [bn.register_forward_hook(hook) for bn in bns]
    labels = None
    try:
        for _ in range(config.steps):
            stats.clear()
            view = _augment(x, config, generator)
            logits = model(view)
            loss = _bn_loss(stats, config.loss)
            if config.ce_weight > 0:
                if labels is None:
                    labels = torch.arange(size) % logits.shape[1]
                loss = loss + config.ce_weight * F.cross_entropy(logits, labels)
            if config.tv_weight > 0:
                tv = ((x[..., 1:, :] - x[..., :-1, :]).abs().mean()
                      + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())
                loss = loss + config.tv_weight * tv
            if config.l2_weight > 0:
                loss = loss + config.l2_weight * x.pow(2).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if schedule is not None:
                schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    finally:
        for h in handles:
            h.remove()
    return x.detach().clone()


def _augment(x: torch.Tensor, config: SynthConfig, generator: torch.Generator) -> torch.Tensor:
    if config.jitter:
        dy, dx = (torch.randint(-config.jitter, config.jitter + 1, (2,), generator=generator)
                  .tolist())
        x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    if config.flip and bool(torch.rand(1, generator=generator) < 0.5):
        x = torch.flip(x, dims=(-1,))
    return x


def _bn_loss(stats, form: str) -> torch.Tensor:
    total = 0.0
    for mean, var, bn in stats:
        d_mean = mean - bn.running_mean
        d_var = var - bn.running_var
        if form == "norm":
            total = total + d_mean.norm() + d_var.norm()
        else:
            total = total + d_mean.pow(2).sum() + d_var.pow(2).sum()
    return total / max(len(stats), 1)


def to_uint8(images: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised NCHW float images -> uint8 NHWC RGB (for looking at them)."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    pixels = (images * s + m).clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def save_grid(images: torch.Tensor, mean, std, path: Path, *, columns: int = 16,
              scale: int = 2) -> None:
    """A PNG grid of (at most 256 of) the images, each enlarged ``scale`` times."""
    from PIL import Image

    pixels = to_uint8(images[:256], mean, std)
    n, h, w, _ = pixels.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 255, dtype=np.uint8)
    for i, img in enumerate(pixels):
        r, c = divmod(i, columns)
        grid[r * (h + 2) + 1: r * (h + 2) + 1 + h, c * (w + 2) + 1: c * (w + 2) + 1 + w] = img
    picture = Image.fromarray(grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
