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

import copy
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
    coarse_steps: int = 0
    """Adam steps at ``coarse_scale`` of the input side before the ``steps`` at full size
    (DeepInversion's multi-resolution schedule): the images are upsampled (bilinear) in between.
    Each stage has its own cosine decay."""
    coarse_scale: float = 0.5
    """Side of the coarse stage, as a share of the input side."""
    first_bn_weight: float = 1.0
    """Weight of the first BN layer's loss relative to the others (DeepInversion: 10)."""
    clip: bool = False
    """Keep every pixel inside the valid [0, 1] range (in the normalised space) after each step."""
    channels_last: bool = False
    """Run the optimisation in channels-last memory order (2x faster on a CPU at 224 px;
    the images differ from the default order's in the last bits, hence a setting)."""
    bfloat16: bool = False
    """Run the model's forward pass under bfloat16 autocast (the BN statistics and the loss
    stay float32): faster where the CPU has bfloat16 instructions (docs/calibration.md)."""

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
        if (not isinstance(self.coarse_steps, int) or isinstance(self.coarse_steps, bool)
                or self.coarse_steps < 0):
            raise AutoDFPError(f"synthetic coarse_steps must be an integer >= 0, "
                               f"got {self.coarse_steps!r}")
        if (not isinstance(self.coarse_scale, (int, float)) or isinstance(self.coarse_scale, bool)
                or not 0.0 < self.coarse_scale <= 1.0):
            raise AutoDFPError(f"synthetic coarse_scale must be in (0, 1], "
                               f"got {self.coarse_scale!r}")
        if (not isinstance(self.first_bn_weight, (int, float))
                or not math.isfinite(self.first_bn_weight) or self.first_bn_weight < 0):
            raise AutoDFPError(f"synthetic first_bn_weight must be a finite number >= 0, "
                               f"got {self.first_bn_weight!r}")
        for name in ("cosine", "flip", "clip", "channels_last", "bfloat16"):
            if not isinstance(getattr(self, name), bool):
                raise AutoDFPError(f"synthetic {name} must be true or false, "
                                   f"got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


LARGE_INPUT_SIDE = 64
"""Inputs whose side is larger than this (ImageNet-style models) get :func:`large_input_config`."""


def large_input_config(input_size: tuple[int, ...]) -> SynthConfig:
    """DeepInversion's recipe under a CPU budget, for inputs larger than 64 px: 60 Adam steps
    at half the side, then 6 at full size (multi-resolution), pixels kept in range, jitter of
    1/8 of the side, flips, the first BN layer's loss weighted 10x, lr 0.25, channels-last
    (measured in ``docs/calibration.md``: the images show object parts where the plain recipe
    gives noise, and 64 of them take 159 s for EfficientNet-Lite1 at 240 px on 2 cores, where
    the plain recipe's 60 full-size steps take about 3x as long). Batches of 64: 256 images in
    batches of 128 peaked at 18.5 GB of memory."""
    side = max(input_size[-2:])
    return SynthConfig(batch_size=64, coarse_steps=60, steps=6, coarse_scale=0.5, clip=True,
                       jitter=side // 8,
                       flip=True, first_bn_weight=10.0, lr=0.25, channels_last=True)


def default_config(input_size: tuple[int, ...]) -> SynthConfig:
    """The default synthetic images for a model of this input size: the plain BN-matching recipe
    measured best on 32-px CIFAR models, or :func:`large_input_config` above 64 px."""
    if max(input_size[-2:]) > LARGE_INPUT_SIDE:
        return large_input_config(input_size)
    return SynthConfig()


def weights_digest(model: nn.Module) -> str:
    """sha256 of a model's state_dict (names, shapes, dtypes, bytes): the cache key of images
    made from it, whatever file or factory the weights came from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()


def cache_path(model: nn.Module, input_size: tuple[int, ...], config: SynthConfig,
               mean=None, std=None) -> Path:
    key = {"weights": weights_digest(model), "input": list(input_size),
           "config": config.to_dict(), "version": 1}
    if config.clip:
        key["normalisation"] = [list(mean), list(std)]
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "synthetic" / f"{name}.pt"


def synthetic_images(model: nn.Module, input_size: tuple[int, ...], config: SynthConfig = SynthConfig(),
                     *, mean=None, std=None, progress: bool = False,
                     use_cache: bool = True) -> torch.Tensor:
    """``config.count`` images for ``model`` (from the cache when made before). ``mean`` and
    ``std`` (the model's input normalisation) are needed when ``config.clip`` is on."""
    path = cache_path(model, input_size, config, mean, std)
    if use_cache and path.is_file():
        try:
            images = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(images, torch.Tensor) and images.shape == (config.count, *input_size):
                return images
        except Exception:  # a torn or foreign cache file is regenerated, not trusted
            pass
        path.unlink(missing_ok=True)
    images = generate(model, input_size, config, mean=mean, std=std, progress=progress)
    if use_cache:
        with atomic_writer(path) as fh:
            torch.save(images, fh)
    return images


def generate(model: nn.Module, input_size: tuple[int, ...], config: SynthConfig = SynthConfig(),
             *, mean=None, std=None, progress: bool = False) -> torch.Tensor:
    """Optimise ``config.count`` images from noise against the model's BN statistics (on a
    copy of ``model``, which is left as it was)."""
    from tqdm import tqdm

    if config.clip and (mean is None or std is None):
        raise ValueError("clipping synthetic images needs the model's mean and std")
    model = copy.deepcopy(model).eval()
    bns = _bn_layers(model)
    if not bns:
        raise AutoDFPError("the model has no BatchNorm layer with running statistics: "
                           "synthetic images need them (calibrate on real unlabeled images: calib_data)")
    for p in model.parameters():
        p.requires_grad_(False)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    bounds = None
    if config.clip:
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        bounds = (-m / s, (1 - m) / s)
    generator = torch.Generator().manual_seed(config.seed)
    batches = []
    sizes = [min(config.batch_size, config.count - s) for s in range(0, config.count, config.batch_size)]
    bar = tqdm(total=len(sizes) * (config.coarse_steps + config.steps),
               desc="synthesising calibration images", unit="step",
               disable=None if progress else True, leave=False)
    try:
        for size in sizes:
            batches.append(_optimise_batch(model, bns, size, input_size, config, generator,
                                           bar, bounds))
    finally:
        bar.close()
    return torch.cat(batches)


def _bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.running_mean is not None]


def has_bn_statistics(model: nn.Module) -> bool:
    """Whether synthetic images can be made for ``model`` (it has BN running statistics)."""
    return bool(_bn_layers(model))


def _optimise_batch(model, bns, size, input_size, config, generator, bar, bounds) -> torch.Tensor:
    channels, height, width = input_size
    stages = [((height, width), config.steps)]
    if config.coarse_steps:
        coarse = (max(1, round(height * config.coarse_scale)),
                  max(1, round(width * config.coarse_scale)))
        stages.insert(0, (coarse, config.coarse_steps))
    x = torch.randn(size, channels, *stages[0][0], generator=generator)
    stats: list[tuple[torch.Tensor, torch.Tensor, nn.Module]] = []

    def hook(module, inputs, output):
        inp = inputs[0].float()
        if inp.dim() == 4 and inp.is_contiguous(memory_format=torch.channels_last):
            # a (pixels, channels) view and E[x^2] - E[x]^2: 20 % faster than var over dims
            # (0, 2, 3), the hooks costing about as much as the depthwise net itself
            flat = inp.permute(0, 2, 3, 1).reshape(-1, inp.shape[1])
            mean = flat.mean(0)
            stats.append((mean, (flat * flat).mean(0) - mean * mean, module))
            return
        dims = [0] + list(range(2, inp.dim()))
        stats.append((inp.mean(dims), inp.var(dims, unbiased=False), module))

    handles = [bn.register_forward_hook(hook) for bn in bns]
    labels = None
    try:
        for (side, steps) in stages:
            if x.shape[-2:] != side:
                x = F.interpolate(x, size=side, mode="bilinear", align_corners=False)
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x = x.detach().requires_grad_(True)
            jitter = round(config.jitter * side[-1] / width)
            optimiser = torch.optim.Adam([x], lr=config.lr)
            schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
                        if config.cosine else None)
            for _ in range(steps):
                stats.clear()
                view = _augment(x, jitter, config.flip, generator)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bfloat16):
                    logits = model(view)
                logits = logits.float()
                loss = _bn_loss(stats, config.loss, config.first_bn_weight)
                if config.ce_weight > 0:
                    if labels is None:
                        labels = _balanced_labels(size, logits.shape[1], generator)
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
                if bounds is not None:
                    with torch.no_grad():
                        x.copy_(torch.maximum(torch.minimum(x, bounds[1]), bounds[0]))
                if schedule is not None:
                    schedule.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    finally:
        for h in handles:
            h.remove()
    return x.detach().contiguous().clone()


def _balanced_labels(size: int, classes: int, generator: torch.Generator) -> torch.Tensor:
    """Targets of the class prior: the classes in a seeded order, each once before any twice
    (a batch of 128 on an ImageNet model asks for 128 different classes)."""
    order = torch.randperm(classes, generator=generator)
    return order[torch.arange(size) % classes]


def _augment(x: torch.Tensor, jitter: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    if jitter:
        dy, dx = (torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist())
        x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    if flip and bool(torch.rand(1, generator=generator) < 0.5):
        x = torch.flip(x, dims=(-1,))
    return x


def _bn_loss(stats, form: str, first_weight: float = 1.0) -> torch.Tensor:
    total = 0.0
    for i, (mean, var, bn) in enumerate(stats):
        d_mean = mean - bn.running_mean
        d_var = var - bn.running_var
        if form == "norm":
            term = d_mean.norm() + d_var.norm()
        else:
            term = d_mean.pow(2).sum() + d_var.pow(2).sum()
        total = total + (first_weight * term if i == 0 else term)
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
