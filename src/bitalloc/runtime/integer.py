"""Integer-exact reference execution of quantized Conv1d / Conv2d / Linear layers on the CPU.

For a :class:`~bitalloc.model.layers.QuantLayer` with input quantizer (step s_x, zero point z_x) and weight
quantizer (per output channel step s_w[c], zero point z_w[c], bias-correction terms xi[c], beta[c], so that
w_hat = xi s_w (q_w - z_w) + beta), the layer output is computed from integer codes only::

    a = q_x - z_x                       centred activation codes   (q_x = clamp(round(x / s_x) + z_x, qmin, qmax))
    w = q_w - z_w                       centred weight codes
    acc[c]  = sum_{i,k} w[c,i,k] a[i,k]           main accumulator (int32, or int64 when it could overflow)
    xsum[c] = sum_{i,k} a[i,k]   (over c's group)  second accumulator, needed only when beta != 0
    y[c] = s_x s_w[c] xi[c] acc[c] + s_x beta[c] xsum[c] + bias[c]          one rescale per output channel

which is exactly the fake-quant computation conv(s_x a, xi s_w w + beta) + bias, reordered (SPEC section 1:
"4-bit weights times 4-bit activations give 8-bit products, widened to 16 bits to match per-channel step
sizes, summed in an int32 accumulator"). Details:

* **Padding.** The wrapped layer's *own* forward runs on the centred codes (stored as float64, which holds
  these integers exactly) inside a :class:`torch.overrides.TorchFunctionMode` that replaces its
  ``F.conv1d`` / ``F.conv2d`` / ``F.linear`` call by the integer kernel. Zero padding of centred codes is
  padding with the zero point in the code domain, i.e. with the real value 0, exactly what the float layer
  does; "same"-padding subclasses (a ``ZeroPad2d`` child, EfficientNet's ``Conv2dStaticSamePadding``),
  ``padding="same"`` and reflect / replicate / circular ``padding_mode`` (copies of codes) are reproduced as
  they are. Any other operation the layer applies to its input before the convolution (or a weight other
  than its own ``weight``) raises :class:`IntegerExecutionError`: integer execution would not be exact.
* **Per-channel activation steps.** Input channels are split into *step groups*: channels whose steps are
  power-of-two multiples of each other (same float32 mantissa) share a group; within a group the codes of
  channel i are shifted left by e_i = log2(s_i / s_base) (at most ``max_shift``, default 8: the SPEC's
  widening to 16 bits), so the group sums in one accumulator at the common step s_base. Groups with
  unrelated steps (the usual case of per-channel ACIQ clipping) get one accumulator each and are rescaled
  separately: y[c] = sum_g s_g s_w[c] xi[c] acc_g[c] + ... . Per-tensor activations give one group.
* **Bias correction.** xi folds into the per-channel rescale; the shift beta multiplies the exact integer
  sum of the input codes over the receptive field (second accumulator, also analysed for overflow).
* **Overflow.** :func:`bitalloc.runtime.overflow.analyze` bounds both integer stages exactly (given the
  weight codes): the shifted products (int16 when they cannot overflow it, else widened to int32 / int64)
  and the sums (int32 when they cannot overflow it, else int64), with ``on_overflow="widen"``; with
  ``"raise"`` a stage that could overflow raises
  :class:`~bitalloc.runtime.overflow.AccumulatorOverflowError` naming the layer, bits and fan-in. The
  accumulator dtype of the kernels follows the analysis; :func:`integer_check` reports it per layer.
* **Online quantizers** (scale recomputed per input) and layers with float weights or activations are not
  integer-executable: :class:`IntegerExecutionError`.

**Kernels.** ``kernel="reference"`` forms the sums with im2col and integer matmuls (int32 / int64, as an
integer accelerator would). ``kernel="float"`` gives the *same integers* faster, through the ordinary float
convolution / matmul of the codes: every product w * a of integer codes and every partial sum of them is an
integer bounded in magnitude by the analysis' exact weight bound B (overflow.py: it bounds every partial sum, in
any order), and floating point represents all integers up to 2^24 (float32) / 2^53 (float64) exactly, so when
B <= 2^24 a float32 kernel, whatever its summation order, blocking or thread count, returns the exact integer
sums (float64 when B <= 2^53; otherwise the reference kernel). This is what makes a decoder built from such layers
bit-exact across processes and thread counts at the speed of float kernels (Balle et al., "Integer networks for
data compression", ICLR 2019). It applies to layers with one activation step group and no bias-correction shift;
other layers use the reference kernel.

Where the output differs from fake quantization: the integer accumulators are *equal* to the sums of the
fake-quant codes (tests compare them as int64). The rescale is done in float64 (s_x * s_w * xi is exact in
float64, the products and sums round at 2^-53) and the result rounded once to float32. The fake-quant path
computes the same real number in float32: one rounding for x_hat, up to three for w_hat (s (q - z), * xi,
+ beta), one per product and K - 1 for the sum over the fan-in K, one for the bias. Hence (Higham,
"Accuracy and Stability of Numerical Algorithms", 2002, eq. 3.4-3.5, gamma_n = n u / (1 - n u), u = 2^-24)::

    |y_fake - y_int| <= gamma_{K+6} * (sum |x_hat| |w_hat| + |bias|) + u |y_int|

computed exactly per output element by :attr:`IntegerResult.bound` (from a second pass on |a| and |w|).
In practice the difference is a few float32 ulps of the output (tests report the largest ratio to the bound).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from bitalloc.batches import batch_size, call_model, take_inputs
from bitalloc.errors import BitallocError
from bitalloc.model.layers import QuantLayer, quant_layers
from bitalloc.quant.grid import reshape_for_axis
from bitalloc.quantizers.base import QuantParams
from bitalloc.runtime.overflow import AccumulatorAnalysis, analyze

U32 = 2.0**-24  # unit roundoff of float32


class IntegerExecutionError(BitallocError, NotImplementedError):
    """A layer cannot be executed exactly in integers (online quantizer, float tensor, unsupported forward)."""


# ---- parameters ---------------------------------------------------------------------------------------------

@dataclass
class StepGroups:
    """Activation step groups of one layer input (see module docstring).

    ``index``: int64 [C] group of each input channel; ``shift``: int64 [C] left shift e_i of its codes;
    ``base``: float64 [G] common step of each group (s_i = base[index_i] * 2^shift_i exactly).
    """

    index: Tensor
    shift: Tensor
    base: Tensor

    @property
    def count(self) -> int:
        return int(self.base.numel())


def step_groups(scale: Tensor, *, merge_pow2: bool = True, max_shift: int = 8) -> StepGroups:
    """Group per-channel activation steps ``scale`` ([C], float32) into power-of-two related classes.

    Channels with the same float32 mantissa are exact power-of-two multiples of each other; a class is split
    further so that no channel is shifted by more than ``max_shift`` bits. ``merge_pow2=False`` groups only
    identical steps.
    """
    s = scale.detach().to(torch.float32).reshape(-1)
    c = s.numel()
    mant, expo = torch.frexp(s)
    index = torch.empty(c, dtype=torch.int64)
    shift = torch.zeros(c, dtype=torch.int64)
    bases: list[float] = []
    keys = mant.tolist() if merge_pow2 else s.tolist()
    by_key: dict[float, list[int]] = {}
    for i, k in enumerate(keys):
        by_key.setdefault(k, []).append(i)
    for members in by_key.values():
        members = sorted(members, key=lambda i: int(expo[i]))
        start = 0
        while start < len(members):
            e0 = int(expo[members[start]])
            end = start
            while end < len(members) and (merge_pow2 and int(expo[members[end]]) - e0 <= max_shift
                                          or int(expo[members[end]]) == e0):
                end += 1
            g = len(bases)
            bases.append(float(s[members[start]]))
            for i in members[start:end]:
                index[i] = g
                shift[i] = int(expo[i]) - e0
            start = end
    base = torch.tensor(bases, dtype=torch.float64)
    # exactness: every step is its group's base times a power of two
    if not torch.equal(base[index] * torch.pow(2.0, shift.to(torch.float64)), s.to(torch.float64)):
        raise IntegerExecutionError("internal error: activation steps are not exact power-of-two multiples")
    return StepGroups(index, shift, base)


def _centred(p: QuantParams, codes: Tensor, ndim: int) -> Tensor:
    return codes - reshape_for_axis(p.zero_point.to(torch.int64), ndim, p.axis if p.per_channel else None)


def _centred_float(p: QuantParams, x: Tensor) -> Tensor:
    """Centred activation codes clamp(round(x * (1/s)) + z, qmin, qmax) - z computed in float32: the integers of
    :meth:`QuantParams.quantize` (same operations, float32 holds codes of up to 24 bits exactly)."""
    axis = p.axis if p.per_channel else None
    s, z, lo, hi = (reshape_for_axis(t.float(), x.ndim, axis) for t in (p.scale, p.zero_point, p.qmin, p.qmax))
    return torch.clamp(torch.round(x.float() * torch.reciprocal(s)) + z, lo, hi) - z


@dataclass
class LayerInts:
    """Integer description of one QuantLayer: centred weight codes and the rescale terms."""

    name: str
    w: Tensor  # int64, the weight's shape, centred codes (pruned channels zeroed)
    w_scale: Tensor  # float64 [C_out]: s_w[c] * xi[c]
    beta: Tensor | None  # float64 [C_out] or None
    bias: Tensor | None  # float64 [C_out] or None
    act: QuantParams
    wparams: QuantParams
    w_bits: int
    a_bits: int
    _cache: dict = field(default_factory=dict, repr=False)

    def float_weight(self, dtype: torch.dtype) -> Tensor:
        """The centred weight codes as ``dtype`` (cached): exact for codes below 2^24 / 2^53."""
        if dtype not in self._cache:
            self._cache[dtype] = self.w.to(dtype)
        return self._cache[dtype]


def split_weight(ints: "LayerInts", max_code: int, limit: int = 2**24) -> tuple[int, Tensor, Tensor] | None:
    """Split the centred weight codes w = 2^s w_hi + w_lo (w_lo = w mod 2^s in [0, 2^s)) so that the sums of
    each part with input codes bounded by ``max_code`` are at most ``limit`` (2^24: exact in float32): the
    smallest such s, with the parts as float32 (cached), or None when no split keeps both parts under it.

    Each part's bound is max_c max_code * sum_i |w_part[c, i]| (output channel c, its whole fan-in); the layer's
    sum is then 2^s acc_hi + acc_lo, exact in float64 (Balle et al. 2019 use the same exactness argument for
    integer networks; splitting the operand is the classic way to widen an exact product, cf. Dekker 1971)."""
    key = ("split", int(max_code), int(limit))
    if key in ints._cache:
        return ints._cache[key]
    w = ints.w.reshape(ints.w.shape[0], -1) if ints.w.ndim > 1 else ints.w.reshape(1, -1)
    found = None
    for shift in range(1, max(int(w.abs().max()).bit_length(), 1) + 1):
        hi = torch.div(w, 2**shift, rounding_mode="floor")
        lo = w - hi * 2**shift
        if max(int(hi.abs().sum(1).max()), int(lo.sum(1).max())) * int(max_code) <= limit:
            found = (shift, hi.reshape(ints.w.shape).to(torch.float32), lo.reshape(ints.w.shape).to(torch.float32))
            break
    ints._cache[key] = found
    return found


def split_codes_shift(ints: "LayerInts", max_code: int, limit: int = 2**24) -> int | None:
    """The smallest s such that splitting the input codes x = 2^s x_hi + x_lo (x_lo = x mod 2^s) keeps the sums
    of each part with the layer's weights at most ``limit`` (max_c sum_i |w[c, i]| times the part's largest code),
    or None. For layers whose *inputs* are wide (16-bit codes of decoded latents) where splitting the weights
    cannot help (:func:`split_weight`)."""
    key = ("split-x", int(max_code), int(limit))
    if key not in ints._cache:
        w = ints.w.reshape(ints.w.shape[0], -1) if ints.w.ndim > 1 else ints.w.reshape(1, -1)
        l1 = int(w.abs().sum(1).max())
        found = None
        for shift in range(1, max(int(max_code).bit_length(), 1) + 1):
            if max(2**shift - 1, -(-int(max_code) // 2**shift)) * l1 <= limit:
                found = shift
                break
        ints._cache[key] = found
    return ints._cache[key]


def max_centred_code(p: "QuantParams") -> int:
    """The largest |code - zero point| an activation quantizer ``p`` produces."""
    return int(torch.maximum((p.qmax - p.zero_point).abs(), (p.qmin - p.zero_point).abs()).max())


def _exact_float_parts(ints: "LayerInts", inp: Tensor, fdt: torch.dtype) -> list[tuple[float, Tensor, Tensor]]:
    """The (multiplier, input, weight) kernels whose sum is the layer's exact integer sum in ``fdt``.

    float64 kernels are several times slower than float32 ones, so a sum that needs float64 runs as two float32
    kernels when the weights (:func:`split_weight`) or, for wide input codes, the codes (:func:`split_codes_shift`)
    split into parts with float32-exact sums; otherwise one kernel in ``fdt``."""
    if fdt != torch.float64:
        return [(1.0, inp.to(fdt), ints.float_weight(fdt))]
    if "max_code" not in ints._cache:
        ints._cache["max_code"] = max_centred_code(ints.act)
    max_code = ints._cache["max_code"]
    split = split_weight(ints, max_code)
    if split is not None:
        x32 = inp.to(torch.float32)
        return [(float(2 ** split[0]), x32, split[1]), (1.0, x32, split[2])]
    shift = split_codes_shift(ints, max_code)
    if shift is not None:
        x_hi = torch.floor(inp.to(torch.float64) / 2**shift)
        x_lo = inp.to(torch.float64) - x_hi * 2**shift
        w32 = ints.float_weight(torch.float32)
        return [(float(2**shift), x_hi.to(torch.float32), w32), (1.0, x_lo.to(torch.float32), w32)]
    return [(1.0, inp.to(fdt), ints.float_weight(fdt))]


def exact_float_dtype(bound: int) -> torch.dtype | None:
    """The narrowest float type whose sums of integers bounded by ``bound`` are exact: float32 up to 2^24,
    float64 up to 2^53, else None."""
    if bound <= 2**24:
        return torch.float32
    if bound <= 2**53:
        return torch.float64
    return None


KERNELS = ("reference", "float")


def _layer_bias(layer: QuantLayer) -> Tensor | None:
    """The bias the layer's forward adds (float64): times the weight quantizer's output-channel gate, if any
    (a pruned channel adds no bias: its output is exactly 0)."""
    with torch.no_grad():
        if hasattr(layer, "gated_bias"):
            layer.quantized_weight()  # the gate of a stochastic quantizer is the one of the last weight forward
            bias = layer.gated_bias()
        else:  # pragma: no cover - older QuantLayer
            bias = layer.layer.bias
    return None if bias is None else bias.detach().to(torch.float64)


def layer_ints(layer: QuantLayer) -> LayerInts:
    """Weight codes and rescale terms of ``layer``; raises IntegerExecutionError when not integer-executable."""
    name = layer.layer_name
    wq, aq = layer.weight_quantizer, layer.input_quantizer
    if wq is None or aq is None:
        which = "weights" if wq is None else "input activations"
        raise IntegerExecutionError(f"layer {name!r} has float {which}: integer execution needs both quantized")
    if getattr(aq, "online", False) or getattr(wq, "online", False):
        raise IntegerExecutionError(f"layer {name!r} uses online (per-input) activation statistics: integer "
                                    "execution supports offline (calibrated) quantizers only; calibrate it offline")
    if not aq.is_ready or not wq.is_ready:
        raise IntegerExecutionError(f"layer {name!r} is not calibrated: run bitalloc.calibration first")
    pw, pa = wq.qparams().detach(), aq.qparams().detach()
    if pa.online:
        raise IntegerExecutionError(f"layer {name!r}: online activation quantizer is not supported")
    if pw.grouped:
        raise IntegerExecutionError(f"layer {name!r} has group-wise weight scales (granularity 'group'): one integer "
                                    "accumulator per output cannot apply a scale per block of inputs; quantize its "
                                    "weights per channel (--weight-granularity channel) to run it in integer "
                                    "arithmetic")
    weight = layer.layer.weight.detach()
    cout = weight.shape[0]
    if pw.per_channel and pw.axis % weight.ndim != 0:
        raise IntegerExecutionError(f"layer {name!r}: weight quantized along axis {pw.axis}; integer execution "
                                    "needs per-output-channel (axis 0) or per-tensor weight steps")
    q = pw.quantize(weight)
    w = _centred(pw, q, weight.ndim)
    s = pw.scale.to(torch.float64).reshape(-1).expand(cout).clone()
    if pw.corr_scale is not None:
        s = s * pw.corr_scale.to(torch.float64).reshape(-1).expand(cout)
    beta = None
    if pw.corr_shift is not None and bool((pw.corr_shift != 0).any()):
        beta = pw.corr_shift.to(torch.float64).reshape(-1).expand(cout).clone()
    kept = pw.kept
    if kept is not None:
        keep = kept.reshape(-1).to(torch.bool).expand(cout)
        w = w * reshape_for_axis(keep.to(torch.int64), w.ndim, 0)
        if beta is not None:
            beta = beta * keep.to(torch.float64)
    bias = _layer_bias(layer)
    a_axis = pa.axis if pa.per_channel else None
    if a_axis is not None:
        expect = -1 if isinstance(layer.layer, nn.Linear) else 1
        if a_axis != expect:
            raise IntegerExecutionError(f"layer {name!r}: activation quantized along axis {a_axis}; integer "
                                        f"execution needs the input-channel axis ({expect}) or per tensor")
    return LayerInts(name=name, w=w, w_scale=s, beta=beta, bias=bias, act=pa, wparams=pw,
                     w_bits=int(pw.bits.max()), a_bits=int(pa.bits.max()))


# ---- integer kernels ----------------------------------------------------------------------------------------

@dataclass
class IntegerResult:
    """One integer execution of a layer's convolution / matmul.

    ``acc``: int64 [G, *output shape]: the main accumulator of each activation step group (G = 1 per tensor).
    ``xsum``: int64 [G, *output shape] or None: sum of (shifted) centred input codes over each output's
    receptive field (only when beta != 0). ``group_scales``: float64 [G]. ``output``: float32 rescaled output
    (bias included). ``bound``: float64, same shape: the bound on |fake-quant - output| (module docstring),
    when requested. ``x_codes``: int64 centred input codes (unpadded), for checks.
    """

    layer: str
    acc: Tensor
    xsum: Tensor | None
    group_scales: Tensor
    output: Tensor
    analysis: AccumulatorAnalysis
    accumulator: torch.dtype
    bound: Tensor | None = None
    x_codes: Tensor | None = None
    w_codes: Tensor | None = None


def _pair(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(t) for t in v)
    return v * n if len(v) == 1 else v


def _resolve_padding(x: Tensor, padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[Tensor, tuple[int, ...]]:
    """Turn string padding into explicit zero padding (PyTorch's "same": left = total // 2, right = rest)."""
    n = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return x, (0,) * n
        if padding == "same":
            pads: list[int] = []
            for k, d in zip(reversed(kernel), reversed(dilation)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return F.pad(x, pads), (0,) * n
        raise IntegerExecutionError(f"padding={padding!r} is not supported")
    return x, _pair(padding, n)


class _Kernel:
    """Integer kernels for one layer: conv (1-d / 2-d via im2col) and linear, with step groups and shifts."""

    def __init__(self, ints: LayerInts, groups_info: StepGroups, acc_dtype: torch.dtype, with_bound: bool):
        self.ints = ints
        self.sg = groups_info
        self.acc_dtype = acc_dtype
        self.with_bound = with_bound

    # rows of im2col / features -> per-row group index, shift
    def _row_terms(self, cin: int, k: int) -> tuple[Tensor, Tensor]:
        idx = self.sg.index.expand(cin) if self.sg.index.numel() == 1 else self.sg.index
        sh = self.sg.shift.expand(cin) if self.sg.shift.numel() == 1 else self.sg.shift
        return idx.repeat_interleave(k), sh.repeat_interleave(k)

    def _matmul(self, w: Tensor, cols: Tensor) -> Tensor:
        dt = self.acc_dtype
        return torch.matmul(w.to(dt), cols.to(dt)).to(torch.int64)

    def conv(self, x: Tensor, stride: Any, padding: Any, dilation: Any, groups: int, nd: int) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        w = self.ints.w
        kernel = tuple(w.shape[2:])
        dilation = _pair(dilation, nd)
        stride = _pair(stride, nd)
        x, pad = _resolve_padding(x, padding, kernel, dilation)
        if nd == 1:
            x4, k2, s2, p2, d2 = x.unsqueeze(2), (1,) + kernel, (1,) + stride, (0,) + pad, (1,) + dilation
        else:
            x4, k2, s2, p2, d2 = x, kernel, stride, pad, dilation
        n, cin = x4.shape[0], x4.shape[1]
        cout = w.shape[0]
        kk = math.prod(kernel)
        cols = F.unfold(x4.to(torch.float64), k2, dilation=d2, padding=p2, stride=s2)  # [N, cin*K, L], exact copies
        out_sp = [(x4.shape[2 + i] + 2 * p2[i] - d2[i] * (k2[i] - 1) - 1) // s2[i] + 1 for i in range(2)]
        cols = cols.to(torch.int64)
        gidx, gsh = self._row_terms(cin, kk)
        cols = cols << gsh.reshape(1, -1, 1)
        cin_g, cout_g = cin // groups, cout // groups
        r = cin_g * kk
        cols = cols.reshape(n, groups, r, -1)  # [N, G, R, L]
        gidx = gidx.reshape(groups, r)
        wm = w.reshape(groups, cout_g, r)  # [G, cout_g, R]
        accs, xsums, accs_abs, xsums_abs = [], [], [], []
        for g in range(self.sg.count):
            if self.sg.count == 1:
                cg = cols  # one step group (per-tensor activations): no masked copy
            else:
                cg = cols * (gidx == g).to(torch.int64).reshape(1, groups, r, 1)
            accs.append(self._matmul(wm, cg))  # [N, G, cout_g, L]
            if self.ints.beta is not None:
                xsums.append(cg.sum(dim=2, keepdim=True, dtype=self.acc_dtype).to(torch.int64).expand(-1, -1, cout_g, -1))
            if self.with_bound:
                accs_abs.append(torch.matmul(wm.abs(), cg.abs()))
                xsums_abs.append(cg.abs().sum(dim=2, keepdim=True).expand(-1, -1, cout_g, -1))

        def shape(ts: list[Tensor]) -> Tensor | None:
            if not ts:
                return None
            t = torch.stack(ts)  # [Gs, N, G, cout_g, L]
            t = t.reshape(len(ts), n, cout, *out_sp)
            return t.squeeze(3) if nd == 1 else t

        return shape(accs), shape(xsums), shape(accs_abs), shape(xsums_abs)

    def linear(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        w = self.ints.w  # [out, in]
        cin = w.shape[1]
        gidx, gsh = self._row_terms(cin, 1)
        xi = x.to(torch.int64) << gsh
        accs, xsums, accs_abs, xsums_abs = [], [], [], []
        out_shape = (*x.shape[:-1], w.shape[0])
        for g in range(self.sg.count):
            xg = xi if self.sg.count == 1 else xi * (gidx == g).to(torch.int64)
            accs.append(self._matmul(xg, w.t()))
            if self.ints.beta is not None:
                xsums.append(xg.sum(dim=-1, keepdim=True, dtype=self.acc_dtype).to(torch.int64).expand(out_shape))
            if self.with_bound:
                accs_abs.append(torch.matmul(xg.abs(), w.t().abs()))
                xsums_abs.append(xg.abs().sum(dim=-1, keepdim=True).expand(out_shape))
        st = lambda ts: torch.stack(ts) if ts else None  # noqa: E731
        return st(accs), st(xsums), st(accs_abs), st(xsums_abs)


def _analysis(ints: LayerInts, sg: StepGroups, groups: int, kk: int, on_overflow: str, accumulator: str,
              product: str = "auto") -> AccumulatorAnalysis:
    w = ints.w
    cout = w.shape[0]
    cin_g = w.shape[1]
    cin = cin_g * groups
    lo_c, hi_c = ints.act.qmin - ints.act.zero_point, ints.act.qmax - ints.act.zero_point
    lo_c = lo_c.reshape(-1).to(torch.int64).expand(cin)
    hi_c = hi_c.reshape(-1).to(torch.int64).expand(cin)
    sh_c = sg.shift.reshape(-1).expand(cin)
    # per (output channel, row): the input channel of the row in c's group
    grp = torch.arange(cout) // (cout // groups)
    chan = (grp.reshape(-1, 1) * cin_g + torch.arange(cin_g).reshape(1, -1)).repeat_interleave(kk, dim=1)  # [cout, R]
    return analyze(ints.name, w_codes=w.reshape(cout, -1), w_bits=ints.w_bits, a_lo=lo_c[chan], a_hi=hi_c[chan],
                   a_bits=ints.a_bits, fan_in=cin_g * kk, shifts=sh_c[chan], on_overflow=on_overflow,
                   accumulator=accumulator, product=product)


def _analysis_cached(ints: LayerInts, sg: StepGroups, groups: int, kk: int, on_overflow: str, accumulator: str,
                     product: str) -> AccumulatorAnalysis:
    """:func:`_analysis`, memoised on the LayerInts object (its weights do not change while it is reused)."""
    key = ("analysis", groups, kk, on_overflow, accumulator, product)
    if key not in ints._cache:
        ints._cache[key] = _analysis(ints, sg, groups, kk, on_overflow, accumulator, product)
    return ints._cache[key]


def analyze_layer(layer: QuantLayer, *, on_overflow: str = "widen", accumulator: str = "auto", product: str = "auto",
                  merge_pow2: bool = True, max_shift: int = 8) -> AccumulatorAnalysis:
    """Product-stage and accumulator-width analysis of a QuantLayer (bits, fan-in, exact worst-case products
    and sums; see overflow.py)."""
    ints = layer_ints(layer)
    sg = _groups_of(ints, merge_pow2, max_shift)
    inner = layer.layer
    groups = int(getattr(inner, "groups", 1)) if not isinstance(inner, nn.Linear) else 1
    kk = math.prod(ints.w.shape[2:]) if ints.w.ndim > 2 else 1
    return _analysis(ints, sg, groups, kk, on_overflow, accumulator, product)


def _groups_of(ints: LayerInts, merge_pow2: bool, max_shift: int) -> StepGroups:
    if ints.act.per_channel:
        return step_groups(ints.act.scale, merge_pow2=merge_pow2, max_shift=max_shift)
    return StepGroups(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                      ints.act.scale.detach().to(torch.float64).reshape(1))


_ALLOWED_ON_CODES = {"size", "dim", "__get__", "numel", "is_contiguous", "contiguous", "__len__", "stride",
                     "is_floating_point", "ndimension", "nelement", "get_device", "__format__", "__hash__"}


class _IntegerMode(TorchFunctionMode):
    """Runs a layer's own forward on centred codes, replacing its conv / linear by the integer kernel."""

    def __init__(self, layer: QuantLayer, codes: Tensor, run: Any):
        super().__init__()
        self.layer = layer
        self.tracked = {id(codes): codes}
        self.run = run

    def _is_tracked(self, args: Any, kwargs: dict) -> bool:
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, Tensor) and id(a) in self.tracked:
                return True
            if isinstance(a, (list, tuple)) and any(isinstance(t, Tensor) and id(t) in self.tracked for t in a):
                return True
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._is_tracked(args, kwargs):
            return func(*args, **kwargs)
        name = getattr(func, "__name__", repr(func))
        if func in (F.conv1d, F.conv2d, F.linear):
            return self.run(func, args, kwargs)
        if func is F.pad:
            mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
            value = kwargs.get("value", args[3] if len(args) > 3 else None)
            if mode == "constant" and value not in (None, 0, 0.0):
                raise IntegerExecutionError(f"layer {self.layer.layer_name!r} pads its input with the constant "
                                            f"{value}: only zero padding (the zero point) is exact in integers")
            out = func(*args, **kwargs)
            self.tracked[id(out)] = out
            return out
        if name in _ALLOWED_ON_CODES:
            return func(*args, **kwargs)
        raise IntegerExecutionError(f"layer {self.layer.layer_name!r} ({type(self.layer.layer).__name__}) applies "
                                    f"{name} to its input before the convolution: integer execution supports only "
                                    "padding followed by conv1d / conv2d / linear")


def integer_forward(layer: QuantLayer, x: Tensor, *, on_overflow: str = "widen", accumulator: str = "auto",
                    product: str = "auto", merge_pow2: bool = True, max_shift: int = 8, with_bound: bool = False,
                    keep_codes: bool = False, kernel: str = "reference",
                    ints: LayerInts | None = None) -> tuple[Tensor, list[IntegerResult]]:
    """Run ``layer`` on ``x`` in integer arithmetic. Returns (output, one IntegerResult per conv/linear call).

    ``accumulator``: "auto" (int32 unless the analysis says it could overflow), "int32" or "int64";
    ``on_overflow``: "widen" (int64) or "raise" (:class:`AccumulatorOverflowError`); ``product``: the product
    register, "auto" (int16 unless it could overflow), "int16", "int32" or "int64". ``with_bound`` also
    computes the bound on |fake-quant - integer| of each output (module docstring). ``kernel``: "reference"
    (im2col, integer matmuls) or "float" (the same sums through float kernels, exact by the analysis; module
    docstring). ``ints``: the layer's precomputed :func:`layer_ints` (weights unchanged since), to save
    re-quantizing the weights on every call.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}: choose one of {KERNELS}")
    ints = layer_ints(layer) if ints is None else ints
    sg = _groups_of(ints, merge_pow2, max_shift)
    inner = layer.layer
    pa = ints.act
    with torch.no_grad():
        fast_codes = kernel == "float" and not keep_codes and not with_bound
        if fast_codes:  # the same integers as pa.quantize, kept in float32 (exact: |codes| < 2^24)
            codes = _centred_float(pa, x.detach())
        else:
            codes = _centred(pa, pa.quantize(x.detach()), x.ndim)
        results: list[IntegerResult] = []
        weight = inner.weight

        def run(func, args, kwargs):
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            call = dict(zip(names, args))
            call.update(kwargs)
            if call.get("weight") is not weight or call.get("bias") is not inner.bias:
                raise IntegerExecutionError(f"layer {ints.name!r} calls {func.__name__} with a weight or bias other "
                                            "than its own parameters: integer execution would not be exact")
            inp = call["input"]
            if func is F.linear:
                if inp.shape[-1] != ints.w.shape[1]:
                    raise IntegerExecutionError(f"layer {ints.name!r}: input features {inp.shape[-1]} != {ints.w.shape[1]}")
                groups, kk = 1, 1
            else:
                groups = int(call.get("groups", 1))
                kk = math.prod(ints.w.shape[2:])
            an = _analysis_cached(ints, sg, groups, kk, on_overflow, accumulator, product)
            fdt = exact_float_dtype(an.bound) if kernel == "float" else None
            if fdt is not None and sg.count == 1 and ints.beta is None and not with_bound:
                parts = _exact_float_parts(ints, inp, fdt)
                acc = None
                for mult, x_in, w in parts:
                    if func is F.linear:
                        a = F.linear(x_in, w)
                    else:
                        a = func(x_in, w, None, call.get("stride", 1), call.get("padding", 0), call.get("dilation", 1),
                                 groups)
                    a = a if len(parts) == 1 else a.to(torch.float64) * mult  # parts recombine exactly in float64
                    acc = a if acc is None else acc + a
                ch_axis = -1 if func is F.linear else 1
                y = acc.to(torch.float64) * reshape_for_axis(ints.w_scale * float(sg.base[0]), acc.ndim, ch_axis)
                if ints.bias is not None:
                    y = y + reshape_for_axis(ints.bias, acc.ndim, ch_axis)
                out = y.to(torch.float32)
                results.append(IntegerResult(ints.name, acc.unsqueeze(0), None, sg.base, out, an, fdt, None,
                                             codes if keep_codes else None, ints.w if keep_codes else None))
                return out
            kern = _Kernel(ints, sg, torch.int32 if an.accumulator == "int32" else torch.int64, with_bound)
            if func is F.linear:
                acc, xsum, acc_abs, xsum_abs = kern.linear(inp)
                ch_axis = -1
            else:
                nd = 1 if func is F.conv1d else 2
                acc, xsum, acc_abs, xsum_abs = kern.conv(inp, call.get("stride", 1), call.get("padding", 0),
                                                         call.get("dilation", 1), groups, nd)
                ch_axis = 1
            out_nd = acc.ndim - 1
            gs = sg.base.reshape([-1] + [1] * out_nd)
            ws = reshape_for_axis(ints.w_scale, out_nd, ch_axis)
            y = (gs * acc.to(torch.float64)).sum(0) * ws
            babs = None
            if with_bound:
                babs = (gs * acc_abs.to(torch.float64)).sum(0) * ws.abs()
            if ints.beta is not None:
                bt = reshape_for_axis(ints.beta, out_nd, ch_axis)
                y = y + bt * (gs * xsum.to(torch.float64)).sum(0)
                if with_bound:
                    babs = babs + bt.abs() * (gs * xsum_abs.to(torch.float64)).sum(0)
            if ints.bias is not None:
                bb = reshape_for_axis(ints.bias, out_nd, ch_axis)
                y = y + bb
                if with_bound:
                    babs = babs + bb.abs()
            out = y.to(torch.float32)
            bound = None
            if with_bound:
                kfan = an.fan_in + 6
                gamma = kfan * U32 / (1 - kfan * U32)
                bound = gamma * babs + U32 * y.abs()
            results.append(IntegerResult(ints.name, acc, xsum, sg.base, out, an, kern.acc_dtype, bound,
                                         codes if keep_codes else None, ints.w if keep_codes else None))
            return out

        cf = codes if fast_codes else codes.to(torch.float64)  # exact integers; padding / conv are intercepted
        with _IntegerMode(layer, cf, run):
            out = inner(cf)
        if not results:
            raise IntegerExecutionError(f"layer {ints.name!r}: its forward never called conv1d / conv2d / linear on "
                                        "its input")
    return out, results


# ---- whole models ------------------------------------------------------------------------------------------

@dataclass
class IntegerRun:
    """What :func:`integer_mode` recorded: per layer, the analyses, and the layers left in fake quant."""

    analyses: dict[str, AccumulatorAnalysis] = field(default_factory=dict)
    results: dict[str, list[IntegerResult]] = field(default_factory=dict)
    fake_quant_layers: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def integer_mode(model: nn.Module, *, on_overflow: str = "widen", accumulator: str = "auto", product: str = "auto",
                 record: bool = False, strict: bool = False, with_bound: bool = False,
                 kernel: str = "reference", cache: dict | None = None) -> Iterator[IntegerRun]:
    """Run every integer-executable QuantLayer of ``model`` through :func:`integer_forward` inside the block.

    Layers that are not integer-executable (float activations or weights, online quantizers, unsupported
    forwards) run their fake-quant forward and are listed in ``run.fake_quant_layers`` with the reason, or
    raise with ``strict=True``. Accumulator overflow errors (``on_overflow="raise"``) always propagate.
    ``record=True`` keeps every IntegerResult (memory!) in ``run.results``; ``with_bound`` computes the
    float32 rounding bound of each output (for checks). ``kernel``: see :func:`integer_forward`; the weights'
    integer codes are computed once, on entry (do not change weights inside the block); ``cache``: a dict kept by
    the caller across blocks (weight codes and analyses, keyed by layer) for a model whose weights do not change.
    """
    run = IntegerRun()
    patched: list[QuantLayer] = []
    prepared: dict[int, LayerInts] = {} if cache is None else cache

    def forward(layer: QuantLayer, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        try:
            if args or kwargs:
                raise IntegerExecutionError(f"layer {layer.layer_name!r} is called with extra arguments")
            out, res = integer_forward(layer, layer.smooth_input(x), on_overflow=on_overflow, accumulator=accumulator,
                                       product=product, with_bound=with_bound, kernel=kernel,
                                       ints=prepared.get(id(layer)))
        except IntegerExecutionError as exc:
            if strict:
                raise
            run.fake_quant_layers[layer.layer_name] = str(exc)
            return QuantLayer.forward(layer, x, *args, **kwargs)
        run.analyses[layer.layer_name] = res[-1].analysis
        if record:
            run.results.setdefault(layer.layer_name, []).extend(res)
        return out

    for name, layer in quant_layers(model):
        try:
            if id(layer) not in prepared:
                prepared[id(layer)] = layer_ints(layer)
        except IntegerExecutionError as exc:
            if strict:
                raise
            run.fake_quant_layers[name] = str(exc)
            continue
        layer.forward = functools.partial(forward, layer)  # instance attribute shadows QuantLayer.forward
        patched.append(layer)
    try:
        yield run
    finally:
        for layer in patched:
            del layer.forward


def fake_quant_codes(x_hat: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None = None) -> Tensor:
    """Recover integer codes from fake-quantized values: round(x_hat / s) + z (int64), checking they are codes.

    Raises ValueError if some x_hat / s is farther from an integer than float32 rounding of x_hat allows
    (1e-3 + 4 ulp of the code), i.e. x_hat is not on the grid.
    """
    s = reshape_for_axis(scale.to(torch.float64), x_hat.ndim, axis)
    z = reshape_for_axis(zero_point.to(torch.int64), x_hat.ndim, axis)
    v = x_hat.detach().to(torch.float64) / s
    r = torch.round(v)
    if v.numel() and bool(((v - r).abs() > 1e-3 + v.abs() * 4 * U32).any()):
        raise ValueError("values are not on the quantization grid")
    return r.to(torch.int64) + z


# ---- checking a whole model -----------------------------------------------------------------------------------

@dataclass
class LayerCheck:
    """One layer of :func:`integer_check`: integer output against the fake-quant output on the same input."""

    layer: str
    max_abs_diff: float  # max |integer - fake quant| over the layer's outputs
    max_abs_output: float  # max |fake-quant output| (scale of the difference)
    max_bound_ratio: float  # max |diff| / (float32 rounding bound); <= 1 means within the stated bound
    analysis: AccumulatorAnalysis

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "max_abs_diff": self.max_abs_diff, "max_abs_output": self.max_abs_output,
                "max_bound_ratio": self.max_bound_ratio, "product": self.analysis.product,
                "accumulator": self.analysis.accumulator, "analysis": self.analysis.to_dict()}


@dataclass
class IntegerCheck:
    """What :func:`integer_check` measured."""

    samples: int
    layers: list[LayerCheck] = field(default_factory=list)
    fake_quant_layers: dict[str, str] = field(default_factory=dict)  # not integer-executable, with the reason
    output_max_abs_diff: float = 0.0  # whole model in integer mode against the fake-quant model
    output_max_abs: float = 0.0
    top1_agreement: float = 100.0  # % of samples with the same arg-max (classifier outputs)

    @property
    def within_bound(self) -> bool:
        """Every layer's integer output lies within the float32 rounding bound of its fake-quant output."""
        return all(l.max_bound_ratio <= 1.0 for l in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "layers": [l.to_dict() for l in self.layers],
                "fake_quant_layers": dict(self.fake_quant_layers), "output_max_abs_diff": self.output_max_abs_diff,
                "output_max_abs": self.output_max_abs, "top1_agreement": self.top1_agreement,
                "within_bound": self.within_bound}


def integer_check(model: nn.Module, data: Any, *, on_overflow: str = "widen", accumulator: str = "auto",
                  product: str = "auto", samples: int | None = None) -> IntegerCheck:
    """Run the integer path against the fake-quant model on ``data`` (tensors or (x, ...) batches).

    Per layer: the layer's input is taken from the fake-quant model, the layer is executed in integers
    (:func:`integer_forward`, with the float32 rounding bound) and compared with its fake-quant output
    (max |difference| and its largest ratio to the bound); the analysis gives the product register and the
    accumulator of each layer. Whole model: the output of the model in :func:`integer_mode` against the
    fake-quant output (max |difference|, arg-max agreement), where small per-layer differences can move a
    code of the next quantizer by one step. ``samples`` limits the number of inputs (im2col in int64 is
    memory-hungry: a few images suffice for an ImageNet model).
    """
    was_training = model.training
    model.eval()
    xs: list[Any] = list(take_inputs(data, samples))
    if not xs:
        raise BitallocError("integer_check needs at least one input")
    res = IntegerCheck(samples=sum(batch_size(x) for x in xs))
    checks: dict[str, LayerCheck] = {}
    hooks = []

    def hook(layer: QuantLayer, inputs: tuple, output: Tensor) -> None:
        if len(inputs) != 1 or not isinstance(output, Tensor):
            res.fake_quant_layers[layer.layer_name] = "called with extra arguments"
            return
        try:
            out, results = integer_forward(layer, layer.smooth_input(inputs[0]), on_overflow=on_overflow,
                                           accumulator=accumulator, product=product, with_bound=True)
        except IntegerExecutionError as exc:
            res.fake_quant_layers[layer.layer_name] = str(exc)
            return
        diff = (out.to(torch.float64) - output.detach().to(torch.float64)).abs()
        bound = results[-1].bound
        ratio = float((diff / bound.clamp_min(1e-300)).max()) if diff.numel() else 0.0
        prev = checks.get(layer.layer_name)
        c = LayerCheck(layer.layer_name, float(diff.max()) if diff.numel() else 0.0,
                       float(output.detach().abs().max()) if output.numel() else 0.0, ratio, results[-1].analysis)
        if prev is not None:
            c.max_abs_diff = max(c.max_abs_diff, prev.max_abs_diff)
            c.max_abs_output = max(c.max_abs_output, prev.max_abs_output)
            c.max_bound_ratio = max(c.max_bound_ratio, prev.max_bound_ratio)
        checks[layer.layer_name] = c

    order = [name for name, _ in quant_layers(model)]
    try:
        for _, layer in quant_layers(model):
            hooks.append(layer.register_forward_hook(hook, prepend=True))  # before any output quantizer
        refs = []
        with torch.no_grad():
            for x in xs:
                refs.append(call_model(model, x))
    finally:
        for h in hooks:
            h.remove()
    res.layers = [checks[n] for n in order if n in checks]
    agree, total, dmax, omax = 0, 0, 0.0, 0.0
    with torch.no_grad(), integer_mode(model, on_overflow=on_overflow, accumulator=accumulator, product=product):
        for x, ref in zip(xs, refs):
            got = call_model(model, x)
            if not isinstance(got, Tensor):
                continue
            d = (got.to(torch.float64) - ref.to(torch.float64)).abs()
            dmax = max(dmax, float(d.max()) if d.numel() else 0.0)
            omax = max(omax, float(ref.abs().max()) if ref.numel() else 0.0)
            if got.ndim >= 2:
                agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
                total += int(got.argmax(-1).numel())
    res.output_max_abs_diff, res.output_max_abs = dmax, omax
    res.top1_agreement = 100.0 * agree / total if total else 100.0
    model.train(was_training)
    return res
