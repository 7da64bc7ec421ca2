"""Running quantized models for real: integer-exact reference execution, accumulator-width analysis, ONNX QDQ
export and onnxruntime (sessions, latency, its own static quantization as the anchor).

    from bitalloc.runtime import (align_for_ort, analyze_layer, export_onnx, integer_check, integer_forward,
                                  integer_mode)

    out, results = integer_forward(qmodel.conv1, x)     # one layer from integer codes (int32 / int64 sums)
    with integer_mode(qmodel) as run:                    # every integer-executable layer of a model
        y = qmodel(x)
    check = integer_check(qmodel, [x])                   # per layer: max |integer - fake quant|, widths
    proto, report = export_onnx(qmodel, x[:1], "model.onnx")   # QDQ, int8 weights, uint8 activations
    deploy = align_for_ort(qmodel, calib)                # onnxruntime's int8 points in (a copy of) the model
    proto, report = export_onnx(deploy, x[:1], "model.onnx", align="ort", calibration_data=calib)

The ONNX parts import ``onnx`` / ``onnxruntime`` lazily (``pip install 'bitalloc[onnx]'``).
"""

from bitalloc.runtime.integer import (IntegerCheck, IntegerExecutionError, IntegerResult, IntegerRun, LayerCheck,
                                      StepGroups, analyze_layer, fake_quant_codes, integer_check, integer_forward,
                                      integer_mode, layer_ints, step_groups)
from bitalloc.runtime.align import AlignReport, TensorQuant, align_for_ort, tensor_points
from bitalloc.runtime.overflow import (AccumulatorAnalysis, AccumulatorOverflowError, analyze, exact_weight_bound,
                                       grid_accumulator_bound, signed_bits)


def __getattr__(name: str):  # lazy: the ONNX side needs optional packages
    if name in ("export_onnx", "export_float", "ExportReport", "LayerExport"):
        from bitalloc.runtime import onnx_export

        return getattr(onnx_export, name)
    if name in ("make_session", "measure_latency", "interleaved_latency", "ort_static_quantize", "compare_with_model",
                "optimized_op_counts", "Agreement", "Latency"):
        from bitalloc.runtime import ort

        return getattr(ort, name)
    raise AttributeError(f"module 'bitalloc.runtime' has no attribute {name!r}")


__all__ = [
    "AlignReport", "TensorQuant", "align_for_ort", "tensor_points",
    "AccumulatorAnalysis", "AccumulatorOverflowError", "IntegerCheck", "IntegerExecutionError", "IntegerResult",
    "IntegerRun", "LayerCheck", "integer_check",
    "StepGroups", "analyze", "analyze_layer", "exact_weight_bound", "fake_quant_codes", "grid_accumulator_bound",
    "integer_forward", "integer_mode", "layer_ints", "signed_bits", "step_groups",
    "export_onnx", "export_float", "ExportReport", "LayerExport", "make_session", "measure_latency",
    "interleaved_latency", "ort_static_quantize", "compare_with_model", "optimized_op_counts", "Agreement", "Latency",
]
