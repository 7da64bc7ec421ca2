"""The quantized layer: the original Conv/Linear module plus a weight quantizer and an input quantizer.

:class:`QuantLayer` keeps the original module (so its own ``forward`` runs: "same" padding of a Conv2d
subclass, ``padding_mode``, dilation, groups all keep working) and substitutes the fake-quantized weight for
the float one on each call: y = layer.forward(Q_a(x)) with weight Q_w(W) and bias g * b, where g is the weight
quantizer's output-channel gate (its optional method ``output_gate() -> Tensor [C] | None``, read right after
the weight forward: the Bayesian Bits z2 pruning gates, sampled in training, thresholded at test time; the kept
mask of a frozen quantizer that prunes; None, i.e. 1, for quantizers without it or without pruning). Gating
the bias with the same z2 as the weights makes a pruned output channel output exactly 0, in training as in the
frozen model (where :func:`bitalloc.model.freeze.freeze` zeroes the pruned channels' bias), which is what the
cost model counts (the channel removed). With both quantizers disabled it is exactly the original layer.

Each QuantLayer counts its forward calls (``calls``, not saved): a parent that reads the wrapped layer's weight
directly (a fused fast path) bypasses the quantizers, and :func:`call_counts` lets prepare, calibration and
PTQ evaluation find such layers and report them as float (:func:`bitalloc.model.prepare.demote_uncalled`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitalloc.errors import DataError
from bitalloc.quantizers.base import Quantizer

#: layer types bitalloc quantizes (and their subclasses)
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
_PLAIN_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Linear.forward}


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED_LAYERS)


def activation_axis(layer: nn.Module) -> int:
    """Channel axis of a layer's input: 1 for convolutions (N, C, ...), -1 for linear layers (..., C)."""
    return -1 if isinstance(layer, nn.Linear) else 1


def input_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


