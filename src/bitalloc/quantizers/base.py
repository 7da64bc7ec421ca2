"""The one quantizer interface, and the frozen description every downstream path reads.

A quantizer is a small ``nn.Module`` that fake-quantizes one tensor (a layer's weight or its input
activation). Whatever chooses its range and bit width (calibration for PTQ, gradients for LSQ / PACT,
stochastic gates for Bayesian Bits), it can always describe itself as a :class:`QuantParams`: bits (per
tensor or per channel), scale, zero point, code range, the channel axis, bias-correction terms and the mask
of kept (unpruned) channels. Cost accounting, freezing, export, packing and integer kernels read only that
description, so they work for every quantizer without special cases.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from bitalloc.quant.grid import dequantize, quantize, reshape_for_axis


@dataclass
class QuantParams:
    """Frozen description of how one tensor is quantized.

    Real values are ``x_hat = corr_scale * s * (q - z) + corr_shift`` with codes ``q`` in [qmin, qmax]
    (``corr_*`` are per-output-channel bias-correction terms of weights, ACIQ eq. 12-13; identity if None).
    Tensors are 0-d (per tensor) or [C] along ``axis`` (per channel); group-wise weights ([C, K]) have [C, G]
    scales and zero points, one per block of K / G columns (:func:`~bitalloc.quant.grid.group_params`).
    ``kept`` is a bool [C] mask of the
    output channels that survive pruning (None: all). ``online`` means scale and zero point are recomputed
    from each input at run time, so the values here are only those of the last input seen.
    """

    bits: Tensor
    scale: Tensor
    zero_point: Tensor
    qmin: Tensor
    qmax: Tensor
    axis: int | None
    signed: bool
    corr_scale: Tensor | None = None
    corr_shift: Tensor | None = None
    kept: Tensor | None = None
    online: bool = False

    @property
    def per_channel(self) -> bool:
        return self.axis is not None and self.scale.ndim == 1

    @property
    def grouped(self) -> bool:
        """Group-wise scales ([C, G]): several ranges per output channel."""
        return self.scale.ndim == 2

    def mean_bits(self) -> float:
        """Average bit width over channels (kept channels only when pruned)."""
        b = self.bits.to(torch.float64).reshape(-1)
        if self.kept is not None and b.numel() == self.kept.numel() and bool(self.kept.any()):
            b = b[self.kept.reshape(-1)]
        return float(b.mean())

    def quantize(self, x: Tensor) -> Tensor:
        """Integer codes of ``x`` (int64), before any bias correction."""
        return quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)

    def dequantize(self, q: Tensor) -> Tensor:
        """Real values of codes ``q``, bias correction and pruning included."""
        x = dequantize(q, self.scale, self.zero_point, self.axis)
        if self.corr_scale is not None:
            x = x * reshape_for_axis(self.corr_scale.float(), x.ndim, self.axis)
        if self.corr_shift is not None:
            x = x + reshape_for_axis(self.corr_shift.float(), x.ndim, self.axis)
        if self.kept is not None:
            x = x * reshape_for_axis(self.kept.to(x.dtype), x.ndim, self.axis)
        return x

    def detach(self) -> "QuantParams":
        def d(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().clone()

        return replace(self, bits=d(self.bits), scale=d(self.scale), zero_point=d(self.zero_point),
                       qmin=d(self.qmin), qmax=d(self.qmax), corr_scale=d(self.corr_scale),
                       corr_shift=d(self.corr_shift), kept=d(self.kept))


class Quantizer(nn.Module):
    """Base class of all quantizers. Subclasses implement :meth:`quantize_forward` and :meth:`qparams`.

    ``role`` is "weight" or "act"; ``axis`` the channel axis (None per tensor); ``channels`` the number of
    channels (per-channel granularity) or None. ``enabled = False`` makes the quantizer the identity (used
    for FP32 reference passes and float calibration passes).
    """

    #: registry name, set by subclasses (see bitalloc.quantizers.QUANTIZERS)
    kind: str = "base"

    def __init__(self, role: str, axis: int | None, channels: int | None):
        super().__init__()
        if role not in ("weight", "act"):
            raise ValueError(f"role must be 'weight' or 'act', got {role!r}")
        self.role = role
        self.axis = axis
        self.channels = channels
        self.enabled = True

    # -- interface ------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        return self.quantize_forward(x)

    def quantize_forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def qparams(self) -> QuantParams:  # pragma: no cover - abstract
        """The current frozen description (for online quantizers: that of the last input)."""
        raise NotImplementedError

    def bits_per_channel(self) -> Tensor:
        """Bit width of each channel as a float tensor ([C], or [1] per tensor); expected bits for gates."""
        return self.qparams().bits.to(torch.float64).reshape(-1)

    def kept_mask(self) -> Tensor | None:
        """Bool [C] mask of kept output channels (None when the quantizer does not prune)."""
        return None

    @property
    def is_ready(self) -> bool:
        """Whether the quantizer has the parameters it needs to quantize (calibrated / initialised)."""
        return True

    def extra_repr(self) -> str:
        return f"role={self.role}, axis={self.axis}, channels={self.channels}, enabled={self.enabled}"
