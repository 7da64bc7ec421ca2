"""The post-training (PTQ) quantizer: ranges and bit widths fixed from statistics, not learned.

Offline mode: statistics of calibration data (activations) or of the tensor itself (weights) give, once,
(1) per-channel bit widths when allocation is on (ACIQ eq. 10-11), (2) the clip range from the configured
range estimator (min-max, ACIQ, KLD, k-sigma, percentile, MSE search), (3) the grid (scale, zero point).
Online mode: the same three steps run on every input at run time, per sample (and per channel), so results
do not depend on how inputs are batched. The statistics of a row are those of its values within one sample
(per channel: of one channel of one sample), so a row needs at least 2 values: an input with a single value
per sample and channel (the (N, C) input of a Linear layer quantized per channel, or a (N, 1) input per tensor)
would get the range [x, x], which represents x exactly, i.e. no quantization at all. Such inputs raise a
ConfigError (``prepare`` checks the traced input shapes, :meth:`FixedQuantizer.check_online_input`) instead of
silently staying in float; pooling the batch instead would make results depend on the batch and still leave
batch size 1 unquantized.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bitalloc.config import TensorConfig
from bitalloc.errors import ConfigError
from bitalloc.quant.allocation import allocate_channel_bits, allocate_channel_bits_batched
from bitalloc.quant.bias_correction import bias_correct
from bitalloc.quant.grid import fake_quantize, integer_range, qparams_from_range, reshape_for_axis
from bitalloc.quant.ranges import RANGE_ESTIMATORS, estimate_range
from bitalloc.quant.stats import ChannelStats
from bitalloc.quantizers.base import QuantParams, Quantizer

#: range methods that need the distribution itself (a subsample), not only moments
SAMPLE_METHODS = {"percentile", "mse", "kld"}


def grid_shapes(cfg: TensorConfig, role: str, channels: int | None,
                shape: tuple[int, ...] | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(bits shape, scale / zero-point shape) of a grid: 0-d per tensor (and per token), [C] per channel, [C] and
    [C, K / group_size] for a group-wise weight of ``shape`` [C, K]; ConfigError (with the fix) for group-wise
    activations, weights that are not 2-d, and group sizes that do not divide K."""
    if cfg.granularity != "group":
        bits_shape = (channels,) if cfg.granularity == "channel" else ()
        return bits_shape, bits_shape
    if role != "weight":
        raise ConfigError("granularity='group' applies to weights (ranges per block of input features), not to "
                          "activations: use 'tensor', 'channel' or 'token' for them")
    fix = 'override {"weight.granularity": "channel"} for this layer (CLI --override \'NAME={...}\')'
    if shape is None or len(shape) != 2 or shape[0] != channels:
        raise ConfigError(f"granularity='group' needs a 2-d [out, in] weight (Linear layers), got shape "
                          f"{None if shape is None else tuple(shape)}; {fix}")
    if shape[1] % cfg.group_size:
        raise ConfigError(f"group_size {cfg.group_size} does not divide the weight's {shape[1]} input features: choose "
                          f"a divisor of {shape[1]} (CLI --group-size), or {fix}")
    return (channels,), (channels, shape[1] // cfg.group_size)


class FixedQuantizer(Quantizer):
    """PTQ quantizer of one tensor, configured by a :class:`~bitalloc.config.TensorConfig`.

    Buffers (saved in ``state_dict``): ``bits``, ``scale``, ``zero_point`` (0-d per tensor, [C] per channel;
    group-wise weights: ``bits`` [C], ``scale`` / ``zero_point`` [C, K / group_size]), ``corr_scale`` /
    ``corr_shift`` ([C], weights only: bias correction) and ``calibrated``. ``shape``: the weight's shape, which
    group-wise weights need (2-d: Linear layers).
    """

    kind = "fixed"

    def __init__(self, cfg: TensorConfig, role: str, axis: int, channels: int, shape: tuple[int, ...] | None = None):
        super().__init__(role, axis, channels)
        cfg.validate(role)
        if cfg.method not in RANGE_ESTIMATORS:
            raise ConfigError(f"unknown range method {cfg.method!r}; choose one of {sorted(RANGE_ESTIMATORS)}")
        self.cfg = cfg
        self.per_channel = cfg.granularity == "channel"
        self.per_token = cfg.granularity == "token"  # online only (TensorConfig.validate)
        if self.per_token and role != "act":
            raise ConfigError("granularity='token' applies to activations (one range per token), not to weights")
        self.per_group = cfg.granularity == "group"
        bits_shape, grid_shape = grid_shapes(cfg, role, channels, shape)
        self.register_buffer("bits", torch.full(bits_shape, cfg.int_bits, dtype=torch.int64))
        self.register_buffer("scale", torch.ones(grid_shape))
        self.register_buffer("zero_point", torch.zeros(grid_shape, dtype=torch.int64))
        self.register_buffer("calibrated", torch.tensor(False))
        #: a locked grid is kept by later (re)calibration: set after GPTQ rounded the weight onto it
        self.register_buffer("locked", torch.tensor(False))
        if role == "weight":
            self.register_buffer("corr_scale", torch.ones(channels))
            self.register_buffer("corr_shift", torch.zeros(channels))
        else:
            self.corr_scale = self.corr_shift = None
        self.observer = None
        self.input_sample = None  # calibration inputs kept for clip_check="output"
        self._cache: tuple | None = None
        self._last_online: QuantParams | None = None

    # ---- calibration ------------------------------------------------------------------------------
    @property
    def online(self) -> bool:
        return bool(self.cfg.online) and self.role == "act"

    @property
    def is_ready(self) -> bool:
        return self.online or bool(self.calibrated)

    @property
    def stat_axis(self) -> int | None:
        return self.axis if self.per_channel or self.per_group else None

    def _stat_rows(self, weight: Tensor) -> Tensor:
        """The weight as the rows its statistics are taken over: [C * G, group_size] group-wise, else itself."""
        return weight.reshape(-1, self.cfg.group_size) if self.per_group else weight

    def start_observing(self, seed: int = 0, name: str = "") -> None:
        from bitalloc.calibration.clip_check import InputSample
        from bitalloc.calibration.observer import Observer

        self.observer = Observer(self.stat_axis, seed=seed, name=name)
        check = self.cfg.clip_check == "output" and self.role == "act"
        self.input_sample = InputSample(linear=self.axis == -1) if check else None

    def finish_observing(self) -> ChannelStats | None:
        """Set bits and ranges from what the observer saw (raises DataError if it saw nothing); returns the
        statistics used (None when nothing was observing)."""
        obs, self.observer = self.observer, None
        if obs is None:
            return None
        obs.merge_distributed()
        stats = obs.stats()
        self.set_from_stats(stats)
        return stats

    def lock(self) -> None:
        """Keep the current grid and corrections through later calls of :meth:`calibrate_weight`."""
        self.locked.fill_(True)

    def calibrate_weight(self, weight: Tensor) -> None:
        """Weights need no data: their statistics are exact. A locked quantizer keeps its grid."""
        if bool(self.locked):
            return
        self.set_from_stats(ChannelStats.of(self._stat_rows(weight.detach()), self.stat_axis))

    def _one_sided(self, stats: ChannelStats) -> Tensor:
        if self.cfg.one_sided == "auto":
            return stats.one_sided
        return torch.full((stats.channels,), bool(self.cfg.one_sided))

    def _prior(self) -> str:
        prior = self.cfg.options.get("prior", "laplace")
        return prior if prior in ("laplace", "gauss") else "laplace"

    def _allocation_statistic(self, stats: ChannelStats, one_sided: Tensor) -> Tensor:
        """The per-channel range statistic a_i of ACIQ eq. 11: ``options["allocation_statistic"]`` is "std"
        (default; the reference code), "range" (half the observed range: the error scale of an unclipped grid)
        or "scale" (the ACIQ prior's b or sigma)."""
        kind = self.cfg.options.get("allocation_statistic", "std")
        if kind == "std":
            return stats.std
        if kind == "range":
            return torch.where(one_sided, stats.max.clamp(min=0), (stats.max - stats.min) / 2)
        if kind == "scale":
            return stats.scale_statistic(self._prior(), one_sided)
        raise ConfigError(f"allocation_statistic={kind!r} must be 'std', 'range' or 'scale'")

    def _row_bits(self, stats: ChannelStats, one_sided: Tensor) -> Tensor:
        cfg = self.cfg
        if not cfg.allocate:
            return torch.full((stats.channels,), cfg.int_bits, dtype=torch.int64)
        return allocate_channel_bits(self._allocation_statistic(stats, one_sided).float(), float(cfg.bits),
                                     min_bits=cfg.min_bits, max_bits=cfg.max_bits, method=cfg.allocation,
                                     prior=self._prior(), one_sided=bool(one_sided.all()))

    def _online_bits(self, stats: ChannelStats, n: int, c: int) -> Tensor:
        """Per-sample allocation for rows ordered (sample, channel): one allocation per sample."""
        cfg = self.cfg
        if cfg.allocation != "optimal":
            per_sample = [ChannelStats.from_rows(stats.samples[i * c:(i + 1) * c], keep_samples=False)
                          for i in range(n)]
            return torch.cat([self._row_bits(s, self._one_sided(s)) for s in per_sample])
        one_sided = self._one_sided(stats)
        statistic = self._allocation_statistic(stats, one_sided).reshape(n, c)
        sample_one_sided = one_sided.reshape(n, c).all(dim=1)  # as _row_bits decides it for one sample
        bits = torch.empty(n, c, dtype=torch.int64)
        for flag in (False, True):
            sel = sample_one_sided == flag
            if bool(sel.any()):
                bits[sel] = allocate_channel_bits_batched(statistic[sel], float(cfg.bits), min_bits=cfg.min_bits,
                                                          max_bits=cfg.max_bits, prior=self._prior(), one_sided=flag)
        return bits.reshape(-1)

    def _grid(self, stats: ChannelStats, bits: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        one_sided = self._one_sided(stats)
        if bits is None:
            bits = self._row_bits(stats, one_sided)
        options = {k: v for k, v in self.cfg.options.items() if k != "allocation_statistic"}
        lo, hi = estimate_range(self.cfg.method, stats, bits, symmetric=self.cfg.symmetric, one_sided=one_sided, **options)
        scale, zero_point, _, _ = qparams_from_range(lo, hi, bits, symmetric=self.cfg.symmetric)
        return bits, scale, zero_point

    @torch.no_grad()
    def set_from_stats(self, stats: ChannelStats) -> None:
        if self.cfg.method in SAMPLE_METHODS and stats.samples is None:
            raise ConfigError(f"range method {self.cfg.method!r} needs samples of the tensor")
        bits, scale, zero_point = self._grid(stats)
        shape = self.scale.shape
        self.bits.copy_(bits.reshape(shape)[:, 0] if self.per_group else bits.reshape(shape))  # one width per row
        self.scale.copy_(scale.reshape(shape))
        self.zero_point.copy_(zero_point.reshape(shape))
        self.calibrated.fill_(True)
        self._cache = None

    @torch.no_grad()
    def check_clipping(self, layer: torch.nn.Module, stats: ChannelStats) -> dict | None:
        """``clip_check="output"``: keep the configured range or replace it by the candidate of least layer-output
        error on the kept calibration inputs (:mod:`bitalloc.calibration.clip_check`); the bit widths stay.
        Returns {"configured", "chosen", "errors": {label: sum of squared output errors}} (None without inputs)."""
        from bitalloc.calibration.clip_check import candidates, choose, output_errors

        sample, self.input_sample = getattr(self, "input_sample", None), None
        x = sample.tensor() if sample is not None else None
        if x is None:
            return None
        one_sided = self._one_sided(stats)
        bits = self.bits.reshape(-1).expand(stats.channels)
        cands = candidates(self.cfg.method, self.cfg.options)
        grids = []
        for _, method, opts in cands:
            lo, hi = estimate_range(method, stats, bits, symmetric=self.cfg.symmetric, one_sided=one_sided, **opts)
            scale, zp, qmin, qmax = qparams_from_range(lo, hi, bits, symmetric=self.cfg.symmetric)
            shape = self.scale.shape
            grids.append((scale.reshape(shape).float(), zp.reshape(shape), qmin.reshape(shape), qmax.reshape(shape)))
        labels = [c[0] for c in cands]
        errors = output_errors(layer, x, grids, self.axis if self.per_channel else None)
        best = choose(labels, errors)
        self.scale.copy_(grids[best][0])
        self.zero_point.copy_(grids[best][1])
        self._cache = None
        return {"configured": labels[0], "chosen": labels[best], "errors": dict(zip(labels, errors))}

    @torch.no_grad()
    def set_bias_correction(self, weight: Tensor, mode: str) -> None:
        """ACIQ bias correction (eq. 12-13) of this weight quantizer: "none", "mean" or "mean+norm"."""
        if self.role != "weight":
            raise ConfigError("bias correction applies to weight quantizers only")
        if bool(self.locked):
            return
        self.corr_scale.fill_(1.0)
        self.corr_shift.fill_(0.0)
        self._cache = None
        if mode == "none":
            return
        p = self.qparams()
        w_q = p.dequantize(p.quantize(weight.detach()))
        _, xi, beta = bias_correct(weight.detach(), w_q, axis=self.axis, norm=(mode == "mean+norm"))
        self.corr_scale.copy_(xi.float())
        self.corr_shift.copy_(beta.float())
        self._cache = None

    # ---- forward --------------------------------------------------------------------------------------
    def _signed(self) -> bool:
        return bool(self.cfg.symmetric)

    def qparams(self) -> QuantParams:
        if self.online and self._last_online is not None:
            return self._last_online
        qmin, qmax = integer_range(self.bits, signed=self._signed())
        return QuantParams(bits=self.bits, scale=self.scale, zero_point=self.zero_point, qmin=qmin, qmax=qmax,
                           axis=self.axis, signed=self._signed(), corr_scale=self.corr_scale,
                           corr_shift=self.corr_shift, online=self.online)

    def bits_per_channel(self) -> Tensor:
        if self.cfg.allocate and (self.online or not bool(self.calibrated)):  # the budget until allocated
            return torch.full((self.channels,), float(self.cfg.bits), dtype=torch.float64)
        return self.bits.to(torch.float64).reshape(-1)

    def quantize_forward(self, x: Tensor) -> Tensor:
        if self.observer is not None:  # calibration pass: observe, stay in float
            self.observer.update(x)
            if getattr(self, "input_sample", None) is not None:
                self.input_sample.add(x)
            return x
        if self.online:
            return self._online_forward(x)
        if not self.calibrated:
            raise ConfigError(f"{self.role} quantizer used before calibration: run the model inside "
                              "`with bitalloc.calibration(model):` on calibration data first (or set online=True)")
        cacheable = self.role == "weight" and not (torch.is_grad_enabled() and x.requires_grad)
        if cacheable:
            key = (id(x), x._version, x.dtype, self.scale._version, self.bits._version, self.zero_point._version,
                   self.corr_scale._version, self.corr_shift._version)
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        p = self.qparams()
        y = fake_quantize(x, p.scale, p.zero_point, p.qmin, p.qmax,
                          self.axis if self.per_channel or self.per_group else None)
        if self.role == "weight":
            y = y * reshape_for_axis(self.corr_scale, y.ndim, self.axis) + reshape_for_axis(self.corr_shift, y.ndim, self.axis)
        if cacheable:
            self._cache = (key, y)
        return y

    def check_online_input(self, shape: tuple[int, ...] | torch.Size, where: str = "") -> None:
        """Raise ConfigError when online statistics of an input of this ``shape`` (batch first) would see fewer
        than 2 values per row (per sample, and per channel when per-channel): see the module docstring."""
        if not self.online:
            return
        shape = tuple(int(d) for d in shape)
        numel = math.prod(shape)
        n = shape[0] if shape else 1
        c = shape[self.axis] if self.per_channel and len(shape) > 1 else 1
        if self.per_token:  # one row per position: the channels of one token
            n, c = 1, numel // max(shape[self.axis] if len(shape) > 1 else 1, 1)
        per_row = numel // max(n * c, 1)
        if per_row >= 2 or numel == 0:
            return
        loc = f"{where}: " if where else ""
        if self.per_token:
            unit, fix = "token", "quantize this input per tensor (act granularity 'tensor')"
        elif self.per_channel:
            unit, fix = "sample and channel", ("quantize this input per tensor (override {\"act.granularity\": "
                                               "\"tensor\", \"act.allocate\": false}; CLI --override "
                                               "'NAME={...}') or calibrate offline (online=False, no --online)")
        else:
            unit, fix = "sample", "calibrate offline (online=False, no --online) or leave this input in float ({\"act\": null})"
        raise ConfigError(f"{loc}online statistics are computed per {unit}, but the input of shape {shape} has "
                          f"{per_row} value per {unit}: its range [x, x] would represent x exactly (no "
                          f"quantization); {fix}")

    def _online_forward(self, x: Tensor) -> Tensor:
        """Per-sample (per-channel, or per-token) statistics, bits, ranges and fake quantization of this input."""
        self.check_online_input(x.shape, f"online {self.role} quantizer")
        n = x.shape[0]
        if self.per_token:  # rows = positions (tokens), each over its channels
            moved = x.movedim(self.axis % x.ndim, -1)
            rows = moved.reshape(-1, moved.shape[-1])
        elif self.per_channel:
            c = x.shape[self.axis]
            rows = x.movedim(self.axis % x.ndim, 1).reshape(n * c, -1)
        else:
            rows = x.reshape(n, -1)
        with torch.no_grad():
            stats = ChannelStats.from_rows(rows, keep_samples=True, dtype=torch.float32)
            bits = None
            if self.per_channel and self.cfg.allocate:  # allocate among the channels of each sample
                bits = self._online_bits(stats, n, c)
            bits, scale, zp = self._grid(stats, bits)
            qmin, qmax = integer_range(bits, signed=self._signed())
        y = fake_quantize(rows, scale, zp, qmin, qmax, axis=0)
        self._last_online = QuantParams(bits=bits, scale=scale, zero_point=zp, qmin=qmin, qmax=qmax, axis=self.axis,
                                        signed=self._signed(), online=True)
        if self.per_token:
            return y.reshape(moved.shape).movedim(-1, self.axis % x.ndim)
        if self.per_channel:
            moved = list(x.movedim(self.axis % x.ndim, 1).shape)
            return y.reshape(moved).movedim(1, self.axis % x.ndim)
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        c = self.cfg
        mode = "online" if self.online else ("calibrated" if bool(self.calibrated) else "uncalibrated")
        alloc = f", allocated avg {c.bits}" if c.allocate else ""
        return f"{self.role}, {c.method}, {c.granularity}, bits={c.bits}{alloc}, {'sym' if c.symmetric else 'affine'}, {mode}"
