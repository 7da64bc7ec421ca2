"""The user's own model and data on the command line: one way for every command that takes a model.

Model (``ptq``, ``cost``, ``export onnx``, ``pack``, ``bench cpu``, ``train``)::

    --model mypkg.models:build            # a factory MODULE:FUNCTION, or
    --model path/to/net.py:build          # a factory in a Python file
    --trust-code                          # required to import either (it runs that code)
    --model-kwargs '{"num_classes": 10}'  # keyword arguments of the factory (JSON)
    --weights weights.pt                  # a state_dict (.pt / .pth / .bin), .safetensors, or a bitalloc checkpoint

Factories inside bitalloc (``bitalloc.models.bert:all_minilm_l6_v2``) need no ``--trust-code``.

Data: a zoo data set (``--dataset`` / ``--data``) with, for image folders (``imagenet``, ``imagefolder``), the
preprocessing ``--input-size S`` (crop S after resizing the short side to round(S / 0.875)), ``--resize``,
``--crop``, ``--mean`` / ``--std`` (per channel, on pixels scaled to [0, 1]; values above 1 are read on the 0..255
scale, e.g. ``--mean 127 --std 128`` is EfficientNet-Lite's (x - 127) / 128, the default for ``imagenet``); or,
for models that do not read images, ``--inputs FILE`` (:mod:`bitalloc.data.tensors`: a tensor, tuple or dict of
tensors per sample, or batched, with optional labels): ``--calib`` samples drawn (seeded) for calibration and
the rest for evaluation, or all of ``--eval-inputs FILE`` for evaluation. Without labels, evaluation compares
the quantized model's outputs with the FP32 model's (:func:`bitalloc.report.stats.output_agreement`: top-1
agreement, cosine similarity, SQNR in dB, nearest-neighbour agreement).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from bitalloc.errors import ConfigError

__all__ = ["add_user_model_args", "add_input_args", "is_user_model", "load_user_model", "ModelData", "model_data",
           "preprocess_from_args", "agreement_eval_fn", "example_of"]

#: resize = round(crop / CROP_RATIO) when only --input-size is given (the usual 224 / 256)
CROP_RATIO = 0.875
PREPROCESS_OPTIONS = ("input_size", "resize", "crop", "mean", "std")


def add_user_model_args(g: Any) -> None:
    """--trust-code, --model-kwargs, --weights (into the "model" argument group ``g``)."""
    g.add_argument("--trust-code", action="store_true",
                   help="allow importing the model factory named by --model (MODULE:FUNCTION or FILE.py:FUNCTION) or "
                        "recorded in --checkpoint: this runs that code, so use it only for code you trust")
    g.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments of the --model factory, as a JSON object")
    g.add_argument("--weights", metavar="FILE",
                   help="weights of the --model factory's model: a state_dict saved with torch.save (.pt / .pth / "
                        ".bin), a .safetensors file, or a checkpoint of `bitalloc train`")


MODEL_HELP = ("the model: a zoo name (lenet5, vgg7, resnet20, efficientnet_lite0), or a factory MODULE:FUNCTION or "
              "path/to/file.py:FUNCTION that returns an nn.Module (with --trust-code; --weights, --model-kwargs)")


def add_input_args(p: argparse.ArgumentParser) -> None:
    """--inputs, --eval-inputs and the image preprocessing options (read by :func:`model_data`)."""
    g = p.add_argument_group("model inputs (tensor files) and image preprocessing")
    g.add_argument("--inputs", metavar="FILE",
                   help="model inputs from a tensor file (torch.save of a tensor, a tuple or dict of tensors, batched "
                        "or a list of samples; optionally {'inputs': ..., 'labels': ...}) instead of --dataset/--data: "
                        "--calib samples calibrate, the rest evaluate (without labels: agreement with the FP32 model)")
    g.add_argument("--eval-inputs", metavar="FILE", help="evaluate on this tensor file (all of --inputs calibrates)")
    g.add_argument("--input-size", type=int, metavar="S",
                   help="image folders: the model's input size S (center crop S of the image resized to "
                        "round(S / 0.875) on its short side; default for imagenet: 224)")
    g.add_argument("--resize", type=int, metavar="R", help="image folders: resize the short side to R (bilinear)")
    g.add_argument("--crop", type=int, metavar="C", help="image folders: center crop C x C")
    g.add_argument("--mean", metavar="M[,M,M]", help="image folders: per-channel mean of pixels in [0, 1] (values > 1: "
                                                     "0..255 scale, e.g. 127 with --std 128 for (x - 127) / 128)")
    g.add_argument("--std", metavar="S[,S,S]", help="image folders: per-channel std (same scale as --mean)")


def is_user_model(args: argparse.Namespace) -> bool:
    from bitalloc.models.user import is_factory_spec

    return is_factory_spec(getattr(args, "model", None))


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    text = getattr(args, "model_kwargs", None)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-kwargs {text!r} is not JSON ({exc}); give an object such as "
                          "'{\"num_classes\": 10}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--model-kwargs {text!r}: give a JSON object of keyword arguments")
    return value


def check_user_model_options(args: argparse.Namespace) -> None:
    """--weights / --model-kwargs apply to a --model factory only: with a zoo model or --checkpoint they would be
    ignored, which is an error."""
    if is_user_model(args):
        return
    stray = [f for f, d in (("--weights", "weights"), ("--model-kwargs", "model_kwargs")) if getattr(args, d, None)]
    if stray:
        what = "--checkpoint, which holds its own weights" if getattr(args, "checkpoint", None) else \
            "a zoo model" if getattr(args, "model", None) else "no --model"
        raise ConfigError(f"{' / '.join(stray)} apply to a --model factory (MODULE:FUNCTION or FILE.py:FUNCTION), not "
                          f"to {what}: drop {' / '.join(stray)}, or name a factory with --model")


def load_user_model(args: argparse.Namespace) -> tuple[nn.Module, str, None]:
    """(model in eval mode, the factory spec as its name, None) from --model FACTORY, --model-kwargs, --weights."""
    from bitalloc.models.user import build_user_model

    if getattr(args, "checkpoint", None):
        raise ConfigError(f"--model {args.model} and --checkpoint {args.checkpoint} both give the model: pass the "
                          "factory's weights with --weights, or drop --model to use the checkpoint's model")
    model = build_user_model(args.model, trust_code=bool(getattr(args, "trust_code", False)),
                             kwargs=model_kwargs(args), weights=getattr(args, "weights", None))
    return model, args.model, None


# ---- data ---------------------------------------------------------------------------------------------------

def _channels(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: give one number or one per channel, e.g. 0.485,0.456,0.406") from None
    if len(values) not in (1, 3):
        raise ConfigError(f"{flag} {text!r}: give one number or three (R, G, B)")
    return values * 3 if len(values) == 1 else values


def preprocess_from_args(args: argparse.Namespace, dataset: str) -> Any:
    """The image preprocessing of --input-size / --resize / --crop / --mean / --std for ``dataset`` (an image
    folder), or None when none is given. Options given for a data set with fixed preprocessing are an error."""
    from bitalloc.data import Normalization, Preprocess, get_transform

    given = [o for o in PREPROCESS_OPTIONS if getattr(args, o, None) is not None]
    if not given:
        return None
    if dataset not in ("imagenet", "imagefolder"):
        raise ConfigError(f"{', '.join('--' + o.replace('_', '-') for o in given)} set the preprocessing of image "
                          f"folders (--dataset imagenet or imagefolder); {dataset} has its own fixed preprocessing")
    base = get_transform("imagenet-lite" if dataset == "imagenet" else "to-tensor")
    for flag_, value in (("--input-size", args.input_size), ("--resize", args.resize), ("--crop", args.crop)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag_} {value}: give a positive number of pixels")
    crop = args.crop or args.input_size or base.crop
    resize = args.resize or (round(args.input_size / CROP_RATIO) if args.input_size else base.resize)
    if crop is not None and resize is not None and resize < crop:
        raise ConfigError(f"--resize {resize} is smaller than the crop {crop}: the crop must fit in the resized image")
    norm = base.normalization
    if args.mean is not None or args.std is not None:
        mean = _channels(args.mean, "--mean") if args.mean is not None else (0.0, 0.0, 0.0)
        std = _channels(args.std, "--std") if args.std is not None else (1.0, 1.0, 1.0)
        pixel_scale = max(mean + std) > 1.0  # 0..255 values, e.g. 127 / 128
        norm = Normalization(mean, std, scale=1.0 if pixel_scale else 255.0)
    name = f"custom(resize={resize},crop={crop},mean={list(norm.mean)},std={list(norm.std)},scale={norm.scale:g})"
    return Preprocess(name, resize, crop, norm)


def example_of(batch: Any) -> Any:
    """One sample of a batch's inputs (batch dimension kept)."""
    from bitalloc.batches import batch_inputs, cut_inputs

    return cut_inputs(batch_inputs(batch), 1)


