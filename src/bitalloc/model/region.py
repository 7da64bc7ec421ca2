"""Running a model with region-masked precision: the region context, split layers, frozen widths.

A model prepared with :class:`~bitalloc.quantizers.region.RegionLSQQuantizer` (``TensorConfig(quantizer=
"lsq_region", options={"candidates": [2, 4, 8]})``) runs at its default width until a region context says
otherwise::

    with region_precision(net, mask, roi=8, non_roi=4):            # test time: the signalled widths
        y = net(x)
    with region_precision(net, mask, roi=w_roi, non_roi=w_non):    # training: [B, K] Gumbel-softmax samples
        y = net(x)

:func:`region_precision` sets one :class:`~bitalloc.quantizers.region.RegionContext` on every region quantizer of
the model and, in ``mode="split"`` (the default), makes every :class:`~bitalloc.model.layers.QuantLayer` with a
region quantizer compute ``y = sum_k c_k * layer_k(x)``: ``layer_k`` the layer with its region quantizers at
candidate k (weights and input activations), ``c_k = m r_k + (1 - m) n_k`` with the mask ``m`` at the
*output's* resolution, ``r`` / ``n`` the ROI / non-ROI weights over the candidates. With integer widths and a
boolean mask the output at an ROI position is exactly the layer at the ROI width, elsewhere exactly the layer at
the non-ROI width; candidates with a zero coefficient everywhere are not computed (two passes per layer at test
time; all K when the weights carry a gradient). Equal widths run the layer once, unpatched.
``mode="mask"`` patches nothing: activations are mixed per input position and weights run at the larger width
(see :mod:`bitalloc.quantizers.region`).

**Exact (integer) execution.** :func:`freeze_at` gives an ordinary frozen model at one candidate width (every
region quantizer replaced by a plain :class:`~bitalloc.quantizers.frozen.FrozenQuantizer` of that width's learned
step), which :func:`bitalloc.runtime.integer.integer_mode` runs in integers; :func:`frozen_branches` one per
candidate. :func:`split_execution` runs such branches layer by layer: each quantized layer of the ROI-width branch
computes its own output and that of the same layer of the non-ROI branch on the same input, and keeps each one at
its region's output positions (``torch.where``: a selection, no arithmetic, so integer-exact layers stay exact)::

    nets = frozen_branches(net)                      # {2: ..., 4: ..., 8: ...}
    with integer_mode(nets[8], kernel="float"), integer_mode(nets[4], kernel="float"):
        with split_execution(nets, mask, roi_bits=8, non_roi_bits=4) as run:
            y = run(x)

Contexts nest in that order (integer mode outside, split inside). Do not ``deepcopy`` / ``freeze`` a model inside
a split context (its layers carry the patched forwards).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from bitalloc.errors import ConfigError
from bitalloc.model.layers import QuantLayer, quant_layers
from bitalloc.quantizers.region import MaskLike, RegionContext, RegionLSQQuantizer, _mix, needed_terms


def region_quantizers(model: nn.Module) -> list[tuple[str, RegionLSQQuantizer]]:
    """Every region quantizer of ``model`` with its qualified name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RegionLSQQuantizer)]


def _region_layers(model: nn.Module) -> list[tuple[str, QuantLayer, list[RegionLSQQuantizer]]]:
    out = []
    for name, layer in quant_layers(model):
        qs = [q for q in layer.quantizers() if isinstance(q, RegionLSQQuantizer)]
        if qs:
            if len({q.candidates for q in qs}) != 1:
                raise ConfigError(f"layer {name!r}: its weight and activation quantizers have different candidate "
                                  "widths; give both the same options['candidates']")
            out.append((name, layer, qs))
    return out


@contextlib.contextmanager
def _patched_forwards(layers: Sequence[QuantLayer], make: Any) -> Iterator[None]:
    """Shadow each layer's forward by ``make(layer, previous_forward)`` (an instance attribute, as
    :func:`bitalloc.runtime.integer.integer_mode` does), restoring what was there on exit."""
    saved = []
    try:
        for layer in layers:
            prev = layer.__dict__.get("forward")
            base = prev if prev is not None else functools.partial(QuantLayer.forward, layer)
            saved.append((layer, prev))
            layer.forward = make(layer, base)
        yield
    finally:
        for layer, prev in reversed(saved):
            if prev is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = prev


def _split_forward(qs: list[RegionLSQQuantizer], base: Any, ctx: RegionContext, x: Tensor, *args: Any,
                   **kwargs: Any) -> Tensor:
    cands = qs[0].candidates
    single = ctx.single_index(cands)
    if single is not None:
        return _at_branch(qs, single, base, x, args, kwargs)
    r, n = ctx.weights(cands, x.device)
    live = needed_terms(torch.cat([r, n]).t().reshape(len(cands), -1, 1, 1, 1))
    outs = {k: _at_branch(qs, k, base, x, args, kwargs) for k in live}
    y0 = next(iter(outs.values()))
    if y0.ndim < 3:
        raise ConfigError("split region precision needs layer outputs with spatial dimensions [B, C, H, W]; use "
                          "mode='mask' or leave this layer out of region quantization")
    coeff = ctx.coefficients(cands, y0.shape[-2:], y0.device, y0.dtype)
    return _mix({k: outs[k] for k in needed_terms(coeff) if k in outs}, coeff)


