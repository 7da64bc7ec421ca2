"""``bitalloc pack``: write a quantized model as one compressed, checksummed file (Huffman-coded weight codes).

Either quantize here (``--model`` / ``--checkpoint`` with the PTQ options and ``--data``, as ``bitalloc ptq``)
or pack a model saved by ``bitalloc ptq --save-model`` (``--quantized``). Prints per-layer sizes (entropy,
Huffman, bit-packing) and the totals against the FP32 ``state_dict``, writes them as JSON, and checks that
the file unpacks to a model with bit-identical outputs. ``--activations`` also measures the entropy and the
Huffman-coded size of every quantized layer's input codes on the calibration data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from bitalloc.cli.common import (add_data_args, add_model_args, add_quant_args, batches, build_config,
                                 check_quantized_source, config_label, load_model, load_splits)
from bitalloc.cli.model_args import add_input_args, model_data
from bitalloc.errors import ConfigError
from bitalloc.io import write_json
from bitalloc.report.tables import print_table


def register(sub: Any) -> None:
    from bitalloc.coding.packfile import CODECS

    p = sub.add_parser("pack", help="write a quantized model as a compressed file (.bapk): Huffman-coded weights",
                       description="Quantize a model (or take one saved by `bitalloc ptq --save-model`) and write "
                                   "it as a packed file: weight codes Huffman-coded (or bit-packed at their "
                                   "widths), scales, zero points and configuration, with a SHA-256 checksum. "
                                   "Reports sizes against the FP32 state_dict and plain bit-packing.")
    add_model_args(p)
    p.add_argument("--quantized", help="a quantized model saved by `bitalloc ptq --save-model` (instead of "
                                       "--model/--checkpoint and the quantization options)")
    add_data_args(p)
    add_input_args(p)
    add_quant_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="the packed model file to write (e.g. model.bapk)")
    g.add_argument("--codec", choices=CODECS, default="auto",
                   help="weight coding: auto (per tensor the smaller of Huffman and bit-packing; default), "
                        "huffman, zlib, canonical, bitpack")
    g.add_argument("--report", help="JSON report (default: OUT.json)")
    g.add_argument("--activations", action="store_true",
                   help="also report entropy and Huffman bits per activation of every quantized layer's input "
                        "codes on the calibration data (needs --data)")
    g.add_argument("--act-samples", type=int, default=None,
                   help="samples for --activations (default: the --calib calibration samples)")
    g.add_argument("--no-verify", action="store_true", help="skip unpacking the file and comparing outputs")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)


def layer_rows(layers: list[dict[str, Any]]) -> list[list[Any]]:
    return [[l["name"], l["values"], l["bits"], l["entropy"], l["huffman_bits"], l["stored_bits"],
             l["encoding"] + (f" ({l['coder']})" if l.get("coder") else ""), l["bitpack_bytes"] / 1e3,
             l["stored_bytes"] / 1e3] for l in layers]


LAYER_COLUMNS = ["layer", "weights", "bits", "entropy", "Huffman", "stored b/v", "encoding", "bit-packed kB",
                 "stored kB"]


def print_pack_report(rep: dict[str, Any], title: str) -> None:
    print_table(f"{title}: weights per layer (bits per value; stored = real size, headers and tables included)",
                LAYER_COLUMNS, layer_rows(rep["layers"]))
    t = rep["totals"]
    print_table(f"{title}: sizes", ["FP32 state_dict kB", "bit-packed file kB", "packed file kB", "weights kB",
                                    "metadata kB", "x vs FP32", "x vs bit-packed", "weight bits/value",
                                    "entropy", "stored b/v"],
                [[None if t["fp32_state_dict_bytes"] is None else t["fp32_state_dict_bytes"] / 1e3,
                  None if t["bitpack_file_bytes"] is None else t["bitpack_file_bytes"] / 1e3, t["file_bytes"] / 1e3,
                  t["weight_stored_bytes"] / 1e3, t["metadata_bytes"] / 1e3, t["ratio_vs_fp32"],
                  t["ratio_vs_bitpack"], t["weight_bits_before"], t["weight_entropy_bits"], t["weight_stored_bits"]]])


def print_activation_report(act: dict[str, Any]) -> None:
    rows = [[l["name"], l["values"], l["bits_before"], l["entropy"], l["huffman_bits"], l["zlib_bits"],
             l["stored_bits"]] for l in act["layers"]]
    t = act["totals"]
    rows.append(["total (weighted by values)", t["values"], t["bits_before"], t["entropy"], t["huffman_bits"],
                 t["zlib_bits"], t["stored_bits"]])
    print_table(f"Activation codes on {act['samples']} samples (bits per activation)",
                ["layer input", "values", "bits", "entropy", "Huffman (one table)", "zlib Huffman-only", "stored"],
                rows)


def _refuse_existing(paths: list[Path], overwrite: bool) -> None:
    for p in paths:
        if p.exists() and not overwrite:
            raise ConfigError(f"{p} already exists; pass --overwrite to replace it, or choose another --out/--report")


def _model_spec(args: argparse.Namespace, float_model: Any, name: str) -> dict[str, Any]:
    """How unpacking rebuilds the float model: the checkpoint's model entry, the --model factory with its
    --model-kwargs (unpacking it needs trust again: ``bitalloc unpack --trust-code``), or the zoo name."""
    from bitalloc.cli.model_args import is_user_model, model_kwargs

    if is_user_model(args):
        return {"name": None, "kwargs": model_kwargs(args), "factory": name}
    return (getattr(float_model, "bitalloc_checkpoint", {}) or {}).get("model") or {"name": name, "kwargs": {}}


def run(args: argparse.Namespace) -> int:
    from bitalloc import models
    from bitalloc.coding.activations import activation_code_stats
    from bitalloc.coding.packfile import pack_model
    from bitalloc.ptq import quantize

    check_quantized_source(args)
    out = Path(args.out)
    report_path = Path(args.report) if args.report else out.with_name(out.name + ".json")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file path such as {out / 'model.bapk'}")
    _refuse_existing([out, report_path], args.overwrite)
    float_model = None
    calib_batches = None
    if args.quantized:
        from bitalloc.model.serialize import load_quantized

        qmodel = load_quantized(args.quantized)
        name = qmodel.bitalloc_model_name
        spec = {"name": name, "kwargs": {}} if name else None
        shape = tuple(qmodel.bitalloc_example_shape)
        if args.activations:
            dataset = args.dataset or (models.model_info(name).default_dataset if name else None)
            if dataset is None:
                raise ConfigError("--activations with --quantized needs --dataset")
            calib, _ = load_splits(dataset, args.data, args.calib, seed=args.seed, cache_dir=args.cache_dir)
            calib_batches = batches(calib, min(args.batch_size, args.calib))
        label = Path(args.quantized).name
    else:
        float_model, name, ckpt_dataset = load_model(args)
        cfg = build_config(args)
        calib_batches = model_data(args, float_model, name, ckpt_dataset, need_eval=False).calib
        qmodel = quantize(float_model, cfg, calib_batches, num_samples=args.calib)
        spec = _model_spec(args, float_model, name)
        shape = getattr(qmodel, "bitalloc_example_shape", None)
        if shape is None:
            raise ConfigError(f"model {name} takes several inputs (a tuple or a dict); packed files record one input "
                              "tensor: pack a model whose forward takes one tensor")
        label = f"{name} {config_label(args)}"
    if calib_batches:
        from bitalloc.batches import batch_inputs

        check = batch_inputs(calib_batches[0])[:8]
    else:
        check = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    rep = pack_model(qmodel, out, model_name=name, model_spec=spec, example_shape=shape, codec=args.codec,
                     float_model=float_model, overwrite=args.overwrite,
                     check_inputs=None if args.no_verify else check)
    result: dict[str, Any] = {"model": name, "file": str(out), "source": args.quantized or "quantized here",
                              "label": label, "pack": rep.as_dict(), "verified_inputs": 0 if args.no_verify else
                              int(check.shape[0])}
    print_pack_report(result["pack"], label)
    if not args.no_verify:
        print(f"verified: {out} unpacks to a model whose outputs equal the quantized model's bit for bit "
              f"({check.shape[0]} inputs)", file=sys.stderr)
    if args.activations:
        if not calib_batches:
            raise ConfigError("--activations needs calibration data: give --data")
        act = activation_code_stats(qmodel, calib_batches, args.act_samples)
        result["activations"] = act.as_dict()
        print_activation_report(result["activations"])
    write_json(report_path, result, overwrite=True)
    print(f"packed model: {out} ({rep.file_bytes} bytes); report: {report_path}", file=sys.stderr)
    return 0
