"""The training loop: :func:`fit` (one loop for FP32 and quantization-aware training) and :func:`evaluate`.

**Objective hooks.** Quantization-aware methods (LSQ, PACT, Bayesian Bits) plug into :func:`fit` through an
*objective* object instead of a parallel loop. Every method is optional (duck typing; :class:`Objective` is
a convenient base class with no-op defaults):

* ``param_groups(model) -> list[dict]``: extra optimizer groups, each ``{"params": [...], "name": str,
  "lr": float (or "lr_scale": a multiple of the configuration's lr), "weight_decay": float, "schedule": name |
  ScheduleSpec | dict, "schedule_args": dict, ...}``
  (other keys such as ``momentum`` or ``betas`` go to the optimizer). Parameters not listed there form the
  group ``"default"``, which uses the configuration's lr, weight decay and schedule. Each group follows its
  own schedule: e.g. Bayesian Bits keeps the weight lr constant for 2/3 of training then decays it linearly
  (``TrainConfig(schedule="constant_then_linear")``) while the gate group uses its own schedule.
* ``extra_loss(model) -> (Tensor, dict[str, float])``: added to the task loss (e.g. ``mu * sum of Bayesian Bits
  regularisers``); the dict is averaged over the epoch's steps and logged.
* ``on_train_start(model, info)``: once before the first epoch of this run (after a resume), with ``info``
  ``{"epochs", "steps_per_epoch", "total_steps", "epoch", "step"}`` (e.g. Bayesian Bits' fixed-gate phase needs
  the number of epochs).
* ``on_step_end(model, step)``: after each optimizer step (e.g. clamp step sizes).
* ``on_epoch_start(model, epoch)``: before each epoch (0-based index).
* ``log_state(model) -> dict``: logged with each epoch (expected bit widths, gate probabilities, kept channels).
* ``state_dict()`` / ``load_state_dict(d)``: saved in / restored from checkpoints.
* ``task_loss(model, x, y) -> (Tensor, dict[str, float])``: replaces the classification task (cross-entropy
  of ``model(x)`` against ``y``, accuracy) for models trained on another objective, e.g. the video codec's
  rate-distortion loss. It calls ``model`` (the DDP wrapper under torchrun) itself and returns the *sum* of the
  task losses of the batch and per-batch metrics (averaged over the epoch's steps and logged, like
  ``extra_loss``'s); accuracy is then not computed.

The ``model`` passed to hooks is always the bare module (never the DDP wrapper).

**Distributed equivalence.** Under torchrun each rank processes its contiguous chunk of each *global* batch
(see :class:`bitalloc.train.distributed.GlobalBatchSampler`); rank r's loss is
``world_size * sum(task losses of its chunk) / global_batch_size + extra_loss``, so DDP's gradient average
equals the gradient of ``mean(task losses of the global batch) + extra_loss``: the single-process gradient.
Loss/accuracy/count metrics are summed across ranks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bitalloc.errors import BitallocError, CheckpointError, ConfigError
from bitalloc.io import to_jsonable, write_text
from bitalloc.train import checkpoint as ckpt
from bitalloc.train import distributed as D
from bitalloc.train.progress import Progress, message
from bitalloc.train.schedules import ScheduleSpec, as_spec

OPTIMIZERS = ("sgd", "adam", "adamw")


class DivergenceError(BitallocError, FloatingPointError):
    """The training loss became NaN or infinite."""


# ---- configuration ---------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Everything that defines a training run (plain data: stored in checkpoints and JSON logs).

    epochs / steps: length of training; ``steps`` (optimizer steps), when given, wins over ``epochs``.
    batch_size: the *global* batch size (split across ranks under torchrun).
    optimizer: "sgd" (``momentum``, ``nesterov``), "adam" (L2 ``weight_decay``) or "adamw" (decoupled decay).
    schedule / schedule_args: the default group's lr schedule (see :mod:`bitalloc.train.schedules`);
        ``warmup_steps`` or ``warmup_epochs`` add a linear warm-up to it.
    group_overrides: per-group settings by group name (``{"gates": {"lr": 1e-2, "schedule": "constant"}}``),
        applied over what the objective hook asked for.
    eval_every: evaluate every N epochs (and always after the last one).
    checkpoint / checkpoint_every / resume / overwrite: output checkpoint, saved every N epochs and at the end;
        ``resume`` True (the file must exist), "auto" (resume if it exists) or False (a fresh run refuses to
        replace an existing file unless ``overwrite``).
    log: JSON-lines log (one ``start`` record, one record per epoch, one ``end`` record), rewritten atomically.
    max_grad_norm: clip the global gradient norm; label_smoothing: cross-entropy label smoothing.
    device: "auto" (cuda:LOCAL_RANK if available, else cpu), "cpu", "cuda", "cuda:1".
    sync_bn: synchronise BatchNorm statistics across ranks (see :mod:`bitalloc.train.distributed`).
    progress: "auto", "bar", "log" or "off" (see :mod:`bitalloc.train.progress`).
    model_name / model_kwargs / model_factory: how to rebuild the model from the checkpoint
        (``bitalloc.models.create(model_name, **model_kwargs)`` or an importable ``"module:function"``).
    dataset / method / method_options: recorded for reports; ``load_model_checkpoint`` re-applies the method's
        ``prepare`` with ``method_options`` (see :mod:`bitalloc.train.presets`).
    """

    epochs: int = 10
    steps: int | None = None
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    schedule: str = "cosine"
    schedule_args: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    group_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0
    workers: int = 0
    shuffle: bool = True
    drop_last: bool = False
    eval_every: int = 1
    eval_batch_size: int | None = None
    checkpoint: str | None = None
    checkpoint_every: int = 1
    resume: bool | str = False
    overwrite: bool = False
    log: str | None = None
    max_grad_norm: float | None = None
    label_smoothing: float = 0.0
    device: str = "auto"
    sync_bn: bool = False
    find_unused_parameters: bool = False
    progress: str | None = None
    model_name: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    model_factory: str | None = None
    dataset: str | None = None
    method: str = "fp32"
    method_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        if self.steps is None and self.epochs < 1:
            raise ConfigError(f"epochs={self.epochs} must be at least 1")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps={self.steps} must be at least 1")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r} is not one of {OPTIMIZERS}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"lr={self.lr} must be a positive number")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay} must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must lie in [0, 1)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm={self.max_grad_norm} must be positive (or None)")
        if self.eval_every < 1 or self.checkpoint_every < 1:
            raise ConfigError("eval_every and checkpoint_every must be at least 1")
        if self.workers < 0:
            raise ConfigError(f"workers={self.workers} must be >= 0")
        if self.resume not in (True, False, "auto"):
            raise ConfigError(f"resume={self.resume!r} must be True, False or 'auto'")
        if self.optimizer == "sgd" and self.nesterov and self.momentum <= 0:
            raise ConfigError("nesterov momentum needs momentum > 0")
        if self.steps is not None and self.warmup_steps >= self.steps and self.schedule != "constant":
            # the warm-up ends at f(W, T) of the schedule: at W >= T a decaying schedule is 0, so the lr never rises
            raise ConfigError(f"warmup_steps={self.warmup_steps} is not below steps={self.steps}: with the "
                              f"{self.schedule} schedule the learning rate would stay near 0; pass fewer warm-up "
                              "steps (--warmup-steps) or more steps")
        self.schedule_spec(1)  # validates name and arguments
        return self

    def schedule_spec(self, steps_per_epoch: int) -> ScheduleSpec:
        """The default group's schedule, with the warm-up converted to steps."""
        warm = int(self.warmup_steps) or int(round(self.warmup_epochs * steps_per_epoch))
        return ScheduleSpec(self.schedule, dict(self.schedule_args), warmup_steps=warm)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown training settings {sorted(unknown)}; valid: {sorted(names)}")
        d = dict(d)
        if "betas" in d and d["betas"] is not None:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