class QuantLayer(nn.Module):
    """A Conv1d/Conv2d/Linear (or subclass) computed with quantized weights and quantized inputs.

    Attributes: ``layer`` (the wrapped module, BatchNorm already folded into it), ``weight_quantizer`` and
    ``input_quantizer`` (a :class:`~bitalloc.quantizers.Quantizer` or None for float), ``layer_name`` (its
    qualified name in the model) and ``bias_correction`` (mode applied at calibration).
    Attribute reads that QuantLayer does not define (``weight``, ``in_channels``...) go to the wrapped layer.
    """

    def __init__(self, layer: nn.Module, weight_quantizer: Quantizer | None, input_quantizer: Quantizer | None,
                 name: str = "", bias_correction: str = "none", smooth: float | None = None):
        super().__init__()
        self.layer = layer
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.layer_name = name
        self.bias_correction = bias_correction
        #: SmoothQuant: the input is divided by ``smooth_scale`` (per input channel) and the wrapped layer's weight
        #: holds W diag(smooth_scale) (:mod:`bitalloc.calibration.smooth`); None without smoothing
        self.smooth_alpha = smooth
        self.register_buffer("smooth_scale", None if smooth is None else torch.ones(input_channels(layer)))
        self._plain = type(layer).forward in _PLAIN_FORWARDS
        #: forward calls so far (quantizers ran, or were disabled on purpose); a plain attribute, not state
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self._modules.get("layer")
            if layer is None:
                raise
            return getattr(layer, name)

    def quantized_weight(self) -> Tensor:
        w = self.layer.weight
        return w if self.weight_quantizer is None else self.weight_quantizer(w)

    def gated_bias(self) -> Tensor | None:
        """The bias times the weight quantizer's output-channel gate (call it after :meth:`quantized_weight`)."""
        b = self.layer.bias
        if b is None or self.weight_quantizer is None:
            return b
        gate = getattr(self.weight_quantizer, "output_gate", None)
        g = gate() if gate is not None else None
        return b if g is None else b * g.to(device=b.device, dtype=b.dtype).reshape(-1)

    def smooth_input(self, x: Tensor) -> Tensor:
        """The layer's input as its input quantizer sees it: x / smooth_scale (per channel) with SmoothQuant."""
        s = self.smooth_scale
        if s is None:
            return x
        shape = [1] * x.ndim
        shape[activation_axis(self.layer) % x.ndim] = -1
        return x / s.to(x.dtype).reshape(shape)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        x = self.smooth_input(x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.quantized_weight()
        b = self.gated_bias()
        if self._plain and not args and not kwargs:
            if isinstance(self.layer, nn.Linear):
                return F.linear(x, w, b)
            return self.layer._conv_forward(x, w, b)
        params = {"weight": w} if b is None or b is self.layer.bias else {"weight": w, "bias": b}
        return torch.func.functional_call(self.layer, params, (x, *args), kwargs)

    def quantizers(self) -> list[Quantizer]:
        return [q for q in (self.weight_quantizer, self.input_quantizer) if q is not None]

    @torch.no_grad()
    def calibrate_weight(self) -> None:
        """(Re)derive the weight quantizer's grid from the current weight, then apply bias correction."""
        q = self.weight_quantizer
        if q is not None and hasattr(q, "calibrate_weight"):
            w = self.layer.weight
            if not bool(torch.isfinite(w).all()):
                bad = int((~torch.isfinite(w)).sum())
                name = self.layer_name or type(self.layer).__name__
                raise DataError(f"layer {name!r}: its weight has {bad} NaN / inf value(s) (of {w.numel()}), so it has "
                                "no quantization range; the model is corrupt or its training diverged: load or train "
                                "finite weights")
            q.calibrate_weight(w)
            q.set_bias_correction(self.layer.weight, self.bias_correction)

    def extra_repr(self) -> str:
        smooth = "" if self.smooth_alpha is None else f", smooth={self.smooth_alpha}"
        return f"name={self.layer_name!r}, bias_correction={self.bias_correction}{smooth}"


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """All QuantLayers of a model with their qualified names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


def call_counts(model: nn.Module) -> dict[str, int]:
    """Forward calls of every QuantLayer of ``model`` so far, by name (compare two snapshots to find the layers
    that did not run in between)."""
    return {n: getattr(m, "calls", 0) for n, m in quant_layers(model)}


def set_quantization_enabled(model: nn.Module, enabled: bool, *, weights: bool = True, acts: bool = True) -> None:
    """Switch fake quantization of weights and/or activations on or off everywhere in ``model``."""
    for _, layer in quant_layers(model):
        if weights and layer.weight_quantizer is not None:
            layer.weight_quantizer.enabled = enabled
        if acts and layer.input_quantizer is not None:
            layer.input_quantizer.enabled = enabled


class float_mode:
    """Context manager: run a quantized model in float (all quantizers disabled), restoring the state after.

    It disables quantizers; it does not restore weights that calibration replaced: after GPTQ rounding
    (``rounding="gptq"``, preset ``aciq-gptq``) each such layer's weight *is* its GPTQ-rounded grid values, so
    ``float_mode`` then runs float activations with those weights, not the original FP32 model (keep the
    model you passed to ``quantize`` for that: it is never modified)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.saved: list[tuple[Quantizer, bool]] = []

    def __enter__(self) -> nn.Module:
        for _, layer in quant_layers(self.model):
            for q in layer.quantizers():
                self.saved.append((q, q.enabled))
                q.enabled = False
        products = getattr(self.model, "bitalloc_products", None)  # activation x activation products
        if products is not None:
            self.saved.append((products, products.enabled))
            products.enabled = False
        return self.model

    def __exit__(self, *exc: Any) -> None:
        for q, enabled in self.saved:
            q.enabled = enabled
        self.saved.clear()


def parameter_overhead(model: nn.Module) -> dict[str, Any]:
    """Parameters the quantizers add to a model, by parameter name, next to the model's own.

    Returns ``{"model": n, "quantizers": {name: count}, "quantizers_total": m}``; e.g. Bayesian Bits on LeNet-5:
    582,026 model parameters, ``{"log_alpha": 28, "log_alpha_prune": 608, "clip_max": 8}`` (the 636 gates the
    Bayesian Bits rebuttal counts: 4 per quantized tensor and one z2 per output channel; and one learned range
    per tensor); LSQ: its
    ``step`` sizes; PACT: its ``alpha`` clip levels."""
    counts: dict[str, int] = {}
    own = 0
    for name, p in model.named_parameters():
        parts = name.split(".")
        if any(part.endswith("quantizer") for part in parts[:-1]):
            counts[parts[-1]] = counts.get(parts[-1], 0) + p.numel()
        else:
            own += p.numel()
    return {"model": own, "quantizers": counts, "quantizers_total": sum(counts.values())}
