"""``bitalloc train``: train a zoo model on a dataset with a named preset (also under torchrun).

Examples::

    bitalloc train --model lenet5 --dataset fashion-mnist --data /usr/share/datasets/fashion-mnist
    bitalloc train --model resnet20 --dataset cifar10 --data $BITALLOC_DATA --epochs 30 --out runs/r20.pt
    torchrun --nproc_per_node 2 -m bitalloc train --model resnet20 --dataset cifar10   # data-parallel

Outputs (defaults derive from ``--out``, itself ``runs/<model>_<dataset>_<method>.pt``): the checkpoint
(resumable with ``--resume``), a JSON-lines log (``.jsonl``, one record per epoch), a JSON result (``.json``)
and, for the quantization-aware methods (lsq, pact, bb), the frozen model (``-frozen.pt``: test-time bit widths
and kept channels, :func:`bitalloc.model.freeze.freeze`, written with ``save_quantized``) that
``bitalloc cost / export onnx / pack --quantized`` read. A fresh run refuses to replace existing outputs
unless ``--overwrite``.

Extension points (for tests and new data): :data:`DATASET_HOOKS` maps extra dataset names to loaders and
:data:`MODEL_HOOKS` extra model names to importable factories; the hidden dataset ``synthetic`` and model
``synthetic-mlp`` make the command testable without real data.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bitalloc.errors import CheckpointError, ConfigError, DataError

# ---- hidden datasets and models (tests, demos) -------------------------------------------------------------


def synthetic_dataset(n: int, *, seed: int = 0, num_classes: int = 4, shape: tuple[int, ...] = (1, 8, 8),
                      separation: float = 3.0, noise_seed: int | None = None) -> torch.utils.data.TensorDataset:
    """Gaussian blobs shaped like small images: ``x = separation * mean[y] + N(0, 1)``, ``y`` uniform.

    Class means are random unit vectors drawn from ``seed`` (shared by train and validation sets); the
    samples from ``noise_seed`` (default ``seed + 1``). Nearly linearly separable at the default separation.
    """
    g = torch.Generator().manual_seed(seed)
    dim = int(math.prod(shape))
    means = torch.randn(num_classes, dim, generator=g)
    means = means / means.norm(dim=1, keepdim=True)
    g2 = torch.Generator().manual_seed(seed + 1 if noise_seed is None else noise_seed)
    y = torch.randint(0, num_classes, (n,), generator=g2)
    x = separation * means[y] + torch.randn(n, dim, generator=g2)
    return torch.utils.data.TensorDataset(x.view(n, *shape).float(), y)


def synthetic_mlp(num_classes: int = 4, in_features: int = 64, hidden: int = 32) -> nn.Module:
    """A tiny MLP for ``[N, 1, 8, 8]`` synthetic inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def _synthetic(args: argparse.Namespace) -> tuple[Any, Any, int]:
    train = synthetic_dataset(int(os.environ.get("BITALLOC_SYNTHETIC_N", "512")), seed=0, noise_seed=1)
    val = synthetic_dataset(256, seed=0, noise_seed=2)
    return train, val, 4


#: the seed of the samples ``--holdout`` keeps out of training (fixed, so that runs of any --seed compare on them)
HOLDOUT_SEED = 0

# name -> function(args) -> (train_set, val_set, num_classes)
DATASET_HOOKS: dict[str, Callable[[argparse.Namespace], tuple[Any, Any, int]]] = {"synthetic": _synthetic}
# name -> "module:function" factory called with num_classes=...
MODEL_HOOKS: dict[str, str] = {"synthetic-mlp": "bitalloc.cli.train:synthetic_mlp"}


# ---- parser -------------------------------------------------------------------------------------------------

