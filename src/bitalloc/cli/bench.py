"""``bitalloc bench cpu``: CPU latency and accuracy of exported models in onnxruntime.

Rows: the FP32 ONNX model; onnxruntime's own static quantization of it (QDQ, per-channel int8 weights,
uint8 activations, MinMax and Entropy calibration on the same calibration images) as the anchor; and
bitalloc exports of the configurations given with ``--configs``. For each: top-1 on the evaluation set, the
top-1 agreement and largest logit difference with bitalloc's fake-quant model (bitalloc rows), how many
convolutions / matrix products onnxruntime runs with int8 kernels, and the median latency of batch 1 and
batch 32 (``--batch-sizes``), measured in turns (each model: a 0.1 s pause, one untimed run, then 5 timed
runs; model after model, until each has --runs runs and --min-seconds of them) so that background load
affects all rows alike; speed-ups are ratios to FP32 within the same run.

A configuration is ``PRESET/WxA[/ALIGN[/BIAS_SHIFT[/ACT_GRANULARITY]]]``, e.g. ``minmax/8x8`` (defaults:
align ``model``, bias shift ``exact``, per-tensor activations), ``aciq/4x8/none/exact``. ALIGN: ``none``
(exactly bitalloc's quantization points), ``ort`` (onnxruntime's missing int8 points added to the ONNX file
only) or ``model`` (added to the bitalloc model first, :func:`bitalloc.runtime.align.align_for_ort`, so that
the model the agreement is measured against has them too); see
:func:`bitalloc.runtime.onnx_export.export_onnx` for BIAS_SHIFT.

Verdicts (:func:`verdicts`): the *claim row* is the first bitalloc row at W8A8 (the first configuration of
the default list); it is checked for top-1 agreement >= 99% with its bitalloc model, top-1 >= every
onnxruntime static anchor, and latency <= the onnxruntime static MinMax anchor at every batch size (a
ratio within ``latency_tolerance``, default 3%, counts as "as fast": two graphs with the same int8
kernels differ by timing noise only; the ratio is printed).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from bitalloc.cli.common import add_data_args, add_model_args, load_model
from bitalloc.cli.model_args import add_input_args, example_of, model_data
from bitalloc.errors import ConfigError
from bitalloc.report.machine import machine_description
from bitalloc.report.tables import print_table

DEFAULT_CONFIGS = "percentile/8x8/model,minmax/8x8/model,minmax/8x8/ort,minmax/8x8/none"
ALIGNS = ("none", "ort", "model")
AGREEMENT_MIN = 99.0
LATENCY_TOLERANCE = 0.03


@dataclass
class BenchConfig:
    """One bitalloc row: a preset at W x A bits, exported with ``align`` and ``bias_shift``."""

    preset: str
    w_bits: float
    a_bits: float
    align: str = "model"
    bias_shift: str = "exact"
    act_granularity: str = "tensor"

    @property
    def label(self) -> str:
        g = "" if self.act_granularity == "tensor" else f", {self.act_granularity} acts"
        shift = "" if self.bias_shift == "exact" else f", shift {self.bias_shift}"
        return f"bitalloc {self.preset} W{self.w_bits:g}A{self.a_bits:g} (align {self.align}{shift}{g})"

    @property
    def spec(self) -> str:
        return f"{self.preset}/{self.w_bits:g}x{self.a_bits:g}/{self.align}/{self.bias_shift}/{self.act_granularity}"

    @classmethod
    def parse(cls, spec: str) -> "BenchConfig":
        parts = [p.strip() for p in spec.strip().split("/")]
        if len(parts) < 2 or "x" not in parts[1]:
            raise ConfigError(f"--configs {spec!r}: use PRESET/WxA[/ALIGN[/BIAS_SHIFT[/ACT_GRANULARITY]]], "
                              "e.g. minmax/8x8/ort")
        w, _, a = parts[1].partition("x")
        try:
            cfg = cls(parts[0], float(w), float(a))
        except ValueError:
            raise ConfigError(f"--configs {spec!r}: {parts[1]!r} is not WxA (e.g. 8x8)") from None
        if len(parts) > 2:
            cfg.align = parts[2]
        if len(parts) > 3:
            cfg.bias_shift = parts[3]
        if len(parts) > 4:
            cfg.act_granularity = parts[4]
        if cfg.align not in ALIGNS:
            raise ConfigError(f"--configs {spec!r}: align must be one of {', '.join(ALIGNS)}")
        if cfg.bias_shift not in ("exact", "requantize", "fold"):
            raise ConfigError(f"--configs {spec!r}: bias shift must be exact, requantize or fold")
        if cfg.act_granularity not in ("tensor", "channel"):
            raise ConfigError(f"--configs {spec!r}: activation granularity must be tensor or channel")
        return cfg


def parse_configs(text: str) -> list[BenchConfig]:
    return [BenchConfig.parse(s) for s in text.split(",") if s.strip()]


@dataclass
class Row:
    label: str
    kind: str  # "fp32" | "ort" | "bitalloc"
    path: str
    top1: float | None = None
    fake_quant_top1: float | None = None
    agreement: float | None = None
    max_abs_error: float | None = None
    int8_ops: int = 0
    float_ops: int = 0
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    speedup: dict[str, float] = field(default_factory=dict)
    size_mb: float = 0.0
    export: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    config: str | None = None  # bitalloc rows: PRESET/WxA/ALIGN/BIAS_SHIFT/ACT_GRANULARITY
    w_bits: float | None = None
    a_bits: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _logits(session: Any, data: list) -> tuple[np.ndarray, np.ndarray]:
    from bitalloc.runtime.ort import run_session

    out, labels = run_session(session, data)
    return out, labels


def bench_cpu(model: nn.Module, calib: list, evaluation: list, configs: list[BenchConfig], out_dir: Path, *,
              batch_sizes: tuple[int, ...] = (1, 32), threads: int = 2, runs: int = 20, warmup: int = 3,
              min_seconds: float = 1.0,
              anchors: tuple[str, ...] = ("minmax", "entropy"), log: Callable[[str], None] | None = None,
              latency_tolerance: float = LATENCY_TOLERANCE) -> dict[str, Any]:
    """Export, evaluate and time every row (see module docstring). ``calib`` / ``evaluation``: lists of
    (x, y) batches. ONNX files are written into ``out_dir``. Returns the JSON-ready result."""
    import bitalloc
    from bitalloc.runtime.onnx_export import export_float, export_onnx
    from bitalloc.runtime.ort import (agreement, float_compute_ops, int8_compute_ops, interleaved_latency,
                                      make_session, optimized_op_counts, ort_static_quantize, run_torch, top1)

    from bitalloc.batches import batch_inputs, batch_size

    log = log or (lambda s: print(s, file=sys.stderr))
    n_eval = int(sum(batch_size(batch_inputs(b)) for b in evaluation))
    for bs in batch_sizes:
        if n_eval < bs:
            raise ConfigError(f"batch size {bs} needs at least {bs} evaluation samples (have {n_eval})")
    torch.set_num_threads(threads)
    model = model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    example = example_of(calib[0])
    rows: list[Row] = []
    sessions: dict[str, Any] = {}

    def finish(row: Row, sess: Any, labels: np.ndarray, logits: np.ndarray) -> None:
        row.top1 = top1(logits, labels)
        counts = optimized_op_counts(row.path, threads=threads)
        row.int8_ops, row.float_ops = int8_compute_ops(counts), float_compute_ops(counts)
        row.size_mb = Path(row.path).stat().st_size / 1e6
        rows.append(row)
        sessions[row.label] = sess

    t = time.perf_counter()
    fp32_path = out_dir / "fp32.onnx"
    proto = export_float(model, example)
    fp32_path.write_bytes(proto.SerializeToString())
    sess = make_session(fp32_path, threads=threads)
    logits, labels = _logits(sess, evaluation)
    if labels is None:  # unlabelled inputs (a tensor file): "top-1" is the agreement with the FP32 model
        labels = logits.argmax(-1)
    row = Row("FP32 (onnxruntime)", "fp32", str(fp32_path))
    row.seconds["export"] = time.perf_counter() - t
    finish(row, sess, labels, logits)
    log(f"FP32: top-1 {row.top1:.2f}%")
    for method in anchors:
        t = time.perf_counter()
        path = out_dir / f"ort_{method}.onnx"
        ort_static_quantize(fp32_path, path, calib, method=method)
        sess = make_session(path, threads=threads)
        logits, _ = _logits(sess, evaluation)
        what = "entropy, 2048/128 bins" if method == "entropy" else method
        row = Row(f"onnxruntime static ({what}; U8 act, S8 per-channel w)", "ort", str(path))
        row.seconds["quantize"] = time.perf_counter() - t
        finish(row, sess, labels, logits)
        log(f"{row.label}: top-1 {row.top1:.2f}%")
    quantized: dict[tuple, nn.Module] = {}
    for cfg in configs:
        key = (cfg.preset, cfg.w_bits, cfg.a_bits, cfg.act_granularity)
        t = time.perf_counter()
        if key not in quantized:
            qcfg = bitalloc.preset(cfg.preset, w_bits=cfg.w_bits, a_bits=cfg.a_bits, act_granularity=cfg.act_granularity)
            quantized[key] = bitalloc.quantize(model, qcfg, calib)
        shift = "requantize" if cfg.bias_shift == "requantize" else "exact"
        if cfg.align == "model" and key + ("model", shift) not in quantized:
            from bitalloc.runtime.align import align_for_ort

            quantized[key + ("model", shift)] = align_for_ort(quantized[key], calib, bias_shift=shift)
        qmodel = quantized[key + ("model", shift)] if cfg.align == "model" else quantized[key]
        tq = time.perf_counter() - t
        ref, _ = run_torch(qmodel, evaluation)
        name = f"bitalloc_{cfg.preset}_w{cfg.w_bits:g}a{cfg.a_bits:g}_{cfg.align}_{cfg.bias_shift}_{cfg.act_granularity}.onnx"
        path = out_dir / name
        t = time.perf_counter()
        _, report = export_onnx(qmodel, example, path, align="none" if cfg.align == "none" else "ort",
                                bias_shift=cfg.bias_shift, calibration_data=calib, threads=threads)
        te = time.perf_counter() - t
        sess = make_session(path, threads=threads)
        logits, _ = _logits(sess, evaluation)
        ag = agreement(ref, logits, labels)
        row = Row(cfg.label, "bitalloc", str(path), fake_quant_top1=ag.top1_a, agreement=ag.top1_agreement,
                  max_abs_error=ag.max_abs_error, export=report.to_dict(), seconds={"quantize": tq, "export": te},
                  config=cfg.spec, w_bits=cfg.w_bits, a_bits=cfg.a_bits)
        align_rep = getattr(qmodel, "bitalloc_ort_alignment", None)
        if align_rep is not None:
            row.export["model_alignment"] = align_rep.to_dict()
        finish(row, sess, labels, logits)
        log(f"{row.label}: top-1 {row.top1:.2f}% (fake quant {row.fake_quant_top1:.2f}%), agreement "
            f"{row.agreement:.2f}%, max |diff| {row.max_abs_error:.4g}, int8 ops {row.int8_ops}")
    from bitalloc.batches import cut_inputs
    from bitalloc.runtime.ort import input_feed

    xs = concat_inputs([batch_inputs(b) for b in evaluation])
    names = [i.name for i in sessions[rows[0].label].get_inputs()]
    for bs in batch_sizes:
        if n_eval < bs:
            raise ConfigError(f"batch size {bs} needs at least {bs} evaluation samples (have {n_eval})")
        lat = interleaved_latency(sessions, input_feed(names, cut_inputs(xs, bs)), runs=runs, warmup=warmup,
                                  min_seconds=min_seconds)
        base = lat[rows[0].label].median_ms
        for row in rows:
            row.latency[str(bs)] = lat[row.label].to_dict()
            row.speedup[str(bs)] = base / lat[row.label].median_ms
        log(f"batch {bs}: " + ", ".join(f"{r.label}: {lat[r.label].median_ms:.2f} ms" for r in rows))
    result = {"threads": threads, "runs": runs, "min_seconds": min_seconds, "warmup": warmup,
              "batch_sizes": list(batch_sizes),
              "calibration_samples": int(sum(batch_size(batch_inputs(b)) for b in calib)),
              "evaluation_samples": n_eval, "labels": "given" if n_eval and _labelled(evaluation) else
              "none: top-1 is the agreement with the FP32 model", "rows": [r.to_dict() for r in rows]}
    result["verdicts"] = verdicts(result, latency_tolerance=latency_tolerance)
    return result


def concat_inputs(parts: list[Any]) -> Any:
    """Batches of model inputs (tensors, tuples or dicts of tensors) joined along the batch dimension."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return type(first)(torch.cat([p[i] for p in parts]) for i in range(len(first)))
    return {k: torch.cat([p[k] for p in parts]) for k in first}


