"""The core commands of ``autodfp`` (prune, eval, synth, finetune, models), with the argparse
types and model cards they share; :mod:`launch.cli` adds the search commands and is the entry
point.

Every user error ends as one ``error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from autodfp.calibrate.refit import DEFAULT_CALIBRATION, ORDERS
from autodfp.errors import AutoDFPError
from autodfp.quantize.weights import COMPENSATIONS, MAX_BITS, MIN_BITS, QuantConfig
from autodfp.measure.fidelity import FIDELITY_IMAGES
from autodfp.calibrate.synthetic import LARGE_INPUT_SIDE, SynthConfig
from autodfp.compress.reconstruction import METHODS
from autodfp.compress.allocation import ALLOCATIONS, default_selection
from autodfp.compress.selection import CRITERIA


def _fraction(what: str, zero_allowed: bool):
    """argparse type for a number in (0, 1] or, with ``zero_allowed``, [0, 1]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not ((value >= 0.0 if zero_allowed else value > 0.0) and value <= 1.0):
            interval = "[0, 1]" if zero_allowed else "(0, 1]"
            raise argparse.ArgumentTypeError(f"{what} must be in {interval}, got {value}")
        return value
    return parse


def whole_number(what: str, minimum: int = 1):
    """argparse type: a whole number >= ``minimum``, or one clear line."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be at least {minimum}, got {value}")
        return value
    return parse


def bits_number(text: str) -> int:
    """argparse type: weight bits in [MIN_BITS, MAX_BITS]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be a whole number, got {text!r}") from None
    if not MIN_BITS <= value <= MAX_BITS:
        raise argparse.ArgumentTypeError(f"bits must be from {MIN_BITS} to {MAX_BITS}, "
                                         f"got {value}")
    return value


def _numbers(what: str, kind):
    """argparse type: comma-separated numbers (one is repeated for every channel later)."""
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, "
                                             f"got {text!r}") from None
        return values
    return parse


def input_size_value(text: str) -> tuple[int, int, int]:
    """argparse type: C,H,W, or H,W or one number for a square RGB input."""
    values = _numbers("input size", int)(text)
    if len(values) == 1:
        values = (3, values[0], values[0])
    elif len(values) == 2:
        values = (3, *values)
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"input size must be C,H,W (or H,W or one side), "
                                         f"whole numbers > 0, got {text!r}")
    return values


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def new_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = _Parser(prog="autodfp", description="Data-free pruning of pretrained CNNs.")
    return parser, parser.add_subparsers(dest="command", required=True, parser_class=_Parser)


