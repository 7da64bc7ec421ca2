"""The model inputs of the batches users pass to calibration, PTQ, checks and exports, and how a model is called.

Every entry point that reads data accepts an iterable of batches, each either ``(inputs, y, ...)`` (a tuple or
list, as a DataLoader over a labelled dataset yields) or the inputs alone (a tensor or a dict). The inputs of a
batch are one of

* a tensor ``x``: the model is called as ``model(x)``;
* a tuple or list of inputs (several positional arguments, e.g. ``((tokens, mask), y)``): ``model(*inputs)``;
* a dict of inputs: ``model(**inputs)`` (keyword arguments, the Hugging Face convention) when the model's
  ``forward`` accepts these names, else ``model(inputs)`` (a forward that takes one dict).

A forward that takes a single tuple gets it wrapped once more: ``(((a, b),), y)``. The batch size is the first
dimension of the inputs' first tensor; cutting a batch to fewer samples cuts every tensor of the inputs whose
first dimension is that batch size (others, e.g. a mask shared by the batch, are passed whole).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor, nn

from bitalloc.errors import DataError

__all__ = ["batch_inputs", "batch_size", "call_model", "cut_inputs", "model_args", "take_inputs"]


def batch_inputs(batch: Any) -> Any:
    """The inputs of one batch: ``batch[0]`` of a tuple or list, else ``batch`` itself."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def batch_size(inputs: Any) -> int:
    """Samples in ``inputs``: the first dimension of its first tensor (a 0-d tensor counts as one sample).
    Raises DataError when the inputs hold no tensor."""
    for t in _tensors(inputs):
        return int(t.shape[0]) if t.ndim else 1
    raise DataError(f"a batch's inputs hold no tensor (got {type(inputs).__name__}); give batches of a tensor, a "
                    "tuple or a dict of tensors (optionally with labels: (inputs, labels))")


def cut_inputs(inputs: Any, stop: int) -> Any:
    """The first ``stop`` samples of ``inputs`` (see the module docstring)."""
    n = batch_size(inputs)
    if stop >= n:
        return inputs

    def cut(obj: Any) -> Any:
        if isinstance(obj, Tensor):
            return obj[:stop] if obj.ndim and obj.shape[0] == n else obj
        if isinstance(obj, (list, tuple)):
            return type(obj)(cut(o) for o in obj) if type(obj) in (list, tuple) else obj
        if isinstance(obj, dict):
            return {k: cut(v) for k, v in obj.items()}
        return obj

    return cut(inputs)


def _accepts_keywords(model: nn.Module, names: Iterable[Any]) -> bool:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read: keyword arguments, the common convention
        return True
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return True
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return all(isinstance(k, str) and k in named for k in names)


def model_args(model: nn.Module, inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """Positional and keyword arguments of ``model`` for one batch's ``inputs`` (see the module docstring)."""
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    if isinstance(inputs, dict) and inputs and _accepts_keywords(model, inputs):
        return (), dict(inputs)
    return (inputs,), {}


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model`` run on one batch's ``inputs`` (see the module docstring)."""
    args, kwargs = model_args(model, inputs)
    return model(*args, **kwargs)


def take_inputs(data: Iterable, num_samples: int | None) -> Iterator[Any]:
    """The inputs of ``data``'s batches up to ``num_samples`` samples in all (None: every batch): the batch that
    crosses the limit is cut to it, and reading stops there or at the first empty batch, so that a one-shot
    iterator is not read past what is used."""
    seen = 0
    for batch in data:
        x = batch_inputs(batch)
        if num_samples is not None:
            x = cut_inputs(x, max(0, num_samples - seen))
        n = batch_size(x)
        if n == 0:
            return
        yield x
        seen += n
        if num_samples is not None and seen >= num_samples:
            return
