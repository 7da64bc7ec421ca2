"""Named training presets per model, and the registry of training methods (``--method``).

**Presets** (FP32 training from scratch; every value can be overridden on the command line):

=====================  ===================  ==================================================================
preset                 datasets             recipe
=====================  ===================  ==================================================================
``lenet5``             mnist, fashion-mnist Adam lr 1e-3, cosine, batch 128, 8 epochs, no weight decay.
``resnet20``           cifar10              SGD momentum 0.9 Nesterov, lr 0.1, 1 warm-up epoch + cosine, weight
                                            decay 5e-4, batch 128, 30 epochs, random crop + flip.
``vgg7``               cifar10              SGD momentum 0.9 Nesterov, lr 0.05, 1 warm-up epoch + cosine, weight
                                            decay 5e-4, batch 128, 30 epochs, random crop + flip.
``efficientnet_lite0`` imagenet,            fine-tuning of the pretrained network: SGD momentum 0.9 Nesterov,
                       imagefolder          lr 5e-3, cosine, weight decay 1e-5, batch 64, 1 epoch.
=====================  ===================  ==================================================================

Costs on 2 CPU cores (the project's reference machine). ResNet-20 is about 41 MMACs per 32x32 image, so one
epoch of 50k CIFAR-10 images (forward + backward, about 3x the forward cost) is roughly 6 TMACs: a few
minutes per epoch, about 1.5-2 hours for the 30-epoch default. 30 epochs of cosine decay reach about 90-91%
top-1 (the classic 182-epoch step schedule of He et al. 2016 reaches 91.3%); pass ``--epochs 182`` or more
for the last percent. VGG-7 is about 610 MMACs per image (15x ResNet-20): on CPU, use fewer epochs or a GPU
(``torchrun`` works on both). LeNet-5 (Bayesian Bits variant) is about 4.3 MMACs per 28x28 image: one epoch
of 60k images is a few minutes on 2 idle cores (measured: ~0.46 s per batch of 128 on a heavily loaded
2-core machine, i.e. ~3.5 min per epoch); 8 epochs reach about 99.2% (MNIST) / 91% (Fashion-MNIST).

These presets are for FP32 training. The quantization-aware methods (``--method lsq|pact|bb``) replace the
optimizer and schedule by the Bayesian Bits recipe (Adam 1e-3, weights constant for 2/3 of training then
linearly to 0) and take epochs and batch size from their own per-dataset recipes
(:data:`bitalloc.train.methods.QAT_RECIPES`: ``--qat-recipe cpu`` by default, ``paper`` for the Bayesian Bits
reference commands' 100 MNIST / 300 CIFAR-10 epochs); see :mod:`bitalloc.train.methods`.

**Methods.** ``--method`` picks a :class:`Method` from :data:`METHODS`. A method may prepare the model
(e.g. swap layers for quantized ones), supply an objective hook (see :mod:`bitalloc.train.loop`), change the
preset's training settings and add its own command-line options. Adding LSQ, PACT or Bayesian Bits is one
:func:`register_method` call, e.g.::

    register_method(Method(
        name="bb", description="Bayesian Bits (van Baalen et al. 2020): gated residual quantization",
        prepare=lambda model, opts: prepare_bayesian_bits(model, **opts),
        objective=lambda model, opts: BayesianBitsObjective(model, mu=opts.get("mu", 0.01)),
        config_overrides=lambda preset, opts: {"schedule": "constant_then_linear"},  # weights: BB appendix
        add_arguments=lambda p: p.add_argument("--mu", type=float, default=0.01, help="BB regulariser weight"),
        options_from_args=lambda args: {"mu": args.mu},
    ))

Checkpoints record the method and its options, so :func:`bitalloc.train.checkpoint.load_model_checkpoint`
re-applies ``prepare`` before loading the weights.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from torch import nn

from bitalloc.errors import ConfigError
from bitalloc.train.loop import TrainConfig


@dataclass(frozen=True)
class Preset:
    """A model's default FP32 training recipe."""

    name: str
    model: str
    datasets: tuple[str, ...]
    config: Mapping[str, Any]
    augment: bool = False
    pretrained: bool = False
    notes: str = ""

    def train_config(self, **overrides: Any) -> TrainConfig:
        """A :class:`TrainConfig` from this preset, with ``overrides`` (None values are ignored)."""
        valid = {f.name for f in fields(TrainConfig)}
        merged = dict(self.config)
        for k, v in overrides.items():
            if k not in valid:
                raise ConfigError(f"unknown training setting {k!r}; valid: {sorted(valid)}")
            if v is not None:
                merged[k] = v
        merged.setdefault("model_name", self.model)
        return TrainConfig(**merged).validate()


_CIFAR_SGD = dict(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine",
                  warmup_epochs=1.0, epochs=30, batch_size=128)

