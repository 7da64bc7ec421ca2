"""PACT quantizer (Choi et al. 2018): a learned clip level ``alpha`` per tensor (or per channel).

Forward and gradients: :func:`bitalloc.quant.pact.pact_quantize` (paper eq. 1-3; signed extension for weights
and signed activations: codes ``-(2^(k-1) - 1) .. 2^(k-1) - 1``, step ``alpha / (2^(k-1) - 1)``, i.e. exactly
``clip(x, -alpha, alpha)``; see :mod:`bitalloc.quant.pact` for why weights use PACT rather than the paper's
DoReFa). The L2 decay on ``alpha`` is added by the training objective
(:mod:`bitalloc.train.methods`, ``--pact-decay``).

Initial ``alpha`` (``TensorConfig.options["init"]``): "max" (default: the largest |value| of the weight, or of
the initialisation batch for activations, as the Bayesian Bits reference code initialises its PACT
quantizers), or a number (the PACT paper initialises activation clip levels to a constant, e.g. 10).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bitalloc.config import TensorConfig
from bitalloc.errors import ConfigError
from bitalloc.quant.grid import MIN_SCALE
from bitalloc.quant.pact import pact_quantize, pact_range, pact_step
from bitalloc.quantizers.base import QuantParams
from bitalloc.quantizers.lsq import DataStats, LearnedQuantizer


class PACTQuantizer(LearnedQuantizer):
    """PACT quantizer of one tensor: parameter ``alpha`` (0-d, or [C] per channel)."""

    kind = "pact"

    def __init__(self, cfg: TensorConfig, role: str, axis: int | None, channels: int | None):
        if cfg.allocate or float(cfg.bits) != int(cfg.bits):
            raise ConfigError("PACT needs an integer bit width (no per-channel allocation)")
        super().__init__(cfg, role, axis, channels)
        self.bits = cfg.int_bits
        init = cfg.options.get("init", "max")
        if not (init == "max" or isinstance(init, (int, float))):
            raise ConfigError(f"PACT init={init!r} must be 'max' or a number")
        self.init = init
        self.alpha = nn.Parameter(torch.ones((channels,) if self.per_channel else ()))

    def _init_from_stats(self, stats: DataStats) -> None:
        if self.init == "max":
            a = stats.abs_max() if self.is_signed else stats.max.clamp_min(0.0)
        else:
            a = torch.full_like(stats.max, float(self.init))
        a = torch.clamp(a, min=MIN_SCALE).to(torch.float32)
        self.alpha.copy_(a.reshape(self.alpha.shape) if a.numel() == self.alpha.numel() else a.max().expand_as(self.alpha))

    def clamp_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.clamp_(min=MIN_SCALE)

    def _quantize(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and (x.requires_grad or self.alpha.requires_grad)):
            return self._fake_quantize_frozen(x)
        a = torch.clamp(self.alpha, min=MIN_SCALE)
        return pact_quantize(x, a, self.bits, signed=self.is_signed, axis=self.axis if self.per_channel else None)

    def qparams(self) -> QuantParams:
        shape = self.alpha.shape
        signed = self.is_signed
        bits = torch.full(shape, self.bits, dtype=torch.int64, device=self.alpha.device)
        lo, hi = pact_range(self.bits, signed)  # signed: symmetric codes, the top code is exactly alpha
        qmin, qmax = torch.full_like(bits, lo), torch.full_like(bits, hi)
        scale = pact_step(torch.clamp(self.alpha.detach(), min=MIN_SCALE), self.bits, signed)
        return QuantParams(bits=bits, scale=scale, zero_point=torch.zeros_like(bits), qmin=qmin, qmax=qmax,
                           axis=self.axis, signed=signed)


__all__ = ["PACTQuantizer"]
