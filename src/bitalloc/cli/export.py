"""``bitalloc export onnx``: quantize a model (or load a saved quantized model) and export it as ONNX QDQ.

Prints what was exported: every quantized layer with its weight and activation types (int8 / uint8 on the
8-bit grid, narrower grids clamped on it, float emulation above 8 bits), bias-correction handling, the
layers left in float with the reason, and, with ``--verify``, the agreement of onnxruntime's output with
bitalloc's fake-quant model on the evaluation set (top-1 agreement, largest logit difference) and how many
convolutions onnxruntime runs with int8 kernels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from bitalloc.cli.common import (add_data_args, add_model_args, add_quant_args, batches, build_config, load_model,
                                 load_splits)
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
    add_quant_args(o)
    o.add_argument("--out", required=True, help="the .onnx file to write (a JSON report is written next to it)")
    o.add_argument("--overwrite", action="store_true", help="replace existing output files")
    o.add_argument("--align", choices=("none", "ort"), default="none",
                   help="none: exactly bitalloc's quantization points; ort: add uint8 Q/DQ on conv outputs and "
                        "residual adds so onnxruntime runs every conv in int8 (extra rounding, reported)")
    o.add_argument("--bias-shift", choices=("exact", "requantize", "fold"), default="exact",
                   help="bias-correction shift: exact (float receptive-field sum), requantize (finer int8 weight "
                        "grid, approximate) or fold (into the bias with the calibration mean, approximate)")
    o.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 13; default 17)")
    o.add_argument("--threads", type=int, default=2, help="onnxruntime threads for calibration passes / --verify")
    o.add_argument("--verify", action="store_true", help="run the export in onnxruntime on the evaluation set and "
                                                         "compare with the fake-quant model")
    o.set_defaults(func=run)


def layer_rows(report: dict[str, Any]) -> list[list[Any]]:
    return [[l["name"], l["op"], l["weight"], l["w_bits"], l["act"], l["a_bits"], "yes" if l["narrow"] else "",
             l["bias_shift"], "yes" if l["int32_bias"] else "", "yes" if l["int8"] else ""] for l in report["layers"]]


def run(args: argparse.Namespace) -> int:
    from bitalloc import models
    from bitalloc.io import write_json
    from bitalloc.runtime.onnx_export import _require_onnx, export_onnx

    _require_onnx()
    out = Path(args.out)
    report_path = out.with_suffix(".json")
    if out.suffix != ".onnx":
        raise ConfigError(f"--out {out}: give a path ending in .onnx")
    for p in (out, report_path):
        if p.exists() and not args.overwrite:
            raise ConfigError(f"{p} exists; pass --overwrite or choose another --out")
    needs_data = args.verify or args.align == "ort" or args.bias_shift == "fold" or not args.quantized
    calib_b = eval_b = None
    if args.quantized:
        from bitalloc.model.serialize import load_quantized

        qmodel = load_quantized(args.quantized)
        name = getattr(qmodel, "bitalloc_model_name", None) or Path(args.quantized).stem
        dataset = args.dataset
        if needs_data and dataset is None:
            try:
                dataset = models.model_info(name).default_dataset
            except ConfigError:
                raise ConfigError("--quantized with --verify / --align ort / --bias-shift fold needs --dataset") from None
    else:
        model, name, ckpt_dataset = load_model(args)
        dataset = args.dataset or ckpt_dataset or models.model_info(name).default_dataset
    if needs_data:
        calib, evaluation = load_splits(dataset, args.data, args.calib, seed=args.seed, limit=args.limit,
                                        cache_dir=args.cache_dir)
        calib_b = batches(calib, min(args.batch_size, args.calib))
        eval_b = batches(evaluation, args.batch_size) if args.verify else None
    if not args.quantized:
        import bitalloc

        cfg = build_config(args)
        qmodel = bitalloc.quantize(model, cfg, calib_b)
    example = calib_b[0][0][:1] if calib_b else torch.zeros((1, *qmodel.bitalloc_example_shape))
    torch.set_num_threads(args.threads)
    _, report = export_onnx(qmodel, example, out, opset=args.opset, align=args.align, bias_shift=args.bias_shift,
                            calibration_data=calib_b, threads=args.threads)
    rep = report.to_dict()
    print_table(f"Exported {name} to {out}", ["layer", "op", "weight", "w bits", "activation", "a bits", "narrow",
                                               "bias shift", "int32 bias", "8-bit w+a"], layer_rows(rep))
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
