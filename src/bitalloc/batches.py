"""The model inputs of the batches users pass to calibration, PTQ, checks and exports.

Every entry point that reads data accepts an iterable of batches, each either ``(x, y, ...)`` (a tuple or list,
as a DataLoader over a labelled dataset yields) or the input tensor ``x`` alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["batch_inputs", "take_inputs"]


def batch_inputs(batch: Any) -> Any:
    """The input of one batch: ``batch[0]`` of a tuple or list, else ``batch`` itself."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def take_inputs(data: Iterable, num_samples: int | None) -> Iterator[Any]:
    """The inputs of ``data``'s batches up to ``num_samples`` samples in all (None: every batch): the batch that
    crosses the limit is cut to it, and reading stops there or at the first empty batch, so that a one-shot
    iterator is not read past what is used."""
    seen = 0
    for batch in data:
        x = batch_inputs(batch)
        if num_samples is not None:
            x = x[: max(0, num_samples - seen)]
        if x.shape[0] == 0:
            return
        yield x
        seen += x.shape[0]
        if num_samples is not None and seen >= num_samples:
            return
