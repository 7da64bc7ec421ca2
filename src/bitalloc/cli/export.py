"""``bitalloc export onnx``: quantize a model (or load a saved quantized model) and export it as ONNX QDQ.

Prints what was exported: every quantized layer with its weight and activation types (int8 / uint8 on the
8-bit grid, narrower grids clamped on it, float emulation above 8 bits), bias-correction handling, the
registers of its integer stages (int16 products / int32 sums, or the widened ones when they could overflow
at its bits and fan-in), the layers left in float with the reason, and, with ``--verify``, the agreement of
onnxruntime's output with bitalloc's fake-quant model on the evaluation set (top-1 agreement, largest logit
difference) and how many convolutions onnxruntime runs with int8 kernels. ``--integer-check N`` runs
bitalloc's integer-exact execution on N calibration images and reports max |integer - fake quant| per layer.

Defaults: the int8 deployment recipe for onnxruntime, ``--preset percentile --w-bits 8 --a-bits 8 --align model``
(per-channel int8 weights, per-tensor uint8 activations clipped at the 99.99th percentile, onnxruntime's int8
quantization points in the model: every convolution runs in int8, and on EfficientNet-Lite0 the export is at
least as accurate as onnxruntime's own static quantization, agrees with the bitalloc model on > 99% of the
top-1 predictions and runs with the same int8 kernels; see BENCHMARKS.md). Narrower widths export on the int8
grid (``--w-bits 4 --a-bits 4``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from bitalloc.cli.common import (add_data_args, add_model_args, add_quant_args, batches, build_config,
                                 check_quantized_source, load_model, load_splits)
from bitalloc.cli.model_args import add_input_args, example_of, model_data
from bitalloc.errors import ConfigError
from bitalloc.report.tables import print_table


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="export a quantized model: `bitalloc export onnx`",
                       description="Export a quantized model for deployment.")
    inner = p.add_subparsers(dest="export_format", metavar="FORMAT")
    inner.required = True
    o = inner.add_parser("onnx", help="ONNX QDQ (QuantizeLinear / DequantizeLinear) for onnxruntime and others",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(o)
    o.add_argument("--quantized", help="a quantized model saved by `bitalloc ptq --save-model` (no re-calibration)")
    add_data_args(o)
    add_input_args(o)
    add_quant_args(o)
    o.set_defaults(preset="percentile", w_bits=8, a_bits=8.0)  # the int8 deployment recipe (see the docstring)
    for opt, old, new in (("--preset", "default aciq", "default here: percentile"), ("--w-bits", "default 4", "default here: 8"),
                          ("--a-bits", "default 4", "default here: 8")):
        action = o._option_string_actions.get(opt)
        if action is not None and action.help:
            action.help = action.help.replace(old, new)
    o.add_argument("--out", required=True, help="the .onnx file to write (a JSON report is written next to it)")
    o.add_argument("--overwrite", action="store_true", help="replace existing output files")
    o.add_argument("--align", choices=("none", "ort", "model"), default="model",
                   help="model (default): add onnxruntime's int8 quantization points (uint8 Q/DQ on conv outputs and "
                        "residual adds, int32-grid biases) to the bitalloc model, then export it, so every conv runs "
                        "in int8 and the export computes what the model computes; ort: add the same Q/DQ to the "
                        "ONNX file only (extra rounding, not in the model); none: exactly bitalloc's quantization "
                        "points (convolutions feeding additions / pooling stay float)")
    o.add_argument("--bias-shift", choices=("exact", "requantize", "fold"), default="exact",
                   help="bias-correction shift: exact (float receptive-field sum), requantize (finer int8 weight "
                        "grid, approximate) or fold (into the bias with the calibration mean, approximate)")
    o.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 13; default 17)")
    o.add_argument("--threads", type=int, default=2, help="onnxruntime threads for calibration passes / --verify")
    o.add_argument("--verify", action="store_true", help="run the export in onnxruntime on the evaluation set and "
                                                         "compare with the fake-quant model")
    o.add_argument("--integer-check", type=int, nargs="?", const=4, default=None, metavar="N",
                   help="run bitalloc's integer-exact execution on N calibration images (default 4) and report, per "
                        "layer, max |integer - fake quant| and the product / accumulator registers used")
    o.add_argument("--on-overflow", choices=("widen", "raise"), default="widen",
                   help="when a layer's int16 products or int32 sums could overflow at its bits and fan-in: widen "
                        "the register (reported) or stop with an error (default widen)")
    o.set_defaults(func=run)


def layer_rows(report: dict[str, Any]) -> list[list[Any]]:
    acc = {a["layer"]: a for a in report.get("accumulators", [])}
    rows = []
    for l in report["layers"]:
        a = acc.get(l["name"])
        regs = f"{a['product']} / {a['accumulator']}" if a else "-"
        rows.append([l["name"], l["op"], l["weight"], l["w_bits"], l["act"], l["a_bits"], "yes" if l["narrow"] else "",
                     l["bias_shift"], "yes" if l["int32_bias"] else "", "yes" if l["int8"] else "", regs])
    return rows


def accumulator_analysis(qmodel: Any, on_overflow: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Per integer-executable layer: the product-stage / accumulator analysis (runtime/overflow.py); and the
    layers that are not integer-executable, with the reason. Raises AccumulatorOverflowError with
    ``on_overflow="raise"`` when a stage could overflow."""
    from bitalloc.model.layers import quant_layers
    from bitalloc.runtime.integer import IntegerExecutionError, analyze_layer

    out, skipped = [], {}
    for name, layer in quant_layers(qmodel):
        try:
            an = analyze_layer(layer, on_overflow=on_overflow)
        except IntegerExecutionError as exc:
            skipped[name] = str(exc)
            continue
        d = an.to_dict()
        d["layer"] = name
        out.append(d)
    return out, skipped


