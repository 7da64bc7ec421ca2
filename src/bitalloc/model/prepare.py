"""Model transformation: fold BatchNorm, wrap every selected Conv/Linear in a :class:`QuantLayer`.

``prepare(model, config, example_inputs)`` returns a new model (the input model is not modified) that is an
ordinary ``nn.Module``. Every decision is recorded in ``model.bitalloc_info`` (a :class:`PrepareInfo`): each
layer quantized and each left in float, with the reason, and each BatchNorm folded or not. No rewrite may
change the model's FP32 function: with quantizers disabled, the prepared model's output on the example
inputs is checked against the original's, and a BatchNorm fold that would change it is undone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bitalloc.config import QuantConfig, TensorConfig, match_pattern
from bitalloc.errors import BitallocError, ConfigError, UnsupportedLayerError
from bitalloc.model.fold_bn import BATCHNORMS, FoldDecision, find_foldable_pairs, fold_pair, set_submodule
from bitalloc.model.layers import QuantLayer, activation_axis, float_mode, input_channels, is_supported, SUPPORTED_LAYERS
from bitalloc.model.trace import _flatten_tensors, trace_model
from bitalloc.quantizers import make_quantizer

#: relative output change allowed by rewrites that must preserve the FP32 function (float rounding only)
FP32_TOLERANCE = 1e-3


@dataclass
class LayerRecord:
    """What prepare decided for one weight-bearing layer or BatchNorm."""

    name: str
    type: str
    status: str  # "quantized" | "float" | "folded"
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


def _type_names(m: nn.Module) -> list[str]:
    """Class names of ``m``'s MRO below nn.Module (so "type:Conv2d" also selects Conv2d subclasses)."""
    return [c.__name__ for c in type(m).__mro__ if issubclass(c, nn.Module) and c is not nn.Module]


def _has_weight(m: nn.Module) -> bool:
    return isinstance(getattr(m, "weight", None), nn.Parameter)


def _run(model: nn.Module, example_inputs: Any) -> list[Tensor]:
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with torch.no_grad():
        return [t.detach().clone() for t in _flatten_tensors(model(*args), [])]


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


def _check_explicit_overrides(config: QuantConfig, unsupported: dict[str, str], weighted: dict[str, list[str]]) -> None:
    """An override that names an unsupported layer exactly (no wildcard) is an error, never a silent skip; so
    is an override that selects no weight-bearing layer at all (a typo, or a layer without weights)."""
    for pattern, _ in config.overrides:
        if not any(match_pattern(pattern, name, types) for name, types in weighted.items()):
            some = ", ".join(list(weighted)[:8]) + (", ..." if len(weighted) > 8 else "")
            raise ConfigError(f"override {pattern!r} selects no layer with weights; layer names are: {some} "
                              "(glob patterns, 're:REGEX' or 'type:ClassName')")
        if pattern.startswith(("re:", "type:")) or any(ch in pattern for ch in "*?["):
            continue
        if pattern in unsupported:
            raise UnsupportedLayerError(
                f"override {pattern!r} targets layer {pattern!r} of type {unsupported[pattern]}, which bitalloc "
                f"cannot quantize (supported: Conv1d, Conv2d, Linear and their subclasses); remove the override "
                "or leave the layer in float")


def prepare(model: nn.Module, config: QuantConfig | None = None, example_inputs: Any = None, *,
            inplace: bool = False) -> nn.Module:
    """Return a quantization-ready copy of ``model``.

    Args:
        model: any ``nn.Module``; its Conv1d/Conv2d/Linear layers (subclasses included) are quantized.
        config: a :class:`~bitalloc.config.QuantConfig` (default: 8-bit min-max).
        example_inputs: a tensor or tuple of positional arguments for one real forward pass (required: it
            finds BatchNorm pairs, the execution order and layers that never run, and checks the FP32
            function is unchanged).
        inplace: transform ``model`` itself instead of a deep copy.
    """
    if example_inputs is None:
        raise ConfigError("prepare needs example_inputs (a tensor or tuple of model inputs, e.g. one batch)")
    config = (config or QuantConfig()).validate()
    if not inplace:
        model = copy.deepcopy(model)
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ConfigError("this model is already prepared by bitalloc; prepare the original float model")
    was_training = model.training
    model.eval()
    try:
        reference = _run(model, example_inputs)
    except Exception as exc:  # the model itself does not run on these inputs
        raise ConfigError(f"the model does not run on the example inputs: {type(exc).__name__}: {exc}") from exc
    atomic = lambda name, m: is_supported(m) or isinstance(m, BATCHNORMS)  # noqa: E731
    trace = trace_model(model, example_inputs, atomic=atomic)

    records: list[LayerRecord] = []
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
    weighted = [n for n, m in modules.items() if n and _has_weight(m) and not isinstance(m, BATCHNORMS)]
    unsupported = {n: type(modules[n]).__name__ for n in weighted if not is_supported(modules[n])}
    _check_explicit_overrides(config, unsupported, {n: _type_names(modules[n]) for n in weighted})
    order = trace.order([n for n in weighted if is_supported(modules[n])])
    for name in weighted:
        m = modules[name]
        tname = type(m).__name__
        if name in unsupported:
            records.append(LayerRecord(name, tname, "float", f"layer type {tname} is not supported (supported: "
                                       f"{', '.join(t.__name__ for t in SUPPORTED_LAYERS)} and subclasses)"))
            continue
        if not trace.called(name):
            records.append(LayerRecord(name, tname, "float", "not called as a module in the traced forward "
                                       "(its parent uses the weight directly, or the layer is unused)"))
            continue
        lcfg, rules = config.for_layer(name, _type_names(m), is_first=name == order[0], is_last=name == order[-1])
        if not lcfg.quantize or (lcfg.weight is None and lcfg.act is None):
            records.append(LayerRecord(name, tname, "float", "left in float by configuration", rules))
            continue
        wq = make_quantizer(lcfg.weight, "weight", 0, m.weight.shape[0]) if lcfg.weight is not None else None
        aq = (make_quantizer(lcfg.act, "act", activation_axis(m), input_channels(m))
              if lcfg.act is not None else None)
        qlayer = QuantLayer(m, wq, aq, name=name, bias_correction=lcfg.bias_correction if wq is not None else "none")
        qlayer.calibrate_weight()
        set_submodule(model, name, qlayer)
        records.append(LayerRecord(name, tname, "quantized", "", rules, _summary(lcfg.weight), _summary(lcfg.act),
                                   qlayer.bias_correction))
    with float_mode(model):
        change = output_change(reference, _run(model, example_inputs))
    if change > FP32_TOLERANCE:
        raise BitallocError(f"internal error: preparing the model changed its FP32 output (relative change "
                            f"{change:.3g}); please report this with the model definition")
    model.train(was_training)
    model.bitalloc_info = PrepareInfo(config, records, order, folds)
    return model


def prepare_info(model: nn.Module) -> PrepareInfo:
    info = getattr(model, "bitalloc_info", None)
    if info is None:
        raise ConfigError("this model was not prepared by bitalloc.prepare")
    return info