def _labelled(evaluation: list) -> bool:
    b = evaluation[0]
    return isinstance(b, (list, tuple)) and len(b) > 1 and b[1] is not None


def claim_row(result: dict[str, Any]) -> dict[str, Any] | None:
    """The bitalloc row the checks refer to: the first bitalloc row at W8A8 (else the first bitalloc row)."""
    rows = [r for r in result["rows"] if r["kind"] == "bitalloc"]
    for r in rows:
        if r.get("w_bits") == 8 and r.get("a_bits") == 8:
            return r
    return rows[0] if rows else None


def verdicts(result: dict[str, Any], *, latency_tolerance: float = LATENCY_TOLERANCE) -> list[dict[str, Any]]:
    """One verdict per check of the claim row (see module docstring): a list of {"name", "check" (bool),
    "verdict" ("PASS" / "PASS (within timing noise)" / "FAIL"), "text"}."""
    row = claim_row(result)
    if row is None:
        return []
    anchors = [r for r in result["rows"] if r["kind"] == "ort"]
    w8a8 = row.get("w_bits") == 8 and row.get("a_bits") == 8
    bits = f"W{row.get('w_bits', 0):g}A{row.get('a_bits', 0):g}"
    out: list[dict[str, Any]] = []

    def add(name: str, ok: bool, text: str, noise: bool = False) -> None:
        verdict = "PASS (within timing noise)" if ok and noise else ("PASS" if ok else "FAIL")
        out.append({"name": name, "check": bool(ok), "verdict": verdict, "text": text})

    ag = row.get("agreement")
    if ag is not None:
        add("agreement", w8a8 and ag >= AGREEMENT_MIN,
            f"top-1 agreement of onnxruntime with the bitalloc model ({bits}{'' if w8a8 else ', not W8A8'}): "
            f"{ag:.2f}% (>= {AGREEMENT_MIN:g}% required)")
    for a in anchors:
        add(f"top1 >= {a['label']}", row["top1"] >= a["top1"],
            f"top-1 {row['top1']:.2f}% vs {a['label']} {a['top1']:.2f}%")
    ref = next((a for a in anchors if "minmax" in a["label"].lower()), anchors[0] if anchors else None)
    if ref is not None:
        for b in (str(x) for x in result["batch_sizes"]):
            mine, theirs = row["latency"][b]["median_ms"], ref["latency"][b]["median_ms"]
            ratio = mine / theirs
            add(f"latency batch {b}", ratio <= 1.0 + latency_tolerance,
                f"latency at batch {b}: {mine:.2f} ms vs {ref['label']} {theirs:.2f} ms (ratio {ratio:.3f}; <= 1 "
                f"required, <= {1 + latency_tolerance:.2f} counted as timing noise)", noise=ratio > 1.0)
    return out


