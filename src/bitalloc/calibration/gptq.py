"""Sequential GPTQ rounding of every quantized layer whose weight config asks for it (``rounding="gptq"``).

Layers are processed in execution order. For each, the calibration data runs through the model as it is
now (earlier layers already quantized and rounded, activations quantized), the layer's *quantized* input is
captured just before its convolution / matrix product (after any padding its own forward applies), the
Hessian sum x x^T is accumulated per group, and :func:`bitalloc.quant.gptq.gptq_round` picks the codes on
the grid that calibration already fixed. The layer's float weight is then replaced by those grid values and
its weight quantizer is locked (later recalibration keeps its grid), so every downstream path (fake quant,
cost, export, packing, integer execution) sees exactly the GPTQ codes. Bias correction is reset: GPTQ's
error compensation supersedes the data-free mean shift.

With ``gptq_asymmetric`` in the weight config, the layer is fitted to the float network's output instead of its
own float weights on the quantized inputs (asymmetric calibration, :mod:`bitalloc.quant.gptq`): a float copy of the
model taken before the first rounding (quantizers off) runs on the same samples, its layer of the same name gives
the float inputs x_f, and the cross moments sum x_f x_q^T join the Hessian (:class:`Moments`).

The weight config's ``gptq_act_order`` and ``gptq_damp`` set the column order and the damping
(:mod:`bitalloc.quant.gptq`); with ``gptq_damp="cv"`` the Hessian is accumulated per fold of the calibration
samples (sample i in fold i mod 4) and each layer takes the damping of :data:`CV_DAMPS` whose rounding,
fitted on three folds, reconstructs the fourth best (summed over the four).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from bitalloc.batches import call_model, take_inputs
from bitalloc.errors import DataError
from bitalloc.model.layers import QuantLayer, float_mode, quant_layers
from bitalloc.model.prepare import prepare_info
from bitalloc.quant.gptq import gptq_round, heldout_damping
from bitalloc.quant.grid import dequantize, group_params

_OPS = {F.conv1d: "conv1d", F.conv2d: "conv2d", F.linear: "linear"}


class _Captured(Exception):
    def __init__(self, op: str, args: tuple, kwargs: dict):
        super().__init__(op)
        self.op, self.args, self.kwargs = op, args, kwargs


class _InterceptOp(TorchFunctionMode):
    """Stops at the layer's first conv/linear call and reports its arguments."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _OPS:
            raise _Captured(_OPS[func], args, kwargs or {})
        return func(*args, **(kwargs or {}))


def op_call(layer: nn.Module, x: Tensor) -> _Captured:
    """The (op, args, kwargs) with which ``layer``'s own forward calls F.conv1d / F.conv2d / F.linear on ``x``."""
    try:
        with _InterceptOp():
            layer(x)
    except _Captured as call:
        return call
    raise DataError(f"{type(layer).__name__} did not call F.conv1d, F.conv2d or F.linear in its forward")


def _conv_arg(call: _Captured, i: int, name: str, default: Any) -> Any:
    return call.args[i] if len(call.args) > i else call.kwargs.get(name, default)


