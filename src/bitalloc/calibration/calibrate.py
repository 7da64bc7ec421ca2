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

A quantized layer whose forward never ran during calibration (while others did) is unwrapped and listed in
float with the reason (:func:`bitalloc.model.prepare.demote_uncalled`, with a warning): its quantizers would
never run, and its input would have no statistics. On one batch or more, a tensor whose calibration range is
degenerate (constant: zero width), or dominated by a few outliers, gets a warning
(:func:`bitalloc.calibration.observer.range_warnings`).
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from bitalloc.batches import batch_size, call_model, take_inputs
from bitalloc.calibration.network_clip import MAX_SAMPLES, network_clipping, wants_network_check
from bitalloc.errors import DataError
from bitalloc.model.layers import call_counts, quant_layers
from bitalloc.model.prepare import demote_uncalled


def _observing_quantizers(model: nn.Module) -> list[tuple[str, Any]]:
    out = []
    for name, layer in quant_layers(model):
        q = layer.input_quantizer
        if q is not None and hasattr(q, "start_observing") and not getattr(q, "online", False):
            out.append((f"{name}.input_quantizer", q))
    return out


@contextmanager
def calibration(model: nn.Module, *, seed: int = 0, stats_out: dict[str, Any] | None = None) -> Iterator[nn.Module]:
    """Collect statistics while the body runs calibration batches through ``model``; set ranges on exit.

    ``stats_out``: a dict that receives, per quantized layer name, the input statistics its activation grid
    came from (:class:`~bitalloc.quant.stats.ChannelStats`; e.g. to derive grids at other bit widths)."""
    observing = _observing_quantizers(model)
    layers = quant_layers(model)
    saved = [(q, q.enabled) for _, l in layers for q in l.quantizers()]
    was_training = model.training
    before = call_counts(model)
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
                q.observer = q.input_sample = None
    if call_counts(model) != before:  # some layer ran: those that did not are not quantized
        gone = set(demote_uncalled(model, before, "calibration"))
        observing = [(n, q) for n, q in observing if n.rpartition(".")[0] not in gone]
        layers = [(n, l) for n, l in layers if n not in gone]
    modules = dict(layers)
    checks: dict[str, dict[str, Any]] = {}
    for name, q in observing:
        stats = q.finish_observing()
        if stats_out is not None and stats is not None:
            stats_out[name.rpartition(".")[0]] = stats
        if stats is not None and getattr(q, "input_sample", None) is not None:  # TensorConfig.clip_check "output"
            choice = q.check_clipping(modules[name.rpartition(".")[0]].layer, stats)
            if choice is not None:
                checks[name.rpartition(".")[0]] = choice
        message = range_warning(name, stats, q.qparams()) if stats is not None and stats.samples is not None else None
        if message:
            warnings.warn(message, stacklevel=3)
    for _, layer in layers:
        layer.calibrate_weight()
    model.bitalloc_clip_checks = checks
    replaced = {n: c for n, c in checks.items() if c["chosen"] != c["configured"]}
    if replaced:
        first = next(iter(replaced.values()))
        warnings.warn(f"clipping checked by layer output error (clip_check='output'): {first['configured']} replaced "
                      f"on {len(replaced)} of {len(checks)} activation tensors, where it gave a larger output error "
                      f"than {', '.join(sorted({c['chosen'] for c in replaced.values()}))} (e.g. "
                      f"{', '.join(list(replaced)[:4])}); see bitalloc_clip_checks / the report's clip_checks",
                      stacklevel=3)


#: central share of the values whose spread :func:`range_warning` compares with the quantization step
CENTRAL = 0.99
#: a row's values are dominated by outliers when their extent (max - min) exceeds this many central spreads
#: (for comparison: 2.0 for 10^6 Gaussian values, 2.8 for Laplace values)
OUTLIER_EXTENT = 4.0


