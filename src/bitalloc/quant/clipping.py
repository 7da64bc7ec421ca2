"""ACIQ analytic clipping: the expected clipping + rounding error of a uniform quantizer and its optimum.

Source: R. Banner, Y. Nahshan, D. Soudry, "Post training 4-bit quantization of convolutional networks for
rapid-deployment", NeurIPS 2019 (ACIQ), section 3, eq. 5 (Laplace) and the Gaussian analogue of its
appendix; the table of optimal ratios is reproduced in SPEC.md section 1.

Model. A tensor X is clipped to [-alpha, alpha] and rounded to 2^M levels, step D = 2 alpha / 2^M. Inside the
range the rounding noise is approximated as uniform, D^2 / 12 = alpha^2 / (3 * 4^M) (the probability mass
inside the range is approximated by 1); outside, the error is the distance to the clip point:

* Laplace(0, b):  MSE(alpha) = 2 b^2 exp(-alpha / b) + alpha^2 / (3 * 4^M)
* Normal(0, s):   MSE(alpha) = (alpha^2 + s^2) erfc(alpha / (s sqrt 2)) - sqrt(2 / pi) alpha s exp(-alpha^2 / (2 s^2))
                               + alpha^2 / (3 * 4^M)

(the Gaussian clipping term is 2 E[(X - alpha)^2; X > alpha], computed with ``erfc`` so that it keeps its
relative precision in the far tail). Both are convex in alpha with a unique minimiser that scales with b (s),
so the optimum is a ratio alpha* / b (alpha* / s) that depends on M only.

One-sided tensors (after a ReLU). Only the positive half is quantized: the quantization range halves
([0, alpha] with 2^M levels, step alpha / 2^M, rounding noise alpha^2 / (12 * 4^M)) and only one tail is
clipped. Measured on the distribution of the positive values (a half-Laplace of scale b, whose mean is b,
or a half-normal of scale s, whose root mean square is s), the clipped tail carries the same error as both
tails of the symmetric law:

* Laplace:  MSE_1(alpha) = 2 b^2 exp(-alpha / b) + alpha^2 / (12 * 4^M)  ==  MSE(alpha) at M + 1 bits
* Normal:   MSE_1(alpha) = [same clipping term as above] + alpha^2 / (12 * 4^M) ==  MSE(alpha) at M + 1 bits

so the one-sided optimum at M bits is the symmetric optimum at M + 1 bits (ACIQ, section 3).

The minimiser solves dMSE/dalpha = 0, found by bisection to machine precision (the derivative is increasing):

* Laplace (b = 1): d/dalpha = -2 exp(-alpha) + 2 alpha / (3 * 4^M)
* Normal (s = 1):  d/dalpha = 2 [alpha erfc(alpha / sqrt 2) - sqrt(2 / pi) exp(-alpha^2 / 2)] + 2 alpha / (3 * 4^M)
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from bitalloc.errors import ConfigError, check_bits

#: the priors ACIQ models; ``scale`` is b = E|X - E X| (Laplace) or the standard deviation (Gaussian)
PRIORS = ("laplace", "gauss")

_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

Number = float | int
ArrayLike = Number | Tensor


def _check_prior(prior: str) -> None:
    if prior not in PRIORS:
        raise ConfigError(f"unknown prior {prior!r}; use one of {', '.join(PRIORS)}")


def _is_tensor(*xs: object) -> bool:
    return any(isinstance(x, Tensor) for x in xs)


def _levels_term(alpha: ArrayLike, bits: ArrayLike, divisor: float) -> ArrayLike:
    """alpha^2 / (divisor * 4^bits): the uniform rounding noise D^2 / 12 inside the range."""
    if isinstance(bits, Tensor):
        four_m = torch.pow(4.0, bits.to(torch.float64))
    else:
        four_m = 4.0 ** float(bits)
    return alpha * alpha / (divisor * four_m)


def laplace_clip_mse(alpha: ArrayLike, b: ArrayLike, bits: int | Tensor) -> ArrayLike:
    """ACIQ eq. 5: 2 b^2 exp(-alpha / b) + alpha^2 / (3 * 4^bits), the MSE of clipping Laplace(0, b) at +-alpha.

    Accepts Python numbers (returns a float) or tensors (returns a float64 tensor, broadcast). ``b = 0`` (a
    constant tensor) has no clipping error.
    """
    if _is_tensor(alpha, b, bits):
        alpha = torch.as_tensor(alpha, dtype=torch.float64)
        b = torch.as_tensor(b, dtype=torch.float64)
        bits_t = torch.as_tensor(bits)
        ratio = torch.where(b > 0, alpha / torch.where(b > 0, b, 1.0), torch.full_like(alpha * b, math.inf))
        return 2.0 * b * b * torch.exp(-ratio) + _levels_term(alpha, bits_t, 3.0)
    alpha, b = float(alpha), float(b)
    clip = 2.0 * b * b * math.exp(-alpha / b) if b > 0 else 0.0
    return clip + _levels_term(alpha, bits, 3.0)


def gauss_clip_mse(alpha: ArrayLike, sigma: ArrayLike, bits: int | Tensor) -> ArrayLike:
    """ACIQ (Gaussian prior): (alpha^2 + s^2) erfc(alpha / (s sqrt 2)) - sqrt(2/pi) alpha s exp(-alpha^2 / (2 s^2))
    + alpha^2 / (3 * 4^bits), the MSE of clipping Normal(0, s) at +-alpha (erfc = 1 - erf).

    Accepts Python numbers (returns a float) or tensors (returns a float64 tensor, broadcast).
    """
    if _is_tensor(alpha, sigma, bits):
        alpha = torch.as_tensor(alpha, dtype=torch.float64)
        s = torch.as_tensor(sigma, dtype=torch.float64)
        bits_t = torch.as_tensor(bits)
        safe = torch.where(s > 0, s, 1.0)
        u = alpha / safe
        clip = ((alpha * alpha + s * s) * torch.special.erfc(u / _SQRT2)
                - _SQRT_2_OVER_PI * alpha * s * torch.exp(-0.5 * u * u))
        clip = torch.where(s > 0, clip.clamp(min=0.0), torch.zeros_like(clip))
        return clip + _levels_term(alpha, bits_t, 3.0)
    alpha, s = float(alpha), float(sigma)
    if s > 0:
        u = alpha / s
        clip = (alpha * alpha + s * s) * math.erfc(u / _SQRT2) - _SQRT_2_OVER_PI * alpha * s * math.exp(-0.5 * u * u)
        clip = max(clip, 0.0)
    else:
        clip = 0.0
    return clip + _levels_term(alpha, bits, 3.0)


def aciq_clip_mse(alpha: ArrayLike, scale: ArrayLike, bits: int | Tensor, prior: str = "laplace",
                  one_sided: bool = False) -> ArrayLike:
    """The ACIQ analytic MSE of clipping at ``alpha`` a tensor of scale ``scale`` (b or sigma) with ``bits``.

    Two-sided: :func:`laplace_clip_mse` / :func:`gauss_clip_mse`. One-sided (post-ReLU; ``scale`` is the
    positive part's statistic): clipping term unchanged, rounding term alpha^2 / (12 * 4^bits), which equals
    the two-sided formula at ``bits + 1`` (see the module docstring).
    """
    _check_prior(prior)
    fn = laplace_clip_mse if prior == "laplace" else gauss_clip_mse
    return fn(alpha, scale, bits + 1 if one_sided else bits)


def _dmse(alpha: float, bits: int, prior: str) -> float:
    """dMSE/dalpha for unit scale (b = 1 or sigma = 1), two-sided, ``bits`` levels exponent."""
    rounding = 2.0 * alpha / (3.0 * 4.0 ** bits)
    if prior == "laplace":
        return -2.0 * math.exp(-alpha) + rounding
    return 2.0 * (alpha * math.erfc(alpha / _SQRT2) - _SQRT_2_OVER_PI * math.exp(-0.5 * alpha * alpha)) + rounding


@lru_cache(maxsize=None)
def _optimal_ratio(bits: int, prior: str) -> float:
    """Root of the increasing function dMSE/dalpha on (0, inf) by bisection (two-sided, unit scale)."""
    lo, hi = 0.0, 1.0
    while _dmse(hi, bits, prior) <= 0.0:  # bracket: the derivative is negative at 0 and eventually positive
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:  # interval at machine precision
            break
        if _dmse(mid, bits, prior) > 0.0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def aciq_clip_ratio(bits: int, prior: str = "laplace", one_sided: bool = False) -> float:
    """Optimal clipping ratio alpha* / b (Laplace) or alpha* / sigma (Gaussian) for ``bits`` (1..32).

    Solves dMSE/dalpha = 0 for the ACIQ model (Banner et al. 2019, eq. 5; see the module docstring) by
    bisection, cached. ``one_sided=True`` (post-ReLU data, range [0, alpha]) returns the two-sided optimum at
    ``bits + 1``. Laplace, 1..8 bits: 1.86 2.83 3.90 5.03 6.20 7.41 8.65 9.90; Gaussian: 1.24 1.71 2.15 2.56
    2.94 3.29 3.62 3.92.
    """
    check_bits(bits)
    _check_prior(prior)
    return _optimal_ratio(int(bits) + (1 if one_sided else 0), prior)


def aciq_min_mse(bits: int, prior: str = "laplace", one_sided: bool = False) -> float:
    """The analytic ACIQ MSE at the optimal clip for unit scale (b = 1 or sigma = 1).

    err(M) = MSE(alpha*(M)) with the two-sided formula, or the one-sided one (which equals the two-sided
    value at M + 1 bits). A channel of scale a has error a^2 * err(M); this is the error model of
    per-channel bit allocation. ``bits`` in 1..32.
    """
    ratio = aciq_clip_ratio(bits, prior, one_sided)
    return float(aciq_clip_mse(ratio, 1.0, int(bits), prior, one_sided))
