"""CPU latency and accuracy of bitalloc's ONNX QDQ exports in onnxruntime, against FP32 and onnxruntime's own
static quantization (MinMax and Entropy calibration on the same 32 calibration images).

    python benchmarks/onnx_latency.py --model efficientnet_lite0 --data $DATA/imagenet-sample.zip
    python benchmarks/onnx_latency.py --model resnet20 --checkpoint runs/models/resnet20-cifar10.pt --data $DATA/cifar10-jpeg.zip

Latencies: median of at least --runs timed runs (and 1 s of them per model) after --warmup runs, batch 1
and 32, onnxruntime CPU EP with 2 intra-op threads, all models timed in turns (per turn and model: a 0.1 s
pause, one untimed run, then 5 timed runs) so that background load on a shared machine hits every row alike;
compare rows through the "x FP32" ratios of one run. Re-run on a quiet machine for absolute numbers. Writes
benchmarks/results/onnx_latency.json (one entry per model) and the model's section of BENCHMARKS.md, which
ends with one verdict line per check of the claim row (the first W8A8 bitalloc configuration,
``percentile/8x8/model`` by default): top-1 agreement >= 99% with the bitalloc model, top-1 >= each onnxruntime
static anchor (MinMax, Entropy), latency at batch 1 and 32 <= onnxruntime static MinMax (ratios up to
1 + --latency-tolerance are reported as "within timing noise").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, git_revision, md_table, model_data_parser, update_section  # noqa: E402

from bitalloc.cli.bench import (LATENCY_TOLERANCE, bench_cpu, claim_row,  # noqa: E402
                                parse_configs, table_rows, verdict_lines)
from bitalloc.cli.common import batches, load_model, load_splits  # noqa: E402
from bitalloc.io import write_json  # noqa: E402
from bitalloc.report.machine import machine_description  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "onnx_latency.json"
# the first configuration is the claim row of the verdicts (the W8A8 deployment recipe); then the others for context
DEFAULT_CONFIGS = ("percentile/8x8/model,minmax/8x8/model,minmax/8x8/ort,minmax/8x8/none,"
                   "aciq-gptq/4x8/model,aciq-gptq/4x4/model,aciq/4x4/none/exact,aciq/4x4/ort/requantize")


def markdown(model: str, dataset: str, result: dict) -> str:
    cols, rows = table_rows(result)
    bitalloc = [r for r in result["rows"] if r["kind"] == "bitalloc"]
    lines = [f"### ONNX export and CPU latency: {model} ({dataset}, {result['calibration_samples']} calibration "
             f"images, {result['evaluation_samples']} evaluation images)", "",
             "onnxruntime CPU execution provider, "
             f"{result['threads']} intra-op threads; latency = median of at least {result['runs']} runs (and at "
             f"least {result.get('min_seconds', 0):g} s of timed runs per model) after {result['warmup']} warm-up "
             "runs, models timed in turns of 5 runs (each turn after a 0.1 s pause, so that the previous model's "
             "spinning worker threads go idle, and one untimed run), model after model; \"x FP32\" = FP32 latency / model "
             "latency in the same run. top-1 on the evaluation images; agreement and max |diff| (logits) compare "
             "onnxruntime's output with bitalloc's fake-quant PyTorch model (fake-quant top-1 column). int8 / float "
             "convs: convolutions and matrix products onnxruntime runs with integer kernels (QLinearConv, QGemm, "
             "...) / in float, after its graph optimizations. bitalloc rows: per-channel symmetric int8 weights "
             "(4-bit grids clamped on int8), per-tensor uint8 activations; align model = onnxruntime's int8 "
             "quantization points (uint8 Q/DQ on conv outputs and residual adds, int32-grid biases) made part of the "
             "bitalloc model (`bitalloc.runtime.align_for_ort`), then exported: every conv runs in int8 and the "
             "agreement is with that model; align ort = the same extra Q/DQ added to the ONNX file only "
             "(agreement with the model without them); align none = exactly bitalloc's quantization points; "
             "shift = how ACIQ's bias-correction shift is exported (exact float branch, or requantize: a finer "
             "int8 weight grid, approximate).", "",
             md_table(cols, rows), ""]
    claim = claim_row(result)
    if claim is not None:
        lines += [f"Checks: the claims refer to the row \"{claim['label']}\" (`--configs {claim.get('config')}`), "
                  "the first W8A8 bitalloc configuration of the run.", ""]
        lines += verdict_lines(result, heading=False) + [""]
    for r in bitalloc:
        e = r["export"] or {}
        extra = len(e.get("extra_qdq", []))
        inside = len(e.get("model_points", []))
        lines.append(f"- {r['label']}: {e.get('int8_layers', 0)} of {len(e.get('layers', []))} layers with 8-bit "
                     f"integer weights and activations, {inside} tensor quantizers in the model, {extra} export-only "
                     f"Q/DQ points; file {r['size_mb']:.2f} MB.")
    lines += ["", f"Machine: {result['machine']}. Revision {result['revision']}. Command: `{result['command']}`"]
    return "\n".join(lines)


def main() -> int:
    ap = model_data_parser(__doc__, batch_size=32)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", help="folder for the ONNX files (default runs/onnx-latency-MODEL)")
    ap.add_argument("--latency-tolerance", type=float, default=LATENCY_TOLERANCE,
                    help="latency verdict: ratio to onnxruntime static MinMax up to 1 + this = timing noise")
    ap.add_argument("--cache-dir", default=None, help="decoded-image cache (default $BITALLOC_CACHE)")
    ap.add_argument("--no-md", action="store_true", help="do not update BENCHMARKS.md / the results JSON")
    args = ap.parse_args()
    from bitalloc import models

    model, name, ckpt_dataset = load_model(args)
    dataset = args.dataset or ckpt_dataset or models.model_info(name).default_dataset
    calib, evaluation = load_splits(dataset, args.data, args.calib, seed=args.seed, limit=args.limit,
                                    cache_dir=args.cache_dir)
    out = Path(args.out or f"runs/onnx-latency-{name}")
    result = bench_cpu(model, batches(calib, min(args.batch_size, args.calib)), batches(evaluation, args.batch_size),
                       parse_configs(args.configs), out, threads=args.threads, runs=args.runs, warmup=args.warmup,
                       batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
                       latency_tolerance=args.latency_tolerance)
    result = {"model": name, "dataset": dataset, "checkpoint": args.checkpoint,
              "machine": machine_description(args.threads, onnxruntime=True),
              "revision": git_revision(), "command": command_line(), **result}
    cols, rows = table_rows(result)
    from bitalloc.report.tables import print_table

    print_table(f"{name}: onnxruntime CPU latency", cols, rows)
    for line in verdict_lines(result):
        print(line)
    if not args.no_md:
        allres = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        allres[name] = result
        write_json(RESULTS, allres)
        update_section(f"onnx-latency-{name}", markdown(name, dataset, result))
        print(f"results: {RESULTS}; section onnx-latency-{name} of BENCHMARKS.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(2)
    sys.exit(main())
