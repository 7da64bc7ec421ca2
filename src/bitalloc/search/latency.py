"""Measured latency per layer in onnxruntime, int8 against float: the cost table of ``--budget latency=...``.

Each searched layer is exported alone at the input shape it sees in the network (one forward pass of the float
model on an example batch, ``batch`` samples): its float module (:func:`~bitalloc.runtime.onnx_export.export_float`)
and the same model quantized by onnxruntime's own static quantization at W8A8 min-max (QDQ: per-channel int8
weights, uint8 input and output; :func:`~bitalloc.runtime.ort.ort_static_quantize`), which onnxruntime fuses into
an integer kernel (QLinearConv, QGemm; whether it did is recorded per layer). The int8 time is that of the fused
kernel with uint8 codes in and out (the quantized model without its input QuantizeLinear and output
DequantizeLinear): the layer as it runs between int8 neighbours, which is how most layers of a mostly-int8 network
run. The time with both conversions (``int8_alone_ms``: a lone int8 layer between float neighbours) is recorded too:
the difference is what a layer pays where a run of int8 layers begins or ends (Borders, below). Sessions are timed
in turns (:func:`~bitalloc.runtime.ort.interleaved_latency`:
background load hits all alike).

A candidate's latency is that of the kernel it runs on (:func:`kernel_of`): the int8 kernel when both widths are
at most 8 bits (narrower grids run on the same int8 kernels: onnxruntime has no 2- or 4-bit ones, so a 4-bit
layer takes the 8-bit time), the float kernel otherwise (float, or a grid wider than 8 bits, which runs
dequantized). A layer's time is its session's median minus that of a session on the same input that only
copies it (the cost of a call, which the whole network pays once, not once per layer). The rest of the network
(layers not searched, other operators) is ``fixed``: the whole float model's latency minus the sum of its
searched layers' float latencies, so that every layer in float predicts exactly the measured FP32 model (and
``latency=100%`` always admits it); it is negative where the layers timed alone add up to more than the model.

**Borders.** Where a run of int8 layers begins, the first layer's input is quantized, and where it ends, the last
one's output is dequantized; those conversions cost about as much as a small layer. The searched layers are taken
as a chain in the order of the model's modules (the order a plain CNN runs them; for branches and residual adds
an approximation), and a choice's predicted latency is (:func:`chain_latency`)::

    fixed + sum_i t_i(kernel_i) + sum over int8 runs (convert_in of the first layer + convert_out of the last)

with ``convert_in + convert_out`` = the layer's int8 time with its own conversions minus without, split by the
sizes of its input and output. The search under a latency budget solves this exactly
(:func:`bitalloc.search.knapsack.solve_chain`: the Pareto dynamic program with the last layer's kernel in the
state). Whether the sum holds for the whole network is measured after the search (:func:`model_latency`: the
exported chosen configuration against the float model, timed in turns).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from bitalloc.batches import batch_inputs, batch_size, call_model
from bitalloc.errors import ConfigError
from bitalloc.model.layers import quant_layers
from bitalloc.search.space import Candidate

#: the cost table's key (milliseconds per batch)
LATENCY_KEY = "latency_ms"
#: per layer: at least this many timed runs of each kernel, and this much timed time (seconds)
LAYER_RUNS, LAYER_SECONDS = 20, 0.2
#: seconds of rest between the last PyTorch work and the first timed onnxruntime run
SETTLE = 1.0
_TIME_UNITS = {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}


def kernel_of(cand: Candidate) -> str:
    """The onnxruntime kernel a candidate's layer runs on: "int8" (both widths <= 8 bits) or "float"."""
    return "int8" if not cand.is_float and cand.w_bits <= 8 and cand.a_bits <= 8 else "float"


