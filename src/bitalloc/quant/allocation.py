"""Per-channel bit allocation under an average bit budget.

Error model (ACIQ, Banner et al. 2019, section 4): a channel of range statistic a_i (its Laplace scale b or
standard deviation sigma) quantized with M_i bits at its optimal clip has error a_i^2 * err(M_i), with
err(M) = :func:`bitalloc.quant.clipping.aciq_min_mse` (M, prior, one_sided). The layer's error is the sum.

Methods:

* ``"aciq"`` (default) -- ACIQ eq. 10-11 as in the reference code: B_i = 2^M * C * a_i^(2/3) / sum_j a_j^(2/3) bins,
  M_i = round(log2 B_i) clipped to [min_bits, max_bits], and the target M of the formula adjusted until the
  mean of the rounded bits meets the budget. Channel i gains its (k+1)-th bit when M > k + 1/2 - log2(C a_i^(2/3)
  / sum_j a_j^(2/3)); the mean bits are a step function of M whose steps we enumerate, so instead of nudging M
  by small increments (the reference code, which stops within 0.01 of the budget) we pick the M whose mean
  is closest to the budget (ties: the lower mean). That mean is within 0.01 of the budget whenever any M
  achieves it; otherwise it is as close as the formula allows (e.g. all channels dead, or many equal stats).
* ``"optimal"`` -- the exact integer optimum of sum_i a_i^2 err(M_i) subject to sum_i M_i =
  round(avg_bits * C) (half up) and min_bits <= M_i <= max_bits: greedy marginal allocation (start everyone at
  min_bits, give one bit at a time to the channel whose error drops most). Exact because every err is convex
  and decreasing in M (a separable convex resource allocation; Fox 1966). Ties go to the lower channel index.
  Dead channels (a_i = 0) gain nothing from bits, so they stay at min_bits unless every live channel is at
  max_bits and the budget still has bits to place.

Why eq. 10-11 is the default although ``"optimal"`` has the lower modelled error: the model counts each
channel's absolute MSE, not its effect on the network's output; on real networks the exact optimum gives the
small-range channels fewer bits than they need (ResNet-20, EfficientNet-Lite0: lower or equal top-1 at every
budget we measured, BENCHMARKS.md), and the softer a^(2/3) law of eq. 11 keeps them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bitalloc.errors import ConfigError, DataError, ShapeError, check_bits
from bitalloc.quant.clipping import PRIORS, aciq_min_mse

ALLOCATION_METHODS = ("optimal", "aciq")


@dataclass(frozen=True)
class BitAllocation:
    """Result of a per-channel bit allocation."""

    bits: Tensor  #: int64 [C]
    target_bits: float  #: the requested average
    mean_bits: float  #: the achieved average
    total_bits: int  #: sum of ``bits``
    error: float  #: analytic error sum_i a_i^2 * aciq_min_mse(bits_i, prior, one_sided)
    method: str
    formula_bits: float | None = None  #: ``"aciq"`` only: the target M used in eq. 10


def _unit_errors(min_bits: int, max_bits: int, prior: str, one_sided: bool) -> Tensor:
    return torch.tensor([aciq_min_mse(m, prior, one_sided) for m in range(min_bits, max_bits + 1)],
                        dtype=torch.float64)


def _check_stats(channel_stats: Tensor) -> Tensor:
    a = torch.as_tensor(channel_stats).detach().to(torch.float64)
    if a.ndim != 1:
        raise ShapeError(f"channel statistics must be a 1-d tensor [C], got shape {tuple(a.shape)}")
    if a.numel() == 0:
        raise ShapeError("cannot allocate bits to zero channels: the channel statistics are empty")
    if not torch.all(torch.isfinite(a)) or torch.any(a < 0):
        raise DataError("channel statistics must be finite and >= 0 (a range statistic such as std or b)")
    return a


def allocation_error(channel_stats: Tensor, bits: Tensor, *, prior: str = "laplace",
                     one_sided: bool = False) -> float:
    """Analytic error sum_i a_i^2 * aciq_min_mse(bits_i, prior, one_sided) of an allocation."""
    a = _check_stats(channel_stats)
    b = torch.as_tensor(bits, dtype=torch.int64)
    table = {m: aciq_min_mse(m, prior, one_sided) for m in set(b.tolist())}
    unit = torch.tensor([table[m] for m in b.tolist()], dtype=torch.float64)
    return float(torch.sum(a * a * unit))


def _optimal(a: Tensor, total: int, min_bits: int, max_bits: int, prior: str, one_sided: bool) -> Tensor:
    C = a.numel()
    bits = torch.full((C,), min_bits, dtype=torch.int64)
    extra = total - C * min_bits
    if extra <= 0 or max_bits == min_bits:
        return bits
    err = _unit_errors(min_bits, max_bits, prior, one_sided)
    drop = err[:-1] - err[1:]  # error reduction of the (m+1)-th bit; decreasing in m (convexity)
    gains = (a * a)[:, None] * drop[None, :]  # [C, max - min], row-major = (channel, bit) order
    # The greedy sequence is the merge of the per-channel decreasing gain lists: a stable sort of all gains
    # (ties keep (channel, bit) order, i.e. the lower channel first).
    order = torch.sort(-gains.reshape(-1), stable=True).indices[:extra]
    bits += torch.bincount(order // gains.shape[1], minlength=C)
    return bits


def _aciq(a: Tensor, avg_bits: float, min_bits: int, max_bits: int) -> tuple[Tensor, float]:
    C = a.numel()
    bits = torch.full((C,), min_bits, dtype=torch.int64)
    live = a > 0
    if not torch.any(live) or max_bits == min_bits:
        return bits, float(min_bits)
    w = a[live] ** (2.0 / 3.0)
    c = torch.log2(C * w / w.sum())  # log2 B_i = M + c_i
    ks = torch.arange(min_bits, max_bits, dtype=torch.float64)
    # channel i holds more than k bits once M > k + 1/2 - c_i
    breaks = torch.sort(((ks + 0.5)[None, :] - c[:, None]).reshape(-1)).values
    N = breaks.numel()
    # after j breakpoints the total is C * min_bits + j; reachable j: 0, N, and j with breaks[j-1] < breaks[j]
    jj = torch.arange(N + 1)
    reachable = torch.ones(N + 1, dtype=torch.bool)
    reachable[1:N] = breaks[:-1] < breaks[1:]
    dist = (C * min_bits + jj.to(torch.float64) - avg_bits * C).abs()
    dist[~reachable] = math.inf
    j = int(torch.argmin(dist))  # first minimum: the lower total on ties
    if j == 0:
        m = float(breaks[0]) - 1.0
    elif j == N:
        m = float(breaks[-1]) + 1.0
    else:
        m = 0.5 * (float(breaks[j - 1]) + float(breaks[j]))
    bits[live] = torch.round(m + c).clamp(min_bits, max_bits).to(torch.int64)
    return bits, m


def channel_bit_allocation(channel_stats: Tensor, avg_bits: float, *, min_bits: int = 2, max_bits: int = 8,
                           method: str = "aciq", prior: str = "laplace",
                           one_sided: bool = False) -> BitAllocation:
    """Allocate integer bits to C channels for an average budget ``avg_bits``; see the module docstring.

    ``channel_stats``: [C] range statistic of each channel (>= 0). ``avg_bits`` may be fractional and must lie in
    [min_bits, max_bits]. Returns a :class:`BitAllocation` (bits, achieved mean, analytic error).
    """
    a = _check_stats(channel_stats)
    check_bits(min_bits, name="min_bits")
    check_bits(max_bits, name="max_bits")
    min_bits, max_bits = int(min_bits), int(max_bits)
    if min_bits > max_bits:
        raise ConfigError(f"min_bits={min_bits} is larger than max_bits={max_bits}")
    try:
        avg = float(avg_bits)
    except (TypeError, ValueError):
        raise ConfigError(f"avg_bits={avg_bits!r} is not a number") from None
    if not min_bits <= avg <= max_bits:
        raise ConfigError(f"average budget avg_bits={avg_bits} lies outside [min_bits, max_bits] = "
                          f"[{min_bits}, {max_bits}]; widen the bit range or change the budget")
    if method not in ALLOCATION_METHODS:
        raise ConfigError(f"unknown allocation method {method!r}; use one of {', '.join(ALLOCATION_METHODS)}")
    if prior not in PRIORS:
        raise ConfigError(f"unknown prior {prior!r}; use one of {', '.join(PRIORS)}")
    C = a.numel()
    formula = None
    if method == "optimal":
        total = int(math.floor(avg * C + 0.5))
        bits = _optimal(a, total, min_bits, max_bits, prior, bool(one_sided))
    else:
        bits, formula = _aciq(a, avg, min_bits, max_bits)
    return BitAllocation(bits=bits, target_bits=avg, mean_bits=float(bits.double().mean()),
                         total_bits=int(bits.sum()),
                         error=allocation_error(a, bits, prior=prior, one_sided=bool(one_sided)),
                         method=method, formula_bits=formula)


def allocate_channel_bits(channel_stats: Tensor, avg_bits: float, *, min_bits: int = 2, max_bits: int = 8,
                          method: str = "aciq", prior: str = "laplace", one_sided: bool = False) -> Tensor:
    """Integer bits [C] (int64) per channel with mean ``avg_bits``: ``"aciq"`` (eq. 10-11 of Banner et al. 2019,
    default) or ``"optimal"`` (exact minimiser of the ACIQ error model). See :func:`channel_bit_allocation`."""
    return channel_bit_allocation(channel_stats, avg_bits, min_bits=min_bits, max_bits=max_bits, method=method,
                                  prior=prior, one_sided=one_sided).bits


def allocate_channel_bits_batched(channel_stats: Tensor, avg_bits: float, *, min_bits: int = 2, max_bits: int = 8,
                                  prior: str = "laplace", one_sided: bool = False) -> Tensor:
    """The ``"optimal"`` allocation of many independent sets of channels at once (online quantization: one
    allocation per input sample). ``channel_stats`` is [N, C]; returns int64 [N, C], row n equal to
    ``allocate_channel_bits(channel_stats[n], avg_bits, method="optimal", ...)``."""
    a = torch.as_tensor(channel_stats).detach().to(torch.float64)
    if a.ndim != 2:
        raise ShapeError(f"batched channel statistics must be [N, C], got shape {tuple(a.shape)}")
    if a.shape[0] == 0:
        return torch.empty(0, a.shape[1], dtype=torch.int64)
    _check_stats(a.reshape(-1))
    check_bits(min_bits, name="min_bits")
    check_bits(max_bits, name="max_bits")
    if not min_bits <= float(avg_bits) <= max_bits:
        raise ConfigError(f"average budget avg_bits={avg_bits} lies outside [{min_bits}, {max_bits}]")
    n, c = a.shape
    bits = torch.full((n, c), int(min_bits), dtype=torch.int64)
    extra = int(math.floor(float(avg_bits) * c + 0.5)) - c * int(min_bits)
    if extra <= 0 or max_bits == min_bits:
        return bits
    err = _unit_errors(int(min_bits), int(max_bits), prior, bool(one_sided))
    drop = err[:-1] - err[1:]
    gains = (a * a)[:, :, None] * drop[None, None, :]  # [N, C, L]
    order = torch.sort(-gains.reshape(n, -1), dim=1, stable=True).indices[:, :extra]
    bits.scatter_add_(1, order // gains.shape[2], torch.ones_like(order))
    return bits
