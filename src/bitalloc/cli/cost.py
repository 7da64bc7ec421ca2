"""``bitalloc cost``: MACs, BOPs, relative BOPs, Bi-Real OPs and memory per layer, from a traced forward pass."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from bitalloc.cli.common import (QUANT_OPTIONS, add_model_args, add_quant_args, build_config, check_quantized_source,
                                 config_label, flag, given)
from bitalloc.errors import ConfigError
from bitalloc.io import write_json
from bitalloc.report.tables import print_table


def register(sub: Any) -> None:
    p = sub.add_parser("cost", help="cost of a model at given bit widths: MACs, BOPs, Bi-Real OPs, memory",
                       description="Count the cost of a model (FP32, a quantization configuration, or a saved "
                                   "quantized model) from one real forward pass. No data needed.")
    add_model_args(p)
    p.add_argument("--quantized", help="a quantized model saved by `bitalloc ptq --save-model`")
    p.add_argument("--fp32", action="store_true", help="cost of the float model (no quantization options)")
    p.add_argument("--input-shape", help="C,H,W of one input (default: the zoo model's)")
    p.add_argument("--json", help="write the cost report as JSON here")
    add_quant_args(p)
    p.set_defaults(func=run)


COST_COLUMNS = ["layer", "type", "status", "w bits", "a bits", "MACs", "BOPs", "rel. BOPs %", "Bi-Real OPs", "kept",
                "kB"]


def cost_rows(report: Any) -> list[list[Any]]:
    """One row per layer (columns :data:`COST_COLUMNS`): relative BOPs = BOPs / (1024 MACs) of the layer, in %;
    Bi-Real OPs = MACs (float layer) or BOPs / 64 (quantized layer); see :mod:`bitalloc.cost`."""
    return [[l.name, l.type, "quantized" if l.quantized else "float", l.w_bits, l.a_bits, l.macs, l.bops,
             100 * l.relative_bops, l.bireal_ops, l.kept_fraction, l.memory_bits / 8e3] for l in report.layers]


def print_cost(report: Any, title: str) -> None:
    print_table(f"{title}: per layer", COST_COLUMNS, cost_rows(report))
    print_table(f"{title}: totals", ["MACs", "BOPs", "rel. BOPs %", "Bi-Real OPs", "memory MB", "FP32 MB", "compression"],
                [[report.macs, report.bops, 100 * report.relative_bops, report.bireal_ops, report.memory_bits / 8e6,
                  report.fp32_memory_bits / 8e6, report.fp32_memory_bits / report.memory_bits]])


def run(args: argparse.Namespace) -> int:
    from bitalloc import models
    from bitalloc.cost import cost_report
    from bitalloc.model.prepare import prepare

    check_quantized_source(args)
    if args.fp32 and args.quantized:
        raise ConfigError("--fp32 costs a float model, --quantized a quantized one: give one of them")
    ignored = [flag(d) for d in ("config",) + QUANT_OPTIONS if d in given(args)] if args.fp32 else []
    if ignored:
        raise ConfigError(f"--fp32 costs the float model, so {', '.join(ignored)} would be ignored: drop them, or "
                          "drop --fp32 to cost the quantized model")
    if args.quantized:
        from bitalloc.model.serialize import load_quantized

        model = load_quantized(args.quantized)
        shape = tuple(model.bitalloc_example_shape)
        title = args.quantized
    else:
        if args.checkpoint:
            from bitalloc.cli.common import load_model

            model, name, _ = load_model(args)
        elif args.model:
            name = args.model
            info = models.model_info(name)
            model = models.create(name, pretrained=info.pretrained).eval()
        else:
            raise ConfigError("give --model NAME, --checkpoint PATH or --quantized PATH")
        shape = models.model_info(name).input_shape
        if not args.fp32:
            if args.input_shape:
                shape = tuple(int(v) for v in args.input_shape.split(","))
            model = prepare(model, build_config(args), torch.zeros(1, *shape))
        title = name if args.fp32 else f"{name} {config_label(args)}"
    if args.input_shape:
        shape = tuple(int(v) for v in args.input_shape.split(","))
    report = cost_report(model, torch.zeros(1, *shape))
    print_cost(report, title)
    if args.json:
        write_json(args.json, report.to_dict())
        print(f"cost report: {args.json}", file=sys.stderr)
    return 0
