"""Accumulator-width analysis of integer convolution / linear layers.

The integer form of a quantized layer (SPEC section 1, ACIQ rebuttal to Referee 3) multiplies *centred*
codes, activation ``a = q_x - z_x`` times weight ``w = q_w - z_w``, and sums the products of one output in an
accumulator::

    acc[c] = sum_{i, k} w[c, i, k] * (a[i, k] << e_i)          (fan-in K = C_in / groups * prod(kernel))

``e_i >= 0`` is the left shift that brings input channel i to its activation group's common step when
activation steps differ per channel by powers of two (see :mod:`bitalloc.runtime.integer`); it is 0 for
per-tensor activations. With 4-bit weights (-8..7) and 4-bit activations (centred codes in [qmin - z, qmax - z],
at most 15 in magnitude) every product fits in 8 bits (|w a| <= 8 * 15 = 120 <= 127); shifting a product left
by e_i needs 8 + e_i bits, hence the SPEC's "widened to 16 bits" (e_i <= 8); the sums go to an int32 register.

Bounds computed here (all exact integers, Python ints):

* ``product_bound`` = max |w| * max |a << e|: the largest product magnitude for any codes in range (the two
  maxima may come from different rows).
* ``weight_product_bound`` = max over (c, row) of |w[c, row]| * max(|lo_row << e_row|, |hi_row << e_row|): the
  *exact* largest |product| given the actual weight codes (an input code at the end of its range attains it).
* ``grid_bound`` = K * product_bound: the largest |acc| for *any* weight and activation codes of these bit
  widths and fan-in (data-free).
* ``weight_bound`` = max over output channels c of sum_{i,k} max(w[c,i,k] * lo_i, w[c,i,k] * hi_i) and of the
  mirror minimum, with [lo_i, hi_i] = [(qmin_i - z_i) << e_i, (qmax_i - z_i) << e_i] the centred activation range:
  the *exact* worst case of |acc| over all inputs, given the actual weight codes (each term is maximised
  independently; the range contains 0, so every partial sum, in any summation order, is bounded by it too).
* ``xsum_bound`` = K * max |a << e|: the second accumulator, sum of activation codes over the receptive field,
  that bias correction's shift term needs (w_hat = xi * s * w + beta).

Two integer stages are checked, each against its register width (two's complement, B bits hold
[-2^(B-1), 2^(B-1) - 1]):

1. **Products** (``product``): each shifted product w * (a << e) is formed in an **int16** register (the
   SPEC's "8-bit products, widened to 16 bits"). It fits when ``weight_product_bound`` <= 2^15 - 1: always
   for w <= 8-bit signed times a <= 8-bit unsigned without shift (128 * 255 = 32640), and for 4x4 bits with
   shifts up to e = 8 (120 << 8 = 30720); not for 8-bit codes with a per-channel power-of-two shift e >= 1,
   or for wider codes. Then the product stage is widened to int32 (or int64), or
   :class:`AccumulatorOverflowError` is raised (``on_overflow="raise"`` or ``product="int16"``).
   ``product_fits_int8`` tells whether the products are even 8-bit (4x4 bits: 8 * 15 = 120 <= 127).
2. **Sums** (``accumulator``): int32 when the weight bound (and the xsum bound) fit 2^31 - 1, else int64, or
   the error with ``on_overflow="raise"`` / ``accumulator="int32"``. The accumulator is never narrower
   than the product stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from bitalloc.errors import BitallocError

INT8_MAX, INT16_MAX, INT32_MAX, INT64_MAX = 2**7 - 1, 2**15 - 1, 2**31 - 1, 2**63 - 1


class AccumulatorOverflowError(BitallocError, OverflowError):
    """An integer accumulator of the requested width could overflow for some input of a layer."""


def signed_bits(bound: int) -> int:
    """Bits of the smallest two's-complement integer holding every value in [-bound, bound] (bound >= 0)."""
    bound = int(bound)
    if bound < 0:
        raise ValueError("bound must be >= 0")
    return bound.bit_length() + 1


def fits(bound: int, bits: int) -> bool:
    """Whether [-bound, bound] fits a signed ``bits``-bit integer (the asymmetric end -2^(b-1) is not needed)."""
    return int(bound) <= 2 ** (bits - 1) - 1