# Settings that change the sample order or the optimizer's meaning: a resumed run must keep them.
_RESUME_MUST_MATCH = ("batch_size", "seed", "optimizer", "shuffle", "drop_last")
_RESUME_SHOULD_MATCH = ("lr", "schedule", "schedule_args", "weight_decay", "momentum", "nesterov", "epochs", "steps",
                        "label_smoothing", "max_grad_norm")


# ---- hooks -------------------------------------------------------------------------------------------------

@runtime_checkable
class ObjectiveLike(Protocol):
    """Structural type of an objective hook (every method is optional at run time)."""

    def extra_loss(self, model: nn.Module) -> tuple[torch.Tensor, dict[str, float]]: ...


class Objective:
    """Base class for objective hooks with no-op defaults; subclass and override what you need."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return []

    def extra_loss(self, model: nn.Module) -> tuple[torch.Tensor | float, dict[str, float]]:
        return 0.0, {}

    def on_step_end(self, model: nn.Module, step: int) -> None:
        return None

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        return None

    def on_train_start(self, model: nn.Module, info: Mapping[str, Any]) -> None:
        return None

    def log_state(self, model: nn.Module) -> dict[str, Any]:
        return {}

    # task_loss(model, x, y) is looked up by name (see the module docstring); the base class has none, so the
    # classification task is the default.


class Callback:
    """Base class for callbacks (all optional): ``on_train_start(info)``, ``on_step_end(step, logs)``,
    ``on_epoch_end(epoch, record, model) -> bool`` (True stops training after this epoch, with a checkpoint),
    ``on_train_end(result)``."""

    def on_train_start(self, info: dict[str, Any]) -> None: ...

    def on_step_end(self, step: int, logs: dict[str, float]) -> None: ...

    def on_epoch_end(self, epoch: int, record: dict[str, Any], model: nn.Module) -> bool | None: ...

    def on_train_end(self, result: "TrainResult") -> None: ...


class StopAfter(Callback):
    """Stop training after ``epochs`` epochs of this run (simulates an interruption; used in tests)."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self._seen = 0

    def on_epoch_end(self, epoch: int, record: dict[str, Any], model: nn.Module) -> bool:
        self._seen += 1
        return self._seen >= self.epochs


