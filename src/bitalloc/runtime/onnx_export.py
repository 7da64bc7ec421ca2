"""ONNX export of a bitalloc-quantized model in the QDQ format (QuantizeLinear / DequantizeLinear).

Approach (works for every model ``bitalloc.prepare`` accepts):

1. **Float export with markers.** A float copy of the prepared model (BatchNorm already folded, quantizers
   removed) is exported with PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``;
   the dynamo exporter needs onnxscript, which bitalloc does not depend on). Each quantized layer's input and
   weight pass through identity functions whose ONNX symbolic is a marker node (``bitalloc::LayerInput`` /
   ``bitalloc::LayerWeight``, attribute ``layer``), so the rewrite knows exactly which tensor is the layer's
   input (before any "same" padding its forward applies) and which Conv / Gemm / MatMul uses the weight (the
   markers also keep the exporter from folding anything into the weight).
2. **Rewrite** (the ``onnx`` package). Weight marker -> integer initializer + ``DequantizeLinear`` (int8 for
   symmetric grids, uint8 for asymmetric; per output channel, axis 0, or axis 1 for a MatMul's [in, out]
   weight); the bias-correction factor xi folds exactly into the per-channel scale (s_w * xi). Input marker ->
   ``QuantizeLinear -> DequantizeLinear`` with bitalloc's scale and zero point (uint8 for asymmetric
   activations, codes 0..2^b-1; int8 for symmetric ones); per-channel activation steps use per-axis Q/DQ
   (axis 1 for convolutions, -1 for linear layers). Layers left in float stay float.
3. **Narrow widths on the int8 grid.** A b-bit grid (b < 8) has codes inside the int8 / uint8 range, but
   QuantizeLinear clamps only to the full 8-bit range. Per-tensor grids get an integer ``Clip`` to
   [qmin, qmax] between QuantizeLinear and DequantizeLinear (exact, and onnxruntime still fuses the Conv
   before the Q and the one after the DQ into int8 kernels); per-channel grids (bits or steps per channel)
   get ``Max`` / ``Min`` with per-channel real bounds [(qmin - z) s, (qmax - z) s] before the Q. The 4-bit
   ONNX types (opset 21 int4 / uint4) are not used: onnxruntime 1.32's CPU provider runs DQ(int4) -> Conv
   as a float convolution (measured: slower than int8 and than FP32). Widths above 8 bits are not 8-bit at
   all: activations are fake-quantized with float operators (Mul 1/s, Round, Add z, Clip, Sub z, Mul s: the
   same arithmetic as bitalloc), weights are stored as their dequantized float values.
4. **Bias-correction shift** beta (w_hat = xi s (q - z) + beta per output channel) is not expressible by
   DequantizeLinear (integer zero points). ``bias_shift="exact"`` (default) adds beta[c] * S, where S is the
   sum of the (dequantized) input over the receptive field, computed by a small float Conv with all-ones
   weights (one output per group) or a ReduceSum for linear layers: the same function as fake quantization,
   but the layer no longer fuses into an int8 kernel. ``"requantize"`` stores w_hat on a finer 8-bit grid
   (step xi s / M, codes M (q - z) + round(M beta / (xi s)), M the largest power of two that fits): int8
   kernels, shift error <= xi s / (2 M) (M = 1 for 8-bit channels: the shift is then rounded to whole steps).
   ``"fold"`` folds beta[c] * E[S] into the bias, E[S] the per-channel mean of S over ``calibration_data``
   (ignores the variation of S). Both are approximations of the bitalloc model (the report gives each layer's
   largest shift error; the agreement check of :func:`bitalloc.runtime.ort.compare_with_model` measures the
   effect on the outputs), so they are opt-in.
5. **Graph simplifications that keep the function** (``simplify=True``): zero ``Pad`` nodes are folded into
   the following Conv's pads; each QuantizeLinear is copied upstream across operators that commute with a
   monotone quantizer (MaxPool, Reshape, Flatten, Transpose, Relu, Clip, zero Pad, ...: same grid, no new
   rounding); Relu / Clip nodes made redundant by the QuantizeLinear after them (it saturates at the same
   bounds) are removed. A Gemm's bias becomes int32 codes at step s_x * s_w[c] (onnxruntime fuses QGemm
   only then; rounding <= half that step); Conv biases stay float (onnxruntime quantizes them itself).
6. **Optional alignment with onnxruntime's int8 fusion** (``align="ort"``): onnxruntime runs a Conv in int8
   (QLinearConv) only when its inputs come from DequantizeLinear *and its output feeds a QuantizeLinear*;
   bitalloc quantizes layer inputs only, so convolutions whose outputs feed a residual Add or an average
   pooling stay float. ``align="ort"`` adds uint8 Q/DQ pairs on those outputs and on the float inputs of Add
   nodes (reusing the next layer's Q/DQ when the tensor has one, else a min-max range measured on
   ``calibration_data``), which lets onnxruntime fuse QLinearConv / QLinearAdd / QLinearGlobalAveragePool.
   These are *extra* quantization points, not in the bitalloc model (listed in the report).
   :func:`bitalloc.runtime.align.align_for_ort` puts the same points (and onnxruntime's int32 bias grid) into
   a copy of the bitalloc model instead; exporting that model writes its tensor quantizers
   (``bitalloc::TensorQuant`` markers) as Q/DQ, removes the re-quantizations on an identical grid and the
   activations that are the identity on a grid (both exact), and ``align="ort"`` then finds nothing to add.

Where the exported model differs from bitalloc's fake quantization: (a) onnxruntime's QuantizeLinear
computes round(x / s), bitalloc round(x * (1 / s)); they differ only when x / s lies within about one
float32 ulp of a half-integer (7.5e-7 of random values, measured); (b) float32 summation order; (c) the
int32 Gemm bias rounding; (d) when onnxruntime fuses int8 kernels, its requantization of the int32
accumulator to the next layer's uint8 grid (float multiplier, rounding) instead of float conv + Q, and its
own rounding of float convolution biases to int32 at s_x * s_w[c] (exact for an aligned model, whose biases
lie on that grid); (e) the approximate bias-shift modes and the extra points of ``align="ort"``. (a)-(c) are float-rounding small, but a
difference that straddles a rounding boundary of the next quantizer moves that code by one step;
:func:`bitalloc.runtime.ort.compare_with_model` reports the top-1 agreement and largest difference.

Online (per-input) quantizers cannot be exported (:class:`~bitalloc.errors.ConfigError`).
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitalloc.batches import batch_inputs
from bitalloc.errors import ConfigError
from bitalloc.model.fold_bn import set_submodule
from bitalloc.model.layers import _PLAIN_FORWARDS, QuantLayer, quant_layers
from bitalloc.quant.grid import reshape_for_axis
from bitalloc.quantizers.base import QuantParams

MARK_DOMAIN = "bitalloc"
_SHIFT_DOC = "bitalloc: bias-correction shift branch"
DEFAULT_OPSET = 17


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ConfigError("ONNX export needs the onnx package: pip install 'bitalloc[onnx]'") from None
    return onnx


# ---- markers --------------------------------------------------------------------------------------------------

class _Mark(torch.autograd.Function):
    """Identity whose ONNX symbolic is a ``bitalloc::<kind>`` marker node naming the layer."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, kind: str, name: str) -> Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def symbolic(g: Any, x: Any, kind: str, name: str) -> Any:
        out = g.op(f"{MARK_DOMAIN}::{kind}", x, layer_s=name)
        out.setType(x.type())
        return out


class _Marked(nn.Module):
    """The float layer of a QuantLayer, with its input and weight passed through markers."""

    def __init__(self, layer: nn.Module, name: str, smooth: QuantLayer | None = None):
        super().__init__()
        self.layer = layer
        self.name = name
        self._plain = type(layer).forward in _PLAIN_FORWARDS
        self.smooth = smooth.smooth_input if smooth is not None and smooth.smooth_scale is not None else None

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.smooth is not None:  # SmoothQuant: x / s (a float Div) before the layer's input quantizer
            x = self.smooth(x)
        x = _Mark.apply(x, "LayerInput", self.name)
        w = _Mark.apply(self.layer.weight, "LayerWeight", self.name)
        if self._plain and not args and not kwargs:
            if isinstance(self.layer, nn.Linear):
                return F.linear(x, w, self.layer.bias)
            return self.layer._conv_forward(x, w, self.layer.bias)
        # the layer's own forward with the marked weight (functional_call does not work under jit tracing)
        layer = self.layer
        param = layer._parameters.pop("weight")
        layer.__dict__["weight"] = w
        try:
            return layer(x, *args, **kwargs)
        finally:
            del layer.__dict__["weight"]
            layer._parameters["weight"] = param


