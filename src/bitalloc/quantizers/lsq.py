"""Learned-parameter quantizers: the shared initialise-once protocol, and LSQ (Esser et al., ICLR 2020).

:class:`LearnedQuantizer` is the base of LSQ, PACT and Bayesian Bits quantizers. Their parameters (step
sizes, clip levels, ranges, gates) are ``nn.Parameter`` s trained with the network; they are *initialised
once* from data:

* weights: from the weight itself when the layer is prepared (``calibrate_weight``, called by
  :func:`bitalloc.prepare` on the BN-folded weight);
* activations: from the calibration context (``with bitalloc.calibration(model): ...``, via
  ``start_observing`` / ``finish_observing``) or, when training starts without calibration, from the first
  batch that reaches the quantizer (as the Bayesian Bits reference code does).

Under ``torch.distributed`` the statistics of all ranks are combined before initialising (sums and counts
summed, extremes maxed/minned), so every rank gets identical parameters and a 2-process run initialises
exactly like a 1-process run with the same global batch. Once initialised (buffer ``initialized``, saved in
checkpoints), a quantizer is never re-initialised by calibration or ``calibrate_weight``: learned values
survive a later calibration pass; :meth:`LearnedQuantizer.reset` re-arms initialisation.

Signedness: weights are signed (symmetric grids, zero point 0). Activations are unsigned when
``TensorConfig.one_sided`` is True, signed when it is False or ``symmetric`` is True, and with "auto" (the
default) unsigned iff the initialisation data has no negative value (e.g. after a ReLU).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bitalloc.config import TensorConfig
from bitalloc.errors import ConfigError, DataError
from bitalloc.quant.grid import MIN_SCALE, fake_quantize, integer_range, reshape_for_axis
from bitalloc.quant.lsq import lsq_bounds, lsq_grad_scale, lsq_init_step, lsq_quantize
from bitalloc.quantizers.base import QuantParams, Quantizer


def _rows(x: Tensor, axis: int | None) -> Tensor:
    """[C, -1] view along ``axis`` (per channel) or [1, -1] (per tensor), detached, float64."""
    x = x.detach().to(torch.float64)
    if axis is None:
        return x.reshape(1, -1)
    ax = axis % x.ndim
    return x.movedim(ax, 0).reshape(x.shape[ax], -1)


class DataStats:
    """Running statistics for initialisation: sum |x|, count, min, max, max |x| (per row), mergeable across
    ranks with :meth:`reduce`."""

    def __init__(self) -> None:
        self.abs_sum: Tensor | None = None
        self.count: Tensor | None = None
        self.min: Tensor | None = None
        self.max: Tensor | None = None

    def update(self, x: Tensor, axis: int | None) -> "DataStats":
        r = _rows(x, axis)
        abs_sum = r.abs().sum(1)
        count = torch.full((r.shape[0],), float(r.shape[1]), dtype=torch.float64, device=r.device)
        mn, mx = r.min(1).values, r.max(1).values
        if self.abs_sum is None:
            self.abs_sum, self.count, self.min, self.max = abs_sum, count, mn, mx
        else:
            self.abs_sum = self.abs_sum + abs_sum
            self.count = self.count + count
            self.min = torch.minimum(self.min, mn)
            self.max = torch.maximum(self.max, mx)
        return self

    @property
    def seen(self) -> bool:
        return self.count is not None

    def reduce(self, rows: int) -> "DataStats":
        """Combine the statistics of every rank (a no-op in one process). Ranks that saw nothing contribute
        zeros and +-inf, so every rank calls the same collectives."""
        from bitalloc.train import distributed as D

        if not D.is_distributed():
            return self
        if self.abs_sum is None:
            self.abs_sum = torch.zeros(rows, dtype=torch.float64)
            self.count = torch.zeros(rows, dtype=torch.float64)
            self.min = torch.full((rows,), math.inf, dtype=torch.float64)
            self.max = torch.full((rows,), -math.inf, dtype=torch.float64)
        D.all_reduce_tensors(self.abs_sum, self.count, op="sum")
        D.all_reduce_tensors(self.max, op="max")
        D.all_reduce_tensors(self.min, op="min")
        if float(self.count.sum()) == 0:
            self.abs_sum = self.count = self.min = self.max = None
        return self

    def mean_abs(self) -> Tensor:
        return self.abs_sum / self.count.clamp_min(1.0)

    def abs_max(self) -> Tensor:
        return torch.maximum(self.max.abs(), self.min.abs())


class LearnedQuantizer(Quantizer):
    """Base of quantizers with learned parameters (see the module docstring for the initialisation protocol).

    Subclasses implement ``_init_from_stats(stats)``, ``_quantize(x)`` and ``qparams()``; they list their
    learned parameters in ``quant_parameters()`` (name -> parameter) for the optimizer groups.
    """

    def __init__(self, cfg: TensorConfig, role: str, axis: int | None, channels: int | None):
        super().__init__(role, axis, channels)
        cfg.validate(role)
        self.cfg = cfg
        self.per_channel = cfg.granularity == "channel"
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed", torch.tensor(self._forced_sign() if self._forced_sign() is not None else True))
        self._observing: DataStats | None = None

    # -- signedness ---------------------------------------------------------------------------------
    def _forced_sign(self) -> bool | None:
        if self.role == "weight" or self.cfg.symmetric or self.cfg.one_sided is False:
            return True
        if self.cfg.one_sided is True:
            return False
        return None

    def _decide_sign(self, stats: DataStats) -> bool:
        forced = self._forced_sign()
        return forced if forced is not None else bool(float(stats.min.min()) < 0.0)

    @property
    def is_signed(self) -> bool:
        return bool(self.signed)

    @property
    def stat_axis(self) -> int | None:
        return self.axis if self.per_channel else None

    @property
    def is_ready(self) -> bool:
        return bool(self.initialized)

    # -- initialisation protocol -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the initialisation: the next weight calibration / data batch initialises again."""
        self.initialized.fill_(False)

    def start_observing(self, seed: int = 0, name: str = "") -> None:
        """Calibration context: collect statistics of the float inputs (the quantizer stays the identity)."""
        self._observing = DataStats()

    def finish_observing(self) -> None:
        """Initialise from the observed statistics (combined across ranks), unless already initialised."""
        obs, self._observing = self._observing, None
        if obs is None:
            return
        obs.reduce(self.channels if self.per_channel else 1)
        if bool(self.initialized):
            return
        if not obs.seen:
            raise DataError(f"{self.role} quantizer ({self.kind}) saw no calibration data; run calibration batches "
                            "through the model inside the calibration context")
        self._initialize(obs)

    @torch.no_grad()
    def _initialize(self, stats: DataStats) -> None:
        self.signed.fill_(self._decide_sign(stats))
        self._init_from_stats(stats)
        self.initialized.fill_(True)

    @torch.no_grad()
    def calibrate_weight(self, weight: Tensor) -> None:
        """Initialise a weight quantizer from the weight (once; exact statistics, identical on every rank)."""
        if self.role != "weight" or bool(self.initialized):
            return
        self._initialize(DataStats().update(weight, self.stat_axis))

    def set_bias_correction(self, weight: Tensor, mode: str) -> None:
        if mode != "none":
            raise ConfigError(f"bias correction {mode!r} applies to PTQ ('fixed') quantizers only; learned "
                              f"quantizers ({self.kind}) train the weights instead: use bias_correction='none'")

    def _init_from_stats(self, stats: DataStats) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _quantize(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def quant_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters(recurse=False)}

    def clamp_parameters(self) -> None:
        """Keep learned step sizes / ranges positive (called after each optimizer step)."""

    # -- forward ------------------------------------------------------------------------------------
    def quantize_forward(self, x: Tensor) -> Tensor:
        if self._observing is not None:  # calibration pass: observe, stay in float
            self._observing.update(x, self.stat_axis)
            return x
        if not bool(self.initialized):
            if self.role == "weight":
                self.calibrate_weight(x)
            else:  # the first batch initialises (combined across ranks: every rank runs this forward)
                self._initialize(DataStats().update(x, self.stat_axis).reduce(self.channels if self.per_channel else 1))
        return self._quantize(x)

    def _fake_quantize_frozen(self, x: Tensor) -> Tensor:
        """The test-time function, exactly as a FrozenQuantizer with :meth:`qparams` computes it."""
        p = self.qparams()
        y = fake_quantize(x, p.scale, p.zero_point, p.qmin, p.qmax, self.axis if p.per_channel else None)
        if p.kept is not None:
            y = y * reshape_for_axis(p.kept.to(y.dtype), y.ndim, self.axis)
        return y

    def extra_repr(self) -> str:
        state = "initialised" if bool(self.initialized) else "uninitialised"
        sign = "signed" if self.is_signed else "unsigned"
        return f"{self.role}, {self.kind}, bits={self.cfg.bits}, {self.cfg.granularity}, {sign}, {state}"


