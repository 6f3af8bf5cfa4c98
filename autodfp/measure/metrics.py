"""Cost and quality of a model: MACs/FLOPs, parameters, weight bytes, BitOPs, top-1 accuracy,
latency."""

from __future__ import annotations

import collections
import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from autodfp.data import ImageSet, to_tensor
from autodfp.errors import AutoDFPError
from autodfp.models import ModelSpec


@dataclass(frozen=True)
class Cost:
    macs: int
    """Multiply-accumulates of one forward pass at batch 1 (Torch-Pruning's counter)."""
    params: int
    weight_bytes: int = 0
    """Bytes to store parameters and buffers, quantized layers at their bits
    (:func:`autodfp.quantize.weights.weight_bytes`)."""
    bitops: int = 0
    """Conv and linear MACs x weight bits x activation bits (activations float: 32)."""

    @property
    def flops(self) -> int:
        """2 x MACs; papers on CIFAR ResNets often call MACs "FLOPs" (ResNet-56: 125.5M MACs)."""
        return 2 * self.macs

    def as_dict(self) -> dict:
        return {**asdict(self), "flops": self.flops}


FLOAT_BITS = 32
"""Bits of a float32 weight or activation (the unit of BitOPs and of a bits budget)."""
ACTIVATION_BITS = FLOAT_BITS
"""Activations stay float."""


