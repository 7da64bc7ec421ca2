"""Freezing: turn a trained (or calibrated) quantized model into a fixed mixed-precision, pruned model.

``freeze(model)`` replaces every quantizer by a :class:`~bitalloc.quantizers.frozen.FrozenQuantizer` holding its
test-time :class:`~bitalloc.quantizers.base.QuantParams`:

* Bayesian Bits: gates thresholded (on iff P(z = 0) < 0.34) -> one bit width per tensor, the grid of that
  width on the learned range (codes ``[-(2^(b-1)-1), 2^(b-1)-1]`` signed, ``[0, 2^b-1]`` unsigned), and the
  mask of kept output channels from the z2 gates;
* LSQ / PACT: the learned step / clip level as a fixed grid;
* calibrated PTQ ("fixed") quantizers: their grid and bias correction; online PTQ quantizers (ranges from
  each input) are left as they are.

The frozen model computes exactly what the trained model computes in eval mode (tested bitwise; with
BatchNorms folded at freeze time, see below, up to float rounding), and it is
an ordinary prepared model: ``bitalloc.cost_report`` (BOPs with the kept fraction carried into the next
layer), ``bitalloc.model.serialize.save_quantized`` / ``load_quantized`` (its ``bitalloc_info.config`` is
rewritten to per-layer ``TensorConfig(quantizer="frozen", ...)`` overrides) and every path that reads
``QuantParams`` (export, packing, integer execution) treat it like any other.

Pruning is exact: a pruned output channel has zero weights *and* zero bias in the frozen model (``freeze``
zeroes the bias of the channels its mask drops; during training :class:`~bitalloc.model.layers.QuantLayer`
multiplies the bias by the same z2 gate as the weights), so the channel outputs exactly 0 and the cost model,
like the paper, counts it (and the matching input channels of the next layer) as removed. The ONNX export and
the integer path read the zeroed bias and are exact without special cases.

BatchNorm: quantization-aware training normally folds BatchNorm into the preceding layer before training
(``QuantConfig.fold_bn=True``; required for Bayesian Bits, because a pruned channel followed by an unfolded
BatchNorm would output the constant ``beta - gamma * mean / sigma``, not 0). A model prepared with
``fold_bn=False`` (e.g. ``bitalloc train --method lsq --no-fold-bn``) still has its BatchNorms (running
statistics, trained affine parameters); ``freeze`` folds each one that directly follows a quantized layer into
that layer, exactly on the quantization grid: with ``g_c = gamma_c / sqrt(var_c + eps)`` per output channel
the frozen weight of channel c becomes ``g_c * Q(W)_c``, i.e. the same integer codes (negated where ``g_c < 0``)
with the per-channel step ``|g_c| s_c``, and the bias ``(b_c - mean_c) g_c + beta_c`` (Jacob et al. 2018,
section 3.2). A per-tensor weight grid therefore becomes per-channel. The integer codes and the function are
exactly those of the trained model; the float computation differs in rounding only (``conv(x, g Q(W))`` vs
``g conv(x, Q(W))``), which can flip the code of a downstream activation lying within float error of a rounding
boundary (a few in 10^5 activations of a 4-bit ResNet-20). The frozen model's config then records
``fold_bn=True``, so :func:`bitalloc.model.serialize.load_quantized` rebuilds the same structure. Folding needs
one forward pass to find the pairs: ``example_inputs`` (or the model's ``bitalloc_example_shape``, set by
:func:`bitalloc.train.methods.prepare_qat` and ``load_quantized``); without either the BatchNorms stay as
float modules.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from bitalloc.config import LayerConfig, QuantConfig
from bitalloc.errors import ConfigError
from bitalloc.model.fold_bn import BATCHNORMS, FOLDABLE_LAYERS, FoldDecision, fold_pair, set_submodule
from bitalloc.model.layers import QuantLayer, quant_layers
from bitalloc.quantizers.base import QuantParams
from bitalloc.quantizers.frozen import FrozenQuantizer


def freeze_quantizer(q: nn.Module) -> nn.Module:
    """The frozen equivalent of one quantizer (online quantizers and frozen ones are returned unchanged)."""
    if isinstance(q, FrozenQuantizer):
        return q
    if not getattr(q, "is_ready", True):
        raise ConfigError(f"cannot freeze an uninitialised {getattr(q, 'kind', type(q).__name__)} {q.role} quantizer: "
                          "calibrate the model (or train it) first")
    was_training = q.training
    q.eval()  # test-time description (Bayesian Bits: thresholded gates)
    try:
        qp = q.qparams()
    finally:
        q.train(was_training)
    if qp.online:
        return q
    group_size = q.cfg.group_size if qp.grouped else None  # group-wise grids: PTQ quantizers, which have a cfg
    return FrozenQuantizer.from_qparams(qp.detach(), q.role, q.axis, q.channels, group_size=group_size)


@torch.no_grad()
def zero_pruned_bias(layer: QuantLayer) -> int:
    """Set the bias of the output channels the weight quantizer prunes to 0; returns how many were pruned."""
    q = layer.weight_quantizer
    kept = q.kept_mask() if q is not None else None
    if kept is None:
        return 0
    kept = kept.reshape(-1).to(torch.bool)
    bias = layer.layer.bias
    if bias is not None and bias.shape[0] == kept.numel():
        bias[~kept.to(bias.device)] = 0.0
    return int((~kept).sum())


def _example(model: nn.Module, example_inputs: Any) -> Any:
    """Example inputs on the model's device (given, or zeros of ``model.bitalloc_example_shape``), or None."""
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    if example_inputs is not None:
        if isinstance(example_inputs, Tensor):
            return example_inputs.to(device)
        if isinstance(example_inputs, tuple):
            return tuple(t.to(device) if isinstance(t, Tensor) else t for t in example_inputs)
        return example_inputs
    shape = getattr(model, "bitalloc_example_shape", None)
    if shape is None:
        return None
    return torch.zeros(1, *shape, device=device)