PRESETS: dict[str, Preset] = {
    "lenet5": Preset("lenet5", "lenet5", ("mnist", "fashion-mnist"),
                     dict(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="cosine", epochs=8, batch_size=128),
                     notes="Adam 1e-3 cosine, 8 epochs: ~99.2% MNIST, ~91% Fashion-MNIST"),
    "resnet20": Preset("resnet20", "resnet20", ("cifar10",), dict(_CIFAR_SGD, lr=0.1), augment=True,
                       notes="SGD Nesterov 0.1, 1 warm-up epoch + cosine, wd 5e-4, 30 epochs: ~90-91% CIFAR-10; "
                             "a few minutes per epoch on 2 CPU cores"),
    "vgg7": Preset("vgg7", "vgg7", ("cifar10",), dict(_CIFAR_SGD, lr=0.05), augment=True,
                   notes="SGD Nesterov 0.05, 1 warm-up epoch + cosine, wd 5e-4, 30 epochs: ~92-93% CIFAR-10; "
                         "~15x the cost of ResNet-20 per image"),
    "efficientnet_lite0": Preset("efficientnet_lite0", "efficientnet_lite0", ("imagenet", "imagefolder"),
                                 dict(optimizer="sgd", lr=5e-3, momentum=0.9, nesterov=True, weight_decay=1e-5,
                                      schedule="cosine", epochs=1, batch_size=64),
                                 pretrained=True,
                                 notes="fine-tunes the pretrained ImageNet weights (no FP32 training from scratch)"),
}

_GENERIC = dict(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="cosine", epochs=10, batch_size=128)


def _canonical_model(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    return {"lenet": "lenet5", "lenet_5": "lenet5", "resnet_20": "resnet20", "vgg_7": "vgg7"}.get(key, key)


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(model: str, dataset: str | None = None) -> Preset:
    """The preset of ``model``; models without one get a generic Adam recipe (``Preset.name == "generic"``).

    ``dataset`` is only checked loosely: a preset tuned for other datasets is still returned (its
    ``datasets`` say what it was tuned for), so callers can print a note.
    """
    key = _canonical_model(model)
    if key in PRESETS:
        return PRESETS[key]
    return Preset("generic", model, (dataset,) if dataset else (), dict(_GENERIC),
                  notes="no tuned preset for this model: Adam 1e-3, cosine, 10 epochs")


def default_dataset(model: str) -> str:
    """The dataset ``bitalloc train`` and ``bitalloc sweep`` use for ``model`` when none is given: its preset's,
    else the model zoo's default. A name the zoo does not know raises the zoo's ConfigError, which lists the
    valid names."""
    preset = get_preset(model)
    if preset.datasets:
        return preset.datasets[0]
    from bitalloc.models import model_info

    dataset = model_info(model).default_dataset
    if not dataset:
        raise ConfigError(f"no default dataset for model {model!r}; pass --dataset NAME")
    return dataset


# ---- methods ----------------------------------------------------------------------------------------------

def _identity(model: nn.Module, options: Mapping[str, Any]) -> nn.Module:
    return model


@dataclass
class Method:
    """A training method: how to prepare the model, the objective hook, and preset / CLI adjustments.

    prepare(model, options) -> model: applied after the model is built (and initial weights loaded), and
        again by ``load_model_checkpoint`` before loading a checkpoint of this method.
    objective(model, options) -> objective hook or None (see :mod:`bitalloc.train.loop`).
    config_overrides(preset, options) -> dict of :class:`TrainConfig` fields, applied over the preset and
        under explicit command-line values.
    add_arguments(parser): adds the method's command-line options (prefix them to avoid clashes).
    options_from_args(args) -> dict: the method's options from the parsed command line (stored in checkpoints;
        must be JSON-like).
    """

    name: str
    description: str
    prepare: Callable[[nn.Module, Mapping[str, Any]], nn.Module] = _identity
    objective: Callable[[nn.Module, Mapping[str, Any]], Any] | None = None
    config_overrides: Callable[[Preset, Mapping[str, Any]], dict[str, Any]] | None = None
    add_arguments: Callable[[argparse.ArgumentParser], Any] | None = None
    options_from_args: Callable[[argparse.Namespace], dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def options(self, args: argparse.Namespace | None) -> dict[str, Any]:
        return dict(self.options_from_args(args)) if (self.options_from_args and args is not None) else {}

    def make_objective(self, model: nn.Module, options: Mapping[str, Any]) -> Any:
        return self.objective(model, options) if self.objective else None

    def overrides(self, preset: Preset, options: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.config_overrides(preset, options)) if self.config_overrides else {}


METHODS: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add a method to :data:`METHODS` (``bitalloc train --method NAME`` picks it up)."""
    if method.name in METHODS and not replace:
        raise ConfigError(f"training method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name`` (ConfigError listing the valid names otherwise)."""
    if name not in METHODS:
        raise ConfigError(f"unknown training method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


register_method(Method("fp32", "full-precision training (no quantization)"))

# The quantization-aware methods (lsq, pact, bb) register themselves on import.
from bitalloc.train import methods as _qat_methods  # noqa: E402,F401

__all__ = ["Preset", "PRESETS", "preset_names", "get_preset", "default_dataset", "Method", "METHODS",
           "register_method", "get_method"]
