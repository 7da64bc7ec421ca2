"""Model transformation: fold BatchNorm, wrap every selected Conv/Linear in a :class:`QuantLayer`.

``prepare(model, config, example_inputs)`` returns a new model (the input model is not modified) that is an
ordinary ``nn.Module``. Every decision is recorded in ``model.bitalloc_info`` (a :class:`PrepareInfo`): each
layer quantized and each left in float, with the reason, and each BatchNorm folded or not. "Layer" here means
every module that owns parameters (``weight`` or any other: a GRU's ``weight_ih_l0``, a MultiheadAttention's
``in_proj_weight``, a bare ``nn.Parameter`` of the model itself, recorded under the name ""), so every
parameter of the model is either in a quantized layer or listed in float with the reason.

PyTorch's attention blocks are first rewritten into explicit forms (:mod:`bitalloc.model.attention`:
``nn.MultiheadAttention`` into q/k/v/out ``nn.Linear`` layers, ``nn.TransformerEncoderLayer`` without its fused
fast path), recorded with status "rewritten", so that their Linear layers really are quantized.

No rewrite may change the model's FP32 function: with quantizers disabled, the prepared model's output on the
example inputs is checked against the original's, and a BatchNorm fold or attention rewrite that would change
it is undone.

A layer is reported as quantized only if its quantizers run: the last check is a plain eval-mode forward pass
under ``torch.no_grad()`` (no hooks, no tracing), and a wrapped layer that it does not call (a parent read its
weight directly, e.g. a fused fast path) is unwrapped and listed in float with the reason. Calibration and PTQ
evaluation check the same (:func:`demote_uncalled`). The
function preserved is the *inference* (eval-mode) function: folding uses a BatchNorm's running statistics,
which a train-mode BatchNorm does not use. So prepare works in eval mode whatever mode ``model`` is in, and
returns the prepared model in eval mode (quantized models are for inference; calibration runs in eval mode).
Quantization-aware training calls ``.train()`` on the prepared model: folded BatchNorms then stay frozen in
the weights (BatchNorm folding with frozen statistics), BatchNorms left unfolded use batch statistics again.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bitalloc.batches import call_model
from bitalloc.config import QuantConfig, TensorConfig, match_pattern
from bitalloc.errors import BitallocError, ConfigError, UnsupportedLayerError
from bitalloc.model.fold_bn import BATCHNORMS, FoldDecision, find_foldable_pairs, fold_pair, set_submodule
from bitalloc.model.attention import rewrite_attention
from bitalloc.model.layers import (QuantLayer, activation_axis, call_counts, float_mode, input_channels, is_supported,
                                   SUPPORTED_LAYERS)
from bitalloc.model.trace import _flatten_tensors, trace_model
from bitalloc.model.products import attach_product_quantizer
from bitalloc.quantizers import make_quantizer

#: relative output change allowed by rewrites that must preserve the FP32 function (float rounding only)
FP32_TOLERANCE = 1e-3


@dataclass
class LayerRecord:
    """What prepare decided for one parameter-owning module (layer) or BatchNorm."""

    name: str
    type: str
    status: str  # "quantized" | "float" | "folded" | "rewritten"
    reason: str = ""
    rules: list[str] = field(default_factory=list)
    weight: dict[str, Any] | None = None
    act: dict[str, Any] | None = None
    bias_correction: str = "none"


@dataclass
class PrepareInfo:
    config: QuantConfig
    layers: list[LayerRecord]
    order: list[str]
    folds: list[FoldDecision]

    def quantized(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.status == "quantized"]

    def floating(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.status == "float"]

    def rewritten(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.status == "rewritten"]


def _type_names(m: nn.Module) -> list[str]:
    """Class names of ``m``'s MRO below nn.Module (so "type:Conv2d" also selects Conv2d subclasses)."""
    return [c.__name__ for c in type(m).__mro__ if issubclass(c, nn.Module) and c is not nn.Module]


def _has_weight(m: nn.Module) -> bool:
    return isinstance(getattr(m, "weight", None), nn.Parameter)


def _own_parameters(m: nn.Module) -> list[str]:
    """Names of the parameters ``m`` owns itself (not those of its children)."""
    return [n for n, _ in m.named_parameters(recurse=False)]


def _quantizable(m: nn.Module) -> bool:
    """A supported layer type whose weight is a plain parameter (so a quantized weight can be substituted)."""
    return is_supported(m) and _has_weight(m)


