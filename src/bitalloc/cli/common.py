"""Arguments and helpers shared by the commands: models, data splits, evaluation, quantization configs."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bitalloc.config import PRESETS, QuantConfig, preset
from bitalloc.errors import ConfigError, DataError


# ---- models -------------------------------------------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="zoo model name (lenet5, vgg7, resnet20, efficientnet_lite0)")
    g.add_argument("--checkpoint", help="a checkpoint written by `bitalloc train` (rebuilds its model)")


def load_model(args: argparse.Namespace) -> tuple[nn.Module, str, str | None]:
    """The float model from --checkpoint or --model (pretrained when the zoo has weights).

    Returns (model in eval mode, model name, the dataset recorded in the checkpoint or None)."""
    from bitalloc import models

    if args.checkpoint:
        from bitalloc.train.checkpoint import load_model_checkpoint

        model = load_model_checkpoint(args.checkpoint)
        meta = getattr(model, "bitalloc_checkpoint", {})
        name = (meta.get("model") or {}).get("name") or args.model or type(model).__name__
        dataset = meta.get("dataset")
        if isinstance(dataset, dict):
            dataset = dataset.get("name")
        if meta.get("method") not in (None, "fp32"):
            raise ConfigError(f"checkpoint {args.checkpoint} was trained with method {meta.get('method')!r}; "
                              "post-training quantization needs an FP32 checkpoint (--method fp32)")
        return model.eval(), name, dataset
    if not args.model:
        raise ConfigError("give --model NAME (a zoo model) or --checkpoint PATH (from `bitalloc train`)")
    info = models.model_info(args.model)
    if not info.pretrained:
        raise ConfigError(f"{args.model} has no pretrained weights: train it first with `bitalloc train --model "
                          f"{args.model} ...` and pass --checkpoint PATH")
    return models.create(args.model, pretrained=True).eval(), args.model, info.default_dataset


# ---- data ---------------------------------------------------------------------------------------------------

def add_data_args(p: argparse.ArgumentParser, *, calib: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="mnist, fashion-mnist, cifar10 or imagenet (default: the model's dataset)")
    g.add_argument("--data", help="path to the data set (default: $BITALLOC_DATA)")
    g.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    if calib:
        g.add_argument("--calib", type=int, default=32, help="calibration samples (default 32)")
    g.add_argument("--limit", type=int, default=None, help="evaluate on the first N evaluation samples only")
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration split (default 0)")
    g.add_argument("--cache-dir", default=None, help="cache of decoded images (default $BITALLOC_CACHE or ~/.cache/bitalloc)")


def load_splits(dataset: str, data: str | None, n_calib: int, *, seed: int = 0, limit: int | None = None,
                cache_dir: str | None = None) -> tuple[Any, Any]:
    """Calibration and evaluation sets.

    Data sets with a test split (MNIST, Fashion-MNIST, CIFAR-10): ``n_calib`` samples drawn (seeded) from the
    training split, evaluation on the test split. Single-split sets (the ImageNet sample): a seeded random
    split into ``n_calib`` calibration images and the rest for evaluation.
    """
    from bitalloc.data import calibration_split, dataset_info, load_dataset

    info = dataset_info(dataset)
    if n_calib < 1:
        raise ConfigError(f"--calib {n_calib}: give at least 1 calibration sample")
    if "test" in info.splits:
        train = load_dataset(dataset, data, "train", cache_dir=cache_dir)
        calib, _ = calibration_split(train, n_calib, seed=seed)
        evaluation = load_dataset(dataset, data, "test", cache_dir=cache_dir)
    else:
        everything = load_dataset(dataset, data, cache_dir=cache_dir)
        calib, evaluation = calibration_split(everything, n_calib, seed=seed)
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit {limit}: give a positive number of evaluation samples")
        evaluation = torch.utils.data.Subset(evaluation, range(min(limit, len(evaluation))))
    if len(evaluation) == 0:
        raise DataError(f"the evaluation set of {dataset} is empty")
    return calib, evaluation


def batches(dataset: Any, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Materialise a (small) data set as a list of batches (calibration sets are reused many times)."""
    from bitalloc.data import make_loader

    return [(x, y) for x, y in make_loader(dataset, batch_size, shuffle=False)]