def add_core_commands(sub) -> dict:
    """Add prune, eval and models to ``sub``; returns command name -> handler."""
    prune = sub.add_parser("prune", help="prune a model with a uniform ratio or a strategy file")
    add_model_arguments(prune)
    prune.add_argument("--keep", type=_fraction("keep ratio", zero_allowed=False),
                       help="kept share of every prunable group's channels, in (0, 1]")
    prune.add_argument("--macs", type=_fraction("MACs budget", zero_allowed=False),
                       help="instead of --keep: per-group keeps whose pruned model has at most "
                            "this share of the MACs (counted, chained groups included), as "
                            "--allocate says")
    prune.add_argument("--allocate", choices=ALLOCATIONS, default=None,
                       help="with --macs: 'contribution' (default) cuts first the channels "
                            "whose variance under the BN statistics costs least per MAC; "
                            "'uniform' takes the largest keep common to every group")
    prune.add_argument("--coupled", action="store_true",
                       help="also prune residual-coupled groups (the same channels from every "
                            "layer whose outputs are added; their mean is folded into the "
                            "consumers)")
    prune.add_argument("--strategy", type=Path, help="strategy.json with per-layer keep ratios")
    prune.add_argument("--select", choices=sorted(CRITERIA), default=None,
                       help="which channels of a group to cut (default: contribution under "
                            "--macs' contribution allocation, whose cuts it prices; else l1)")
    prune.add_argument("--reconstruct", choices=METHODS, default="neuron-merging",
                       help="closed-form compensation, before any calibration (default "
                            "neuron-merging)")
    prune.add_argument("--coef", type=_fraction("coefficient", zero_allowed=True), default=1.0,
                       help="reconstruction coefficient (default 1): the NM/UDFC blend of "
                            "--reconstruct autodfp and the refit's trust in the calibration "
                            "images (0 stays near the closed-form weights)")
    prune.add_argument("--nm-sigma", choices=("std", "var"), default="std",
                       help="Neuron Merging sigma: std = sqrt(var+eps) (default, better), "
                            "var = running_var as in the official code")
    add_calibration_arguments(prune)
    prune.add_argument("--bits", type=bits_number, default=None,
                       help=f"quantize every conv and linear layer's weights to this many bits "
                            f"({MIN_BITS}-{MAX_BITS}, per output channel) after pruning and "
                            "calibration (default: float)")
    prune.add_argument("--quant", choices=COMPENSATIONS, default=None,
                       help=f"compensation of the quantization error (default "
                            f"{QuantConfig.compensate}; see docs/quantization.md)")
    prune.add_argument("--fidelity-images", type=whole_number("fidelity image count", 0),
                       default=None, help=f"held-out synthetic images on which the pruned "
                       f"model's top-1 agreement with the unpruned one is estimated (default "
                       f"{FIDELITY_IMAGES}; 0: no estimate)")
    add_data_arguments(prune)
    add_output_arguments(prune)

    synth = sub.add_parser("synth", help="synthesise calibration images from a model's BN "
                                         "statistics (cached) and write them with a PNG grid")
    add_model_arguments(synth)
    synth.add_argument("--count", type=whole_number("image count"), default=None,
                       help=f"images (default {SynthConfig.count})")
    synth.add_argument("--steps", type=whole_number("steps"), default=None,
                       help=f"Adam steps per batch at full size (default {SynthConfig.steps}; "
                            "for inputs over 64 px 6, after 60 at half size)")
    synth.add_argument("--batch-size", type=whole_number("batch size"), default=None,
                       help=f"images optimised together (default {SynthConfig.batch_size})")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", type=Path, required=True, help="output folder (atomic)")
    synth.add_argument("--force", action="store_true", help="replace a non-empty --out")

    ev = sub.add_parser("eval", help="accuracy of a pruned-model folder or a zoo model")
    ev.add_argument("folder", nargs="?", type=Path, help="folder written by `autodfp prune`")
    add_model_arguments(ev, what="evaluate an unpruned model instead: ")
    add_data_arguments(ev)
    ev.add_argument("--latency", action="store_true", help="also time batch 1 and 256")

    sub.add_parser("models", help="list the model zoo")
    add_finetune_command(sub)
    return {"prune": cmd_prune, "eval": cmd_eval, "synth": cmd_synth, "models": cmd_models,
            "finetune": cmd_finetune}


def add_finetune_command(sub) -> None:
    from autodfp.recover.finetune import (LOSSES, METHODS, SYNTHETIC_TRAIN_IMAGES, TRAIN_DATA_CIFAR,
                                  FinetuneConfig)

    defaults = FinetuneConfig()
    tune = sub.add_parser("finetune", help="recovery training of a pruned folder (or of a zoo "
                                           "model with --method pdp/reprune)")
    tune.add_argument("folder", nargs="?", type=Path, help="folder written by `autodfp prune`")
    add_model_arguments(tune, what="start from an unpruned model instead (pdp, reprune): ")
    tune.add_argument("--data", required=True,
                      help=f"{TRAIN_DATA_CIFAR} (the CIFAR-10 training JPEGs), synthetic "
                           "(images made from the unpruned model's BN statistics; distillation "
                           "only), or user images: an ImageFolder tree or .npz (x, y)")
    tune.add_argument("--epochs", type=whole_number("epochs"), default=defaults.epochs)
    tune.add_argument("--method", choices=METHODS, default=defaults.method,
                      help="plain: train the pruned model; pdp: PDP soft masks toward --keep or "
                           "--sparsity; reprune: REPrune's progressive loop toward --keep")
    tune.add_argument("--loss", choices=LOSSES, default=defaults.loss,
                      help="auto (default): ce+kd with labels, kd on synthetic images")
    tune.add_argument("--keep", type=_fraction("keep ratio", zero_allowed=False),
                      help="pdp/reprune: share of each prunable group's channels kept")
    tune.add_argument("--macs", type=_fraction("MACs budget", zero_allowed=False),
                      help="pdp/reprune: the largest uniform --keep whose model has at most "
                           "this share of the unpruned model's MACs")
    tune.add_argument("--sparsity", help="pdp: share of zero weights (0.8) or N:M (2:4)")
    tune.add_argument("--lr", type=float, default=defaults.lr,
                      help=f"peak learning rate (default {defaults.lr})")
    tune.add_argument("--batch-size", type=whole_number("batch size"),
                      default=defaults.batch_size)
    tune.add_argument("--steps-per-epoch", type=whole_number("steps per epoch"),
                      help="cap on steps per epoch (default: the whole set)")
    tune.add_argument("--synthetic-images", type=whole_number("synthetic image count"),
                      default=None,
                      help=f"with --data synthetic: images made (default "
                           f"{SYNTHETIC_TRAIN_IMAGES}, cached)")
    tune.add_argument("--seed", type=int, default=defaults.seed)
    tune.add_argument("--device", default=None,
                      help="torch device to train on (default: cuda when available, else cpu)")
    tune.add_argument("--restart", action="store_true",
                      help="ignore an earlier run's checkpoint (default: resume from it)")
    add_output_arguments(tune)