@dataclass
class AccumulatorAnalysis:
    """Worst-case integer magnitudes of one quantized layer (see module docstring for the formulas)."""

    layer: str
    w_bits: int
    a_bits: int
    fan_in: int
    max_abs_w: int
    max_abs_a: int
    max_shift: int
    product_bound: int
    product_bits: int
    grid_bound: int
    weight_bound: int | None
    xsum_bound: int
    accumulator: str  # "int32" or "int64"
    weight_product_bound: int | None = None  # exact max |w * (a << e)| given the weight codes
    product: str = "int16"  # register of the widened products: "int16" (the SPEC's), or widened "int32" / "int64"

    @property
    def bound(self) -> int:
        """The bound the accumulator choice uses: the exact weight bound when known, else the grid bound."""
        return self.weight_bound if self.weight_bound is not None else self.grid_bound

    @property
    def worst_product(self) -> int:
        """The product bound the product-stage choice uses: exact given the weights when known, else the grid one."""
        return self.weight_product_bound if self.weight_product_bound is not None else self.product_bound

    @property
    def product_fits_int8(self) -> bool:
        return fits(self.worst_product, 8)

    @property
    def product_fits_int16(self) -> bool:
        return fits(self.worst_product, 16)

    @property
    def product_widened(self) -> bool:
        """The int16 product stage could overflow, so the products were widened (``product`` != "int16")."""
        return self.product != "int16"

    @property
    def fits_int32(self) -> bool:
        return fits(self.bound, 32) and fits(self.xsum_bound, 32)

    @property
    def grid_fits_int32(self) -> bool:
        return fits(self.grid_bound, 32)

    def describe(self) -> str:
        shift = f" (activation shifts up to {self.max_shift} bits)" if self.max_shift else ""
        return (f"layer {self.layer!r}: {self.w_bits}-bit weights x {self.a_bits}-bit activations{shift}, fan-in "
                f"{self.fan_in}, max |product| {self.worst_product} ({signed_bits(self.worst_product)} bits), worst |sum| "
                f"{self.bound} ({signed_bits(self.bound)} bits; any codes of these widths: {self.grid_bound}, "
                f"{signed_bits(self.grid_bound)} bits)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(bound=self.bound, worst_product=self.worst_product, product_fits_int8=self.product_fits_int8,
                 product_fits_int16=self.product_fits_int16, product_widened=self.product_widened,
                 fits_int32=self.fits_int32, grid_fits_int32=self.grid_fits_int32, acc_bits=signed_bits(self.bound))
        return d


def centred_range(qmin: Tensor, qmax: Tensor, zero_point: Tensor) -> tuple[Tensor, Tensor]:
    """Centred code range [qmin - z, qmax - z] (int64, broadcast); it always contains 0 (qmin <= z <= qmax)."""
    qmin, qmax, z = (torch.as_tensor(t, dtype=torch.int64) for t in (qmin, qmax, zero_point))
    return qmin - z, qmax - z


def grid_accumulator_bound(w_bits: int, a_bits: int, fan_in: int, *, w_signed: bool = True,
                           a_signed: bool = False, shift: int = 0) -> int:
    """Data-free worst |acc| = fan_in * max|w| * max|a| << shift for b-bit grids (any zero point in range).

    Signed grids have max |code - 0| = 2^(b-1); unsigned grids with a zero point in [0, 2^b - 1] have
    max |q - z| <= 2^b - 1 (attained with z = 0 or z = 2^b - 1).
    """
    mw = 2 ** (w_bits - 1) if w_signed else 2**w_bits - 1
    ma = 2 ** (a_bits - 1) if a_signed else 2**a_bits - 1
    return int(fan_in) * mw * (ma << int(shift))


def exact_weight_bound(w: Tensor, lo: Tensor, hi: Tensor) -> int:
    """Exact max over inputs of |sum_j w[c, j] * a_j|, a_j in [lo_j, hi_j] (lo_j <= 0 <= hi_j), max over c.

    ``w``: integer [C_out, R] centred weight codes; ``lo`` / ``hi``: integer bounds broadcastable to [C_out, R] of the
    (shifted) centred activation of each row. Python-int exact (computed in int64; the caller guarantees no
    int64 overflow, checked against the grid bound).
    """
    w = w.to(torch.int64)
    lo = torch.as_tensor(lo, dtype=torch.int64).expand(w.shape)
    hi = torch.as_tensor(hi, dtype=torch.int64).expand(w.shape)
    a, b = w * lo, w * hi
    top = torch.maximum(a, b).sum(dim=1)
    bottom = torch.minimum(a, b).sum(dim=1)
    if top.numel() == 0:
        return 0
    return int(max(int(top.max()), -int(bottom.min())))


_WIDTHS = {"int16": 16, "int32": 32, "int64": 64}