@dataclass
class ModelData:
    """Calibration batches and the evaluation data of a command: from a zoo data set or a tensor file."""

    dataset: str
    calib: list
    evaluation: Any  # a Dataset (images) or TensorSamples (tensor file), or None
    labelled: bool
    batch_size: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def example(self) -> Any:
        return example_of(self.calib[0])

    def eval_batches(self) -> list:
        from bitalloc.cli.common import batches

        if self.evaluation is None:
            raise ConfigError("this command has no evaluation data")
        if hasattr(self.evaluation, "batches"):
            return self.evaluation.batches(self.batch_size)
        return batches(self.evaluation, self.batch_size)

    def eval_fn(self, reference: nn.Module, *, progress: Any = None) -> Callable[[nn.Module], tuple[float, float]]:
        """``fn(model) -> (top-1 %, seconds)``: accuracy with labels; without labels, top-1 agreement with
        ``reference`` (the FP32 model), and ``fn.metrics`` holds the last :class:`OutputAgreement` as a dict."""
        from bitalloc.cli.common import make_eval_fn

        if self.labelled and not hasattr(self.evaluation, "batches"):
            return make_eval_fn(self.evaluation, self.batch_size, progress=progress)
        return agreement_eval_fn(reference, self.eval_batches(), labelled=self.labelled)


