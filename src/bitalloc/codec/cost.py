"""Cost per frame, per region (ROI / non-ROI) and per layer of a network run with region-masked precision.

Everything per layer comes from bitalloc's cost model (:func:`bitalloc.cost.cost_report`, a traced forward pass:
MACs, BOPs with per-channel widths and kept channels, which layers are quantized), evaluated once per bit width
that a frame uses; the region split comes from the mask at each layer's *output* resolution, which is where a
split layer (:func:`bitalloc.model.region.region_precision`, mode "split") computes each region at its width:

* ``f_l`` = share of layer l's output positions that are ROI, from
  :func:`bitalloc.quantizers.region.mask_at` of the frame's mask at the output's spatial size (rule "any" by
  default, as at run time; a soft mask counts its fractions), summed over the layer's calls
  (``f_l = sum_calls ROI positions / sum_calls positions``; a layer without 2-D spatial output takes the
  frame's ROI share);
* MACs: ``MACs_l,roi = f_l MACs_l``, ``MACs_l,non = (1 - f_l) MACs_l`` (SPEC: C_in/groups * C_out * k_h * k_w *
  H_out * W_out per frame);
* BOPs: ``BOPs_l,roi = f_l BOPs_l(b_roi)``, ``BOPs_l,non = (1 - f_l) BOPs_l(b_non)``, where ``BOPs_l(b)`` is the
  cost model's BOPs of the layer with its region quantizers at width b (weights and activations: b x b x MACs for
  a layer at one width per tensor); layers that are not region-quantized keep their own widths in both
  regions, float layers 32 x 32;
* **Bit-FLOPs, SPEC convention** (Bi-Real OPs, the rebuttal's prose in A6): real-valued FLOPs + BOPs / 64, i.e.
  per layer and region its MACs if the layer is in float, its BOPs / 64 if it is quantized (as
  :attr:`bitalloc.cost.LayerCost.bireal_ops`);
* **Bit-FLOPs, the rebuttal's formula** (A6): ``||b_a . b_w||_2 / 32 * 2 * C_in * C_out * F^2 * B * H * W``. We read
  it per layer and region, with B = 1 (per frame), H * W the region's output positions, C_in per group, and the
  norm of the scalar product b_a b_w as its value (for per-channel widths: the MAC-weighted mean of b_w b_a
  over connected channel pairs, i.e. BOPs / MACs); then ``A6 = (BOPs / MACs) / 32 * 2 * MACs = BOPs / 16``. The
  formula has no float special case: a float layer counts b_a = b_w = 32, i.e. 64 x its MACs. (Read as the L2
  norm of the vector of the two regions' products it would not be additive over regions or layers, so we do not.)

None of these is a run time (SPEC "Cost conventions"); the codec's benchmarks measure time separately.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from bitalloc.cost import CostReport, cost_report
from bitalloc.errors import ShapeError
from bitalloc.model.layers import QuantLayer, float_mode
from bitalloc.model.region import region_precision, region_quantizers
from bitalloc.model.trace import trace_model
from bitalloc.quantizers.region import RegionLSQQuantizer, check_rule, mask_at

REGIONS = ("roi", "non_roi")


@dataclass
class RegionCost:
    """Cost of one region (of one layer, or summed): MACs, BOPs, Bit-FLOPs (SPEC: float MACs + BOPs / 64; A6:
    BOPs / 16), and the widths (for a layer: its mean weight / activation widths in that region)."""

    macs: float = 0.0
    bops: float = 0.0
    bit_flops: float = 0.0
    bit_flops_a6: float = 0.0
    w_bits: float = 0.0
    a_bits: float = 0.0

    def add(self, other: "RegionCost") -> None:
        self.macs += other.macs
        self.bops += other.bops
        self.bit_flops += other.bit_flops
        self.bit_flops_a6 += other.bit_flops_a6


@dataclass
class RegionLayerCost:
    """One layer in one frame: ``roi_fraction`` of its output positions, and each region's cost."""

    name: str
    type: str
    quantized: bool
    region_quantized: bool
    macs: float
    positions: int
    roi_fraction: float
    roi: RegionCost
    non_roi: RegionCost