def parse_time(text: str) -> float:
    """Milliseconds from ``"5ms"``, ``"800us"``, ``"0.01s"`` (a bare number is milliseconds)."""
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*(ms|us|µs|s|)", str(text).strip().lower())
    if not m:
        raise ConfigError(f"latency {text!r}: give a time such as 5ms, 800us or 0.01s, a percentage of the FP32 "
                          "model's latency (60%), or a uniform width (W8A8)")
    value = float(m.group(1)) * _TIME_UNITS[m.group(2) or "ms"]
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"latency {text!r}: give a positive time")
    return value


def _layer_inputs(model: nn.Module, names: list[str], example: Any) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The input of each named module of ``model`` on one forward pass of ``example``, and its output's size."""
    seen: dict[str, torch.Tensor] = {}
    out_sizes: dict[str, int] = {}
    hooks = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"layer {name!r} is not a module of the float model; measure latencies on the model "
                              "the sensitivity was measured on") from None

        def hook(_m: nn.Module, args: tuple, out: Any, name: str = name) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()
                out_sizes[name] = int(out.numel()) if isinstance(out, torch.Tensor) else int(args[0].numel())
        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            call_model(model.eval(), example)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise ConfigError(f"layers {missing[:3]} did not run (or took no tensor input) on the example batch; their "
                          "latency cannot be measured")
    return seen, out_sizes


class _Copy(nn.Module):
    """x -> x * 1: the cheapest graph with the layer's input (what a session call costs without the layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


def _int8_chain(path: Path, out: Path) -> tuple[float, int]:
    """The quantized one-layer model of ``path`` without its input QuantizeLinear and output DequantizeLinear
    (uint8 in, uint8 out: the layer as it runs between int8 neighbours), written to ``out``; returns the input's
    (scale, zero point)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    g = proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    (gin,), (gout,) = g.input, g.output
    q = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == gin.name)
    dq = next(n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] == gout.name)
    dtype = onnx.helper.np_dtype_to_tensor_dtype(inits[q.input[2]].dtype)
    shape_in = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in gin.type.tensor_type.shape.dim]
    shape_out = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in gout.type.tensor_type.shape.dim]
    g.node.remove(q)
    g.node.remove(dq)
    del g.input[:], g.output[:]
    g.input.append(onnx.helper.make_tensor_value_info(q.output[0], dtype, shape_in))
    g.output.append(onnx.helper.make_tensor_value_info(dq.input[0], dtype, shape_out))
    out.write_bytes(proto.SerializeToString())
    return float(inits[q.input[1]]), int(inits[q.input[2]])


def _sessions(module: nn.Module, x: torch.Tensor, folder: Path, tag: str,
              threads: int) -> tuple[dict[str, tuple[Any, np.ndarray]], int]:
    """onnxruntime sessions of ``module`` alone, each with its input: in float; quantized by onnxruntime at W8A8
    (uint8 input and output, so that it fuses an integer kernel), with the conversions at both ends ("int8_alone")
    and without ("int8": uint8 in and out); an identity on the float input (the cost of a call). And how many
    int8 compute kernels onnxruntime runs in the quantized model."""
    from bitalloc.runtime.onnx_export import export_float
    from bitalloc.runtime.ort import int8_compute_ops, make_session, optimized_op_counts, ort_static_quantize

    fp = folder / f"{tag}-float.onnx"
    fp.write_bytes(export_float(nn.Sequential(copy.deepcopy(module)).eval(), x).SerializeToString())
    ip = ort_static_quantize(fp, folder / f"{tag}-int8.onnx", [x], method="minmax")
    cp = folder / f"{tag}-call.onnx"
    cp.write_bytes(export_float(_Copy(), x).SerializeToString())
    chain = folder / f"{tag}-chain.onnx"
    scale, zero = _int8_chain(ip, chain)
    xf = x.numpy()
    xq = np.clip(np.round(xf / scale) + zero, 0, 255).astype(np.uint8)
    sessions = {k: (make_session(p, threads=threads), v) for k, p, v in
                (("float", fp, xf), ("int8_alone", ip, xf), ("int8", chain, xq), ("call", cp, xf))}
    return sessions, int8_compute_ops(optimized_op_counts(chain, threads=threads))