def _bn_pairs(model: nn.Module, example: Any) -> list[tuple[str, str]]:
    """(layer, batchnorm) pairs in which the BatchNorm consumes a quantized (or float Conv/Linear) layer's output
    and nothing else reads it: the rule of :func:`bitalloc.model.fold_bn.find_foldable_pairs`, with QuantLayers
    standing for their layers (so a fresh ``prepare(..., fold_bn=True)`` folds the same pairs)."""
    from bitalloc.model.trace import trace_model

    atomic = lambda name, m: isinstance(m, (QuantLayer, BATCHNORMS) + FOLDABLE_LAYERS)  # noqa: E731
    was = model.training
    model.eval()
    try:
        trace = trace_model(model, example, atomic=atomic)
    finally:
        model.train(was)
    pairs = []
    for name, bn in model.named_modules():
        if not isinstance(bn, BATCHNORMS) or len(trace.calls.get(name, [])) != 1:
            continue
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        node = trace.nodes[trace.calls[name][0]]
        if not node.inputs:
            continue
        src = node.inputs[0]
        idx = trace.producer.get(src)
        prod = trace.nodes[idx] if idx is not None else None
        if prod is None or not isinstance(prod.module, (QuantLayer,) + FOLDABLE_LAYERS):
            continue
        if len(trace.calls.get(prod.target, [])) != 1 or trace.consumers.get(src, []) != [node.index]:
            continue
        if prod.module.weight.shape[0] != bn.num_features:
            continue
        pairs.append((prod.target, name))
    return pairs


