"""Activation outlier channels: the check that refuses static per-tensor activation grids where they cannot serve.

The linear layers of transformers see a few input channels far larger than the rest (Dettmers et al. 2022,
"LLM.int8()", section 3; Xiao et al. 2023, "SmoothQuant", section 3). One activation scale per tensor at b bits
has the step max|x| / (2^(b-1) - 1) over all channels, so a channel whose range is 1 / r of the largest one's uses
about b - log2(r) bits of the grid. For every quantized layer whose input is a token sequence (a Linear on inputs
of 3 or more dimensions, [..., tokens, channels]) and whose activation grid is static and per tensor (granularity
"tensor", not online) at b <= 8 bits, :func:`activation_outliers` measures on the calibration data

    r = max_j max|x_j| / median_j max|x_j|        (max|x_j| over the calibration data, per input channel j)

and the layer is flagged when the median channel loses more than :data:`MAX_LOST_BITS` of the grid's bits, i.e.
r > 2^MAX_LOST_BITS = 16 (at 8 bits it keeps fewer than 4). :func:`bitalloc.quantize` then refuses the
configuration (a one-line ConfigError naming the worst layer, its ratio and the fixes: per-token scales,
SmoothQuant, or ``QuantConfig.act_outliers = "allow"`` / ``--allow-act-outliers`` to quantize anyway).

Measured on all-MiniLM-L6-v2 (32 calibration sentences): r up to 21 (the feed-forward output layers, after GELU)
and 18 (the LayerNorm-fed layers), 5 of 36 layers above 16; the static per-tensor W8A8 presets reach cosine
0.993 to FP32 there and the ``smoothquant`` preset (SmoothQuant + per-token scales) 0.9995 (BENCHMARKS.md,
"Transformers"). Convolutions and Linear layers on plain feature vectors are not checked: their channels are
not tokens' features (EfficientNet-Lite0: r <= 3.6 anyway). SmoothQuant's division is applied before measuring,
as the quantizer sees the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from bitalloc.calibration.smooth import input_channel_absmax
from bitalloc.errors import ConfigError
from bitalloc.model.layers import QuantLayer, quant_layers

__all__ = ["MAX_LOST_BITS", "OutlierReport", "activation_outliers", "check_activation_outliers", "outlier_summary"]

#: the most bits of a static per-tensor grid the median input channel may lose to the largest channel
MAX_LOST_BITS = 4


@dataclass
class OutlierReport:
    """One checked layer: its activation width, the channel ratio r and the bits its median channel keeps."""

    name: str
    bits: float
    ratio: float

    @property
    def effective_bits(self) -> float:
        return self.bits - math.log2(max(self.ratio, 1.0))

    @property
    def flagged(self) -> bool:
        return self.ratio > 2.0 ** MAX_LOST_BITS


def _checked(layer: QuantLayer) -> float | None:
    """The activation width of a layer the check applies to (static per-tensor grid at <= 8 bits), else None."""
    q = layer.input_quantizer
    cfg = getattr(q, "cfg", None)
    if not isinstance(layer.layer, nn.Linear) or cfg is None or cfg.online or cfg.granularity != "tensor":
        return None
    return float(cfg.bits) if float(cfg.bits) <= 8 else None


@torch.no_grad()
def activation_outliers(model: nn.Module, data: Iterable, num_samples: int | None = 32) -> list[OutlierReport]:
    """The channel ratio r (module docstring) of every checked layer of a prepared ``model`` that ran on token
    sequences, from one float pass over up to ``num_samples`` inputs of ``data``; worst first."""
    layers = [(n, l, b) for n, l in quant_layers(model) for b in [_checked(l)] if b is not None]
    if not layers:
        return []
    amax = input_channel_absmax(model, [(n, l) for n, l, _ in layers], data, num_samples, smoothed=True, min_ndim=3)
    out = []
    for name, _, bits in layers:
        if name in amax and amax[name].numel() > 1:
            m = amax[name]
            med = float(m.median())
            ratio = float(m.max()) / med if med > 0 else math.inf
            out.append(OutlierReport(name, bits, ratio))
    return sorted(out, key=lambda r: -r.ratio)


def check_activation_outliers(model: nn.Module, data: Iterable, num_samples: int | None = 32) -> list[OutlierReport]:
    """Refuse (ConfigError, one line) when a checked layer's median input channel would lose more than
    :data:`MAX_LOST_BITS` bits of its static per-tensor grid; returns the reports otherwise."""
    reports = activation_outliers(model, data, num_samples)
    flagged = [r for r in reports if r.flagged]
    if flagged:
        w = flagged[0]
        raise ConfigError(
            f"static per-tensor {w.bits:g}-bit activations cannot serve this model: {len(flagged)} layer(s) see "
            f"outlier input channels, worst {w.name} (largest channel {w.ratio:.0f}x the median one, which keeps "
            f"{w.effective_bits:.1f} of {w.bits:g} bits); use --preset smoothquant (SmoothQuant + per-token "
            "scales; smoothquant-gptq for 4-bit weights), or --act-granularity token --online, or "
            "--allow-act-outliers to quantize anyway (API: QuantConfig.act_outliers='allow')")
    return reports


def outlier_summary(reports: list[OutlierReport]) -> list[dict[str, Any]]:
    """JSON rows of the reports (for ``bitalloc_calibration``)."""
    return [{"name": r.name, "bits": r.bits, "ratio": r.ratio, "effective_bits": r.effective_bits,
             "flagged": r.flagged} for r in reports]