@torch.no_grad()
def _gate_bias(ql: QuantLayer) -> None:
    """Store the bias the QuantLayer's forward adds (times its weight quantizer's output-channel gate: a pruned
    channel adds no bias) in the wrapped layer of a copy."""
    if not hasattr(ql, "gated_bias") or ql.layer.bias is None:
        return
    ql.quantized_weight()
    b = ql.gated_bias()
    if b is not None and b is not ql.layer.bias:
        ql.layer.bias.copy_(b)


def marked_float_copy(model: nn.Module) -> nn.Module:
    """A float copy of a prepared model: every QuantLayer replaced by its wrapped layer between markers."""
    m = copy.deepcopy(model).eval()
    for name, ql in quant_layers(m):
        _gate_bias(ql)
        marked = _Marked(ql.layer, name, ql)
        # forward hooks on the layer (tensor quantizers of an aligned model) stay on its replacement
        marked._forward_hooks.update(ql._forward_hooks)
        set_submodule(m, name, marked)
    from bitalloc.runtime.align import tensor_points

    for tq in tensor_points(m).values():
        tq.marker = True
    for attr in ("bitalloc_info", "bitalloc_calibration"):
        if attr in m.__dict__:
            del m.__dict__[attr]
    return m


def export_float(model: nn.Module, example_inputs: Any, *, opset: int = DEFAULT_OPSET, markers: bool = False,
                 input_names: list[str] | None = None, output_names: list[str] | None = None,
                 dynamic_batch: bool = True) -> Any:
    """Export ``model`` (float; a prepared model is exported as its float copy) to an onnx.ModelProto.

    ``markers=True`` keeps bitalloc's marker nodes (only useful for :func:`export_onnx`). The batch axis of
    every input and output is dynamic unless ``dynamic_batch=False``.
    """
    onnx = _require_onnx()
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        model = marked_float_copy(model)
        if not markers:
            raise ConfigError("export_float(markers=False) needs an unprepared float model")
    args, kwargs = _export_args(model, example_inputs)
    with torch.no_grad():
        outs = model(*args, **kwargs)
    n_out = len(outs) if isinstance(outs, (list, tuple)) else 1
    input_names = input_names or ((["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))])
                                  if not kwargs else list(kwargs))
    output_names = output_names or (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
    dyn = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, buf, kwargs=kwargs or None, dynamo=False, opset_version=opset,
                          input_names=input_names,
                          output_names=output_names, dynamic_axes=dyn, do_constant_folding=True,
                          custom_opsets={MARK_DOMAIN: 1} if markers else None)
    return onnx.load_from_string(buf.getvalue())


def _export_args(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """Positional and keyword arguments of the export (:func:`bitalloc.batches.model_args`): a tensor, a tuple of
    positional inputs, or a dict of keyword inputs (the graph's inputs then carry those names, in the order of
    ``forward``'s parameters, as the exporter binds them)."""
    import inspect

    from bitalloc.batches import model_args

    args, kwargs = model_args(model, example_inputs)
    if kwargs:
        if args:
            raise ConfigError("ONNX export of a forward that takes one dict is not supported; give keyword inputs "
                              "(a dict whose keys are forward's parameter names)")
        order = list(inspect.signature(model.forward).parameters)
        kwargs = dict(sorted(kwargs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    elif len(args) == 1 and isinstance(args[0], dict):
        raise ConfigError("ONNX export of a forward that takes one dict is not supported; give keyword inputs "
                          "(a dict whose keys are forward's parameter names)")
    return tuple(args), kwargs


# ---- report ---------------------------------------------------------------------------------------------------

@dataclass
class LayerExport:
    """How one quantized layer was exported."""

    name: str
    op: str = ""
    weight: str = "float"  # "int8" | "uint8" | "float (N-bit values)" | "float"
    w_bits: int | None = None
    act: str = "float"  # "uint8" | "int8" | "float-emulated (N bits)" | "float"
    a_bits: int | None = None
    narrow: bool = False  # a Clip / Max-Min restricts the 8-bit grid to a narrower one
    per_channel_act: bool = False
    bias_shift: str = "none"  # "none" | "exact" | "folded"
    max_abs_shift: float = 0.0
    max_shift_error: float = 0.0  # bias_shift="requantize": max |beta - represented shift|
    int32_bias: bool = False  # bias stored as int32 codes at step s_x * s_w[c] (what int8 kernels add)
    max_bias_rounding: float = 0.0  # max |bias - dequantized int32 bias|

    @property
    def int8(self) -> bool:
        """Weight and activation both on an 8-bit integer type (what onnxruntime can run with int8 kernels)."""
        return self.weight in ("int8", "uint8") and self.act in ("int8", "uint8") and not self.per_channel_act


@dataclass
class ExportReport:
    path: str | None
    opset: int
    bias_shift: str
    align: str
    layers: list[LayerExport] = field(default_factory=list)
    float_layers: list[dict[str, str]] = field(default_factory=list)
    extra_qdq: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    model_points: list[str] = field(default_factory=list)  # tensor quantizers of an aligned model (runtime/align.py)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for entry, layer in zip(d["layers"], self.layers):
            entry["int8"] = layer.int8
        d["int8_layers"] = sum(l.int8 for l in self.layers)
        return d


# ---- graph helpers --------------------------------------------------------------------------------------------

class _Names:
    def __init__(self, graph: Any):
        self.used = {n.name for n in graph.node} | {o for n in graph.node for o in n.output} | \
            {i.name for i in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}

    def __call__(self, base: str) -> str:
        base = base.replace("/", "_").strip("_") or "t"
        name, i = base, 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name


def _np(t: Tensor | np.ndarray, dtype: Any) -> np.ndarray:
    a = t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)
    return np.array(a, dtype=dtype, order="C", copy=True)  # (np.ascontiguousarray would make 0-d arrays 1-d)


class _Rewriter:
    """Collects new nodes and initializers for one graph."""

    def __init__(self, model: Any):
        import onnx
        from onnx import helper, numpy_helper

        self.onnx, self.helper, self.nh = onnx, helper, numpy_helper
        self.model = model
        self.graph = model.graph
        self.names = _Names(self.graph)
        self.inits: list[Any] = []

    def init(self, base: str, array: np.ndarray) -> str:
        name = self.names(base)
        self.inits.append(self.nh.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | None = None, base: str = "", **attrs: Any) -> Any:
        outputs = outputs or [self.names(f"{base}_{op}_out")]
        return self.helper.make_node(op, inputs, outputs, name=self.names(f"{base}_{op}"), **attrs)


def _qtype(signed: bool) -> tuple[Any, int, int]:
    return (np.int8, -128, 127) if signed else (np.uint8, 0, 255)


def _broadcast_shape(c: int, rank: int | None, axis: int) -> list[int]:
    if rank is None or axis < 0:
        return [c]
    shape = [1] * rank
    shape[axis] = c
    return shape


def _act_nodes(rw: _Rewriter, base: str, x: str, out: str, p: QuantParams, rank: int | None,
               axis: int) -> tuple[list[Any], LayerExport]:
    """Nodes computing ``out`` = fake-quant(x) with ``p`` (Q/DQ on the 8-bit grid, or float emulation)."""
    info = LayerExport(name=base)
    per_channel = p.per_channel
    bits = int(p.bits.max())
    s = p.scale.detach().to(torch.float32)
    z = p.zero_point.detach().to(torch.int64)
    qmin, qmax = p.qmin.to(torch.int64), p.qmax.to(torch.int64)
    c = int(s.numel()) if per_channel else 1
    info.a_bits, info.per_channel_act = bits, per_channel
    shape = _broadcast_shape(c, rank, axis) if per_channel else []
    lo_real = ((qmin - z).to(torch.float64) * s.to(torch.float64)).to(torch.float32)
    hi_real = ((qmax - z).to(torch.float64) * s.to(torch.float64)).to(torch.float32)
    nodes: list[Any] = []

    def clamp(src: str, lo: Tensor, hi: Tensor, dst: str | None = None) -> str:
        if not per_channel:
            n = rw.node("Clip", [src, rw.init(f"{base}_lo", _np(lo.reshape(()), np.float32)),
                                 rw.init(f"{base}_hi", _np(hi.reshape(()), np.float32))],
                        [dst] if dst else None, base=base)
            nodes.append(n)
            return n.output[0]
        lo_b = _np(lo.reshape(shape), np.float32)
        hi_b = _np(hi.reshape(shape), np.float32)
        n1 = rw.node("Max", [src, rw.init(f"{base}_lo", lo_b)], base=base)
        n2 = rw.node("Min", [n1.output[0], rw.init(f"{base}_hi", hi_b)], [dst] if dst else None, base=base)
        nodes.extend([n1, n2])
        return n2.output[0]

    if bits <= 8:
        dtype, tmin, tmax = _qtype(p.signed)
        info.act = "int8" if p.signed else "uint8"
        narrow = bool((qmin > tmin).any() or (qmax < tmax).any())
        info.narrow = narrow
        # per-channel narrow grids: clamp the real values first (Max / Min with per-channel bounds)
        src = clamp(x, lo_real, hi_real) if narrow and per_channel else x
        attrs = {"axis": axis} if per_channel else {}
        sc = rw.init(f"{base}_scale", _np(s.reshape(-1) if per_channel else s.reshape(()), np.float32))
        zp = rw.init(f"{base}_zero_point", _np(z.reshape(-1) if per_channel else z.reshape(()), dtype))
        q = rw.node("QuantizeLinear", [src, sc, zp], base=base, **attrs)
        nodes.append(q)
        codes = q.output[0]
        if narrow and not per_channel:
            # per-tensor narrow grid: clamp the 8-bit codes to [qmin, qmax] (an integer Clip between Q and DQ:
            # exact, and onnxruntime still fuses the producer's Conv -> Q and the consumer's DQ -> Conv)
            cl = rw.node("Clip", [codes, rw.init(f"{base}_qmin", _np(qmin.reshape(()), dtype)),
                                  rw.init(f"{base}_qmax", _np(qmax.reshape(()), dtype))], base=base)
            nodes.append(cl)
            codes = cl.output[0]
        dq = rw.node("DequantizeLinear", [codes, sc, zp], [out], base=base, **attrs)
        nodes.append(dq)
        return nodes, info
    # wider than 8 bits: the fake-quant arithmetic in float32, operator by operator (exact for codes < 2^24)
    info.act = f"float-emulated ({bits} bits)"
    sh = shape if per_channel else []
    inv = rw.init(f"{base}_inv_scale", _np(torch.reciprocal(s).reshape(sh), np.float32))
    zf = rw.init(f"{base}_zero_point_f", _np(z.to(torch.float32).reshape(sh), np.float32))
    scf = rw.init(f"{base}_scale", _np(s.reshape(sh), np.float32))
    n1 = rw.node("Mul", [x, inv], base=base)
    n2 = rw.node("Round", [n1.output[0]], base=base)
    n3 = rw.node("Add", [n2.output[0], zf], base=base)
    nodes += [n1, n2, n3]
    qmin_b = qmin.to(torch.float32).expand(c) if per_channel else qmin.to(torch.float32)
    qmax_b = qmax.to(torch.float32).expand(c) if per_channel else qmax.to(torch.float32)
    clipped = clamp(n3.output[0], qmin_b, qmax_b)
    n4 = rw.node("Sub", [clipped, zf], base=base)
    n5 = rw.node("Mul", [n4.output[0], scf], [out], base=base)
    nodes += [n4, n5]
    return nodes, info


@dataclass
class _WeightInts:
    codes: Tensor  # int64, weight shape
    scale: Tensor  # float32 [C_out] or 0-d (s * xi)
    zero_point: Tensor  # int64 [C_out] or 0-d
    per_channel: bool
    signed: bool
    bits: int
    beta: Tensor | None  # float64 [C_out]
    w_hat: Tensor  # float32 dequantized weight (bitalloc's fake-quant weight)


def _weight_ints(layer: QuantLayer) -> _WeightInts:
    wq = layer.weight_quantizer
    w = layer.layer.weight.detach()
    p = wq.qparams().detach()
    cout = w.shape[0]
    if p.per_channel and p.axis % w.ndim != 0:
        raise ConfigError(f"layer {layer.layer_name!r}: weights quantized along axis {p.axis}; the QDQ export needs "
                          "per-output-channel (axis 0) or per-tensor weight steps")
    codes = p.quantize(w)
    s = p.scale.to(torch.float64)
    z = p.zero_point.to(torch.int64)
    xi = p.corr_scale.to(torch.float64).reshape(-1) if p.corr_scale is not None else None
    per_channel = p.per_channel or (xi is not None and bool((xi != 1).any()))
    if per_channel:
        s = s.reshape(-1).expand(cout).clone()
        z = z.reshape(-1).expand(cout).clone()
        if xi is not None:
            s = s * xi.expand(cout)
    beta = None
    if p.corr_shift is not None and bool((p.corr_shift != 0).any()):
        beta = p.corr_shift.to(torch.float64).reshape(-1).expand(cout).clone()
    if p.kept is not None:
        keep = p.kept.reshape(-1).to(torch.bool).expand(cout)
        zc = reshape_for_axis(z, w.ndim, 0) if z.ndim else z
        codes = torch.where(reshape_for_axis(keep, w.ndim, 0), codes, zc.expand_as(codes))
        if beta is not None:
            beta = beta * keep.to(torch.float64)
    return _WeightInts(codes, s.to(torch.float32), z, per_channel, p.signed, int(p.bits.max()), beta,
                       p.dequantize(p.quantize(w)).to(torch.float32))


def _requantize_shift(w: _WeightInts) -> tuple[_WeightInts, float, list[int]]:
    """Represent w_hat = xi s (q - z) + beta on a finer 8-bit grid: step xi s / M, codes M (q - z) + r.

    Per output channel, M is the largest power of two (<= 128) for which the new codes fit the 8-bit type,
    and r = round(M beta / (xi s)); the represented shift r xi s / M differs from beta by at most
    xi s / (2 M) (M = 8 for 4-bit weights using their whole range, 1 for 8-bit weights). Returns the new
    weight description, the largest shift error and the multipliers M.
    """
    codes = w.codes.to(torch.int64)
    cout = codes.shape[0]
    scale = w.scale.to(torch.float64).reshape(-1).expand(cout)
    zp = w.zero_point.to(torch.int64).reshape(-1).expand(cout)
    _, tmin, tmax = _qtype(w.signed)
    t = codes - reshape_for_axis(zp, codes.ndim, 0)
    new_codes = torch.empty_like(codes)
    new_scale = torch.empty(cout, dtype=torch.float64)
    new_zp = torch.zeros(cout, dtype=torch.int64)
    mults, err = [], 0.0
    for c in range(cout):
        tc = t[c]
        for k in range(7, -1, -1):
            m = 1 << k
            r = int(round(float(w.beta[c]) * m / float(scale[c])))
            v = m * tc + r
            lo, hi = int(v.min()), int(v.max())
            if w.signed:
                z = 0
            else:
                z = tmin - lo if lo < tmin else 0
                if hi + z > tmax:
                    continue
            if lo + z >= tmin and hi + z <= tmax:
                new_codes[c] = v + z
                new_scale[c] = float(scale[c]) / m
                new_zp[c] = z
                mults.append(m)
                err = max(err, abs(float(w.beta[c]) - r * float(scale[c]) / m))
                break
        else:  # pragma: no cover - k = 0 always fits for codes of at most 8 bits with |r| small
            raise ConfigError("bias shift too large to requantize on the 8-bit grid; use bias_shift='exact'")
    return (_WeightInts(new_codes, new_scale.to(torch.float32), new_zp, True, w.signed, 8, None, w.w_hat), err, mults)


def _conv_attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _shift_nodes(rw: _Rewriter, base: str, node: Any, w: _WeightInts, out: str, main: str) -> tuple[list[Any], str]:
    """beta[c] * S with S the receptive-field sum of the node's data input; returns (nodes, name of S)."""
    beta = w.beta.to(torch.float32)
    cout = beta.numel()
    data = node.input[0]
    nodes = []
    if node.op_type == "Conv":
        attrs = _conv_attrs(node)
        group = int(attrs.get("group", 1))
        kshape = list(w.codes.shape[2:])
        cin_g = int(w.codes.shape[1])
        cout_g = cout // group
        if group == 1:
            m, g2, bshape = 1, 1, [1, cout] + [1] * len(kshape)
        elif cout_g == 1:
            m, g2, bshape = group, group, [1, cout] + [1] * len(kshape)
        else:
            m, g2, bshape = cout, group, [1, cout] + [1] * len(kshape)
        ones = np.ones([m, cin_g] + kshape, dtype=np.float32)
        cattrs = {k: v for k, v in attrs.items() if k in ("pads", "strides", "dilations", "auto_pad")}
        cattrs["group"] = g2
        cattrs["kernel_shape"] = kshape
        sn = rw.node("Conv", [data, rw.init(f"{base}_ones", ones)], base=f"{base}_shift", **cattrs)
        b = rw.init(f"{base}_beta", beta.numpy().reshape(bshape))
    elif node.op_type in ("Gemm", "MatMul"):
        if node.op_type == "Gemm" and _conv_attrs(node).get("transA", 0):
            raise ConfigError(f"layer {base!r}: Gemm with transA is not supported by the bias-shift export")
        axes = rw.init(f"{base}_axes", np.array([-1], dtype=np.int64))
        sn = rw.node("ReduceSum", [data, axes], base=f"{base}_shift", keepdims=1)
        b = rw.init(f"{base}_beta", beta.numpy())
    else:  # pragma: no cover - guarded by the caller
        raise ConfigError(f"layer {base!r}: cannot add the bias shift to a {node.op_type} node")
    mul = rw.node("Mul", [sn.output[0], b], base=f"{base}_shift")
    add = rw.node("Add", [main, mul.output[0]], [out], base=f"{base}_shift")
    nodes += [sn, mul, add]
    for n in nodes:
        n.doc_string = _SHIFT_DOC
    return nodes, sn.output[0]


def _find_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {name: layer for name, layer in quant_layers(model)}


def _attr_layer(node: Any) -> str:
    for a in node.attribute:
        if a.name == "layer":
            return a.s.decode()
    raise ConfigError("internal error: a bitalloc marker without a layer name")


def _rewrite(proto: Any, qlayers: dict[str, QuantLayer], *, bias_shift: str, folded: dict[str, Tensor] | None,
             report: ExportReport, expose_shift_sums: bool = False,
             points: dict[str, Any] | None = None) -> tuple[Any, dict[str, list[str]]]:
    """Replace markers by QDQ / integer weights (see module docstring). Returns (model, shift-sum tensors)."""
    points = points or {}
    onnx = _require_onnx()
    from onnx import helper

    model = copy.deepcopy(proto)
    graph = model.graph
    _inline_identity_constants(graph)
    rw = _Rewriter(model)
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {i.name: i for i in graph.initializer}
    infos: dict[str, LayerExport] = {}
    weights: dict[str, _WeightInts] = {}
    shift_sums: dict[str, list[str]] = {}
    replace: dict[int, list[Any]] = {}  # id(node) -> nodes replacing it
    after: dict[int, list[Any]] = {}  # id(node) -> nodes inserted after it
    drop_inits: set[str] = set()
    rename_out: dict[int, tuple[str, str]] = {}
    before: dict[int, list[Any]] = {}  # id(node) -> nodes inserted before it
    bias_in: dict[int, str] = {}  # id(node) -> new bias input

    def info_of(name: str) -> LayerExport:
        if name not in infos:
            infos[name] = LayerExport(name=name)
        return infos[name]

    for node in graph.node:
        if node.domain != MARK_DOMAIN:
            continue
        name = _attr_layer(node)
        if node.op_type == "TensorQuant":
            tq = points.get(name)
            if tq is None:
                raise ConfigError(f"internal error: marker for unknown tensor quantizer {name!r}")
            base = f"{tq.site or 'tensor'}_{name}"
            nodes, _ = _act_nodes(rw, base, node.input[0], node.output[0], tq.qparams().detach(), None, 1)
            replace[id(node)] = nodes
            continue
        ql = qlayers.get(name)
        if ql is None:
            raise ConfigError(f"internal error: marker for unknown layer {name!r}")
        src, dst = node.input[0], node.output[0]
        info = info_of(name)
        inner = ql.layer
        is_linear = isinstance(inner, nn.Linear)
        if node.op_type == "LayerInput":
            aq = ql.input_quantizer
            if aq is None:
                replace[id(node)] = [helper.make_node("Identity", [src], [dst], name=rw.names(f"{name}_input"))]
                continue
            if getattr(aq, "online", False):
                raise ConfigError(f"layer {name!r} uses online (per-input) activation quantization, which ONNX "
                                  "QDQ cannot express (scales are constants); export an offline-calibrated model")
            rank = None if is_linear else 2 + len(inner.weight.shape[2:])
            axis = -1 if is_linear else 1
            nodes, ainfo = _act_nodes(rw, f"{name}_input", src, dst, aq.qparams().detach(), rank, axis)
            replace[id(node)] = nodes
            info.act, info.a_bits, info.narrow = ainfo.act, ainfo.a_bits, info.narrow or ainfo.narrow
            info.per_channel_act = ainfo.per_channel_act
            continue
        # LayerWeight
        if src not in inits:
            raise ConfigError(f"layer {name!r}: its weight is not a constant of the exported graph")
        users = consumers.get(dst, [])
        wq = ql.weight_quantizer
        if wq is None:
            replace[id(node)] = [helper.make_node("Identity", [src], [dst], name=rw.names(f"{name}_weight"))]
            info.weight = "float"
            continue
        w = _weight_ints(ql)
        weights[name] = w
        info.w_bits = w.bits
        drop_inits.add(src)
        # the compute nodes, possibly behind a Transpose (linear layers on N-d inputs export as MatMul(x, W^T))
        transposed = False
        compute = []
        for u in users:
            if u.op_type == "Transpose" and len(w.codes.shape) == 2:
                perm = list(_conv_attrs(u).get("perm", [1, 0]))
                if perm != [1, 0]:
                    raise ConfigError(f"layer {name!r}: unexpected weight Transpose {perm}")
                transposed = True
                replace[id(u)] = []  # removed: the transposed weight is stored directly
                dst_t = u.output[0]
                compute += [(c, dst_t) for c in consumers.get(dst_t, [])]
            else:
                compute.append((u, dst))
        if transposed and any(u.op_type != "Transpose" for u in users):
            raise ConfigError(f"layer {name!r}: its weight is used both transposed and not")
        for c, _ in compute:
            if c.op_type not in ("Conv", "Gemm", "MatMul"):
                raise ConfigError(f"layer {name!r}: its weight feeds a {c.op_type} node; expected Conv, Gemm or MatMul")
            if c.op_type == "Gemm" and not _conv_attrs(c).get("transB", 0) and not transposed:
                raise ConfigError(f"layer {name!r}: Gemm without transB is not supported")
        info.op = compute[0][0].op_type if compute else ""
        out_name = compute[0][1] if transposed else dst
        if w.bits <= 8 and w.beta is not None and bias_shift == "requantize":
            info.max_abs_shift = float(w.beta.abs().max())
            w, err, mult = _requantize_shift(w)
            info.bias_shift = f"requantized (x{min(mult)}..x{max(mult)} finer grid)"
            info.max_shift_error = err
        if w.bits <= 8:
            dtype, _, _ = _qtype(w.signed)
            codes = w.codes.t() if transposed else w.codes
            axis = 1 if transposed else 0
            info.weight = "int8" if w.signed else "uint8"
            qi = rw.init(f"{name}.weight_quantized", _np(codes, dtype))
            sc = rw.init(f"{name}.weight_scale", _np(w.scale, np.float32))
            zp = rw.init(f"{name}.weight_zero_point", _np(w.zero_point, dtype))
            attrs = {"axis": axis} if w.per_channel else {}
            replace[id(node)] = [helper.make_node("DequantizeLinear", [qi, sc, zp], [out_name],
                                                  name=rw.names(f"{name}_weight_DequantizeLinear"), **attrs)]
            shift_vec = None  # folded bias shift, float64 [C_out]
            if w.beta is not None:
                info.max_abs_shift = float(w.beta.abs().max())
                if bias_shift == "fold" and folded is not None and name in folded:
                    info.bias_shift = "folded"
                    shift_vec = w.beta * folded[name].to(torch.float64)
                else:
                    info.bias_shift = "exact"
                    for c, _ in compute:
                        main = rw.names(f"{c.output[0]}_main")
                        rename_out[id(c)] = (c.output[0], main)
                        nodes, s_name = _shift_nodes(rw, name, c, w, c.output[0], main)
                        after.setdefault(id(c), []).extend(nodes)
                        shift_sums.setdefault(name, []).append(s_name)
            for c, _ in compute:
                has_bias = len(c.input) > 2 and c.input[2] != ""
                if has_bias and c.input[2] not in inits:
                    raise ConfigError(f"layer {name!r}: its bias is not a constant of the exported graph")
                b = (torch.from_numpy(rw.nh.to_array(inits[c.input[2]]).astype(np.float64)) if has_bias
                     else torch.zeros(w.codes.shape[0], dtype=torch.float64))
                if shift_vec is not None:
                    b = b + shift_vec
                if shift_vec is None:
                    continue
                if c.op_type in ("Conv", "Gemm"):
                    bias_in[id(c)] = rw.init(f"{name}.bias_shifted", _np(b, np.float32))
                    if has_bias:
                        drop_inits.add(c.input[2])
                else:  # MatMul: add the shift after it
                    main = rw.names(f"{c.output[0]}_main")
                    rename_out[id(c)] = (c.output[0], main)
                    sh = rw.init(f"{name}_bias_shift", _np(shift_vec, np.float32))
                    after.setdefault(id(c), []).append(helper.make_node("Add", [main, sh], [c.output[0]],
                                                                        name=rw.names(f"{name}_bias_shift_Add")))
        else:
            wf = w.w_hat.t() if transposed else w.w_hat
            info.weight = f"float ({w.bits}-bit values)"
            fi = rw.init(f"{name}.weight_fakequant", _np(wf, np.float32))
            replace[id(node)] = [helper.make_node("Identity", [fi], [out_name], name=rw.names(f"{name}_weight"))]

    new_nodes = []
    for node in graph.node:
        if id(node) in replace:
            new_nodes.extend(replace[id(node)])
            continue
        if id(node) in rename_out:
            old, new = rename_out[id(node)]
            node.output[0] = new
        if id(node) in bias_in:
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = bias_in[id(node)]
        new_nodes.extend(before.get(id(node), []))
        new_nodes.append(node)
        new_nodes.extend(after.get(id(node), []))
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if not (i.name in drop_inits and i.name not in used)]
    del graph.initializer[:]
    graph.initializer.extend(keep + rw.inits)
    if expose_shift_sums:
        for names in shift_sums.values():
            for s in names:
                graph.output.append(helper.make_tensor_value_info(s, onnx.TensorProto.FLOAT, None))
    _drop_domain(model, MARK_DOMAIN)
    report.layers = [infos[n] for n in qlayers if n in infos]
    return model, shift_sums


def _inline_identity_constants(graph: Any) -> None:
    """Replace Identity nodes of initializers by initializers of their own (the exporter deduplicates equal
    constants, e.g. the all-zero biases of BatchNorm-folded layers, into one initializer behind Identity nodes)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    keep, added = [], []
    for n in graph.node:
        if n.op_type == "Identity" and n.domain in ("", "ai.onnx") and n.input and n.input[0] in inits:
            added.append(numpy_helper.from_array(numpy_helper.to_array(inits[n.input[0]]), n.output[0]))
            continue
        keep.append(n)
    if added:
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(added)


def _drop_domain(model: Any, domain: str) -> None:
    keep = [o for o in model.opset_import if o.domain != domain]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def _topo_sort(graph: Any) -> None:
    """Sort nodes topologically (stable), after insertions."""
    produced = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {""}
    pending = list(graph.node)
    out = []
    while pending:
        progress = []
        rest = []
        for n in pending:
            if all(i in produced for i in n.input):
                progress.append(n)
                produced.update(n.output)
            else:
                rest.append(n)
        if not progress:
            raise ConfigError("internal error: the rewritten ONNX graph has a cycle or a missing input")
        out += progress
        pending = rest
    del graph.node[:]
    graph.node.extend(out)


# ---- graph clean-up -----------------------------------------------------------------------------------------------

def _const_value(model: Any, name: str) -> np.ndarray | None:
    """Value of tensor ``name`` if it depends on constants only (evaluated with onnx.reference), else None."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    if name in inits:
        return numpy_helper.to_array(inits[name])
    producers = {o: n for n in graph.node for o in n.output}
    inputs = {i.name for i in graph.input}
    needed: list[Any] = []
    used_inits: dict[str, Any] = {}
    seen: set[str] = set()

    def visit(t: str) -> bool:
        if t == "" or t in seen:
            return True
        seen.add(t)
        if t in inits:
            used_inits[t] = inits[t]
            return True
        if t in inputs or t not in producers:
            return False
        n = producers[t]
        if n.domain not in ("", "ai.onnx"):
            return False
        if not all(visit(i) for i in n.input):
            return False
        if all(n is not m for m in needed):
            needed.append(n)
        return True

    if not visit(name):
        return None
    g = helper.make_graph(needed, "const", [], [helper.make_tensor_value_info(name, 0, None)],
                          list(used_inits.values()))
    m = helper.make_model(g, opset_imports=[o for o in model.opset_import if o.domain in ("", "ai.onnx")])
    m.ir_version = model.ir_version
    return ReferenceEvaluator(m).run(None, {})[0]


def _consumers(graph: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _fuse_zero_pads(model: Any) -> int:
    """Fold constant-zero Pad nodes that feed only Conv data inputs into the Conv's ``pads`` (exact).

    Zero padding after dequantization pads with the real value 0, which is also what Conv's own padding
    adds, so the function is unchanged; onnxruntime then sees DequantizeLinear -> Conv and can fuse it.
    Returns the number of Pad nodes removed.
    """
    from onnx import helper

    graph = model.graph
    cons = _consumers(graph)
    outputs = {o.name for o in graph.output}
    fused = 0
    for pad in list(graph.node):
        if pad.op_type != "Pad" or pad.output[0] in outputs:
            continue
        attrs = _conv_attrs(pad)
        if attrs.get("mode", b"constant") not in (b"constant", "constant"):
            continue
        if len(pad.input) > 3 and pad.input[3]:
            continue  # axes input (opset 18+): keep it simple
        if len(pad.input) > 2 and pad.input[2]:
            v = _const_value(model, pad.input[2])
            if v is None or np.any(v != 0):
                continue
        pads = _const_value(model, pad.input[1]) if len(pad.input) > 1 else None
        if pads is None:
            continue
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        r = len(pads) // 2
        begin, end = pads[:r], pads[r:]
        if r < 3 or any(p < 0 for p in pads) or begin[:2] != [0, 0] or end[:2] != [0, 0]:
            continue
        users = cons.get(pad.output[0], [])
        if not users or any(u.op_type != "Conv" or u.input[0] != pad.output[0] for u in users):
            continue
        ok = True
        for u in users:
            ua = _conv_attrs(u)
            if ua.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                ok = False
        if not ok:
            continue
        for u in users:
            ua = _conv_attrs(u)
            old = list(ua.get("pads", [0] * (2 * (r - 2))))
            k = r - 2
            new = [old[i] + begin[2 + i] for i in range(k)] + [old[k + i] + end[2 + i] for i in range(k)]
            keep = [a for a in u.attribute if a.name != "pads"]
            del u.attribute[:]
            u.attribute.extend(keep + [helper.make_attribute("pads", new)])
            u.input[0] = pad.input[0]
        fused += 1
    _prune(graph)
    return fused


def _prune(graph: Any) -> None:
    """Remove nodes whose outputs nobody uses, and unused initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        keep = [n for n in graph.node if all(n is not d for d in dead)]
        del graph.node[:]
        graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input}
    keep_i = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_i)


#: operators that commute with a monotone quantizer: they select, reorder or clamp values (Q(op(x)) = op'(Q(x)));
#: DepthToSpace / SpaceToDepth are PixelShuffle / PixelUnshuffle (sub-pixel upsampling: Conv -> DepthToSpace -> Relu
#: -> Q then fuses into QLinearConv on the next layer's grid, with no new rounding)
_COMMUTING = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Relu", "Clip",
              "Slice", "Gather", "ReduceMax", "Expand", "Tile", "Pad", "DepthToSpace", "SpaceToDepth"}


def _hoist_quantizers(model: Any) -> int:
    """Copy each per-tensor QuantizeLinear (with its integer Clip) upstream across operators that commute with it.

    For an operator that only selects, reorders or clamps values (MaxPool, Reshape, Flatten, Transpose,
    DepthToSpace, Relu, Clip, zero Pad, ...) and a monotone quantizer Q (round half to even, clamp), Q(op(x)) = op(DQ(Q(x)))
    re-quantized exactly, because DQ(Q(x)) is on the grid. So ``x -> op -> Q`` becomes
    ``x -> Q -> DQ -> op -> Q`` with the *same* scale and zero point: no new rounding step, and onnxruntime
    can fuse the producer of x (Conv -> Q) and run the operator on 8-bit codes. Only linear chains are
    rewritten (every intermediate tensor has one consumer). Returns the number of chains.
    """
    from onnx import numpy_helper

    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    cons = _consumers(graph)
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    rw = _Rewriter(model)
    new_nodes: list[Any] = []
    count = 0
    for q in list(graph.node):
        if q.op_type != "QuantizeLinear" or q.input[1] not in inits or len(q.input) < 3 or q.input[2] not in inits:
            continue
        if numpy_helper.to_array(inits[q.input[1]]).size != 1 or any(a.name == "axis" for a in q.attribute):
            continue
        t = q.input[0]
        if t in outputs or len(cons.get(t, [])) != 1:
            continue
        chain: list[Any] = []
        u = t
        while True:
            p = producers.get(u)
            if p is None or p.op_type not in _COMMUTING or p.output[0] != u or len(p.output) != 1:
                break
            if p.op_type == "Pad":
                attrs = _conv_attrs(p)
                if attrs.get("mode", b"constant") not in (b"constant", "constant"):
                    break
                if len(p.input) > 2 and p.input[2]:
                    v = _const_value(model, p.input[2])
                    if v is None or np.any(v != 0):
                        break
            chain.append(p)
            u = p.input[0]
            if u in outputs or len(cons.get(u, [])) != 1:
                break
        if not chain:
            continue
        first = chain[-1]
        src = first.input[0]
        if src not in producers and src not in {i.name for i in graph.input}:
            continue  # a constant: nothing to gain
        after_q = cons.get(q.output[0], [])
        int_clip = after_q[0] if len(after_q) == 1 and after_q[0].op_type == "Clip" else None
        q2 = rw.node("QuantizeLinear", [src, q.input[1], q.input[2]], base=f"{src}_hoisted")
        nodes = [q2]
        codes = q2.output[0]
        if int_clip is not None:
            c2 = rw.node("Clip", [codes, *int_clip.input[1:]], base=f"{src}_hoisted")
            nodes.append(c2)
            codes = c2.output[0]
        dq2 = rw.node("DequantizeLinear", [codes, q.input[1], q.input[2]], base=f"{src}_hoisted")
        nodes.append(dq2)
        first.input[0] = dq2.output[0]
        new_nodes += nodes
        count += 1
    if new_nodes:
        graph.node.extend(new_nodes)
        graph.initializer.extend(rw.inits)
        _topo_sort(graph)
    return count


def _scalar_input(model: Any, node: Any, k: int) -> float | None:
    if len(node.input) <= k or not node.input[k]:
        return None
    v = _const_value(model, node.input[k])
    return None if v is None or np.asarray(v).size != 1 else float(np.asarray(v).reshape(()))


def _saturates(v: float, s: float, z: int, bound: int, upper: bool) -> bool:
    """Whether QuantizeLinear(v) (then clamped to the code range) is the code ``bound``, however v / s rounds."""
    s32 = np.float32(s)
    cands = [np.float32(v) / s32, np.float32(v) * (np.float32(1) / s32)]
    for c in cands:
        q = float(np.rint(c)) + z
        if (upper and q < bound) or (not upper and q > bound):
            return False
    return True


def _drop_redundant_activations(model: Any) -> int:
    """Remove Relu / Clip nodes that only feed QuantizeLinear nodes which saturate at the same place.

    Q(clip(x, lo, hi)) = Q(x) for every x exactly when the quantizer (followed by an integer Clip of a narrow
    grid, if any) maps lo to its smallest code and hi to its largest (Q is monotone). Then the float
    activation is redundant and onnxruntime can fuse the producing Conv with the Q (QLinearConv).
    Returns the number of nodes removed.
    """
    from onnx import numpy_helper

    graph = model.graph
    cons = _consumers(graph)
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    removed = 0
    for n in list(graph.node):
        if n.op_type not in ("Relu", "Clip") or n.output[0] in outputs:
            continue
        if n.op_type == "Relu":
            lo, hi = 0.0, None
        else:
            if any(a.name in ("min", "max") for a in n.attribute):
                continue  # opset < 11 form
            lo, hi = _scalar_input(model, n, 1), _scalar_input(model, n, 2)
        users = cons.get(n.output[0], [])
        if not users:
            continue
        ok = True
        for q in users:
            if q.op_type != "QuantizeLinear" or q.input[1] not in inits or len(q.input) < 3 or q.input[2] not in inits:
                ok = False
                break
            s = numpy_helper.to_array(inits[q.input[1]])
            zt = numpy_helper.to_array(inits[q.input[2]])
            if s.size != 1:
                ok = False
                break
            info = np.iinfo(zt.dtype)
            qmin, qmax = int(info.min), int(info.max)
            after = cons.get(q.output[0], [])
            if len(after) == 1 and after[0].op_type == "Clip":
                cmin, cmax = _scalar_input(model, after[0], 1), _scalar_input(model, after[0], 2)
                qmin = int(cmin) if cmin is not None else qmin
                qmax = int(cmax) if cmax is not None else qmax
            z = int(zt.reshape(()))
            if lo is not None and not _saturates(lo, float(s.reshape(())), z, qmin, upper=False):
                ok = False
            if hi is not None and not _saturates(hi, float(s.reshape(())), z, qmax, upper=True):
                ok = False
            if not ok:
                break
        if not ok:
            continue
        for q in users:
            q.input[0] = n.input[0]
        removed += 1
    _prune(graph)
    return removed


def _per_tensor_qdq(inits: dict[str, Any], node: Any) -> tuple[float, int, Any] | None:
    """(scale, zero point, numpy dtype) of a per-tensor QuantizeLinear / DequantizeLinear with constant
    parameters, else None."""
    from onnx import numpy_helper

    if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
        return None
    s = numpy_helper.to_array(inits[node.input[1]])
    z = numpy_helper.to_array(inits[node.input[2]])
    if s.size != 1 or z.size != 1:
        return None
    return float(np.float32(s.reshape(()))), int(z.reshape(())), z.dtype


def _fold_requantize(model: Any) -> int:
    """Remove QuantizeLinear nodes that re-quantize a DequantizeLinear's output on the same per-tensor grid.

    Q(DQ(c)) = c for every 8-bit code c when both use the same scale, zero point and type ((c - z) s / s rounds
    back to c - z), so the Q's consumers read the codes c directly (exact). This happens where an aligned model
    quantizes a layer's output with the next layer's input grid. Returns the number of Q nodes removed.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    removed = 0
    route: dict[str, str] = {}
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.output[0] in outputs:
            continue
        d = producers.get(q.input[0])
        if d is None or d.op_type != "DequantizeLinear":
            continue
        a, b = _per_tensor_qdq(inits, q), _per_tensor_qdq(inits, d)
        if a is None or b is None or a[0] != b[0] or a[1] != b[1] or a[2] != b[2]:
            continue
        route[q.output[0]] = d.input[0]
        removed += 1
    _reroute(graph, route)
    return removed


def _reroute(graph: Any, route: dict[str, str]) -> None:
    """Make every node read ``route[name]`` (followed to its end) instead of ``name``, then drop dead nodes."""
    for n in graph.node:
        for k, i in enumerate(n.input):
            while i in route:
                i = route[i]
            n.input[k] = i
    _prune(graph)


def _drop_clips_after_dq(model: Any) -> int:
    """Remove Relu / Clip nodes whose input comes from a per-tensor DequantizeLinear whose every value lies within
    their bounds (the activation is the identity there; exact). An aligned model quantizes a layer's output
    before its activation on a grid inside the activation's bounds; removing the activation lets onnxruntime
    see DequantizeLinear -> Add / pooling. Returns the number of nodes removed."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    route: dict[str, str] = {}
    for n in graph.node:
        if n.op_type not in ("Relu", "Clip") or n.output[0] in outputs:
            continue
        if any(a.name in ("min", "max") for a in n.attribute):
            continue
        d = producers.get(n.input[0])
        if d is None or d.op_type != "DequantizeLinear":
            continue
        p = _per_tensor_qdq(inits, d)
        if p is None:
            continue
        s, z, dt = p
        info = np.iinfo(dt)
        vmin = float(np.float32(info.min - z) * np.float32(s))
        vmax = float(np.float32(info.max - z) * np.float32(s))
        if n.op_type == "Relu":
            lo, hi = 0.0, None
        else:
            lo, hi = _scalar_input(model, n, 1), _scalar_input(model, n, 2)
        if (lo is not None and vmin < lo) or (hi is not None and vmax > hi):
            continue
        route[n.output[0]] = n.input[0]
    _reroute(graph, route)
    return len(route)


def _int32_biases(model: Any, report: ExportReport) -> None:
    """Store the float bias of every int8-fusable Gemm as int32 codes at step s_x * s_w[c].

    A Gemm is int8-fusable when its data and weight inputs come from 8-bit DequantizeLinear nodes with a
    per-tensor activation step; onnxruntime turns it into QGemm only when its bias is a DequantizeLinear of
    int32 codes (its accumulator starts from the bias). The bias scale is multiplied in float32, as
    onnxruntime's quantizer does; the rounding error (at most half a step, on the Gemm's output only) is
    reported per layer as ``max_bias_rounding``. Conv biases stay float: onnxruntime quantizes them itself
    when it fuses a QLinearConv, and a float bias keeps the unfused path equal to fake quantization.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    by_weight = {}
    for l in report.layers:
        by_weight[f"{l.name}.weight_quantized"] = l
    rw = _Rewriter(model)
    drop: set[str] = set()

    def dq_of(t: str) -> Any:
        p = producers.get(t)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    for n in list(graph.node):
        if n.op_type != "Gemm" or len(n.input) < 3 or n.input[2] not in inits:
            continue
        dx, dw = dq_of(n.input[0]), dq_of(n.input[1])
        if dx is None or dw is None or dx.input[1] not in inits or dw.input[1] not in inits:
            continue
        sx = numpy_helper.to_array(inits[dx.input[1]])
        zx = inits.get(dx.input[2]) if len(dx.input) > 2 else None
        zw = inits.get(dw.input[2]) if len(dw.input) > 2 else None
        if sx.size != 1 or zx is None or zw is None or zx.data_type not in (2, 3) or zw.data_type not in (2, 3):
            continue  # 8-bit types only (uint8 = 2, int8 = 3), per-tensor activation step
        sw = numpy_helper.to_array(inits[dw.input[1]]).astype(np.float32).reshape(-1)
        b = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64).reshape(-1)
        bscale = (np.float32(sx.reshape(())) * np.broadcast_to(sw, b.shape)).astype(np.float32)
        bq = np.round(b / bscale.astype(np.float64))
        if np.abs(bq).max(initial=0) >= 2**31 - 1:
            continue
        bi = rw.init(f"{n.input[2]}_quantized", bq.astype(np.int32))
        bs = rw.init(f"{n.input[2]}_scale", bscale)
        bz = rw.init(f"{n.input[2]}_zero_point", np.zeros(b.shape, dtype=np.int32))
        out_b = rw.names(f"{n.input[2]}_dequantized")
        graph.node.append(helper.make_node("DequantizeLinear", [bi, bs, bz], [out_b],
                                           name=rw.names(f"{n.input[2]}_DequantizeLinear"), axis=0))
        drop.add(n.input[2])
        n.input[2] = out_b
        layer = by_weight.get(dw.input[0])
        if layer is not None:
            layer.int32_bias = True
            layer.max_bias_rounding = max(layer.max_bias_rounding, float(np.abs(bq * bscale - b).max(initial=0)))
    graph.initializer.extend(rw.inits)
    _prune(graph)
    _topo_sort(graph)


# ---- alignment with onnxruntime's QDQ fusion --------------------------------------------------------------------

_PASS_THROUGH = {"Relu", "Clip"}


def _align_ort(model: Any, calib_inputs: list[dict[str, np.ndarray]], report: ExportReport, *, threads: int) -> Any:
    """Add uint8 Q/DQ on float tensors that block onnxruntime's int8 fusion (see module docstring).

    Targets: the outputs of quantized Conv / Gemm nodes and of Add nodes (after Relu / Clip chains)
    that reach something other than a QuantizeLinear, and float inputs of Add / Mul / GlobalAveragePool. An Add /
    Mul is a target only on the int8 data path: each of its non-constant inputs comes (through Relu / Clip, bias
    Adds with a constant, and such Adds) from a quantized Conv / Gemm / MatMul or a DequantizeLinear. So a
    transformer's attention-mask arithmetic (scores + (1 - mask) * float32 min) and other float side paths get
    no min-max grid, which would destroy them.
    When the tensor already has an 8-bit full-range Q -> DQ (a bitalloc layer input), its other consumers
    are routed through that DQ (no new rounding step size); otherwise a new uint8 min-max pair is measured
    on the calibration inputs.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    cons = _consumers(graph)
    inits = {i.name: i for i in graph.initializer}
    graph_outputs = {o.name for o in graph.output}

    def is_dq(t: str) -> bool:
        p = producers.get(t)
        return p is not None and p.op_type == "DequantizeLinear"

    def quantized_compute(n: Any) -> bool:
        return n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and is_dq(n.input[0]) and is_dq(n.input[1])

    def existing_dq(t: str) -> str | None:
        for q in cons.get(t, []):
            if q.op_type != "QuantizeLinear" or q.input[0] != t:
                continue
            sc = inits.get(q.input[1])
            if sc is None or numpy_helper.to_array(sc).size != 1:
                continue
            for d in cons.get(q.output[0], []):
                if d.op_type == "DequantizeLinear":
                    return d.output[0]
        return None

    on_path: dict[str, bool] = {}

    def int8_path(t: str) -> bool:
        """Whether ``t`` comes from quantized compute or a DQ through Relu / Clip, constant (bias) Adds and
        int8-path Adds (see the docstring)."""
        if t not in on_path:
            on_path[t] = False  # cycles cannot occur in a valid graph; guards the recursion anyway
            p = producers.get(t)
            if p is None:
                ok = False
            elif p.op_type == "DequantizeLinear" or quantized_compute(p):
                ok = True
            elif p.op_type in _PASS_THROUGH:
                ok = int8_path(p.input[0])
            elif p.op_type == "Add":
                live = [i for i in p.input if not _is_const(graph, i)]
                ok = bool(live) and all(int8_path(i) for i in live)
            else:
                ok = False
            on_path[t] = ok
        return on_path[t]

    def end_of_chain(t: str) -> str:
        while True:
            cs = cons.get(t, [])
            if len(cs) == 1 and cs[0].op_type in _PASS_THROUGH and t not in graph_outputs:
                t = cs[0].output[0]
                continue
            return t

    targets: list[str] = []
    for n in graph.node:
        if n.doc_string == _SHIFT_DOC:
            continue
        # (a quantized MatMul needs no output Q/DQ: onnxruntime runs it as MatMulIntegerToFloat, int8 with a float
        # output, so transformers' linear layers keep exactly bitalloc's quantization points)
        residual = n.op_type == "Add" and not any(_is_const(graph, i) for i in n.input) and int8_path(n.output[0])
        if (quantized_compute(n) and n.op_type != "MatMul") or residual:
            t = end_of_chain(n.output[0])
            cs = cons.get(t, [])
            if t in graph_outputs or not cs or all(c.op_type == "QuantizeLinear" for c in cs):
                continue
            if t not in targets:
                targets.append(t)
    for n in graph.node:
        ins = []
        if n.doc_string == _SHIFT_DOC:
            continue
        if n.op_type in ("Add", "Mul") and not any(_is_const(graph, i) for i in n.input) and \
                all(int8_path(i) for i in n.input):
            ins = list(n.input)
        elif n.op_type == "GlobalAveragePool":
            ins = [n.input[0]]
        for i in ins:
            if not is_dq(i) and i not in targets:
                targets.append(i)
    if not targets:
        return model
    reuse = {t: existing_dq(t) for t in targets}
    fresh = [t for t in targets if reuse[t] is None]
    lo = {t: 0.0 for t in fresh}
    hi = {t: 0.0 for t in fresh}
    if fresh:
        probe = copy.deepcopy(model)
        for t in fresh:
            probe.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
        from bitalloc.runtime.ort import make_session

        sess = make_session(probe.SerializeToString(), threads=threads)
        names = [o.name for o in sess.get_outputs()]
        for feed in calib_inputs:
            outs = dict(zip(names, sess.run(None, feed)))
            for t in fresh:
                lo[t] = min(lo[t], float(outs[t].min()))
                hi[t] = max(hi[t], float(outs[t].max()))
    rw = _Rewriter(model)
    new_nodes = []
    route: dict[str, str] = {}
    for t in targets:
        if reuse[t] is not None:
            route[t] = reuse[t]
            report.extra_qdq.append(f"{t} (shares the next layer's Q/DQ)")
            continue
        scale = max((hi[t] - lo[t]) / 255.0, 1e-12)
        zp = int(np.clip(np.round(-lo[t] / scale), 0, 255))
        sc = rw.init(f"{t}_scale", np.array(scale, dtype=np.float32))
        z = rw.init(f"{t}_zero_point", np.array(zp, dtype=np.uint8))
        q = rw.node("QuantizeLinear", [t, sc, z], base=t)
        dq = rw.node("DequantizeLinear", [q.output[0], sc, z], base=t)
        route[t] = dq.output[0]
        new_nodes += [q, dq]
        report.extra_qdq.append(f"{t} (uint8 min-max [{lo[t]:.4g}, {hi[t]:.4g}])")
    for n in graph.node:
        if n.op_type == "QuantizeLinear":
            continue
        for k, i in enumerate(n.input):
            if i in route:
                n.input[k] = route[i]
    graph.node.extend(new_nodes)
    graph.initializer.extend(rw.inits)
    _topo_sort(graph)
    return model


def _is_const(graph: Any, name: str) -> bool:
    return name in {i.name for i in graph.initializer} or any(
        n.op_type == "Constant" and name in n.output for n in graph.node)


# ---- entry point ------------------------------------------------------------------------------------------------

def _feeds(data: Iterable | None, input_names: list[str], limit: int | None = None) -> list[dict[str, np.ndarray]]:
    from bitalloc.batches import batch_size
    from bitalloc.runtime.ort import input_feed

    feeds = []
    seen = 0
    for batch in data or []:
        x = batch_inputs(batch)
        feeds.append(input_feed(input_names, x))  # token ids stay integers
        seen += batch_size(x)
        if limit is not None and seen >= limit:
            break
    return feeds


def export_onnx(model: nn.Module, example_inputs: Any, path: str | Path | None = None, *,
                opset: int = DEFAULT_OPSET, bias_shift: str = "exact", align: str = "none",
                calibration_data: Iterable | None = None, calibration_samples: int | None = None,
                threads: int = 2, check: bool = True, dynamic_batch: bool = True, int32_bias: bool = True,
                simplify: bool = True) -> tuple[Any, ExportReport]:
    """Export a quantized (prepared and calibrated) bitalloc model to ONNX QDQ.

    Args:
        model: a model returned by ``bitalloc.quantize`` / ``prepare`` + calibration.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs (one batch; the batch
            axis is exported as dynamic; integer inputs such as token ids keep their dtype).
        path: where to write the .onnx file (None: return the ModelProto only).
        opset: ONNX opset (>= 13 for per-axis QDQ; default 17).
        bias_shift: how the shift beta of bias-corrected weights is exported: "exact" (float receptive-field
            sum branch), "requantize" (finer int8 weight grid, approximate) or "fold" (into the bias with the
            mean over ``calibration_data``, approximate); see the module docstring.
        align: "none" (exactly bitalloc's quantization points) or "ort" (add min-max uint8 Q/DQ where
            onnxruntime needs them to run convolutions / adds in int8; needs ``calibration_data``).
        calibration_data: batches (x, ...) or tensors; required by bias_shift="fold" and align="ort".
        calibration_samples: use at most this many samples of ``calibration_data``.
        threads: onnxruntime threads used for the calibration passes.
        check: run ``onnx.checker.check_model`` on the result.
        int32_bias: store the bias of Gemm layers with 8-bit per-tensor activations as int32 codes at step
            s_x * s_w[c] (onnxruntime fuses QGemm only then; rounding <= half that step, reported).
        simplify: the exact graph simplifications of the module docstring (fold zero Pads into convs, copy
            quantizers across commuting operators, drop redundant Relu / Clip); they let onnxruntime fuse more.

    Returns (onnx.ModelProto, :class:`ExportReport`).
    """
    onnx = _require_onnx()
    if bias_shift not in ("exact", "requantize", "fold"):
        raise ConfigError(f"bias_shift must be 'exact', 'requantize' or 'fold', got {bias_shift!r}")
    if align not in ("none", "ort"):
        raise ConfigError(f"align must be 'none' or 'ort', got {align!r}")
    if opset < 13:
        raise ConfigError(f"opset {opset}: per-axis QuantizeLinear / DequantizeLinear need opset 13 or newer")
    qlayers = _find_layers(model)
    if not qlayers:
        raise ConfigError("the model has no quantized layers: quantize it with bitalloc.quantize first")
    if getattr(model, "bitalloc_products", None) is not None:
        raise ConfigError("the model quantizes its activation x activation products on every input (product_bits), "
                          "which ONNX QDQ cannot express (scales are constants); prepare it with product_bits=None "
                          "(no --product-bits) to export it")
    for name, ql in qlayers.items():
        for q in ql.quantizers():
            if getattr(q, "online", False):
                raise ConfigError(f"layer {name!r} uses online (per-input) activation quantization, which ONNX QDQ "
                                  "cannot express (scales are constants); export an offline-calibrated model")
            if not q.is_ready:
                raise ConfigError(f"layer {name!r} is not calibrated: calibrate the model before exporting it")
        if ql.weight_quantizer is not None and ql.weight_quantizer.qparams().grouped:
            raise ConfigError(f"layer {name!r} has group-wise weight scales (granularity 'group'), which QDQ at opset "
                              f"{opset} cannot express (one scale per channel); quantize its weights per channel "
                              "(weight granularity 'channel', CLI --weight-granularity channel) to export it")
    was_training = model.training
    model.eval()
    try:
        proto = export_float(model, example_inputs, opset=opset, markers=True, dynamic_batch=dynamic_batch)
    finally:
        model.train(was_training)
    report = ExportReport(path=str(path) if path else None, opset=opset, bias_shift=bias_shift, align=align)
    info = getattr(model, "bitalloc_info", None)
    if info is not None:
        report.float_layers = [{"name": r.name, "type": r.type, "reason": r.reason} for r in info.floating()]
    input_names = [i.name for i in proto.graph.input]
    needs_data = align == "ort" or (bias_shift == "fold" and any(
        ql.weight_quantizer is not None and getattr(ql.weight_quantizer, "corr_shift", None) is not None
        and bool((ql.weight_quantizer.corr_shift != 0).any()) for ql in qlayers.values()))
    feeds = _feeds(calibration_data, input_names, calibration_samples) if needs_data else []
    if needs_data and not feeds:
        raise ConfigError(f"bias_shift={bias_shift!r} / align={align!r} need calibration_data")
    folded = None
    if bias_shift == "fold" and needs_data:
        from bitalloc.runtime.align import tensor_points as _tp

        probe, sums = _rewrite(proto, qlayers, bias_shift="exact", folded=None,
                               report=ExportReport(None, opset, "exact", "none"), expose_shift_sums=True,
                               points=_tp(model))
        folded = _mean_shift_sums(probe, sums, feeds, threads)
    from bitalloc.runtime.align import tensor_points

    points = tensor_points(model)
    report.model_points = [f"{k}: {tq.description} ({'shares ' + tq.shares + chr(39) + 's input grid' if tq.shares else 'uint8 min-max'})"
                           for k, tq in points.items()]
    out, _ = _rewrite(proto, qlayers, bias_shift=bias_shift, folded=folded, report=report, points=points)
    if points:
        n_cl = _drop_clips_after_dq(out)
        n_dq = _fold_requantize(out)
        report.notes.append(f"{len(points)} tensor quantizers of the aligned model exported as Q/DQ ({n_dq} re-quantizations "
                            f"on the same grid and {n_cl} activations inside the grid removed, exact)")
    if simplify:
        n_pads = _fuse_zero_pads(out)
        if n_pads:
            report.notes.append(f"{n_pads} zero Pad nodes folded into the following Conv (exact)")
        n_hoist = _hoist_quantizers(out)
        if n_hoist:
            report.notes.append(f"{n_hoist} quantizers copied upstream across max-pooling / reshaping / clamping "
                                "operators (exact: same grid)")
        n_act = _drop_redundant_activations(out)
        if n_act:
            report.notes.append(f"{n_act} Relu / Clip nodes removed before QuantizeLinear nodes that saturate at "
                                "the same bounds (exact)")
    if bias_shift == "fold" and folded:
        report.notes.append("bias shifts folded with the calibration mean of the receptive-field input sum "
                            "(approximation; see the agreement check)")
    if align == "ort":
        out = _align_ort(out, feeds, report, threads=threads)
        if simplify:
            _hoist_quantizers(out)
            _drop_redundant_activations(out)  # activations whose other consumers were just routed through a DQ
        report.notes.append(f"{len(report.extra_qdq)} extra uint8 quantization points for onnxruntime's int8 fusion "
                            "(the next layer's grid where the tensor has one, else min-max on calibration data); "
                            "not part of the bitalloc model")
    if int32_bias:
        _int32_biases(out, report)
    out.producer_name = "bitalloc"
    if check:
        onnx.checker.check_model(out)
    if path is not None:
        from bitalloc.io import write_bytes

        write_bytes(Path(path), out.SerializeToString())
    return out, report


def _mean_shift_sums(probe: Any, sums: dict[str, list[str]], feeds: list[dict[str, np.ndarray]],
                     threads: int) -> dict[str, Tensor]:
    """Per layer, per output channel: the mean of the receptive-field input sum S over the calibration inputs."""
    from bitalloc.runtime.ort import make_session

    sess = make_session(probe.SerializeToString(), threads=threads)
    names = [o.name for o in sess.get_outputs()]
    acc: dict[str, list[np.ndarray]] = {}
    for feed in feeds:
        outs = dict(zip(names, sess.run(None, feed)))
        for layer, tensors in sums.items():
            for t in tensors:
                v = outs[t].astype(np.float64)
                axis = 1 if v.ndim > 2 else -1
                red = tuple(i for i in range(v.ndim) if i != (axis % v.ndim))
                acc.setdefault(layer, []).append(np.concatenate([v.sum(axis=red), [float(np.prod([v.shape[i] for i in red]))]]))
    out = {}
    for layer, parts in acc.items():
        tot = np.sum(parts, axis=0)
        out[layer] = torch.from_numpy(tot[:-1] / tot[-1])
    return out
