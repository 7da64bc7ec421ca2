"""Bayesian Bits math (van Baalen, Louizos, Nagel, Amjad, Wang, Blankevoort, Welling, NeurIPS 2020).

Pure tensor math; the ``nn.Module`` is :class:`bitalloc.quantizers.bayesian_bits.BayesianBitsQuantizer`.

**Residual decomposition** (paper section 2, eq. 1-6). A tensor clipped to a learned range is quantized on 2
bits, and the residual error is quantized again on 4, 8, 16 and 32 bits::

    x2  = s2 * round(x / s2)
    e4  = s4 * round((x - x2) / s4)
    e8  = s8 * round((x - x2 - e4) / s8)            ... up to e32
    x_q = z2 * (x2 + z4 * (e4 + z8 * (e8 + z16 * (e16 + z32 * e32))))

with nested steps ``s2 = (beta - alpha) / (2^2 - 1)`` for the range ``[alpha, beta]`` and ``s_2b = s_b / (2^b + 1)``,
so that ``s_b = (beta - alpha) / (2^b - 1)`` for every level b and the sum of the first k terms equals direct
quantization ``s_b * round(x / s_b)`` on the grid of ``b = 2^k`` bits (paper, the equality below eq. 3; tested
in ``tests/test_bayesian_bits.py``). With half-to-even rounding the equality also holds at ties. Ranges (as in
the reference code, ``learned_scale="range"``): signed tensors (weights; activations that can be negative)
use ``[-a, a]``, so ``s2 = 2a/3``; unsigned tensors (after a ReLU) ``[0, a]``, ``s2 = a/3``. Before
quantization ``x`` is clipped to ``[-a', a']`` (signed) or ``[0, a']`` with ``a' = a (1 - 1e-7)`` (the
reference code's ``pact_clip``: keeps ``a / s2 = 1.5`` from rounding to 2 on the signed 2-bit grid), so the
signed codes of b bits lie in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` and the unsigned ones in ``[0, 2^b - 1]``.

**Expected bit width** of a tensor whose gates z4..z32 are on with probabilities p4..p32 (autoregressive:
level k is reached only when all lower gates are on)::

    E[b] = 2 + 2 p4 + 4 p4 p8 + 8 p4 p8 p16 + 16 p4 p8 p16 p32

(z2 is pruning, accounted as the kept fraction, not as bits.)

**Regulariser** (paper section 3.3 / eq. 12-13 with the BOP-aware weighting; SPEC section 2; reference code
``BayesianBitsQuantizer.regularizer`` with ``reg_type="bop"``): per quantizer, with ``r`` the layer's MAC
weight and ``q_k = P(z_k > 0)``::

    R = r * mean_c [ sum_{k in 2,4,..,32} bits_k * prod_{j <= k} q_j ]      (q2 per output channel c)

i.e. ``r * mean_c(q2_c) * (2 + 4 q4 + 8 q4 q8 + 16 q4 q8 q16 + 32 q4 q8 q16 q32)``. This product form is the
autoregressive prior/posterior of the rebuttal: conditioned on a lower gate being off, prior and posterior put
no mass on the higher gates, so the regularisation (and its gradient) of gate j is weighted by the
probability that all lower gates are on; a gate above a certainly-off gate is not regularised. Without z2
(activations) ``q2 = 1`` (the reference code adds a constant 1 there instead of ``2 r``: same gradient).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from bitalloc.quant.grid import round_ste

#: the bit widths of the decomposition (a level per gate: z2, z4, z8, z16, z32)
LEVELS: tuple[int, ...] = (2, 4, 8, 16, 32)
#: the reference code's clip shrink factor
CLIP_SHRINK = 1.0 - 1e-7


def check_level(bits: int) -> int:
    from bitalloc.errors import ConfigError

    b = int(bits)
    if b not in LEVELS:
        raise ConfigError(f"Bayesian Bits bit widths are {LEVELS} (doubling from 2); got {bits}")
    return b


def range_width(a: Tensor, signed: bool) -> Tensor:
    """``beta - alpha`` of the range: ``2a`` (signed, ``[-a, a]``) or ``a`` (unsigned, ``[0, a]``)."""
    return 2.0 * a if signed else a


def level_scale(a: Tensor, bits: int, signed: bool) -> Tensor:
    """Closed form of the step at ``bits``: ``(beta - alpha) / (2^bits - 1)``."""
    return range_width(a, signed) / float((1 << int(bits)) - 1)


def nested_scales(s2: Tensor, n_levels: int = len(LEVELS)) -> list[Tensor]:
    """``[s2, s4, s8, ...]`` with ``s_2b = s_b / (2^b + 1)`` (paper eq. 3)."""
    scales = [s2]
    for b in LEVELS[: n_levels - 1]:
        scales.append(scales[-1] / float((1 << b) + 1))
    return scales


def clip_to_range(x: Tensor, a: Tensor, signed: bool, shrink: float = CLIP_SHRINK) -> Tensor:
    """Clip to ``[-a', a']`` (signed) or ``[0, a']`` with ``a' = shrink * a``; differentiable in ``x`` and ``a``
    (gradient to ``a``: 1 where ``x >= a'``, -1 where ``x <= -a'`` (signed)), like PACT."""
    hi = (a * shrink).to(x.dtype)
    lo = -hi if signed else torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.minimum(torch.maximum(x, lo), hi)


def residual_terms(xc: Tensor, scales: Sequence[Tensor], round_fn: Callable[[Tensor], Tensor] = round_ste,
                   collapsed: int = 0) -> list[Tensor]:
    """``[x2, e4, e8, ...]`` (one term per scale) of the decomposition of the clipped tensor ``xc``.

    ``collapsed = j > 0`` folds the first ``j + 1`` terms into one: the list starts with the direct
    quantization ``s_j round(xc / s_j)`` on the grid of level j (``scales[j]``), which equals
    ``x2 + e4 + ... + e_j`` (paper eq. 3), followed by the residuals of the levels above it; one rounding
    replaces ``j + 1``. The straight-through gradients agree as well: to ``xc`` both are 1, and to the steps
    both give ``round(xc / s_j) - xc / s_j`` per unit of ``s_j`` (the residual of level j divided by its step
    differs from ``xc / s_j`` by an integer, ``x_{j-1} / s_j``). Returns ``len(scales) - collapsed`` terms.
    """
    if not 0 <= collapsed < len(scales):
        raise ValueError(f"collapsed must be in [0, {len(scales) - 1}], got {collapsed}")
    s0 = scales[collapsed]
    first = s0 * round_fn(xc / s0)
    terms: list[Tensor] = [first]
    acc = first
    for s in scales[collapsed + 1:]:
        t = s * round_fn((xc - acc) / s)
        terms.append(t)
        acc = acc + t
    return terms


def gated_sum(terms: Sequence[Tensor], gates: Sequence[Tensor | float | None]) -> Tensor:
    """``z2 (x2 + z4 (e4 + z8 (e8 + ...)))`` for ``gates = [z2, z4, ...]`` (z2 may be None: no pruning gate).

    ``gates[k]`` multiplies level k; missing trailing gates (fewer gates than terms) count as 0.
    """
    acc: Tensor | float = 0.0
    for k in range(len(terms) - 1, 0, -1):
        g = gates[k] if k < len(gates) else 0.0
        if g is None:
            g = 1.0
        acc = g * (terms[k] + acc)
    out = terms[0] + acc
    if gates and gates[0] is not None:
        out = gates[0] * out
    return out


def direct_quantize(xc: Tensor, a: Tensor, bits: int, signed: bool) -> Tensor:
    """``s_b * round(xc / s_b)``: direct quantization of the clipped tensor on the grid of ``bits``."""
    s = level_scale(a, bits, signed)
    return s * torch.round(xc / s)


def _leading(gates: Sequence[Tensor | float], keep: Callable[[float], bool]) -> int:
    """How many of ``gates`` satisfy ``keep`` before the first that does not."""
    n = 0
    for g in gates:
        if not keep(float(g.detach().reshape(-1)[0]) if isinstance(g, Tensor) else float(g)):
            break
        n += 1
    return n


def leading_ones(gates: Sequence[Tensor | float]) -> int:
    """How many of ``gates`` are exactly 1 before the first that is not (levels that can be collapsed)."""
    return _leading(gates, lambda v: v == 1.0)


def leading_on(gates: Sequence[Tensor | float]) -> int:
    """How many of ``gates`` (z4, z8, ...) are nonzero before the first zero (the active residual levels)."""
    return _leading(gates, lambda v: v > 0.0)


def bits_from_gates(gates: Sequence[Tensor | float]) -> int:
    """Bit width selected by 0/1 gates ``[z4, z8, z16, z32]``: ``2 * 2^(leading ones)``."""
    return LEVELS[leading_on(gates)]


def expected_bits(probs: Tensor) -> Tensor:
    """``E[b] = 2 + sum_k (b_k - b_{k-1}) prod_{j <= k} p_j`` for ``probs = [p4, p8, ...]`` (last dim)."""
    cum = torch.cumprod(probs, dim=-1)
    inc = torch.tensor([LEVELS[k + 1] - LEVELS[k] for k in range(probs.shape[-1])], dtype=probs.dtype,
                       device=probs.device)
    return 2.0 + (cum * inc).sum(-1)


def regularizer(probs: Tensor, mac_weight: float | Tensor = 1.0, prune_probs: Tensor | None = None) -> Tensor:
    """BOP-weighted Bayesian Bits regulariser of one quantizer (see the module docstring).

    ``probs``: ``[q4, q8, ...]`` (P(z > 0) of the bit gates, as many levels as the quantizer has);
    ``prune_probs``: ``[C]`` P(z2 > 0) per output channel, or None (no pruning gate: q2 = 1).
    Returns ``r * mean_c sum_k bits_k prod_{j <= k} q_j``.
    """
    bits = torch.tensor(LEVELS[1: probs.shape[-1] + 1], dtype=probs.dtype, device=probs.device)
    tail = 2.0 + (torch.cumprod(probs, dim=-1) * bits).sum(-1)  # sum over levels given z2 on
    q2 = prune_probs.mean() if prune_probs is not None else torch.ones((), dtype=probs.dtype, device=probs.device)
    return mac_weight * q2 * tail


__all__ = [
    "LEVELS", "CLIP_SHRINK", "check_level", "range_width", "level_scale", "nested_scales", "clip_to_range",
    "residual_terms", "gated_sum", "direct_quantize", "leading_ones", "leading_on", "bits_from_gates",
    "expected_bits", "regularizer",
]
