"""onnxruntime helpers: sessions, accuracy / agreement checks, latency, and onnxruntime's own static
quantization (the anchor bitalloc's export is compared with).

Latency protocol (:func:`measure_latency`): a fixed input batch, ``warmup`` untimed runs, then ``runs`` timed
runs of ``session.run``; the median (and the 10th / 90th percentiles) of the wall-clock times in milliseconds.
Sessions use the CPU execution provider, ``intra_op_num_threads = threads`` (default 2), one inter-op thread,
sequential execution and all graph optimizations. On a shared machine, compare models as ratios measured
in one run (:func:`interleaved_latency` alternates models in short turns so that background load hits all
alike).
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from bitalloc.batches import batch_inputs, call_model
from bitalloc.errors import ConfigError


def _require_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("this needs onnxruntime: pip install 'bitalloc[onnx]'") from None
    return onnxruntime


def make_session(model: str | Path | bytes, *, threads: int = 2, optimized_path: str | Path | None = None,
                 level: str = "all") -> Any:
    """An onnxruntime CPU InferenceSession (``level``: "all", "extended", "basic" or "none").

    ``optimized_path`` writes the graph onnxruntime actually runs (after its fusions) to that file.
    """
    ort = _require_ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    src = model if isinstance(model, (bytes, bytearray)) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def optimized_op_counts(model: str | Path | bytes, *, threads: int = 2, tmp_dir: str | Path | None = None) -> dict[str, int]:
    """Operator counts of the graph onnxruntime runs after its optimizations (QLinearConv = int8 convolution)."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(dir=tmp_dir) as d:
        out = Path(d) / "optimized.onnx"
        make_session(model, threads=threads, optimized_path=out)
        g = onnx.load(str(out)).graph
    return dict(collections.Counter(n.op_type for n in g.node).most_common())


INT8_OPS = ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat",
            "DynamicQuantizeMatMul")


def int8_compute_ops(counts: dict[str, int]) -> int:
    """Number of convolutions / matrix products onnxruntime runs with integer kernels."""
    return sum(v for k, v in counts.items() if k in INT8_OPS)


def float_compute_ops(counts: dict[str, int]) -> int:
    return sum(v for k, v in counts.items() if k in ("Conv", "FusedConv", "Gemm", "MatMul", "FusedGemm", "FusedMatMul"))


# ---- running ---------------------------------------------------------------------------------------------------

def _array(t: Any) -> np.ndarray:
    """A model input as onnxruntime takes it: float tensors as float32, integer / bool tensors keep their dtype."""
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return np.ascontiguousarray(a if a.dtype.kind in "iub" else a.astype(np.float32))


def input_feed(names: Sequence[str], inputs: Any) -> dict[str, np.ndarray]:
    """The onnxruntime feed of one batch's model inputs (:mod:`bitalloc.batches`) for a graph whose inputs are
    ``names``: a tensor feeds the first input; a tuple / list the inputs in order; a dict by name (entries the
    exported graph does not use are left out). Float tensors are fed as float32, integer tensors (token ids)
    keep their dtype."""
    if isinstance(inputs, dict):
        return {k: _array(v) for k, v in inputs.items() if k in names}
    xs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    return {n: _array(t) for n, t in zip(names, xs)}