def analyze(layer: str, *, w_codes: Tensor, w_bits: int, a_lo: Tensor, a_hi: Tensor, a_bits: int, fan_in: int,
            shifts: Tensor | None = None, on_overflow: str = "widen", accumulator: str = "auto",
            product: str = "auto") -> AccumulatorAnalysis:
    """Analyse one layer.

    Args:
        layer: the layer name (for messages).
        w_codes: centred weight codes [C_out, R] (R = fan-in rows: C_in / groups * prod(kernel), ordered as
            channel-major rows of im2col, i.e. row = i * prod(kernel) + k).
        w_bits: the largest weight bit width; a_bits: the largest activation bit width.
        a_lo, a_hi: centred activation range of each weight's input (broadcastable to [C_out, R]: per
            output channel and row, per row, or a scalar), *before* the shift.
        fan_in: K (= R).
        shifts: left shift e of each row (broadcastable to [C_out, R]) or None (0).
        on_overflow: "widen" (a wider product register / int64 accumulator when the int16 products / int32
            sums could overflow) or "raise" (:class:`AccumulatorOverflowError` instead).
        accumulator: "auto", "int32" (raise if it could overflow) or "int64".
        product: register of the shifted products: "auto" (int16 when it cannot overflow, else as
            ``on_overflow`` says), "int16" (raise if it could overflow), "int32" or "int64".
    """
    if on_overflow not in ("widen", "raise"):
        raise ValueError(f"on_overflow must be 'widen' or 'raise', got {on_overflow!r}")
    if accumulator not in ("auto", "int32", "int64"):
        raise ValueError(f"accumulator must be 'auto', 'int32' or 'int64', got {accumulator!r}")
    if product not in ("auto", "int16", "int32", "int64"):
        raise ValueError(f"product must be 'auto', 'int16', 'int32' or 'int64', got {product!r}")
    shape = tuple(w_codes.shape)
    lo = torch.as_tensor(a_lo, dtype=torch.int64).expand(shape)
    hi = torch.as_tensor(a_hi, dtype=torch.int64).expand(shape)
    e = (torch.zeros((), dtype=torch.int64) if shifts is None else torch.as_tensor(shifts, dtype=torch.int64)).expand(shape)
    if e.numel() and int(e.max()) > 62:
        raise AccumulatorOverflowError(f"layer {layer!r}: activation shift {int(e.max())} bits is too large")
    lo_s, hi_s = lo << e, hi << e
    amax = torch.maximum(lo_s.abs(), hi_s.abs())
    max_abs_a = int(amax.max()) if amax.numel() else 0
    max_abs_w = int(w_codes.abs().max()) if w_codes.numel() else 0
    prod = max_abs_w * max_abs_a
    grid = fan_in * prod
    exact = prod <= INT64_MAX
    weight_product = (int((w_codes.to(torch.int64).abs() * amax).max()) if w_codes.numel() else 0) if exact else None
    weight_bound = exact_weight_bound(w_codes, lo_s, hi_s) if grid <= INT64_MAX else None
    xsum = fan_in * max_abs_a
    res = AccumulatorAnalysis(layer=layer, w_bits=int(w_bits), a_bits=int(a_bits), fan_in=int(fan_in), max_abs_w=max_abs_w,
                              max_abs_a=max_abs_a, max_shift=int(e.max()) if e.numel() else 0, product_bound=prod,
                              product_bits=signed_bits(prod), grid_bound=grid, weight_bound=weight_bound,
                              xsum_bound=xsum, accumulator="int32", weight_product_bound=weight_product)
    if not fits(res.bound, 64) or not fits(xsum, 64) or not fits(res.worst_product, 64):
        raise AccumulatorOverflowError(f"{res.describe()}: even an int64 accumulator could overflow; use fewer bits "
                                       "or split the layer")
    # stage 1: the products, nominally in int16 (8-bit products widened by the activation shift)
    need_p = signed_bits(res.worst_product)
    if product in ("int32", "int64"):
        if need_p > _WIDTHS[product]:
            raise AccumulatorOverflowError(f"{res.describe()}: {product} products could overflow (need {need_p} bits)")
        res.product = product
    elif need_p <= 16:
        res.product = "int16"
    elif product == "int16" or on_overflow == "raise":
        raise AccumulatorOverflowError(
            f"{res.describe()}: the int16 product stage could overflow (products need {need_p} bits: "
            f"{res.max_abs_w} x {res.max_abs_a}); widen the products to int32 (on_overflow='widen'), use fewer bits "
            "or activation steps that need smaller shifts")
    else:
        res.product = "int32" if need_p <= 32 else "int64"
    # stage 2: the sums
    if accumulator == "int64":
        res.accumulator = "int64"
    elif not res.fits_int32:
        if accumulator == "int32" or on_overflow == "raise":
            raise AccumulatorOverflowError(
                f"{res.describe()}: an int32 accumulator could overflow (needs {signed_bits(max(res.bound, xsum))} "
                f"bits); use an int64 accumulator (on_overflow='widen'), fewer bits or a smaller fan-in")
        res.accumulator = "int64"
    if res.product == "int64" and res.accumulator == "int32":
        if accumulator == "int32":
            raise AccumulatorOverflowError(f"{res.describe()}: int64 products do not fit an int32 accumulator")
        res.accumulator = "int64"
    return res
