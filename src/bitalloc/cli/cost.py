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
    p.add_argument("--input-shape", help="C,H,W of one input (default: the zoo model's); float zeros")
    p.add_argument("--inputs", metavar="FILE", help="a tensor file of model inputs (as `bitalloc ptq --inputs`): the "
                                                    "first sample is the example input (token ids, dict inputs...)")
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


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--input-shape {text!r}: give the input's dimensions without the batch, e.g. 3,224,224") \
            from None
    if not shape or min(shape) < 1:
        raise ConfigError(f"--input-shape {text!r}: give positive dimensions, e.g. 3,224,224")
    return shape


def run(args: argparse.Namespace) -> int:
    from bitalloc import models
    from bitalloc.cost import cost_report
    from bitalloc.model.prepare import prepare

    from bitalloc.cli.model_args import check_user_model_options

    check_quantized_source(args)
    check_user_model_options(args)
    if args.fp32 and args.quantized:
        raise ConfigError("--fp32 costs a float model, --quantized a quantized one: give one of them")
    ignored = [flag(d) for d in ("config",) + QUANT_OPTIONS if d in given(args)] if args.fp32 else []
    if ignored:
        raise ConfigError(f"--fp32 costs the float model, so {', '.join(ignored)} would be ignored: drop them, or "
                          "drop --fp32 to cost the quantized model")
    if args.input_shape and args.inputs:
        raise ConfigError("--input-shape and --inputs both give the example input: give one")
    example = None
    if args.inputs:
        from bitalloc.cli.model_args import example_of
        from bitalloc.data.tensors import load_tensor_inputs

        example = example_of(load_tensor_inputs(args.inputs).batches(1)[0])
    if args.quantized:
        from bitalloc.model.serialize import example_input, load_quantized

        model = load_quantized(args.quantized)
        shape = tuple(model.bitalloc_example_shape)
        if example is None and not args.input_shape:
            example = example_input(shape, getattr(model, "bitalloc_example_dtype", None))
        title = args.quantized
    else:
        from bitalloc.cli.model_args import is_user_model

        if args.checkpoint or is_user_model(args):
            from bitalloc.cli.common import load_model

            model, name, _ = load_model(args)
        elif args.model:
            name = args.model
            info = models.model_info(name)
            model = models.create(name, pretrained=info.pretrained).eval()
        else:
            raise ConfigError("give --model NAME, --checkpoint PATH or --quantized PATH")
        if args.input_shape:
            shape = _shape(args.input_shape)
        elif example is None:
            try:
                shape = models.model_info(name).input_shape
            except ConfigError:
                raise ConfigError(f"model {name} is not a zoo model: give its example input with --input-shape "
                                  "C,H,W (float zeros) or --inputs FILE (a tensor file of model inputs)") from None
        if example is None:
            example = torch.zeros(1, *shape)
        if not args.fp32:
            model = prepare(model, build_config(args), example)
        title = name if args.fp32 else f"{name} {config_label(args)}"
    if example is None:
        example = torch.zeros(1, *_shape(args.input_shape))
    report = cost_report(model, example)
    print_cost(report, title)
    products = [l for l in report.layers if l.kind != "layer"]
    if products:
        print(f"note: {sum(1 for l in products if l.kind == 'matmul')} products of two activations (attention) "
              f"with {sum(l.macs for l in products):.4g} MACs and {sum(1 for l in products if l.kind == 'softmax')} "
              "softmaxes are computed in float and counted at 32 x 32 bits", file=sys.stderr)
    if args.json:
        write_json(args.json, report.to_dict())
        print(f"cost report: {args.json}", file=sys.stderr)
    return 0