def _hook(obj: Any, name: str):
    fn = getattr(obj, name, None) if obj is not None else None
    return fn if callable(fn) else None


# ---- results -----------------------------------------------------------------------------------------------

@dataclass
class EvalResult:
    """Top-1 accuracy (a fraction in [0, 1]) and mean loss over ``count`` samples; with
    ``evaluate(..., per_sample=True)`` also ``per_sample``, a bool tensor (one entry per sample, in data order)
    telling which samples were classified correctly (for paired comparisons of two models on one test set)."""

    accuracy: float
    loss: float
    count: int
    correct: int
    per_sample: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "per_sample"}


@dataclass
class TrainResult:
    """What :func:`fit` returns. Accuracies are fractions in [0, 1]; ``history`` holds one record per epoch."""

    final_accuracy: float | None
    final_loss: float | None
    best_accuracy: float | None
    best_epoch: int | None
    train_loss: float | None
    train_accuracy: float | None
    history: list[dict[str, Any]]
    epochs: int
    steps: int
    time_per_step: float | None
    train_time: float
    eval_time: float
    samples_per_s: float | None
    world_size: int
    device: str
    checkpoint: str | None = None
    log: str | None = None
    resumed_from_epoch: int | None = None
    stopped_early: bool = False
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        return to_jsonable(d)


# ---- evaluation ----------------------------------------------------------------------------------------------

def _first_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    raise ConfigError(f"the model returned {type(out).__name__}; fit/evaluate need logits (a tensor, or a tuple "
                      f"whose first element is the logits)")


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, *, batch_size: int = 256, device: str | torch.device | None = None,
             workers: int = 0, loss_fn: Any = None, progress: str | bool | None = None, desc: str = "eval",
             distributed: bool | None = None, max_batches: int | None = None,
             per_sample: bool = False) -> EvalResult:
    """Top-1 accuracy and mean cross-entropy of ``model`` on a Dataset or an iterable of ``(inputs, labels)``.

    ``data`` as a map-style Dataset: in a distributed run each rank evaluates a contiguous share and the
    counts are summed across ranks (every rank must call ``evaluate``); in a single process, all of it.
    ``data`` as a DataLoader/iterable: iterated as given; sums are reduced across ranks only with
    ``distributed=True``. ``loss_fn(logits, labels)`` must return the *sum* over the batch (default:
    ``F.cross_entropy(..., reduction="sum")``). The model's train/eval mode is restored afterwards.
    ``per_sample=True`` also returns which samples were right (gathered across ranks in rank order, which is
    data order for a sharded Dataset).
    """
    model = D.unwrap(model)
    dev = torch.device(device) if device is not None else _model_device(model)
    is_dataset = isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__") and \
        not isinstance(data, torch.utils.data.IterableDataset)
    reduce = D.is_distributed() if (distributed is None and is_dataset) else bool(distributed) and D.is_distributed()
    if is_dataset:
        lo, hi = D.shard_bounds(len(data)) if reduce else (0, len(data))
        fast = D.batched_base(data)
        loader: Iterable
        if fast:  # vectorised batches: one get_batch call per batch
            keys = [(0, torch.arange(a, min(a + batch_size, hi)), 0, min(batch_size, hi - a))
                    for a in range(lo, hi, batch_size)]
            loader = torch.utils.data.DataLoader(D.BatchedView(*fast), batch_size=None, sampler=keys,
                                                 num_workers=workers, pin_memory=dev.type == "cuda")
        else:
            subset = data if (lo, hi) == (0, len(data)) else torch.utils.data.Subset(data, range(lo, hi))
            loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False,
                                                 num_workers=workers, pin_memory=dev.type == "cuda")
        total = len(loader)  # type: ignore[arg-type]
    else:
        loader = data
        total = len(data) if hasattr(data, "__len__") else None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits, y, reduction="sum"))
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=dev)
    hits: list[torch.Tensor] = []
    try:
        with Progress(total, desc, mode=progress, leave=False) as bar:
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = batch[0], batch[1]
                x = x.to(dev, non_blocking=True)
                y = y.to(dev, non_blocking=True)
                logits = _first_output(model(x))
                sums[0] += loss_fn(logits, y).double()
                right = logits.argmax(1) == y
                sums[1] += right.sum()
                if per_sample:
                    hits.append(right.cpu())
                sums[2] += y.shape[0]
                bar.update(1)
    finally:
        model.train(was_training)
    if reduce:
        D.all_reduce_tensors(sums)
    loss_sum, correct, count = sums.tolist()
    mask = None
    if per_sample:
        mask = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)
        if reduce:
            mask = torch.cat(D.all_gather_object(mask))
    if count == 0:
        return EvalResult(accuracy=float("nan"), loss=float("nan"), count=0, correct=0, per_sample=mask)
    return EvalResult(accuracy=correct / count, loss=loss_sum / count, count=int(count), correct=int(correct),
                      per_sample=mask)