CARD_KEYS = ("model", "checkpoint", "input_size", "mean", "std", "class_index", "crop_ratio")


def add_model_arguments(parser, what: str = "") -> None:
    parser.add_argument("--model", help=f"{what}registry name (see `autodfp models`) or "
                                        "pkg.module:factory (a factory may return its weights)")
    parser.add_argument("--checkpoint", help="weights file (default: the shipped weights, or "
                                             "what a pkg.module:factory returns)")
    parser.add_argument("--model-card", type=Path,
                        help=f"JSON/YAML file with any of {', '.join(CARD_KEYS)} (paths "
                             "relative to the card); flags given as well win")
    parser.add_argument("--input-size", type=input_size_value,
                        help="model input C,H,W (or one side: 224 = 3,224,224)")
    parser.add_argument("--mean", type=_numbers("mean", float),
                        help="per-channel mean subtracted from [0,1] RGB (a,b,c or one value)")
    parser.add_argument("--std", type=_numbers("std", float),
                        help="per-channel std divided into [0,1] RGB (a,b,c or one value)")


def add_data_arguments(parser) -> None:
    from autodfp.data import DEFAULT_CROP_RATIO

    parser.add_argument("--data", type=Path,
                        help="user images instead of the CIFAR-10 test images: an ImageFolder "
                             "tree (a folder or a .tar of one; images of any size are resized "
                             "and center-cropped to the model's input) or .npz (x, y)")
    parser.add_argument("--class-index", type=Path,
                        help="JSON: class folder name -> model output index (for a model "
                             "whose classes are a superset of the folders)")
    parser.add_argument("--crop-ratio", type=_fraction("crop ratio", zero_allowed=False),
                        default=None, help=f"center crop share after resizing (default "
                                           f"{DEFAULT_CROP_RATIO}; 1.0 keeps images already "
                                           "at the input size untouched)")


def apply_model_card(args) -> None:
    """Fill the flags not given from ``--model-card`` (JSON or YAML)."""
    card_path = getattr(args, "model_card", None)
    if card_path is None:
        return
    card = read_model_card(card_path)
    for key, value in card.items():
        if getattr(args, key, None) is None and hasattr(args, key):
            setattr(args, key, value)


def read_model_card(path: Path) -> dict:
    """The card's fields as flag values (paths resolved against the card's folder)."""
    import yaml

    if not path.is_file():
        raise AutoDFPError(f"model card not found: {path}")
    try:
        card = yaml.safe_load(path.read_text())  # JSON is YAML
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise AutoDFPError(f"cannot read model card {path}: {str(exc).splitlines()[0]}") \
            from None
    if not isinstance(card, dict):
        raise AutoDFPError(f"model card {path} must be a mapping of {', '.join(CARD_KEYS)}")
    unknown = sorted(set(card) - set(CARD_KEYS))
    if unknown:
        raise AutoDFPError(f"unknown model card key(s) in {path}: {', '.join(unknown)}; "
                           f"known: {', '.join(CARD_KEYS)}")
    out = {}
    for key, value in card.items():
        if key in ("model", "checkpoint", "class_index") and not isinstance(value, (str, type(None))):
            raise AutoDFPError(f"model card {path}: {key} must be a string, got {value!r}")
        try:
            out[key] = _card_value(key, value, path.parent)
        except argparse.ArgumentTypeError as exc:
            raise AutoDFPError(f"model card {path}: {exc}") from None
    return out