def register(subparsers: Any) -> argparse.ArgumentParser:
    from bitalloc.train.presets import METHODS, PRESETS

    p = subparsers.add_parser(
        "train", help="train a model: FP32, or quantization-aware with --method lsq|pact|bb (writes a frozen model too)",
        description="Train a zoo model on a dataset with its preset recipe; works under torchrun. Presets: "
                    + "; ".join(f"{k}: {v.notes}" for k, v in PRESETS.items()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="model name (lenet5, vgg7, resnet20, efficientnet_lite0) or a factory MODULE:FUNCTION / "
                        "path/to/file.py:FUNCTION returning an nn.Module (with --trust-code; it gets num_classes when "
                        "its signature takes it, and --model-kwargs)")
    p.add_argument("--trust-code", action="store_true",
                   help="allow importing the --model factory (runs its code: only for code you trust)")
    p.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments of the --model factory (a JSON object)")
    p.add_argument("--dataset", default=None,
                   help="dataset name (mnist, fashion-mnist, cifar10, imagenet, imagefolder); default: the model's")
    p.add_argument("--data", default=None, help="data path (default: $BITALLOC_DATA)")
    p.add_argument("--method", default="fp32", choices=sorted(METHODS), help="training method")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps instead of epochs")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (split across torchrun ranks)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--schedule", default=None,
                   help="lr schedule: constant, cosine, linear, constant_then_linear, step, one_cycle")
    p.add_argument("--warmup-epochs", type=float, default=None)
    p.add_argument("--label-smoothing", type=float, default=None)
    p.add_argument("--max-grad-norm", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes per rank")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    p.add_argument("--out", default=None, help="checkpoint path (default: runs/<model>_<dataset>_<method>.pt)")
    p.add_argument("--log", default=None, help="JSON-lines log (default: <out without .pt>.jsonl)")
    p.add_argument("--json", default=None, help="JSON result (default: <out without .pt>.json)")
    p.add_argument("--frozen", default=None,
                   help="lsq/pact/bb: the frozen quantized model for --quantized (default: <out without .pt>-frozen.pt)")
    p.add_argument("--resume", action="store_true", help="continue training from --out")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs of a previous run")
    p.add_argument("--init", default=None, help="start from these weights (fine-tuning): a checkpoint of bitalloc "
                                                "train, a state_dict (.pt / .pth / .bin) or a .safetensors file")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="start from the model's shipped pretrained weights (default: the preset's choice)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random training augmentation (default: the preset's choice)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="held-out fraction for datasets without a test split (imagenet, imagefolder)")
    p.add_argument("--holdout", type=int, default=None, metavar="N",
                   help="validate on N training samples held out of training (the same N, chosen with seed "
                        f"{HOLDOUT_SEED}, whatever --seed) instead of the test split: to compare runs, e.g. the "
                        "short trials of a sweep, without looking at the test images; the test split stays unused")
    p.add_argument("--transform", default=None, help="preprocessing name for imagenet / imagefolder data")
    p.add_argument("--cache-dir", default=None, help="decoded-image cache (default: $BITALLOC_CACHE)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across ranks")
    p.add_argument("--progress", choices=["auto", "bar", "log", "off"], default=None,
                   help="progress display (default: bars on a terminal, log lines otherwise)")
    for method in METHODS.values():
        if method.add_arguments:
            method.add_arguments(p)
    p.set_defaults(func=run)
    return p


# ---- data and model ----------------------------------------------------------------------------------------

def _canonical_dataset(name: str) -> str:
    if name in DATASET_HOOKS:
        return name
    from bitalloc.data import dataset_info

    return dataset_info(name).name


def _num_classes(dataset: Any) -> int:
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    n = getattr(dataset, "num_classes", None)
    if n:
        return int(n)
    classes = getattr(dataset, "classes", None)
    if classes:
        return len(classes)
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return int(torch.as_tensor(labels).max()) + 1
    raise DataError("cannot tell the number of classes of this dataset; it has no classes or labels attribute")


def has_test_split(dataset: str) -> bool:
    """Whether data set ``dataset`` has its own test split (the validation set of a run without ``--holdout``);
    those without one (imagenet, imagefolder) are split by ``--val-fraction`` or ``--holdout``."""
    if dataset in DATASET_HOOKS:
        return True
    from bitalloc.data import dataset_info

    info = dataset_info(dataset)
    return "test" in info.splits and "train" in info.splits


def load_data(args: argparse.Namespace, augment: bool) -> tuple[Any, Any, int]:
    """``(train_set, val_set, num_classes)`` for ``args.dataset`` at ``args.data`` (or ``$BITALLOC_DATA``).
    ``--val-fraction`` / ``--transform`` given for a data set with its own test split are errors (unused).
    ``--holdout N``: the validation set is N training samples (:func:`holdout_split`, without augmentation) and
    the training set the rest."""
    from bitalloc.cli.common import flag, given

    holdout = getattr(args, "holdout", None)
    if holdout is not None and "val_fraction" in given(args):
        raise ConfigError(f"--holdout {holdout} and --val-fraction {args.val_fraction} both choose the validation "
                          "samples: give one")
    own_split = has_test_split(args.dataset)
    if args.dataset not in DATASET_HOOKS:
        from bitalloc.data import calibration_split, dataset_info, load_dataset

        info = dataset_info(args.dataset)
    unused = [flag(d) for d in ("val_fraction", "transform") if d in given(args)] if own_split else []
    if unused:
        raise ConfigError(f"{' / '.join(unused)} {'applies' if len(unused) == 1 else 'apply'} to data sets without a "
                          f"test split (imagenet, imagefolder), but {args.dataset} has one, used for validation: drop "
                          f"{' / '.join(unused)}")
    if args.dataset in DATASET_HOOKS:
        train, val, n = DATASET_HOOKS[args.dataset](args)
        return (*holdout_split(train, train, holdout), n) if holdout is not None else (train, val, n)
    root = args.data or os.environ.get("BITALLOC_DATA") or None
    if augment and info.augmentation is None:
        augment = False
    if own_split:
        train = load_dataset(info.name, root, "train", augment=augment, cache_dir=args.cache_dir)
        if holdout is not None:
            plain = load_dataset(info.name, root, "train", augment=False, cache_dir=args.cache_dir) if augment else train
            train, val = holdout_split(train, plain, holdout)
        else:
            val = load_dataset(info.name, root, "test", augment=False, cache_dir=args.cache_dir)
    else:
        kwargs: dict[str, Any] = {"cache_dir": args.cache_dir}
        if args.transform:
            kwargs["transform"] = args.transform
        full = load_dataset(info.name, root, None, **kwargs)
        if holdout is not None:
            train, val = holdout_split(full, full, holdout)
        else:
            if not 0.0 < args.val_fraction < 1.0:
                raise ConfigError(f"--val-fraction {args.val_fraction} must lie in (0, 1)")
            n_val = max(1, int(round(args.val_fraction * len(full))))
            val, train = calibration_split(full, n_val, seed=args.seed)
    n = info.num_classes or _num_classes(train)
    return train, val, int(n)


def holdout_split(train: Any, plain: Any, n: int) -> tuple[Any, Any]:
    """``--holdout n``: (the training samples but ``n``, those ``n``), the same ``n`` for every run
    (:func:`bitalloc.data.calibration_split` with seed :data:`HOLDOUT_SEED`); the held-out ones are taken from
    ``plain`` (the training split loaded without augmentation), the rest from ``train``."""
    from bitalloc.data import calibration_split

    size = len(train)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n < size:
        raise ConfigError(f"--holdout {n}: give a number of samples between 1 and {size - 1} (the training set has "
                          f"{size})")
    held, _ = calibration_split(plain, n, seed=HOLDOUT_SEED)
    _, rest = calibration_split(train, n, seed=HOLDOUT_SEED)
    return rest, held


def build_model(args: argparse.Namespace, num_classes: int, pretrained: bool) -> tuple[nn.Module, dict[str, Any], str | None]:
    """``(model, constructor kwargs, factory)`` for ``args.model``: a zoo model, a hook, or a factory spec
    (MODULE:FUNCTION or FILE.py:FUNCTION, imported with --trust-code; called with --model-kwargs, plus
    ``num_classes`` when its signature takes it and --model-kwargs does not set it)."""
    from bitalloc.models.user import is_factory_spec

    kwargs = {"num_classes": int(num_classes)}
    if is_factory_spec(args.model):
        import inspect

        from bitalloc.cli.model_args import model_kwargs
        from bitalloc.models.user import build_user_model, import_factory

        kwargs = model_kwargs(args)
        factory = import_factory(args.model, trust_code=bool(args.trust_code))
        try:
            takes = "num_classes" in inspect.signature(factory).parameters
        except (TypeError, ValueError):
            takes = False
        if takes and "num_classes" not in kwargs:
            kwargs["num_classes"] = int(num_classes)
        return build_user_model(args.model, trust_code=True, kwargs=kwargs).train(), kwargs, args.model
    if args.model in MODEL_HOOKS:
        from bitalloc.train.checkpoint import _import_factory

        factory = MODEL_HOOKS[args.model]
        return _import_factory(factory, trusted=True)(**kwargs), kwargs, factory
    from bitalloc.models import create, model_info

    name = model_info(args.model).name
    args.model = name
    return create(name, pretrained=pretrained, **kwargs), kwargs, None


# ---- output ------------------------------------------------------------------------------------------------

def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.2f}%"


