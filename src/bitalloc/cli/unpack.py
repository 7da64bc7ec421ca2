"""``bitalloc unpack``: verify a packed model file, print its summary, restore the quantized model.

The file's checksum, version and every tensor are checked before anything is built. ``--out`` writes the
restored quantized model (loadable with ``bitalloc.model.serialize.load_quantized`` and by ``bitalloc ptq`` /
``bitalloc cost --quantized``); ``--data`` evaluates it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bitalloc.cli.common import add_data_args, load_splits, make_eval_fn
from bitalloc.errors import ConfigError
from bitalloc.io import write_json
from bitalloc.report.tables import print_table


def register(sub: Any) -> None:
    p = sub.add_parser("unpack", help="verify a packed model file (.bapk), print its summary, restore the model",
                       description="Verify a file written by `bitalloc pack` (checksum, version, every tensor), "
                                   "print its manifest summary, rebuild the quantized model (outputs bit-identical "
                                   "to the packed one) and optionally save or evaluate it.")
    p.add_argument("file", help="the packed model file")
    p.add_argument("--out", help="write the restored quantized model here (a quantized.pt for load_quantized)")
    p.add_argument("--json", help="write the summary (and accuracy) as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--trust-code", "--trust-factory", dest="trust_factory", action="store_true",
                   help="allow rebuilding the float model from a factory outside bitalloc named in the file (imports "
                        "and runs that code: only for code you trust)")
    add_data_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bitalloc import models
    from bitalloc.cli.pack import LAYER_COLUMNS, layer_rows
    from bitalloc.coding.packfile import packfile_summary, unpack_model

    for path in (args.out, args.json):
        if path and Path(path).exists() and not args.overwrite:
            raise ConfigError(f"{path} already exists; pass --overwrite to replace it, or choose another path")
    summary = packfile_summary(args.file)
    model_entry = summary.get("model") or {}
    name = model_entry.get("name")
    layers = [l for l in summary["layers"] if "values" in l]
    print_table(f"{args.file}: format v{summary['format_version']}, bitalloc {summary['bitalloc_version']}, "
                f"model {name or '(caller-supplied)'}, input {summary['example_shape']}, {summary['file_bytes']} bytes",
                LAYER_COLUMNS, layer_rows(layers))
    model = unpack_model(args.file, trust_factory=args.trust_factory)
    print(f"verified: checksum, version and all {len(layers)} quantized weights of {args.file}; model restored",
          file=sys.stderr)
    result: dict[str, Any] = {"summary": summary}
    if args.out:
        from bitalloc.model.serialize import save_quantized

        path = save_quantized(model, args.out, model_name=name, example_shape=tuple(summary["example_shape"]),
                              overwrite=True, extra={"unpacked_from": str(args.file)})
        print(f"quantized model: {path}", file=sys.stderr)
    if args.data:
        dataset = args.dataset or (models.model_info(name).default_dataset if name else None)
        if dataset is None:
            raise ConfigError("give --dataset: the file does not name a zoo model")
        _, evaluation = load_splits(dataset, args.data, args.calib, seed=args.seed, limit=args.limit,
                                    cache_dir=args.cache_dir)
        top1, seconds = make_eval_fn(evaluation, args.batch_size)(model)
        result["top1"] = top1
        result["eval_images"] = len(evaluation)
        print_table("Restored model", ["dataset", "images", "top-1 %", "seconds"],
                    [[dataset, len(evaluation), top1, seconds]])
    if args.json:
        write_json(args.json, result, overwrite=True)
    return 0