def _float_reason(name: str, m: nn.Module) -> str:
    """Why a parameter-owning module that bitalloc cannot quantize stays in float."""
    params = _own_parameters(m)
    shown = ", ".join(params[:6]) + (", ..." if len(params) > 6 else "")
    if name == "":
        return f"parameters owned by the model itself ({shown}), used directly in its forward, stay in float"
    if is_supported(m):
        return (f"its weight is not an nn.Parameter (weight norm or a parametrization; parameters: {shown}), so "
                "bitalloc cannot substitute a quantized weight")
    tname = type(m).__name__
    return (f"layer type {tname} is not supported (supported: {', '.join(t.__name__ for t in SUPPORTED_LAYERS)} "
            f"and subclasses); its parameters ({shown}) stay in float")


def _run(model: nn.Module, example_inputs: Any) -> list[Tensor]:
    with torch.no_grad():
        return [t.detach().clone() for t in _flatten_tensors(call_model(model, example_inputs), [])]


def output_change(a: list[Tensor], b: list[Tensor]) -> float:
    """Largest absolute difference between two outputs relative to the first's largest magnitude."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        if x.numel() == 0:
            continue
        denom = max(float(x.abs().max()), 1e-12)
        worst = max(worst, float((x.float() - y.float()).abs().max()) / denom)
    return worst


def _summary(t: TensorConfig | None) -> dict[str, Any] | None:
    if t is None:
        return None
    return {"bits": t.bits, "granularity": t.granularity, "method": t.method, "options": dict(t.options),
            "symmetric": t.symmetric, "online": t.online, "allocate": t.allocate, "quantizer": t.quantizer}


def _fold_batchnorms(model: nn.Module, example_inputs: Any, reference: list[Tensor], trace) -> list[FoldDecision]:
    pairs, decisions = find_foldable_pairs(model, trace)
    modules = dict(model.named_modules())
    backups = {layer: copy.deepcopy(modules[layer]) for layer, _ in pairs}
    for layer, bn in pairs:
        fold_pair(modules[layer], modules[bn])
        set_submodule(model, bn, nn.Identity())
    if output_change(reference, _run(model, example_inputs)) <= FP32_TOLERANCE:
        return decisions + [FoldDecision(l, b, True) for l, b in pairs]
    # Some fold changed the function (e.g. the model reads the BatchNorm elsewhere): undo all, fold one by one.
    for layer, bn in pairs:
        set_submodule(model, layer, copy.deepcopy(backups[layer]))
        set_submodule(model, bn, modules[bn])
    for layer, bn in pairs:
        before = _run(model, example_inputs)
        fold_pair(dict(model.named_modules())[layer], modules[bn])
        set_submodule(model, bn, nn.Identity())
        if output_change(before, _run(model, example_inputs)) <= FP32_TOLERANCE:
            decisions.append(FoldDecision(layer, bn, True))
        else:
            set_submodule(model, layer, copy.deepcopy(backups[layer]))
            set_submodule(model, bn, modules[bn])
            decisions.append(FoldDecision(layer, bn, False, "folding changed the model's output"))
    return decisions


def _rewrite_attention(model: nn.Module, example_inputs: Any, reference: list[Tensor]) -> list[LayerRecord]:
    """Rewrite the attention blocks (:func:`bitalloc.model.attention.rewrite_attention`) if that keeps the FP32
    output; otherwise undo it (with a warning: the blocks' layers then stay in float, with the reason)."""
    done = rewrite_attention(model)
    if not done:
        return []
    try:
        change, why = output_change(reference, _run(model, example_inputs)), "changed the model's output"
    except Exception as exc:  # e.g. the model reads in_proj_weight itself
        change, why = float("inf"), f"failed ({type(exc).__name__}: {exc})"
    if change <= FP32_TOLERANCE:
        return [LayerRecord(r.name, r.type, "rewritten", r.what) for r in done]
    for r in reversed(done):
        r.undo()
    warnings.warn(f"rewriting the attention blocks {', '.join(r.name or '(model)' for r in done)} into explicit "
                  f"Linear layers {why}; they stay as they are (their layers in float)", stacklevel=3)
    return []


#: functions that only re-view a tensor (a normalization's output seen through them is still that output)
_VIEWS = {"view", "reshape", "contiguous", "clone", "flatten", "dropout", "__getitem__"}


def _reads_normalization(trace: Any, name: str) -> bool:
    """Whether every call of layer ``name`` reads the output of a normalization module (LayerNorm, RMSNorm,
    GroupNorm...: a module whose class name contains "Norm"), possibly through views: where SmoothQuant applies
    (Xiao et al. 2023 smooth the inputs of the attention and feed-forward blocks, which follow a LayerNorm)."""
    calls = trace.calls.get(name, [])
    for idx in calls:
        node = trace.nodes[idx]
        t = node.inputs[0] if node.inputs else None
        for _ in range(8):
            p = trace.producer.get(t)
            if p is None:
                return False
            src = trace.nodes[p]
            if src.module is not None:
                if "Norm" not in type(src.module).__name__:
                    return False
                break
            if src.target not in _VIEWS or not src.inputs:
                return False
            t = src.inputs[0]
        else:
            return False
    return bool(calls)


def demote_uncalled(model: nn.Module, before: dict[str, int], when: str, *, pin: bool = True) -> list[str]:
    """Unwrap the QuantLayers of ``model`` that did not run since the :func:`~bitalloc.model.layers.call_counts`
    snapshot ``before`` and list them in float, with the reason (``when``: the pass, e.g. "calibration").

    Such a layer's quantizers never ran (its parent reads the weight directly, e.g. a fused fast path, or the
    layer is not used on this data), so reporting it as quantized would be false, and its input statistics
    would be empty. ``pin`` adds an override ``{"quantize": False}`` for each to the model's configuration, so
    that a saved model is prepared the same way when it is loaded. Warns, and returns the names."""
    counts = call_counts(model)
    names = [n for n, c in counts.items() if c == before.get(n, 0)]
    if not names:
        return []
    info = getattr(model, "bitalloc_info", None)
    reason = (f"its forward never ran during {when} (a parent uses its weight directly, e.g. a fused fast path, "
              "or the layer is unused on this data), so it runs in float")
    for name in names:
        set_submodule(model, name, model.get_submodule(name).layer)
    if info is not None:
        for r in info.layers:
            if r.name in names:
                r.status, r.reason, r.weight, r.act, r.bias_correction = "float", reason, None, None, "none"
        if pin:
            info.config = copy.deepcopy(info.config)
            info.config.overrides.extend(("re:" + re.escape(n), {"quantize": False}) for n in names)
    warnings.warn(f"{len(names)} layer(s) did not run during {when} and are left in float: {', '.join(names[:8])}"
                  + (", ..." if len(names) > 8 else ""), stacklevel=2)
    return names


def _check_explicit_overrides(config: QuantConfig, unsupported: dict[str, str], layers: dict[str, list[str]]) -> None:
    """Overrides that cannot do anything are errors, never silent skips: one that names an unsupported layer
    exactly (no wildcard), one that selects only layers bitalloc cannot quantize, and one that selects no
    layer at all (a typo, or a module without weights). ``layers``: quantizable layer name -> type names;
    ``unsupported``: parameter-owning modules that cannot be quantized, name -> type name."""
    for pattern, _ in config.overrides:
        if any(match_pattern(pattern, name, types) for name, types in layers.items()):
            continue
        if pattern in unsupported and not pattern.startswith(("re:", "type:")):
            raise UnsupportedLayerError(
                f"override {pattern!r} targets layer {pattern!r} of type {unsupported[pattern]}, which bitalloc "
                f"cannot quantize (supported: Conv1d, Conv2d, Linear and their subclasses); remove the override "
                "or leave the layer in float")
        hit = [f"{n} ({t})" for n, t in unsupported.items() if match_pattern(pattern, n, [t])]
        if hit:
            raise UnsupportedLayerError(
                f"override {pattern!r} selects only layers bitalloc cannot quantize: {', '.join(hit[:8])}; remove "
                "the override (supported: Conv1d, Conv2d, Linear and their subclasses)")
        some = ", ".join(list(layers)[:8]) + (", ..." if len(layers) > 8 else "")
        raise ConfigError(f"override {pattern!r} selects no layer with weights; layer names are: {some} "
                          "(glob patterns, 're:REGEX' or 'type:ClassName')")


def prepare(model: nn.Module, config: QuantConfig | None = None, example_inputs: Any = None, *,
            inplace: bool = False) -> nn.Module:
    """Return a quantization-ready copy of ``model``, in eval mode.

    Args:
        model: any ``nn.Module``; its Conv1d/Conv2d/Linear layers (subclasses included) are quantized, every
            other module owning parameters is listed in float with the reason. Its train/eval mode does not
            matter: prepare folds BatchNorms with their running statistics and checks the eval-mode function.
        config: a :class:`~bitalloc.config.QuantConfig` (default: 8-bit min-max).
        example_inputs: the inputs of one real forward pass: a tensor, a tuple (or list) of positional
            arguments, or a dict of keyword arguments (:func:`bitalloc.batches.call_model`). Required: it finds
            BatchNorm pairs, the execution order, layers that never run and input shapes, and checks that the
            FP32 function is unchanged.
        inplace: transform ``model`` itself (which is left in eval mode) instead of a deep copy.

    Returns the prepared model in eval mode: with quantizers disabled it computes the input model's eval-mode
    function (see the module docstring for training it afterwards). Raises ConfigError for online activation
    quantizers whose traced input has a single value per sample (and channel): see
    :meth:`bitalloc.quantizers.fixed.FixedQuantizer.check_online_input`.
    """
    if example_inputs is None:
        raise ConfigError("prepare needs example_inputs (a tensor or tuple of model inputs, e.g. one batch)")
    config = (config or QuantConfig()).validate()
    if not inplace:
        model = copy.deepcopy(model)
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ConfigError("this model is already prepared by bitalloc; prepare the original float model")
    model.eval()
    try:
        reference = _run(model, example_inputs)
    except Exception as exc:  # the model itself does not run on these inputs
        raise ConfigError(f"the model does not run on the example inputs: {type(exc).__name__}: {exc}") from exc
    rewrites = _rewrite_attention(model, example_inputs, reference)
    atomic = lambda name, m: is_supported(m) or isinstance(m, BATCHNORMS)  # noqa: E731
    trace = trace_model(model, example_inputs, atomic=atomic)

    records: list[LayerRecord] = list(rewrites)
    folds: list[FoldDecision] = []
    if config.fold_bn:
        folds = _fold_batchnorms(model, example_inputs, reference, trace)
        trace = trace_model(model, example_inputs, atomic=atomic)
    else:
        folds = [FoldDecision("", n, False, "fold_bn=False") for n, m in model.named_modules() if isinstance(m, BATCHNORMS)]
    for d in folds:
        records.append(LayerRecord(d.batchnorm, "BatchNorm", "folded" if d.folded else "float",
                                   f"folded into {d.layer}" if d.folded else d.reason))

    modules = dict(model.named_modules())
    # every module owning parameters (BatchNorms are reported by the folding above)
    owners = [n for n, m in modules.items()
              if not isinstance(m, BATCHNORMS) and ((n and _has_weight(m)) or _own_parameters(m))]
    unsupported = {n: type(modules[n]).__name__ for n in owners if not _quantizable(modules[n])}
    _check_explicit_overrides(config, unsupported, {n: _type_names(modules[n]) for n in owners if n not in unsupported})
    order = trace.order([n for n in owners if n not in unsupported])
    first, last = (set(b) for b in trace.boundary_layers(order))
    for name in owners:
        m = modules[name]
        tname = type(m).__name__
        if name in unsupported:
            records.append(LayerRecord(name, tname, "float", _float_reason(name, m)))
            continue
        if not trace.called(name):
            records.append(LayerRecord(name, tname, "float", "not called as a module in the traced forward "
                                       "(its parent uses the weight directly, or the layer is unused)"))
            continue
        lcfg, rules = config.for_layer(name, _type_names(m), is_first=name in first, is_last=name in last)
        if not lcfg.quantize or (lcfg.weight is None and lcfg.act is None):
            records.append(LayerRecord(name, tname, "float", "left in float by configuration", rules))
            continue
        try:
            wq = (make_quantizer(lcfg.weight, "weight", 0, m.weight.shape[0], tuple(m.weight.shape))
                  if lcfg.weight is not None else None)
        except ConfigError as exc:
            raise ConfigError(f"layer {name!r} ({tname}) weight: {exc}") from None
        aq = (make_quantizer(lcfg.act, "act", activation_axis(m), input_channels(m))
              if lcfg.act is not None else None)
        if aq is not None and hasattr(aq, "check_online_input"):
            for idx in trace.calls[name]:
                shapes = trace.nodes[idx].input_shapes
                if shapes:
                    aq.check_online_input(shapes[0], f"layer {name!r} ({tname}) input activation")
        smooth = lcfg.smooth if aq is not None and _reads_normalization(trace, name) else None
        qlayer = QuantLayer(m, wq, aq, name=name, bias_correction=lcfg.bias_correction if wq is not None else "none",
                            smooth=smooth)
        qlayer.calibrate_weight()
        set_submodule(model, name, qlayer)
        records.append(LayerRecord(name, tname, "quantized", "", rules, _summary(lcfg.weight), _summary(lcfg.act),
                                   qlayer.bias_correction))
    before = call_counts(model)
    with float_mode(model):
        change = output_change(reference, _run(model, example_inputs))
    if change > FP32_TOLERANCE:
        raise BitallocError(f"internal error: preparing the model changed its FP32 output (relative change "
                            f"{change:.3g}); please report this with the model definition")
    model.eval()
    model.bitalloc_info = PrepareInfo(config, records, order, folds)
    if config.product_bits is not None:
        attach_product_quantizer(model, config.product_bits)
    demote_uncalled(model, before, "a plain eval-mode forward pass under torch.no_grad()", pin=False)
    return model


def prepare_info(model: nn.Module) -> PrepareInfo:
    info = getattr(model, "bitalloc_info", None)
    if info is None:
        raise ConfigError("this model was not prepared by bitalloc.prepare")
    return info