def _num(v: Any, fmt: str = ".4f") -> str:
    return "-" if v is None else format(float(v), fmt)


def print_summary(result: Any, header: dict[str, Any], outputs: dict[str, str | None], stream: Any = None) -> None:
    """The per-epoch table and the summary (rich when installed, plain text otherwise)."""
    stream = stream if stream is not None else sys.stdout
    cols = ["epoch", "loss", "acc", "val loss", "val acc", "lr", "ms/step", "time"]
    rows = []
    for r in result.history:
        lr = r.get("lr") or {}
        lr0 = lr.get("default", next(iter(lr.values()), None)) if isinstance(lr, dict) else lr
        rows.append([str(r.get("epoch")), _num(r.get("train_loss")), _pct(r.get("train_accuracy")),
                     _num(r.get("val_loss")), _pct(r.get("val_accuracy")), _num(lr0, ".3g"),
                     f"{1000 * float(r.get('time_per_step') or 0):.1f}", f"{float(r.get('time') or 0):.1f} s"])
    title = (f"bitalloc train: {header['model']} on {header['dataset']} ({header['method']}, "
             f"{header['world_size']} process(es), {header['device']})")
    summary = [
        ("final val accuracy", _pct(result.final_accuracy)),
        ("best val accuracy", f"{_pct(result.best_accuracy)} (epoch {result.best_epoch})"
         if result.best_accuracy is not None else "-"),
        ("epochs / steps", f"{result.epochs} / {result.steps}"),
        ("time per step", f"{1000 * result.time_per_step:.1f} ms" if result.time_per_step else "-"),
        ("throughput", f"{result.samples_per_s:.0f} samples/s" if result.samples_per_s else "-"),
        ("training time", f"{result.train_time:.1f} s (+ {result.eval_time:.1f} s evaluation)"),
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None  # type: ignore[assignment]
    if Console is not None:
        tty = bool(getattr(stream, "isatty", lambda: False)())
        console = Console(file=stream, highlight=False, width=None if tty else 120)
        table = Table(title=title, caption="loss / acc: training (mean over the epoch); val: after the epoch")
        for c in cols:
            table.add_column(c, justify="right" if c != "epoch" else "center")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        for k, v in summary:
            console.print(f"{k:>20}: {v}")
        for k, v in outputs.items():
            if v:
                console.print(f"{k:>20}: {v}")
        return
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print(title, file=stream)
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)), file=stream)
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)), file=stream)
    for k, v in summary:
        print(f"{k:>20}: {v}", file=stream)
    for k, v in outputs.items():
        if v:
            print(f"{k:>20}: {v}", file=stream)