def accumulator_summary(acc: list[dict[str, Any]]) -> str:
    widened = [a["layer"] for a in acc if a["product_widened"]]
    wide_acc = [a["layer"] for a in acc if a["accumulator"] != "int32"]
    eight = sum(1 for a in acc if a["product_fits_int8"])
    text = (f"integer stages of {len(acc)} layers: products in int16 registers for {len(acc) - len(widened)} "
            f"({eight} of them 8-bit products), sums in int32 for {len(acc) - len(wide_acc)}")
    if widened:
        text += f"; products widened (int16 could overflow): {', '.join(widened)}"
    if wide_acc:
        text += f"; int64 sums (int32 could overflow): {', '.join(wide_acc)}"
    return text


def run(args: argparse.Namespace) -> int:
    from bitalloc import models
    from bitalloc.io import write_json
    from bitalloc.runtime.onnx_export import _require_onnx, export_onnx

    _require_onnx()
    check_quantized_source(args)
    out = Path(args.out)
    report_path = out.with_suffix(".json")
    if out.suffix != ".onnx":
        raise ConfigError(f"--out {out}: give a path ending in .onnx")
    for p in (out, report_path):
        if p.exists() and not args.overwrite:
            raise ConfigError(f"{p} exists; pass --overwrite or choose another --out")
    if args.integer_check is not None and args.integer_check < 1:
        raise ConfigError(f"--integer-check {args.integer_check}: give a positive number of images")
    reasons = [r for r, on in (("quantizing a float model", not args.quantized), ("--verify", args.verify),
                               (f"--align {args.align}", args.align != "none"), ("--bias-shift fold", args.bias_shift == "fold"),
                               ("--integer-check", args.integer_check is not None)) if on]
    needs_data = bool(reasons)
    if needs_data and args.data is None and not os.environ.get("BITALLOC_DATA") and not args.inputs:
        hint = " (--align model is the default: pass --align none to export the model's own quantization points " \
               "without data)" if args.align == "model" else ""
        raise ConfigError(f"{' / '.join(reasons)} need(s) calibration data: give --data PATH (or set BITALLOC_DATA), "
                          "or --inputs FILE (a tensor file of model inputs)" + hint)
    calib_b = eval_b = None
    if args.quantized:
        from bitalloc.model.serialize import load_quantized

        qmodel = load_quantized(args.quantized)
        name = getattr(qmodel, "bitalloc_model_name", None) or Path(args.quantized).stem
        dataset = args.dataset
        if needs_data and dataset is None and not args.inputs:
            try:
                dataset = models.model_info(name).default_dataset
            except ConfigError:
                raise ConfigError(f"--quantized {args.quantized}: {' / '.join(reasons)} need(s) --dataset (the saved "
                                  f"model {name!r} is not a zoo model with a default dataset)") from None
    else:
        model, name, ckpt_dataset = load_model(args)
    if needs_data and args.quantized and not args.inputs:
        calib, evaluation = load_splits(dataset, args.data, args.calib, seed=args.seed, limit=args.limit,
                                        cache_dir=args.cache_dir)
        calib_b = batches(calib, min(args.batch_size, args.calib))
        eval_b = batches(evaluation, args.batch_size) if args.verify else None
    elif needs_data:
        data = model_data(args, None if args.quantized else model, name, None if args.quantized else ckpt_dataset,
                          need_eval=args.verify)
        dataset, calib_b = data.dataset, data.calib
        eval_b = data.eval_batches() if args.verify else None
    if not args.quantized:
        import bitalloc

        cfg = build_config(args)
        qmodel = bitalloc.quantize(model, cfg, calib_b)
    if calib_b:
        example = example_of(calib_b[0])
    else:
        from bitalloc.model.serialize import example_input

        example = example_input(qmodel.bitalloc_example_shape, getattr(qmodel, "bitalloc_example_dtype", None))
    torch.set_num_threads(args.threads)
    alignment = None
    if args.align == "model":
        from bitalloc.runtime.align import align_for_ort

        # --bias-shift requantize: the finer-grid int8 weights become part of the aligned model
        qmodel = align_for_ort(qmodel, calib_b, bias_shift="requantize" if args.bias_shift == "requantize" else "exact")
        alignment = qmodel.bitalloc_ort_alignment
    # the integer stages first: with --on-overflow raise, a layer that could overflow stops before any file is written
    accumulators, not_integer = accumulator_analysis(qmodel, args.on_overflow)
    check = None
    if args.integer_check is not None:
        from bitalloc.runtime.integer import integer_check

        check = integer_check(qmodel, calib_b, on_overflow=args.on_overflow, samples=args.integer_check)
    _, report = export_onnx(qmodel, example, out, opset=args.opset, align="none" if args.align == "none" else "ort",
                            bias_shift=args.bias_shift, calibration_data=calib_b, threads=args.threads)
    rep = report.to_dict()
    rep["accumulators"] = accumulators
    rep["not_integer_executable"] = not_integer
    print_table(f"Exported {name} to {out}", ["layer", "op", "weight", "w bits", "activation", "a bits", "narrow",
                                               "bias shift", "int32 bias", "8-bit w+a", "products / sums"],
                layer_rows(rep))
    if rep["float_layers"]:
        print_table("Left in float", ["layer", "type", "reason"],
                    [[f["name"], f["type"], f["reason"]] for f in rep["float_layers"]])
    n = len(rep["layers"])
    narrow = sum(1 for l in rep["layers"] if l["narrow"])
    shifts = sum(1 for l in rep["layers"] if l["bias_shift"] not in ("none",))
    print(f"{n} quantized layers: {rep['int8_layers']} with 8-bit integer weights and activations "
          f"({narrow} of them on a narrower grid clamped on the 8-bit one), {n - rep['int8_layers']} other; "
          f"{shifts} bias-correction shifts ({args.bias_shift}); {len(rep['float_layers'])} layers left in float.")
    for note in rep["notes"]:
        print(f"note: {note}")
    rep["align"] = args.align
    if alignment is not None:
        rep["model_alignment"] = alignment.to_dict()
        widened = sum(alignment.widened_weight_steps.values())
        print(f"aligned model: {len(alignment.points)} tensor quantizers (uint8 Q/DQ on "
              f"{sum(1 for p in alignment.points if p.shares is None)} new min-max grids, the others on the next "
              f"layer's input grid), {len(alignment.int32_biases)} biases on onnxruntime's int32 grid (max change "
              f"{alignment.max_bias_change:.3g}), {widened} weight channels with steps enlarged so their bias fits "
              f"int32; {len(alignment.requantized_shifts)} bias-correction shifts requantized into the model; "
              f"{len(rep['extra_qdq'])} export-only points"
              + (f"; not aligned: {'; '.join(alignment.unsupported)}" if alignment.unsupported else "") + ".")
    print(accumulator_summary(accumulators) + (f"; {len(not_integer)} layers not integer-executable" if not_integer
                                               else "") + ".")
    if check is not None:
        from bitalloc.runtime.overflow import signed_bits

        rep["integer_check"] = check.to_dict()
        print_table(f"Integer execution on {check.samples} calibration images (against the fake-quant model)",
                    ["layer", "fan-in", "max |product| (bits)", "products", "worst |sum| (bits)", "sums",
                     "max |int - fake quant|", "/ float32 bound"],
                    [[l.layer, l.analysis.fan_in, f"{l.analysis.worst_product} ({signed_bits(l.analysis.worst_product)})",
                      l.analysis.product, f"{l.analysis.bound} ({signed_bits(l.analysis.bound)})",
                      l.analysis.accumulator, l.max_abs_diff, l.max_bound_ratio] for l in check.layers])
        print(f"whole model in integer mode: max |output - fake quant| {check.output_max_abs_diff:.3g} (outputs up to "
              f"{check.output_max_abs:.3g}), top-1 agreement {check.top1_agreement:.1f}%; every layer within its "
              f"float32 rounding bound: {'yes' if check.within_bound else 'NO'}"
              + (f"; fake quant (not integer-executable): {', '.join(check.fake_quant_layers)}"
                 if check.fake_quant_layers else ""))
    if args.verify:
        from bitalloc.runtime.ort import compare_with_model, int8_compute_ops, optimized_op_counts

        ag = compare_with_model(qmodel, out, eval_b, threads=args.threads)
        counts = optimized_op_counts(out, threads=args.threads)
        rep["verify"] = {**ag.to_dict(), "onnxruntime_ops": counts, "int8_ops": int8_compute_ops(counts)}
        print_table("Verification (onnxruntime vs bitalloc fake quantization)",
                    ["samples", "top-1 agreement %", "max |diff|", "mean |diff|", "bitalloc top-1 %",
                     "onnxruntime top-1 %", "int8 convs / matmuls"],
                    [[ag.samples, ag.top1_agreement, ag.max_abs_error, ag.mean_abs_error, ag.top1_a, ag.top1_b,
                      int8_compute_ops(counts)]])
    rep.update(model=name, dataset=dataset, command="bitalloc " + " ".join(sys.argv[1:]))
    write_json(report_path, rep)
    print(f"model: {out}\nreport: {report_path}", file=sys.stderr)
    return 0