def run_session(session: Any, data: Iterable, *, input_name: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits of ``session`` on every batch of ``data`` ((x, y) batches or inputs) and the labels (or None)."""
    names = [input_name] if input_name else [i.name for i in session.get_inputs()]
    outs, labels = [], []
    for batch in data:
        outs.append(session.run(None, input_feed(names, batch_inputs(batch)))[0])
        if isinstance(batch, (list, tuple)) and len(batch) > 1 and batch[1] is not None:
            labels.append(np.asarray(batch[1]))
    return np.concatenate(outs), (np.concatenate(labels) if labels else None)


@torch.no_grad()
def run_torch(model: nn.Module, data: Iterable) -> tuple[np.ndarray, np.ndarray | None]:
    """The same for a torch model (eval mode)."""
    model.eval()
    outs, labels = [], []
    for batch in data:
        out = call_model(model, batch_inputs(batch))
        outs.append((out if isinstance(out, torch.Tensor) else _first_tensor(out)).float().numpy())
        if isinstance(batch, (list, tuple)) and len(batch) > 1 and batch[1] is not None:
            labels.append(np.asarray(batch[1]))
    return np.concatenate(outs), (np.concatenate(labels) if labels else None)


def _first_tensor(out: Any) -> torch.Tensor:
    """The first tensor of a model output that is a tuple, list or dict (e.g. a Hugging Face ModelOutput)."""
    from bitalloc.model.trace import _flatten_tensors

    found = _flatten_tensors(out, [])
    if not found:
        raise ConfigError(f"the model returned {type(out).__name__} without a tensor; it must return its outputs")
    return found[0]


def _feed_of(session: Any, x: Any) -> dict[str, np.ndarray]:
    """A feed for ``session``: ``x`` an array (its first input), or a dict already keyed by input name."""
    return x if isinstance(x, dict) else input_feed([i.name for i in session.get_inputs()], x)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float((logits.argmax(-1) == labels).mean())


@dataclass
class Agreement:
    """How closely two models' outputs match on a data set."""

    samples: int
    top1_agreement: float  # % of samples with the same arg-max
    max_abs_error: float
    mean_abs_error: float
    max_abs_output: float
    top1_a: float | None = None
    top1_b: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def agreement(a: np.ndarray, b: np.ndarray, labels: np.ndarray | None = None) -> Agreement:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return Agreement(samples=int(a.shape[0]), top1_agreement=100.0 * float((a.argmax(-1) == b.argmax(-1)).mean()),
                     max_abs_error=float(d.max()), mean_abs_error=float(d.mean()), max_abs_output=float(np.abs(a).max()),
                     top1_a=top1(a, labels) if labels is not None else None,
                     top1_b=top1(b, labels) if labels is not None else None)


def compare_with_model(model: nn.Module, onnx_model: str | Path | bytes, data: Iterable, *, threads: int = 2) -> Agreement:
    """Agreement of the torch model (``top1_a``) and the ONNX model in onnxruntime (``top1_b``) on ``data``."""
    data = list(data)
    ref, labels = run_torch(model, data)
    got, _ = run_session(make_session(onnx_model, threads=threads), data)
    return agreement(ref, got, labels)


# ---- latency ---------------------------------------------------------------------------------------------------

@dataclass
class Latency:
    batch: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _stats(batch: int, times: Sequence[float]) -> Latency:
    t = np.asarray(times) * 1000.0
    return Latency(batch, float(np.median(t)), float(np.percentile(t, 10)), float(np.percentile(t, 90)), len(t))


def _feed_batch(x: Any) -> int:
    return int(next(iter(x.values())).shape[0]) if isinstance(x, dict) else int(x.shape[0])


def measure_latency(session: Any, x: Any, *, runs: int = 20, warmup: int = 3) -> Latency:
    """Median wall-clock latency of ``session.run`` on the batch ``x`` (an array, or a feed dict keyed by input
    name; see module docstring)."""
    feed = _feed_of(session, x)
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return _stats(_feed_batch(x), times)


def interleaved_latency(sessions: dict[str, Any], x: Any, *, runs: int = 20, warmup: int = 3,
                        block: int = 5, pause: float = 0.1, min_seconds: float = 1.0,
                        turn_seconds: float = 0.05, inputs: dict[str, Any] | None = None) -> dict[str, Latency]:
    """Latency of several sessions on the same batch, measured in turns (fair under background load).
    ``inputs``: a batch per session (by key) for sessions that take other inputs than ``x`` (e.g. uint8 codes).

    Each turn of a session starts with a pause of ``pause`` seconds and one untimed run, then ``block``
    timed runs; turns repeat until each session has at least ``runs`` timed runs and ``min_seconds`` of timed
    runs (sub-millisecond models get hundreds of runs, whose median is stable; once a session has ``runs``
    runs, its further turns last about ``turn_seconds``). Returns the median / percentiles per session
    (``Latency.runs``: how many runs).

    The pause matters: onnxruntime's intra-op worker threads keep spinning for a while after a run, and
    without it the previous session's spinning threads compete with the next session's (measured on
    EfficientNet-Lite0, 2 threads, batch 1: FP32 12.3 ms and static int8 6.9 ms interleaved without a pause,
    4.9 ms and 2.2 ms with a 50 ms pause, 7.7 ms and 2.8 ms timed one model at a time).
    """
    feeds = {k: _feed_of(s, (inputs or {}).get(k, x)) for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}

    def short(v: list[float]) -> bool:
        return len(v) < runs or sum(v) < min_seconds

    while any(short(v) for v in times.values()):
        for k, s in sessions.items():
            v = times[k]
            if not short(v):
                continue
            if len(v) < runs:
                n = min(block, runs - len(v))
            else:  # topping up to min_seconds: turns of about turn_seconds, so that pauses stay few
                n = max(block, min(10_000, math.ceil(turn_seconds / max(float(np.median(v)), 1e-7))))
            if pause > 0:
                time.sleep(pause)
            s.run(None, feeds[k])
            for _ in range(n):
                t = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append(time.perf_counter() - t)
    return {k: _stats(_feed_batch(x), v) for k, v in times.items()}


# ---- onnxruntime's own static quantization (the anchor) ------------------------------------------------------------

def ort_static_quantize(fp32_model: str | Path, out_path: str | Path, calibration: Iterable, *,
                        method: str = "minmax", per_channel: bool = True, activation_type: str = "uint8",
                        weight_type: str = "int8", preprocess: bool = True,
                        entropy_bins: tuple[int, int] | None = (2048, 128)) -> Path:
    """onnxruntime's ``quantize_static`` (QDQ format) of an FP32 ONNX model, calibrated on ``calibration``.

    ``method``: "minmax", "entropy" or "percentile"; the calibration samples are fed one image at a time
    (a CalibrationDataReader over them). ``preprocess`` runs ``quant_pre_process`` first (shape inference
    and onnxruntime's basic graph optimizations, as its documentation recommends).

    ``entropy_bins`` = (histogram bins, quantized bins) of the entropy (KL) calibration. onnxruntime's
    defaults are (128, 128), with which the KL search has a single candidate threshold, the whole range, so
    "entropy" returns exactly the MinMax ranges (checked on EfficientNet-Lite0: identical scales). The
    default here is TensorRT's (2048, 128); the ranges are computed with onnxruntime's EntropyCalibrater and
    handed to ``quantize_static`` through its calibration cache. ``None``: onnxruntime's defaults.
    """
    _require_ort()
    import tempfile

    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    if method not in methods:
        raise ConfigError(f"unknown calibration method {method!r}; choose one of {sorted(methods)}")
    import onnx

    names = [i.name for i in onnx.load(str(fp32_model), load_external_data=False).graph.input]
    samples = []
    for batch in calibration:
        feed = input_feed(names, batch_inputs(batch))
        n = next(iter(feed.values())).shape[0]
        samples += [{k: v[i:i + 1] for k, v in feed.items()} for i in range(n)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as d:
        src = str(fp32_model)
        if preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = str(Path(d) / "pre.onnx")
            quant_pre_process(src, pre)
            src = pre
        cache = None
        if method == "entropy" and entropy_bins is not None:
            from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

            calibrator = create_calibrator(Path(src), None, augmented_model_path=str(Path(d) / "augmented.onnx"),
                                           calibrate_method=CalibrationMethod.Entropy,
                                           extra_options={"num_bins": int(entropy_bins[0]),
                                                          "num_quantized_bins": int(entropy_bins[1])})
            calibrator.collect_data(Reader())
            cache = Path(d) / "ranges.json"
            save_tensors_data(calibrator.compute_data(), cache)
        quantize_static(src, str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=types[activation_type], weight_type=types[weight_type],
                        calibrate_method=methods[method], calibration_cache_path=cache)
    return Path(out_path)
