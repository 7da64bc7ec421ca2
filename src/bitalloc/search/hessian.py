"""Hutchinson estimates of Hessian traces per layer (HAWQ-v2, Dong et al. 2020), for the second-order
sensitivity of :mod:`bitalloc.search.sensitivity`.

For the objective f of the sensitivity metric over all calibration samples (``kl``: the mean KL divergence from
the float outputs, whose Hessian at the float model is the Fisher information of the outputs; ``loss``: the mean
cross-entropy), and for each layer's weight W and input activation X (all samples), Hutchinson's estimator
(Avron & Toledo 2011) gives

    tr(H) = E_v[v^T H v],   v with independent Rademacher (+-1) entries,

with H v obtained by differentiating (grad f) . v once more (Pearlmutter 1994). The traces per element,
tr(H_W) / n_W and tr(H_X) / n_X, with the standard error of their mean over the ``samples`` vectors, are what
:func:`hessian_estimates` returns; the per-candidate estimate is 1/2 (tr(H_W)/n_W) ||dW||^2 + 1/2 (tr(H_X)/n_X)
||dX||^2 (the second-order Taylor term, cross terms ignored).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitalloc.batches import call_model
from bitalloc.model.layers import float_mode
from bitalloc.model.suffix import first_output


def _objective(metric: str, out: Tensor, ref: Tensor, labels: Tensor | None, total: int) -> Tensor:
    """Sum over this batch of the per-sample objective, divided by all samples (so batches add up)."""
    if metric == "kl":
        lp = F.log_softmax(ref.detach().to(out.dtype), dim=1)
        return (lp.exp() * (lp - F.log_softmax(out, dim=1))).sum() / total
    if metric == "loss":
        return F.cross_entropy(out, labels.to(torch.int64), reduction="sum") / total
    return (out - ref.detach()).pow(2).reshape(out.shape[0], -1).mean(1).sum() / total


def hutchinson_traces(qmodel: nn.Module, names: list[str], inputs: list[Any], labels: list[Tensor | None],
                      refs: list[Tensor], metric: str, *, samples: int = 16, seed: int = 0,
                      chunk: int = 8) -> dict[str, dict[str, float]]:
    """Per layer ``{"weight", "weight_se", "act", "act_se"}``: trace per element of the Hessian of the metric's
    objective with respect to the layer's (float) weight and input, and the standard errors (module docstring).
    ``qmodel`` is a prepared model (run in float); ``refs`` the float outputs of ``inputs``."""
    total = sum(int(r.shape[0]) for r in refs)
    layers = {n: qmodel.get_submodule(n) for n in names}
    weights = [layers[n].layer.weight for n in names]
    numel_x = {n: 0 for n in names}
    acc = {n: {"weight": [0.0] * samples, "act": [0.0] * samples} for n in names}
    g = torch.Generator().manual_seed(seed)
    was = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        with float_mode(qmodel), torch.enable_grad():
            for x_all, y_all, ref_all in zip(inputs, labels, refs):
                n_all = int(ref_all.shape[0])
                for start in range(0, n_all, chunk):
                    sl = slice(start, min(start + chunk, n_all))
                    x = x_all[sl] if isinstance(x_all, Tensor) else x_all
                    if isinstance(x, Tensor) and x.is_floating_point():
                        x = x.detach().requires_grad_(True)
                    acts: dict[str, Tensor] = {}
                    handles = [layers[n].register_forward_pre_hook(
                        lambda m, a, _n=n: acts.setdefault(_n, a[0])) for n in names]
                    try:
                        out = first_output(call_model(qmodel, x))
                    finally:
                        for h in handles:
                            h.remove()
                    f = _objective(metric, out, ref_all[sl], None if y_all is None else y_all[sl], total)
                    act_list = [acts[n] for n in names]
                    for n, a in zip(names, act_list):
                        numel_x[n] += a.numel()
                    params = weights + act_list
                    grads = torch.autograd.grad(f, params, create_graph=True, allow_unused=True)
                    for s in range(samples):
                        vs = [torch.randint(0, 2, p.shape, generator=g).to(p.dtype) * 2 - 1 for p in params]
                        dot = sum((gr * v).sum() for gr, v in zip(grads, vs) if gr is not None)
                        hv = torch.autograd.grad(dot, params, retain_graph=True, allow_unused=True)
                        for k, n in enumerate(names):
                            for key, idx in (("weight", k), ("act", len(names) + k)):
                                if hv[idx] is not None:
                                    acc[n][key][s] += float((hv[idx] * vs[idx]).sum())
    finally:
        for w, r in zip(weights, was):
            w.requires_grad_(r)
    out_traces: dict[str, dict[str, float]] = {}
    for k, n in enumerate(names):
        row: dict[str, float] = {}
        for key, numel in (("weight", weights[k].numel()), ("act", numel_x[n])):
            est = np.asarray(acc[n][key]) / max(numel, 1)
            row[key] = float(est.mean())
            row[f"{key}_se"] = float(est.std(ddof=1) / math.sqrt(samples)) if samples > 1 else float("nan")
        out_traces[n] = row
    return out_traces


def second_order(traces: dict[str, float], dw2: float, dx2: float) -> float:
    """1/2 (tr(H_W)/n_W) ||dW||^2 + 1/2 (tr(H_X)/n_X) ||dX||^2 (module docstring)."""
    return 0.5 * (traces["weight"] * dw2 + traces["act"] * dx2)


__all__ = ["hutchinson_traces", "second_order"]
