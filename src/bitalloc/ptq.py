"""Post-training quantization, end to end: prepare -> calibrate -> evaluate -> cost -> report.

``quantize(model, config, calibration_data)`` is the library entry point (a quantized ``nn.Module``);
``run_ptq`` adds accuracy, timing and cost and returns the JSON-ready report that ``bitalloc ptq`` writes.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from bitalloc.batches import batch_inputs, batch_size, call_model, cut_inputs, take_inputs
from bitalloc.calibration.calibrate import calibrate
from bitalloc.calibration.outliers import activation_outliers, check_activation_outliers, outlier_summary
from bitalloc.calibration.smooth import apply_smoothing
from bitalloc.config import QuantConfig
from bitalloc.cost import CostReport, cost_report
from bitalloc.errors import ConfigError, DataError
from bitalloc.model.layers import QuantLayer, call_counts, quant_layers
from bitalloc.model.prepare import demote_uncalled, prepare, prepare_info


def replayable(data: Iterable, num_samples: int) -> Iterable:
    """``data`` in a form that can be iterated more than once.

    PTQ reads the calibration data several times (an example batch for ``prepare``, the calibration pass, the
    FP32 timing pass, GPTQ). Re-iterable collections (lists, DataLoaders, datasets) are returned unchanged; a
    one-shot iterator or generator is read once, up to the batch that completes ``num_samples`` samples (an
    infinite stream is fine), and its batches are returned as a list. Nothing is lost or read twice."""
    if not isinstance(data, Iterator):
        return data
    batches, seen = [], 0
    for batch in data:
        batches.append(batch)
        seen += batch_size(batch_inputs(batch))
        if seen >= num_samples:
            break
    return batches


def _first_batch(data: Iterable) -> Any:
    """The inputs of the first batch of re-iterable ``data`` (see :func:`replayable`), cut to two samples."""
    for batch in data:
        return cut_inputs(batch_inputs(batch), 2)
    raise DataError("the calibration set is empty: give at least one calibration sample")


def _calibration_samples(config: QuantConfig, num_samples: int | None) -> int:
    n = config.calibration_samples if num_samples is None else num_samples
    try:
        n = operator.index(n)
    except TypeError:
        n = 0
    if n < 1:
        raise ConfigError(f"num_samples={num_samples!r}: give the number of calibration samples, an integer >= 1 "
                          f"(None: the configuration's calibration_samples, {config.calibration_samples})")
    return n


def _prepare_checked(model: nn.Module, config: QuantConfig, calibration_data: Iterable, n: int,
                     example_inputs: Any) -> tuple[nn.Module, dict[str, Any], list[Any]]:
    """prepare, SmoothQuant scales, the activation outlier check: (prepared model, smoothing, outlier reports)."""
    if example_inputs is None:
        example_inputs = _first_batch(calibration_data)
    qmodel = prepare(model, config, example_inputs)
    record_example(qmodel, example_inputs)
    smoothing = apply_smoothing(qmodel, calibration_data, n)  # SmoothQuant layers (LayerConfig.smooth), if any
    # static per-tensor activation grids on token sequences with outlier channels: refused unless allowed
    outliers = (check_activation_outliers if config.act_outliers == "refuse" else activation_outliers)(
        qmodel, calibration_data, n)
    return qmodel, smoothing, outliers


def check_config(model: nn.Module, config: QuantConfig, calibration_data: Iterable, *, example_inputs: Any = None,
                 num_samples: int | None = None) -> list[Any]:
    """What :func:`quantize` checks before calibrating, without calibrating: the configuration prepares the model,
    and the activation outlier check (:mod:`bitalloc.calibration.outliers`) passes or refuses it (ConfigError) on
    ``calibration_data``. Returns the outlier reports (worst first)."""
    n = _calibration_samples(config, num_samples)
    return _prepare_checked(model, config, replayable(calibration_data, n), n, example_inputs)[2]


def quantize(model: nn.Module, config: QuantConfig, calibration_data: Iterable, *, example_inputs: Any = None,
             num_samples: int | None = None, seed: int | None = None) -> nn.Module:
    """Prepare ``model`` with ``config`` and calibrate it on ``calibration_data`` (batches of (x, ...) or x).

    Returns the quantized model (an ordinary ``nn.Module`` in eval mode; the input model is unchanged).
    ``calibration_data`` may be any iterable, a one-shot generator or iterator included (see
    :func:`replayable`). ``num_samples`` defaults to ``config.calibration_samples`` (32). ``example_inputs``
    defaults to the first calibration batch (two samples of it); one sample of it is recorded on the model
    (:func:`record_example`), so that ``pack_model(qmodel, path)`` needs no ``example_shape``. Static per-tensor
    activation grids on token features with outlier channels are refused (ConfigError naming the layer and the
    fixes) unless ``config.act_outliers == "allow"`` (:mod:`bitalloc.calibration.outliers`).
    """
    n = _calibration_samples(config, num_samples)
    calibration_data = replayable(calibration_data, n)
    qmodel, smoothing, outliers = _prepare_checked(model, config, calibration_data, n, example_inputs)
    info = calibrate(qmodel, calibration_data, n, seed=config.seed if seed is None else seed)
    if smoothing:
        info["smoothing"] = smoothing
    if outliers:
        info["activation_outliers"] = outlier_summary(outliers)
    if any(getattr(l.weight_quantizer, "cfg", None) is not None and l.weight_quantizer.cfg.rounding == "gptq"
           for _, l in quant_layers(qmodel)):
        from bitalloc.calibration.gptq import apply_gptq

        start = time.perf_counter()
        rounded: dict[str, Any] = {}
        info["gptq_layers"] = apply_gptq(qmodel, calibration_data, n, report=rounded)
        info["gptq_damp"] = {name: r["damp"] for name, r in rounded.items()}
        info["gptq_asymmetric"] = [name for name, r in rounded.items() if r["asymmetric"]]
        info["calibration_seconds"] += time.perf_counter() - start
    qmodel.bitalloc_calibration = info
    return qmodel


def record_example(qmodel: nn.Module, example_inputs: Any) -> None:
    """Attach one sample of the model's inputs to ``qmodel``: ``bitalloc_example_inputs`` (a tensor, tuple or dict,
    batch of one) and, for a single tensor input, ``bitalloc_example_shape`` (without the batch dimension) and
    ``bitalloc_example_dtype`` (e.g. "int64" for token ids), which saving, packing and exporting read."""
    one = cut_inputs(example_inputs, 1)
    qmodel.bitalloc_example_inputs = one
    if isinstance(one, torch.Tensor):
        qmodel.bitalloc_example_shape = tuple(one.shape[1:])
        qmodel.bitalloc_example_dtype = str(one.dtype).removeprefix("torch.")


def bit_map(model: nn.Module) -> list[dict[str, Any]]:
    """Per layer: the bit width of every weight output channel and every input-activation channel."""
    out = []
    for name, layer in quant_layers(model):
        entry: dict[str, Any] = {"name": name}
        for key, q in (("w_bits_per_channel", layer.weight_quantizer), ("a_bits_per_channel", layer.input_quantizer)):
            entry[key] = [] if q is None else [int(b) if float(b).is_integer() else float(b) for b in q.bits_per_channel().tolist()]
        out.append(entry)
    return out


def layer_table(model: nn.Module, cost: CostReport) -> list[dict[str, Any]]:
    """The ``layers`` list of a report: one entry per weight-bearing layer, quantized or not."""
    info = prepare_info(model)
    records = {r.name: r for r in info.layers}
    bits = {e["name"]: e for e in bit_map(model)}
    rows = []
    for lc in cost.layers:
        rec = records.get(lc.name)
        row = {"name": lc.name, "type": lc.type, "quantized": lc.quantized, "w_bits": lc.w_bits, "a_bits": lc.a_bits,
               "macs": lc.macs, "bops": lc.bops, "relative_bops": lc.relative_bops, "bireal_ops": lc.bireal_ops,
               "kept_fraction": lc.kept_fraction, "params": lc.params,
               "memory_bits": lc.memory_bits}
        if lc.kind != "layer":  # a product of two activations or a softmax (bitalloc.cost)
            row.update({"kind": lc.kind, "status": "float", "reason": lc.note, "elements": lc.elements})
        if rec is not None:
            row.update({"status": rec.status, "reason": rec.reason, "rules": rec.rules, "weight_config": rec.weight,
                        "act_config": rec.act, "bias_correction": rec.bias_correction})
        if lc.name in bits:
            row.update({k: v for k, v in bits[lc.name].items() if k != "name"})
        rows.append(row)
    return rows


def cost_summary(cost: CostReport) -> dict[str, Any]:
    return {"macs": cost.macs, "bops": cost.bops, "relative_bops": cost.relative_bops, "bireal_ops": cost.bireal_ops,
            "float_macs": cost.float_macs, "memory_bits": cost.memory_bits, "fp32_memory_bits": cost.fp32_memory_bits,
            "overhead_bits": cost.overhead_bits, "compression": cost.fp32_memory_bits / cost.memory_bits if cost.memory_bits else None}


@dataclass
class PTQResult:
    model: nn.Module
    report: dict[str, Any]


def run_ptq(model: nn.Module, config: QuantConfig, calibration_data: Iterable, evaluate_fn: Any, *,
            fp32_top1: float | None = None, fp32_eval_seconds: float | None = None,
            fp32_calib_seconds: float | None = None, name: str = "") -> PTQResult:
    """Quantize, evaluate and cost ``model``.

    ``evaluate_fn(model) -> (top1 %, seconds)`` evaluates a model on the evaluation set. The FP32 numbers
    are measured here unless given (pass them when comparing many configurations of one model).
    ``fp32_calib_seconds`` is the time of one FP32 pass over the calibration images (for the calibration
    time ratio); measured here when None.
    """
    calibration_data = replayable(calibration_data, config.calibration_samples)
    example = _first_batch(calibration_data)
    model = model.eval()
    if fp32_top1 is None or fp32_eval_seconds is None:
        fp32_top1, fp32_eval_seconds = evaluate_fn(model)
    if fp32_calib_seconds is None:
        fp32_calib_seconds = fp32_pass_seconds(model, calibration_data, config.calibration_samples)
    qmodel = quantize(model, config, calibration_data, example_inputs=example)
    before = call_counts(qmodel)
    top1, eval_seconds = evaluate_fn(qmodel)
    if call_counts(qmodel) != before:  # report as float what did not run in the evaluation measured
        demote_uncalled(qmodel, before, "evaluation")
    cost = cost_report(qmodel, cut_inputs(example, 1))
    info = prepare_info(qmodel)
    calib = qmodel.bitalloc_calibration
    report = {
        "name": name,
        "fp32_top1": fp32_top1,
        "top1": top1,
        "top1_drop": fp32_top1 - top1,
        **cost_summary(cost),
        "layers": layer_table(qmodel, cost),
        "float_layers": [{"name": r.name, "type": r.type, "reason": r.reason} for r in info.floating()],
        "folded_batchnorms": [{"batchnorm": d.batchnorm, "into": d.layer} for d in info.folds if d.folded],
        "rewritten": [{"name": r.name, "type": r.type, "what": r.reason} for r in info.rewritten()],
        "timing": {
            "calibration_samples": calib["calibration_samples"],
            "calibration_seconds": calib["calibration_seconds"],
            "fp32_calibration_pass_seconds": fp32_calib_seconds,
            "calibration_ratio": calib["calibration_seconds"] / fp32_calib_seconds if fp32_calib_seconds else None,
            "fp32_eval_seconds": fp32_eval_seconds,
            "eval_seconds": eval_seconds,
            "eval_ratio": eval_seconds / fp32_eval_seconds if fp32_eval_seconds else None,
        },
        "config": config.to_dict(),
        # the decisions calibration made from the data: clipping checked per tensor, SmoothQuant scales, the
        # activation outlier ratios, GPTQ's damping per layer (bitalloc.calibration.clip_check / smooth / outliers /
        # gptq)
        "calibration": {key: calib[key] for key in ("clip_checks", "smoothing", "activation_outliers", "gptq_damp",
                                                       "gptq_asymmetric")
                        if calib.get(key)},
    }
    return PTQResult(qmodel, report)


@torch.no_grad()
def fp32_pass_seconds(model: nn.Module, data: Iterable, num_samples: int) -> float:
    """Seconds of one FP32 forward pass over the first ``num_samples`` inputs of ``data``."""
    start = time.perf_counter()
    for x in take_inputs(data, num_samples):
        call_model(model, x)
    return time.perf_counter() - start


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLayer) for m in model.modules())