# ---- optimizer -----------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's global generator and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
    random.seed(seed)


def build_param_groups(model: nn.Module, cfg: TrainConfig, objective: Any = None, *,
                       steps_per_epoch: int = 1) -> tuple[list[dict[str, Any]], list[ScheduleSpec]]:
    """Optimizer parameter groups and one schedule per group.

    The first group, ``"default"``, holds every trainable parameter the objective did not claim, with the
    configuration's lr / weight decay / schedule; then the objective's groups in order. Each group dict
    gets ``name`` and ``base_lr`` (the lr before the schedule multiplier). ``cfg.group_overrides`` patches
    groups by name.
    """
    default_spec = cfg.schedule_spec(steps_per_epoch)
    fn = _hook(objective, "param_groups")
    requested = list(fn(model)) if fn else []
    claimed: set[int] = set()
    extra_groups: list[dict[str, Any]] = []
    specs: list[ScheduleSpec] = []
    names_seen = {"default"}
    for i, g in enumerate(requested):
        if "params" not in g:
            raise ConfigError(f"objective parameter group {i} has no 'params'")
        g = dict(g)
        params = [p for p in g.pop("params") if p.requires_grad]
        for p in params:
            if id(p) in claimed:
                raise ConfigError(f"a parameter appears in two objective parameter groups (group {i}); "
                                  f"each parameter may belong to one group only")
            claimed.add(id(p))
        name = str(g.pop("name", f"group{i}"))
        if name in names_seen:
            raise ConfigError(f"two parameter groups are named {name!r}; give each a unique name")
        names_seen.add(name)
        g.update(cfg.group_overrides.get(name, {}))
        spec = as_spec(g.pop("schedule", None), args=g.pop("schedule_args", None), default=default_spec)
        scale = float(g.pop("lr_scale", 1.0))  # a multiple of the configuration's lr (follows --lr)
        lr = float(g.pop("lr", cfg.lr * scale))
        group = {"params": params, "name": name, "lr": lr, "base_lr": lr,
                 "weight_decay": float(g.pop("weight_decay", cfg.weight_decay)), **g}
        extra_groups.append(group)
        specs.append(spec)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in claimed]
    over = dict(cfg.group_overrides.get("default", {}))
    unknown_names = set(cfg.group_overrides) - names_seen
    if unknown_names:
        raise ConfigError(f"group_overrides name unknown parameter groups {sorted(unknown_names)}; "
                          f"groups are {sorted(names_seen)}")
    dspec = as_spec(over.pop("schedule", None), args=over.pop("schedule_args", None), default=default_spec)
    dlr = float(over.pop("lr", cfg.lr))
    default = {"params": rest, "name": "default", "lr": dlr, "base_lr": dlr,
               "weight_decay": float(over.pop("weight_decay", cfg.weight_decay)), **over}
    groups = [default] + extra_groups
    specs = [dspec] + specs
    if not any(g["params"] for g in groups):
        raise ConfigError("the model has no trainable parameters; nothing to train")
    return groups, specs


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over ``groups`` (empty groups are kept, so indices are stable)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


# ---- the loop --------------------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), so evaluation agrees across ranks."""
    if not D.is_distributed():
        return
    import torch.distributed as dist

    for b in model.buffers():
        if D._comm_device().type == b.device.type:
            dist.broadcast(b, src=0)
        else:
            tmp = b.detach().to(D._comm_device())
            dist.broadcast(tmp, src=0)
            b.copy_(tmp.to(b.device))