def layer_latencies(model: nn.Module, names: list[str], example: Any, *, threads: int = 2, runs: int = LAYER_RUNS,
                    min_seconds: float = LAYER_SECONDS,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Per named layer of the float ``model``: median float and int8 latency (ms) of the layer alone on the
    input it sees for ``example`` (module docstring), whether onnxruntime ran the int8 export on an integer
    kernel, and the whole float model's latency. Every model is exported and its session made first, then all
    are timed (:data:`SETTLE` seconds after the last PyTorch work, whose idle worker threads spin for a while and
    would slow the first runs). ``progress(1, 2 * len(names))`` after each layer exported, and each timed."""
    from bitalloc.runtime.onnx_export import export_float
    from bitalloc.runtime.ort import input_feed, interleaved_latency, make_session

    model = model.eval()
    t0 = time.perf_counter()
    inputs, out_sizes = _layer_inputs(model, names, example)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bitalloc-latency-") as tmp:
        folder = Path(tmp)
        whole = folder / "model.onnx"
        whole.write_bytes(export_float(model, example).SerializeToString())
        sess = make_session(whole, threads=threads)
        feed = input_feed([i.name for i in sess.get_inputs()], example)
        built = []
        for k, name in enumerate(names):
            built.append(_sessions(model.get_submodule(name), inputs[name], folder, f"layer{k}", threads))
            if progress is not None:
                progress(1, 2 * len(names))
        time.sleep(SETTLE)
        fp32_ms = interleaved_latency({"fp32": sess}, feed, runs=runs, min_seconds=max(min_seconds, 0.5))["fp32"]
        for name, (sessions, int8_ops) in zip(names, built):
            x = inputs[name]
            timed = interleaved_latency({k: sess for k, (sess, _) in sessions.items()}, x.numpy(), runs=runs,
                                        min_seconds=min_seconds, inputs={k: feed for k, (_, feed) in sessions.items()})
            lat = {k: v.median_ms for k, v in timed.items()}
            row = {"name": name, "input_shape": list(x.shape), "call_ms": lat["call"],
                   **{f"{key}_ms": max(lat[key] - lat["call"], 0.0) for key in ("float", "int8", "int8_alone")},
                   "int8_kernel": int8_ops > 0}
            # the two conversions (quantize the input, dequantize the output), split by the tensors' sizes
            both = max(row["int8_alone_ms"] - row["int8_ms"], 0.0)
            share = x.numel() / (x.numel() + out_sizes[name])
            row.update(convert_in_ms=both * share, convert_out_ms=both * (1 - share))
            rows.append(row)
            if progress is not None:
                progress(1, 2 * len(names))
    return {"threads": threads, "batch": int(batch_size(example)),
            "fp32_model_ms": fp32_ms.median_ms, "layers": rows, "seconds": time.perf_counter() - t0}


def add_latency(model: nn.Module, sens: Any, example: Any, *, threads: int = 2, runs: int = LAYER_RUNS,
                min_seconds: float = LAYER_SECONDS, progress: Callable[[int, int], None] | None = None) -> Any:
    """``sens`` (a :class:`~bitalloc.search.sensitivity.Sensitivity` of ``model``) with the latency cost table
    (``costs["latency_ms"]`` per layer and cost candidate, ``fixed["latency_ms"]``, ``latency``: the
    measurement), from :func:`layer_latencies` on ``example`` (one batch; its size is the batch the budget
    is for)."""
    info = layer_latencies(model, list(sens.layers), example, threads=threads, runs=runs, min_seconds=min_seconds,
                           progress=progress)
    table = np.zeros((len(sens.layers), len(sens.cost_candidates)))
    for i, row in enumerate(info["layers"]):
        for j, cand in enumerate(sens.cost_candidates):
            table[i, j] = row["int8_ms"] if kernel_of(cand) == "int8" else row["float_ms"]
    fixed = info["fp32_model_ms"] - sum(r["float_ms"] for r in info["layers"])
    return dataclasses.replace(sens, costs={**sens.costs, LATENCY_KEY: table}, fixed={**sens.fixed, LATENCY_KEY: fixed},
                               latency=info, seconds={**sens.seconds, "latency": info["seconds"]})


def chain_terms(sens: Any, candidates: list[Candidate]) -> tuple[list[list[int]], list[float], list[float]]:
    """The chain model's terms for ``candidates`` of each searched layer of ``sens``: kinds (1 = int8 kernel),
    and the costs of entering an int8 run at a layer (quantizing its input) and of leaving one after it
    (dequantizing its output). The layers form a chain in the order of the model's modules (module docstring)."""
    rows = (sens.latency or {}).get("layers", [])
    kinds = [[int(kernel_of(c) == "int8") for c in candidates] for _ in sens.layers]
    enter = [float(r.get("convert_in_ms", 0.0)) for r in rows]
    return kinds, enter, [float(r.get("convert_out_ms", 0.0)) for r in rows]


def chain_latency(sens: Any, choice: dict[str, Candidate]) -> float:
    """Predicted latency (ms) of ``choice`` (searched layer -> candidate): the rest of the network, each layer on
    its kernel, and the conversions where int8 runs begin and end."""
    from bitalloc.search.knapsack import chain_cost

    cands = list(sens.cost_candidates)
    kinds, enter, leave = chain_terms(sens, cands)
    idx = [cands.index(choice[n]) for n in sens.layers]
    return float(sens.fixed[LATENCY_KEY]) + chain_cost(sens.costs[LATENCY_KEY], kinds, enter, leave, idx)


def model_latency(model: nn.Module, qmodel: nn.Module, calibration: Iterable, example: Any, *, threads: int = 2,
                  runs: int = 20, min_seconds: float = 1.0) -> dict[str, Any]:
    """The float ``model`` and the quantized ``qmodel`` exported whole (bitalloc's QDQ export with onnxruntime's
    int8 points added, :func:`~bitalloc.runtime.align.align_for_ort`) and timed in turns on ``example``: medians in
    ms, and how many compute kernels of the quantized export onnxruntime runs in int8 and in float."""
    from bitalloc.runtime.align import align_for_ort
    from bitalloc.runtime.onnx_export import export_float, export_onnx
    from bitalloc.runtime.ort import (float_compute_ops, input_feed, int8_compute_ops, interleaved_latency,
                                      make_session, optimized_op_counts)

    calib = [batch_inputs(b) for b in calibration]
    with tempfile.TemporaryDirectory(prefix="bitalloc-latency-") as tmp:
        fp, qp = Path(tmp) / "float.onnx", Path(tmp) / "quantized.onnx"
        fp.write_bytes(export_float(model.eval(), example).SerializeToString())
        if quant_layers(qmodel):
            export_onnx(align_for_ort(qmodel, calib), example, qp, align="ort", calibration_data=calib,
                        threads=threads)
        else:  # every layer chose float
            qp.write_bytes(fp.read_bytes())
        counts = optimized_op_counts(qp, threads=threads)
        sessions = {"fp32": make_session(fp, threads=threads), "quantized": make_session(qp, threads=threads)}
        feed = input_feed([i.name for i in sessions["fp32"].get_inputs()], example)
        time.sleep(SETTLE)
        lat = interleaved_latency(sessions, feed, runs=runs, min_seconds=min_seconds)
    return {"fp32_ms": lat["fp32"].median_ms, "quantized_ms": lat["quantized"].median_ms,
            "int8_ops": int8_compute_ops(counts), "float_ops": float_compute_ops(counts), "threads": threads,
            "batch": int(batch_size(example))}


__all__ = ["LATENCY_KEY", "kernel_of", "parse_time", "layer_latencies", "add_latency", "model_latency", "chain_terms",
           "chain_latency"]
