"""Mixed precision under a latency budget (issue 17): which layers stay float, from measured onnxruntime latencies.

    python benchmarks/latency_budget.py --model efficientnet_lite0 --data $DATA/imagenet-sample.zip --split anchors

Steps: FP32 top-1 on the evaluation images; the sensitivity of every searched layer at the candidates
(``--candidates``, default 8x8,f: int8 or float) under ``--preset`` (default percentile W8A8, first and last layer
searched too); the per-layer onnxruntime latencies (:mod:`bitalloc.search.latency`: each layer alone, float
against onnxruntime's W8A8, batch ``--latency-batch``, ``--threads`` threads); then for each budget of
``--budgets`` the exact search, the chosen configuration quantized and evaluated, and exported whole and timed
against the FP32 model (predicted sum of the layers against measured). Run with nothing else on the cores.

Writes benchmarks/results/latency_budget_<model>.json and the BENCHMARKS.md section ``latency-<model>``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, git_revision, machine, md_table, model_data_parser, update_section  # noqa: E402

from bitalloc.batches import batch_inputs, cut_inputs  # noqa: E402
from bitalloc.cli.budget_sweep import masked_eval_fn  # noqa: E402
from bitalloc.cli.common import batches, load_model, load_splits  # noqa: E402
from bitalloc.config import preset  # noqa: E402
from bitalloc.errors import ConfigError  # noqa: E402
from bitalloc.io import write_json  # noqa: E402
from bitalloc.ptq import run_ptq  # noqa: E402
from bitalloc.report.stats import encode_mask, paired_comparison  # noqa: E402
from bitalloc.search import check_choice, layer_sensitivity, parse_budgets, search  # noqa: E402
from bitalloc.search.latency import LATENCY_KEY, add_latency, kernel_of, model_latency  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def render(res: dict[str, Any]) -> str:
    lat = res["latency"]
    head = (f"### Mixed precision under a latency budget: {res['model']}\n\n"
            f"Machine: {res['machine']}. Revision {res['revision']}. onnxruntime, {lat['threads']} threads, batch "
            f"{lat['batch']}. Command: `{res['command']}`\n\n"
            f"{res['model']} on the {res['split']} split ({res['eval_images']} evaluation images, "
            f"{res['calibration_images']} calibration images); base configuration {res['preset']} W8A8, candidates "
            f"{', '.join(res['candidates'])}; FP32 top-1 {res['fp32_top1']:.2f}%. Per-layer latencies: "
            f"{len(lat['layers'])} layers, each alone in float and at onnxruntime's W8A8, the cost of a call "
            f"subtracted; FP32 model {lat['fp32_model_ms']:.2f} ms; the layers alone sum to "
            f"{sum(r['float_ms'] for r in lat['layers']):.2f} ms in float and "
            f"{sum(r['int8_ms'] for r in lat['layers']):.2f}"
            f" ms in int8 between int8 neighbours ({sum(r['int8_ms'] < r['float_ms'] for r in lat['layers'])} of "
            f"{len(lat['layers'])} layers faster in int8; {sum(r['int8_alone_ms'] for r in lat['layers']):.2f} ms with "
            f"each layer's own input and output conversions); measured in {lat['seconds']:.0f} s (sensitivity "
            f"{res['sensitivity_seconds']:.0f} s).\n\n")
    rows = []
    for r in res["rows"]:
        if "infeasible" in r:
            rows.append([r["budget"], "infeasible: no choice is predicted that fast"] + [""] * 8)
            continue
        c = r["check"]
        rows.append([r["budget"], f"{r['limit_ms']:.2f}", r["int8_layers"], f"{r['predicted_ms']:.2f}",
                     f"{c['latency']['quantized_ms']:.2f}", f"{c['latency']['fp32_ms']:.2f}",
                     f"{c['latency']['fp32_ms'] / c['latency']['quantized_ms']:.2f}x",
                     f"{c['latency']['int8_ops']} / {c['latency']['float_ops']}", f"{r['top1']:.2f}",
                     f"{100 * r['paired']['diff']:+.2f} +- {196 * r['paired']['se']:.2f}"])
    table = md_table(["budget", "limit ms", "int8 layers", "predicted ms", "measured ms", "FP32 measured ms",
                      "speed-up", "int8 / float kernels", "top-1 %", "vs FP32 (paired, points)"], rows)
    u = res["uniform_w8a8"]
    note = (f"\n\nEvery searched layer at W8A8 ({res['preset']}, exported whole, no search): "
            f"{u['latency']['quantized_ms']:.2f} ms against FP32 {u['latency']['fp32_ms']:.2f} ms in the same turns "
            f"({u['latency']['fp32_ms'] / u['latency']['quantized_ms']:.2f}x; {u['latency']['int8_ops']} int8 "
            f"kernels), top-1 {u['top1']:.2f}%.")
    fp32 = [u["latency"]["fp32_ms"]] + [r["check"]["latency"]["fp32_ms"] for r in res["rows"] if "check" in r]
    note += (f"\n\nThe FP32 model measured {min(fp32):.2f} to {max(fp32):.2f} ms across the rows of this run (the same "
             "file, timed in turns with each configuration): compare configurations only with the FP32 time of their "
             "own row.")
    note += ("\n\nPredicted = the rest of the network (FP32 model minus its layers' float times) plus each layer's "
            "time on its chosen kernel plus the conversions where int8 runs begin and end; measured = the chosen "
            "configuration exported whole (bitalloc's QDQ export with onnxruntime's int8 points) and timed in turns "
            "against the FP32 model in the same run. "
            "`latency=W8A8`: the time of every searched layer on int8 kernels.")
    return head + table + note


def main() -> int:
    ap = model_data_parser(__doc__, batch_size=50)
    ap.add_argument("--split", choices=("random", "anchors"), default="anchors")
    ap.add_argument("--preset", default="percentile", help="base configuration, at W8A8 (default percentile)")
    ap.add_argument("--candidates", default="8x8,f", help="search candidates (default 8x8,f)")
    ap.add_argument("--budgets", default="latency=W8A8,60%,70%,80%,90%", help="latency budgets, in run order")
    ap.add_argument("--latency-batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads (2)")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--out", help="JSON results (default benchmarks/results/latency_budget_MODEL.json)")
    ap.add_argument("--no-md", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--render-only", action="store_true", help="only render BENCHMARKS.md from the results JSON")
    args = ap.parse_args()
    if args.render_only:
        import json

        res = json.loads((Path(args.out) if args.out else RESULTS / f"latency_budget_{args.model}.json").read_text())
        update_section(f"latency-{res['model']}", render(res))
        return 0
    from bitalloc import models

    args.checkpoint = args.checkpoint or None
    model, name, ckpt_ds = load_model(args)
    out = Path(args.out) if args.out else RESULTS / f"latency_budget_{name}.json"
    dataset = args.dataset or ckpt_ds or models.model_info(name).default_dataset
    calib, evaluation = load_splits(dataset, args.data, args.calib, limit=args.limit, split=args.split)
    calib_batches = batches(calib, min(args.batch_size, args.calib))
    masks: dict[int, Any] = {}
    evaluate = masked_eval_fn(evaluation, args.batch_size, masks)
    fp32_top1, fp32_s = evaluate(model)
    fp32_correct = masks.pop(id(model))
    print(f"{name}: FP32 top-1 {fp32_top1:.2f}% on {len(evaluation)} images", flush=True)

    cfg = preset(args.preset, 8, 8, calibration_samples=args.calib, first_last_bits=None)
    sens = layer_sensitivity(model, cfg, calib_batches, args.candidates, reference_bits=["8x8"])
    example = cut_inputs(batch_inputs(calib_batches[0]), args.latency_batch)
    t0 = time.perf_counter()
    sens = add_latency(model, sens, example, threads=args.threads,
                       progress=lambda n, total: print(".", end="", flush=True))
    print(f"\nlatency table: {time.perf_counter() - t0:.0f} s; FP32 model {sens.latency['fp32_model_ms']:.2f} ms",
          flush=True)
    res: dict[str, Any] = {"model": name, "dataset": dataset, "split": args.split, "eval_images": len(evaluation),
                           "calibration_images": args.calib, "preset": args.preset,
                           "candidates": [c.label for c in sens.candidates], "fp32_top1": fp32_top1,
                           "sensitivity_seconds": sens.seconds["total"], "latency": sens.latency, "rows": [],
                           "machine": machine(), "command": command_line(), "revision": git_revision()}
    # every searched layer on the int8 kernel, measured whole: what int8 gives on this machine today
    uniform = preset(args.preset, 8, 8, calibration_samples=args.calib, first_last_bits=None)
    r = run_ptq(model, uniform, calib_batches, evaluate, fp32_top1=fp32_top1, fp32_eval_seconds=fp32_s,
                name=f"{args.preset} W8A8")
    correct = masks.pop(id(r.model))
    res["uniform_w8a8"] = {"top1": r.report["top1"], "paired": paired_comparison(correct, fp32_correct).to_dict(),
                           "latency": model_latency(model, r.model, calib_batches, example, threads=args.threads)}
    u = res["uniform_w8a8"]["latency"]
    print(f"  uniform W8A8: {u['quantized_ms']:.2f} ms against FP32 {u['fp32_ms']:.2f} ms ({u['int8_ops']} int8 "
          f"kernels), top-1 {r.report['top1']:.2f}%", flush=True)
    for budget in parse_budgets(args.budgets):
        try:
            found = search(sens, budget)
        except ConfigError as exc:  # below the fastest configuration measured
            res["rows"].append({"budget": budget.text, "infeasible": str(exc)})
            print(f"  {budget.text:16s} {exc}", flush=True)
            continue
        r = run_ptq(model, found.config, calib_batches, evaluate, fp32_top1=fp32_top1, fp32_eval_seconds=fp32_s,
                    name=f"{args.preset} {budget.text}")
        correct = masks.pop(id(r.model))
        check = check_choice(model, found, sens, calib_batches, qmodel=r.model, layer_effects=False)
        check["latency"]["threads"] = args.threads
        row = {"budget": budget.text, "limit_ms": found.limit, "predicted_ms": found.cost[LATENCY_KEY],
               "int8_layers": sum(kernel_of(c) == "int8" for c in found.choice.values()),
               "float_layers": [n for n, c in found.choice.items() if c.is_float], "top1": r.report["top1"],
               "predicted_damage": found.predicted, "check": check, "correct": encode_mask(correct),
               "paired": paired_comparison(correct, fp32_correct).to_dict()}
        res["rows"].append(row)
        write_json(out, res)
        print(f"  {budget.text:16s} predicted {row['predicted_ms']:.2f} ms, measured "
              f"{check['latency']['quantized_ms']:.2f} ms (FP32 {check['latency']['fp32_ms']:.2f} ms), "
              f"{row['int8_layers']} int8 layers, top-1 {row['top1']:.2f}%", flush=True)
    if not args.no_md:
        update_section(f"latency-{name}", render(res))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(2)
    sys.exit(main())