@torch.no_grad()
def fold_bn_into_frozen(layer: QuantLayer, bn: nn.Module, name: str = "") -> None:
    """Fold a BatchNorm into a QuantLayer whose weight quantizer is frozen, exactly on its grid (see the module
    docstring): codes kept (negated where ``g_c < 0``), per-channel step ``|g_c| s_c``, bias-correction shift
    ``g_c * shift_c``, bias ``(b_c - mean_c) g_c + beta_c``."""
    q = layer.weight_quantizer
    w = layer.layer.weight
    inv_std = torch.rsqrt(bn.running_var.to(torch.float64) + bn.eps)
    gamma = bn.weight.to(torch.float64) if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias.to(torch.float64) if bn.affine else torch.zeros_like(inv_std)
    g = gamma * inv_std
    b = layer.layer.bias.to(torch.float64) if layer.layer.bias is not None else torch.zeros_like(g)
    new_b = (b - bn.running_mean.to(torch.float64)) * g + beta
    if q is None:  # a float weight: the ordinary fold
        fold_pair(layer.layer, bn)
        return
    if not isinstance(q, FrozenQuantizer):
        raise ConfigError(f"cannot fold BatchNorm into layer {name!r}: its weight quantizer is not frozen")
    if q.kept is not None and not bool(q.kept.all()):
        raise ConfigError(f"layer {name!r} prunes output channels and is followed by an unfolded BatchNorm: a pruned "
                          "channel would output a constant, not 0; prepare with fold_bn=True (--fold-bn)")
    p = q.qparams()
    c = w.shape[0]

    def per_channel(t: Tensor) -> Tensor:
        return t.reshape(-1).expand(c).clone() if t.numel() == 1 else t.reshape(-1).clone()

    codes = p.quantize(w)  # int64, shaped like w
    z = per_channel(p.zero_point).to(torch.int64)
    sign = torch.where(g < 0, -1, 1).to(torch.int64)
    shape = [-1] + [1] * (w.ndim - 1)
    neg = g < 0
    if bool(neg.any()):
        if bool((z[neg] != 0).any()):
            raise ConfigError(f"BatchNorm after layer {name!r} has negative scales on channels with a nonzero weight "
                              "zero point: it cannot be folded exactly; prepare with fold_bn=True (--fold-bn)")
        qmin, qmax = per_channel(p.qmin), per_channel(p.qmax)
        centred = codes - z.reshape(shape)
        flipped = -centred
        lo = (flipped < qmin.reshape(shape)) | (flipped > qmax.reshape(shape))
        bad = neg.reshape(shape) & lo
        if bool(bad.any()):
            ch = int(bad.reshape(c, -1).any(1).nonzero()[0])
            raise ConfigError(f"BatchNorm after layer {name!r} has a negative scale on channel {ch}, whose weight uses "
                              f"the code {int(codes.reshape(c, -1)[ch].min())} that has no negation on the grid "
                              f"[{int(qmin[ch])}, {int(qmax[ch])}]; it cannot be folded exactly: prepare with "
                              "fold_bn=True (--fold-bn), or use a symmetric grid (PACT)")
    new_codes = (codes - z.reshape(shape)) * sign.reshape(shape) + z.reshape(shape)
    scale = per_channel(p.scale).to(torch.float64)
    new_scale = torch.where(g != 0, scale * g.abs(), scale).to(torch.float32)
    new_w = ((new_codes - z.reshape(shape)).to(torch.float32) * new_scale.reshape(shape)).to(w.dtype)
    corr_shift = None if p.corr_shift is None else (p.corr_shift.to(torch.float64).reshape(-1) * g).to(torch.float32)
    qp = QuantParams(bits=per_channel(p.bits), scale=new_scale, zero_point=z, qmin=per_channel(p.qmin),
                     qmax=per_channel(p.qmax), axis=0 if q.axis is None else q.axis, signed=p.signed,
                     corr_scale=None if p.corr_scale is None else per_channel(p.corr_scale),
                     corr_shift=corr_shift, kept=None if p.kept is None else p.kept.clone())
    layer.weight_quantizer = FrozenQuantizer.from_qparams(qp, "weight", qp.axis, c)
    w.copy_(new_w)
    if layer.layer.bias is None:
        layer.layer.bias = nn.Parameter(new_b.to(w.dtype))
    else:
        layer.layer.bias.copy_(new_b.to(w.dtype))