def verdict_lines(result: dict[str, Any], *, heading: bool = True) -> list[str]:
    row = claim_row(result)
    if row is None:
        return []
    lines = [f"Checks of the claim row \"{row['label']}\" (config {row.get('config')}):"] if heading else []
    lines += [f"- {v['verdict']}: {v['text']}" for v in result.get("verdicts", [])]
    return lines


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    bss = [str(b) for b in result["batch_sizes"]]
    cols = ["model", "top-1 %", "fake-quant top-1 %", "agreement %", "max |diff|", "int8 / float convs"]
    for b in bss:
        cols += [f"batch {b} ms", f"x FP32 (b{b})"]
    rows = []
    for r in result["rows"]:
        line = [r["label"], r["top1"], r["fake_quant_top1"], r["agreement"], r["max_abs_error"],
                f"{r['int8_ops']} / {r['float_ops']}"]
        for b in bss:
            line += [r["latency"][b]["median_ms"], r["speedup"][b]]
        rows.append(line)
    return cols, rows


def register_cpu(sub: Any) -> None:
    p = sub.add_parser("cpu", help="latency / accuracy table of FP32, onnxruntime's static quantization and "
                                   "bitalloc exports on this CPU",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_data_args(p)
    add_input_args(p)
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"comma list of PRESET/WxA[/ALIGN[/BIAS_SHIFT[/ACT_GRANULARITY]]] (default {DEFAULT_CONFIGS})")
    p.add_argument("--batch-sizes", default="1,32", help="comma list of batch sizes to time (default 1,32)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model and batch size (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs (default 3)")
    p.add_argument("--min-seconds", type=float, default=1.0,
                   help="time each model for at least this many seconds per batch size (default 1; 0: --runs only)")
    p.add_argument("--no-anchors", action="store_true", help="skip onnxruntime's own static quantization")
    p.add_argument("--latency-tolerance", type=float, default=LATENCY_TOLERANCE,
                   help=f"latency verdict: a ratio to onnxruntime's static MinMax up to 1 + this counts as timing "
                        f"noise (default {LATENCY_TOLERANCE})")
    p.add_argument("--out", default="runs/bench-cpu", help="output folder (ONNX files, bench.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bench.json in --out")
    p.set_defaults(func=run_cpu)


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="measured run time: `bitalloc bench cpu`",
                       description="Measured run time of exported models.")
    inner = p.add_subparsers(dest="bench_command", metavar="TARGET")
    inner.required = True
    register_cpu(inner)