def _at_branch(qs: list[RegionLSQQuantizer], k: int, base: Any, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
    for q in qs:
        q.branch = k
    try:
        return base(x, *args, **kwargs)
    finally:
        for q in qs:
            q.branch = None


@contextlib.contextmanager
def region_precision(model: nn.Module, mask: MaskLike, roi: int | Tensor, non_roi: int | Tensor, *,
                     mode: str = "split", rule: str = "any", min_fraction: float = 0.5) -> Iterator[RegionContext]:
    """Run ``model``'s region quantizers with ``mask`` and the (ROI, non-ROI) widths inside the block (module
    docstring). ``mask``: a tensor at a reference resolution (resampled per tensor with ``rule``, see
    :func:`bitalloc.quantizers.region.mask_at`) or a function ``(h, w) -> [B or 1, 1, h, w]`` mask. ``roi`` /
    ``non_roi``: integer widths or [K] / [B, K] weights over the candidates. Yields the context."""
    ctx = RegionContext(mask=mask, roi=roi, non_roi=non_roi, mode=mode, rule=rule, min_fraction=min_fraction)
    layers = _region_layers(model)
    quantizers = [q for _, q in region_quantizers(model)]
    if not quantizers:
        raise ConfigError("this model has no region quantizers; prepare it with TensorConfig(quantizer='lsq_region')")
    saved = [(q, q.region) for q in quantizers]
    for q in quantizers:
        ctx.weights(q.candidates)  # validates the widths against every quantizer before anything runs
        q.region = ctx
    try:
        if mode == "split":
            def make(layer: QuantLayer, base: Any) -> Any:
                qs = next(qs for _, l, qs in layers if l is layer)
                return functools.partial(_split_forward, qs, base, ctx)

            with _patched_forwards([l for _, l, _ in layers], make):
                yield ctx
        else:
            yield ctx
    finally:
        for q, prev in saved:
            q.region = prev


def freeze_at(model: nn.Module, bits: int) -> nn.Module:
    """A frozen copy of ``model`` at candidate width ``bits``: :func:`bitalloc.freeze` with every region
    quantizer described at that width (its learned step for ``bits``); other quantizers frozen as usual."""
    from bitalloc.model.freeze import freeze

    if any(q.region is not None or q.branch is not None for _, q in region_quantizers(model)):
        raise ConfigError("freeze_at() inside a region context: call it outside region_precision()")
    work = copy.deepcopy(model)
    qs = region_quantizers(work)
    if not qs:
        raise ConfigError("this model has no region quantizers; prepare it with TensorConfig(quantizer='lsq_region')")
    for _, q in qs:
        q.branch = q.index_of(bits)
    return freeze(work, inplace=True)


def frozen_branches(model: nn.Module, candidates: Sequence[int] | None = None) -> dict[int, nn.Module]:
    """``{bits: freeze_at(model, bits)}`` for every candidate width (or the given ones)."""
    if candidates is None:
        sets = {q.candidates for _, q in region_quantizers(model)}
        if len(sets) != 1:
            raise ConfigError(f"the model's region quantizers have different candidate sets {sorted(sets)}; "
                              "pass candidates=")
        candidates = sets.pop()
    return {int(b): freeze_at(model, int(b)) for b in candidates}


def _select_forward(twin: QuantLayer, ctx: RegionContext, base: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    y_roi = base(x, *args, **kwargs)
    y_non = twin(x, *args, **kwargs)
    m = ctx.mask_for(y_roi.shape[-2:], y_roi.device)
    if m.dtype == torch.bool:
        return torch.where(m, y_roi, y_non)
    m = m.to(y_roi.dtype)
    return m * y_roi + (1.0 - m) * y_non


@contextlib.contextmanager
def split_execution(branches: Mapping[int, nn.Module], mask: MaskLike, roi_bits: int, non_roi_bits: int, *,
                    rule: str = "any", min_fraction: float = 0.5) -> Iterator[nn.Module]:
    """Run frozen branches (:func:`frozen_branches`) with ROI positions at ``roi_bits`` and the others at
    ``non_roi_bits``, layer by layer (module docstring). Yields the module to call (the ROI branch, patched)."""
    for b in (roi_bits, non_roi_bits):
        if int(b) not in branches:
            raise ConfigError(f"no frozen branch at {b} bits (have {sorted(branches)}); build it with "
                              "frozen_branches(model) or freeze_at(model, bits)")
    driver = branches[int(roi_bits)]
    if int(roi_bits) == int(non_roi_bits):
        yield driver
        return
    other = dict(quant_layers(branches[int(non_roi_bits)]))
    mine = quant_layers(driver)
    if set(other) != {n for n, _ in mine}:
        raise ConfigError("the two branches have different quantized layers; build both from one model with "
                          "frozen_branches()")
    ctx = RegionContext(mask=mask, roi=int(roi_bits), non_roi=int(non_roi_bits), rule=rule, min_fraction=min_fraction)
    twin_of = {id(layer): other[name] for name, layer in mine}

    def make(layer: QuantLayer, base: Any) -> Any:
        return functools.partial(_select_forward, twin_of[id(layer)], ctx, base)

    with _patched_forwards([layer for _, layer in mine], make):
        yield driver


__all__ = ["freeze_at", "frozen_branches", "region_precision", "region_quantizers", "split_execution"]
