"""Arguments and helpers shared by the commands: models, data splits, evaluation, quantization configs."""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from bitalloc.config import CLIP_CHECKS, PRESETS, QuantConfig, preset, read_config_file
from bitalloc.errors import ConfigError, DataError


# ---- options given on the command line ----------------------------------------------------------------------

_GIVEN = "_given_options"
_MARKING: dict[type, type] = {}


def _marking(cls: type) -> type:
    """``cls`` (an argparse action class) that also records its ``dest`` as given on the command line."""
    if cls not in _MARKING:
        def __call__(self, parser, namespace, values, option_string=None):  # noqa: N807
            cls.__call__(self, parser, namespace, values, option_string)
            setattr(namespace, _GIVEN, getattr(namespace, _GIVEN, frozenset()) | {self.dest})

        _MARKING[cls] = type(f"Given{cls.__name__}", (cls,), {"__call__": __call__})
    return _MARKING[cls]


def track_given(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make every option of ``parser`` and its sub-parsers record that it was given (see :func:`given`), so that
    commands can tell an option the user typed from its default (and refuse or report options they ignore)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                track_given(sub)
        elif action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            action.__class__ = _marking(type(action))
    return parser


def given(args: argparse.Namespace) -> frozenset[str]:
    """The ``dest`` names of the options given on the command line (empty for a Namespace built otherwise)."""
    return getattr(args, _GIVEN, frozenset())


def flag(dest: str) -> str:
    """The command-line spelling of an option ``dest`` ("w_bits" -> "--w-bits")."""
    return "--" + dest.replace("_", "-")


# ---- models -------------------------------------------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser) -> None:
    from bitalloc.cli.model_args import MODEL_HELP, add_user_model_args

    g = p.add_argument_group("model")
    g.add_argument("--model", help=MODEL_HELP)
    g.add_argument("--checkpoint", help="a checkpoint written by `bitalloc train` (rebuilds its model; one of a factory "
                                        "outside bitalloc with --trust-code)")
    add_user_model_args(g)


def load_model(args: argparse.Namespace) -> tuple[nn.Module, str, str | None]:
    """The float model from --checkpoint or --model (pretrained when the zoo has weights).

    Returns (model in eval mode, model name, the dataset recorded in the checkpoint or None). A --model factory
    (MODULE:FUNCTION or FILE.py:FUNCTION) is built by :func:`bitalloc.cli.model_args.load_user_model`."""
    from bitalloc import models
    from bitalloc.cli.model_args import check_user_model_options, is_user_model, load_user_model

    check_user_model_options(args)
    if is_user_model(args):
        return load_user_model(args)
    if args.checkpoint:
        from bitalloc.train.checkpoint import load_model_checkpoint

        model = load_model_checkpoint(args.checkpoint, trust_factory=bool(getattr(args, "trust_code", False)))
        meta = getattr(model, "bitalloc_checkpoint", {})
        name = (meta.get("model") or {}).get("name") or type(model).__name__
        if args.model and _canonical_model(args.model) != _canonical_model(name):
            raise ConfigError(f"--model {args.model} does not match the model of --checkpoint {args.checkpoint} "
                              f"({name}), which the checkpoint rebuilds: drop --model (or give another checkpoint)")
        dataset = meta.get("dataset")
        if isinstance(dataset, dict):
            dataset = dataset.get("name")
        if dataset is not None and not isinstance(dataset, str):
            raise ConfigError(f"checkpoint {args.checkpoint} records the data set {dataset!r}, not a name: the file "
                              "was edited or damaged; train it again, or pass --dataset and a valid checkpoint")
        if meta.get("method") not in (None, "fp32"):
            from bitalloc.cli.freeze import frozen_path

            frozen = frozen_path(args.checkpoint)
            hint = f" (bitalloc train already wrote {frozen})" if frozen.exists() else ""
            raise ConfigError(f"checkpoint {args.checkpoint} was trained with method {meta.get('method')!r}: its "
                              f"quantizers are trained already, so there is nothing to quantize again; freeze it with "
                              f"`bitalloc freeze --checkpoint {args.checkpoint} --out {frozen}`{hint} and pass "
                              f"--quantized {frozen} to cost / export onnx / pack (post-training quantization needs "
                              "an FP32 checkpoint, --method fp32)")
        return model.eval(), name, dataset
    if not args.model:
        raise ConfigError("give --model NAME (a zoo model, or a factory MODULE:FUNCTION / FILE.py:FUNCTION with "
                          "--trust-code and --weights) or --checkpoint PATH (from `bitalloc train`)")
    info = models.model_info(args.model)
    if not info.pretrained:
        raise ConfigError(f"{args.model} has no pretrained weights: train it first with `bitalloc train --model "
                          f"{args.model} ...` and pass --checkpoint PATH (or name your own factory and weights: "
                          "--model MODULE:FUNCTION --weights FILE)")
    return models.create(args.model, pretrained=True).eval(), args.model, info.default_dataset


def _canonical_model(name: str) -> str:
    from bitalloc import models

    try:
        return models.model_info(name).name
    except ConfigError:
        return str(name)


# ---- data ---------------------------------------------------------------------------------------------------

SPLITS = ("random", "anchors")


def add_data_args(p: argparse.ArgumentParser, *, calib: bool = True, split: bool = False) -> None:
    """The data options; ``split`` adds ``--split`` (commands that pass ``args.split`` to :func:`load_splits`)."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="mnist, fashion-mnist, cifar10 or imagenet (default: the model's dataset)")
    g.add_argument("--data", help="path to the data set (default: $BITALLOC_DATA)")
    g.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    if calib:
        g.add_argument("--calib", type=int, default=32, help="calibration samples (default 32)")
    g.add_argument("--limit", type=int, default=None, help="evaluate on the first N evaluation samples only")
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration split (default 0)")
    if split:
        g.add_argument("--split", choices=SPLITS, default="random",
                       help="calibration / evaluation split: random (seeded, --seed) or anchors (the fixed split "
                            "the peer anchors were measured on: calibration = the first --calib items i with "
                            "i %% 31 == 0 in the data set's order, evaluation = the others; default random)")
    g.add_argument("--cache-dir", default=None, help="cache of decoded images (default $BITALLOC_CACHE or ~/.cache/bitalloc)")


def load_splits(dataset: str, data: str | None, n_calib: int, *, seed: int = 0, limit: int | None = None,
                cache_dir: str | None = None, split: str = "random", transform: Any = None) -> tuple[Any, Any]:
    """Calibration and evaluation sets.

    Data sets with a test split (MNIST, Fashion-MNIST, CIFAR-10): ``n_calib`` samples drawn (seeded) from the
    training split, evaluation on the test split. Single-split sets (the ImageNet sample): a seeded random
    split into ``n_calib`` calibration images and the rest for evaluation. ``split="anchors"`` takes the
    calibration samples by stride instead (:func:`bitalloc.data.strided_split`: the first ``n_calib`` indices
    i with i % 31 == 0; single-split sets evaluate on all the others). ``transform``: the preprocessing of image
    folders (a :class:`bitalloc.data.Preprocess`; default: the data set's).
    """
    from bitalloc.data import calibration_split, dataset_info, load_dataset, strided_split

    info = dataset_info(dataset)
    if transform is not None:
        load_dataset = functools.partial(load_dataset, transform=transform)
    if n_calib < 1:
        raise ConfigError(f"--calib {n_calib}: give at least 1 calibration sample")
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: choose one of {SPLITS}")

    def pick(items: Any) -> tuple[Any, Any]:
        return strided_split(items, n_calib) if split == "anchors" else calibration_split(items, n_calib, seed=seed)

    if "test" in info.splits:
        train = load_dataset(dataset, data, "train", cache_dir=cache_dir)
        calib, _ = pick(train)
        evaluation = load_dataset(dataset, data, "test", cache_dir=cache_dir)
    else:
        everything = load_dataset(dataset, data, cache_dir=cache_dir)
        calib, evaluation = pick(everything)
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit {limit}: give a positive number of evaluation samples")
        evaluation = torch.utils.data.Subset(evaluation, range(min(limit, len(evaluation))))
    if len(evaluation) == 0:
        raise DataError(f"the evaluation set of {dataset} is empty")
    return calib, evaluation


def check_model_fits(model: nn.Module, name: str, dataset: str, data: Any) -> None:
    """ConfigError (before any evaluation) when ``model`` cannot read ``dataset``'s inputs (e.g. a 3-channel
    checkpoint on a 1-channel data set), or its output does not have one logit per class of ``dataset``
    (fewer logits than classes would index labels out of range; the zoo's data sets fix the number)."""
    from bitalloc.cli.train import _num_classes
    from bitalloc.data import dataset_info

    x = data[0][0].unsqueeze(0)
    fix = f"pass the --dataset it was trained on, or a --checkpoint trained on {dataset}"
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as exc:  # any failure of the user's model on these inputs
        raise ConfigError(f"model {name} does not run on {dataset} inputs of shape {tuple(x.shape[1:])} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {fix}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ConfigError(f"model {name} returns {type(out).__name__}{tuple(getattr(out, 'shape', ()))}, not class "
                          f"scores of shape (batch, classes), on {dataset}; these commands evaluate classifiers")
    info = dataset_info(dataset)
    classes = info.num_classes or _num_classes(data)
    outputs = int(out.shape[1])
    if outputs < classes or (info.num_classes and outputs != classes):
        raise ConfigError(f"model {name} has {outputs} outputs but {dataset} has {classes} classes; {fix}")


def batches(dataset: Any, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Materialise a (small) data set as a list of batches (calibration sets are reused many times)."""
    from bitalloc.data import make_loader

    return [(x, y) for x, y in make_loader(dataset, batch_size, shuffle=False)]


def make_eval_fn(dataset: Any, batch_size: int, *, progress: Any = None) -> Callable[[nn.Module], tuple[float, float]]:
    """``fn(model) -> (top-1 %, seconds)`` on ``dataset``; ``fn.correct[id(model)]``: which samples that model got
    right (a bool array in the data set's order, for paired comparisons, :mod:`bitalloc.report.stats`)."""
    from bitalloc.train.loop import evaluate

    correct: dict[int, np.ndarray] = {}

    def fn(model: nn.Module) -> tuple[float, float]:
        start = time.perf_counter()
        res = evaluate(model, dataset, batch_size=batch_size, progress=progress, desc="evaluate", per_sample=True)
        correct[id(model)] = np.asarray(res.per_sample, dtype=bool)
        return 100.0 * res.accuracy, time.perf_counter() - start

    fn.correct = correct  # type: ignore[attr-defined]
    return fn


# ---- quantization configs ------------------------------------------------------------------------------------

def _bits_or_none(text: str) -> float | None:
    if text.lower() in ("none", "float", "fp32", "32f"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a bit width (a number, or 'none' for float)") from None


def _cli_number(text: Any, flag: str, *, integer: bool = False, lo: float, hi: float, lo_open: bool = False,
                extra: str = "") -> Any:
    """``text`` of option ``flag`` as an int (``integer``) or float in [lo, hi] (lo excluded when ``lo_open``);
    anything else is a one-line ConfigError naming the option and the valid values."""
    want = (f"an integer from {lo:g} to {hi:g}" if integer else
            f"a number {'>' if lo_open else '>='} {lo:g}" + ("" if hi == float("inf") else f" and <= {hi:g}")) + extra
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} {text!r} is not a number; give {want}") from None
    if integer and not value.is_integer():
        raise ConfigError(f"{flag} {text!r} is not an integer; give {want}")
    if not (lo < value if lo_open else lo <= value) or not value <= hi:
        raise ConfigError(f"{flag} {text!r} is out of range; give {want}")
    return int(value) if integer else value


def _set_method_option(layer: Any, method: str, key: str, value: Any, flag: str, presets: str,
                       config: str | None = None) -> None:
    """Set ``options[key] = value`` on the tensors whose range method is ``method``; an option that applies to
    no tensor is an error (it would be silently ignored). ``config``: the --config file, if any."""
    if value is None:
        return
    tensors = [t for t in (layer.weight, layer.act) if t is not None and t.method == method]
    if not tensors:
        fix = (f"set \"method\": \"{method}\" in {config}" if config else
               f"pick a preset that does (--preset {presets.replace(', ', ' / ')})")
        raise ConfigError(f"{flag} sets an option of the {method} range method, which this configuration does not "
                          f"use; {fix}")
    for t in tensors:
        t.options[key] = value


def add_quant_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--preset", default="aciq", choices=PRESETS,
                   help="method: minmax (naive), aciq-clip, aciq-alloc, aciq (full ACIQ pipeline), aciq-gptq "
                        "(full pipeline with GPTQ-rounded weights: the most accurate at 4 bits), kld, ksigma, "
                        "percentile, mse, smoothquant (transformers, W8A8), smoothquant-gptq (transformers, W4A8: "
                        "group-wise GPTQ weights) (default aciq)")
    g.add_argument("--w-bits", type=float, default=4, help="weight bits (fractional = per-channel average; default 4)")
    g.add_argument("--a-bits", type=_bits_or_none, default=4.0, help="activation bits, or 'none' (default 4)")
    g.add_argument("--act-granularity", choices=("tensor", "channel", "token"),
                   help="override the preset's activation granularity (default tensor; fractional --a-bits need "
                        "channel; token: one range per token on every input, per-token dynamic scales, with --online)")
    g.add_argument("--clip-check", choices=CLIP_CHECKS,
                   help="how the activation ranges are checked: none, output (against min-max by the layer's output "
                        "error; the aciq presets' default) or network (each step scaled by the multiplier that least "
                        "changes the network's outputs with that quantizer alone)")
    g.add_argument("--weight-granularity", choices=("tensor", "channel", "group"),
                   help="weight granularity (default channel; group: a range per --group-size input features of each "
                        "output channel, Linear layers, e.g. 4-bit GPTQ weights of transformers)")
    g.add_argument("--group-size", type=int, metavar="N",
                   help="input features per range with --weight-granularity group (default 128)")
    g.add_argument("--prior", choices=("laplace", "gauss", "auto"), help="ACIQ prior (default laplace; aciq presets)")
    g.add_argument("--k-sigma", metavar="K", help="k of the ksigma preset: clip at mean +- K standard deviations "
                                                  "(default 2)")
    g.add_argument("--percentile", metavar="P", help="percentile of the percentile preset, in [50, 100] "
                                                     "(default 99.99)")
    g.add_argument("--online", action="store_true", help="recompute activation statistics on every input")
    g.add_argument("--weight-method", choices=("minmax", "aciq", "mse", "ksigma", "percentile", "kld"),
                   help="range estimator of the weights (default: minmax; mse for aciq-gptq)")
    g.add_argument("--rounding", choices=("nearest", "gptq"),
                   help="rounding of the weights onto their grid: nearest, or gptq (error-compensating, uses the "
                        "calibration data; default: gptq for aciq-gptq, else nearest)")
    g.add_argument("--gptq-damp", metavar="D",
                   help="GPTQ damping: a number > 0 (D x mean Hessian diagonal added to the diagonal; default 0.01) "
                        "or 'cv' (chosen per layer from 0.01..3 by 4-fold cross-validation on the calibration samples)")
    g.add_argument("--gptq-act-order", action="store_true",
                   help="GPTQ: round the columns in decreasing order of the Hessian diagonal (act-order)")
    g.add_argument("--gptq-asymmetric", action="store_true",
                   help="GPTQ: fit each layer to the float network's output on its float inputs, not to its own "
                        "float weights on the quantized inputs (asymmetric calibration, GPTAQ; a float copy of the "
                        "model is kept while rounding)")
    g.add_argument("--bias-correction", choices=("none", "mean", "mean+norm"), help="override the preset's bias correction")
    g.add_argument("--allocation", choices=("aciq", "optimal"),
                   help="per-channel bit allocation rule (aciq, aciq-alloc presets): aciq (default: ACIQ eq. 10-11, "
                        "bins proportional to a^(2/3), as the reference code) or optimal (the exact integer minimum "
                        "of the eq. 10 error model; less accurate on real networks, see BENCHMARKS.md)")
    g.add_argument("--min-bits", metavar="B", help="lowest bit width of an allocated channel (default min(2, "
                                                   "floor(budget)); 2 for weights)")
    g.add_argument("--max-bits", metavar="B", help="highest bit width of an allocated channel (default max(8, "
                                                   "ceil(budget)))")
    g.add_argument("--first-last-bits", default="8", metavar="B",
                   help="bits of the first and last layer (an integer 2..32), or 'none' to treat them like the "
                        "others (default 8)")
    g.add_argument("--no-fold-bn", action="store_true", help="do not fold BatchNorm into the preceding layer")
    g.add_argument("--smooth", metavar="ALPHA", help="SmoothQuant: move activation outliers into the weights with "
                                                     "migration strength ALPHA in [0, 1] (0.5 usual) on the layers that read a LayerNorm")
    g.add_argument("--allow-act-outliers", action="store_true",
                   help="quantize static per-tensor activations even where their input channels have outliers too "
                        "large for the grid (refused by default, naming the layer; see --preset smoothquant)")
    g.add_argument("--product-bits", type=int, metavar="B",
                   help="quantize both operands of every activation x activation product (attention's q k^T and "
                        "weights x v) to B bits per sample on every input (default: float)")
    g.add_argument("--override", action="append", default=[], metavar="PATTERN=JSON",
                   help="per-layer override, e.g. 'features.0={\"weight.bits\": 8}' (glob, re:REGEX or type:CLASS)")
    g.add_argument("--config", help="a JSON QuantConfig file instead of --preset; the other options given on the "
                                    "command line apply on top of it (e.g. --w-bits, --override)")


#: quantization options (dests) that refine the configuration, from a --preset or on top of a --config file
QUANT_OPTIONS = ("preset", "w_bits", "a_bits", "act_granularity", "weight_granularity", "prior", "k_sigma",
                 "percentile", "online", "weight_method", "rounding", "gptq_damp", "gptq_act_order", "gptq_asymmetric",
                 "clip_check",
                 "bias_correction", "allocation", "min_bits", "max_bits", "first_last_bits", "no_fold_bn", "override",
                 "smooth", "allow_act_outliers", "group_size", "product_bits")


def _first_last(args: argparse.Namespace) -> int | None:
    return None if str(args.first_last_bits).lower() == "none" else _cli_number(
        args.first_last_bits, "--first-last-bits", integer=True, lo=2, hi=32, extra=", or 'none'")


def _gptq_damp(args: argparse.Namespace) -> float | str | None:
    value = getattr(args, "gptq_damp", None)
    if value is None:
        return None
    if str(value).lower() == "cv":
        return "cv"
    return _cli_number(value, "--gptq-damp", lo=0.0, hi=100.0, lo_open=True, extra=", or 'cv'")


def _smooth(args: argparse.Namespace) -> float | None:
    value = getattr(args, "smooth", None)
    return None if value is None else _cli_number(value, "--smooth", lo=0.0, hi=1.0)


def _bounds(args: argparse.Namespace) -> dict[str, int]:
    return {key: _cli_number(getattr(args, key), flag(key), integer=True, lo=1, hi=32)
            for key in ("min_bits", "max_bits") if getattr(args, key, None) is not None}


def _on_top_of_file(cfg: QuantConfig, args: argparse.Namespace, path: Path) -> None:
    """Apply the options given on the command line that a preset would take (bits, granularities, online, weight
    method, rounding, bit bounds, first/last bits, BatchNorm folding) to the configuration read from ``path``."""
    cli, layer = given(args), cfg.default
    if "preset" in cli:
        raise ConfigError(f"--preset {args.preset} and --config {path} both define the whole quantization method; "
                          "give one of them (--w-bits, --a-bits and the other options apply on top of either)")

    def tensor(key: str, what: str) -> Any:
        t = getattr(layer, key)
        if t is None:
            kind = "weights" if key == "weight" else "activations"
            raise ConfigError(f"{flag(what)}: the configuration in {path} leaves the {kind} in float (\"{key}\": "
                              "null); give that tensor's settings in the file")
        return t

    if "w_bits" in cli:
        tensor("weight", "w_bits").bits = args.w_bits
    if "a_bits" in cli:
        if args.a_bits is None:
            layer.act = None
        else:
            tensor("act", "a_bits").bits = args.a_bits
    for dest, key in (("weight_granularity", "weight"), ("act_granularity", "act")):
        if dest in cli:
            t = tensor(key, dest)
            t.granularity = getattr(args, dest)
            t.allocate = t.allocate and t.granularity == "channel"
    if "group_size" in cli:
        t = tensor("weight", "group_size")
        if t.granularity != "group":
            raise ConfigError("--group-size sets the input features per range of group-wise weights, but the weights "
                              f"are quantized per {t.granularity}: add --weight-granularity group")
        t.group_size = args.group_size
    if "online" in cli:
        tensor("act", "online").online = True
    if "clip_check" in cli:
        tensor("act", "clip_check").clip_check = args.clip_check
    if "weight_method" in cli:
        t = tensor("weight", "weight_method")
        t.method, t.options = args.weight_method, {}
    if "rounding" in cli:
        tensor("weight", "rounding").rounding = args.rounding
    for dest, value in (("gptq_damp", _gptq_damp(args)), ("gptq_act_order", True), ("gptq_asymmetric", True)):
        if dest in cli:
            t = tensor("weight", dest)
            if t.rounding != "gptq":
                raise ConfigError(f"{flag(dest)} sets GPTQ rounding, but the weights in {path} are rounded to "
                                  "nearest: add --rounding gptq")
            setattr(t, dest, value)
    bounds = _bounds(args)
    if bounds:
        allocated = [t for t in (layer.weight, layer.act) if t is not None and t.allocate]
        if not allocated:
            raise ConfigError(f"--min-bits / --max-bits bound per-channel bit allocation, but the configuration in "
                              f"{path} allocates no bits (\"allocate\": true on a per-channel tensor)")
        for t in allocated:
            for key, value in bounds.items():
                setattr(t, key, value)
    if "first_last_bits" in cli:
        cfg.first_last_bits = _first_last(args)
    if "no_fold_bn" in cli:
        cfg.fold_bn = False
    if "smooth" in cli:
        cfg.default.smooth = _smooth(args)
    if "product_bits" in cli:
        cfg.product_bits = args.product_bits


def _from_preset(args: argparse.Namespace) -> QuantConfig:
    _cli_number(args.w_bits, "--w-bits", lo=2, hi=32, extra=" (the presets' weights use a symmetric grid, which "
                "needs at least 2 bits)")
    if args.a_bits is not None:
        _cli_number(args.a_bits, "--a-bits", lo=1, hi=32, extra=", or 'none' for float activations")
    return preset(args.preset, args.w_bits, args.a_bits, act_granularity=args.act_granularity,
                  weight_granularity=args.weight_granularity, online=args.online, first_last_bits=_first_last(args),
                  fold_bn=not args.no_fold_bn, calibration_samples=getattr(args, "calib", 32),
                  seed=getattr(args, "seed", 0), weight_method=getattr(args, "weight_method", None),
                  rounding=getattr(args, "rounding", None), smooth=_smooth(args), gptq_damp=_gptq_damp(args),
                  gptq_act_order=True if getattr(args, "gptq_act_order", False) else None,
                  gptq_asymmetric=True if getattr(args, "gptq_asymmetric", False) else None,
                  clip_check=getattr(args, "clip_check", None),
                  group_size=getattr(args, "group_size", None), product_bits=getattr(args, "product_bits", None),
                  **_bounds(args))


def build_config(args: argparse.Namespace) -> QuantConfig:
    """The QuantConfig from --preset and the other options, or from a --config file with the options given on
    the command line applied on top of it (``--preset`` with ``--config`` is an error: both define the whole
    method). Without --calib / --seed on the command line, the file's ``calibration_samples`` / ``seed`` also
    set the calibration split (``args.calib`` / ``args.seed``). Records in ``args.config_sources`` what came
    from where (:func:`config_sources`)."""
    cli = given(args)
    if args.config:
        path = Path(args.config)
        cfg = read_config_file(path)
        _on_top_of_file(cfg, args, path)
        if hasattr(args, "calib"):
            if "calib" in cli:
                cfg.calibration_samples = args.calib
            else:
                args.calib = cfg.calibration_samples
        if hasattr(args, "seed"):
            if "seed" in cli:
                cfg.seed = args.seed
            else:
                args.seed = cfg.seed
    else:
        cfg = _from_preset(args)
    layer = cfg.default
    _set_method_option(layer, "aciq", "prior", args.prior, "--prior", "aciq, aciq-clip, aciq-alloc, aciq-gptq",
                       args.config)
    if getattr(args, "k_sigma", None) is not None:
        k = _cli_number(args.k_sigma, "--k-sigma", lo=0.0, hi=float("inf"), lo_open=True)
        _set_method_option(layer, "ksigma", "k", k, "--k-sigma", "ksigma", args.config)
    if getattr(args, "percentile", None) is not None:
        pct = _cli_number(args.percentile, "--percentile", lo=50.0, hi=100.0)
        _set_method_option(layer, "percentile", "percentile", pct, "--percentile", "percentile", args.config)
    if args.allocation:
        tensors = [t for t in (layer.weight, layer.act) if t is not None]
        if not any(t.allocate for t in tensors) and not args.override:
            source = f"the configuration in {args.config}" if args.config else f"--preset {args.preset}"
            raise ConfigError(f"--allocation applies to per-channel bit allocation, but {source} allocates no bits "
                              "here: use --preset aciq, aciq-alloc or aciq-gptq")
        for t in tensors:  # also reaches tensors that an --override switches to allocation
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
    if getattr(args, "allow_act_outliers", False):
        cfg.act_outliers = "allow"
    args.config_sources = {
        "config_file": str(args.config) if args.config else None,
        "preset": None if args.config else args.preset,
        "command_line": {flag(d): getattr(args, d) for d in QUANT_OPTIONS + ("calib", "seed") if d in cli},
    }
    return cfg.validate()


def check_quantized_source(args: argparse.Namespace) -> None:
    """With ``--quantized`` (a model quantized already), ``--model`` / ``--checkpoint`` and the quantization
    options would be ignored: each given on the command line is an error."""
    if not getattr(args, "quantized", None):
        return
    clash = [flag(d) for d in ("model", "checkpoint", "config") + QUANT_OPTIONS if d in given(args)]
    if clash:
        raise ConfigError(f"--quantized {args.quantized} is a quantized model already, so {', '.join(clash)} would be "
                          "ignored: drop them, or drop --quantized to quantize --model / --checkpoint here")


def config_sources(args: argparse.Namespace) -> dict[str, Any]:
    """Where the configuration came from (after :func:`build_config`): ``config_file`` (or None), ``preset``
    (None with a file) and ``command_line``, the options given on the command line with their values (with a
    file: applied on top of it; later overrides win)."""
    return dict(getattr(args, "config_sources", {}))


def config_label(args: argparse.Namespace) -> str:
    """A short name of the configuration: "aciq W4A4", or the --config file's stem plus the options given on
    top of it."""
    bits = f"W{args.w_bits:g}A{'f' if args.a_bits is None else f'{args.a_bits:g}'}"
    if not args.config:
        return f"{args.preset} {bits}"
    on_top = [f for f in config_sources(args).get("command_line", {}) if f not in ("--calib", "--seed")]
    return Path(args.config).stem + (f" + {' '.join(on_top)}" if on_top else "")


def output_dir(path: str, *, create: bool = True) -> Path:
    """The --out folder, checked (not a file, and inside a writable folder) and created unless ``create`` is
    False (commands check it before their work and create it only when they write into it)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder; choose a folder path")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot create or write files in {parent}; choose a writable folder")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out