def run_cpu(args: argparse.Namespace) -> int:
    from bitalloc.io import write_json
    from bitalloc.runtime.onnx_export import _require_onnx
    from bitalloc.runtime.ort import _require_ort

    _require_onnx()
    _require_ort()
    configs = parse_configs(args.configs)
    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
    except ValueError:
        raise ConfigError(f"--batch-sizes {args.batch_sizes!r}: give a comma list of integers, e.g. 1,32") from None
    if not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError("--batch-sizes: give positive batch sizes")
    if args.threads < 1 or args.runs < 1:
        raise ConfigError("--threads and --runs must be positive")
    if not args.min_seconds >= 0:
        raise ConfigError(f"--min-seconds must be >= 0, got {args.min_seconds}")
    out = Path(args.out)
    if (out / "bench.json").exists() and not args.overwrite:
        raise ConfigError(f"{out / 'bench.json'} exists; pass --overwrite or choose another --out")
    model, name, ckpt_dataset = load_model(args)
    data = model_data(args, model, name, ckpt_dataset)
    dataset = data.dataset
    result = bench_cpu(model, data.calib, data.eval_batches(), configs, out, batch_sizes=batch_sizes, threads=args.threads, runs=args.runs,
                       min_seconds=args.min_seconds, warmup=args.warmup, anchors=() if args.no_anchors else ("minmax", "entropy"),
                       latency_tolerance=args.latency_tolerance)
    result = {"model": name, "dataset": dataset, "data": args.data,
              "machine": machine_description(args.threads, onnxruntime=True),
              "command": "bitalloc " + " ".join(sys.argv[1:]), **result}
    write_json(out / "bench.json", result)
    cols, rows = table_rows(result)
    print_table(f"{name}: onnxruntime CPU, {args.threads} threads, median of at least {args.runs} runs and "
                f"{args.min_seconds:g} s per model", cols, rows)
    for line in verdict_lines(result):
        print(line)
    print(f"results: {out / 'bench.json'}", file=sys.stderr)
    return 0
