"""BatchNorm folding: Conv/Linear -> BatchNorm pairs become one layer with adjusted weight and bias.

For a BatchNorm with running mean m, variance v, eps, weight gamma and bias beta following a layer with
weight W and bias b, per output channel c (Jacob et al. 2018, "Quantization and training of neural networks
for efficient integer-arithmetic-only inference", section 3.2):

    W'_c = W_c * gamma_c / sqrt(v_c + eps),      b'_c = (b_c - m_c) * gamma_c / sqrt(v_c + eps) + beta_c

A pair is folded only when the traced forward shows that the BatchNorm consumes the layer's output and
nothing else reads that output, each module is called exactly once, and the BatchNorm has running
statistics. Folding never changes the model's FP32 function in eval mode: the result is checked on the
example inputs and any pair whose folding changes the output is restored and reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bitalloc.model.trace import Trace

FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class FoldDecision:
    layer: str
    batchnorm: str
    folded: bool
    reason: str = ""


def find_foldable_pairs(model: nn.Module, trace: Trace) -> tuple[list[tuple[str, str]], list[FoldDecision]]:
    """(layer, batchnorm) name pairs that can be folded, and the BatchNorms that cannot (with reasons)."""
    modules = dict(model.named_modules())
    pairs: list[tuple[str, str]] = []
    skipped: list[FoldDecision] = []
    for name, bn in modules.items():
        if not isinstance(bn, BATCHNORMS):
            continue
        calls = trace.calls.get(name, [])
        if len(calls) != 1:
            reason = "never called in the traced forward" if not calls else f"called {len(calls)} times"
            skipped.append(FoldDecision("", name, False, reason))
            continue
        if not bn.track_running_stats or bn.running_mean is None:
            skipped.append(FoldDecision("", name, False, "has no running statistics"))
            continue
        node = trace.nodes[calls[0]]
        if not node.inputs:
            skipped.append(FoldDecision("", name, False, "input is not a tensor"))
            continue
        src = node.inputs[0]
        prod_idx = trace.producer.get(src)
        prod = trace.nodes[prod_idx] if prod_idx is not None else None
        if prod is None or prod.module is None or not isinstance(prod.module, FOLDABLE_LAYERS):
            what = "the model input" if prod is None else (prod.target if prod.module is None else type(prod.module).__name__)
            skipped.append(FoldDecision("", name, False, f"input comes from {what}, not a Conv/Linear layer"))
            continue
        if len(trace.calls.get(prod.target, [])) != 1:
            skipped.append(FoldDecision(prod.target, name, False, "the preceding layer is called more than once"))
            continue
        if trace.consumers.get(src, []) != [node.index]:
            skipped.append(FoldDecision(prod.target, name, False, "the preceding layer's output is also used elsewhere"))
            continue
        if prod.module.weight.shape[0] != bn.num_features:
            skipped.append(FoldDecision(prod.target, name, False, "channel counts differ"))
            continue
        pairs.append((prod.target, name))
    return pairs, skipped


@torch.no_grad()
def fold_pair(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` into ``layer`` in place (the caller replaces ``bn`` by nn.Identity)."""
    w = layer.weight
    inv_std = torch.rsqrt(bn.running_var.to(torch.float64) + bn.eps)
    gamma = bn.weight.to(torch.float64) if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias.to(torch.float64) if bn.affine else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    b = layer.bias.to(torch.float64) if layer.bias is not None else torch.zeros_like(inv_std)
    new_b = (b - bn.running_mean.to(torch.float64)) * factor + beta
    shape = [-1] + [1] * (w.ndim - 1)
    w.copy_((w.to(torch.float64) * factor.reshape(shape)).to(w.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b.to(w.dtype))
    else:
        layer.bias.copy_(new_b.to(w.dtype))


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
