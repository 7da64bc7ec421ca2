"""Sequential GPTQ rounding of every quantized layer whose weight config asks for it (``rounding="gptq"``).

Layers are processed in execution order. For each, the calibration data runs through the model as it is
now (earlier layers already quantized and rounded, activations quantized), the layer's *quantized* input is
captured just before its convolution / matrix product (after any padding its own forward applies), the
Hessian sum x x^T is accumulated per group, and :func:`bitalloc.quant.gptq.gptq_round` picks the codes on
the grid that calibration already fixed. The layer's float weight is then replaced by those grid values and
its weight quantizer is locked (later recalibration keeps its grid), so every downstream path (fake quant,
cost, export, packing, integer execution) sees exactly the GPTQ codes. Bias correction is reset: GPTQ's
error compensation supersedes the data-free mean shift.

The weight config's ``gptq_act_order`` and ``gptq_damp`` set the column order and the damping
(:mod:`bitalloc.quant.gptq`); with ``gptq_damp="cv"`` the Hessian is accumulated per fold of the calibration
samples (sample i in fold i mod 4) and each layer takes the damping of :data:`CV_DAMPS` whose rounding,
fitted on three folds, reconstructs the fourth best (summed over the four).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from bitalloc.batches import call_model, take_inputs
from bitalloc.errors import DataError
from bitalloc.model.layers import QuantLayer, quant_layers
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


@torch.no_grad()
def input_hessian(layer: nn.Module, x: Tensor, input_quantizer: nn.Module | None = None, *, chunk: int = 4,
                  folds: int | None = None, offset: int = 0) -> Tensor:
    """sum of x x^T over one batch ``x`` of inputs of ``layer`` (a Conv / Linear module), per group
    ([G, K, K], float64), as its convolution / matrix product sees them: after ``input_quantizer`` (if given)
    and any padding the layer's own forward applies. ``chunk`` samples are unfolded at a time.

    ``folds=F``: one sum per fold instead, [F, G, K, K]; sample i of the batch belongs to fold (offset + i) % F
    (``offset``: the samples of earlier batches), for :func:`bitalloc.quant.gptq.heldout_damping`."""
    if input_quantizer is not None:
        x = input_quantizer(x)
    H: Tensor | None = None
    for start in range(0, x.shape[0], chunk):
        part = x[start:start + chunk]
        call = op_call(layer, part)
        cols, _ = input_columns(call, layer.weight)
        cols = cols.to(torch.float64)
        if folds is None:
            h = torch.einsum("ngk,ngl->gkl", cols, cols)
        else:  # rows are sample-major: [samples, positions, G, K]
            cols = cols.reshape(part.shape[0], -1, *cols.shape[1:])
            per = torch.einsum("sngk,sngl->sgkl", cols, cols)
            ids = (offset + start + torch.arange(part.shape[0])) % folds
            h = per.new_zeros(folds, *per.shape[1:]).index_add_(0, ids, per)
        H = h if H is None else H + h
    if H is None:
        raise DataError(f"no inputs to accumulate the GPTQ Hessian of {type(layer).__name__}")
    return H


def batches_hessian(layer: nn.Module, batches: Iterable[Tensor], input_quantizer: nn.Module | None = None, *,
                    folds: int | None = None) -> Tensor:
    """:func:`input_hessian` summed over several batches of inputs, the samples numbered across them for
    ``folds``."""
    H: Tensor | None = None
    seen = 0
    for x in batches:
        h = input_hessian(layer, x, input_quantizer, folds=folds, offset=seen)
        H, seen = (h if H is None else H + h), seen + x.shape[0]
    if H is None:
        raise DataError(f"no inputs to accumulate the GPTQ Hessian of {type(layer).__name__}")
    return H


#: dampings :func:`round_layer` chooses from with ``gptq_damp="cv"`` (GPTQ's 1% up to 3x the mean diagonal)
CV_DAMPS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
#: folds of the calibration samples for ``gptq_damp="cv"``
CV_FOLDS = 4


@torch.no_grad()
def layer_hessian(model: nn.Module, layer: QuantLayer, data: Iterable, num_samples: int, *,
                  chunk: int = 4, folds: int | None = None) -> Tensor:
    """sum over calibration inputs of x x^T for each group of ``layer`` ([G, K, K], float64), where x are the
    layer's quantized inputs as seen by its convolution / matrix product in the current model; ``folds=F``: one
    sum per fold of the samples ([F, G, K, K], :func:`input_hessian`)."""
    H: list[Tensor] = []
    seen = [0]

    def hook(mod: nn.Module, args: tuple) -> None:
        h = input_hessian(layer.layer, layer.smooth_input(args[0]), layer.input_quantizer, chunk=chunk,
                          folds=folds, offset=seen[0])
        seen[0] += args[0].shape[0]
        if H:
            H[0] += h
        else:
            H.append(h)
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        for x in take_inputs(data, num_samples):
            try:
                call_model(model, x)
            except _Stop:
                pass
    finally:
        handle.remove()
    if not H:
        raise DataError(f"no calibration data reached layer {layer.layer_name!r} for GPTQ")
    return H[0]


def gptq_settings(layer: QuantLayer) -> tuple[float | str, bool]:
    """(damping, act-order) of ``layer``'s weight config (``TensorConfig.gptq_damp`` / ``gptq_act_order``)."""
    cfg = getattr(layer.weight_quantizer, "cfg", None)
    return getattr(cfg, "gptq_damp", 0.01), bool(getattr(cfg, "gptq_act_order", False))