def fit(model: nn.Module, train_set: torch.utils.data.Dataset, val_set: torch.utils.data.Dataset | None = None,
        cfg: TrainConfig | None = None, *, objective: Any = None, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Train ``model`` on ``train_set`` (map-style Dataset of ``(input, label)``), evaluating on ``val_set``.

    Works unchanged under ``torchrun --nproc_per_node N``: if no process group exists, one is initialised
    from the environment and kept for later calls (re-initialising a group in the same process is unreliable
    with torchrun's store); it is destroyed when the interpreter exits. Wrap the work in
    :func:`bitalloc.train.distributed.distributed` to control the group's lifetime explicitly. ``objective`` plugs in
    quantization-aware training (see the module docstring); ``callbacks`` observe or stop training. The
    model is trained in place and also returned as ``result.model``. A fresh run seeds torch / numpy /
    random with ``cfg.seed`` (plus the rank); a resumed run restores the RNG states from the checkpoint.
    """
    cfg = (cfg or TrainConfig()).validate()
    device = D.init_distributed(cfg.device, destroy_at_exit=True)
    return _Trainer(model, train_set, val_set, cfg, objective, list(callbacks), device).run()


class _Trainer:
    def __init__(self, model: nn.Module, train_set: Any, val_set: Any, cfg: TrainConfig, objective: Any,
                 callbacks: list[Any], device: torch.device):
        self.model, self.train_set, self.val_set, self.cfg = model, train_set, val_set, cfg
        self.objective, self.callbacks, self.device = objective, callbacks, device
        self.rank, self.world = D.rank(), D.world_size()
        self.main = self.rank == 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"accuracy": None, "epoch": None}
        self.epoch = 0
        self.step = 0
        self.resumed_from: int | None = None

    # -- helpers ------------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if self.main:
            message(text, mode=self.cfg.progress)

    def _write_log(self, end: dict[str, Any] | None = None) -> None:
        if not self.cfg.log or not self.main:
            return
        lines = [self.start_record] + [{"event": "epoch", **r} for r in self.history]
        if end is not None:
            lines.append({"event": "end", **end})
        write_text(self.cfg.log, "".join(json.dumps(to_jsonable(x)) + "\n" for x in lines))

    def _save(self, complete: bool) -> None:
        if not self.cfg.checkpoint:
            return
        rng = D.all_gather_object(ckpt.capture_rng_state())  # collective: every rank calls it
        if not self.main:
            return
        obj_state = _hook(self.objective, "state_dict")
        state = {
            "model": ckpt.model_spec(self.inner, self.cfg.model_name, self.cfg.model_kwargs, self.cfg.model_factory),
            "model_state": {k: v.detach().cpu() for k, v in self.inner.state_dict().items()},
            "optimizer_state": self.optimizer.state_dict(),
            "param_groups": [{"name": g["name"], "base_lr": g["base_lr"], "weight_decay": g["weight_decay"],
                              "schedule": s.to_dict(), "size": len(g["params"])}
                             for g, s in zip(self.optimizer.param_groups, self.specs)],
            "objective_state": obj_state() if obj_state else None,
            "epoch": self.epoch, "step": self.step, "total_steps": self.total_steps, "complete": complete,
            "rng": rng, "config": self.cfg.to_dict(), "history": to_jsonable(self.history),
            "best": dict(self.best), "world_size": self.world, "method": self.cfg.method,
            "method_options": to_jsonable(self.cfg.method_options),
            "dataset": self.cfg.dataset,
        }
        ckpt.save_checkpoint(self.cfg.checkpoint, state)

    def _resume(self, path: str) -> None:
        state = ckpt.load_checkpoint(path, map_location=self.device)
        spec = state.get("model") or {}
        if self.cfg.model_name and spec.get("name") and spec["name"] != self.cfg.model_name:
            raise CheckpointError(f"checkpoint {path} is for model {spec['name']!r}, not {self.cfg.model_name!r}; "
                                  f"resume with --model {spec['name']}, or choose another --out")
        old_cfg = state.get("config") or {}
        for key in _RESUME_MUST_MATCH:
            if key in old_cfg and old_cfg[key] != to_jsonable(getattr(self.cfg, key)):
                raise CheckpointError(f"checkpoint {path} was trained with {key}={old_cfg[key]!r} but this run has "
                                      f"{key}={getattr(self.cfg, key)!r}; resume with the same value, or pass "
                                      f"--overwrite to start a new run")
        changed = [k for k in _RESUME_SHOULD_MATCH
                   if k in old_cfg and old_cfg[k] != to_jsonable(getattr(self.cfg, k))]
        if changed:
            self.say(f"note: resuming {path} with changed settings {changed}: the continuation differs from an "
                     f"uninterrupted run")
        ckpt.load_state_into(self.inner, state["model_state"], path=path)
        saved_groups = [g.get("name") for g in state.get("param_groups") or []]
        names = [g["name"] for g in self.optimizer.param_groups]
        if saved_groups and saved_groups != names:
            raise CheckpointError(f"checkpoint {path} has optimizer groups {saved_groups} but this run has {names} "
                                  f"(a different --method or objective); resume with the same method, or --overwrite")
        try:
            self.optimizer.load_state_dict(state["optimizer_state"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {path}: the optimizer state does not fit ({exc}); was it written with "
                                  f"another --optimizer or method? Resume with the same settings, or --overwrite") from None
        for g, base in zip(self.optimizer.param_groups, self._fresh_base_lrs):
            g["base_lr"] = base  # a changed --lr on resume takes effect; schedules are recomputed from the step
        load = _hook(self.objective, "load_state_dict")
        if load and state.get("objective_state") is not None:
            load(state["objective_state"])
        rngs = state.get("rng") or []
        if isinstance(rngs, dict):
            rngs = [rngs]
        if rngs:
            if len(rngs) != self.world:
                self.say(f"note: {path} was written by {len(rngs)} process(es), this run has {self.world}: "
                         f"data order is unchanged; model-side randomness (dropout) is reseeded")
            ckpt.restore_rng_state(rngs[min(self.rank, len(rngs) - 1)])
        self.epoch = int(state.get("epoch", 0))
        self.step = int(state.get("step", 0))
        self.history = list(state.get("history") or [])
        self.best = dict(state.get("best") or self.best)
        self.resumed_from = self.epoch

    # -- main ---------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg

        def decide() -> str:  # on rank 0 only; every rank gets the same answer (or the same error)
            m = ckpt.check_output_path(cfg.checkpoint, resume=cfg.resume, overwrite=cfg.overwrite)
            if m == "fresh" and cfg.log and Path(cfg.log).exists() and not cfg.overwrite:
                raise CheckpointError(f"log {cfg.log} already exists and this is a fresh run; pass --overwrite to "
                                      f"replace it, --resume to continue the run it belongs to, or choose another "
                                      f"--log")
            return m

        mode = D.on_main_then_share(decide)
        if mode != "resume":
            seed_everything(D._mix(cfg.seed, self.rank) if self.rank else cfg.seed)

        model = self.model.to(self.device)
        if cfg.sync_bn and D.is_distributed():
            model = D.convert_sync_batchnorm(model, self.device)
        self.inner = model

        fast = D.batched_base(self.train_set)
        self.sampler = D.GlobalBatchSampler(len(self.train_set), cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle,
                                            drop_last=cfg.drop_last, mode="batches" if fast else "items")
        self.sizes = self.sampler.global_sizes()
        spe = len(self.sizes)
        if spe == 0:
            raise ConfigError(f"the training set has {len(self.train_set)} samples, fewer than one batch of "
                              f"{cfg.batch_size} with drop_last; lower --batch-size")
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * spe
        n_epochs = math.ceil(self.total_steps / spe)

        groups, self.specs = build_param_groups(model, cfg, self.objective, steps_per_epoch=spe)
        self._fresh_base_lrs = [g["base_lr"] for g in groups]
        self.optimizer = build_optimizer(groups, cfg)
        self.schedule_fns = [s.build(self.total_steps) for s in self.specs]
        if mode == "resume":
            self._resume(str(cfg.checkpoint))
        ddp = D.wrap_ddp(model, self.device, find_unused_parameters=cfg.find_unused_parameters)

        common = dict(num_workers=cfg.workers, pin_memory=self.device.type == "cuda",
                      persistent_workers=cfg.workers > 0, generator=torch.Generator())
        if fast:  # vectorised batches (in-memory datasets): one get_batch call per step
            loader = torch.utils.data.DataLoader(D.BatchedView(*fast), batch_size=None, sampler=self.sampler,
                                                 **common)
        else:
            loader = torch.utils.data.DataLoader(D.SeededItems(self.train_set), batch_sampler=self.sampler, **common)
        self.start_record = {
            "event": "start", "time": _now(), "config": cfg.to_dict(), "world_size": self.world,
            "device": str(self.device), "train_samples": len(self.train_set),
            "val_samples": len(self.val_set) if self.val_set is not None else 0, "steps_per_epoch": spe,
            "total_steps": self.total_steps, "resumed_from_epoch": self.resumed_from,
            "param_groups": [{"name": g["name"], "params": sum(p.numel() for p in g["params"]),
                              "lr": g["base_lr"], "weight_decay": g["weight_decay"], "schedule": s.to_dict()}
                             for g, s in zip(self.optimizer.param_groups, self.specs)],
        }
        if (fn := _hook(self.objective, "on_train_start")):
            fn(model, {"epochs": n_epochs, "steps_per_epoch": spe, "total_steps": self.total_steps,
                       "epoch": self.epoch, "step": self.step})
        for cb in self.callbacks:
            if (fn := _hook(cb, "on_train_start")):
                fn(dict(self.start_record))
        if self.resumed_from is not None:
            self.say(f"resuming {cfg.checkpoint} after epoch {self.epoch} (step {self.step}/{self.total_steps})")
        from bitalloc.model.layers import parameter_overhead

        over = parameter_overhead(model)
        extra = ", ".join(f"{v:,} {k}" for k, v in over["quantizers"].items())
        params = f"{over['model']:,} parameters" + (f" + {over['quantizers_total']:,} quantizer parameters ({extra})"
                                                     if extra else "")
        self.say(f"training {cfg.model_name or type(model).__name__} ({params}) on "
                 f"{len(self.train_set):,} samples: {n_epochs} epochs x {spe} steps, global batch {cfg.batch_size}, "
                 f"{self.world} process(es) on {self.device}")

        train_time = eval_time = 0.0
        steps_this_run = 0
        samples_this_run = 0
        stopped = False
        criterion_ls = cfg.label_smoothing
        extra_fn = _hook(self.objective, "extra_loss")
        task_fn = _hook(self.objective, "task_loss")
        step_fn = _hook(self.objective, "on_step_end")
        epoch_fn = _hook(self.objective, "on_epoch_start")
        log_fn = _hook(self.objective, "log_state")
        step_cbs = [f for cb in self.callbacks if (f := _hook(cb, "on_step_end"))]
        params = [p for g in self.optimizer.param_groups for p in g["params"]]

        last_eval: EvalResult | None = None
        while self.epoch < n_epochs and self.step < self.total_steps and not stopped:
            epoch = self.epoch
            self.sampler.set_epoch(epoch)
            loader.generator.manual_seed(D._mix(cfg.seed, epoch, 7))  # type: ignore[union-attr]
            if epoch_fn:
                epoch_fn(model, epoch)
            ddp.train()
            sums = torch.zeros(3, dtype=torch.float64, device=self.device)
            extra_sums: dict[str, float] = {}
            n_steps = 0
            remaining = min(spe, self.total_steps - self.step)
            t0 = time.perf_counter()
            with Progress(remaining, f"epoch {epoch + 1}/{n_epochs}", mode=cfg.progress) as bar:
                for i, (x, y) in enumerate(loader):
                    if self.step >= self.total_steps:
                        break
                    bg = self.sizes[i]
                    for g, fn in zip(self.optimizer.param_groups, self.schedule_fns):
                        g["lr"] = g["base_lr"] * fn(self.step)
                    x = x.to(self.device, non_blocking=True)
                    y = y.to(self.device, non_blocking=True)
                    logs: dict[str, float] = {}
                    if task_fn:
                        task_sum, task_logs = task_fn(ddp, x, y)
                        logs.update(task_logs)
                        logits = None
                    else:
                        logits = _first_output(ddp(x))
                        task_sum = F.cross_entropy(logits, y, reduction="sum", label_smoothing=criterion_ls)
                    loss = task_sum * (self.world / bg)
                    if extra_fn:
                        extra, extra_logs = extra_fn(model)
                        logs.update(extra_logs or {})
                        if isinstance(extra, torch.Tensor):
                            loss = loss + extra
                            logs.setdefault("extra_loss", float(extra.detach()))
                        elif extra:
                            logs.setdefault("extra_loss", float(extra))
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    self.optimizer.step()
                    self.step += 1
                    n_steps += 1
                    if step_fn:
                        step_fn(model, self.step)
                    with torch.no_grad():
                        sums[0] += task_sum.detach().double()
                        if logits is not None:
                            sums[1] += (logits.detach().argmax(1) == y).sum()
                        sums[2] += y.shape[0]
                    for k, v in logs.items():
                        extra_sums[k] = extra_sums.get(k, 0.0) + float(v)
                    for f in step_cbs:
                        f(self.step, {"loss": float(task_sum.detach()) / max(1, y.shape[0]), **logs})
                    if bar.mode != "off":
                        if n_steps % 10 == 1 or n_steps == remaining:  # float() syncs: not every step
                            shown = ({k: v / n_steps for k, v in extra_sums.items()} if task_fn
                                     else {"acc": float(sums[1] / sums[2])})
                            bar.set(loss=float(sums[0] / sums[2]), **shown, lr=self.optimizer.param_groups[0]["lr"])
                        bar.update(1)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            epoch_time = time.perf_counter() - t0
            train_time += epoch_time
            steps_this_run += n_steps
            D.all_reduce_tensors(sums)
            loss_sum, correct, count = sums.tolist()
            samples_this_run += int(count)
            self.epoch += 1
            record: dict[str, Any] = {
                "epoch": self.epoch, "step": self.step,
                "lr": {g["name"]: g["lr"] for g in self.optimizer.param_groups},
                "train_loss": loss_sum / count if count else float("nan"),
                "train_accuracy": (correct / count if count else float("nan")) if not task_fn else None,
                "train_samples": int(count),
                "time": epoch_time, "time_per_step": epoch_time / max(1, n_steps),
            }
            if extra_sums:
                record["extra"] = {k: v / max(1, n_steps) for k, v in extra_sums.items()}
            if not math.isfinite(record["train_loss"]):
                raise DivergenceError(f"training diverged in epoch {self.epoch} (loss {record['train_loss']}); "
                                      f"lower --lr, set max_grad_norm, or check the data")
            last_epoch = self.epoch >= n_epochs or self.step >= self.total_steps
            want_stop = False
            if self.val_set is not None and (self.epoch % cfg.eval_every == 0 or last_epoch):
                _broadcast_buffers(model)
                te = time.perf_counter()
                last_eval = evaluate(model, self.val_set, batch_size=cfg.eval_batch_size or max(cfg.batch_size, 256),
                                     device=self.device, workers=cfg.workers, progress=cfg.progress,
                                     desc=f"eval {self.epoch}")
                eval_time += time.perf_counter() - te
                record.update(val_loss=last_eval.loss, val_accuracy=last_eval.accuracy)
                if self.best["accuracy"] is None or last_eval.accuracy > self.best["accuracy"]:
                    self.best = {"accuracy": last_eval.accuracy, "epoch": self.epoch}
            if log_fn:
                with torch.no_grad():
                    record["state"] = to_jsonable(log_fn(model))
            record["time_utc"] = _now()
            self.history.append(to_jsonable(record))
            for cb in self.callbacks:
                if (fn := _hook(cb, "on_epoch_end")) and fn(self.epoch, record, model):
                    want_stop = True
            stopped = want_stop and not last_epoch
            self.say(_epoch_line(record, n_epochs))
            if self.epoch % cfg.checkpoint_every == 0 or last_epoch or stopped:
                _broadcast_buffers(model)
                self._save(complete=last_epoch)
            self._write_log()
            D.barrier()  # the files exist for every rank before anyone goes on (e.g. to resume from them)

        if D.is_distributed():
            if cfg.sync_bn:
                D.revert_sync_batchnorm(model)
            import gc

            del ddp, loader  # DDP objects hold reference cycles: free them now, while the process group lives
            gc.collect()
        last = self.history[-1] if self.history else {}
        result = TrainResult(
            final_accuracy=last.get("val_accuracy"), final_loss=last.get("val_loss"),
            best_accuracy=self.best.get("accuracy"), best_epoch=self.best.get("epoch"),
            train_loss=last.get("train_loss"), train_accuracy=last.get("train_accuracy"),
            history=list(self.history), epochs=self.epoch, steps=self.step,
            time_per_step=train_time / steps_this_run if steps_this_run else None,
            train_time=train_time, eval_time=eval_time,
            samples_per_s=samples_this_run / train_time if train_time > 0 else None,
            world_size=self.world, device=str(self.device), checkpoint=cfg.checkpoint, log=cfg.log,
            resumed_from_epoch=self.resumed_from, stopped_early=stopped, model=model)
        self._write_log(end={"time": _now(), **{k: v for k, v in result.to_dict().items() if k != "history"}})
        D.barrier()
        for cb in self.callbacks:
            if (fn := _hook(cb, "on_train_end")):
                fn(result)
        if stopped:
            self.say(f"stopped after epoch {self.epoch} by a callback; continue with --resume")
        summary = [f"done: {self.epoch} epochs, {self.step} steps"]
        if result.best_accuracy is not None:
            summary.append(f"val acc {100 * (result.final_accuracy or 0):.2f}% (best "
                           f"{100 * result.best_accuracy:.2f}% after epoch {result.best_epoch})")
        if result.time_per_step:
            summary.append(f"{train_time:.1f}s training, {1000 * result.time_per_step:.1f} ms/step")
        if cfg.checkpoint:
            summary.append(f"checkpoint {cfg.checkpoint}")
        self.say(" | ".join(summary))
        return result


def _epoch_line(r: Mapping[str, Any], n_epochs: int) -> str:
    parts = [f"epoch {r['epoch']}/{n_epochs}", f"train loss {r['train_loss']:.4f}"]
    if r.get("train_accuracy") is not None:
        parts.append(f"acc {100 * r['train_accuracy']:.2f}%")
    else:
        parts += [f"{k} {v:.4g}" for k, v in (r.get("extra") or {}).items()]
    if "val_accuracy" in r:
        parts.append(f"val loss {r['val_loss']:.4f} acc {100 * r['val_accuracy']:.2f}%")
    parts.append(f"{r['time']:.1f}s ({1000 * r['time_per_step']:.1f} ms/step)")
    return " | ".join(parts)


__all__ = [
    "TrainConfig", "TrainResult", "EvalResult", "Objective", "ObjectiveLike", "Callback", "StopAfter",
    "DivergenceError", "fit", "evaluate", "build_param_groups", "build_optimizer", "seed_everything", "OPTIMIZERS",
]
