"""Region-masked multi-width LSQ: one learned LSQ step per candidate bit width, a width per image region.

The content-adaptive codec of SPEC section 3 (seed 000, rebuttal A1-A3) quantizes its layers with LSQ at K
candidate bit widths (e.g. {2, 4, 8} or {4, 8, 16}); for every frame a selector picks one width for the region
of interest (ROI) and one for the rest. :class:`RegionLSQQuantizer` (registry name ``"lsq_region"``) is that
quantizer for one tensor:

* **K steps.** One LSQ step per candidate (``[K]``, or ``[K, C]`` per channel), each initialised by the LSQ rule at
  its own width, ``s_k = 2 mean|v| / sqrt(Q_P(b_k))`` (Esser et al. 2020, section 2.1), or by the min-max rule
  ``s_k = max|v| / Q_P(b_k)`` (``options["init"] = "range"``), and trained with LSQ's gradients and gradient scale
  ``g_k = 1 / sqrt(N Q_P(b_k))`` (:mod:`bitalloc.quant.lsq`). The parameter is ``log_steps`` = ln s_k (``steps``
  is exp of it): the candidates' steps differ by up to 2^12 (4 against 16 bits), and Adam moves a parameter by
  about its learning rate per update whatever its size, so in the linear domain one learning rate that lets a
  4-bit step move throws a 16-bit step (~1e-5 of the range) about by many times its own size (measured on the
  codec: after 100 steps at lr 2e-5 the 16-bit steps had moved by a median factor of 16 and some had turned
  negative, clipping their weights to nothing). In the log domain every update is a relative change of the same
  size at every width (the log-domain scale of Brevitas' ``LOG_FP`` restriction and of TQT's log2 thresholds,
  Jain et al. 2020, section 3.3); the step's gradient is LSQ's times s_k. Candidates
  come from ``TensorConfig.options["candidates"]`` (default ``(2, 4, 8)``); ``TensorConfig.bits`` (one of them) is
  the width used outside any region context (``prepare``'s check pass, calibration, a plain ``freeze``).
* **Region context.** What a forward call needs besides the tensor (a spatial mask and the two widths) does not
  travel as a forward argument (:class:`~bitalloc.model.layers.QuantLayer` takes one input): a
  :class:`RegionContext` is set on every region quantizer of a model for the duration of a call, by
  :func:`bitalloc.model.region.region_precision`. The widths are either integers (test time: the widths the
  bitstream signals) or weight vectors over the K candidates (training: Gumbel-softmax samples, soft or
  straight-through hard, ``[K]`` or one row per sample ``[B, K]``).
* **Activations** (``role="act"``), called directly: with ROI weights ``r`` and non-ROI weights ``n``, the mask
  ``m`` at the tensor's resolution (:func:`mask_at`) and ``Q_k`` the LSQ fake quantizer at candidate k::

      x_hat = sum_k c_k * Q_k(x),   c_k = m * r_k + (1 - m) * n_k                         (per position)

  With one-hot weights (integer widths) and a boolean mask this is exactly ``Q_{b_roi}(x)`` at ROI positions
  and ``Q_{b_non_roi}(x)`` elsewhere; with soft weights, the weighted mix of the K fake-quantized tensors in
  each region. Terms whose coefficient is zero everywhere are skipped unless the weights carry a gradient.
* **Weights** have no spatial extent. Two ways to run a layer, chosen by ``RegionContext.mode``:

  - ``"split"`` (default; what "ROI and non-ROI features are computed at their chosen precision" means): the
    layer is computed once per needed candidate, weights *and* input activations both at that candidate's
    width on the whole tensor, and the outputs are combined per *output* position with the same coefficients
    ``c_k`` at the output's resolution (:func:`bitalloc.model.region.region_precision` patches each layer for
    this; the quantizer then sees a ``branch``). The computation at an ROI output position is then entirely
    at the ROI width. A real kernel would compute each region's output positions only, so the cost is the
    layer's MACs split by the ROI fraction of its output positions (:mod:`bitalloc.codec.cost`); this
    fake-quant emulation computes every needed candidate on the whole tensor (2 convolutions per layer at test
    time, K while training with soft or straight-through weights).
  - ``"mask"``: one convolution. Activations are mixed per *input* position as above; the weight is quantized at
    the larger of the two widths, ``max(b_roi, b_non_roi)`` (soft: the distribution of the maximum of the two
    independent choices, ``P(max <= k) = F_r(k) F_n(k)``). Cheaper to emulate, but an output position near the
    region border mixes widths in its receptive field, and the weights run at the higher width everywhere.

* **Description.** :meth:`qparams` describes the quantizer as one grid when the context determines one width
  (a ``branch``, equal widths, no context -> ``TensorConfig.bits``); with two widths it raises: use
  :meth:`region_qparams` (``{"roi": ..., "non_roi": ...}``), :meth:`qparams_at`, or :meth:`frozen_at` (a plain
  :class:`~bitalloc.quantizers.frozen.FrozenQuantizer` at one width, which integer execution reads). Each
  region's computation is then exactly a frozen model at its width
  (:func:`bitalloc.model.region.frozen_branches`, :func:`bitalloc.model.region.split_execution`).

**Masks at other resolutions** (:func:`mask_at`): the codec's tensors live at 1/2, 1/4, ..., 1/64 of the luma
resolution, with sizes rounded up by strided convolutions. A tensor of spatial size (h, w) covers the
reference mask's (H, W) with blocks of ``f x f`` reference pixels, f the smallest power of two with
``h f >= H`` (and the same f for w); the reference mask is padded with non-ROI up to ``(h f, w f)`` (padding is
coded as non-ROI) and block ``(i, j)`` gets the fraction ``p`` of its pixels that are ROI. Rules: ``"any"``
(default: ROI iff p > 0, i.e. max pooling: every ROI pixel is covered by ROI blocks at every resolution, and a
coarser mask contains the block-reduced finer one), ``"fraction"`` (ROI iff p >= ``min_fraction``, default 0.5:
area-preserving on average, but objects smaller than half a block vanish) or ``"soft"`` (p itself, a float
mask). A tensor larger than the mask by an integer power-of-two factor gets the nearest-upsampled mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitalloc.config import TensorConfig
from bitalloc.errors import ConfigError, ShapeError
from bitalloc.quant.grid import MIN_SCALE, fake_quantize, integer_range
from bitalloc.quant.lsq import lsq_bounds, lsq_grad_scale, lsq_init_step, lsq_quantize
from bitalloc.quantizers.base import QuantParams
from bitalloc.quantizers.frozen import FrozenQuantizer
from bitalloc.quantizers.lsq import DataStats, LearnedQuantizer, LSQQuantizer

DEFAULT_CANDIDATES = (2, 4, 8)
MASK_RULES = ("any", "fraction", "soft")
MODES = ("split", "mask")

MaskLike = Tensor | Callable[[tuple[int, int]], Tensor]


# ---- masks at any resolution --------------------------------------------------------------------------------

def _as_b1hw(mask: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        mask = torch.as_tensor(mask)
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ShapeError(f"a region mask must be [H, W], [B, H, W] or [B, 1, H, W], got shape {tuple(mask.shape)}")
    return mask


def _pow2_factor(small: int, large: int) -> int:
    """The smallest power of two f with ``small * f >= large``."""
    f = 1
    while small * f < large:
        f *= 2
    return f


def apply_rule(frac: Tensor, rule: str, min_fraction: float = 0.5) -> Tensor:
    """Block fractions -> mask: "any" (p > 0), "fraction" (p >= min_fraction) or "soft" (p)."""
    if rule == "any":
        return frac > 0
    if rule == "fraction":
        return frac >= min_fraction
    return frac


def check_rule(rule: str, min_fraction: float = 0.5) -> None:
    if rule not in MASK_RULES:
        raise ConfigError(f"mask rule {rule!r} is not one of {MASK_RULES}")
    if not 0.0 < float(min_fraction) <= 1.0:
        raise ConfigError(f"min_fraction={min_fraction} must lie in (0, 1]")


def mask_at(mask: Tensor, size: Sequence[int], *, rule: str = "any", min_fraction: float = 0.5) -> Tensor:
    """The region mask ``mask`` ([H, W], [B, H, W] or [B, 1, H, W]; bool, or float in [0, 1]) at spatial size
    ``size`` = (h, w), as [B, 1, h, w]: bool for rules "any" / "fraction", float for "soft" (module docstring).
    """
    check_rule(rule, min_fraction)
    m = _as_b1hw(mask)
    big_h, big_w = int(m.shape[-2]), int(m.shape[-1])
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ShapeError(f"cannot resample a region mask to size {(h, w)}")
    frac = m.to(torch.float32) if m.dtype == torch.bool or not m.dtype.is_floating_point else m
    if (h, w) == (big_h, big_w):
        return apply_rule(frac, rule, min_fraction)
    if h >= big_h and w >= big_w:
        if h % big_h or w % big_w or h // big_h != w // big_w or (h // big_h) & (h // big_h - 1):
            raise ShapeError(f"cannot bring a {big_h}x{big_w} region mask to {h}x{w}: not a power-of-two upsampling")
        f = h // big_h
        up = frac.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)
        return apply_rule(up, rule, min_fraction)
    fh, fw = _pow2_factor(h, big_h), _pow2_factor(w, big_w)
    if fh != fw or h > big_h or w > big_w:
        raise ShapeError(f"cannot bring a {big_h}x{big_w} region mask to {h}x{w}: the two axes need different "
                         f"scale factors ({fh}, {fw}); give the mask at the tensor's own resolution (a mask function)")
    return apply_rule(block_fraction(frac, fh, (h, w)), rule, min_fraction)


def block_fraction(mask: Tensor, factor: int, size: Sequence[int] | None = None) -> Tensor:
    """Fraction of ROI pixels in each ``factor x factor`` block of ``mask`` ([B, 1, H, W], float), the mask padded
    with non-ROI (0) up to ``size`` blocks (default ``ceil(H / factor) x ceil(W / factor)``): [B, 1, h, w]."""
    f = int(factor)
    if f < 1:
        raise ConfigError(f"a mask downsampling factor must be a positive integer, got {factor}")
    big_h, big_w = int(mask.shape[-2]), int(mask.shape[-1])
    h, w = (-(-big_h // f), -(-big_w // f)) if size is None else (int(size[0]), int(size[1]))
    if h * f < big_h or w * f < big_w:
        raise ShapeError(f"{h}x{w} blocks of {f}x{f} pixels do not cover a {big_h}x{big_w} mask")
    padded = F.pad(mask.to(torch.float32) if not mask.dtype.is_floating_point else mask,
                   (0, w * f - big_w, 0, h * f - big_h))
    return F.avg_pool2d(padded, f)


# ---- the region context --------------------------------------------------------------------------------------

def _weights(value: int | Tensor, candidates: Sequence[int], what: str) -> Tensor:
    """Weights over the candidates [B or 1, K] (float) from an integer width or a [K] / [B, K] tensor."""
    k = len(candidates)
    if isinstance(value, Tensor):
        w = value if value.ndim == 2 else value.reshape(1, -1)
        if value.ndim not in (1, 2) or w.shape[-1] != k:
            raise ShapeError(f"{what} weights must be [K] or [B, K] with K = {k} candidates {tuple(candidates)}, "
                             f"got shape {tuple(value.shape)}")
        return w if w.dtype.is_floating_point else w.to(torch.float32)
    bits = int(value)
    if bits not in candidates:
        raise ConfigError(f"{what} width {bits} is not a candidate of this quantizer {tuple(candidates)}; choose "
                          "one of them (TensorConfig.options['candidates'])")
    w = torch.zeros(1, k)
    w[0, list(candidates).index(bits)] = 1.0
    return w


def max_distribution(roi: Tensor, non_roi: Tensor) -> Tensor:
    """Distribution of max(b_roi, b_non_roi) over ascending candidates for independent choices with weights
    ``roi``, ``non_roi`` ([..., K]): ``P(max <= k) = F_r(k) F_n(k)``, differenced. One-hot in -> one-hot out."""
    both = torch.cumsum(roi, -1) * torch.cumsum(non_roi, -1)
    return torch.cat([both[..., :1], both[..., 1:] - both[..., :-1]], dim=-1)


@dataclass(eq=False)
class RegionContext:
    """What region quantizers read during one forward call (set by
    :func:`bitalloc.model.region.region_precision`).

    ``mask``: a tensor ([H, W], [B, H, W] or [B, 1, H, W], bool or float in [0, 1]) at a reference resolution
    (e.g. luma), brought to each tensor's resolution by :func:`mask_at` with ``rule`` / ``min_fraction``; or a
    function ``(h, w) -> mask`` broadcastable to [B, 1, h, w]. ``roi`` / ``non_roi``: an integer bit width, or
    weights over the K candidates ([K] or [B, K]; one-hot for hard choices). ``mode``: "split" or "mask"
    (module docstring).
    """

    mask: MaskLike
    roi: int | Tensor
    non_roi: int | Tensor
    mode: str = "split"
    rule: str = "any"
    min_fraction: float = 0.5
    _masks: dict[Any, Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"region mode {self.mode!r} is not one of {MODES}")
        check_rule(self.rule, self.min_fraction)

    def mask_for(self, size: Sequence[int], device: torch.device | None = None) -> Tensor:
        """The mask at spatial size ``size`` as [B or 1, 1, h, w] (bool, or float for soft masks), cached."""
        key = (int(size[0]), int(size[1]), str(device))
        if key not in self._masks:
            if callable(self.mask) and not isinstance(self.mask, Tensor):
                m = _as_b1hw(self.mask((key[0], key[1])))
                if tuple(m.shape[-2:]) != key[:2]:
                    raise ShapeError(f"the mask function returned a {tuple(m.shape[-2:])} mask for a tensor of "
                                     f"spatial size {key[:2]}")
            else:
                m = mask_at(self.mask, key[:2], rule=self.rule, min_fraction=self.min_fraction)
            self._masks[key] = m.to(device) if device is not None else m
        return self._masks[key]

    def weights(self, candidates: Sequence[int], device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """(ROI, non-ROI) weights over ``candidates``, each [B or 1, K]."""
        r = _weights(self.roi, candidates, "ROI")
        n = _weights(self.non_roi, candidates, "non-ROI")
        return (r.to(device), n.to(device)) if device is not None else (r, n)

    def single_index(self, candidates: Sequence[int]) -> int | None:
        """The candidate index when both regions use the same hard width for every sample, else None."""
        r, n = self.weights(candidates)
        if r.requires_grad or n.requires_grad:
            return None
        rows = torch.cat([r, n]).detach()
        one_hot = ((rows == 0) | (rows == 1)).all(1) & ((rows == 1).sum(1) == 1)
        if not bool(one_hot.all()):
            return None
        idx = rows.argmax(1)
        return int(idx[0]) if bool((idx == idx[0]).all()) else None

    def coefficients(self, candidates: Sequence[int], size: Sequence[int], device: torch.device,
                     dtype: torch.dtype) -> Tensor:
        """``c_k = m r_k + (1 - m) n_k`` as [K, B or 1, 1, h, w] at spatial size ``size``."""
        r, n = self.weights(candidates, device)
        m = self.mask_for(size, device).to(dtype)
        batches = {r.shape[0], n.shape[0], m.shape[0]} - {1}
        if len(batches) > 1:
            raise ShapeError(f"the region context has ROI widths for {r.shape[0]} samples, non-ROI widths for "
                             f"{n.shape[0]} and masks for {m.shape[0]}; give one per sample, or one for all")
        rk = r.to(dtype).t()[:, :, None, None, None]
        nk = n.to(dtype).t()[:, :, None, None, None]
        return m.unsqueeze(0) * rk + (1.0 - m).unsqueeze(0) * nk


def _mix(terms: dict[int, Tensor], coeff: Tensor) -> Tensor:
    """sum_k coeff[k] * terms[k] over the computed terms (one-hot coefficients select exactly)."""
    out = None
    for k, t in terms.items():
        c = coeff[k]
        if c.shape[0] not in (1, t.shape[0]):
            raise ShapeError(f"a region mask or width for {c.shape[0]} samples does not fit a batch of {t.shape[0]}")
        term = c * t
        out = term if out is None else out + term
    assert out is not None
    return out


def needed_terms(coeff: Tensor) -> list[int]:
    """Indices k whose coefficient is nonzero somewhere, or all when the coefficients carry a gradient."""
    if coeff.requires_grad:
        return list(range(coeff.shape[0]))
    return [k for k in range(coeff.shape[0]) if bool((coeff[k] != 0).any())]


# ---- the quantizer -------------------------------------------------------------------------------------------

def candidate_widths(cfg: TensorConfig) -> tuple[int, ...]:
    """The sorted candidate widths of ``cfg.options["candidates"]`` (default (2, 4, 8)), validated."""
    raw = cfg.options.get("candidates", DEFAULT_CANDIDATES)
    try:
        if isinstance(raw, (str, bytes)):
            raise TypeError
        cands = tuple(sorted({int(b) for b in raw}))
        if any(float(b) != int(b) for b in raw):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"candidates={raw!r} must be a list of integer bit widths, e.g. [2, 4, 8]") from None
    if not cands or any(b < 2 or b > 16 for b in cands):
        raise ConfigError(f"candidates={list(raw)} must be integer bit widths between 2 and 16 (LSQ grids), "
                          "e.g. [2, 4, 8] or [4, 8, 16]")
    return cands


class RegionLSQQuantizer(LearnedQuantizer):
    """Multi-width LSQ quantizer with region-masked widths (module docstring). Registry name ``"lsq_region"``.

    Parameters: ``log_steps`` ([K] or [K, C]; ``steps`` = exp of it). Plain attributes (not state): ``region``
    (the current :class:`RegionContext` or None) and ``branch`` (a candidate index forced by a split layer, or None).
    """

    kind = "lsq_region"

    def __init__(self, cfg: TensorConfig, role: str, axis: int | None, channels: int | None):
        if cfg.allocate or float(cfg.bits) != int(cfg.bits):
            raise ConfigError("region LSQ needs an integer default bit width (no per-channel allocation)")
        cands = candidate_widths(cfg)
        if cfg.int_bits not in cands:
            raise ConfigError(f"bits={cfg.int_bits} must be one of the candidates {list(cands)} (it is the width "
                              "used outside a region context); change bits or options['candidates']")
        super().__init__(cfg, role, axis, channels)
        self.candidates = cands
        self.default_bits = cfg.int_bits
        #: initial steps: "mean" (LSQ's rule 2 mean|v| / sqrt(Q_P), Esser et al. 2020, section 2.1) or "range"
        #: (max|v| / Q_P: the min-max grid of PTQ, no clipping; for short fine-tuning, where LSQ's rule clips hard)
        self.init_rule = str(cfg.options.get("init", "mean"))
        if self.init_rule not in ("mean", "range"):
            raise ConfigError(f"options['init']={self.init_rule!r}: use 'mean' (LSQ's rule) or 'range' (max|v| / Q_P)")
        shape = (len(cands),) + ((channels,) if self.per_channel else ())
        self.log_steps = nn.Parameter(torch.zeros(shape))
        self.region: RegionContext | None = None
        self.branch: int | None = None

    @property
    def steps(self) -> Tensor:
        """The K steps, ``exp(log_steps)`` (differentiable)."""
        return torch.exp(self.log_steps)

    def _set_step(self, k: int, s: Tensor) -> None:
        log_s = torch.log(torch.clamp(s.to(torch.float32), min=MIN_SCALE))
        self.log_steps[k].copy_(log_s.reshape(self.log_steps[k].shape))

    # -- widths ---------------------------------------------------------------------------------------------
    def index_of(self, bits: int) -> int:
        """Index of the candidate width ``bits`` (ConfigError if it is not a candidate)."""
        if int(bits) not in self.candidates:
            raise ConfigError(f"width {bits} is not a candidate of this quantizer {list(self.candidates)}")
        return self.candidates.index(int(bits))

    def bounds_at(self, k: int) -> tuple[int, int]:
        """LSQ's (Q_N, Q_P) at candidate index ``k``."""
        return lsq_bounds(self.candidates[k], self.is_signed)

    # -- initialisation (the LSQ rule at every candidate width) --------------------------------------------
    def _init_from_stats(self, stats: DataStats) -> None:
        for k in range(len(self.candidates)):
            q_p = self.bounds_at(k)[1]
            s = stats.abs_max() / max(q_p, 1) if self.init_rule == "range" else 2.0 * stats.mean_abs() / math.sqrt(q_p)
            self._set_step(k, s)

    @torch.no_grad()
    def calibrate_weight(self, weight: Tensor) -> None:
        if self.role != "weight" or bool(self.initialized):
            return
        self.signed.fill_(True)
        for k in range(len(self.candidates)):
            if self.init_rule == "range":
                s = DataStats().update(weight.detach(), self.stat_axis).abs_max() / max(self.bounds_at(k)[1], 1)
                s = s.to(torch.float32)
            else:
                s = lsq_init_step(weight, self.bounds_at(k)[1], self.stat_axis)
            self._set_step(k, s)
        self.initialized.fill_(True)

    def clamp_parameters(self) -> None:
        with torch.no_grad():
            self.log_steps.clamp_(min=math.log(MIN_SCALE))

    # -- forward --------------------------------------------------------------------------------------------
    def quantize_at(self, x: Tensor, k: int) -> Tensor:
        """LSQ fake quantization of ``x`` at candidate index ``k`` (the whole tensor): LSQ's gradients when a
        gradient is needed, else exactly the frozen grid of :meth:`qparams_at`."""
        if not (torch.is_grad_enabled() and (x.requires_grad or self.log_steps.requires_grad)):
            p = self._qparams_index(k)
            return fake_quantize(x, p.scale, p.zero_point, p.qmin, p.qmax, self.axis if p.per_channel else None)
        q_n, q_p = self.bounds_at(k)
        s = torch.clamp(torch.exp(self.log_steps[k]), min=MIN_SCALE)
        g = lsq_grad_scale(LSQQuantizer._n_per_step(self, x), q_p)
        return lsq_quantize(x, s, q_n, q_p, g, self.axis if self.per_channel else None)

    def _quantize(self, x: Tensor) -> Tensor:
        if self.branch is not None:
            return self.quantize_at(x, self.branch)
        ctx = self.region
        if ctx is None:
            return self.quantize_at(x, self.index_of(self.default_bits))
        single = ctx.single_index(self.candidates)
        if single is not None:
            return self.quantize_at(x, single)
        if self.role == "weight":
            v = self._weight_distribution(ctx, x.device)
            terms = {k: self.quantize_at(x, k) for k in needed_terms(v)}
            return _mix(terms, v.to(x.dtype).reshape(-1, *([1] * x.ndim)))
        if x.ndim < 3:
            raise ShapeError(f"region quantization needs an activation with spatial dimensions [B, C, H, W], got "
                             f"shape {tuple(x.shape)}; leave this layer out of region quantization")
        coeff = ctx.coefficients(self.candidates, x.shape[-2:], x.device, x.dtype)
        return _mix({k: self.quantize_at(x, k) for k in needed_terms(coeff)}, coeff)

    def _weight_distribution(self, ctx: RegionContext, device: torch.device) -> Tensor:
        """[K] weights of the weight tensor's widths outside a split layer: max(b_roi, b_non_roi)."""
        r, n = ctx.weights(self.candidates, device)
        v = max_distribution(r, n)
        if v.shape[0] > 1:
            if v.requires_grad or not bool((v == v[:1]).all()):
                raise ConfigError("a weight tensor has one width per call, but the region context gives one width "
                                  "pair per sample; use mode='split' (one convolution per candidate)")
        return v[0]

    # -- description ----------------------------------------------------------------------------------------
    def _qparams_index(self, k: int) -> QuantParams:
        step = torch.exp(self.log_steps[k].detach())
        signed = self.is_signed
        bits = torch.full(step.shape, self.candidates[k], dtype=torch.int64, device=step.device)
        qmin, qmax = integer_range(bits, signed=signed)
        return QuantParams(bits=bits, scale=torch.clamp(step, min=MIN_SCALE), zero_point=torch.zeros_like(bits),
                           qmin=qmin, qmax=qmax, axis=self.axis, signed=signed)

    def qparams_at(self, bits: int) -> QuantParams:
        """The grid of candidate width ``bits`` (its learned step; LSQ's codes)."""
        return self._qparams_index(self.index_of(bits))

    def frozen_at(self, bits: int) -> FrozenQuantizer:
        """A plain :class:`FrozenQuantizer` computing exactly this quantizer at width ``bits``."""
        return FrozenQuantizer.from_qparams(self.qparams_at(bits).detach(), self.role, self.axis, self.channels)

    def active_index(self) -> int | None:
        """The candidate index the current state determines (branch, equal widths, max rule for weights in mask
        mode, or the default width outside a context), or None when two widths apply."""
        if self.branch is not None:
            return self.branch
        ctx = self.region
        if ctx is None:
            return self.index_of(self.default_bits)
        single = ctx.single_index(self.candidates)
        if single is not None or self.role == "act":
            return single
        v = self._weight_distribution(ctx, self.log_steps.device).detach()
        hot = torch.nonzero(v == 1)
        return int(hot[0, 0]) if hot.numel() == 1 and bool(((v == 0) | (v == 1)).all()) else None

    def qparams(self) -> QuantParams:
        k = self.active_index()
        if k is None:
            raise ConfigError(f"this {self.role} quantizer runs at two bit widths in the current region context (ROI "
                              "and non-ROI); one QuantParams describes one grid: use region_qparams(), "
                              "qparams_at(bits), or bitalloc.model.region.freeze_at(model, bits)")
        return self._qparams_index(k)

    def region_qparams(self) -> dict[str, QuantParams]:
        """``{"roi": ..., "non_roi": ...}``: the grid of each region under the current (hard) context."""
        ctx = self.region
        if ctx is None:
            p = self.qparams_at(self.default_bits)
            return {"roi": p, "non_roi": p}
        out = {}
        for name, value in (("roi", ctx.roi), ("non_roi", ctx.non_roi)):
            if isinstance(value, Tensor):
                raise ConfigError("region_qparams() needs integer widths in the region context, not weights")
            out[name] = self.qparams_at(int(value))
        return out

    def extra_repr(self) -> str:
        state = "initialised" if bool(self.initialized) else "uninitialised"
        sign = "signed" if self.is_signed else "unsigned"
        return (f"{self.role}, {self.kind}, candidates={list(self.candidates)}, default={self.default_bits}, "
                f"{self.cfg.granularity}, {sign}, {state}")


__all__ = ["DEFAULT_CANDIDATES", "MASK_RULES", "MODES", "RegionContext", "RegionLSQQuantizer", "apply_rule",
           "block_fraction", "candidate_widths", "check_rule", "mask_at", "max_distribution", "needed_terms"]