def _card_value(key: str, value, folder: Path):
    """One model card field as the flag's parser would give it."""
    if value is None:
        return None
    if key in ("checkpoint", "class_index"):
        value = Path(value) if Path(value).is_absolute() else folder / value
        return str(value) if key == "checkpoint" else value
    if key == "crop_ratio":
        return _fraction("crop ratio", zero_allowed=False)(str(value))
    if key == "input_size":
        return input_size_value(",".join(map(str, value if isinstance(value, list) else [value])))
    if key in ("mean", "std"):
        return _numbers(key, float)(",".join(map(str, value if isinstance(value, list)
                                                 else [value])))
    return value


def input_spec_from_args(args):
    """The InputSpec the flags (or card) give; None when they give nothing."""
    from autodfp.models import InputSpec

    size, mean, std = args.input_size, args.mean, args.std
    if size is None and mean is None and std is None:
        return None
    channels = size[0] if size else 3
    mean = mean * channels if mean is not None and len(mean) == 1 else mean
    std = std * channels if std is not None and len(std) == 1 else std
    return InputSpec(size, mean, std)


def data_splits(args, model, spec, *, progress: bool = True) -> list:
    """The evaluation images the flags ask for (``--data``, else the CIFAR-10 test splits),
    checked against the model before any long work."""
    from autodfp.data import DEFAULT_CROP_RATIO, load_split, load_user_data
    from autodfp.measure.metrics import check_labelled_images
    from autodfp.measure.report import REPORT_SPLITS

    data = getattr(args, "data", None)
    if data is None:
        if getattr(args, "class_index", None) or getattr(args, "crop_ratio", None):
            raise AutoDFPError("--class-index and --crop-ratio go with --data")
        splits = [load_split(name) for name in REPORT_SPLITS]
    else:
        crop = args.crop_ratio if args.crop_ratio is not None else DEFAULT_CROP_RATIO
        splits = [load_user_data(data, input_size=spec.input_size, crop_ratio=crop,
                                 class_index=args.class_index, progress=progress)]
    for split in splits:
        check_labelled_images(split, model, spec)
    return splits


def say_model(spec, checkpoint) -> None:
    """Print how a model is fed and where its weights come from, unless it is a registry model
    with its registry input (nothing assumed, nothing to say)."""
    from autodfp.models import weights_from_factory

    if set(spec.sources.values()) == {"registry"} and not spec.pretrained_factory:
        return
    weights = (f"weights as {spec.name} returns them" if weights_from_factory(spec, checkpoint)
               else f"weights {checkpoint or spec.default_checkpoint()}")
    _say(f"{spec.name}: {spec.describe_input()}; {weights}")


def add_calibration_arguments(parser) -> None:
    parser.add_argument("--calib", choices=(*ORDERS, "none"), default=None,
                        help=f"calibration after pruning (default {DEFAULT_CALIBRATION.order}; "
                             f"above {LARGE_INPUT_SIDE} px on synthetic images with a stronger "
                             "ridge and the first half of the layers left as they are); none: "
                             "the closed-form compensation alone")
    parser.add_argument("--calib-images", type=whole_number("calibration image count"),
                        default=None, help=f"calibration images (default "
                                           f"{DEFAULT_CALIBRATION.count})")
    parser.add_argument("--calib-data", type=Path, default=None,
                        help="real unlabeled images instead of synthetic ones: an ImageFolder "
                             "tree, a folder of images or an .npz with x (labels ignored)")
    parser.add_argument("--synth-steps", type=whole_number("synthesis steps"), default=None,
                        help=f"Adam steps per batch of synthetic images at full size (default "
                             f"{DEFAULT_CALIBRATION.synth.steps}; for inputs over 64 px 6, "
                             "after 60 at half size)")


def calibration_from_args(args, input_size: tuple[int, ...]):
    """The CalibrationConfig the flags ask for (None for --calib none), for a model of this
    input size (its default synthetic images depend on it)."""
    import dataclasses

    from autodfp.calibrate.refit import default_calibration
    from autodfp.calibrate.synthetic import default_config

    if args.calib == "none":
        if args.calib_images or args.calib_data or args.synth_steps:
            raise AutoDFPError("--calib none takes no --calib-images, --calib-data or "
                               "--synth-steps")
        return None
    changes = {}
    if args.calib:
        changes["order"] = args.calib
    if args.calib_images:
        changes["count"] = args.calib_images
    if args.synth_steps:
        if args.calib_data:
            raise AutoDFPError("--synth-steps is for synthetic images, not --calib-data")
        changes["synth"] = dataclasses.replace(default_config(input_size), steps=args.synth_steps)
    if args.calib_data:
        if not args.calib_data.exists():
            raise AutoDFPError(f"calibration data not found: {args.calib_data}")
        changes["images"] = str(args.calib_data)
    return default_calibration(input_size, **changes)


