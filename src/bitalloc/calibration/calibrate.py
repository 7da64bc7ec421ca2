"""Calibration: gather activation statistics on data, then fix every PTQ quantizer's bits and range.

Usage (a context manager, as in Brevitas)::

    qmodel = bitalloc.prepare(model, config, example_inputs)
    with bitalloc.calibration(qmodel):
        for x, _ in calibration_loader:
            qmodel(x)
    # on exit: per-channel bit allocation, clip ranges, grids; weights re-derived and bias-corrected

Inside the context the model runs in float (eval mode, weights and activations unquantized), so every
quantizer sees the statistics of the float network. On a clean exit each observing quantizer computes its
parameters; if the body raises, nothing is changed. Under torch.distributed the statistics of all ranks are
combined before the parameters are computed.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from bitalloc.batches import take_inputs
from bitalloc.errors import DataError
from bitalloc.model.layers import quant_layers


def _observing_quantizers(model: nn.Module) -> list[tuple[str, Any]]:
    out = []
    for name, layer in quant_layers(model):
        q = layer.input_quantizer
        if q is not None and hasattr(q, "start_observing") and not getattr(q, "online", False):
            out.append((f"{name}.input_quantizer", q))
    return out


@contextmanager
def calibration(model: nn.Module, *, seed: int = 0) -> Iterator[nn.Module]:
    """Collect statistics while the body runs calibration batches through ``model``; set ranges on exit."""
    observing = _observing_quantizers(model)
    layers = quant_layers(model)
    saved = [(q, q.enabled) for _, l in layers for q in l.quantizers()]
    was_training = model.training
    for q, _ in saved:
        q.enabled = False
    for i, (name, q) in enumerate(observing):
        q.enabled = True
        q.start_observing(seed=seed + i, name=name)
    model.eval()
    ok = False
    try:
        with torch.no_grad():
            yield model
        ok = True
    finally:
        for q, enabled in saved:
            q.enabled = enabled
        model.train(was_training)
        if not ok:
            for _, q in observing:
                q.observer = None
    for _, q in observing:
        q.finish_observing()
    for _, layer in layers:
        layer.calibrate_weight()


def calibrate(model: nn.Module, data: Iterable, num_samples: int | None = 32, *, seed: int = 0,
              progress: Any = None) -> dict[str, float]:
    """Run up to ``num_samples`` inputs from ``data`` (batches of ``(x, ...)`` or tensors) through
    :func:`calibration`. Returns timing information. An empty ``data`` raises DataError."""
    seen = 0
    start = time.perf_counter()
    with calibration(model, seed=seed):
        for x in take_inputs(data, num_samples):
            model(x)
            seen += x.shape[0]
            if progress is not None:
                progress(x.shape[0])
        if seen == 0:
            raise DataError("the calibration set is empty: give at least one calibration sample")
    return {"calibration_samples": seen, "calibration_seconds": time.perf_counter() - start}