# ---- command -----------------------------------------------------------------------------------------------

def _default_paths(args: argparse.Namespace) -> tuple[str, str, str]:
    model = args.model.rpartition(":")[2].rpartition(".")[2] if ":" in args.model else args.model  # a factory: its name
    out = args.out or str(Path("runs") / f"{model}_{args.dataset}_{args.method}.pt")
    stem = out[:-3] if out.endswith(".pt") else out
    return out, args.log or f"{stem}.jsonl", args.json or f"{stem}.json"


def _frozen_out(args: argparse.Namespace, out: str) -> str | None:
    """Where a quantization-aware run writes its frozen model (None for FP32 training)."""
    if args.method == "fp32":
        return None
    from bitalloc.cli.freeze import frozen_path

    return getattr(args, "frozen", None) or str(frozen_path(out))


def write_frozen_model(model: nn.Module, path: str, args: argparse.Namespace, options: dict[str, Any],
                       factory: str | None, model_kwargs: dict[str, Any]) -> Any:
    """Freeze the trained model and write it for ``--quantized`` (see :func:`bitalloc.model.freeze.save_frozen`)."""
    from bitalloc.model.freeze import save_frozen

    extra = {"source_checkpoint": args.out, "method": args.method, "method_options": options, "dataset": args.dataset,
             "model_factory": factory, "model_kwargs": model_kwargs}
    frozen, _ = save_frozen(model, path, model_name=args.model, example_shape=options.get("input_shape"),
                            extra=extra)
    return frozen


