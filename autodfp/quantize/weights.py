"""Data-free k-bit weight quantization with compensation (the other half of UDFC).

**Rounding rule.** Per output channel, symmetric and uniform: ``L = 2^(k-1) - 1`` levels each
side of zero, step ``scale = clip / L``, codes ``q = clamp(round(w / scale), -L, L)`` with
``torch.round`` (half to even), weight ``w_q = q * scale`` in float32. A channel therefore holds
at most ``2L + 1 = 2^k - 1`` distinct values (63 at 6 bits). **Clipping rule**
(:attr:`QuantConfig.clip`): ``max`` takes ``clip = max |w|``; ``mse`` picks, per channel, the
clip in ``{1.00, 0.98, ..., 0.50} x max |w|`` with the least squared weight error; ``auto``
(default) is ``mse`` under ``calibrate`` and ``max`` otherwise.

**Compensation** (:attr:`QuantConfig.compensate`), after the rounding, in forward order; the
derivations are in ``docs/quantization.md``:

``none``
    plain rounding.
``udfc``
    UDFC's closed-form scale on the next layer's matching input channel:
    ``s = E[h h_q] / E[h_q^2]`` (least ``E (h - s h_q)^2``) for the activations after BN and
    ReLU, under the BN Gaussian model of our UDFC pruning compensation; applied where a
    producer feeds its consumers through BN and ReLU (a prunable group's structure).
``dfq``
    DFQ's bias correction (Nagel et al. 2019): the expected output shift
    ``E[(w_q - w) . x]``, with ``E x`` from the BN that feeds the layer through a ReLU
    (rectified-Gaussian mean), is removed through the bias or the following BN's
    ``running_mean``. Layers whose input is not one BN's ReLU (residual sums, the image) are
    left as they are.
``udfc+dfq``
    both.
``calibrate``
    on the calibration images (synthetic by default: still no data), each quantized layer's
    output channels get the least-squares scale and shift that map its quantized output to the
    float model's, in forward order on the quantized model's own activations.
``calibrate-bias``
    the same with the shift alone (DFQ's empirical bias correction, on synthetic images).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from autodfp.calibrate.refit import sample_positions
from autodfp.errors import AutoDFPError
from autodfp.measure.metrics import conv_and_linear_layers
from autodfp.settings import check_choice, from_mapping

MIN_BITS, MAX_BITS = 2, 8
"""Activations stay float: BitOPs are counted as MACs x weight bits x 32."""
COMPENSATIONS = ("none", "udfc", "dfq", "udfc+dfq", "calibrate", "calibrate-bias")
CLIPS = ("auto", "max", "mse")
_CLIP_GRID = np.linspace(1.0, 0.5, 26)


@dataclass(frozen=True)
class QuantConfig:
    """How the layers a strategy gives ``bits`` are quantized."""

    compensate: str = "calibrate"
    """``none``, ``udfc``, ``dfq``, ``udfc+dfq`` or ``calibrate`` (on the strategy's
    calibration images, else the default synthetic ones; a library call without images falls
    back to ``dfq``). Measured in ``docs/quantization.md``."""
    clip: str = "auto"
    """``max`` (clip at the largest magnitude), ``mse`` (least squared weight error) or
    ``auto``: ``mse`` with ``calibrate`` (whose scale fit undoes the clipping's shrinkage),
    ``max`` otherwise (measured: ``mse`` without it loses 14 points at 3 bits)."""
    positions: int = 16
    """``calibrate``: sampled output positions per image."""
    seed: int = 0
    """``calibrate``: seed of the sampled positions."""

    def __post_init__(self):
        check_choice(self.compensate, COMPENSATIONS, "quantization compensation")
        check_choice(self.clip, CLIPS, "quantization clip")
        if not isinstance(self.positions, int) or self.positions <= 0:
            raise AutoDFPError(f"quantization positions must be a positive integer, "
                               f"got {self.positions!r}")

    def clip_rule(self, method: str) -> str:
        if self.clip != "auto":
            return self.clip
        return "mse" if method == "calibrate" else "max"  # calibrate-bias fits no scale

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        return from_mapping(cls, data, "quantization")


def check_bits(bits, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise AutoDFPError(f"{what} must be a whole number from {MIN_BITS} to {MAX_BITS}, "
                           f"got {bits!r}")
    return bits


@dataclass
class QuantizedWeight:
    """Integer codes and a float32 step per output channel: ``weight = codes * scale``."""

    codes: torch.Tensor
    """int8, the weight's shape, in ``[-L, L]``."""
    scale: torch.Tensor
    """float32, one per output channel."""
    bits: int

    def dequantize(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.codes.dim() - 1)
        return self.codes.to(torch.float32) * self.scale.view(shape)

    def rescale(self, factor: torch.Tensor) -> None:
        self.scale = (self.scale.double() * factor.double()).to(torch.float32)


def quantize_weight(weight: torch.Tensor, bits: int, clip: str = "max") -> QuantizedWeight:
    """Per-output-channel symmetric uniform codes of ``weight`` (see the module docstring)."""
    check_bits(bits)
    levels = 2 ** (bits - 1) - 1
    w = weight.detach().to(torch.float32).reshape(weight.shape[0], -1)
    absmax = w.abs().amax(dim=1)
    ratios = _CLIP_GRID if clip == "mse" else _CLIP_GRID[:1]
    best_err = torch.full_like(absmax, math.inf)
    best_scale = torch.ones_like(absmax)
    for ratio in ratios:
        scale = torch.where(absmax > 0, absmax * float(ratio) / levels, torch.ones_like(absmax))
        q = torch.clamp(torch.round(w / scale[:, None]), -levels, levels)
        err = ((q * scale[:, None] - w) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    codes = torch.clamp(torch.round(w / best_scale[:, None]), -levels, levels)
    return QuantizedWeight(codes.to(torch.int8).reshape(weight.shape), best_scale, bits)


def udfc_scales(weight: torch.Tensor, quantized: QuantizedWeight, bn: nn.Module) -> np.ndarray:
    """UDFC's per-channel factor for the next layer's matching input channel:
    ``s = E[h h_q] / E[h_q^2]`` with ``h = relu(a)``, ``h_q = relu(a_q)`` under the BN Gaussian
    model (``a ~ N(beta, gamma^2 var / (var + eps))``; isotropic inputs give ``a_q`` the std
    scaled by ``|w_q| / |w|`` and correlation ``cos(w, w_q)`` with ``a``)."""
    from autodfp.compress.reconstruction import BNStats, relu_cross_moments

    w = weight.detach().double().reshape(weight.shape[0], -1)
    wq = quantized.dequantize().double().reshape(weight.shape[0], -1)
    norm, norm_q = w.norm(dim=1), wq.norm(dim=1)
    mean, sd = BNStats.of(bn).activation_gaussian()
    scales = np.ones(len(mean))
    for c in range(len(mean)):
        if norm[c] == 0 or norm_q[c] == 0 or sd[c] == 0:
            continue
        rho = float((w[c] @ wq[c]) / (norm[c] * norm_q[c]))
        sds = np.array([sd[c], sd[c] * float(norm_q[c] / norm[c])])
        moments = relu_cross_moments(np.array([mean[c], mean[c]]), sds,
                                     np.array([[1.0, rho], [rho, 1.0]]))
        if moments[1, 1] > 1e-12:
            scales[c] = moments[0, 1] / moments[1, 1]
    return scales


def quantize_model(model: nn.Module, bits: dict[str, int], config: QuantConfig,
                   example_input: torch.Tensor, images: torch.Tensor | None = None,
                   graph=None) -> dict[str, QuantizedWeight]:
    """Quantize the named layers of ``model`` in place and compensate; returns their codes.

    ``images`` (normalised, NCHW) are needed for ``calibrate``; without them it falls back to
    ``dfq``. ``graph``: the model's :class:`autodfp.compress.graph.ChannelGraph` if the caller has one
    (it is built here otherwise).
    """
    from autodfp.compress.graph import ChannelGraph

    layers = conv_and_linear_layers(model)
    unknown = sorted(set(bits) - set(layers))
    if unknown:
        raise AutoDFPError(f"layer {unknown[0]!r} cannot be quantized (not a conv or linear "
                           "layer of the model)")
    method = config.compensate
    if method.startswith("calibrate") and images is None:
        method = "dfq"
    clip = config.clip_rule(method)
    names = [n for n in layers if n in bits]
    graph = graph if graph is not None else ChannelGraph(model, example_input)
    following = {layers[n]: graph.following_bn[layers[n]] for n in names
                 if layers[n] in graph.following_bn}
    float_model = copy.deepcopy(model).eval() if method.startswith("calibrate") else None
    input_means = _input_means(model, example_input, names) if "dfq" in method else {}
    foldable = {}
    if "udfc" in method:  # producer -> BN -> ReLU -> consumers: the consumers take the factor
        foldable = {n: g for n, g in graph.groups.items() if g.reconstructable}
    quantized = {}
    with torch.no_grad():
        for name in names:
            module = layers[name]
            original = module.weight.detach().clone()
            q = quantize_weight(original, check_bits(bits[name], f"bits of {name}"), clip)
            module.weight.copy_(q.dequantize().to(module.weight.dtype))
            if "udfc" in method and name in foldable:
                group = foldable[name]
                scales = torch.from_numpy(udfc_scales(original, q, group.bn))
                for consumer in group.consumers.values():  # quantized later, in forward order
                    shape = (1, -1) + (1,) * (consumer.weight.dim() - 2)
                    consumer.weight.mul_(scales.view(shape).to(consumer.weight.dtype))
            if "dfq" in method and input_means.get(name) is not None:
                shift = _expected_output_shift(module, module.weight - original,
                                               input_means[name])
                _remove_output_shift(module, following.get(module), shift)
            quantized[name] = q
    if method.startswith("calibrate"):
        _calibrate(float_model, model, {n: quantized[n] for n in names}, following, images,
                   config, fit_scale=method == "calibrate")
    return quantized


# -- DFQ bias correction ----------------------------------------------------------------

_PASS_THROUGH = ("ViewBackward", "ReshapeAliasBackward", "UnsafeViewBackward", "CloneBackward",
                 "MeanBackward", "AdaptiveAvgPool2DBackward", "AvgPool2DBackward",
                 "ContiguousBackward")


def _input_means(model: nn.Module, example_input: torch.Tensor,
                 names: list[str]) -> dict[str, torch.Tensor | None]:
    """Expected input of each named layer, per input channel, from the BN that feeds it
    through a ReLU (averaging and reshapes keep the mean); None where no BN does."""
    from autodfp.compress.reconstruction import BNStats, relu_mean

    model = copy.deepcopy(model).eval()
    bn_of: dict = {}
    found: dict[str, torch.Tensor | None] = {}
    modules = dict(model.named_modules())

    def bn_hook(module, inputs, output):
        bn_of[output.grad_fn] = module

    def layer_hook(name):
        def hook(module, inputs):
            fn = inputs[0].grad_fn
            while fn is not None and type(fn).__name__.rstrip("0123456789") in _PASS_THROUGH:
                fn = fn.next_functions[0][0]
            if fn is None or type(fn).__name__.rstrip("0123456789") != "ReluBackward":
                found[name] = None
                return
            bn = bn_of.get(fn.next_functions[0][0])
            if bn is None:
                found[name] = None
                return
            mean, sd = BNStats.of(bn).activation_gaussian()
            found[name] = torch.from_numpy(relu_mean(mean, sd))
        return hook

    handles = [m.register_forward_hook(bn_hook) for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles += [modules[n].register_forward_pre_hook(layer_hook(n)) for n in names]
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        with torch.enable_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return found


def _expected_output_shift(module: nn.Module, delta: torch.Tensor,
                           input_mean: torch.Tensor) -> torch.Tensor:
    """``E[delta . x]`` per output channel for inputs with per-channel mean ``input_mean``
    (interior pixels: every tap sees the mean)."""
    delta = delta.double()
    if isinstance(module, nn.Linear):
        if delta.shape[1] != len(input_mean):  # e.g. a flatten of C x H x W
            return torch.zeros(delta.shape[0], dtype=torch.float64)
        return delta @ input_mean.double()
    summed = delta.sum(dim=(2, 3))                       # (O, C/groups)
    groups = module.groups
    per_group = summed.shape[1]
    out_per_group = delta.shape[0] // groups
    channel = (torch.arange(delta.shape[0])[:, None] // out_per_group) * per_group + \
        torch.arange(per_group)[None, :]
    return (summed * input_mean.double()[channel]).sum(1)


def _remove_output_shift(module: nn.Module, bn: nn.Module | None, shift: torch.Tensor) -> None:
    if module.bias is not None:
        module.bias -= shift.to(module.bias.dtype)
    elif bn is not None and bn.running_mean is not None:
        bn.running_mean += shift.to(bn.running_mean.dtype)


# -- calibration on images ----------------------------------------------------------------

@torch.no_grad()
def _calibrate(float_model: nn.Module, model: nn.Module, quantized: dict[str, QuantizedWeight],
               following: dict, images: torch.Tensor, config: QuantConfig, *,
               fit_scale: bool = True) -> None:
    """Per output channel, least-squares scale (``fit_scale``, else 1) and shift from the
    quantized layer's output (on the quantized model's own activations) to the float model's
    (same sampled rows)."""
    generator = torch.Generator().manual_seed(config.seed)
    rows: dict[str, tuple] = {}
    targets: dict[str, torch.Tensor] = {}
    float_layers = conv_and_linear_layers(float_model)

    def record(name):
        def hook(module, inputs, output):
            if output.dim() == 4:
                n, _, h, w = output.shape
                index = sample_positions(n, h, w, min(config.positions, h * w), generator)
                rows[name] = index
                targets[name] = output[index[0], :, index[1], index[2]].double()
            else:
                rows[name] = None
                targets[name] = output.double()
        return hook

    handles = [float_layers[n].register_forward_hook(record(n)) for n in quantized]
    try:
        float_model(images)
    finally:
        for h in handles:
            h.remove()

    layers = conv_and_linear_layers(model)

    def correct(name):
        def hook(module, inputs, output):
            bias = module.bias
            raw = output - bias.view(1, -1, *([1] * (output.dim() - 2))) if bias is not None \
                else output
            index = rows[name]
            x = (raw[index[0], :, index[1], index[2]] if index is not None else raw).double()
            y = targets[name]
            x_mean, y_mean = x.mean(0), y.mean(0)
            xc = x - x_mean
            var = (xc * xc).mean(0)
            scale = torch.ones_like(var)
            if fit_scale:
                scale = torch.where(var > 1e-20,
                                    (xc * (y - y_mean)).mean(0) / var.clamp_min(1e-20),
                                    scale).clamp(0.5, 2.0)
            shift = y_mean - scale * x_mean
            quantized[name].rescale(scale)
            module.weight.copy_(quantized[name].dequantize().to(module.weight.dtype))
            bn = following.get(module)
            if bias is not None:
                bias.copy_(shift.to(bias.dtype))
            elif bn is not None:
                # the BN reads scale * raw; subtracting shift from its mean adds shift
                bn.running_mean -= shift.to(bn.running_mean.dtype)
            else:
                shift = torch.zeros_like(shift)
            shape = (1, -1, *([1] * (output.dim() - 2)))
            corrected = raw.double() * scale.view(shape)
            if bias is not None:
                corrected = corrected + shift.view(shape)
            return corrected.to(output.dtype)
        return hook

    handles = [layers[n].register_forward_hook(correct(n)) for n in quantized]
    was_training = model.training
    try:
        model.eval()(images)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def distinct_values_per_channel(weight: torch.Tensor) -> int:
    """The most distinct values any output channel of ``weight`` holds."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    return max(int(torch.unique(row).numel()) for row in rows)


# -- compact file ---------------------------------------------------------------------------

def pack_codes(q: QuantizedWeight) -> torch.Tensor:
    """The codes as ``bits``-bit unsigned integers (code + L), packed into uint8."""
    levels = 2 ** (q.bits - 1) - 1
    unsigned = (q.codes.reshape(-1).to(torch.int16) + levels).to(torch.uint8).numpy()
    bits = np.unpackbits(unsigned[:, None], axis=1)[:, 8 - q.bits:]
    return torch.from_numpy(np.packbits(bits.reshape(-1)))


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    levels = 2 ** (bits - 1) - 1
    count = math.prod(shape)
    flat = np.unpackbits(packed.numpy())[: count * bits].reshape(count, bits)
    padded = np.concatenate([np.zeros((count, 8 - bits), dtype=np.uint8), flat], axis=1)
    unsigned = np.packbits(padded, axis=1).reshape(-1).astype(np.int16)
    return torch.from_numpy(unsigned - levels).to(torch.int8).reshape(shape)

