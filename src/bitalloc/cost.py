"""Cost accounting from a real traced forward pass: MACs, BOPs, relative BOPs, Bi-Real OPs, memory.

Conventions (SPEC "Cost conventions"; all per input sample):

* MACs: convolution C_in/groups * C_out * k_h * k_w * H_out * W_out (= weight elements x output positions);
  linear in * out per output position; transposed convolution weight elements x input positions.
* BOPs (Baskin et al.; van Baalen et al. 2020 eq. 12): sum over layers of b_w * b_a * MACs * kept fraction.
  With per-channel bit widths the product is summed over the (output channel, input channel) pairs that
  are actually connected (grouped convolutions connect a channel only within its group), so a layer with
  uniform widths gives exactly b_w * b_a * MACs. Pruned output channels (``kept`` mask of the weight
  quantizer) contribute nothing, and a layer whose input comes (through channel-preserving operations) from
  a pruned layer loses the corresponding input channels: the kept fraction carries into the next layer.
  Layers left in float count as 32 x 32 bits.
* Relative BOPs: BOPs / (1024 * total MACs), i.e. relative to the same network at 32 x 32 bits. Per layer
  (``LayerCost.relative_bops``): the layer's BOPs / (1024 * its MACs), relative to that layer at 32 x 32 bits
  (0 for a layer without MACs); the network's value is the MAC-weighted mean of the layers'.
* Bi-Real OPs (Liu et al. 2018; the seed-000 rebuttal's "Bit-FLOPs"): real-valued FLOPs (MACs of layers in
  float) + BOPs of quantized layers / 64. Per layer (``LayerCost.bireal_ops``): its MACs if it is in float,
  its BOPs / 64 if it is quantized; the network's value is their sum.
* Memory in bits: 32 x (real-valued parameters) + sum of b x (b-bit parameters). Quantized weights count
  at their per-channel widths (pruned channels not stored); biases, float layers and every other parameter
  (e.g. unfolded BatchNorms) at 32 bits; quantization metadata (scales, zero points, bias-correction terms,
  learned step sizes, gates) is real-valued and counted at 32 bits as ``overhead_bits``.
* Products of two activations (attention's q k^T and weights x v: ``matmul`` / ``bmm`` / ``baddbmm`` /
  ``scaled_dot_product_attention`` calls whose two operands both depend on the model's inputs) are entries of
  ``kind`` "matmul", named ``<module>.<function>#<k>``, with their MACs (output elements x inner dimension)
  and 32 x 32-bit BOPs, or b x b bits when the model quantizes them (``QuantConfig.product_bits``,
  :mod:`bitalloc.model.products`); softmaxes are entries of ``kind`` "softmax" without MACs (``elements``:
  values computed), in float. All of them count in the totals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bitalloc.model.layers import QuantLayer, float_mode
from bitalloc.model.products import MATMUL_FUNCTIONS, constant_ids, product_bits
from bitalloc.model.trace import trace_model

FLOAT_BITS = 32.0


@dataclass
class LayerCost:
    """Cost of one layer per input sample (module docstring): ``relative_bops`` = bops / (1024 macs) and
    ``bireal_ops`` = macs (float layer) or bops / 64 (quantized layer)."""

    name: str
    type: str
    quantized: bool
    macs: float
    w_bits: float
    a_bits: float
    kept_fraction: float
    bops: float
    params: int
    memory_bits: float
    overhead_bits: float = 0.0
    calls: int = 1
    groups: int = 1
    relative_bops: float = 0.0
    bireal_ops: float = 0.0
    #: "layer" (a module with weights), "matmul" (a product of two activations, e.g. attention's q k^T and
    #: weights x v) or "softmax" (no MACs; ``elements`` values, computed in float)
    kind: str = "layer"
    elements: float = 0.0
    note: str = ""


@dataclass
class CostReport:
    layers: list[LayerCost]
    macs: float
    bops: float
    relative_bops: float
    float_macs: float
    bireal_ops: float
    memory_bits: float
    fp32_memory_bits: float
    overhead_bits: float
    other_params: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _macs(module: nn.Module, inp: Tensor, out: Tensor) -> float:
    """MACs per sample of one call."""
    w = module.weight
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return float(w.numel()) * float(torch.tensor(inp.shape[2:]).prod()) if inp.ndim > 2 else float(w.numel())
    if isinstance(module, nn.modules.conv._ConvNd):
        return float(w.numel()) * float(torch.tensor(out.shape[2:]).prod()) if out.ndim > 2 else float(w.numel())
    if isinstance(module, nn.Linear):
        positions = float(torch.tensor(out.shape[1:-1]).prod()) if out.ndim > 2 else 1.0
        return float(w.numel()) * positions
    return 0.0


def _pair_bops(w_bits: Tensor, a_bits: Tensor, c_out: int, c_in: int, groups: int, macs: float) -> float:
    """sum over connected (output, input) channel pairs of b_w * b_a, times MACs per pair."""
    w_bits = w_bits.expand(c_out) if w_bits.numel() == 1 else w_bits
    a_bits = a_bits.expand(c_in) if a_bits.numel() == 1 else a_bits
    per_pair = macs / (c_out * (c_in // groups))
    sw = w_bits.reshape(groups, -1).sum(1)
    sa = a_bits.reshape(groups, -1).sum(1)
    return float((sw * sa).sum()) * per_pair


def _input_kept(layer_name: str, trace, modules: dict[str, nn.Module], c_in: int) -> Tensor | None:
    """The kept mask of this layer's input channels, if its input comes from a pruned layer through
    single-input operations (activations, pooling, flatten, BatchNorm)."""
    calls = trace.calls.get(layer_name)
    if not calls:
        return None
    tid = trace.nodes[calls[0]].inputs[0] if trace.nodes[calls[0]].inputs else None
    for _ in range(64):
        idx = trace.producer.get(tid)
        if idx is None:
            return None
        node = trace.nodes[idx]
        if isinstance(node.module, QuantLayer):
            q = node.module.weight_quantizer
            mask = q.kept_mask() if q is not None else None
            if mask is None:
                return None
            if c_in % mask.numel() == 0:  # flatten: each channel becomes c_in / C features
                return mask.repeat_interleave(c_in // mask.numel())
            return None
        if len(set(node.inputs)) != 1:
            return None
        tid = node.inputs[0]
    return None


SOFTMAX_FUNCTIONS = {"softmax", "_softmax", "log_softmax"}
FLOAT_PRODUCT_NOTE = "activation x activation product, computed in float (32 x 32 bits)"


def _matmul_macs(node: Any) -> tuple[float, float, float]:
    """(MACs, softmax elements, MACs of the product with the softmax weights) of one traced product: matmul / bmm /
    baddbmm (output elements x the inner dimension), scaled_dot_product_attention (q k^T and weights x v:
    L S E + L S E_v per batch and head, plus a softmax over its L S weights; the last value is L S E_v)."""
    shapes = node.input_shapes
    out = node.output_shapes[0] if node.output_shapes else ()
    numel = float(torch.tensor(out, dtype=torch.float64).prod()) if out else 1.0
    if node.target == "scaled_dot_product_attention":
        q, k = shapes[0], shapes[1]
        lead = float(torch.tensor(q[:-2], dtype=torch.float64).prod()) if len(q) > 2 else 1.0
        weights = lead * q[-2] * k[-2]
        return weights * q[-1] + numel * k[-2], weights, numel * k[-2]
    inner = shapes[-2][-1] if node.target == "baddbmm" else (shapes[0][-1] if shapes and len(shapes[0]) else 1)
    return numel * inner, 0.0, 0.0


def _activation_products(trace: Any, model: nn.Module, batch: int) -> list[LayerCost]:
    """The products of two activations (tensors computed from the model's inputs) and the softmaxes of a traced
    forward pass, outside the layers with weights, per input sample: float (32 x 32 bits), or b x b bits when the
    model quantizes them (``QuantConfig.product_bits``; the softmax weights inside scaled_dot_product_attention
    stay float: 32 x b bits for that half)."""
    b = product_bits(model)
    constant = constant_ids(model)
    live: set[int] = set()  # tensors that depend on the model's inputs
    produced = {t for n in trace.nodes for t in n.outputs}
    out: list[LayerCost] = []
    counts: dict[str, int] = {}
    for node in trace.nodes:
        for t in node.inputs:
            if t not in produced and t not in constant:
                live.add(t)  # a model input
        inputs_live = [t for t in node.inputs if t in live]
        if inputs_live:
            live.update(node.outputs)
        if node.module is not None:
            continue
        kind = ("matmul" if node.target in MATMUL_FUNCTIONS and len(inputs_live) >= 2 else
                "softmax" if node.target in SOFTMAX_FUNCTIONS and inputs_live else None)
        if kind is None:
            continue
        macs, elements, float_half = _matmul_macs(node) if kind == "matmul" else (0.0, float(
            torch.tensor(node.output_shapes[0], dtype=torch.float64).prod()) if node.output_shapes else 0.0, 0.0)
        base = f"{node.scope + '.' if node.scope else ''}{node.target.strip('_')}"
        counts[base] = counts.get(base, 0) + 1
        macs, elements, float_half = macs / batch, elements / batch, float_half / batch
        name, target = f"{base}#{counts[base]}", node.target.strip("_")
        if kind == "matmul" and b is not None:
            bops = b * b * (macs - float_half) + FLOAT_BITS * b * float_half
            note = (f"activation x activation product, operands quantized to {b} bits per sample on every input"
                    + (" (its softmax weights in float)" if float_half else ""))
            out.append(LayerCost(name, target, True, macs, float(b), float(b), 1.0, bops, 0, 0.0,
                                 relative_bops=bops / (1024.0 * macs) if macs else 0.0, bireal_ops=bops / 64.0,
                                 kind=kind, elements=elements, note=note))
            continue
        out.append(LayerCost(name, target, False, macs, FLOAT_BITS, FLOAT_BITS,
                             1.0, FLOAT_BITS * FLOAT_BITS * macs, 0, 0.0, relative_bops=1.0 if macs else 0.0,
                             bireal_ops=macs, kind=kind, elements=elements,
                             note=FLOAT_PRODUCT_NOTE if kind == "matmul" else "softmax, computed in float"))
    return out


def _bits(q: Any, channels: int) -> Tensor:
    if q is None:
        return torch.full((channels,), FLOAT_BITS, dtype=torch.float64)
    b = q.bits_per_channel().to(torch.float64).reshape(-1)
    return b.expand(channels) if b.numel() == 1 else b


def _buffer_bits(module: nn.Module | None) -> float:
    if module is None:
        return 0.0
    n = sum(p.numel() for p in module.parameters()) + sum(
        b.numel() for name, b in module.named_buffers() if b.dtype.is_floating_point or b.dtype in (torch.int64, torch.int32))
    return FLOAT_BITS * n


@torch.no_grad()
def cost_report(model: nn.Module, example_inputs: Any) -> CostReport:
    """Per-layer and total cost of ``model`` (quantized or not) from one forward pass on ``example_inputs`` (a
    tensor, a tuple of positional arguments or a dict of keyword arguments: :func:`bitalloc.batches.call_model`)."""
    modules = dict(model.named_modules())
    inside_qlayer = {f"{n}.{c}" for n, m in modules.items() if isinstance(m, QuantLayer) for c, _ in m.named_modules() if c}
    targets = {n: m for n, m in modules.items()
               if n and n not in inside_qlayer and (isinstance(m, QuantLayer) or isinstance(getattr(m, "weight", None), nn.Parameter))}
    records: dict[str, list[tuple[Tensor, Tensor]]] = {}
    handles = []
    for name, m in targets.items():
        def hook(mod, args, out, _name=name):
            if args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
                records.setdefault(_name, []).append((torch.empty(args[0].shape, device="meta"),
                                                      torch.empty(out.shape, device="meta")))
        handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:  # values do not matter for cost: run in float so uncalibrated models work too
        with float_mode(model):
            trace = trace_model(model, example_inputs, atomic=lambda n, m: isinstance(m, QuantLayer) or n in targets)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    layers: list[LayerCost] = []
    counted_params: set[int] = set()
    for name, m in targets.items():
        layer = m.layer if isinstance(m, QuantLayer) else m
        calls = records.get(name, [])
        for p in m.parameters():
            counted_params.add(id(p))
        weight = layer.weight
        is_conv = isinstance(layer, nn.modules.conv._ConvNd)
        compute = is_conv or isinstance(layer, nn.Linear)
        c_out = weight.shape[1] * getattr(layer, "groups", 1) if isinstance(layer, nn.modules.conv._ConvTransposeNd) else weight.shape[0]
        groups = getattr(layer, "groups", 1) if is_conv else 1
        c_in = (weight.shape[1] * groups) if compute and not isinstance(layer, nn.modules.conv._ConvTransposeNd) else (weight.shape[0] if compute else 1)
        macs = sum(_macs(layer, i, o) for i, o in calls) if compute else 0.0
        quantized = isinstance(m, QuantLayer)
        wq = m.weight_quantizer if quantized else None
        aq = m.input_quantizer if quantized else None
        w_bits = _bits(wq, c_out)
        a_bits = _bits(aq, c_in) if compute else torch.full((1,), FLOAT_BITS, dtype=torch.float64)
        kept_out = wq.kept_mask() if wq is not None else None
        kept_in = _input_kept(name, trace, modules, c_in) if compute else None
        w_eff = w_bits * kept_out.to(torch.float64) if kept_out is not None else w_bits
        a_eff = a_bits * kept_in.to(torch.float64) if kept_in is not None else a_bits
        if compute and macs > 0 and not isinstance(layer, nn.modules.conv._ConvTransposeNd):
            bops = _pair_bops(w_eff, a_eff, c_out, c_in, groups, macs)
            full = _pair_bops(torch.ones(c_out, dtype=torch.float64), torch.ones(c_in, dtype=torch.float64), c_out, c_in, groups, macs)
            kept_frac = _pair_bops((kept_out if kept_out is not None else torch.ones(c_out)).double(),
                                   (kept_in if kept_in is not None else torch.ones(c_in)).double(),
                                   c_out, c_in, groups, macs) / full if full else 1.0
        else:
            bops, kept_frac = float(w_bits.mean()) * float(a_bits.mean()) * macs, 1.0
        per_channel = weight.numel() / max(weight.shape[0], 1)
        w_mem = float((w_eff if kept_out is not None else w_bits).sum()) * per_channel if wq is not None else FLOAT_BITS * weight.numel()
        bias = getattr(layer, "bias", None)
        b_mem = FLOAT_BITS * bias.numel() if isinstance(bias, Tensor) else 0.0
        overhead = sum(_buffer_bits(q) for q in (wq, aq))
        smooth = getattr(m, "smooth_scale", None) if quantized else None
        if smooth is not None:  # SmoothQuant's per-channel input scales
            overhead += FLOAT_BITS * smooth.numel()
        mean_w = float(w_bits[kept_out].mean()) if kept_out is not None and bool(kept_out.any()) else float(w_bits.mean())
        layers.append(LayerCost(name, type(layer).__name__, quantized, macs, mean_w, float(a_bits.mean()),
                                float(kept_frac), bops, int(weight.numel() + (bias.numel() if isinstance(bias, Tensor) else 0)),
                                w_mem + b_mem + overhead, overhead, len(calls), groups,
                                relative_bops=bops / (1024.0 * macs) if macs else 0.0,
                                bireal_ops=bops / 64.0 if quantized else macs))
    from bitalloc.batches import batch_size

    layers.extend(_activation_products(trace, model, max(batch_size(example_inputs), 1)))
    other = [p for p in model.parameters() if id(p) not in counted_params]
    other_params = sum(p.numel() for p in other)
    total_macs = sum(l.macs for l in layers)
    total_bops = sum(l.bops for l in layers)
    float_macs = sum(l.macs for l in layers if not l.quantized)
    q_bops = sum(l.bops for l in layers if l.quantized)
    quantizer_params = {id(p) for n, m in modules.items() if isinstance(m, QuantLayer)
                        for q in m.quantizers() for p in q.parameters()}
    all_params = sum(p.numel() for p in model.parameters() if id(p) not in quantizer_params)
    memory = sum(l.memory_bits for l in layers) + FLOAT_BITS * other_params
    return CostReport(
        layers=layers, macs=total_macs, bops=total_bops,
        relative_bops=total_bops / (1024.0 * total_macs) if total_macs else 0.0,
        float_macs=float_macs, bireal_ops=float_macs + q_bops / 64.0, memory_bits=memory,
        fp32_memory_bits=FLOAT_BITS * all_params, overhead_bits=sum(l.overhead_bits for l in layers),
        other_params=other_params)
