"""Model inputs from a tensor file: calibration and evaluation data for models that do not read images.

:func:`load_tensor_inputs` reads a file written with ``torch.save`` (with ``weights_only=True``: opening it runs
no code) holding one of

* a tensor ``[N, ...]``: N samples of the model's one input (``model(x)``);
* a tuple of tensors ``[N, ...]``: N samples of positional inputs (``model(a, b)``);
* a dict of tensors ``[N, ...]``: N samples of keyword inputs (``model(input_ids=..., attention_mask=...)``, or
  ``model(batch)`` when ``forward`` takes one dict; :mod:`bitalloc.batches`);
* a list of N samples, each a tensor, tuple or dict without the batch dimension (stacked: every sample's
  tensors need the same shapes, e.g. token ids padded to one length);
* ``{"inputs": <one of the above>, "labels": int tensor [N]}``: labelled samples (class indices), so that
  accuracy can be measured; without labels, evaluation compares the outputs with the FP32 model's
  (:func:`bitalloc.report.stats.output_agreement`).

The result is a :class:`TensorSamples`: ``len``, ``subset(indices)``, ``batches(batch_size)`` (the batches
every bitalloc entry point takes: ``(inputs, labels)`` or ``(inputs,)``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from bitalloc.errors import DataError

__all__ = ["TensorSamples", "load_tensor_inputs"]


def _leaves(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, tuple):
        for o in obj:
            yield from _leaves(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _leaves(o)


def _index(obj: Any, idx: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj[idx]
    if isinstance(obj, tuple):
        return tuple(_index(o, idx) for o in obj)
    return {k: _index(v, idx) for k, v in obj.items()}


def _check_structure(obj: Any, where: str) -> None:
    """Tensors, tuples of tensors or dicts of tensors (string keys), nothing else."""
    if isinstance(obj, Tensor):
        return
    if isinstance(obj, tuple) and obj:
        for o in obj:
            if not isinstance(o, Tensor):
                raise DataError(f"{where}: a tuple of inputs must hold tensors, got {type(o).__name__}")
        return
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            if not isinstance(k, str) or not isinstance(v, Tensor):
                raise DataError(f"{where}: a dict of inputs must map names to tensors, got {k!r}: "
                                f"{type(v).__name__}")
        return
    raise DataError(f"{where}: expected a tensor, a tuple or a dict of tensors, or a list of samples, got "
                    f"{type(obj).__name__}{' (empty)' if isinstance(obj, (tuple, dict)) else ''}")


def _stack(samples: Sequence[Any], where: str) -> Any:
    first = samples[0]
    _check_structure(first, f"{where}, sample 0")
    for i, s in enumerate(samples):
        _check_structure(s, f"{where}, sample {i}")
        if type(s) is not type(first) or (isinstance(s, dict) and s.keys() != first.keys()) or \
                (isinstance(s, tuple) and len(s) != len(first)):
            raise DataError(f"{where}: sample {i} is not structured like sample 0 (same tensor, tuple length or "
                            "dict keys needed)")
    if isinstance(first, Tensor):
        parts = [list(samples)]
    elif isinstance(first, tuple):
        parts = [[s[j] for s in samples] for j in range(len(first))]
    else:
        parts = [[s[k] for s in samples] for k in first]
    stacked = []
    for column in parts:
        shapes = {tuple(t.shape) for t in column}
        if len(shapes) > 1:
            raise DataError(f"{where}: the samples' tensors have different shapes ({', '.join(map(str, sorted(shapes)[:3]))}"
                            "...); pad them to one shape (e.g. token ids to one length, with an attention mask)")
        stacked.append(torch.stack(column))
    if isinstance(first, Tensor):
        return stacked[0]
    if isinstance(first, tuple):
        return tuple(stacked)
    return dict(zip(first, stacked))


class TensorSamples:
    """N samples of model inputs (a tensor, tuple or dict of tensors whose first dimension is N) and optional
    labels (int64 [N])."""

    def __init__(self, inputs: Any, labels: Tensor | None = None, *, source: str = "<memory>"):
        _check_structure(inputs, source)
        sizes = {int(t.shape[0]) if t.ndim else -1 for t in _leaves(inputs)}
        if len(sizes) != 1 or -1 in sizes:
            raise DataError(f"{source}: the input tensors must share their first (sample) dimension, got sizes "
                            f"{sorted(sizes)}; batch every input, or give a list of samples")
        self.n = sizes.pop()
        if self.n == 0:
            raise DataError(f"{source} holds no samples")
        for t in _leaves(inputs):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise DataError(f"{source}: the inputs hold NaN or infinite values; give finite inputs")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.ndim != 1 or labels.shape[0] != self.n or labels.is_floating_point():
                raise DataError(f"{source}: labels must be an integer tensor of shape [{self.n}] (one class index "
                                f"per sample), got {labels.dtype} {tuple(labels.shape)}")
            labels = labels.long()
        self.inputs, self.labels, self.source = inputs, labels, source

    def __len__(self) -> int:
        return self.n

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def subset(self, indices: Sequence[int] | Tensor) -> "TensorSamples":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorSamples(_index(self.inputs, idx), None if self.labels is None else self.labels[idx],
                             source=self.source)

    def batches(self, batch_size: int) -> list[Any]:
        """``(inputs, labels)`` batches (labelled) or ``(inputs,)`` batches, in order, of ``batch_size`` samples (the
        inputs always in a tuple, so that a tuple of inputs is not taken for (inputs, labels))."""
        if batch_size < 1:
            raise DataError(f"batch size {batch_size}: give a positive number")
        out = []
        for start in range(0, self.n, batch_size):
            sl = slice(start, start + batch_size)
            x = _index(self.inputs, sl)
            out.append((x, self.labels[sl]) if self.labels is not None else (x,))
        return out

    def describe(self) -> str:
        """e.g. "40 samples of {input_ids: int64 [16], attention_mask: int64 [16]}"."""
        def one(t: Tensor) -> str:
            return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape[1:])}"

        if isinstance(self.inputs, Tensor):
            what = one(self.inputs)
        elif isinstance(self.inputs, tuple):
            what = "(" + ", ".join(one(t) for t in self.inputs) + ")"
        else:
            what = "{" + ", ".join(f"{k}: {one(v)}" for k, v in self.inputs.items()) + "}"
        return f"{self.n} {'labelled ' if self.labelled else ''}samples of {what}"


def load_tensor_inputs(path: str | os.PathLike) -> TensorSamples:
    """The samples in the tensor file ``path`` (module docstring); DataError naming the problem otherwise."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"inputs file {p} does not exist; write it with torch.save(inputs, PATH)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's unpickling errors: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"inputs file {p} cannot be read with torch.load(weights_only=True) ({first[:300]}); write "
                        "tensors, tuples, lists or dicts of tensors with torch.save") from None
    labels = None
    if isinstance(obj, dict) and "inputs" in obj and set(obj) <= {"inputs", "labels"}:
        obj, labels = obj["inputs"], obj.get("labels")
    if isinstance(obj, list):
        if not obj:
            raise DataError(f"inputs file {p} holds an empty list: give at least one sample")
        obj = _stack(obj, str(p))
    return TensorSamples(obj, labels, source=str(p))
