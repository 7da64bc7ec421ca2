"""``bitalloc sensitivity``: how much each layer alone suffers at each bit-width candidate (table, JSON, heat map).

    bitalloc sensitivity --model efficientnet_lite0 --data imagenet-sample.zip --preset aciq-gptq \\
        --candidates 8x8,8x4,4x8,4x4,2x8,2x4 --out runs/sens
    bitalloc ptq --model efficientnet_lite0 --data imagenet-sample.zip --preset aciq-gptq \\
        --budget bops=W4A8 --sensitivity runs/sens/sensitivity.pt --out runs/mixed

Writes ``sensitivity.json`` (per layer and candidate: damage, BOPs, memory; the Hessian estimate with
``--hessian``), ``sensitivity.pt`` (everything, checksummed: what ``bitalloc ptq --budget --sensitivity`` and
``bitalloc sweep --budget --sensitivity`` read instead of measuring again) and ``sensitivity.png`` (layers x
candidates). See :mod:`bitalloc.search.sensitivity` for what is measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bitalloc.cli.common import (add_data_args, add_model_args, add_quant_args, build_config, config_label, given,
                                 load_model, output_dir)
from bitalloc.cli.model_args import add_input_args, model_data
from bitalloc.errors import ConfigError


def add_search_args(p: argparse.ArgumentParser, *, group: str = "sensitivity") -> None:
    """The options of the sensitivity pass (shared by ``sensitivity``, ``ptq --budget`` and ``sweep --budget``)."""
    from bitalloc.search.sensitivity import METRICS
    from bitalloc.search.space import DEFAULT_CANDIDATES

    g = p.add_argument_group(group)
    g.add_argument("--candidates", default=None, metavar="WxA,...",
                   help=f"bit-width candidates per layer, weight x activation bits, f or 32 = float (default "
                        f"{','.join(DEFAULT_CANDIDATES)})")
    g.add_argument("--metric", choices=METRICS, default="kl",
                   help="damage measured on the calibration data: kl (KL divergence of the outputs from the float "
                        "outputs; default), loss (cross-entropy increase; needs labels) or mse (outputs that are not "
                        "class scores)")
    g.add_argument("--latency-batch", type=int, default=1, metavar="N",
                   help="batch size of the per-layer onnxruntime latencies of latency budgets (default 1)")
    g.add_argument("--latency-threads", type=int, default=2, metavar="N",
                   help="onnxruntime threads for those latencies (default 2)")


def sensitivity_options_given(args: argparse.Namespace) -> list[str]:
    return [f for f, d in (("--candidates", "candidates"), ("--metric", "metric"), ("--hessian", "hessian"),
                           ("--hutchinson", "hutchinson"), ("--sensitivity", "sensitivity"),
                           ("--latency-batch", "latency_batch"), ("--latency-threads", "latency_threads"))
            if d in given(args)]


def register(sub: Any) -> None:
    p = sub.add_parser("sensitivity", help="per-layer sensitivity to each bit width (table, JSON, heat map)",
                       description="Quantize each layer alone at each candidate width and measure the damage on the "
                                   "calibration data (and, with --hessian, its Hutchinson estimate); the input of "
                                   "`bitalloc ptq --budget`.")
    add_model_args(p)
    add_data_args(p, split=True)
    add_input_args(p)
    add_quant_args(p)
    add_search_args(p)
    p.add_argument("--hessian", action="store_true",
                   help="also estimate the damage from Hessian traces (Hutchinson, HAWQ-v2)")
    p.add_argument("--hutchinson", type=int, default=16, metavar="N",
                   help="Rademacher vectors of the Hutchinson estimate (default 16; with --hessian)")
    p.add_argument("--latency", action="store_true",
                   help="also measure each layer's onnxruntime latency, int8 against float (the cost table of "
                        "--budget latency=...; --latency-batch, --latency-threads)")
    p.add_argument("--out", default="runs/sensitivity",
                   help="output folder (sensitivity.json, sensitivity.pt, sensitivity.png; default runs/sensitivity)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG heat map")
    p.set_defaults(func=run)


def progress_bar(total: int, desc: str = "sensitivity", unit: str = "layer x width") -> Any:
    """A progress display over ``total`` items (``unit``; bars on a terminal, log lines otherwise)."""
    from bitalloc.train.progress import Progress

    return Progress(total, desc, unit=unit)


def compute(model: Any, cfg: Any, calib: list, args: argparse.Namespace, *, reference_bits: tuple = (),
            hessian: bool = False, hutchinson: int = 16) -> Any:
    """The sensitivity of ``model`` under ``cfg`` on the calibration batches ``calib`` (options from ``args``)."""
    from bitalloc.search import DEFAULT_CANDIDATES, layer_sensitivity, parse_candidates

    cands = parse_candidates(args.candidates)
    reference_bits = tuple(reference_bits) + DEFAULT_CANDIDATES  # budgets such as bops=W4A8 need their costs
    bar = None

    def tick(n: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_bar(total)
        bar.update(n)

    try:
        sens = layer_sensitivity(model, cfg, calib, cands,
                                 metric=args.metric, num_samples=args.calib, hessian=hessian,
                                 hutchinson_samples=hutchinson, reference_bits=reference_bits, progress=tick)
    finally:
        if bar is not None:
            bar.close()
    return sens


def with_latency(model: Any, sens: Any, calib: list, args: argparse.Namespace) -> Any:
    """``sens`` with its per-layer onnxruntime latency table (measured here unless it has one), for a batch of
    ``--latency-batch`` calibration samples on ``--latency-threads`` threads."""
    from bitalloc.batches import batch_inputs, batch_size, cut_inputs
    from bitalloc.search.latency import add_latency

    if sens.latency is not None:
        return sens
    for flag in ("latency_batch", "latency_threads"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give at least 1")
    x = batch_inputs(calib[0])
    if batch_size(x) < args.latency_batch:
        raise ConfigError(f"--latency-batch {args.latency_batch} is larger than a calibration batch "
                          f"({batch_size(x)}); lower it")
    bar = progress_bar(2 * len(sens.layers), desc="latency (export, then time)", unit="layer")
    try:
        return add_latency(model, sens, cut_inputs(x, args.latency_batch), threads=args.latency_threads,
                           progress=lambda n, total: bar.update(n))
    finally:
        bar.close()


def print_sensitivity(sens: Any) -> None:
    from bitalloc.report.tables import print_table

    cols = ["layer", "type", "MACs"] + [c.label for c in sens.candidates]
    rows = [[n, sens.types[i], sens.macs[i]] + [float(v) for v in sens.values[i]] for i, n in enumerate(sens.layers)]
    print_table(f"Sensitivity ({sens.metric} on {sens.samples} calibration samples; each layer alone)", cols, rows)
    if sens.hessian is not None:
        rows = [[n, sens.types[i], sens.macs[i]] + [float(v) for v in sens.hessian[i]] for i, n in enumerate(sens.layers)]
        print_table("Hutchinson estimate (1/2 tr(H)/n ||dW||^2 + 1/2 tr(H)/n ||dX||^2)", cols, rows)
    if sens.latency is not None:
        lat = sens.latency
        print_table(f"onnxruntime latency per layer (ms; batch {lat['batch']}, {lat['threads']} threads; the cost of "
                    f"a call subtracted; FP32 model {lat['fp32_model_ms']:.3f} ms)",
                    ["layer", "input", "float", "int8", "int8 / float", "int8 kernel", "int8 with Q/DQ", "call"],
                    [[r["name"], "x".join(map(str, r["input_shape"])), r["float_ms"], r["int8_ms"],
                      r["int8_ms"] / r["float_ms"] if r["float_ms"] > 0 else None, "yes" if r["int8_kernel"] else "no",
                      r["int8_alone_ms"], r["call_ms"]] for r in lat["layers"]])
    if sens.excluded:
        print_table("Not searched", ["layer", "reason"], [[e["name"], e["reason"]] for e in sens.excluded])


def write_outputs(sens: Any, out: Path, *, title: str, plot: bool = True) -> dict[str, Path]:
    from bitalloc.io import torch_save, write_json

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(out / "sensitivity.json", sens.to_dict()),
             "state": torch_save(sens.state(), out / "sensitivity.pt")}
    if plot:
        from bitalloc.report.plots import PlotsUnavailable, sensitivity_heatmap

        try:
            paths["heat map"] = sensitivity_heatmap(sens.layers, [c.label for c in sens.candidates], sens.values,
                                                    out / "sensitivity.png", title=title, label=sens.metric)
        except PlotsUnavailable as exc:
            print(f"note: {str(exc).split(':')[0]}: heat map skipped (pip install 'bitalloc[plots]')", file=sys.stderr)
    return paths


def load_sensitivity(path: str, cfg: Any, samples: int) -> Any:
    """A ``sensitivity.pt`` (or the folder holding it), checked against the configuration it must have been
    measured with."""
    from bitalloc.io import torch_load
    from bitalloc.search import Sensitivity

    p = Path(path)
    if p.is_dir():
        p = p / "sensitivity.pt"
    fix = "compute it again with `bitalloc sensitivity` (same model, data and quantization options)"
    sens = Sensitivity.from_state(torch_load(p, what="sensitivity file", fix=fix))
    if sens.config != cfg.to_dict():
        raise ConfigError(f"--sensitivity {p} was measured with another quantization configuration than this command's "
                          f"(compare its 'config' in sensitivity.json); give the same options, or {fix}")
    if sens.samples != samples:
        raise ConfigError(f"--sensitivity {p} was measured on {sens.samples} calibration samples, this command "
                          f"calibrates on {samples} (--calib); {fix}")
    return sens


def run(args: argparse.Namespace) -> int:
    from bitalloc import models

    if "limit" in given(args):
        raise ConfigError("--limit bounds the evaluation images, but `bitalloc sensitivity` evaluates nothing (it "
                          "measures on the calibration samples, --calib); drop --limit")
    if args.hutchinson < 2:
        raise ConfigError(f"--hutchinson {args.hutchinson}: give at least 2 Rademacher vectors")
    if "hutchinson" in given(args) and not args.hessian:
        raise ConfigError("--hutchinson sets the Hessian estimate, which only --hessian computes; add --hessian")
    out = output_dir(args.out, create=False)
    model, name, ckpt_dataset = load_model(args)
    cfg = build_config(args)
    data = model_data(args, model, name, ckpt_dataset, need_eval=False)
    calib = data.calib
    if not args.latency and any(k in given(args) for k in ("latency_batch", "latency_threads")):
        raise ConfigError("--latency-batch / --latency-threads set the latency measurement, which only --latency "
                          "makes; add --latency")
    sens = compute(model, cfg, calib, args, hessian=args.hessian, hutchinson=args.hutchinson)
    if args.latency:
        sens = with_latency(model, sens, calib, args)
    print_sensitivity(sens)
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in sens.seconds.items())
    print(f"{len(sens.layers)} layers x {len(sens.candidates)} candidates ({sens.engine}): {secs}", file=sys.stderr)
    paths = write_outputs(sens, out, title=f"{name}: {config_label(args)}, {sens.metric}", plot=not args.no_plot)
    for k, v in paths.items():
        print(f"{k}: {v}", file=sys.stderr)
    return 0


def measured_or_loaded(args: argparse.Namespace, model: Any, cfg: Any, calib: list, reference_bits: tuple = ()) -> Any:
    """The sensitivity of ``ptq --budget`` / ``sweep --budget``: read from --sensitivity (whose own candidates
    and metric were fixed when it was measured: giving them again is an error), or measured here."""
    if not args.sensitivity:
        return compute(model, cfg, calib, args, reference_bits=reference_bits)
    clash = [f for f in ("--candidates", "--metric") if f.lstrip("-") in given(args)]
    if clash:
        raise ConfigError(f"{', '.join(clash)}: --sensitivity {args.sensitivity} was measured with its own; drop "
                          f"{'it' if len(clash) == 1 else 'them'}, or drop --sensitivity to measure here")
    return load_sensitivity(args.sensitivity, cfg, args.calib)


# ---- ptq --budget ---------------------------------------------------------------------------------------------

def search_for_ptq(args: argparse.Namespace, model: Any, cfg: Any, calib: list) -> Any:
    """``bitalloc ptq --budget``: the sensitivity (measured here, or read from --sensitivity) and the search;
    returns the :class:`~bitalloc.search.SearchResult` (its ``config`` is what ptq then quantizes with)."""
    from bitalloc.search import parse_budget, search

    if not args.budget:
        stray = sensitivity_options_given(args) + (["--no-layer-check"] if args.no_layer_check else [])
        raise ConfigError(f"{', '.join(stray)} {'belongs' if len(stray) == 1 else 'belong'} to the search under a "
                          "budget and would be ignored; add --budget KIND=VALUE (e.g. bops=W4A8) or drop them")
    budget = parse_budget(args.budget)
    sens = measured_or_loaded(args, model, cfg, calib, (budget.uniform,) if budget.uniform is not None else ())
    if budget.kind == "latency":
        sens = with_latency(model, sens, calib, args)
    elif any(k in given(args) for k in ("latency_batch", "latency_threads")):
        raise ConfigError("--latency-batch / --latency-threads belong to latency budgets; drop them, or give "
                          "--budget latency=...")
    return search(sens, budget)


def finish_search(args: argparse.Namespace, model: Any, found: Any, calib: list, qmodel: Any, out: Path) -> dict:
    """After ``bitalloc ptq --budget`` quantized with the searched configuration: the check of predicted against
    measured (:func:`bitalloc.search.check_choice`), the tables, ``searched.json``; returns the report's part."""
    from bitalloc.io import write_json
    from bitalloc.report.tables import print_table
    from bitalloc.search import check_choice

    sens = found.sensitivity
    check = check_choice(model, found, sens, calib, qmodel=qmodel, layer_effects=not args.no_layer_check)
    rows = [[r["name"], r["type"], r["candidate"], r["bops"], r["memory_bits"] / 8, r["predicted_damage"],
             r.get("measured_damage")] for r in check["layers"]]
    print_table(f"Searched widths ({found.budget.text}; damage: {sens.metric} on {sens.samples} calibration samples, "
                "predicted = the layer alone, measured = its share in the configuration)",
                ["layer", "type", "widths", "BOPs", "bytes", "predicted", "measured"], rows)
    c = check["cost"]
    print_table("Prediction against measurement (calibration samples)",
                ["", "damage", "top-1 %", "agreement with FP32 %", "rel. BOPs %", "size MB"],
                [["predicted (sum)", check["predicted_damage"], check.get("predicted_top1"),
                  check.get("predicted_agreement"), 100 * c["predicted"]["relative_bops"],
                  c["predicted"]["memory_bits"] / 8e6],
                 ["measured", check["measured_damage"], check.get("measured_top1"), check.get("measured_agreement"),
                  100 * c["counted"]["relative_bops"], c["counted"]["memory_bits"] / 8e6]])
    if "latency" in check:
        lat = check["latency"]
        print_table(f"onnxruntime latency (ms; batch {lat['batch']}, {lat['threads']} threads; budget "
                    f"{c['limit']:.4g} ms)",
                    ["", "FP32 model", "searched configuration", "int8 / float kernels"],
                    [["predicted (sum of layers)", sens.latency["fp32_model_ms"], c["predicted"]["latency_ms"], ""],
                     ["measured (whole model)", lat["fp32_ms"], lat["quantized_ms"],
                      f"{lat['int8_ops']} / {lat['float_ops']}"]])
    if not (c["budget_met"] and c["cost_matches"]):
        print(f"warning: the cost report counts {c['counted']} against the predicted {c['predicted']} and the limit "
              f"{c['limit']:.6g}", file=sys.stderr)
    path = write_json(out / "searched.json", found.config.to_dict())
    print(f"searched configuration: {path} (--config {path})", file=sys.stderr)
    return {**found.to_dict(), "check": check, "config_file": str(path),
            "sensitivity": {"engine": sens.engine, "seconds": sens.seconds, "samples": sens.samples,
                            "candidates": [c.label for c in sens.candidates], "file": args.sensitivity}}

