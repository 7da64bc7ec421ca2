"""Saving and loading quantized models as plain data (config + state_dict), not pickled code.

The file holds the QuantConfig, how to rebuild the float model (a zoo name, or the caller passes the model),
the shape and dtype of one input (to re-trace the model), and the quantized model's ``state_dict``; the file
carries a SHA-256 checksum that loading verifies (:mod:`bitalloc.io`). Loading prepares
the float model again with the same configuration and loads the state: the result computes exactly what the
saved model computed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitalloc.config import QuantConfig
from bitalloc.errors import CheckpointError, ConfigError
from bitalloc.io import torch_load, torch_save
from bitalloc.model.prepare import prepare, prepare_info

FORMAT = "bitalloc-quantized-model"
VERSION = 1
_FIX = "re-create it with `bitalloc ptq --save-model`, or with `bitalloc freeze` from a training checkpoint"


def example_dtype_name(model: nn.Module, example_dtype: torch.dtype | str | None = None) -> str:
    """The dtype of the model's input as a name ("float32", "int64"): ``example_dtype``, else the model's
    ``bitalloc_example_dtype`` (set by :func:`load_quantized` and ``unpack_model``), else "float32"."""
    dtype = example_dtype if example_dtype is not None else getattr(model, "bitalloc_example_dtype", None)
    if dtype is None:
        return "float32"
    name = str(dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ConfigError(f"example_dtype={dtype!r} is not a torch dtype; give e.g. torch.float32 or torch.int64")
    return name


def example_input(shape: Any, dtype_name: str | None) -> torch.Tensor:
    """A batch of one all-zero input (zeros are valid token ids too) of ``shape`` and the named dtype."""
    dtype = getattr(torch, dtype_name or "float32", None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown input dtype {dtype_name!r}")
    return torch.zeros(1, *shape, dtype=dtype)


def save_quantized(model: nn.Module, path: str | os.PathLike, *, model_name: str | None = None,
                   example_shape: tuple[int, ...], overwrite: bool = True, extra: dict[str, Any] | None = None,
                   example_dtype: torch.dtype | str | None = None) -> Path:
    """Write a prepared (and calibrated) model to ``path`` atomically, with a SHA-256 checksum
    (:func:`bitalloc.io.torch_save`). ``example_dtype``: the input's dtype (default: the model's
    ``bitalloc_example_dtype``, else float32; ``torch.int64`` for models that start with an ``nn.Embedding``)."""
    info = prepare_info(model)
    state = {"format": FORMAT, "version": VERSION, "config": info.config.to_dict(), "model_name": model_name,
             "example_shape": list(example_shape), "example_dtype": example_dtype_name(model, example_dtype),
             "state_dict": model.state_dict(), "extra": extra or {}}
    return torch_save(state, path, overwrite=overwrite)


def load_quantized(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a quantized model saved by :func:`save_quantized`.

    ``model``: the float model to prepare (default: the zoo model named in the file, with fresh weights:
    every weight comes from the file anyway). The file's checksum is verified first (:func:`bitalloc.io.torch_load`);
    every problem is a :class:`CheckpointError` naming the file. The model gets ``bitalloc_example_shape``,
    ``bitalloc_example_dtype`` and ``bitalloc_model_name`` (the zoo name in the file, or None)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such quantized model file")
    state = torch_load(p, what="quantized model", fix=_FIX)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a bitalloc quantized model file")
    if int(state.get("version", 0)) > VERSION:
        raise CheckpointError(f"{p} has format version {state['version']}; this bitalloc reads up to {VERSION}: upgrade")
    if model is None:
        if not state.get("model_name"):
            raise CheckpointError(f"{p} does not name its model; pass the float model: load_quantized(path, model)")
        from bitalloc import models

        model = models.create(state["model_name"])
    try:
        example = example_input(state["example_shape"], state.get("example_dtype"))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{p}: malformed example input record ({exc}); {_FIX}") from None
    q = prepare(model.eval(), QuantConfig.from_dict(state["config"]), example)
    from bitalloc.train.checkpoint import load_state_into

    load_state_into(q, state["state_dict"], path=p)
    q.eval()
    q.bitalloc_example_shape = tuple(state["example_shape"])
    q.bitalloc_example_dtype = str(example.dtype).removeprefix("torch.")
    q.bitalloc_model_name = state.get("model_name")
    return q
