"""Freezing: turn a trained (or calibrated) quantized model into a fixed mixed-precision, pruned model.

``freeze(model)`` replaces every quantizer by a :class:`~bitalloc.quantizers.frozen.FrozenQuantizer` holding its
test-time :class:`~bitalloc.quantizers.base.QuantParams`:

* Bayesian Bits: gates thresholded (on iff P(z = 0) < 0.34) -> one bit width per tensor, the grid of that
  width on the learned range (codes ``[-(2^(b-1)-1), 2^(b-1)-1]`` signed, ``[0, 2^b-1]`` unsigned), and the
  mask of kept output channels from the z2 gates;
* LSQ / PACT: the learned step / clip level as a fixed grid;
* calibrated PTQ ("fixed") quantizers: their grid and bias correction; online PTQ quantizers (ranges from
  each input) are left as they are.

The frozen model computes exactly what the trained model computes in eval mode (tested bitwise), and it is
an ordinary prepared model: ``bitalloc.cost_report`` (BOPs with the kept fraction carried into the next
layer), ``bitalloc.model.serialize.save_quantized`` / ``load_quantized`` (its ``bitalloc_info.config`` is
rewritten to per-layer ``TensorConfig(quantizer="frozen", ...)`` overrides) and every path that reads
``QuantParams`` (export, packing, integer execution) treat it like any other.

Note on pruning: a pruned output channel has zero weights but keeps its bias (as in the Bayesian Bits
reference code); the function is preserved exactly, and the cost model, like the paper, counts the channel
(and the matching input channels of the next layer) as removed. Folding the constant channel into the next
layer's bias is exact for layers without padding (e.g. LeNet-5) and is left to the export path.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict

from torch import nn

from bitalloc.config import LayerConfig, QuantConfig
from bitalloc.errors import ConfigError
from bitalloc.model.layers import QuantLayer, quant_layers
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
    return FrozenQuantizer.from_qparams(qp.detach(), q.role, q.axis, q.channels)


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


def freeze(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every quantizer of a prepared model by its frozen test-time equivalent (a copy unless
    ``inplace``). See the module docstring."""
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
    cfg = _frozen_config(model, layers)
    if cfg is not None:
        from bitalloc.model.prepare import _summary

        info = copy.copy(model.bitalloc_info)
        info.config = cfg
        by_name = dict(layers)
        records = []
        for r in info.layers:
            r = copy.copy(r)
            if r.name in by_name:
                layer = by_name[r.name]
                r.weight = _summary(layer.weight_quantizer.cfg) if layer.weight_quantizer is not None else None
                r.act = _summary(layer.input_quantizer.cfg) if layer.input_quantizer is not None else None
                r.rules = list(r.rules) + ["frozen"]
            records.append(r)
        info.layers = records
        model.bitalloc_info = info
    return model


def is_frozen(model: nn.Module) -> bool:
    """Whether every quantizer of ``model`` is frozen."""
    return all(isinstance(q, FrozenQuantizer) for _, l in quant_layers(model) for q in l.quantizers())


__all__ = ["freeze", "freeze_quantizer", "is_frozen"]