def fold_batchnorms_at_freeze(model: nn.Module, example_inputs: Any = None) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a (frozen) quantized layer (see the module docstring);
    returns the folded (layer, batchnorm) pairs. A no-op when the model has no BatchNorm or no example."""
    if not any(isinstance(m, BATCHNORMS) for m in model.modules()):
        return []
    example = _example(model, example_inputs)
    if example is None:
        return []
    pairs = _bn_pairs(model, example)
    modules = dict(model.named_modules())
    for layer_name, bn_name in pairs:
        layer, bn = modules[layer_name], modules[bn_name]
        if isinstance(layer, QuantLayer):
            fold_bn_into_frozen(layer, bn, layer_name)
        else:
            fold_pair(layer, bn)
        set_submodule(model, bn_name, nn.Identity())
    return pairs


def _frozen_config(model: nn.Module, layers: list[tuple[str, QuantLayer]]) -> QuantConfig | None:
    info = getattr(model, "bitalloc_info", None)
    if info is None:
        return None
    old: QuantConfig = info.config
    overrides = []
    for name, layer in layers:
        patch = {}
        for key, q in (("weight", layer.weight_quantizer), ("act", layer.input_quantizer)):
            patch[key] = None if q is None else asdict(q.cfg)
        patch["bias_correction"] = "none"
        overrides.append(("re:" + re.escape(name), patch))
    return QuantConfig(default=LayerConfig(weight=None, act=None), overrides=overrides, first_last_bits=None,
                       fold_bn=old.fold_bn, calibration_samples=old.calibration_samples, seed=old.seed).validate()


def freeze(model: nn.Module, *, inplace: bool = False, example_inputs: Any = None,
           fold_bn: bool = True) -> nn.Module:
    """Replace every quantizer of a prepared model by its frozen test-time equivalent (a copy unless
    ``inplace``), zero the bias of pruned channels and, with ``fold_bn``, fold the BatchNorms left after
    quantized layers (``example_inputs`` or ``model.bitalloc_example_shape`` give the forward pass that finds
    them). See the module docstring."""
    if not inplace:
        model = copy.deepcopy(model)
    layers = quant_layers(model)
    if not layers:
        raise ConfigError("this model has no quantized layers (prepare it with bitalloc.prepare first)")
    for _, layer in layers:
        if layer.weight_quantizer is not None:
            layer.weight_quantizer = freeze_quantizer(layer.weight_quantizer)
        if layer.input_quantizer is not None:
            layer.input_quantizer = freeze_quantizer(layer.input_quantizer)
        zero_pruned_bias(layer)
    folded = fold_batchnorms_at_freeze(model, example_inputs) if fold_bn else []
    cfg = _frozen_config(model, layers)
    if cfg is not None:
        from bitalloc.model.prepare import _summary

        info = copy.copy(model.bitalloc_info)
        if folded:
            cfg.fold_bn = True
            by_bn = {bn: layer for layer, bn in folded}
            info.folds = [FoldDecision(by_bn[d.batchnorm], d.batchnorm, True, "folded at freeze time")
                          if d.batchnorm in by_bn else d for d in info.folds]
        info.config = cfg
        by_name = dict(layers)
        records = []
        for r in info.layers:
            r = copy.copy(r)
            if folded and r.name in {bn for _, bn in folded}:
                layer_name = next(l for l, bn in folded if bn == r.name)
                r.status, r.reason = "folded", f"folded into {layer_name} at freeze time"
            if r.name in by_name:
                layer = by_name[r.name]
                r.weight = _summary(layer.weight_quantizer.cfg) if layer.weight_quantizer is not None else None
                r.act = _summary(layer.input_quantizer.cfg) if layer.input_quantizer is not None else None
                r.rules = list(r.rules) + ["frozen"]
            records.append(r)
        info.layers = records
        model.bitalloc_info = info
    return model


def save_frozen(model: nn.Module, path: Any, *, model_name: str | None, example_shape: Any = None,
                overwrite: bool = True, extra: dict[str, Any] | None = None) -> tuple[nn.Module, Any]:
    """Freeze ``model`` (unless it already is) and write it with :func:`bitalloc.model.serialize.save_quantized`,
    the format every ``--quantized`` option reads (``bitalloc cost / export / pack``).

    ``example_shape``: one input's shape without the batch dimension (default: ``model.bitalloc_example_shape``).
    Returns ``(frozen model, path)``."""
    from bitalloc.model.serialize import save_quantized

    shape = example_shape if example_shape is not None else getattr(model, "bitalloc_example_shape", None)
    if shape is None:
        raise ConfigError("saving a frozen model needs the shape of one input (example_shape=(C, H, W))")
    shape = tuple(int(v) for v in shape)
    frozen = model if is_frozen(model) else freeze(model, example_inputs=torch.zeros(1, *shape))
    was = frozen.training
    frozen.eval()
    try:
        out = save_quantized(frozen, path, model_name=model_name, example_shape=shape, overwrite=overwrite,
                             extra=extra)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; pass --overwrite to replace it, or choose another path") from None
    finally:
        frozen.train(was)
    return frozen, out


def is_frozen(model: nn.Module) -> bool:
    """Whether every quantizer of ``model`` is frozen."""
    return all(isinstance(q, FrozenQuantizer) for _, l in quant_layers(model) for q in l.quantizers())


__all__ = ["freeze", "freeze_quantizer", "fold_batchnorms_at_freeze", "fold_bn_into_frozen", "is_frozen",
           "save_frozen", "zero_pruned_bias"]
