"""Activation steps chosen by the network's output: ``TensorConfig.clip_check = "network"``.

Analytic clipping (ACIQ) minimises the mean squared error of the tensor itself under its prior; the layer-output
criterion of :mod:`bitalloc.calibration.clip_check` minimises the error one layer later. Neither sees what the
rest of the network does with the error: a ReLU6 after the layer discards clipping above 6, a depthwise layer
followed by a narrow projection amplifies it. At 4 bits this matters: on EfficientNet-Lite0 the choice moves
top-1 by points.

With ``clip_check="network"`` each static activation quantizer's step s (the range calibration set, ACIQ or any
other ``method``) is replaced by m* s, with m* the multiplier of :data:`STEPS` (1 included: the configured step is
kept unless another is better) that minimises the divergence of the network's outputs from the float network's
outputs on the calibration samples, **with that quantizer alone enabled** (weights and every other quantizer in
float; the zero point and the bit width stay):

    m* = argmin_m  D( f(x),  f_{Q_{m s}}(x) ),   D = mean over samples of KL(softmax f || softmax f_Q)

for class scores (outputs of shape (batch, classes)), else the mean squared output error. This is the measured
sensitivity of :mod:`bitalloc.search.sensitivity` used as a range criterion (and, like it, measured at the float
network, where D is at its minimum, so that each quantizer's own effect is not masked by the others': measured
inside a quantized network the same criterion is dominated by first-order changes of either sign). The sensitivity
pass chooses the step of each (layer, activation width) the same way, so a searched configuration gets the grids
its sensitivity was measured with.

Cost: the network rerun from each quantized layer (:class:`~bitalloc.model.suffix.SuffixRunner`) len(STEPS) - 1
times on up to :data:`MAX_SAMPLES` calibration samples. Runs in :func:`bitalloc.calibration.calibrate` (and so in
:func:`bitalloc.quantize`), after the ranges are set and before GPTQ rounding; the bare ``calibration`` context
manager does not rerun the model and keeps the configured steps. Each choice is recorded with the divergence of
every multiplier (``bitalloc_clip_checks``, the PTQ report's ``calibration.clip_checks``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitalloc.batches import batch_size, cut_inputs
from bitalloc.model.layers import float_mode, quant_layers
from bitalloc.model.suffix import SuffixRunner

#: multipliers of the configured step that ``clip_check="network"`` chooses from
STEPS = (0.6, 0.75, 0.9, 1.0, 1.15, 1.3, 1.5)
#: calibration samples the choice is measured on (the first ones)
MAX_SAMPLES = 64


def divergence(out: Tensor, ref: Tensor) -> float:
    """D(ref, out): mean KL(softmax ref || softmax out) over the samples for class scores (2-D outputs), else
    the mean squared error; float64."""
    out, ref = out.to(torch.float64), ref.to(torch.float64)
    if out.ndim == 2:
        lp, lq = F.log_softmax(ref, dim=1), F.log_softmax(out, dim=1)
        return float((lp.exp() * (lp - lq)).sum(1).mean())
    return float((out - ref).pow(2).mean())


def wants_network_check(quantizer: Any) -> bool:
    """Whether ``quantizer`` is a static activation quantizer configured with ``clip_check="network"``."""
    cfg = getattr(quantizer, "cfg", None)
    return (cfg is not None and getattr(quantizer, "role", None) == "act" and cfg.clip_check == "network"
            and not getattr(quantizer, "online", False) and hasattr(quantizer, "scale"))


@torch.no_grad()
def choose_step(quantizer: nn.Module, run: Callable[[], list[Tensor]], refs: list[Tensor]) -> dict[str, Any]:
    """Scale ``quantizer``'s step by the multiplier of :data:`STEPS` whose outputs (``run()``: one tensor per
    batch, with the quantizer enabled as the caller arranged) diverge least from ``refs`` (ties: the configured
    step, then the first in STEPS). Returns {"configured", "chosen", "errors"} as the PTQ report lists clipping
    checks."""
    base = quantizer.scale.detach().clone()
    ref = torch.cat(refs)
    errors: dict[float, float] = {}
    try:
        for m in sorted(STEPS, key=lambda v: (v != 1.0, STEPS.index(v))):  # the configured step first
            quantizer.scale.copy_(base * m)
            quantizer._cache = None
            errors[m] = divergence(torch.cat(run()), ref)
    finally:
        quantizer.scale.copy_(base)
    best = min(errors, key=lambda m: errors[m])  # first of the least: 1.0 wins ties
    quantizer.scale.copy_(base * best)
    quantizer._cache = None
    return {"configured": "step x1", "chosen": f"step x{best:g}",
            "errors": {f"step x{m:g}": errors[m] for m in STEPS}}


@torch.no_grad()
def network_clipping(model: nn.Module, inputs: list[Any]) -> dict[str, dict[str, Any]]:
    """Choose the step of every static activation quantizer of ``model`` (a calibrated, prepared model) with
    ``clip_check="network"`` on the calibration ``inputs`` (batches of model inputs; the first
    :data:`MAX_SAMPLES` samples are used). Returns {layer name: the choice} (module docstring)."""
    layers = [(n, l) for n, l in quant_layers(model) if wants_network_check(l.input_quantizer)
              and bool(getattr(l.input_quantizer, "calibrated", True))]
    if not layers or not inputs:
        return {}
    batches, seen = [], 0
    for x in inputs:
        if seen >= MAX_SAMPLES:
            break
        n = min(batch_size(x), MAX_SAMPLES - seen)
        batches.append(cut_inputs(x, n))
        seen += n
    was_training = model.training
    model.eval()
    names = [n for n, _ in layers]
    out: dict[str, dict[str, Any]] = {}
    try:
        with float_mode(model):
            runner = SuffixRunner(model, names, batches)
            runner.check(cut_inputs(batches[0], min(2, batch_size(batches[0]))))
            refs = runner.base()
            for name, layer in layers:
                q = layer.input_quantizer
                q.enabled = True
                try:
                    out[name] = choose_step(q, lambda: [runner.variant(name, layer, b) for b in range(len(batches))],
                                            refs)
                finally:
                    q.enabled = False
            runner.release()
    finally:
        model.train(was_training)
    return out


__all__ = ["STEPS", "MAX_SAMPLES", "divergence", "wants_network_check", "choose_step", "network_clipping"]