def conv_and_linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every conv and linear layer, by module name, in forward-definition order (the layers
    whose MACs are counted and whose weights can be quantized)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def layer_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs of every conv and linear layer at batch 1."""
    macs: dict[str, int] = {}
    handles = []
    for name, module in conv_and_linear_layers(model).items():
        def hook(module, inputs, output, name=name):
            per_output = module.weight[0].numel()  # in/groups x kh x kw, or in_features
            macs[name] = int(output[0].numel() * per_output)
        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return macs


def weight_bytes(model: nn.Module, bits: dict[str, int] | None = None) -> int:
    """Bytes to store the model: each quantized layer's weight at its bits (packed) plus a
    float32 step per output channel; every other parameter and buffer at its own size
    (``num_batches_tracked`` counters excluded)."""
    bits = bits or {}
    layers = conv_and_linear_layers(model)
    quantized = {id(layers[n].weight) for n in bits if n in layers}
    total = 0
    for name, b in bits.items():
        if name in layers:
            weight = layers[name].weight
            total += math.ceil(weight.numel() * b / 8) + 4 * weight.shape[0]
    for p in model.parameters():
        if id(p) not in quantized:
            total += p.numel() * p.element_size()
    for name, buf in model.named_buffers():
        if not name.endswith("num_batches_tracked"):
            total += buf.numel() * buf.element_size()
    return int(total)


def bitops(model: nn.Module, example_input: torch.Tensor, bits: dict[str, int] | None = None
           ) -> int:
    """Sum over conv and linear layers of MACs x weight bits x activation bits (32: float)."""
    bits = bits or {}
    return int(sum(m * bits.get(n, FLOAT_BITS) * ACTIVATION_BITS
                   for n, m in layer_macs(model, example_input).items()))


def model_cost(model: nn.Module, spec: ModelSpec, bits: dict[str, int] | None = None) -> Cost:
    """Cost of ``model``; ``bits``: layer name -> weight bits of its quantized layers."""
    macs, params = _count_ops_and_params(model, spec.example_input())
    return Cost(int(macs), int(params), weight_bytes(model, bits),
                bitops(model, spec.example_input(), bits))


def count_macs(model: nn.Module, spec: ModelSpec) -> int:
    """:attr:`Cost.macs` alone."""
    return int(_count_ops_and_params(model, spec.example_input())[0])


def _count_ops_and_params(model: nn.Module, example: torch.Tensor) -> tuple[float, float]:
    """Torch-Pruning's counter, which looks modules up by exact type: subclasses of the layers
    it knows (e.g. EfficientNet's ``Conv2dStaticSamePadding``) are registered with their
    base's hook first, or they would count as zero MACs."""
    from torch_pruning.utils import op_counter

    for module in model.modules():
        kind = type(module)
        if kind not in op_counter.MODULES_MAPPING:
            base = next((b for b in kind.__mro__[1:] if b in op_counter.MODULES_MAPPING), None)
            if base is not None:
                op_counter.CUSTOM_MODULES_MAPPING[kind] = op_counter.MODULES_MAPPING[base]
    return tp.utils.count_ops_and_params(model, example)


def predict(model: nn.Module, images: ImageSet, spec: ModelSpec, *,
            batch_size: int | None = None,
            device: str | torch.device = "cpu", progress: bool = False) -> np.ndarray:
    """Predicted class of every image."""
    return _predict(model, images, spec, batch_size=batch_size, device=device,
                    progress=progress)[0]


def eval_batch_size(spec: ModelSpec) -> int:
    """500 CIFAR-size images a batch; fewer for larger inputs, so that a batch's activations
    stay about as large (an ImageNet model at 224 with 500 images would need gigabytes)."""
    pixels = spec.input_size[1] * spec.input_size[2]
    return max(8, min(500, 500 * 32 * 32 // pixels))


@torch.inference_mode()
def _predict(model: nn.Module, images: ImageSet, spec: ModelSpec, *,
             batch_size: int | None = None,
             device: str | torch.device = "cpu",
             progress: bool = False) -> tuple[np.ndarray, int]:
    """Predicted classes and the model's number of outputs."""
    from tqdm import tqdm

    _check_not_empty(images)
    check_input_size(images, spec)
    batch_size = batch_size or eval_batch_size(spec)
    model = model.eval().to(device)
    predictions, classes = [], 0
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=f"evaluating {images.name}", unit="batch",
                      disable=None if progress else True, leave=False):
        x = to_tensor(images.x[start:start + batch_size], spec.mean, spec.std).to(device)
        logits = model(x)
        classes = logits.shape[1]
        predictions.append(logits.argmax(1).cpu())
    return torch.cat(predictions).numpy(), int(classes)


def accuracy(model: nn.Module, images: ImageSet, spec: ModelSpec, **kwargs) -> float:
    """Top-1 accuracy in percent."""
    predictions, classes = _predict(model, images, spec, **kwargs)
    _check_labels(images, classes, spec)
    return float((predictions == images.y).mean() * 100.0)


RESIDENT_FLOAT_BYTES = 256 * 2**20
"""Up to this size a :class:`ResidentImages` keeps its images normalised (float32); a larger
set (an ImageNet-size reward set) stays uint8 and is normalised one batch at a time."""


class ResidentImages:
    """A labelled set kept on ``device`` for repeated scoring (a search's reward set: no
    decoding, and on a GPU no host-to-device copy, per episode). ``channels_last``: stored as
    NHWC in memory, the layout oneDNN's and cuDNN's fast convolutions want. ``order``: the
    images in this order (a seeded shuffle makes every prefix a random sample)."""

    def __init__(self, images: ImageSet, spec: ModelSpec, device: str | torch.device,
                 channels_last: bool = False, order: np.ndarray | None = None):
        _check_not_empty(images)
        check_input_size(images, spec)
        self.name, self.num_classes, self.channels_last = images.name, images.num_classes, channels_last
        index = np.arange(len(images)) if order is None else np.asarray(order)
        x = np.asarray(images.x[:])[index]
        self.labels = np.asarray(images.y)[index]
        self.mean, self.std, self.device = spec.mean, spec.std, torch.device(device)
        self.normalised = x.size * 4 <= RESIDENT_FLOAT_BYTES
        self.x = self._normalise(x) if self.normalised else torch.from_numpy(np.ascontiguousarray(x))
        self.y = torch.as_tensor(self.labels, device=self.device)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, start: int, stop: int) -> torch.Tensor:
        """Images ``start:stop``, normalised, NCHW (channels-last in memory if asked), on the
        device (a uint8 set stays on the host and goes over one batch at a time)."""
        return self.x[start:stop] if self.normalised else self._normalise(self.x[start:stop].numpy())

    def _normalise(self, x: np.ndarray) -> torch.Tensor:
        t = to_tensor(x, self.mean, self.std).to(self.device)
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t


def cpu_eval_batch_size(spec: ModelSpec) -> int:
    """Batch of :func:`resident_correct` on a CPU: 128 CIFAR-size images (measured fastest on
    ResNet-56 among 32-1,000: the activations stay in cache), fewer for larger inputs."""
    pixels = spec.input_size[1] * spec.input_size[2]
    return max(4, min(128, 128 * 32 * 32 // pixels))


def _resident_logits(model: nn.Module, images: ResidentImages, spec: ModelSpec, start: int,
                     stop: int, batch_size: int | None, autocast: bool):
    """The model's logits on images ``start:stop``, a batch at a time (the model is put on the
    images' device, in eval mode and their memory layout). ``autocast``: float16 on a GPU,
    bfloat16 on a CPU, where the layers allow it."""
    device = images.device
    model = model.eval().to(device)
    if images.channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch_size = batch_size or (cpu_eval_batch_size(spec) if device.type == "cpu"
                                else eval_batch_size(spec))
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    with torch.autocast(device.type, dtype=dtype, enabled=autocast):
        for begin in range(start, stop, batch_size):
            end = min(begin + batch_size, stop)
            yield begin, end, model(images.batch(begin, end))


@torch.inference_mode()
def resident_correct(model: nn.Module, images: ResidentImages, spec: ModelSpec,
                     start: int = 0, stop: int | None = None, *,
                     batch_size: int | None = None, autocast: bool = False) -> int:
    """How many of images ``start:stop`` the model classifies correctly (see
    :func:`_resident_logits` for the layout and ``autocast``)."""
    stop = len(images) if stop is None else stop
    correct, classes = torch.zeros((), dtype=torch.int64, device=images.device), 0
    for begin, end, logits in _resident_logits(model, images, spec, start, stop, batch_size,
                                               autocast):
        classes = logits.shape[1]
        correct += (logits.argmax(1) == images.y[begin:end]).sum()
    _check_labels(images, classes, spec)
    return int(correct.item())


@torch.inference_mode()
def resident_log_probs(model: nn.Module, images: ResidentImages, spec: ModelSpec, *,
                       batch_size: int | None = None, autocast: bool = False) -> torch.Tensor:
    """The model's log-softmax outputs (float32, N x classes, on the images' device) on every
    image of ``images``, batched and laid out as :func:`resident_correct` scores them."""
    return torch.cat([torch.log_softmax(logits.float(), dim=1) for _, _, logits in
                      _resident_logits(model, images, spec, 0, len(images), batch_size,
                                       autocast)])


def resident_accuracy(model: nn.Module, images: ResidentImages, spec: ModelSpec, *,
                      batch_size: int | None = None, autocast: bool = False) -> float:
    """Top-1 accuracy in percent on every image of ``images``."""
    return resident_correct(model, images, spec, batch_size=batch_size,
                            autocast=autocast) / len(images) * 100.0


def fold_batchnorm(model: nn.Module, plan: list[tuple[str, str]] | None = None, *,
                   inplace: bool = False) -> nn.Module:
    """An inference version of ``model`` with the BatchNorms of ``plan`` (default:
    :func:`batchnorm_fold_plan` of ``model``) folded into the layers before them, each BN
    replaced by an identity in ``model``'s own forward: the same outputs to the bit as
    ``torch.fx``'s conv-BN fusion, fewer passes over the activations. A plan made on the
    unpruned model serves every pruned copy (they keep its module names) without a trace each.
    ``inplace``: change ``model``'s modules instead of a copy's."""
    model = (model if inplace else copy.deepcopy(model)).eval()
    for conv_name, bn_name in batchnorm_fold_plan(model) if plan is None else plan:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        fuse_eval = fuse_linear_bn_eval if isinstance(conv, nn.Linear) else fuse_conv_bn_eval
        model.set_submodule(conv_name, fuse_eval(conv, bn))
        model.set_submodule(bn_name, nn.Identity())
    return model


FOLD_PATTERNS = [(nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d),
                 (nn.Conv3d, nn.BatchNorm3d), (nn.Linear, nn.BatchNorm1d)]
"""(layer, BatchNorm) pairs that fold, as ``torch.fx.experimental.optimization.fuse`` has them."""


def batchnorm_fold_plan(model: nn.Module) -> list[tuple[str, str]]:
    """The (layer, BatchNorm) module names ``torch.fx``'s conv-BN fusion would fold in
    ``model``, found by one trace: a BN whose only input is the output of a conv (or linear)
    that nothing else reads, each module called once. Empty where the model cannot be traced.
    Tracing once per model instead of once per pruned copy: the fold of a ResNet-56 41 -> 13 ms."""
    from torch.fx.experimental.optimization import matches_module_pattern

    try:
        graph = torch.fx.symbolic_trace(model.eval()).graph
    except Exception:  # noqa: BLE001 - any trace failure: nothing folded
        return []
    modules = dict(model.named_modules())
    calls = collections.Counter(node.target for node in graph.nodes if node.op == "call_module")
    plan = []
    for node in graph.nodes:
        if not any(matches_module_pattern(pattern, node, modules) for pattern in FOLD_PATTERNS):
            continue
        layer, bn = node.args[0].target, node.target
        if (len(node.args[0].users) == 1 and calls[layer] == calls[bn] == 1
                and modules[bn].track_running_stats):
            plan.append((layer, bn))
    return plan


def check_labelled_images(images: ImageSet, model: nn.Module, spec: ModelSpec) -> None:
    """Raise one clear line unless ``images`` can give a true accuracy for ``model`` (before
    any long evaluation; :func:`accuracy` checks the same as it goes)."""
    _check_not_empty(images)
    check_input_size(images, spec)
    _check_labels(images, _num_outputs(model, spec), spec)


def check_input_size(images: ImageSet, spec: ModelSpec) -> None:
    """Images must have the model's input size: a wrong size may still run (global pooling)
    and give a silently wrong accuracy."""
    channels, height, width = spec.input_size
    if images.x.ndim != 4 or images.x.shape[1:] != (height, width, channels):
        got = "x".join(str(d) for d in images.x.shape[1:])
        raise AutoDFPError(f"{images.name}: images are {got} (HxWxC), {spec.name} takes "
                           f"{height}x{width}x{channels}; give images for it as data "
                           "(an image folder is resized and cropped to fit)")


def _check_not_empty(images: ImageSet) -> None:
    if len(images) == 0:
        raise AutoDFPError(f"{images.name} holds no images: no accuracy to measure")


def _check_labels(images: ImageSet, classes: int, spec: ModelSpec) -> None:
    if images.num_classes is not None and images.num_classes != classes:
        raise AutoDFPError(
            f"{spec.name} has {classes} outputs but {images.name} has {images.num_classes} "
            "classes: an accuracy against labels the model was not trained on means nothing; "
            "give images of its classes as data (and a class_index when their folders are a "
            "subset of its outputs)")
    if images.y.min() < 0 or images.y.max() >= classes:
        raise AutoDFPError(f"{images.name}: labels range over {images.y.min()}..{images.y.max()}"
                           f" but {spec.name} has {classes} outputs (0..{classes - 1})")


@torch.inference_mode()
def _num_outputs(model: nn.Module, spec: ModelSpec) -> int:
    device = next(model.parameters()).device
    was_training = model.training
    outputs = model.eval()(spec.example_input().to(device)).shape[1]
    model.train(was_training)
    return int(outputs)


@torch.inference_mode()
def latency_ms(model: nn.Module, spec: ModelSpec, batch_size: int, *, repeats: int = 20,
               warmup: int = 3, device: str | torch.device = "cpu") -> float:
    """Median wall time of one forward pass, in milliseconds."""
    model = model.eval().to(device)
    x = spec.example_input(batch_size).to(device)
    times = []
    for i in range(warmup + repeats):
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(x)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def matmul_gflops(size: int = 1024, repeats: int = 10) -> float:
    """This process's float32 matmul rate (GFLOP/s) at its torch thread count: the yardstick
    of the benchmarks' "share of the matmul rate"."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * 2 * size ** 3 / (time.perf_counter() - start) / 1e9