def _pair(v: Any, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n


def input_columns(call: _Captured, weight: Tensor) -> tuple[Tensor, int]:
    """Inputs of the op as columns matching ``weight`` rows: [N', G, K] per output position, and G."""
    x = call.args[0]
    if call.op == "linear":
        return x.reshape(-1, 1, x.shape[-1]), 1
    groups = int(_conv_arg(call, 6, "groups", 1))
    stride, padding, dilation = (_conv_arg(call, i, n, d) for i, n, d in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1)))
    if call.op == "conv1d":
        x = x.unsqueeze(2)
        k = (1, weight.shape[-1])
        stride, dilation = (1, _pair(stride, 1)[0]), (1, _pair(dilation, 1)[0])
        padding = padding if isinstance(padding, str) else (0, _pair(padding, 1)[0])
    else:
        k = tuple(weight.shape[-2:])
        stride, dilation = _pair(stride, 2), _pair(dilation, 2)
        padding = padding if isinstance(padding, str) else _pair(padding, 2)
    if isinstance(padding, str):  # "valid" or "same" (stride 1): pad explicitly as torch does
        if padding == "valid":
            padding = (0, 0)
        else:
            total = [d * (kk - 1) for d, kk in zip(dilation, k)]
            x = F.pad(x, [total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2])
            padding = (0, 0)
    cols = F.unfold(x, k, dilation=dilation, padding=padding, stride=stride)  # [N, C*kh*kw, L]
    n, ck, length = cols.shape
    return cols.reshape(n, groups, ck // groups, length).permute(0, 3, 1, 2).reshape(n * length, groups, ck // groups), groups


class _Stop(Exception):
    pass


@dataclass
class Moments:
    """Sums over calibration inputs of one layer, per group ([G, K, K], float64; per fold [F, G, K, K]):
    ``hessian`` = sum x_q x_q^T of the inputs its convolution / matrix product sees in the quantized network and,
    for asymmetric calibration (:mod:`bitalloc.quant.gptq`), ``cross`` = sum x_f x_q^T with the float network's
    inputs x_f and (per fold, for the cross-validated loss) ``reference`` = sum x_f x_f^T."""

    hessian: Tensor
    cross: Tensor | None = None
    reference: Tensor | None = None

    def __add__(self, other: "Moments") -> "Moments":
        def add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            return None if a is None or b is None else a + b
        return Moments(self.hessian + other.hessian, add(self.cross, other.cross), add(self.reference, other.reference))

    @property
    def folds(self) -> int | None:
        return self.hessian.shape[0] if self.hessian.ndim == 4 else None

    def total(self) -> "Moments":
        """The sums over all folds (itself without folds)."""
        if self.folds is None:
            return self
        return Moments(*(None if t is None else t.sum(dim=0) for t in (self.hessian, self.cross, self.reference)))


@torch.no_grad()
def input_moments(layer: nn.Module, x: Tensor, input_quantizer: nn.Module | None = None,
                  reference: Tensor | None = None, *, chunk: int = 4, folds: int | None = None,
                  offset: int = 0) -> Moments:
    """:class:`Moments` of one batch ``x`` of inputs of ``layer`` (a Conv / Linear module), as its convolution /
    matrix product sees them: after ``input_quantizer`` (if given) and any padding the layer's own forward
    applies. ``reference``: the float network's inputs of the same samples (same shape, not quantized), for
    asymmetric calibration (``cross``, and ``reference`` with folds). ``chunk`` samples are unfolded at a time.

    ``folds=F``: one sum per fold, [F, G, K, K]; sample i of the batch belongs to fold (offset + i) % F
    (``offset``: the samples of earlier batches), for :func:`bitalloc.quant.gptq.heldout_damping`."""
    if reference is not None and reference.shape != x.shape:
        raise DataError(f"the float reference inputs of {type(layer).__name__} have shape {tuple(reference.shape)}, "
                        f"its quantized inputs {tuple(x.shape)}: both networks must see the same samples")
    if input_quantizer is not None:
        x = input_quantizer(x)
    out: Moments | None = None
    for start in range(0, x.shape[0], chunk):
        n = x[start:start + chunk].shape[0]
        ids = (offset + start + torch.arange(n)) % folds if folds is not None else None

        def cols(t: Tensor) -> Tensor:  # [samples, positions, G, K]
            c, _ = input_columns(op_call(layer, t[start:start + chunk]), layer.weight)
            return c.to(torch.float64).reshape(n, -1, *c.shape[1:])

        def moment(a: Tensor, b: Tensor) -> Tensor:
            if ids is None:
                return torch.einsum("sngk,sngl->gkl", a, b)
            per = torch.einsum("sngk,sngl->sgkl", a, b)
            return per.new_zeros(folds, *per.shape[1:]).index_add_(0, ids, per)

        q = cols(x)
        m = Moments(moment(q, q))
        if reference is not None:
            f = cols(reference)
            m.cross = moment(f, q)
            m.reference = moment(f, f) if folds is not None else None
        out = m if out is None else out + m
    if out is None:
        raise DataError(f"no inputs to accumulate the GPTQ Hessian of {type(layer).__name__}")
    return out


def input_hessian(layer: nn.Module, x: Tensor, input_quantizer: nn.Module | None = None, *, chunk: int = 4,
                  folds: int | None = None, offset: int = 0) -> Tensor:
    """sum of x x^T over one batch ``x`` of inputs of ``layer``, per group ([G, K, K], or per fold [F, G, K, K]):
    :func:`input_moments`' ``hessian``."""
    return input_moments(layer, x, input_quantizer, chunk=chunk, folds=folds, offset=offset).hessian


def batches_moments(layer: nn.Module, batches: Iterable[Tensor], input_quantizer: nn.Module | None = None, *,
                    folds: int | None = None, asymmetric: bool = False) -> Moments:
    """:func:`input_moments` summed over several batches of float inputs, the samples numbered across them for
    ``folds``; ``asymmetric``: the batches themselves are the float reference x_f (the layer alone quantized, as
    the sensitivity pass builds it) and x_q = input_quantizer(x_f)."""
    out: Moments | None = None
    seen = 0
    for x in batches:
        m = input_moments(layer, x, input_quantizer, x if asymmetric else None, folds=folds, offset=seen)
        out, seen = (m if out is None else out + m), seen + x.shape[0]
    if out is None:
        raise DataError(f"no inputs to accumulate the GPTQ Hessian of {type(layer).__name__}")
    return out


#: dampings :func:`round_layer` chooses from with ``gptq_damp="cv"`` (GPTQ's 1% up to 3x the mean diagonal)
CV_DAMPS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
#: folds of the calibration samples for ``gptq_damp="cv"``
CV_FOLDS = 4


@torch.no_grad()
def layer_moments(model: nn.Module, layer: QuantLayer, data: Iterable, num_samples: int, *, chunk: int = 4,
                  folds: int | None = None, reference: nn.Module | None = None) -> Moments:
    """:class:`Moments` of ``layer``'s inputs over the calibration data: x_q as its convolution / matrix product
    sees them in the current ``model`` (earlier layers as they are now, its input quantized); ``reference``: a float
    copy of the network (the model before any GPTQ rounding, quantizers off), whose layer of the same name gives x_f
    on the same samples (asymmetric calibration); ``folds=F``: one sum per fold ([F, G, K, K],
    :func:`input_moments`)."""
    ref_layer = None
    if reference is not None:
        name = next((n for n, l in quant_layers(model) if l is layer), None)
        ref_layer = dict(quant_layers(reference)).get(name) if name is not None else None
        if ref_layer is None or type(ref_layer.layer) is not type(layer.layer):
            raise DataError(f"the float reference network has no layer {name!r} like the model's: give a copy of the "
                            "model being rounded (before rounding)")
    got: dict[str, Tensor] = {}

    def grab(key: str, owner: QuantLayer) -> Any:
        def hook(mod: nn.Module, args: tuple) -> None:
            got[key] = owner.smooth_input(args[0])
            raise _Stop
        return hook

    def run(m: nn.Module, owner: QuantLayer, key: str, x: Any) -> None:
        handle = owner.register_forward_pre_hook(grab(key, owner))
        try:
            call_model(m, x)
        except _Stop:
            pass
        finally:
            handle.remove()

    out: Moments | None = None
    seen = 0
    for x in take_inputs(data, num_samples):
        got.clear()
        run(model, layer, "q", x)
        if "q" not in got:
            continue
        if ref_layer is not None:
            run(reference, ref_layer, "f", x)
        m = input_moments(layer.layer, got["q"], layer.input_quantizer, got.get("f"), chunk=chunk, folds=folds,
                          offset=seen)
        out, seen = (m if out is None else out + m), seen + got["q"].shape[0]
    if out is None:
        raise DataError(f"no calibration data reached layer {layer.layer_name!r} for GPTQ")
    return out


class GPTQSettings(NamedTuple):
    """GPTQ options of one layer's weight config (:class:`bitalloc.config.TensorConfig`)."""

    damp: float | str
    act_order: bool
    asymmetric: bool


def gptq_settings(layer: QuantLayer) -> GPTQSettings:
    """``gptq_damp``, ``gptq_act_order`` and ``gptq_asymmetric`` of ``layer``'s weight config."""
    cfg = getattr(layer.weight_quantizer, "cfg", None)
    return GPTQSettings(getattr(cfg, "gptq_damp", 0.01), bool(getattr(cfg, "gptq_act_order", False)),
                        bool(getattr(cfg, "gptq_asymmetric", False)))


def hessian_folds(layer: QuantLayer, damp: float | str | None = None) -> int | None:
    """Folds of the Hessian that :func:`round_layer` needs for ``layer`` with ``damp`` (None: its config's);
    None: the plain sum."""
    return CV_FOLDS if (gptq_settings(layer).damp if damp is None else damp) == "cv" else None


@torch.no_grad()
def round_layer(layer: QuantLayer, moments: Moments | Tensor, *, damp: float | str | None = None,
                act_order: bool | None = None) -> dict[str, Any]:
    """Replace ``layer``'s float weight by its GPTQ-rounded grid values (the grid calibration fixed; ``moments`` of
    its inputs, or just their Hessian [G, K, K], or per fold [F, G, K, K]); bias correction is reset and the weight
    quantizer locked (module docstring). ``damp`` / ``act_order`` default to the layer's weight config; ``damp="cv"``
    picks the damping of :data:`CV_DAMPS` by cross-validation over the folds (:func:`heldout_damping`). With
    ``gptq_asymmetric`` in the config, ``moments`` must hold the cross moments with the float network's inputs
    (:func:`layer_moments` ``reference``). Returns {"damp": the damping used, "asymmetric": bool, "cv_losses": the
    cross-validated loss of each of CV_DAMPS (with "cv")}."""
    settings = gptq_settings(layer)
    damp = settings.damp if damp is None else damp
    act_order = settings.act_order if act_order is None else act_order
    m = moments if isinstance(moments, Moments) else Moments(moments)
    if not settings.asymmetric:
        m = Moments(m.hessian)  # plain GPTQ: any cross moments given are not used
    elif m.cross is None:
        raise DataError(f"layer {layer.layer_name!r}: gptq_asymmetric needs the cross moments of the float network's "
                        "inputs with the quantized ones (layer_moments(..., reference=float copy)); or set "
                        "gptq_asymmetric false")
    whole = m.total()
    wq = layer.weight_quantizer
    w = layer.layer.weight
    G = whole.hessian.shape[0]
    p = wq.qparams()
    rows = w.shape[0]
    per_row = [t.expand(rows) if t.ndim == 0 else t for t in (p.scale, p.zero_point, p.qmin, p.qmax)]
    if p.grouped:  # a scale and zero point per weight ([rows, K]); G = 1 (group-wise grids are for Linear weights)
        per_row[:2] = group_params(w.reshape(rows, -1), 0, p.scale, p.zero_point)
    grid = [t.reshape(G, rows // G, *t.shape[1:]) for t in per_row]
    weight = w.reshape(G, rows // G, -1)
    info: dict[str, Any] = {"asymmetric": settings.asymmetric}
    if damp == "cv":
        if m.folds is None:
            raise DataError(f"layer {layer.layer_name!r}: gptq_damp='cv' needs the Hessian per fold of the calibration "
                            "samples (layer_moments(..., folds=CV_FOLDS)); give a number instead")
        damp, losses = heldout_damping(weight, m.hessian, *grid, CV_DAMPS, act_order=act_order,
                                       fold_cross=m.cross, fold_reference=m.reference)
        info["cv_losses"] = losses
    info["damp"] = float(damp)
    codes = gptq_round(weight, whole.hessian, *grid, damp=float(damp), act_order=act_order, cross=whole.cross)
    q = codes.reshape(rows, -1)
    deq = dequantize(q, per_row[0], per_row[1], axis=0)
    w.copy_(deq.reshape(w.shape).to(w.dtype))
    wq.set_bias_correction(w, "none")
    wq.lock()
    return info


@torch.no_grad()
def apply_gptq(model: nn.Module, data: Iterable, num_samples: int, *, damp: float | str | None = None,
               progress: Any = None, report: dict[str, Any] | None = None) -> list[str]:
    """Round, in execution order, every layer whose weight TensorConfig has ``rounding="gptq"``, with its
    config's damping, column order and calibration target (``damp``: one damping for all instead). When a layer
    asks for asymmetric calibration, a float copy of the model as it is before any rounding (quantizers off) gives
    the float network's inputs: memory for a second copy of the weights.

    Returns the names of the layers rounded; ``report`` (a dict), if given, receives each layer's
    :func:`round_layer` info (the damping used). ``progress(name)`` is called after each layer."""
    layers = dict(quant_layers(model))
    order = [n for n in prepare_info(model).order if n in layers]
    todo = [n for n in order if layers[n].weight_quantizer is not None
            and getattr(getattr(layers[n].weight_quantizer, "cfg", None), "rounding", "nearest") == "gptq"]
    reference = copy.deepcopy(model) if any(gptq_settings(layers[n]).asymmetric for n in todo) else None
    was_training = model.training
    model.eval()
    done = []
    with contextlib.ExitStack() as stack:
        if reference is not None:
            reference.eval()
            stack.enter_context(float_mode(reference))
        try:
            for name in todo:
                layer = layers[name]
                asym = gptq_settings(layer).asymmetric
                moments = layer_moments(model, layer, data, num_samples, folds=hessian_folds(layer, damp),
                                        reference=reference if asym else None)
                info = round_layer(layer, moments, damp=damp)
                if report is not None:
                    report[name] = info
                done.append(name)
                if progress is not None:
                    progress(name)
        finally:
            model.train(was_training)
    return done