class LSQQuantizer(LearnedQuantizer):
    """LSQ quantizer (Esser et al. 2020) of one tensor: learned step ``step`` (0-d, or [C] per channel).

    Forward: :func:`bitalloc.quant.lsq.lsq_quantize` with the gradient scale ``1 / sqrt(N * Q_P)``, ``N`` the
    number of elements sharing a step (weights: the whole tensor, or one output channel; activations: the
    features of one sample, or of one channel of one sample). Initial step ``2 mean|v| / sqrt(Q_P)`` over the
    weight, or over the initialisation batch(es) for activations.
    """

    kind = "lsq"

    def __init__(self, cfg: TensorConfig, role: str, axis: int | None, channels: int | None):
        if cfg.allocate or float(cfg.bits) != int(cfg.bits):
            raise ConfigError("LSQ needs an integer bit width (no per-channel allocation)")
        super().__init__(cfg, role, axis, channels)
        self.bits = cfg.int_bits
        lsq_bounds(self.bits, True if role == "weight" else False)  # validates the width
        self.step = nn.Parameter(torch.ones((channels,) if self.per_channel else ()))

    @property
    def bounds(self) -> tuple[int, int]:
        return lsq_bounds(self.bits, self.is_signed)

    def _init_from_stats(self, stats: DataStats) -> None:
        _, q_p = self.bounds
        s = 2.0 * stats.mean_abs() / math.sqrt(q_p)
        s = torch.clamp(s, min=MIN_SCALE).to(torch.float32)
        self.step.copy_(s.reshape(self.step.shape))

    @torch.no_grad()
    def calibrate_weight(self, weight: Tensor) -> None:
        if self.role != "weight" or bool(self.initialized):
            return
        self.signed.fill_(True)
        _, q_p = self.bounds
        self.step.copy_(torch.clamp(lsq_init_step(weight, q_p, self.stat_axis), min=MIN_SCALE).reshape(self.step.shape))
        self.initialized.fill_(True)

    def clamp_parameters(self) -> None:
        with torch.no_grad():
            self.step.clamp_(min=MIN_SCALE)

    def _n_per_step(self, x: Tensor) -> int:
        n = x.numel()
        if self.role == "act" and x.ndim > 1:
            n //= max(x.shape[0], 1)
        if self.per_channel and self.channels:
            n //= self.channels
        return max(n, 1)

    def _quantize(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and (x.requires_grad or self.step.requires_grad)):
            return self._fake_quantize_frozen(x)
        q_n, q_p = self.bounds
        s = torch.clamp(self.step, min=MIN_SCALE)
        g = lsq_grad_scale(self._n_per_step(x), q_p)
        return lsq_quantize(x, s, q_n, q_p, g, self.axis if self.per_channel else None)

    def qparams(self) -> QuantParams:
        shape = self.step.shape
        signed = self.is_signed
        bits = torch.full(shape, self.bits, dtype=torch.int64, device=self.step.device)
        qmin, qmax = integer_range(bits, signed=signed)
        return QuantParams(bits=bits, scale=torch.clamp(self.step.detach(), min=MIN_SCALE), zero_point=torch.zeros_like(bits),
                           qmin=qmin, qmax=qmax, axis=self.axis, signed=signed)


__all__ = ["DataStats", "LearnedQuantizer", "LSQQuantizer"]