def config_overrides(args: argparse.Namespace, method: Any, options: dict[str, Any], preset: Any) -> dict[str, Any]:
    """The training settings over the model's FP32 preset: the method's recipe (quantization-aware methods:
    optimizer, schedule, and the dataset's epochs / batch size, see :mod:`bitalloc.train.methods`), then the
    explicit command-line values."""
    overrides: dict[str, Any] = method.overrides(preset, options)
    explicit = dict(epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    optimizer=args.optimizer, weight_decay=args.weight_decay, schedule=args.schedule,
                    warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
                    max_grad_norm=args.max_grad_norm)
    overrides.update({k: v for k, v in explicit.items() if v is not None})
    if args.schedule is not None:
        overrides.setdefault("schedule_args", {})
    return overrides


def check_options(args: argparse.Namespace) -> None:
    """Options given on the command line that this run would ignore are errors: ``--resume`` with
    ``--overwrite``, ``--init`` with ``--pretrained``, and a method's options (``METHOD_OPTIONS``) with another
    ``--method``."""
    from bitalloc.cli.common import flag, given
    from bitalloc.train.methods import METHOD_OPTIONS

    cli = given(args)
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in --out, --overwrite starts it again from scratch: give one")
    if args.init and "pretrained" in cli:
        raise ConfigError("--init and --pretrained / --no-pretrained both choose the starting weights: give one")
    if "config" in cli:
        widths = [flag(d) for d in ("w_bits", "a_bits", "first_last_bits") if d in cli]
        if widths:
            raise ConfigError(f"--config {args.config} gives every layer's widths, so {', '.join(widths)} would be "
                              f"ignored: drop {'it' if len(widths) == 1 else 'them'}, or drop --config")
    own = set(METHOD_OPTIONS.get(args.method, ()))
    stray = [d for d in sorted(cli) if d not in own and any(d in o for o in METHOD_OPTIONS.values())]
    if stray:
        uses = "; ".join(f"{flag(d)}: --method {' / '.join(m for m, o in METHOD_OPTIONS.items() if d in o)}"
                         for d in stray)
        one = len(stray) == 1
        raise ConfigError(f"{', '.join(flag(d) for d in stray)} {'does' if one else 'do'} not apply to --method "
                          f"{args.method} and would be ignored ({uses}); drop {'it' if one else 'them'} or change "
                          "--method")