def make_eval_fn(dataset: Any, batch_size: int, *, progress: Any = None) -> Callable[[nn.Module], tuple[float, float]]:
    """``fn(model) -> (top-1 %, seconds)`` on ``dataset``."""
    from bitalloc.train.loop import evaluate

    def fn(model: nn.Module) -> tuple[float, float]:
        start = time.perf_counter()
        res = evaluate(model, dataset, batch_size=batch_size, progress=progress, desc="evaluate")
        return 100.0 * res.accuracy, time.perf_counter() - start

    return fn


# ---- quantization configs ------------------------------------------------------------------------------------

def _bits_or_none(text: str) -> float | None:
    if text.lower() in ("none", "float", "fp32", "32f"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a bit width (a number, or 'none' for float)") from None


def add_quant_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--preset", default="aciq", choices=PRESETS,
                   help="method: minmax (naive), aciq-clip, aciq-alloc, aciq (full pipeline), kld, ksigma, "
                        "percentile, mse (default aciq)")
    g.add_argument("--w-bits", type=float, default=4, help="weight bits (fractional = per-channel average; default 4)")
    g.add_argument("--a-bits", type=_bits_or_none, default=4.0, help="activation bits, or 'none' (default 4)")
    g.add_argument("--act-granularity", choices=("tensor", "channel"), help="override the preset's activation granularity")
    g.add_argument("--weight-granularity", choices=("tensor", "channel"), help="weight granularity (default channel)")
    g.add_argument("--prior", choices=("laplace", "gauss", "auto"), help="ACIQ prior (default laplace)")
    g.add_argument("--online", action="store_true", help="recompute activation statistics on every input")
    g.add_argument("--bias-correction", choices=("none", "mean", "mean+norm"), help="override the preset's bias correction")
    g.add_argument("--allocation", choices=("optimal", "aciq"), help="per-channel bit allocation rule")
    g.add_argument("--first-last-bits", default="8", help="bits of the first and last layer, or 'none' (default 8)")
    g.add_argument("--no-fold-bn", action="store_true", help="do not fold BatchNorm into the preceding layer")
    g.add_argument("--override", action="append", default=[], metavar="PATTERN=JSON",
                   help="per-layer override, e.g. 'features.0={\"weight.bits\": 8}' (glob, re:REGEX or type:CLASS)")
    g.add_argument("--config", help="a JSON QuantConfig file (replaces the preset options)")


def build_config(args: argparse.Namespace) -> QuantConfig:
    """The QuantConfig from --config, or from --preset and the other options."""
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            cfg = QuantConfig.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config {path} is not valid JSON: {exc}") from None
        cfg.calibration_samples = getattr(args, "calib", cfg.calibration_samples)
        return cfg.validate()
    fl = None if str(args.first_last_bits).lower() == "none" else int(args.first_last_bits)
    cfg = preset(args.preset, args.w_bits, args.a_bits, act_granularity=args.act_granularity, online=args.online,
                 first_last_bits=fl, fold_bn=not args.no_fold_bn, calibration_samples=getattr(args, "calib", 32),
                 seed=getattr(args, "seed", 0))
    layer = cfg.default
    if args.weight_granularity and layer.weight is not None:
        layer.weight.granularity = args.weight_granularity
        if args.weight_granularity == "tensor":
            layer.weight.allocate = False
    for t in (layer.weight, layer.act):
        if t is None:
            continue
        if args.prior and t.method == "aciq":
            t.options["prior"] = args.prior
        if args.allocation:
            t.allocation = args.allocation
    if args.bias_correction:
        layer.bias_correction = args.bias_correction
    for item in args.override:
        pattern, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--override {item!r}: use PATTERN=JSON, e.g. 'fc={{\"weight.bits\": 8}}'")
        try:
            patch = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--override {item!r}: the value is not JSON ({exc})") from None
        if not isinstance(patch, dict):
            raise ConfigError(f"--override {item!r}: the value must be a JSON object of settings")
        cfg.overrides.append((pattern, patch))
    return cfg.validate()


def output_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder; choose a folder path")
    out.mkdir(parents=True, exist_ok=True)
    return out
