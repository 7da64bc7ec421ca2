"""SmoothQuant: move activation outliers into the weights (Xiao et al. 2023, "SmoothQuant: Accurate and
Efficient Post-Training Quantization for Large Language Models", eq. 3-4).

A few input channels of a transformer's linear layers carry values far larger than the rest, so one activation
scale per tensor wastes most of its levels on them. For a layer y = W x with input channels j, SmoothQuant
divides each input channel by

    s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)        (max|X_j| over the calibration data)

and multiplies the weight's column j by it: y = (W diag(s)) (x / s), the same function in float, with the
activation ranges evened out (alpha = 0.5 balances the two; alpha = 1 moves everything into the weights).
Channels with max|X_j| = 0 or max|W_:j| = 0 keep s_j = 1; s_j >= 1e-5 (as the reference code).

Here the division is explicit (a layer's :meth:`~bitalloc.model.layers.QuantLayer.smooth_input`, exported to
ONNX as a Div before the QuantizeLinear), not folded into a preceding LayerNorm, so it works for any layer, e.g.
the input of a feed-forward block's second Linear (after GELU) and post-LN models (BERT), whose LayerNorm output
also feeds the residual connection. Layers opt in with ``LayerConfig.smooth = alpha`` (``preset(...,
smooth=0.5)``, CLI ``--smooth 0.5``); :func:`bitalloc.quantize` calls :func:`apply_smoothing` before calibration
(call it yourself before ``with bitalloc.calibration(model)``).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from bitalloc.batches import call_model, take_inputs
from bitalloc.errors import DataError
from bitalloc.model.layers import QuantLayer, activation_axis, float_mode, quant_layers

__all__ = ["apply_smoothing", "smooth_scales", "input_channel_absmax", "input_channel_max"]

MIN_SCALE = 1e-5


def input_channel_max(weight: Tensor, groups: int = 1) -> Tensor:
    """max_i |W_ij| per input channel j of a Linear ([out, in]) or convolution ([out, in / groups, k...]) weight,
    over the output channels connected to j (those of its group) and the kernel positions."""
    w = weight.detach().abs()
    out, cin_g = w.shape[0], w.shape[1]
    per = w.reshape(groups, out // groups, cin_g, -1).amax(dim=(1, 3))  # [groups, in / groups]
    return per.reshape(-1)


def smooth_scales(act_max: Tensor, weight_max: Tensor, alpha: float) -> Tensor:
    """s_j = act_max_j^alpha / weight_max_j^(1 - alpha) (module docstring), float64, 1 where either max is 0."""
    a, w = act_max.to(torch.float64), weight_max.to(torch.float64)
    s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=MIN_SCALE)
    return torch.where((a > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s))


def _scale_columns(layer: nn.Module, s: Tensor) -> None:
    """weight[:, j] *= s_j in place (per group for grouped convolutions)."""
    w = layer.weight
    groups = getattr(layer, "groups", 1) if not isinstance(layer, nn.Linear) else 1
    out, cin_g = w.shape[0], w.shape[1]
    view = w.data.view(groups, out // groups, cin_g, -1)
    view.mul_(s.to(w.dtype).reshape(groups, 1, cin_g, 1))


@torch.no_grad()
def apply_smoothing(model: nn.Module, data: Iterable, num_samples: int | None = 32) -> dict[str, dict[str, Any]]:
    """Compute every smoothing layer's scales from up to ``num_samples`` inputs of ``data`` (one float pass) and
    apply them (module docstring). Idempotent: a layer smoothed before is first restored to W. Returns per layer
    {"alpha", "scale_min", "scale_max", "act_max_before", "act_max_after"} (the largest |input| before and
    after the division). A model without smoothing layers is left alone ({})."""
    layers = [(n, l) for n, l in quant_layers(model) if getattr(l, "smooth_scale", None) is not None]
    if not layers:
        return {}
    amax = input_channel_absmax(model, layers, data, num_samples)
    report: dict[str, dict[str, Any]] = {}
    for name, layer in layers:
        if name not in amax:
            raise DataError(f"layer {name!r} did not run on the calibration data, so its SmoothQuant scales cannot "
                            "be computed; calibrate on data that reaches it, or set smooth to null for it")
        inner, old = layer.layer, layer.smooth_scale.detach().to(torch.float64)
        groups = getattr(inner, "groups", 1) if not isinstance(inner, nn.Linear) else 1
        _scale_columns(inner, 1.0 / old)  # back to W
        s = smooth_scales(amax[name], input_channel_max(inner.weight, groups), float(layer.smooth_alpha))
        _scale_columns(inner, s)
        layer.smooth_scale.copy_(s.to(layer.smooth_scale.dtype))
        report[name] = {"alpha": float(layer.smooth_alpha), "scale_min": float(s.min()), "scale_max": float(s.max()),
                        "act_max_before": float(amax[name].max()), "act_max_after": float((amax[name] / s).max())}
    return report


@torch.no_grad()
def input_channel_absmax(model: nn.Module, layers: list[tuple[str, QuantLayer]], data: Iterable,
                         num_samples: int | None, *, smoothed: bool = False, min_ndim: int = 1) -> dict[str, Tensor]:
    """max |x_j| per input channel j (float64) of each named layer's input over one float pass of ``model`` on up to
    ``num_samples`` inputs of ``data``; ``smoothed``: of the input as the layer's quantizer sees it (after
    SmoothQuant's division); inputs with fewer than ``min_ndim`` dimensions are skipped. Layers that did not run
    (or saw only skipped inputs) are missing from the result."""
    amax: dict[str, Tensor] = {}
    handles = []
    for name, layer in layers:
        def hook(mod: QuantLayer, args: tuple, _name: str = name) -> None:
            x = args[0].detach()
            if x.ndim < min_ndim:
                return
            if smoothed:
                x = mod.smooth_input(x)
            axis = activation_axis(mod.layer) % x.ndim
            m = x.abs().amax(dim=[d for d in range(x.ndim) if d != axis]).to(torch.float64)
            amax[_name] = m if _name not in amax else torch.maximum(amax[_name], m)
        handles.append(layer.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with float_mode(model):
            for x in take_inputs(data, num_samples):
                call_model(model, x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return amax