def run(args: argparse.Namespace) -> int:
    from bitalloc.io import write_json
    from bitalloc.train import distributed as D
    from bitalloc.train.checkpoint import check_output_path
    from bitalloc.train.loop import fit, seed_everything
    from bitalloc.train.presets import default_dataset, get_method, get_preset

    from bitalloc.models.user import is_factory_spec

    check_options(args)
    method = get_method(args.method)
    options = method.options(args)
    preset = get_preset(args.model, args.dataset)
    user_model = is_factory_spec(args.model)
    if args.model_kwargs and not user_model:
        raise ConfigError(f"--model-kwargs applies to a --model factory (MODULE:FUNCTION), not to {args.model}")
    if args.dataset is None:
        if user_model:
            raise ConfigError(f"--model {args.model} is a factory, not a zoo model: give --dataset NAME")
        args.dataset = default_dataset(args.model)
    args.dataset = _canonical_dataset(args.dataset)
    if args.model not in MODEL_HOOKS and not user_model:
        from bitalloc.models import model_info

        args.model = model_info(args.model).name
    out, log, json_path = _default_paths(args)
    args.out = out
    frozen_out = _frozen_out(args, out)
    # Refuse to replace earlier outputs before spending time on loading data (fit checks again, on rank 0).
    if check_output_path(out, resume=bool(args.resume), overwrite=bool(args.overwrite)) == "fresh":
        for path, what, flag in ((log, "log", "--log"), (json_path, "result", "--json"), (frozen_out, "frozen model",
                                                                                          "--frozen")):
            if path is not None and Path(path).exists():
                raise CheckpointError(f"{what} {path} already exists and this is a fresh run; pass --resume to "
                                      f"continue the run it belongs to, --overwrite to replace it, or choose "
                                      f"another {flag} / --out")

    with D.distributed(args.device) as device:
        main = D.is_main_process()
        augment = preset.augment if args.augment is None else bool(args.augment)
        train_set, val_set, num_classes = load_data(args, augment)
        pretrained = preset.pretrained if args.pretrained is None else bool(args.pretrained)
        if args.init:
            pretrained = False
        seed_everything(args.seed)  # the same initial weights on every rank and in every run with this seed
        model, model_kwargs, factory = build_model(args, num_classes, pretrained)
        if args.init:
            from bitalloc.models.user import load_weights

            load_weights(model, args.init)  # a bitalloc checkpoint (checksum verified) or a plain state_dict
            model.train()
        model = method.prepare(model, options)
        objective = method.make_objective(model, options)
        overrides = config_overrides(args, method, options, preset)
        cfg = preset.train_config(
            **overrides, seed=args.seed, workers=args.workers, eval_every=args.eval_every, checkpoint=out,
            resume=bool(args.resume), overwrite=bool(args.overwrite), log=log, device=str(device),
            sync_bn=bool(args.sync_bn), progress=args.progress, model_name=args.model, model_kwargs=model_kwargs,
            model_factory=factory, dataset=args.dataset, method=args.method, method_options=options)
        if main and preset.name != "generic" and args.dataset not in preset.datasets and \
                args.dataset not in DATASET_HOOKS:
            print(f"note: the {preset.name} preset was tuned for {', '.join(preset.datasets)}, not {args.dataset}",
                  file=sys.stderr)
        result = fit(model, train_set, val_set, cfg, objective=objective)
        if main:
            header = {"model": args.model, "dataset": args.dataset, "method": args.method,
                      "world_size": result.world_size, "device": result.device}
            outputs = {"checkpoint": out, "log": log, "result": json_path}
            if frozen_out is not None:
                write_frozen_model(result.model, frozen_out, args, options, factory, model_kwargs)
                outputs["frozen model"] = frozen_out
            write_json(json_path, {"command": "train", **header, "preset": preset.name, "config": cfg.to_dict(),
                                   "result": result.to_dict(), "outputs": outputs})
            print_summary(result, header, outputs)
    return 0