@dataclass
class FrameCost:
    """One frame: its widths, the ROI share of its mask (reference resolution), per-layer costs and totals per
    region and overall."""

    frame: int
    roi_bits: int
    non_roi_bits: int
    roi_fraction: float
    layers: list[RegionLayerCost]
    roi: RegionCost = field(default_factory=RegionCost)
    non_roi: RegionCost = field(default_factory=RegionCost)
    total: RegionCost = field(default_factory=RegionCost)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _layer_positions(model: nn.Module, example_inputs: Any, names: Sequence[str]) -> dict[str, list[tuple[int, ...]]]:
    """Spatial output sizes of every call of each named layer (one float forward pass, traced)."""
    wanted = set(names)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), float_mode(model):
            trace = trace_model(model, example_inputs, atomic=lambda n, m: isinstance(m, QuantLayer) or n in wanted)
    finally:
        model.train(was)
    out: dict[str, list[tuple[int, ...]]] = {}
    for name in names:
        shapes = []
        for idx in trace.calls.get(name, []):
            node = trace.nodes[idx]
            shape = node.output_shapes[0] if node.output_shapes else ()
            shapes.append(tuple(shape[-2:]) if len(shape) == 4 else ())
        out[name] = shapes
    return out


def _reports(model: nn.Module, example_inputs: Any, widths: set[int]) -> dict[int, CostReport]:
    """The cost report with every region quantizer at each width (one report when there are none)."""
    if not region_quantizers(model):
        report = cost_report(model, example_inputs)
        return {b: report for b in widths}
    out = {}
    for b in sorted(widths):
        with region_precision(model, torch.ones(1, 1, 1, 1, dtype=torch.bool), b, b):
            out[b] = cost_report(model, example_inputs)
    return out


def _per_frame(bits: int | Sequence[int], count: int, what: str) -> list[int]:
    if isinstance(bits, (int, np.integer)):
        return [int(bits)] * count
    values = [int(b) for b in (bits.tolist() if isinstance(bits, (Tensor, np.ndarray)) else bits)]
    if len(values) != count:
        raise ShapeError(f"{len(values)} {what} widths for {count} frames; give one per frame (or one for all)")
    return values


def _region_cost(layer: Any, share: float, macs: float) -> RegionCost:
    """A layer's cost restricted to a share of its output positions (``layer`` a LayerCost at the region's width)."""
    bops = share * layer.bops
    return RegionCost(macs=share * macs, bops=bops, bit_flops=bops / 64.0 if layer.quantized else share * macs,
                      bit_flops_a6=bops / 16.0, w_bits=layer.w_bits, a_bits=layer.a_bits)


