"""Saving and loading quantized models as plain data (config + state_dict), not pickled code.

The file holds the QuantConfig, how to rebuild the float model (a zoo name, or the caller passes the model),
the shape of one input (to re-trace the model), and the quantized model's ``state_dict``. Loading prepares
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
from bitalloc.errors import CheckpointError
from bitalloc.io import load_failure, torch_save
from bitalloc.model.prepare import prepare, prepare_info

FORMAT = "bitalloc-quantized-model"
VERSION = 1


def save_quantized(model: nn.Module, path: str | os.PathLike, *, model_name: str | None = None,
                   example_shape: tuple[int, ...], overwrite: bool = True, extra: dict[str, Any] | None = None) -> Path:
    """Write a prepared (and calibrated) model to ``path`` atomically."""
    info = prepare_info(model)
    state = {"format": FORMAT, "version": VERSION, "config": info.config.to_dict(), "model_name": model_name,
             "example_shape": list(example_shape), "state_dict": model.state_dict(), "extra": extra or {}}
    return torch_save(state, path, overwrite=overwrite)


def load_quantized(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a quantized model saved by :func:`save_quantized`.

    ``model``: the float model to prepare (default: the zoo model named in the file, with fresh weights:
    every weight comes from the file anyway)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such quantized model file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{p} is not a readable bitalloc quantized model (corrupt or truncated: "
                              f"{load_failure(exc)}); re-create it with `bitalloc ptq --save-model`, or with "
                              "`bitalloc freeze` from a training checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a bitalloc quantized model file")
    if int(state.get("version", 0)) > VERSION:
        raise CheckpointError(f"{p} has format version {state['version']}; this bitalloc reads up to {VERSION}: upgrade")
    if model is None:
        if not state.get("model_name"):
            raise CheckpointError(f"{p} does not name its model; pass the float model: load_quantized(path, model)")
        from bitalloc import models

        model = models.create(state["model_name"])
    example = torch.zeros(1, *state["example_shape"])
    q = prepare(model.eval(), QuantConfig.from_dict(state["config"]), example)
    from bitalloc.train.checkpoint import load_state_into

    load_state_into(q, state["state_dict"], path=p)
    q.eval()
    q.bitalloc_example_shape = tuple(state["example_shape"])
    return q