def range_warning(name: str, stats: Any, params: Any) -> str | None:
    """A warning when a calibrated activation grid cannot represent the calibration data, else None.

    * constant data: every calibration value of the tensor equals one value v (e.g. identical or blank
      calibration inputs): the grid [min(v, 0), max(v, 0)] has no room for any other value;
    * outliers: in some row (the tensor, or a channel when quantized per channel) the central ``CENTRAL`` (99%)
      of the values, the quantiles q_0.5% .. q_99.5% of the observer's uniform subsample, spans less than one
      quantization step s of the grid, while the row's extent max - min exceeds ``OUTLIER_EXTENT`` (4) such
      spreads: a few extreme values set the range, and nearly all values fall onto one or two levels (the
      accuracy collapses). Rows whose central values are all equal (dead or sparse channels) are not counted:
      zero is always exactly representable; nor are narrow rows far from zero (the grid's span includes 0).
    ``stats``: the :class:`~bitalloc.quant.stats.ChannelStats` the grid came from; ``params``: its QuantParams."""
    if bool((stats.max == stats.min).all()):
        values = stats.max.unique()
        what = f"every value is {float(values[0]):.4g}" if values.numel() == 1 else "every channel is constant"
        return (f"{name}: the calibration data are constant here ({what}; e.g. blank or identical inputs), so the "
                "grid has no room for other values and accuracy will collapse; calibrate on real, varied data")
    samples = stats.samples.to(torch.float64)
    if samples.shape[1] > 65536:  # a strided subset is plenty for two quantiles
        samples = samples[:, :: -(-samples.shape[1] // 65536)]
    tail = (1.0 - CENTRAL) / 2
    q = torch.quantile(samples, torch.tensor([tail, 1.0 - tail], dtype=torch.float64), dim=1)
    spread = q[1] - q[0]
    step = params.scale.to(torch.float64).reshape(-1).expand(spread.shape[0])
    extent = (stats.max - stats.min).to(torch.float64)
    bad = (spread > 0) & (spread < step) & (extent > OUTLIER_EXTENT * spread)
    if not bool(bad.any()):
        return None
    i = int(bad.nonzero()[0])
    where = f" in {int(bad.sum())} of {bad.numel()} channels (e.g. channel {i})" if bad.numel() > 1 else ""
    return (f"{name}: the calibration range [{float(stats.min[i]):.4g}, {float(stats.max[i]):.4g}] is dominated by "
            f"outliers{where}: {100 * CENTRAL:g}% of the values lie in [{float(q[0, i]):.4g}, {float(q[1, i]):.4g}], "
            f"less than one quantization step ({float(step[i]):.4g}), so they collapse onto one or two levels and "
            "accuracy will collapse; check the calibration data for outliers, or clip the range (presets aciq, "
            "percentile, mse, kld)")


def calibrate(model: nn.Module, data: Iterable, num_samples: int | None = 32, *, seed: int = 0,
              progress: Any = None) -> dict[str, float]:
    """Run up to ``num_samples`` inputs from ``data`` (batches of ``(inputs, ...)`` or inputs: a tensor, a tuple
    or a dict of tensors, see :mod:`bitalloc.batches`) through
    :func:`calibration`. Returns timing information. An empty ``data`` raises DataError."""
    seen = 0
    start = time.perf_counter()
    network = any(wants_network_check(l.input_quantizer) for _, l in quant_layers(model))
    kept: list[Any] = []  # the samples clip_check="network" reruns the model on
    with calibration(model, seed=seed):
        for x in take_inputs(data, num_samples):
            call_model(model, x)
            n = batch_size(x)
            if network and seen < MAX_SAMPLES:
                kept.append(x)
            seen += n
            if progress is not None:
                progress(n)
        if seen == 0:
            raise DataError("the calibration set is empty: give at least one calibration sample")
    checks = getattr(model, "bitalloc_clip_checks", {})
    if network:
        checks.update(network_clipping(model, kept))
        model.bitalloc_clip_checks = checks
    return {"calibration_samples": seen, "calibration_seconds": time.perf_counter() - start,
            "clip_checks": checks}
