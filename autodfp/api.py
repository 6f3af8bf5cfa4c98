"""The Python API on a model you hold: ``autodfp.prune(model, example_inputs, ...)``.

.. code-block:: python

    import autodfp, torch
    pruned = autodfp.prune(model, torch.randn(1, 3, 32, 32), macs=0.5, calibration="refit")
    pruned.model          # the physically smaller nn.Module
    pruned.strategy       # a JSON value that rebuilds it: autodfp.apply(strategy, model, x)
    pruned.cost.macs      # its cost (autodfp.cost(model, x) for the unpruned one)
    autodfp.save(pruned, "out/small"); again = autodfp.load("out/small", model=model)

The model you pass is never modified (the API works on a copy). Its input is what
``example_inputs`` shows (C, H, W) with the ``mean`` and ``std`` you give (they matter for
synthetic calibration images, which are clipped to valid pixels); without them, ImageNet's are
assumed and the result says so in ``pruned.spec.sources``. Errors are
:class:`autodfp.AutoDFPError` and name the parameter at fault.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from autodfp.calibrate.refit import CalibrationConfig, Calibrator, default_calibration, images_digest
from autodfp.compress.allocation import ALLOCATIONS, allocate_keeps, default_selection
from autodfp.compress.graph import ChannelGraph
from autodfp.errors import AutoDFPError
from autodfp.measure.metrics import Cost, model_cost
from autodfp.models import (INPUT_FIELDS, REGISTRY, InputSpec, ModelSpec, resolve_input,
                            weights_sha256)
from autodfp.models.checkpoint import load_state_dict_checked
from autodfp.pipeline import PrunedModel, apply_strategy, group_layers, uniform_layers
from autodfp.quantize.weights import QuantConfig
from autodfp.strategy import Strategy

GIVEN_IMAGES = "given"
"""``CalibrationConfig.images`` of a calibration on images passed as a tensor (``calib_data``):
replaying it needs the same tensor again (its digest is checked)."""


@dataclass(frozen=True)
class Groups:
    """What can be pruned in a model, and why the rest cannot."""

    prunable: dict[str, int]
    """Group name (its first producer layer) -> output channels."""
    excluded: dict[str, str]
    """Group name -> why it is left whole."""


def model_spec(model: nn.Module, example_inputs: torch.Tensor, *, mean=None, std=None,
               name: str | None = None) -> ModelSpec:
    """How ``model`` is fed: (C, H, W) from ``example_inputs``, ``mean``/``std`` as given, else
    carried by the model (``model.mean``, a timm-style ``pretrained_cfg``), else ImageNet's
    (recorded as assumed). The model must run on ``example_inputs`` and return logits."""
    if not isinstance(model, nn.Module):
        raise AutoDFPError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.ndim != 4:
        shape = (tuple(example_inputs.shape) if isinstance(example_inputs, torch.Tensor)
                 else type(example_inputs).__name__)
        raise AutoDFPError(f"example_inputs must be a (batch, C, H, W) tensor, got {shape}")
    was = model.training
    try:
        with torch.no_grad():
            out = model.eval()(example_inputs)
    except Exception as exc:  # shape errors surface as RuntimeError, ValueError, ...
        raise AutoDFPError(f"model does not run on example_inputs of shape "
                           f"{tuple(example_inputs.shape)}: {type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") \
            from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise AutoDFPError("model must return (batch, classes) logits on example_inputs")
    name = name or f"{type(model).__module__}:{type(model).__qualname__}"
    base = ModelSpec(name, lambda: model, dataset="user", pretrained_factory=True,
                     sources={f: "assumed" for f in INPUT_FIELDS})
    given = InputSpec(tuple(int(d) for d in example_inputs.shape[1:]), mean, std)
    spec = resolve_input(base, model, given)
    return spec


def cost(model: nn.Module, example_inputs: torch.Tensor) -> Cost:
    """MACs (batch 1), parameters, weight bytes and BitOPs of ``model``."""
    return model_cost(model, model_spec(model, example_inputs))


def groups(model: nn.Module, example_inputs: torch.Tensor, *, coupled: bool = False) -> Groups:
    """The channel groups that can be pruned (and why the others cannot); ``coupled=True`` also
    allows residual-coupled groups."""
    spec = model_spec(model, example_inputs)
    graph = ChannelGraph(copy.deepcopy(model), spec.example_input(), coupled=coupled)
    return Groups({n: g.channels for n, g in graph.groups.items()},
                  {g.name: g.reason for g in graph.excluded})


def prune(model: nn.Module, example_inputs: torch.Tensor, *, keep: float | None = None,
          macs: float | None = None, allocation: str | None = None, select: str | None = None,
          reconstruct: str = "neuron-merging",
          coef: float = 1.0, calibration: str | CalibrationConfig | dict | None = None,
          calib_data: torch.Tensor | str | Path | None = None, bits: int | None = None,
          quant: str | None = None, coupled: bool = False, mean=None, std=None,
          fidelity_images: int = 64, progress: bool = False) -> PrunedModel:
    """Prune a copy of ``model`` without data: the same ``keep`` share of every prunable group,
    or per-group shares at most ``macs`` x the MACs (``allocation``: ``"contribution"``, the
    default, cuts first the channels whose variance costs least per MAC; ``"uniform"``, the
    largest common share; :mod:`autodfp.compress.allocation`). ``select`` picks the channels
    (default: ``contribution`` under that allocation, ``l1`` otherwise). Then ``calibration``
    (None: the closed-form compensation alone; ``"refit"``, ``"bn"``, ``"bn+refit"``,
    ``"refit+bn"``, a :class:`CalibrationConfig` or its dict) on synthetic images made from
    the model's BatchNorm statistics, or on ``calib_data`` (unlabeled images: a normalised
    (N, C, H, W) tensor or a folder / ``.npz`` path). ``bits`` quantizes every conv and linear
    layer (``quant``: how the error is compensated). ``fidelity_images`` held-out synthetic
    images estimate the top-1 agreement with ``model`` (0: none); a low one raises a
    :class:`UserWarning`."""
    if (keep is None) == (macs is None):
        raise AutoDFPError("give keep or macs (one of them)")
    if macs is not None and not (isinstance(macs, (int, float)) and 0 < macs < 1):
        raise AutoDFPError(f"macs must be a share in (0, 1), got {macs!r}")
    if allocation is not None and macs is None:
        raise AutoDFPError("allocation goes with macs (keep is one share for every group)")
    if quant is not None and bits is None:
        raise AutoDFPError("quant needs bits")
    if not isinstance(fidelity_images, int) or fidelity_images < 0:
        raise AutoDFPError(f"fidelity_images must be a whole number >= 0, got {fidelity_images!r}")
    spec = model_spec(model, example_inputs, mean=mean, std=std)
    base = copy.deepcopy(model).eval()
    base_cost = model_cost(base, spec)
    if macs is not None:
        allocation = allocation or ALLOCATIONS[0]
        keeps = allocate_keeps(base, spec, macs, allocation=allocation, coupled=coupled)
        layers = group_layers(keeps, base, coef=coef, bits=bits)
    else:
        layers = uniform_layers(base, spec, keep, coef=coef, bits=bits, coupled=coupled)
    select = select or default_selection(allocation)
    strategy = Strategy(spec.name, layers, select, reconstruct, None, weights_sha256(base),
                        input=InputSpec(spec.input_size, spec.mean, spec.std), coupled=coupled,
                        calibration=_calibration(calibration, calib_data, spec))
    if bits is not None:
        strategy.quantization = QuantConfig(compensate=quant or QuantConfig.compensate)
    return _apply(strategy, base, spec, base_cost, calib_data, fidelity_images, progress)


def apply(strategy: Strategy | dict | str | Path, model: nn.Module,
          example_inputs: torch.Tensor | None = None, *, calib_data: torch.Tensor | None = None,
          fidelity_images: int = 64, progress: bool = False) -> PrunedModel:
    """Replay ``strategy`` (a :class:`Strategy`, its dict, or a ``strategy.json`` path) on a
    copy of ``model``, which must hold the weights the strategy was made on: the result is
    bit-identical to the first run. The input is the strategy's (``example_inputs`` may
    confirm it); a calibration on a ``calib_data`` tensor needs the same tensor again."""
    strategy = _as_strategy(strategy)
    fed = _recorded_input(strategy)
    if example_inputs is None:
        if fed.input_size is None:
            raise AutoDFPError("the strategy records no input size: pass example_inputs")
        example_inputs = torch.zeros(1, *fed.input_size)
    elif fed.input_size is not None and tuple(example_inputs.shape[1:]) != fed.input_size:
        raise AutoDFPError(f"example_inputs are {tuple(example_inputs.shape[1:])} but the "
                           f"strategy was made for {fed.input_size} inputs")
    spec = model_spec(model, example_inputs, mean=fed.mean, std=fed.std, name=strategy.model)
    base = copy.deepcopy(model).eval()
    _check_weights(strategy, base)
    data = calib_data
    if strategy.calibration is not None and strategy.calibration.images == GIVEN_IMAGES:
        if calib_data is None:
            raise AutoDFPError("this strategy was calibrated on images passed as a tensor: "
                               "pass the same tensor as calib_data")
        if images_digest(calib_data.numpy()) != strategy.calibration.images_sha256:
            raise AutoDFPError("calib_data differs from the images this strategy was "
                               "calibrated on (sha256 mismatch)")
    elif calib_data is not None:
        raise AutoDFPError("calib_data is only for a strategy calibrated on a tensor of images")
    return _apply(strategy, base, spec, model_cost(base, spec), data, fidelity_images, progress)


def save(pruned: PrunedModel, directory: str | Path, *, overwrite: bool = False,
         onnx: bool = False) -> Path:
    """Write ``model.pt``, ``model.ts`` (TorchScript), ``strategy.json`` and ``report.json``
    (and ``model.onnx`` with ``onnx=True``) into ``directory``, atomically."""
    from autodfp.export import write_model_folder
    from autodfp.measure.report import build_report

    if not isinstance(pruned, PrunedModel):
        raise AutoDFPError(f"save takes what autodfp.prune returns, got {type(pruned).__name__}")
    report = build_report(pruned, [], base_cost=pruned.base_cost or pruned.cost)
    if pruned.fidelity is not None:
        report["fidelity"] = pruned.fidelity.to_dict()
    write_model_folder(pruned, report, Path(directory), overwrite=overwrite, onnx=onnx)
    return Path(directory)


def load(directory: str | Path, model: nn.Module | None = None) -> PrunedModel:
    """Read a folder :func:`save` (or ``autodfp prune``) wrote. A model of your own needs
    ``model``: an unpruned instance of its class (any weights: the saved ones are loaded into a
    copy). Registry models rebuild themselves."""
    from autodfp.export import read_model_file, shrink_to
    from autodfp.models import build_model

    payload, file = read_model_file(directory)
    strategy = Strategy.from_dict(json.loads(payload["strategy"]))
    fed = _recorded_input(strategy)
    if model is None:
        try:
            fresh, spec = build_model(strategy.model, pretrained=False, input_spec=fed)
        except AutoDFPError as exc:
            raise AutoDFPError(f"{file} holds a pruned {strategy.model}, which cannot be rebuilt "
                               f"by name ({exc}): pass model=<an unpruned instance of it>, or "
                               "read model.ts with torch.jit.load") from None
    else:
        if fed.input_size is None:
            raise AutoDFPError(f"{file} records no input size")
        spec = model_spec(model, torch.zeros(1, *fed.input_size), mean=fed.mean, std=fed.std,
                          name=strategy.model)
        fresh = copy.deepcopy(model)
    shrink_to(fresh, spec, payload["channels"])
    load_state_dict_checked(fresh, payload["state_dict"], str(file))
    return PrunedModel(fresh.eval(), spec, strategy, dict(payload["channels"]))


def _apply(strategy: Strategy, base: nn.Module, spec: ModelSpec, base_cost: Cost, calib_data,
           fidelity_count: int, progress: bool) -> PrunedModel:
    probe = _fidelity_probe(base, spec, strategy, fidelity_count, progress)
    calibrator = None
    if strategy.calibration is not None:
        images = calib_data if isinstance(calib_data, torch.Tensor) else None
        calibrator = Calibrator.for_model(base, spec, strategy.calibration, images=images,
                                          progress=progress, coupled=strategy.coupled)
        strategy = dataclasses.replace(strategy, calibration=calibrator.config)
    pruned = apply_strategy(strategy, (base, spec), calibrator=calibrator, progress=progress)
    pruned.base_cost = base_cost
    if probe is not None:
        pruned.fidelity = probe.estimate(pruned.model)
        if pruned.fidelity.low:
            warnings.warn(pruned.fidelity.warning(), UserWarning, stacklevel=3)
    return pruned


def _fidelity_probe(base, spec, strategy, count, progress):
    from autodfp.calibrate.synthetic import has_bn_statistics
    from autodfp.measure.fidelity import FidelityProbe

    if count == 0 or not has_bn_statistics(base):
        return None
    return FidelityProbe.make(base, spec, strategy.calibration, count=count, progress=progress)


def _calibration(calibration, calib_data, spec: ModelSpec) -> CalibrationConfig | None:
    if calibration is None:
        if calib_data is not None:
            raise AutoDFPError("calib_data needs a calibration (e.g. calibration='refit')")
        return None
    if isinstance(calibration, str):
        # the defaults differ for synthetic and real images (default_calibration)
        images = "synthetic" if calib_data is None else GIVEN_IMAGES
        config = default_calibration(spec.input_size, order=calibration, images=images)
    elif isinstance(calibration, dict):
        config = CalibrationConfig.from_dict(calibration)
    elif isinstance(calibration, CalibrationConfig):
        config = calibration
    else:
        raise AutoDFPError(f"calibration must be an order name, a CalibrationConfig or a dict, "
                           f"got {type(calibration).__name__}")
    if calib_data is None:
        return config
    if isinstance(calib_data, torch.Tensor):
        if calib_data.ndim != 4 or tuple(calib_data.shape[1:]) != spec.input_size:
            raise AutoDFPError(f"calib_data must be (N, {', '.join(map(str, spec.input_size))})"
                               f" normalised images, got {tuple(calib_data.shape)}")
        x = calib_data.detach().float().cpu()
        return dataclasses.replace(config, images=GIVEN_IMAGES, count=len(x),
                                   images_sha256=images_digest(x.numpy()))
    path = Path(calib_data)
    if not path.exists():
        raise AutoDFPError(f"calib_data not found: {path}")
    return dataclasses.replace(config, images=str(path))


def _recorded_input(strategy: Strategy) -> InputSpec:
    """The input a strategy was made for: what it records, else its registry model's."""
    fed = strategy.input or InputSpec()
    known = REGISTRY.get(strategy.model)
    if known is None:
        return fed
    return InputSpec(fed.input_size or known.input_size, fed.mean or known.mean,
                     fed.std or known.std)


def _as_strategy(strategy) -> Strategy:
    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, dict):
        return Strategy.from_dict(strategy)
    if isinstance(strategy, (str, Path)):
        return Strategy.load(Path(strategy))
    raise AutoDFPError(f"strategy must be a Strategy, its dict or a strategy.json path, got "
                       f"{type(strategy).__name__}")


def _check_weights(strategy: Strategy, model: nn.Module) -> None:
    """The model holds the weights the strategy was made on (its digest, or, for a strategy
    made on a registry checkpoint file, the weights that file holds)."""
    if not strategy.checkpoint_sha256 or strategy.checkpoint_sha256 == weights_sha256(model):
        return
    if strategy.model in REGISTRY or ":" in strategy.model:
        from autodfp.pipeline import load_base

        try:
            reference, _ = load_base(strategy)
        except AutoDFPError:
            reference = None
        if reference is not None and weights_sha256(reference) == weights_sha256(model):
            return
    raise AutoDFPError("model holds other weights than the ones this strategy was made on "
                       "(sha256 mismatch)")