@torch.no_grad()
def region_cost(model: nn.Module, example_inputs: Any, masks: Tensor | np.ndarray, roi_bits: int | Sequence[int],
                non_roi_bits: int | Sequence[int], *, rule: str = "any", min_fraction: float = 0.5) -> list[FrameCost]:
    """Per-frame, per-region, per-layer cost of ``model`` (module docstring).

    ``example_inputs``: one frame's input (batch 1) of the network; ``masks``: [T, H, W] (or [H, W]) ROI masks at
    a reference resolution (e.g. the padded luma frame), bool or float in [0, 1], brought to each layer's output
    size with ``rule`` / ``min_fraction`` (:func:`bitalloc.quantizers.region.mask_at`); ``roi_bits`` /
    ``non_roi_bits``: one width for all frames or one per frame. A model without region quantizers is costed at
    its own widths in both regions."""
    check_rule(rule, min_fraction)
    m = torch.as_tensor(np.asarray(masks)) if not isinstance(masks, Tensor) else masks.detach().cpu()
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ShapeError(f"masks must be [T, H, W] or [H, W], got shape {tuple(m.shape)}")
    count = m.shape[0]
    roi_list, non_list = _per_frame(roi_bits, count, "ROI"), _per_frame(non_roi_bits, count, "non-ROI")
    reports = _reports(model, example_inputs, set(roi_list) | set(non_list))
    base = next(iter(reports.values()))
    names = [l.name for l in base.layers]
    positions = _layer_positions(model, example_inputs, names)
    region_layers = {n for n, l in model.named_modules() if isinstance(l, QuantLayer)
                     and any(isinstance(q, RegionLSQQuantizer) for q in l.quantizers())}
    frames = []
    for t in range(count):
        frame = FrameCost(t, roi_list[t], non_list[t], float(m[t].to(torch.float64).mean()), [])
        for i, name in enumerate(names):
            roi_pos = total_pos = 0.0
            for size in positions[name]:
                if size:
                    roi_pos += float(mask_at(m[t], size, rule=rule, min_fraction=min_fraction).to(torch.float64).sum())
                    total_pos += float(size[0] * size[1])
            share = roi_pos / total_pos if total_pos else frame.roi_fraction
            at_roi, at_non = reports[roi_list[t]].layers[i], reports[non_list[t]].layers[i]
            entry = RegionLayerCost(name, at_roi.type, at_roi.quantized, name in region_layers, at_roi.macs,
                                    int(total_pos), share, _region_cost(at_roi, share, at_roi.macs),
                                    _region_cost(at_non, 1.0 - share, at_non.macs))
            frame.layers.append(entry)
            frame.roi.add(entry.roi)
            frame.non_roi.add(entry.non_roi)
        frame.total.add(frame.roi)
        frame.total.add(frame.non_roi)
        frames.append(frame)
    return frames


def summarize(frames: Sequence[FrameCost]) -> dict[str, Any]:
    """Means over frames of each region's and the total MACs, BOPs and Bit-FLOPs (both conventions)."""
    out: dict[str, Any] = {"frames": len(frames)}
    for key in ("roi", "non_roi", "total"):
        out[key] = {k: float(np.mean([getattr(getattr(f, key), k) for f in frames])) if frames else 0.0
                    for k in ("macs", "bops", "bit_flops", "bit_flops_a6")}
    out["roi_fraction"] = float(np.mean([f.roi_fraction for f in frames])) if frames else 0.0
    return out


def macs_per_pixel(model: nn.Module, luma: int = 256) -> dict[str, Any]:
    """Multiply-accumulates per luma pixel of every network of a codec (:class:`bitalloc.codec.model.VideoCodec`) and
    of each frame type, from bitalloc's cost model (:func:`bitalloc.cost.cost_report`: C_in / groups * C_out * k_h
    * k_w * H_out * W_out per convolution) on a ``luma`` x ``luma`` frame (a multiple of 64). A frame type runs the
    coders of :data:`bitalloc.codec.precision.FRAME_CODERS`; encoding runs all four networks of each (the encoder
    also decodes, for the next frame's reference), decoding the synthesis and hyper synthesis. GDN's channel mixing
    (a functional convolution, not a layer) is not counted. Returns ``{"luma", "networks": {"intra.analysis": ...},
    "frames": {"I": {"encode", "decode"}, "P": {...}}}``."""
    from bitalloc.codec.precision import ALL_PARTS, DECODER_PARTS, FRAME_CODERS, coders, network_input

    if luma <= 0 or luma % 64:
        raise ShapeError(f"macs_per_pixel: luma {luma} must be a positive multiple of 64 (the hyperprior's stride)")
    networks: dict[str, float] = {}
    for cname, coder in coders(model).items():
        for part in ALL_PARTS:
            x = network_input(coder, part, luma)
            networks[f"{cname}.{part}"] = cost_report(getattr(coder, part), x).macs / luma ** 2
    frames = {kind: {"encode": sum(networks[f"{c}.{p}"] for c in names for p in ALL_PARTS),
                     "decode": sum(networks[f"{c}.{p}"] for c in names for p in DECODER_PARTS)}
              for kind, names in FRAME_CODERS.items()}
    return {"luma": luma, "networks": networks, "frames": frames}


__all__ = ["REGIONS", "FrameCost", "RegionCost", "RegionLayerCost", "macs_per_pixel", "region_cost", "summarize"]
