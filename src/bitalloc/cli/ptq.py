"""``bitalloc ptq``: post-training quantization of a model, with accuracy, cost and a per-channel bit map."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bitalloc.cli.common import (add_data_args, add_model_args, add_quant_args, build_config, config_label,
                                 config_sources, load_model, output_dir)
from bitalloc.cli.model_args import add_input_args, model_data
from bitalloc.cli.sensitivity import add_search_args, finish_search, search_for_ptq, sensitivity_options_given
from bitalloc.io import write_json
from bitalloc.report.tables import print_table


def register(sub: Any) -> None:
    p = sub.add_parser("ptq", help="post-training quantization (ACIQ and baselines): accuracy, cost, bit map",
                       description="Quantize a trained model without retraining and report accuracy, BOPs, memory "
                                   "and the per-layer, per-channel bit widths.")
    add_model_args(p)
    add_data_args(p, split=True)
    add_input_args(p)
    add_quant_args(p)
    add_search_args(p, group="mixed precision: search under a budget (--budget)")
    g = p._action_groups[-1]
    g.add_argument("--budget", metavar="KIND=VALUE",
                   help="choose each layer's widths among --candidates: the least summed sensitivity within the "
                        "budget, exactly (bops=2.5%%: relative BOPs; bops=W4A8: those of uniform W4A8; size=1.2MB: "
                        "model size with metadata; size=W4A8); writes searched.json, a QuantConfig for --config")
    g.add_argument("--sensitivity", metavar="FILE",
                   help="a sensitivity.pt from `bitalloc sensitivity` with the same options (default: measure here)")
    g.add_argument("--no-layer-check", action="store_true",
                   help="skip measuring each searched layer's share of the damage in the chosen configuration")
    p.add_argument("--out", default="runs/ptq", help="output folder (report.json, bitmap.png; default runs/ptq)")
    p.add_argument("--save-model", action="store_true", help="also save the quantized model (quantized.pt)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG bit map")
    p.set_defaults(func=run)


def print_layers(report: dict[str, Any]) -> None:
    rows = [[l["name"], l["type"], l.get("status", "quantized" if l["quantized"] else "float"), l["w_bits"], l["a_bits"],
             l["macs"], l["bops"], 100 * l["relative_bops"], l["bireal_ops"], l.get("reason", "")] for l in report["layers"]]
    print_table("Layers", ["layer", "type", "status", "w bits", "a bits", "MACs", "BOPs", "rel. BOPs %", "Bi-Real OPs",
                           "note"], rows)


def print_summary(report: dict[str, Any]) -> None:
    rows = [[report.get("name", ""), report["fp32_top1"], report["top1"], 100 * report["relative_bops"],
             report["memory_bits"] / 8e6, report["compression"], report["timing"]["eval_ratio"]]]
    print_table("Post-training quantization", ["config", "FP32 top-1", "top-1", "rel. BOPs %", "size MB",
                                               "compression", "eval time / FP32"], rows)


def run(args: argparse.Namespace) -> int:
    from bitalloc.ptq import run_ptq

    out = output_dir(args.out, create=False)  # checked now, created once there is something to write
    model, name, ckpt_dataset = load_model(args)
    cfg = build_config(args)
    data = model_data(args, model, name, ckpt_dataset)  # images (--dataset / --data) or a tensor file (--inputs)
    calib_batches, dataset = data.calib, data.dataset
    label = config_label(args)
    found = None
    if args.budget or sensitivity_options_given(args) or args.no_layer_check:
        found = search_for_ptq(args, model, cfg, calib_batches)  # the searched configuration replaces cfg
        cfg, label = found.config, f"{label}, searched {args.budget}"
    sources = config_sources(args)
    if sources["config_file"] and sources["command_line"]:
        print(f"note: {', '.join(f'{k} {v}' for k, v in sources['command_line'].items())} from the command line "
              f"on top of --config {sources['config_file']}", file=sys.stderr)
    evaluate = data.eval_fn(model)
    result = run_ptq(model, cfg, calib_batches, evaluate, name=label)
    report = {"model": name, "dataset": dataset, "data": args.data, **result.report, "config_sources": sources,
              **data.extra, **getattr(evaluate, "metrics", {})}
    if not data.labelled:
        report["metric"] = "top-1 agreement with the FP32 model (no labels): fp32_top1 / top1 are agreements"
    correct = getattr(evaluate, "correct", {})
    if id(result.model) in correct and id(model) in correct:  # per-image outcomes, to pair runs on the same images
        from bitalloc.report.stats import encode_mask, paired_comparison

        report["per_sample"] = {"correct": encode_mask(correct[id(result.model)]),
                                "fp32_correct": encode_mask(correct[id(model)]),
                                "against_fp32": paired_comparison(correct[id(result.model)],
                                                                  correct[id(model)]).to_dict()}
    out.mkdir(parents=True, exist_ok=True)
    print_layers(report)
    if report["float_layers"]:
        print_table("Left in float", ["layer", "type", "reason"],
                    [[f["name"] or "(model)", f["type"], f["reason"]] for f in report["float_layers"]])
    if found is not None:
        report["search"] = finish_search(args, model, found, calib_batches, result.model, out)
    print_summary(report)
    if "agreement" in report:
        a = report["agreement"]
        print_table("Agreement with the FP32 model", ["samples", "top-1 agreement %", "cosine (mean)", "cosine (min)",
                                                      "SQNR dB", "nearest-neighbour agreement %"],
                    [[a["samples"], a["top1_agreement"], a["cosine"], a["cosine_min"], a["sqnr_db"], a["nn_agreement"]]])
    write_json(out / "report.json", report)
    print(f"report: {out / 'report.json'}", file=sys.stderr)
    quantized = [l for l in report["layers"] if l.get("status") == "quantized"]
    if not args.no_plot and not quantized:
        print("bit map: skipped (no layer is quantized)", file=sys.stderr)
    elif not args.no_plot:
        from bitalloc.report.plots import bit_heatmap

        png = bit_heatmap(quantized, out / "bitmap.png", title=f"{name}: {label}")
        print(f"bit map: {png}", file=sys.stderr)
    if args.save_model:
        from bitalloc.model.serialize import save_quantized

        path = save_quantized(result.model, out / "quantized.pt", model_name=name,
                              example_shape=_example_shape(result.model))
        print(f"quantized model: {path}", file=sys.stderr)
    return 0


def _example_shape(qmodel: Any) -> tuple[int, ...]:
    """The shape of the model's one input tensor (``quantize`` records it); ConfigError for tuple / dict inputs,
    which quantized.pt files cannot record yet."""
    from bitalloc.errors import ConfigError

    shape = getattr(qmodel, "bitalloc_example_shape", None)
    if shape is None:
        raise ConfigError("--save-model writes models with one input tensor; this model takes several inputs (a "
                          "tuple or a dict): save it from Python with torch.save(qmodel.state_dict(), ...) instead")
    return tuple(shape)