def _calibration_flags_given(args) -> bool:
    return any(getattr(args, name) is not None
               for name in ("calib", "calib_images", "calib_data", "synth_steps"))


def add_output_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (written atomically)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    parser.add_argument("--latency", action="store_true", help="also time batch 1 and 256")
    parser.add_argument("--no-eval", action="store_true",
                        help="report cost only: no test image is read (the weights alone "
                             "suffice)")


def dispatch(parser, handlers: dict, argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    try:
        apply_model_card(args)
        return handlers[args.command](args)
    except AutoDFPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions, vanished files: say which, no traceback
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


def cmd_prune(args) -> int:
    from autodfp.calibrate.refit import Calibrator
    from autodfp.pipeline import apply_strategy, default_quant_images, load_base

    strategy = _strategy_from_args(args)
    check_out(args.out, args.force)
    base = load_base(strategy)
    splits = [] if args.no_eval else data_splits(args, *base)  # bad data fails before pruning
    say_model(base[1], strategy.checkpoint)
    calibrator = None
    if strategy.calibration is not None:  # bad user images fail here, before any output
        calibrator = Calibrator.for_model(*base, strategy.calibration, progress=True,
                                          coupled=strategy.coupled)
        strategy.calibration = calibrator.config
    calibration = (f"calibration={strategy.calibration.order} on {strategy.calibration.count} "
                   f"{'synthetic' if strategy.calibration.images == 'synthetic' else 'user'} "
                   "images" if strategy.calibration else "calibration=none")
    bits = strategy.layer_bits
    widths = "/".join(map(str, sorted(set(bits.values()))))
    quantization = (f", {len(bits)} layer(s) quantized to {widths} bits "
                    f"({strategy.quant_config().compensate})" if bits else "")
    groups = sum(1 for a in strategy.layers.values() if a.keep < 1.0)
    if args.macs is not None:
        _say(_describe_keeps(strategy, args))
    _say(f"pruning {strategy.model}: {groups} group(s), select={strategy.select}, "
         f"reconstruct={strategy.reconstruct}, {calibration}{quantization}")
    quant_images = None
    if (strategy.layer_bits and calibrator is None
            and strategy.quant_config().compensate.startswith("calibrate")):
        quant_images = default_quant_images(*base, progress=True)  # made once, then cached
    fidelity = _fidelity_probe(strategy, *base, args.fidelity_images)
    start = time.perf_counter()
    pruned = apply_strategy(strategy, base, calibrator=calibrator, quant_images=quant_images)
    done = "pruned and calibrated" if strategy.calibration is not None else "pruned"
    _say(f"{done} in {time.perf_counter() - start:.1f} s")
    write_pruned(pruned, args, extra_report=_fidelity_report(fidelity, pruned.model),
                 splits=splits)
    return 0


def _fidelity_probe(strategy, model, spec, count: int | None):
    """The held-out images and a copy of the unpruned model, made before the prune changes
    ``model`` in place; None when no estimate is asked for or possible (said why)."""
    from autodfp.measure.fidelity import FidelityProbe
    from autodfp.calibrate.synthetic import has_bn_statistics

    count = FIDELITY_IMAGES if count is None else count
    if count == 0:
        return None
    if not has_bn_statistics(model):
        _say("fidelity: not estimated (the model has no BatchNorm statistics to make "
             "synthetic images from)")
        return None
    _say(f"fidelity: {count} held-out synthetic images")
    return FidelityProbe.make(model, spec, strategy.calibration, count=count, progress=True)


def _fidelity_report(probe, pruned_model) -> dict | None:
    if probe is None:
        return None
    fidelity = probe.estimate(pruned_model)
    if fidelity.warning():
        print(f"warning: {fidelity.warning()}", file=sys.stderr, flush=True)
    return {"fidelity": fidelity.to_dict()}


def write_pruned(pruned, args, extra_report: dict | None = None, splits=None) -> dict:
    """Evaluate, write ``args.out`` atomically and print the table (prune, export, finetune)."""
    from autodfp.export import write_model_folder
    from autodfp.measure.report import build_report, format_report

    if args.no_eval:
        splits = []
    report = {**build_report(pruned, splits, latency=args.latency, progress=True),
              **(extra_report or {})}
    report = write_model_folder(pruned, report, args.out, overwrite=args.force,
                                onnx=not args.no_onnx)
    print(format_report(report))
    print(f"wrote {args.out}/ ({', '.join(report['exports'])}, strategy.json, report.json)")
    return report


def _strategy_from_args(args):
    from autodfp.compress.allocation import allocate_keeps
    from autodfp.models import build_model
    from autodfp.pipeline import checkpoint_digest, group_layers, uniform_strategy
    from autodfp.strategy import Strategy

    if args.strategy:
        if args.keep is not None or args.macs is not None:
            raise AutoDFPError("give either --keep or --strategy, not both (--macs neither)")
        strategy = Strategy.load(args.strategy)
        if _calibration_flags_given(args):
            raise AutoDFPError("a strategy file fixes its calibration; --calib, --calib-images, "
                               "--calib-data and --synth-steps go with --keep")
        if args.bits is not None or args.quant is not None:
            raise AutoDFPError("a strategy file fixes its bits; --bits and --quant go with --keep")
        if args.model and args.model != strategy.model:
            raise AutoDFPError(f"--model {args.model} differs from the strategy's model "
                               f"{strategy.model}")
        if input_spec_from_args(args) is not None:
            raise AutoDFPError("a strategy file fixes the model's input; --input-size, --mean "
                               "and --std go with --keep")
        if args.coupled or args.allocate:
            raise AutoDFPError("a strategy file fixes which groups are pruned and how much; "
                               "--coupled and --allocate go with --keep or --macs")
        if args.checkpoint:
            strategy.checkpoint = args.checkpoint
            strategy.checkpoint_sha256 = checkpoint_digest(strategy.model, args.checkpoint)
        return strategy
    if args.keep is not None and args.macs is not None:
        raise AutoDFPError("give either --keep or --macs, not both")
    if not args.model or (args.keep is None and args.macs is None):
        raise AutoDFPError("give --model and --keep (or --macs), or --strategy FILE")
    unweighted = _unweighted_model(args)
    calibration = calibration_from_args(args, unweighted[1].input_size)
    if args.quant is not None and args.bits is None:
        raise AutoDFPError("--quant needs --bits")
    if args.allocate is not None and args.macs is None:
        raise AutoDFPError("--allocate goes with --macs (--keep is one share for every group)")
    allocation = _allocation(args)
    select = args.select or default_selection(allocation)
    strategy = uniform_strategy(args.model, args.keep or 1.0, select=select,
                                reconstruct=args.reconstruct, coef=args.coef,
                                checkpoint=args.checkpoint, bits=args.bits,
                                input_spec=input_spec_from_args(args), coupled=args.coupled,
                                nm_sigma=args.nm_sigma)
    if args.macs is not None:
        model, spec = build_model(args.model, args.checkpoint,
                                  input_spec=input_spec_from_args(args))
        keeps = allocate_keeps(model, spec, args.macs, allocation=allocation,
                               coupled=args.coupled)
        strategy.layers = group_layers(keeps, model, coef=args.coef, bits=args.bits)
    strategy.calibration = calibration
    if args.bits is not None:
        strategy.quantization = QuantConfig(compensate=args.quant or QuantConfig.compensate)
    return strategy


def _unweighted_model(args):
    """The model of the flags, built without its weights, and how it is fed."""
    from autodfp.models import build_model

    return build_model(args.model, args.checkpoint, pretrained=False,
                       input_spec=input_spec_from_args(args))


def _allocation(args) -> str | None:
    """How --macs shares the cut (None under --keep: one share for every group)."""
    return (args.allocate or ALLOCATIONS[0]) if args.macs is not None else None


def _describe_keeps(strategy, args) -> str:
    shares = sorted(a.keep for a in strategy.layers.values())
    if _allocation(args) == "uniform":
        return f"--macs {args.macs:g}: uniform keep {shares[0]:.4f} of every prunable group"
    return (f"--macs {args.macs:g}: keeps allocated by contribution per MAC over {len(shares)} "
            f"layers: {shares[0]:.2f} to {shares[-1]:.2f}, mean {sum(shares) / len(shares):.2f}")


def check_out(out: Path, force: bool) -> None:
    """Fail before any work, not after minutes of evaluation."""
    from autodfp.io import check_writable_folder

    if out.exists() and not out.is_dir():
        raise AutoDFPError(f"output path exists and is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise AutoDFPError(f"output folder {out} is not empty; pass --force to replace it")
    check_writable_folder(out)


def cmd_eval(args) -> int:
    from autodfp.export import load_pruned
    from autodfp.measure.metrics import latency_ms, model_cost
    from autodfp.models import build_model
    from autodfp.measure.report import evaluate_splits

    if (args.folder is None) == (args.model is None):
        raise AutoDFPError("give a pruned-model folder or --model NAME (one of them)")
    bits = None
    if args.folder is not None:
        if input_spec_from_args(args) is not None or args.checkpoint:
            raise AutoDFPError("a pruned-model folder fixes its weights and input; "
                               "--checkpoint, --input-size, --mean and --std go with --model")
        model, spec, strategy = load_pruned(args.folder)
        label, bits = str(args.folder), strategy.layer_bits
    else:
        model, spec = build_model(args.model, args.checkpoint,
                                  input_spec=input_spec_from_args(args))
        label = args.model
    splits = data_splits(args, model, spec)
    if args.model is not None:
        say_model(spec, args.checkpoint)
    cost = model_cost(model, spec, bits)
    print(f"{label}: {cost.macs / 1e6:.2f}M MACs, {cost.params / 1e3:.1f}K params, "
          f"{cost.weight_bytes / 1e3:.1f} KB of weights")
    accuracies = evaluate_splits(model, spec, splits, progress=True)
    for split in splits:
        print(f"  top-1 {split.name} ({len(split)}): {accuracies[split.name]:.2f}%")
    if args.latency:
        for batch in (1, 256):
            print(f"  latency batch {batch}: {latency_ms(model, spec, batch):.2f} ms")
    return 0


def cmd_synth(args) -> int:
    import dataclasses
    import json

    from autodfp.io import atomic_directory
    from autodfp.models import build_model
    from autodfp.calibrate.synthetic import cache_path, default_config, save_grid, synthetic_images

    if args.model is None:
        raise AutoDFPError("give --model NAME (or a --model-card naming it)")
    check_out(args.out, args.force)
    model, spec = build_model(args.model, args.checkpoint, input_spec=input_spec_from_args(args))
    say_model(spec, args.checkpoint)
    changes = {k: v for k, v in (("count", args.count), ("steps", args.steps),
                                 ("batch_size", args.batch_size)) if v is not None}
    config = dataclasses.replace(default_config(spec.input_size), seed=args.seed, **changes)
    _say(f"synthesising {config.count} images for {args.model} ({config.steps} steps per "
         f"batch of {config.batch_size})")
    cached = cache_path(model, spec.input_size, config, spec.mean, spec.std).is_file()
    start = time.perf_counter()
    images = synthetic_images(model, spec.input_size, config, mean=spec.mean, std=spec.std,
                              progress=True)
    seconds = time.perf_counter() - start
    with atomic_directory(args.out, overwrite=args.force) as scratch:
        import torch

        torch.save(images, scratch / "images.pt")
        save_grid(images, spec.mean, spec.std, scratch / "grid.png")
        (scratch / "synth.json").write_text(json.dumps(
            {"model": args.model, "input_size": list(spec.input_size), "mean": list(spec.mean),
             "std": list(spec.std), "config": config.to_dict(), "cached": cached,
             "seconds": round(seconds, 1)},
            indent=2) + "\n")
    how = "read from the cache" if cached else f"generated in {seconds:.1f} s (now cached)"
    print(f"{config.count} images {how}; wrote {args.out}/ (images.pt: normalised NCHW "
          "float32, grid.png, synth.json)")
    return 0


def cmd_finetune(args) -> int:
    from autodfp.recover.finetune import (SYNTHETIC_TRAIN_IMAGES, FinetuneConfig, resolve_loss, train,
                                  training_images)
    from autodfp.measure.costmodel import uniform_keep_for_macs
    from autodfp.compress.graph import ChannelGraph
    from autodfp.measure.metrics import model_cost
    from autodfp.data import load_split
    from autodfp.pipeline import PrunedModel, load_base
    from autodfp.measure.report import REPORT_SPLITS, evaluate_splits

    if (args.folder is None) == (args.model is None):
        raise AutoDFPError("give a pruned-model folder or --model NAME (one of them)")
    if args.keep is not None and args.macs is not None:
        raise AutoDFPError("give either --keep or --macs, not both")
    check_out(args.out, args.force)
    device = training_device(args.device)
    model, spec, strategy, source, digest = _finetune_source(args)
    teacher, _ = load_base(strategy)
    keep = args.keep
    if args.macs is not None:
        if args.method == "plain":
            raise AutoDFPError("--macs goes with --method pdp or reprune")
        keep = uniform_keep_for_macs(model, spec, model_cost(teacher, spec).macs, args.macs)
        _say(f"--macs {args.macs:g}: uniform keep {keep:.4f} of every prunable group")
    config = FinetuneConfig(epochs=args.epochs, method=args.method, loss=args.loss,
                            batch_size=args.batch_size, lr=args.lr,
                            steps_per_epoch=args.steps_per_epoch, keep=keep,
                            sparsity=args.sparsity, seed=args.seed)
    resolve_loss(config, args.data != "synthetic", args.data)  # before any long work
    if config.method == "pdp":
        from autodfp.recover.pdp import SparsityTarget

        SparsityTarget.parse(config.sparsity, config.keep)  # a bad target fails before any work
    if args.synthetic_images is not None and args.data != "synthetic":
        raise AutoDFPError("--synthetic-images goes with --data synthetic")
    images = training_images(args.data, teacher, spec, progress=True,
                             synthetic_count=args.synthetic_images or SYNTHETIC_TRAIN_IMAGES)
    splits = [] if args.no_eval else [load_split(name) for name in REPORT_SPLITS]
    before = evaluate_splits(model, spec, splits, progress=True)
    checkpoint = args.out.parent / f"{args.out.name}.finetune-checkpoint.pt"
    if args.restart:
        checkpoint.unlink(missing_ok=True)
    elif checkpoint.is_file():
        _say(f"resuming from {checkpoint} (--restart to start afresh)")
    _say(f"finetuning {source} ({config.method}) on {images.name} ({len(images)} images), "
         f"{config.epochs} epoch(s); checkpoint {checkpoint}")
    start = time.perf_counter()
    result = train(model, spec, images, config, teacher=teacher, checkpoint=checkpoint,
                   source_digest=digest, device=device, progress=True)
    seconds = time.perf_counter() - start
    channels = {n: g.channels for n, g in ChannelGraph(model, spec.example_input()).groups.items()}
    pruned = PrunedModel(model, spec, strategy, channels)
    record = {"source": source, "config": config.to_dict(), "data": images.name,
              "images": len(images), "loss": result.loss, "steps": result.steps,
              "resumed_from_step": result.resumed_from_step, "seconds": round(seconds, 1),
              "epoch_losses": result.losses, "method": result.method_summary,
              "accuracy_before": before,
              "weights": "trained: strategy.json rebuilds the data-free starting point only"}
    write_pruned(pruned, args, {"finetune": record}, splits=splits)
    checkpoint.unlink(missing_ok=True)
    return 0


def _finetune_source(args):
    """The model to train, its spec and strategy, a label and a digest that identifies it."""
    from autodfp.export import load_pruned
    from autodfp.pipeline import load_base, uniform_strategy
    from autodfp.strategy import file_sha256

    if args.model is not None:
        strategy = uniform_strategy(args.model, 1.0, checkpoint=args.checkpoint,
                                    input_spec=input_spec_from_args(args))
        model, spec = load_base(strategy)
        return model, spec, strategy, args.model, strategy.checkpoint_sha256 or args.model
    if not (args.folder / "model.pt").is_file():
        raise AutoDFPError(f"{args.folder} is not a pruned-model folder (no model.pt)")
    model, spec, strategy = load_pruned(args.folder)
    if strategy.layer_bits:
        raise AutoDFPError(f"{args.folder} holds a quantized model; fine-tune the float model, "
                           "then quantize it")
    return model, spec, strategy, str(args.folder), file_sha256(args.folder / "model.pt")


def training_device(requested: str | None) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise AutoDFPError(f"not a torch device: {requested!r} (cpu, cuda, cuda:1, ...)") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AutoDFPError(f"--device {requested}: no CUDA GPU is visible here")
    return str(device)


def cmd_models(args) -> int:
    from autodfp.models import REGISTRY
    from autodfp.pipeline import prunable_groups

    print(f"{'model':12s} {'weights':34s} prunable groups")
    for name, spec in REGISTRY.items():
        weights = spec.checkpoint or ("from its package ([imagenet] extra)"
                                      if spec.pretrained_factory
                                      else "none ship (train; --checkpoint)")
        print(f"{name:12s} {weights:34s} {len(prunable_groups(name))}")
    return 0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

