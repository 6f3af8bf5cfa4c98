"""A pruning strategy: a plain JSON value that rebuilds the same pruned weights anywhere.

.. code-block:: json

    {"format": "autodfp-strategy/1", "model": "resnet56", "checkpoint": null,
     "checkpoint_sha256": "…", "select": "l1", "reconstruct": "neuron-merging",
     "options": {"nm_lambda": 0.85, …},
     "layers": {"layer1.0.conv1": {"keep": 0.5, "coef": 1.0}, …},
     "calibration": {"order": "refit", "images": "synthetic", "count": 256, …}}

``keep`` is the kept share of the group's output channels; the kept count is
``round_half_up(keep * channels)``, at least 1. ``bits`` (absent: float) quantizes the layer
of that name (any conv or linear layer: a layer that is not a group's producer is listed with
keep 1) after pruning and calibration, as ``quantization`` says (:mod:`autodfp.quantize.weights`).
``coef`` is the reconstruction coefficient
(it blends the ``autodfp`` reconstruction and, with a calibration, sets the refit's ridge:
:func:`autodfp.calibrate.refit.ridge_for`). Layers not listed are left whole. ``calibration``
(absent or null: none) says how the pruned model is calibrated on synthetic or user images;
the images it names are regenerated (or read from the cache) on replay.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from autodfp.calibrate.refit import CalibrationConfig
from autodfp.errors import AutoDFPError
from autodfp.io import atomic_write_text
from autodfp.models import InputSpec
from autodfp.quantize.weights import QuantConfig, check_bits
from autodfp.compress.reconstruction import METHODS, ReconstructionOptions
from autodfp.compress.selection import CRITERIA

FORMAT = "autodfp-strategy/1"


@dataclass(frozen=True)
class LayerAction:
    keep: float = 1.0
    """Kept share of the group's channels, in (0, 1]."""
    coef: float = 1.0
    """Reconstruction coefficient in [0, 1]."""
    bits: int | None = None
    """Weight bits of the layer of this name (2-8); None: float."""

    def __post_init__(self):
        if isinstance(self.keep, bool) or not (isinstance(self.keep, (int, float))
                                               and 0.0 < self.keep <= 1.0):
            raise AutoDFPError(f"keep ratio must be in (0, 1], got {self.keep!r}")
        if isinstance(self.coef, bool) or not (isinstance(self.coef, (int, float))
                                               and 0.0 <= self.coef <= 1.0):
            raise AutoDFPError(f"reconstruction coefficient must be in [0, 1], got {self.coef!r}")
        if self.bits is not None:
            check_bits(self.bits)

    def to_dict(self) -> dict:
        out = {"keep": self.keep, "coef": self.coef}
        return out if self.bits is None else {**out, "bits": self.bits}

    def kept_channels(self, channels: int) -> int:
        return kept_channels(self.keep, channels)


@dataclass
class Strategy:
    model: str
    layers: dict[str, LayerAction]
    select: str = "l1"
    reconstruct: str = "neuron-merging"
    checkpoint: str | None = None
    """Checkpoint path; ``None`` for the registry's shipped weights."""
    checkpoint_sha256: str | None = None
    """Digest of the checkpoint the strategy was made on; checked when it is replayed."""
    options: ReconstructionOptions = field(default_factory=ReconstructionOptions)
    calibration: CalibrationConfig | None = None
    """Calibration after pruning; None: none (the closed-form compensation alone)."""
    quantization: QuantConfig | None = None
    """How layers with ``bits`` are quantized; None: the defaults when any layer has bits."""
    coupled: bool = False
    """Residual-coupled groups are prunable too (:class:`autodfp.compress.graph.ChannelGraph`)."""
    input: InputSpec | None = None
    """Input size, mean and std where they differ from what the model says of itself
    (:func:`autodfp.models.build_model`); None: the model's own."""

    def __post_init__(self):
        if self.select not in CRITERIA:
            raise AutoDFPError(f"unknown selection criterion {self.select!r}; choose one of "
                               f"{', '.join(CRITERIA)}")
        if self.reconstruct not in METHODS:
            raise AutoDFPError(f"unknown reconstruction {self.reconstruct!r}; choose one of "
                               f"{', '.join(METHODS)}")

    @property
    def layer_bits(self) -> dict[str, int]:
        """Layer name -> weight bits, for the layers quantized."""
        return {n: a.bits for n, a in self.layers.items() if a.bits is not None}

    def quant_config(self) -> QuantConfig:
        return self.quantization or QuantConfig()

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "model": self.model, "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256, "select": self.select,
            "reconstruct": self.reconstruct, "options": dataclasses.asdict(self.options),
            "layers": {name: a.to_dict() for name, a in self.layers.items()},
            "calibration": self.calibration.to_dict() if self.calibration else None,
            **({"quantization": self.quant_config().to_dict()}
               if self.quantization or self.layer_bits else {}),
            **({"input": self.input.to_dict()} if self.input and self.input.to_dict() else {}),
            **({"coupled": True} if self.coupled else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Strategy":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise AutoDFPError(f"not an AutoDFP strategy (expected \"format\": \"{FORMAT}\")")
        try:
            layers = {str(n): LayerAction(**a) for n, a in data["layers"].items()}
            calibration = data.get("calibration")
            quantization = data.get("quantization")
            return cls(model=data["model"], layers=layers, select=data["select"],
                       reconstruct=data["reconstruct"], checkpoint=data.get("checkpoint"),
                       checkpoint_sha256=data.get("checkpoint_sha256"),
                       options=ReconstructionOptions(**data.get("options", {})),
                       calibration=(CalibrationConfig.from_dict(calibration)
                                    if calibration is not None else None),
                       quantization=(QuantConfig.from_dict(quantization)
                                     if quantization is not None else None),
                       input=InputSpec.from_dict(data.get("input")) if data.get("input")
                       else None, coupled=_flag(data.get("coupled", False), "coupled"))
        except (KeyError, TypeError, AttributeError) as exc:
            raise AutoDFPError(f"malformed strategy: {type(exc).__name__}: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Strategy":
        path = Path(path)
        if not path.is_file():
            raise AutoDFPError(f"strategy file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AutoDFPError(f"cannot read strategy {path}: {exc}") from None
        return cls.from_dict(data)


def _flag(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise AutoDFPError(f"strategy {what} must be true or false, got {value!r}")
    return value


def kept_channels(keep: float, channels: int) -> int:
    """Channels a keep share leaves of ``channels``: rounded half up, at least 1."""
    return min(channels, max(1, math.floor(keep * channels + 0.5)))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
