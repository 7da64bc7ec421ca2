"""Deployment alignment: onnxruntime's int8 quantization points made part of the bitalloc model.

onnxruntime runs a convolution in int8 (QLinearConv) only when its inputs come from DequantizeLinear *and its
output feeds a QuantizeLinear*; a residual Add or a global average pooling runs in int8 only between
DequantizeLinear and QuantizeLinear nodes. bitalloc quantizes layer *inputs*, so in a network with skip
connections (EfficientNet, ResNet) the convolutions feeding an Add or a pooling have no output quantizer.
``export_onnx(..., align="ort")`` adds the missing Q/DQ pairs to the ONNX graph only: the exported model
then differs from the bitalloc model it is compared with, by those extra rounding steps. And onnxruntime
quantizes a float convolution bias to int32 at step s_x * s_w[c] itself, one more rounding the bitalloc
model does not have.

:func:`align_for_ort` returns a copy of a quantized model in which these quantization points *are* part of
the model, so that the fake-quant PyTorch model computes what onnxruntime's int8 graph computes, up to
float32 rounding and onnxruntime's requantization arithmetic:

* **Tensor quantizers** (:class:`TensorQuant`, applied by forward hooks on the module that produces the
  tensor; listed in :class:`AlignReport`). The tensors are found on a recorded forward pass, with the rules
  of ``align="ort"``: the output of a quantized layer (after its ReLU / ReLU6 / Hardtanh chain) or of an
  addition that reaches anything other than quantized layers, and the inputs of additions / multiplications
  / global average pooling that are not quantized yet. A tensor that a quantized layer also reads gets that
  layer's input grid (the same quantizer object, shared: the layer's own re-quantization is then exact);
  a tensor selected from such a tensor by slicing, reshapes, max pooling or zero padding (a strided,
  zero-padded residual shortcut) gets the grid of a layer reading the source, as onnxruntime propagates
  quantization parameters through those ops (no extra rounding, no requantization in onnxruntime's graph);
  any other gets a new per-tensor uint8 min-max grid measured on ``calibration_data``. When the tensor is
  the end of an activation chain after a layer's output, the quantizer is applied at the layer's output
  with a grid that lies inside the activation's bounds (then Q(act(y)) = Q(y) = act(Q(y)) exactly).
* **Integer biases.** The bias of every layer onnxruntime can run in int8 (8-bit weights, per-tensor 8-bit
  input grid, no bias-correction shift) is rounded to the int32 grid s_x * s_w[c] * xi[c] (float32 product,
  as onnxruntime computes it), so onnxruntime's own bias quantization is exact.

The aligned model is an ordinary quantized model (evaluate it, compare it, export it: the exporter writes
each tensor quantizer as QuantizeLinear / DequantizeLinear and adds no export-only points where the model
has them). It is meant for deployment checks and export; it is not saved by ``save_quantized``.

Measured on EfficientNet-Lite0 at W8A8 (968 ImageNet-sample evaluation images, onnxruntime 1.32; the
numbers of ``benchmarks/onnx_latency.py`` are the reference): top-1 agreement of onnxruntime's int8 run with
the bitalloc model 99.07% (minmax) / 99.28% (percentile) with export-only points (``align="ort"``), 99.38% /
99.48% with the points in the model. What remains is onnxruntime's requantization arithmetic (int32 sums
rescaled by a float32 multiplier instead of a float32 convolution followed by rounding), which moves single
codes that lie within float32 rounding of a rounding boundary. Accumulator, weight codes and biases agree.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from bitalloc.batches import batch_inputs, batch_size, call_model, cut_inputs, model_args
from bitalloc.errors import ConfigError
from bitalloc.model.layers import QuantLayer, quant_layers
from bitalloc.quant.grid import qparams_from_range, reshape_for_axis
from bitalloc.quantizers.base import QuantParams

POINTS_ATTR = "bitalloc_ort_points"
REPORT_ATTR = "bitalloc_ort_alignment"

_IGNORED = {"__get__", "size", "dim", "numel", "__len__", "is_floating_point", "__format__", "__hash__", "stride",
            "is_contiguous", "contiguous", "ndimension", "nelement", "get_device", "__bool__", "__index__", "item",
            "__repr__", "__setstate__", "__reduce_ex__"}
_ACT_FUNCS = {"relu": (0.0, math.inf), "relu_": (0.0, math.inf), "relu6": (0.0, 6.0)}
_SUM_FUNCS = {"add", "__add__", "__radd__"}
_ADD_FUNCS = _SUM_FUNCS | {"mul", "__mul__", "__rmul__"}  # (in-place forms are not aligned)
_POOL_FUNCS = {"adaptive_avg_pool2d", "adaptive_avg_pool1d"}
# functions whose every output value is one of their (first) input's values, or 0 for "pad"
_SELECT_FUNCS = {"__getitem__", "reshape", "view", "flatten", "permute", "transpose", "narrow", "squeeze",
                 "unsqueeze", "max_pool1d", "max_pool2d", "pad"}
_SELECT_MODULES = (nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.ZeroPad2d)


# ---- the tensor quantizer ---------------------------------------------------------------------------------------

class TensorQuant(nn.Module):
    """A quantization point on a tensor, applied by a forward hook of the module producing it.

    Either ``own`` (a quantizer of its own: uint8 min-max) or shares the input quantizer of layer ``shares``
    (the same object, not a registered child: it stays the layer's). ``site`` is the module it is hooked on.
    """

    def __init__(self, key: str, site: str, own: nn.Module | None = None, shared: nn.Module | None = None,
                 shares: str | None = None, description: str = ""):
        super().__init__()
        self.key = key
        self.site = site
        self.own = own
        self.__dict__["_shared"] = shared  # not a child: it belongs to the layer ``shares``
        self.shares = shares
        self.description = description
        self.marker = False  # export: emit a bitalloc::TensorQuant marker instead of quantizing

    @property
    def quantizer(self) -> nn.Module:
        q = self.own if self.own is not None else self.__dict__["_shared"]
        if q is None:
            raise ConfigError(f"tensor quantizer {self.key!r} has no grid")
        return q

    def qparams(self) -> QuantParams:
        return self.quantizer.qparams()

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not isinstance(output, Tensor):
            return output
        if self.marker:
            from bitalloc.runtime.onnx_export import _Mark

            return _Mark.apply(output, "TensorQuant", self.key)
        return self.quantizer(output)

    def extra_repr(self) -> str:
        grid = f"shares {self.shares}'s input grid" if self.shares else "uint8 min-max"
        return f"{self.key}: output of {self.site} ({grid})"


def tensor_points(model: nn.Module) -> dict[str, TensorQuant]:
    """The tensor quantizers of an aligned model (empty for any other model)."""
    pts = getattr(model, POINTS_ATTR, None)
    return dict(pts.items()) if isinstance(pts, nn.ModuleDict) else {}


# ---- report -------------------------------------------------------------------------------------------------------

@dataclass
class AlignPoint:
    key: str
    site: str  # the module whose output is quantized
    tensor: str  # what the tensor is (for people)
    grid: str  # "shares LAYER's input grid" | "uint8 min-max [lo, hi]"
    shares: str | None = None
    lo: float | None = None
    hi: float | None = None


@dataclass
class AlignReport:
    points: list[AlignPoint] = field(default_factory=list)
    int32_biases: list[str] = field(default_factory=list)
    max_bias_change: float = 0.0  # max |rounded bias - bias|
    widened_weight_steps: dict[str, int] = field(default_factory=dict)  # layer -> channels whose step was enlarged
    requantized_shifts: dict[str, float] = field(default_factory=dict)  # layer -> max |beta - represented shift|
    unsupported: list[str] = field(default_factory=list)  # tensors left to the export-only alignment

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- recording the dataflow ---------------------------------------------------------------------------------------

@dataclass
class _Node:
    index: int
    kind: str  # "module" | "function"
    target: str  # module name or function name
    module: nn.Module | None
    inputs: list[int]
    outputs: list[int]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def _tensors(obj: Any, out: list[Tensor]) -> list[Tensor]:
    if isinstance(obj, Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)
    return out


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[_Node] = []
        self.depth = 0
        self.keep: list[Tensor] = []
        self.producer: dict[int, int] = {}
        self.consumers: dict[int, list[int]] = {}
        self.calls: dict[str, int] = {}  # module name -> number of calls
        self.outputs_of: dict[int, list[tuple[str, int]]] = {}  # tensor id -> [(module, position at return)]
        self.model_inputs: set[int] = set()
        self.model_outputs: set[int] = set()

    def add(self, kind: str, target: str, module: nn.Module | None, inputs: Any, outputs: Any, args: tuple = (),
            kwargs: dict | None = None) -> None:
        ins, outs = _tensors(inputs, []), _tensors(outputs, [])
        self.keep += ins + outs
        node = _Node(len(self.nodes), kind, target, module, [id(t) for t in ins], [id(t) for t in outs], args,
                     kwargs or {})
        self.nodes.append(node)
        for t in node.inputs:
            self.consumers.setdefault(t, []).append(node.index)
        for t in node.outputs:
            if t not in node.inputs:  # an op returning its input object (Identity, in-place) does not produce it
                self.producer[t] = node.index


class _Recorder(TorchFunctionMode):
    def __init__(self, g: _Graph):
        super().__init__()
        self.g = g

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.g.depth == 0:
            name = getattr(func, "__name__", None) or repr(func)
            if name not in _IGNORED:
                self.g.add("function", name, None, (args, kwargs), out, args, kwargs)
        return out


def _record(model: nn.Module, example: Any) -> _Graph:
    g = _Graph()
    handles = []

    def atomic(m: nn.Module) -> bool:
        return isinstance(m, QuantLayer) or len(m._modules) == 0

    inside: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer):
            for sub in m.modules():
                if sub is not m:
                    inside.add(id(sub))
    for name, m in model.named_modules():
        if id(m) in inside:
            continue
        is_atomic = atomic(m)

        def pre(mod, args, _a=is_atomic):
            if _a:
                g.depth += 1

        def post(mod, args, output, _name=name, _a=is_atomic):
            if _a:
                g.depth -= 1
                if g.depth == 0:
                    g.add("module", _name, mod, args, output)
            g.calls[_name] = g.calls.get(_name, 0) + 1
            if isinstance(output, Tensor):
                g.keep.append(output)
                g.outputs_of.setdefault(id(output), []).append((_name, len(g.nodes)))

        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    args, kwargs = model_args(model, example)
    g.keep += _tensors((args, kwargs), [])
    g.model_inputs = {id(t) for t in _tensors((args, kwargs), [])}
    try:
        with torch.no_grad(), _Recorder(g):
            out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    outs = _tensors(out, [])
    g.keep += outs
    g.model_outputs = {id(t) for t in outs}
    return g


# ---- finding the points -------------------------------------------------------------------------------------------

def _act_bounds(node: _Node) -> tuple[float, float] | None:
    """Clamp bounds of an activation node (ReLU / ReLU6 / Hardtanh modules, relu / relu6 functions), else None."""
    if node.kind == "module":
        m = node.module
        if isinstance(m, nn.Hardtanh):  # includes ReLU6
            return float(m.min_val), float(m.max_val)
        if isinstance(m, nn.ReLU):
            return 0.0, math.inf
        return None
    return _ACT_FUNCS.get(node.target)


def _selects_values(node: _Node) -> bool:
    """Every output value of the node is a value of its first input, or 0 (slicing, reshapes, max pooling,
    zero padding; modules with ``selects_values = True``): an input grid that holds 0 is exact on the output."""
    if node.kind == "module":
        return isinstance(node.module, _SELECT_MODULES) or bool(getattr(node.module, "selects_values", False))
    if node.target not in _SELECT_FUNCS or len(node.outputs) != 1 or not node.inputs:
        return False
    if node.target == "pad":
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        return mode == "constant" and not value
    return True


def _is_passthrough(node: _Node) -> bool:
    """A node whose output is its input object (nn.Identity, eval-mode Dropout): invisible for dataflow."""
    return bool(node.outputs) and all(o in node.inputs for o in node.outputs)


class _Analysis:
    def __init__(self, model: nn.Module, g: _Graph):
        self.model = model
        self.g = g

    def consumers(self, t: int) -> list[_Node]:
        out: list[_Node] = []
        for i in self.g.consumers.get(t, []):
            n = self.g.nodes[i]
            if _is_passthrough(n):
                continue  # its "output" is the same tensor: the later consumers are listed under t already
            out.append(n)
        return out

    def chain(self, t: int) -> tuple[int, list[_Node]]:
        """Follow single-consumer activation nodes from tensor t; returns (end tensor, activation nodes)."""
        acts: list[_Node] = []
        while t not in self.g.model_outputs:
            cs = self.consumers(t)
            if len(cs) != 1 or _act_bounds(cs[0]) is None or len(cs[0].outputs) != 1:
                break
            acts.append(cs[0])
            t = cs[0].outputs[0]
        return t, acts

    @staticmethod
    def is_layer(n: _Node) -> bool:
        return n.kind == "module" and isinstance(n.module, QuantLayer)


def _shareable(layer: QuantLayer) -> bool:
    """The layer's input grid can be shared: 8-bit, per tensor, the full 8-bit range (no integer Clip)."""
    q = layer.input_quantizer
    if q is None or getattr(q, "online", False) or not q.is_ready or getattr(layer, "smooth_scale", None) is not None:
        return False  # (with SmoothQuant the grid is that of x / s, not of the tensor itself)
    p = q.qparams()
    if p.per_channel or int(p.bits.max()) != 8:
        return False
    lo, hi = (-128, 127) if p.signed else (0, 255)
    return int(p.qmin) == lo and int(p.qmax) == hi


def _grid_range(p: QuantParams) -> tuple[float, float]:
    s = p.scale.detach().to(torch.float32).reshape(())
    z = int(p.zero_point.reshape(()))
    lo = float((torch.tensor(float(int(p.qmin) - z), dtype=torch.float32) * s))
    hi = float((torch.tensor(float(int(p.qmax) - z), dtype=torch.float32) * s))
    return lo, hi


@dataclass
class _Target:
    tensor: int  # id of the tensor the ONNX rule quantizes (after the activation chain)
    description: str
    site: str | None = None
    site_tensor: int | None = None  # the tensor the hook sees (the layer output before its chain)
    bounds: tuple[float, float] = (-math.inf, math.inf)  # activation clamp bounds between site and tensor
    shares: str | None = None


def _targets(model: nn.Module, g: _Graph) -> tuple[list[_Target], list[str]]:
    a = _Analysis(model, g)
    names = {id(m): n for n, m in model.named_modules()}
    targets: dict[int, _Target] = {}
    order: list[int] = []
    unsupported: list[str] = []

    def label(t: int) -> str:
        p = g.producer.get(t)
        if p is None:
            return "a model input" if t in g.model_inputs else "a constant"
        n = g.nodes[p]
        return f"output of {n.target}" + (f" (node {n.index})" if n.kind == "function" else "")

    def want(t: int, description: str) -> None:
        if t in targets:
            return
        targets[t] = _Target(t, description)
        order.append(t)

    for n in g.nodes:
        if a.is_layer(n) or (n.kind == "function" and n.target in _SUM_FUNCS):
            for t in n.outputs:
                end, _ = a.chain(t)
                cs = a.consumers(end)
                if end in g.model_outputs or not cs or all(a.is_layer(c) for c in cs):
                    continue
                want(end, f"{label(t)}" + (" after its activation" if end != t else "") + " (feeds "
                     + ", ".join(sorted({c.target for c in cs if not a.is_layer(c)})) + ")")
    quantized = set(targets)
    for n in g.nodes:
        ins: list[int] = []
        if n.kind == "function" and n.target in _ADD_FUNCS:
            ins = [t for t in n.inputs if t in g.producer or t in g.model_inputs]
        elif (n.kind == "function" and n.target in _POOL_FUNCS) or (
                n.kind == "module" and isinstance(n.module, (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d))):
            ins = n.inputs[:1]
        for t in ins:
            if t in quantized or t in targets:
                continue
            want(t, f"{label(t)} (input of {n.target})")
    def lender(t: int, holds_zero: bool = False) -> str | None:
        """The first quantized layer reading tensor t whose input grid can be shared (and holds 0, if asked)."""
        for c in a.consumers(t):
            if a.is_layer(c) and _shareable(c.module):
                lo, hi = _grid_range(c.module.input_quantizer.qparams())
                if not holds_zero or lo <= 0.0 <= hi:
                    return names.get(id(c.module), c.target)
        return None

    kept: list[_Target] = []
    for t in order:
        tg = targets[t]
        # the grid: a quantized layer reading the tensor lends its input grid
        tg.shares = lender(t)
        if tg.shares is None:
            # a tensor selected from another (a strided / padded residual shortcut, as onnxruntime's quantizer
            # propagates a grid through Slice / Pad / Reshape / MaxPool): the grid of a layer reading the source,
            # so that the point adds no rounding (and onnxruntime no requantization) where the source is on it
            u, p = t, g.producer.get(t)
            while p is not None and _selects_values(g.nodes[p]):
                u = g.nodes[p].inputs[0]
                p = g.producer.get(u)
            if u != t:
                tg.shares = lender(u, holds_zero=True)
                if tg.shares is not None:
                    tg.description += f" (selected from the input of {tg.shares}: its grid)"
        # the site: the innermost module returning the tensor, called once, returning before any consumer
        first_use = min((c.index for c in a.consumers(t)), default=len(g.nodes))
        for mod, pos in g.outputs_of.get(t, []):
            if g.calls.get(mod, 0) == 1 and pos <= first_use and mod:
                tg.site, tg.site_tensor = mod, t
                break
        if tg.site is None:
            # the end of an activation chain after a quantized layer: hook the layer's output
            p = g.producer.get(t)
            chain: list[_Node] = []
            u = t
            while p is not None and _act_bounds(g.nodes[p]) is not None and len(g.nodes[p].inputs) >= 1:
                chain.append(g.nodes[p])
                u = g.nodes[p].inputs[0]
                p = g.producer.get(u)
            if chain and p is not None and a.is_layer(g.nodes[p]):
                for mod, pos in g.outputs_of.get(u, []):
                    if g.calls.get(mod, 0) == 1:
                        lo = max(_act_bounds(c)[0] for c in chain)  # type: ignore[index]
                        hi = min(_act_bounds(c)[1] for c in chain)  # type: ignore[index]
                        tg.site, tg.site_tensor, tg.bounds = mod, u, (lo, hi)
                        break
        if tg.site is None:
            unsupported.append(tg.description)
            continue
        kept.append(tg)
    return kept, unsupported


# ---- entry point ---------------------------------------------------------------------------------------------------

def _fits_in(p: QuantParams, bounds: tuple[float, float]) -> bool:
    lo, hi = _grid_range(p)
    return lo >= bounds[0] and hi <= bounds[1]


def _fresh_quantizer(lo: float, hi: float, bounds: tuple[float, float]) -> nn.Module:
    """A frozen per-tensor uint8 min-max quantizer of [lo, hi], its grid inside ``bounds``."""
    from bitalloc.quantizers.frozen import FrozenQuantizer

    scale, zp, qmin, qmax = qparams_from_range(torch.tensor(lo), torch.tensor(hi), 8, symmetric=False)
    qp = QuantParams(bits=torch.tensor(8), scale=scale.reshape(()), zero_point=zp.reshape(()), qmin=qmin.reshape(()),
                     qmax=qmax.reshape(()), axis=None, signed=False)
    for _ in range(64):  # float32 rounding of s * 255 may overshoot an activation bound: shrink s by ulps
        if _fits_in(qp, bounds):
            break
        s = qp.scale.to(torch.float32)
        qp.scale = torch.nextafter(s, torch.zeros_like(s))
    else:  # pragma: no cover - the bounds contain [lo, hi] by construction
        raise ConfigError(f"cannot fit a uint8 grid of [{lo}, {hi}] inside {bounds}")
    return FrozenQuantizer.from_qparams(qp, "act", None, None)


@torch.no_grad()
def _widen_weight_steps(layer: QuantLayer, sx: float) -> int:
    """Enlarge the weight step of output channels whose bias does not fit int32 codes at s_x * s_w[c].

    Channels with (nearly) zero weights get tiny min-max steps, so b / (s_x s_w) overflows int32 and
    onnxruntime would clip the bias. Like onnxruntime's quantizer (``_adjust_weight_scale_for_int32_bias``):
    s_w[c] >= 1.0001 * 2 |b_c| / (2^32 - 2) / s_x; those channels' weights are re-quantized on the wider step
    (their codes shrink, usually to 0: the weights are ~1e-8). The weight quantizer of the layer is replaced
    by a frozen one with the new steps. Returns the number of channels changed."""
    from bitalloc.quantizers.frozen import FrozenQuantizer

    wq = layer.weight_quantizer
    bias = layer.layer.bias
    pw = wq.qparams().detach()
    cout = bias.shape[0]
    xi = pw.corr_scale.to(torch.float64).reshape(-1).expand(cout) if pw.corr_scale is not None else torch.ones(cout, dtype=torch.float64)
    sw = pw.scale.to(torch.float64).reshape(-1).expand(cout)
    qrange = float(2**31 - 1) - float(-(2**31) + 1)
    need = 1.0001 * 2.0 * bias.detach().to(torch.float64).abs() / qrange / sx / xi
    bad = (sw < need) & (sw > 0)
    if not bool(bad.any()):
        return 0
    new_scale = torch.where(bad, torch.maximum(sw, need), sw).to(torch.float32)  # per channel from now on
    qp = _replace(pw, scale=new_scale, zero_point=pw.zero_point.reshape(-1).expand(cout).clone(),
                         bits=pw.bits.reshape(-1).expand(cout).clone(), qmin=pw.qmin.reshape(-1).expand(cout).clone(),
                         qmax=pw.qmax.reshape(-1).expand(cout).clone())
    layer.weight_quantizer = FrozenQuantizer.from_qparams(qp, "weight", 0, cout)
    return int(bad.sum())


def _replace(p: QuantParams, **kw: Any) -> QuantParams:
    from dataclasses import replace

    return replace(p, axis=0 if p.axis is None else p.axis, **kw)


@torch.no_grad()
def _int32_bias(layer: QuantLayer) -> tuple[float, int] | None:
    """Round the layer's bias to s_x * s_w[c] * xi[c] (float32, as onnxruntime), after widening the weight steps
    whose bias would not fit int32 (:func:`_widen_weight_steps`); returns (largest bias change, channels widened),
    or None when onnxruntime would not run the layer in int8 (or it has no bias)."""
    bias = layer.layer.bias
    wq, aq = layer.weight_quantizer, layer.input_quantizer
    if bias is None or wq is None or aq is None or getattr(aq, "online", False) or not aq.is_ready:
        return None
    pa, pw = aq.qparams().detach(), wq.qparams().detach()
    if pa.per_channel or int(pa.bits.max()) > 8 or int(pw.bits.max()) > 8:
        return None
    if pw.corr_shift is not None and bool((pw.corr_shift != 0).any()):
        return None  # the bias-shift branch: not an int8 layer
    sx = float(pa.scale.to(torch.float32).reshape(()))
    widened = _widen_weight_steps(layer, sx)
    pw = layer.weight_quantizer.qparams().detach()
    cout = bias.shape[0]
    sw = pw.scale.to(torch.float64).reshape(-1).expand(cout)
    if pw.corr_scale is not None:
        sw = sw * pw.corr_scale.to(torch.float64).reshape(-1).expand(cout)
    step = pa.scale.to(torch.float32).reshape(()) * sw.to(torch.float32)  # float32 product, as onnxruntime
    b = bias.detach().to(torch.float64)
    k = torch.round(b / step.to(torch.float64))
    if bool((k.abs() > 2**31 - 1).any()):
        return None
    new = (k * step.to(torch.float64)).to(bias.dtype)
    change = float((new.to(torch.float64) - b).abs().max()) if cout else 0.0
    bias.copy_(new)
    return change, widened


@torch.no_grad()
def _requantize_shift_in_model(layer: QuantLayer) -> float | None:
    """Put the ``bias_shift="requantize"`` representation of a bias-corrected weight into the layer itself.

    w_hat = xi s (q - z) + beta becomes codes on a finer 8-bit grid (step xi s / M, see
    :func:`bitalloc.runtime.onnx_export._requantize_shift`): the layer's weight is set to those dequantized
    values and its quantizer to a frozen per-channel grid that reproduces them exactly, so the layer is an
    ordinary int8 layer (no shift branch) and the model computes what the int8 export computes. Returns the
    largest |beta - represented shift|, or None when the layer has no shift (or weights wider than 8 bits)."""
    from bitalloc.quantizers.frozen import FrozenQuantizer
    from bitalloc.runtime.onnx_export import _qtype, _requantize_shift, _weight_ints

    if layer.weight_quantizer is None:
        return None
    w = _weight_ints(layer)
    if w.beta is None or w.bits > 8:
        return None
    new, err, _ = _requantize_shift(w)
    cout = new.codes.shape[0]
    scale = new.scale.to(torch.float32).reshape(-1).expand(cout).clone()
    zp = new.zero_point.to(torch.int64).reshape(-1).expand(cout).clone()
    _, tmin, tmax = _qtype(w.signed)
    values = (new.codes - reshape_for_axis(zp, new.codes.ndim, 0)).to(torch.float32) * reshape_for_axis(scale, new.codes.ndim, 0)
    kept = layer.weight_quantizer.qparams().kept
    qp = QuantParams(bits=torch.full((cout,), 8), scale=scale, zero_point=zp, qmin=torch.full((cout,), tmin),
                     qmax=torch.full((cout,), tmax), axis=0, signed=w.signed,
                     kept=None if kept is None else kept.detach().reshape(-1).expand(cout).clone())
    weight = layer.layer.weight
    weight.copy_(values.to(weight.dtype).reshape(weight.shape))
    layer.weight_quantizer = FrozenQuantizer.from_qparams(qp, "weight", 0, cout).to(weight.device)
    return err


def align_for_ort(model: nn.Module, calibration_data: Iterable, *, int32_bias: bool = True,
                  bias_shift: str = "exact", samples: int | None = None, inplace: bool = False) -> nn.Module:
    """A copy of a quantized model with onnxruntime's int8 quantization points in it (module docstring).

    ``calibration_data``: (x, ...) batches or tensors; the first gives the example forward pass, all (or the
    first ``samples``) give the min-max ranges of the new uint8 grids. ``int32_bias``: also round biases to
    onnxruntime's int32 bias grid. ``bias_shift``: "exact" leaves bias-correction shifts as they are (those
    layers export with a float shift branch); "requantize" puts the finer-grid int8 representation of
    ``export_onnx(bias_shift="requantize")`` into the model (an approximation of the shift, now part of the
    model: the export runs in int8 and computes what the model computes). The returned model carries the report
    as ``model.bitalloc_ort_alignment`` (:class:`AlignReport`). Raises ConfigError for models without quantized
    layers or already aligned ones.
    """
    if bias_shift not in ("exact", "requantize"):
        raise ConfigError(f"align_for_ort: bias_shift must be 'exact' or 'requantize', got {bias_shift!r}")
    if not any(True for _ in quant_layers(model)):
        raise ConfigError("the model has no quantized layers: quantize it with bitalloc.quantize first")
    if tensor_points(model):
        raise ConfigError("the model is already aligned with onnxruntime (it has tensor quantizers)")
    batches = []
    seen = 0
    for batch in calibration_data:
        x = batch_inputs(batch)
        batches.append(x)
        seen += batch_size(x)
        if samples is not None and seen >= samples:
            break
    if not batches:
        raise ConfigError("align_for_ort needs calibration_data (at least one batch)")
    m = model if inplace else copy.deepcopy(model)
    was_training = m.training
    m.eval()
    report = AlignReport()
    if bias_shift == "requantize":
        for name, ql in quant_layers(m):
            err = _requantize_shift_in_model(ql)
            if err is not None:
                report.requantized_shifts[name] = err
    g = _record(m, cut_inputs(batches[0], 1))
    targets, report.unsupported = _targets(m, g)
    del g
    modules = dict(m.named_modules())
    # ranges of the new grids, measured on the (unaligned) fake-quant model, all at once
    fresh = [t for t in targets if t.shares is None]
    lo = {id(t): 0.0 for t in fresh}
    hi = {id(t): 0.0 for t in fresh}
    handles = []
    for t in fresh:
        def observe(mod, args, out, _t=t):
            if isinstance(out, Tensor) and out.numel():
                v = out.detach()
                lo[id(_t)] = min(lo[id(_t)], float(v.min()))
                hi[id(_t)] = max(hi[id(_t)], float(v.max()))
        handles.append(modules[t.site].register_forward_hook(observe))
    try:
        with torch.no_grad():
            for x in (batches if fresh else []):
                call_model(m, x)
    finally:
        for h in handles:
            h.remove()
    points = nn.ModuleDict()
    layers = {name: ql for name, ql in quant_layers(m)}
    for i, t in enumerate(targets):
        key = f"p{i}"
        if t.shares is not None:
            shared = layers[t.shares].input_quantizer
            if not _fits_in(shared.qparams(), t.bounds):
                report.unsupported.append(f"{t.description}: {t.shares}'s input grid exceeds the activation bounds")
                continue
            tq = TensorQuant(key, t.site, shared=shared, shares=t.shares, description=t.description)
            grid = f"shares {t.shares}'s input grid"
            plo = phi = None
        else:
            b_lo, b_hi = t.bounds
            plo = min(max(lo[id(t)], b_lo), b_hi)
            phi = max(min(hi[id(t)], b_hi), b_lo)
            tq = TensorQuant(key, t.site, own=_fresh_quantizer(plo, phi, t.bounds), description=t.description)
            grid = f"uint8 min-max [{plo:.4g}, {phi:.4g}]"
        points[key] = tq
        report.points.append(AlignPoint(key, t.site, t.description, grid, t.shares, plo, phi))
    m.add_module(POINTS_ATTR, points)
    for tq in points.values():
        modules[tq.site].register_forward_hook(tq.hook)
    if int32_bias:
        for name, ql in layers.items():
            res = _int32_bias(ql)
            if res is not None:
                report.int32_biases.append(name)
                report.max_bias_change = max(report.max_bias_change, res[0])
                if res[1]:
                    report.widened_weight_steps[name] = res[1]
    m.__dict__[REPORT_ATTR] = report
    m.train(was_training)
    return m
