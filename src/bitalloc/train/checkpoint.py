"""Training checkpoints: resumable, atomic, loadable with ``weights_only=True``, and self-describing.

A checkpoint is one ``torch.save`` file (written atomically with :func:`bitalloc.io.torch_save`) holding a
dict with:

* ``format`` / ``version``: ``"bitalloc.train.checkpoint"`` / 1;
* ``model``: ``{"name", "kwargs", "factory", "class"}``: enough for :func:`load_model_checkpoint` to rebuild
  the network (``bitalloc.models.create(name, **kwargs)``, or an importable ``"module:function"`` factory);
* ``model_state``: the (unwrapped) model's ``state_dict``;
* ``optimizer_state``, ``param_groups`` (name, base lr, weight decay, schedule spec of each group),
  ``objective_state`` (the objective hook's ``state_dict()``, if it has one);
* ``epoch`` (completed epochs), ``step`` (optimizer steps taken), ``total_steps``, ``complete``;
* ``rng``: the torch / CUDA / numpy / Python RNG states of every rank (a list indexed by rank);
* ``config`` (the :class:`~bitalloc.train.loop.TrainConfig` as a dict), ``history``, ``best``, ``world_size``,
  ``torch_version``.

Everything is plain data (tensors, numbers, strings, lists, dicts), so :func:`load_checkpoint` uses
``torch.load(weights_only=True)``: opening a checkpoint never runs code from the file. The file carries a
SHA-256 checksum (:func:`bitalloc.io.torch_save`), verified before anything is unpickled: a checkpoint changed by
even one bit, truncated, or without a checksum (plain ``torch.save`` files, files of a bitalloc without
checksums: :func:`bitalloc.io.add_checksum` adopts those) is a :class:`CheckpointError`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from bitalloc.errors import CheckpointError
from bitalloc.io import torch_load, torch_save

FORMAT = "bitalloc.train.checkpoint"
VERSION = 1


# ---- RNG state -------------------------------------------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and every CUDA device), numpy's global generator and Python's ``random``."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": [int(v) for v in np_state["state"]["key"]],
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": _tuples_to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _tuples_to_lists(obj: Any) -> Any:
    if isinstance(obj, (tuple, list)):
        return [_tuples_to_lists(v) for v in obj]
    return obj


def _lists_to_tuples(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_lists_to_tuples(v) for v in obj)
    return obj


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states are restored only when the device count matches)."""
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state({"bit_generator": s["bit_generator"],
                             "state": {"key": np.asarray(s["key"], dtype=np.uint32), "pos": int(s["pos"])},
                             "has_gauss": int(s["has_gauss"]), "gauss": float(s["gauss"])})
    if "python" in state:
        random.setstate(_lists_to_tuples(state["python"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.as_tensor(c, dtype=torch.uint8).cpu() for c in cuda])


# ---- files -----------------------------------------------------------------------------------------------

def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any], *, overwrite: bool = True) -> Path:
    """Write a checkpoint dict atomically (a crash mid-write leaves the previous file intact)."""
    state = dict(state)
    state.setdefault("format", FORMAT)
    state.setdefault("version", VERSION)
    state.setdefault("torch_version", str(torch.__version__))
    try:
        return torch_save(state, path, overwrite=overwrite)
    except FileExistsError as exc:
        raise CheckpointError(str(exc)) from None


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises :class:`CheckpointError` naming the file and the fix when it is missing, unreadable, truncated,
    corrupt (SHA-256 mismatch), without a checksum, or not a bitalloc training checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist; check the path, or train first "
                              f"(bitalloc train ... --out {p})")
    if p.is_dir():
        raise CheckpointError(f"checkpoint {p} is a directory; give the checkpoint file inside it")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {p} is empty (0 bytes), probably from an interrupted copy; "
                              f"delete it and train again, or restore it from a backup")
    state = torch_load(p, what="checkpoint", map_location=map_location,
                       fix="train again (`bitalloc train ... --overwrite` replaces it), or restore it from a backup")
    if not isinstance(state, dict) or "model_state" not in state:
        raise CheckpointError(f"{p} is not a bitalloc checkpoint (no model_state entry); give a file written by "
                              f"bitalloc train, or load plain state dicts with torch.load")
    fmt = state.get("format", FORMAT)
    if fmt != FORMAT:
        raise CheckpointError(f"{p} has format {fmt!r}, not {FORMAT!r}; give a file written by bitalloc train")
    version = state.get("version", VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{p}: its version field {version!r} is not a checkpoint version (a positive "
                              "integer): the file was edited or damaged; train again or restore it from a backup")
    if version > VERSION:
        raise CheckpointError(f"{p} was written by a newer bitalloc (checkpoint version {version} > "
                              f"{VERSION}); upgrade bitalloc to read it")
    spec = state.get("model")
    if spec is not None and not isinstance(spec, dict):
        raise CheckpointError(f"{p}: its model entry {spec!r} is not a model description (a dict with name, kwargs, "
                              "factory): the file was edited or damaged; train again or restore it from a backup")
    method = state.get("method")
    if method is not None and not isinstance(method, str):
        raise CheckpointError(f"{p}: its method entry {method!r} is not a method name: the file was edited or "
                              "damaged; train again or restore it from a backup")
    return state


def check_output_path(path: str | os.PathLike | None, *, resume: bool | str = False, overwrite: bool = False,
                      what: str = "checkpoint") -> str:
    """Decide what to do with an output path before training: "fresh", "resume" or "overwrite".

    A fresh run never replaces an existing file silently: it fails with a :class:`CheckpointError` that
    names the file and the two ways out (``--resume`` to continue it, ``--overwrite`` to replace it).
    ``resume=True`` requires the file; ``resume="auto"`` resumes when it exists and starts fresh otherwise.
    """
    if path is None:
        if resume is True:
            raise CheckpointError("--resume needs a checkpoint path (--out PATH)")
        return "fresh"
    p = Path(path)
    exists = p.exists()
    if resume == "auto":
        return "resume" if exists else "fresh"
    if resume:
        if not exists:
            raise CheckpointError(f"cannot resume: {what} {p} does not exist; drop --resume to start a fresh run, "
                                  f"or give the path of an existing checkpoint")
        return "resume"
    if exists:
        if overwrite:
            return "overwrite"
        raise CheckpointError(f"{what} {p} already exists and this is a fresh run; pass --resume to continue "
                              f"training from it, --overwrite to replace it, or choose another output path")
    return "fresh"


# ---- models ----------------------------------------------------------------------------------------------

def model_spec(model: nn.Module, name: str | None = None, kwargs: Mapping[str, Any] | None = None,
               factory: str | None = None) -> dict[str, Any]:
    """The ``model`` entry of a checkpoint: how to rebuild ``model``."""
    cls = type(model)
    return {"name": name, "kwargs": dict(kwargs or {}), "factory": factory,
            "class": f"{cls.__module__}.{cls.__qualname__}"}


def load_state_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, path: str | os.PathLike = "<memory>",
                    strict: bool = True) -> None:
    """``model.load_state_dict`` with a :class:`CheckpointError` that lists what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and hasattr(state_dict[k], "shape")
              and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if shapes or (strict and (missing or unexpected)):
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
        if strict and missing:
            parts.append(f"{len(missing)} entries missing from the checkpoint (e.g. {missing[:3]})")
        if strict and unexpected:
            parts.append(f"{len(unexpected)} unexpected entries (e.g. {unexpected[:3]})")
        raise CheckpointError(f"checkpoint {path} does not fit model {type(model).__name__}: {', '.join(parts)}; "
                              f"it was written for a different model or configuration: load it with the "
                              f"model (and model arguments) it was trained with, or train a new checkpoint")
    model.load_state_dict(dict(state_dict), strict=strict)


def _import_factory(spec: str, *, trusted: bool) -> Callable[..., nn.Module]:
    """The factory ``module:function`` or ``path/file.py:function`` recorded in a checkpoint
    (:func:`bitalloc.models.user.import_factory`); code outside bitalloc only when ``trusted``."""
    from bitalloc.errors import ConfigError
    from bitalloc.models.user import import_factory

    try:
        return import_factory(spec, trust_code=trusted, hint="trust_factory=True (command line: --trust-code)")
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint names model factory {spec!r}: {exc}; or pass model=... to load the "
                              "weights into your own instance") from None


def build_model(spec: Mapping[str, Any], *, path: str | os.PathLike = "<memory>", trust_factory: bool = False,
                method: str | None = None, method_options: Mapping[str, Any] | None = None) -> nn.Module:
    """Rebuild the network described by a checkpoint's ``model`` entry (random weights, not loaded).

    With a ``method`` other than "fp32", the method's ``prepare(model, method_options)`` is applied (see
    :mod:`bitalloc.train.presets`), so quantization-aware checkpoints rebuild their quantized layers.
    """
    model = _build_plain(spec, path=path, trust_factory=trust_factory)
    if method and method != "fp32":
        from bitalloc.errors import ConfigError
        from bitalloc.train.presets import get_method

        try:
            m = get_method(method)
        except ConfigError:
            from bitalloc.train.presets import METHODS

            raise CheckpointError(f"checkpoint {path} was trained with method {method!r}, which bitalloc does not "
                                  f"know (methods: {', '.join(sorted(METHODS))}); pass model=... prepared "
                                  "yourself, or train a new checkpoint") from None
        model = m.prepare(model, dict(method_options or {}))
    return model


def _build_plain(spec: Mapping[str, Any], *, path: str | os.PathLike, trust_factory: bool) -> nn.Module:
    kwargs = dict(spec.get("kwargs") or {})
    if spec.get("factory"):
        return _import_factory(str(spec["factory"]), trusted=trust_factory)(**kwargs)
    name = spec.get("name")
    if not name:
        raise CheckpointError(f"checkpoint {path} does not record a model name (model class {spec.get('class')}); "
                              f"build the model yourself and pass model=... to load_model_checkpoint")
    try:
        from bitalloc import models
    except ImportError as exc:  # pragma: no cover - depends on the models package
        raise CheckpointError(f"cannot rebuild model {name!r} from {path}: bitalloc.models is unavailable ({exc}); "
                              f"pass model=...") from None
    kwargs.pop("pretrained", None)
    return models.create(name, pretrained=False, **kwargs)


def load_model_checkpoint(path: str | os.PathLike, *, model: nn.Module | None = None,
                          map_location: str | torch.device = "cpu", strict: bool = True,
                          trust_factory: bool = False) -> nn.Module:
    """Rebuild (or fill ``model``) from a training checkpoint; returns the model in eval mode.

    Without ``model`` the network is rebuilt with ``bitalloc.models.create(name, **kwargs)`` (or the recorded
    factory). The checkpoint's metadata is attached as ``model.bitalloc_checkpoint`` (epoch, step, config,
    history, best accuracy; no tensors). Errors (missing, corrupt, wrong model) are CheckpointError.
    """
    state = load_checkpoint(path, map_location=map_location)
    spec = state.get("model") or {}
    if model is None:
        model = build_model(spec, path=path, trust_factory=trust_factory, method=state.get("method"),
                            method_options=state.get("method_options"))
    load_state_into(model, state["model_state"], path=path, strict=strict)
    model.eval()
    model.bitalloc_checkpoint = checkpoint_summary(state)  # type: ignore[attr-defined]
    return model


def checkpoint_summary(state: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-friendly part of a checkpoint dict (no tensors)."""
    keep = ("format", "version", "model", "epoch", "step", "total_steps", "complete", "config", "history", "best",
            "world_size", "torch_version", "method", "method_options", "dataset")
    return {k: state[k] for k in keep if k in state}


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata of a checkpoint file (see :func:`checkpoint_summary`)."""
    return checkpoint_summary(load_checkpoint(path))


__all__ = [
    "FORMAT", "VERSION", "capture_rng_state", "restore_rng_state", "save_checkpoint", "load_checkpoint",
    "check_output_path", "model_spec", "load_state_into", "build_model", "load_model_checkpoint",
    "checkpoint_summary", "checkpoint_info",
]