def _run_outputs(model: nn.Module, data: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    from bitalloc.batches import batch_inputs, call_model
    from bitalloc.model.trace import _flatten_tensors

    outs, labels = [], []
    with torch.no_grad():
        for batch in data:
            out = call_model(model.eval(), batch_inputs(batch))
            found = out if isinstance(out, torch.Tensor) else next(iter(_flatten_tensors(out, [])), None)
            if found is None:
                raise ConfigError(f"the model returned {type(out).__name__} without a tensor: nothing to evaluate")
            outs.append(found.detach().float().cpu())
            if isinstance(batch, (list, tuple)) and len(batch) > 1:
                labels.append(batch[1])
    return torch.cat(outs), (torch.cat(labels) if labels else None)


def agreement_eval_fn(reference: nn.Module, data: list, *, labelled: bool = False) -> Callable[[nn.Module], tuple[float, float]]:
    """Evaluation on tensor-file batches: ``fn(model) -> (%, seconds)``, the % being top-1 accuracy with labels,
    else the top-1 agreement with ``reference``'s outputs; ``fn.metrics``: the agreement with the reference
    (:func:`bitalloc.report.stats.output_agreement`) of the model last evaluated, plus ``top1`` with labels."""
    from bitalloc.report.stats import output_agreement

    state: dict[str, Any] = {}

    def fn(model: nn.Module) -> tuple[float, float]:
        start = time.perf_counter()
        out, labels = _run_outputs(model, data)
        seconds = time.perf_counter() - start
        if model is reference:
            state["ref"] = out
        elif "ref" not in state:
            state["ref"] = _run_outputs(reference, data)[0]
        ag = output_agreement(state["ref"].numpy(), out.numpy())
        fn.metrics = {"agreement": ag.to_dict()}  # type: ignore[attr-defined]
        if labelled and labels is not None:
            top1 = 100.0 * float((out.argmax(-1) == labels).float().mean())
            fn.metrics["top1"] = top1  # type: ignore[attr-defined]
            return top1, seconds
        return ag.top1_agreement, seconds

    fn.metrics = {}  # type: ignore[attr-defined]
    return fn


def _tensor_data(args: argparse.Namespace, n_calib: int, seed: int, limit: int | None, batch_size: int,
                 need_eval: bool) -> ModelData:
    from bitalloc.data.tensors import load_tensor_inputs

    samples = load_tensor_inputs(args.inputs)
    if n_calib < 1:
        raise ConfigError(f"--calib {n_calib}: give at least 1 calibration sample")
    evaluation = None
    if getattr(args, "eval_inputs", None):
        calib = samples.subset(range(min(n_calib, len(samples))))
        evaluation = load_tensor_inputs(args.eval_inputs) if need_eval else None
    elif need_eval:
        if len(samples) <= n_calib:
            raise ConfigError(f"--inputs {args.inputs} has {len(samples)} samples: calibration (--calib {n_calib}) "
                              "needs some left for evaluation; give more samples, a smaller --calib, or "
                              "--eval-inputs FILE")
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
        calib, evaluation = samples.subset(order[:n_calib]), samples.subset(order[n_calib:])
    else:
        calib = samples.subset(range(min(n_calib, len(samples))))
    if evaluation is not None and limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit {limit}: give a positive number of evaluation samples")
        evaluation = evaluation.subset(range(min(limit, len(evaluation))))
    labelled = samples.labelled and (evaluation is None or evaluation.labelled)
    name = f"inputs:{args.inputs}"
    return ModelData(name, calib.batches(min(batch_size, n_calib)), evaluation, labelled, batch_size,
                     {"inputs": samples.describe()})


def check_runs(model: nn.Module, name: str, data: ModelData) -> None:
    """ConfigError (before any work) when ``model`` does not run on one sample of ``data``."""
    from bitalloc.batches import call_model

    x = data.example
    try:
        with torch.no_grad():
            call_model(model.eval(), x)
    except Exception as exc:  # any failure of the user's model on these inputs
        raise ConfigError(f"model {name} does not run on the inputs of {data.dataset} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); give inputs the model's forward "
                          "takes (a tensor, a tuple of positional inputs or a dict of keyword inputs)") from None


def model_data(args: argparse.Namespace, model: nn.Module | None, name: str, ckpt_dataset: str | None, *,
               need_eval: bool = True, check: bool = True) -> ModelData:
    """Calibration batches and evaluation data for ``model`` from --inputs (tensor file) or --dataset / --data
    (with the image preprocessing options); checks that the model runs on them (and, for labelled image data,
    that it has one output per class) unless ``check`` is False."""
    from bitalloc import models
    from bitalloc.cli.common import batches, check_model_fits, load_splits

    n_calib = getattr(args, "calib", 32)
    seed, limit, bs = getattr(args, "seed", 0), getattr(args, "limit", None), getattr(args, "batch_size", 64)
    if getattr(args, "inputs", None):
        clash = [f"--{o.replace('_', '-')}" for o in ("dataset", "data", *PREPROCESS_OPTIONS)
                 if getattr(args, o, None) is not None]
        if clash:
            raise ConfigError(f"--inputs {args.inputs} gives the data, so {', '.join(clash)} would be ignored: drop "
                              f"{'it' if len(clash) == 1 else 'them'}, or drop --inputs")
        data = _tensor_data(args, n_calib, seed, limit, bs, need_eval)
        if check and model is not None:
            check_runs(model, name, data)
        return data
    if getattr(args, "eval_inputs", None):
        raise ConfigError("--eval-inputs goes with --inputs (tensor files); give --inputs FILE too")
    dataset = args.dataset or ckpt_dataset
    if dataset is None:
        try:
            dataset = models.model_info(name).default_dataset
        except ConfigError:
            raise ConfigError(f"model {name} is not a zoo model, so it has no default data set: give --dataset and "
                              "--data (images), or --inputs FILE (a tensor file of model inputs)") from None
    from bitalloc.data import dataset_info

    dataset = dataset_info(dataset).name
    pre = preprocess_from_args(args, dataset)
    split = {"split": args.split} if getattr(args, "split", None) else {}  # commands with --split
    calib, evaluation = load_splits(dataset, args.data, n_calib, seed=seed, limit=limit,
                                    cache_dir=getattr(args, "cache_dir", None), transform=pre, **split)
    if check and model is not None:
        check_model_fits(model, name, dataset, calib)
    extra = {"preprocess": pre.name} if pre is not None else {}
    return ModelData(dataset, batches(calib, min(bs, n_calib)), evaluation if need_eval else None, True, bs, extra)