def hessian_folds(layer: QuantLayer, damp: float | str | None = None) -> int | None:
    """Folds of the Hessian that :func:`round_layer` needs for ``layer`` with ``damp`` (None: its config's);
    None: the plain sum."""
    return CV_FOLDS if (gptq_settings(layer)[0] if damp is None else damp) == "cv" else None


@torch.no_grad()
def round_layer(layer: QuantLayer, H: Tensor, *, damp: float | str | None = None,
                act_order: bool | None = None) -> dict[str, Any]:
    """Replace ``layer``'s float weight by its GPTQ-rounded grid values (the grid calibration fixed, Hessian
    ``H`` of its inputs, [G, K, K], or per fold [F, G, K, K]); bias correction is reset and the weight quantizer
    locked (module docstring). ``damp`` / ``act_order`` default to the layer's weight config; ``damp="cv"`` picks
    the damping of :data:`CV_DAMPS` by cross-validation over the folds of ``H``
    (:func:`bitalloc.quant.gptq.heldout_damping`). Returns {"damp": the damping used, "cv_losses": the
    cross-validated loss of each of CV_DAMPS (with "cv")}."""
    own_damp, own_order = gptq_settings(layer)
    damp = own_damp if damp is None else damp
    act_order = own_order if act_order is None else act_order
    folds = H if H.ndim == 4 else None
    if folds is not None:
        H = folds.sum(dim=0)
    wq = layer.weight_quantizer
    w = layer.layer.weight
    G = H.shape[0]
    p = wq.qparams()
    rows = w.shape[0]
    per_row = [t.expand(rows) if t.ndim == 0 else t for t in (p.scale, p.zero_point, p.qmin, p.qmax)]
    if p.grouped:  # a scale and zero point per weight ([rows, K]); G = 1 (group-wise grids are for Linear weights)
        per_row[:2] = group_params(w.reshape(rows, -1), 0, p.scale, p.zero_point)
    grid = [t.reshape(G, rows // G, *t.shape[1:]) for t in per_row]
    weight = w.reshape(G, rows // G, -1)
    info: dict[str, Any] = {}
    if damp == "cv":
        if folds is None:
            raise DataError(f"layer {layer.layer_name!r}: gptq_damp='cv' needs the Hessian per fold of the calibration "
                            "samples (layer_hessian(..., folds=CV_FOLDS)); give a number instead")
        damp, losses = heldout_damping(weight, folds, *grid, CV_DAMPS, act_order=act_order)
        info["cv_losses"] = losses
    info["damp"] = float(damp)
    codes = gptq_round(weight, H, *grid, damp=float(damp), act_order=act_order)
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
    config's damping and column order (``damp``: one damping for all instead).

    Returns the names of the layers rounded; ``report`` (a dict), if given, receives each layer's
    :func:`round_layer` info (the damping used). ``progress(name)`` is called after each layer."""
    layers = dict(quant_layers(model))
    order = [n for n in prepare_info(model).order if n in layers]
    was_training = model.training
    model.eval()
    done = []
    try:
        for name in order:
            layer = layers[name]
            wq = layer.weight_quantizer
            if wq is None or getattr(getattr(wq, "cfg", None), "rounding", "nearest") != "gptq":
                continue
            H = layer_hessian(model, layer, data, num_samples, folds=hessian_folds(layer, damp))
            info = round_layer(layer, H, damp=damp)
            if report is not None:
                report[name] = info
            done.append(name)
            if progress is not None:
                progress(name)
    finally:
        model.train(was_training)
    return done
