"""``bitalloc sweep --budget``: Pareto fronts of searched mixed precision against uniform widths, no training.

    bitalloc sweep --budget bops=W8A8,W4A8,W4A4,W2A8 --model efficientnet_lite0 --data imagenet-sample.zip \\
        --split anchors --preset aciq-gptq --out-dir runs/mixed-sweep

One sensitivity pass (or ``--sensitivity FILE`` from ``bitalloc sensitivity``), then for each budget the exact
search (:func:`bitalloc.search.search`), post-training quantization with the searched configuration (written as
``mixed-<kind>-<value>.json``, a QuantConfig for ``--config``), evaluation and cost; and the same for uniform
widths (``--uniform``, default the widths the budgets name, e.g. W4A8 for bops=W4A8) with the same
configuration. The points go into ``sweep.json`` (methods "mixed <preset>" and "uniform <preset>", with which
evaluation samples each gets right, for paired comparisons) with the Pareto flags of ``bitalloc sweep``,
``pareto.png`` (accuracy against relative BOPs) and ``pareto-size.png`` (against model size).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bitalloc.cli.common import QUANT_OPTIONS, SPLITS, add_quant_args, build_config, flag, given
from bitalloc.errors import ConfigError

#: options of the budget mode only (sweep dests); the training sweep's own options are refused with --budget
#: (--trust-code and --model-kwargs serve both: a trained sweep passes them to every `bitalloc train`)
BUDGET_OPTIONS = ("budget", "uniform", "checkpoint", "calib", "split", "seed", "limit", "cache_dir", "candidates",
                  "metric", "sensitivity", "config", "weights", "latency_batch",
                  "latency_threads") + QUANT_OPTIONS
TRAIN_OPTIONS = ("method", "mu", "bits", "configs", "epochs", "steps", "init", "fp32", "tag", "retrain", "progress")


def add_budget_sweep_args(p: argparse.ArgumentParser) -> None:
    """The options of ``sweep --budget`` (post-training mixed precision instead of trained runs)."""
    from bitalloc.cli.model_args import add_user_model_args
    from bitalloc.cli.sensitivity import add_search_args

    g = p.add_argument_group("post-training mixed precision (--budget, instead of --method)")
    g.add_argument("--budget", metavar="KIND=V1,V2,...",
                   help="search mixed precision at each budget (bops=W8A8,W4A8,W4A4 or bops=2%%,4%% or "
                        "size=1MB,2MB) and compare with uniform widths; no training")
    g.add_argument("--uniform", metavar="WxA,...",
                   help="uniform widths to compare with (default: those the budgets name, e.g. 4x8 for bops=W4A8)")
    g.add_argument("--checkpoint", default=None, help="the FP32 checkpoint (`bitalloc train`) of --model")
    add_user_model_args(g)
    g.add_argument("--calib", type=int, default=32, help="calibration samples (default 32)")
    g.add_argument("--split", choices=SPLITS, default="random",
                   help="calibration / evaluation split: random (seeded, --seed) or anchors (default random)")
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration split (default 0)")
    g.add_argument("--limit", type=int, default=None, help="evaluate on the first N evaluation samples only")
    g.add_argument("--cache-dir", default=None, help="cache of decoded images")
    g.add_argument("--sensitivity", metavar="FILE", help="a sensitivity.pt from `bitalloc sensitivity` (same options)")
    add_search_args(p, group="post-training mixed precision: sensitivity")
    add_quant_args(p)


def check_mode(args: argparse.Namespace) -> None:
    """--budget and --method are two kinds of sweep: each one's options with the other are errors."""
    cli = given(args)
    if getattr(args, "budget", None):
        stray = [flag(d) for d in TRAIN_OPTIONS if d in cli] + (["-- ..."] if args.train_args else [])
        if stray:
            raise ConfigError(f"{', '.join(stray)}: options of trained sweeps (--method), which --budget does not "
                              "train; drop them, or drop --budget")
        return
    stray = [flag(d) for d in BUDGET_OPTIONS if d in cli]
    if stray:
        raise ConfigError(f"{', '.join(stray)} {'belongs' if len(stray) == 1 else 'belong'} to post-training sweeps "
                          "(--budget KIND=V1,V2,...); add --budget or drop them")
    if not getattr(args, "method", None):
        raise ConfigError("give --method bb,lsq,pact (trained sweep) or --budget KIND=V1,V2 (post-training mixed "
                          "precision)")


def masked_eval_fn(evaluation: Any, batch_size: int, masks: dict[int, np.ndarray]
                   ) -> Callable[[Any], tuple[float, float]]:
    """``fn(model) -> (top-1 %, seconds)``; which samples each model gets right lands in ``masks[id(model)]``."""
    from bitalloc.cli.common import make_eval_fn

    evaluate = make_eval_fn(evaluation, batch_size, progress="off")

    def fn(model: Any) -> tuple[float, float]:
        result = evaluate(model)
        masks[id(model)] = evaluate.correct.pop(id(model))  # type: ignore[attr-defined]
        return result

    return fn


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "", text.replace("%", "pct"))


def run_budget_sweep(args: argparse.Namespace) -> int:
    from bitalloc import models
    from bitalloc.cli.common import batches, load_model, load_splits
    from bitalloc.cli.sensitivity import measured_or_loaded, with_latency
    from bitalloc.cli.sweep import write_outputs
    from bitalloc.io import write_json
    from bitalloc.ptq import run_ptq
    from bitalloc.report.plots import PlotsUnavailable, pareto_plot, plots_available
    from bitalloc.report.stats import encode_mask
    from bitalloc.search import parse_budgets, parse_candidates, search

    budgets = parse_budgets(args.budget)
    uniform = parse_candidates(args.uniform) if args.uniform else sorted(
        {b.uniform for b in budgets if b.uniform is not None}, reverse=True)
    model, name, ckpt_dataset = load_model(args)
    dataset = args.dataset or ckpt_dataset or models.model_info(name).default_dataset
    cfg = build_config(args)
    label = args.preset if not args.config else Path(args.config).stem
    calib, evaluation = load_splits(dataset, args.data, args.calib, seed=args.seed, limit=args.limit,
                                    cache_dir=args.cache_dir, split=args.split)
    calib_batches = batches(calib, min(args.eval_batch_size, args.calib))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args.batch_size = args.eval_batch_size
    sens = measured_or_loaded(args, model, cfg, calib_batches, tuple(uniform))
    if any(b.kind == "latency" for b in budgets):
        sens = with_latency(model, sens, calib_batches, args)
    masks: dict[int, np.ndarray] = {}
    evaluate = masked_eval_fn(evaluation, args.eval_batch_size, masks)
    fp32_top1, fp32_s = evaluate(model)
    masks.clear()
    plots = plots_available()
    done: dict[str, dict[str, Any]] = {}

    def point(method: str, pname: str, qcfg: Any, extra: dict[str, Any]) -> None:
        res = run_ptq(model, qcfg, calib_batches, evaluate, fp32_top1=fp32_top1, fp32_eval_seconds=fp32_s, name=pname)
        r = res.report
        rec = {"method": method, "name": pname, "top1": r["top1"] / 100.0, "relative_bops": r["relative_bops"],
               "bops": r["bops"], "memory_bits": r["memory_bits"], "correct": encode_mask(masks.pop(id(res.model))),
               "layers": [{k: l.get(k) for k in ("name", "w_bits", "a_bits")} for l in r["layers"]], **extra}
        done[pname] = rec
        write_outputs(out_dir, done, plots=plots)
        print(f"sweep: {pname}: top-1 {r['top1']:.2f}% at {100 * r['relative_bops']:.3f}% relative BOPs, "
              f"{r['memory_bits'] / 8e6:.4g} MB", file=sys.stderr)

    def latency_of(choice: dict[str, Any]) -> dict[str, float]:
        return ({"predicted_latency_ms": sens.total_cost("latency_ms", choice)} if sens.latency is not None else {})

    for b in budgets:
        found = search(sens, b)
        pname = f"mixed-{b.kind}-{_slug(b.text.partition('=')[2])}"
        path = write_json(out_dir / f"{pname}.json", found.config.to_dict())
        point(f"mixed {label}", pname, found.config,
              {"setting": {"budget": b.text}, "config": str(path), "predicted_damage": found.predicted,
               "widths": found.to_dict()["widths"], **latency_of(found.choice)})
    for w in uniform:
        patches = {n: sens.patches[i][sens.cost_index(w)] for i, n in enumerate(sens.layers)}
        from bitalloc.search.space import searched_config

        point(f"uniform {label}", f"uniform-{w.label}", searched_config(cfg, patches),
              {"setting": {"w_bits": w.w_bits, "a_bits": w.a_bits}, **latency_of({n: w for n in sens.layers})})
    paths, merged = write_outputs(out_dir, done, plots=plots)
    if plots:
        series: dict[str, list[tuple[float, float]]] = {}
        names: dict[str, list[str]] = {}
        for p in merged.values():
            if p.get("memory_bits") is not None:
                series.setdefault(p["method"], []).append((p["memory_bits"] / 8e6, 100.0 * p["top1"]))
                names.setdefault(p["method"], []).append(p["name"])
        try:
            paths["pareto (size)"] = pareto_plot(series, out_dir / "pareto-size.png", xlabel="size (MB)",
                                                 title="accuracy vs size", labels=names)
        except PlotsUnavailable:
            pass
    print(f"{'point':<26} {'top-1 %':>8} {'rel. BOPs %':>12} {'size MB':>9}  Pareto (all / method)")
    for p in sorted(merged.values(), key=lambda p: (p["method"], p["relative_bops"])):
        mark = ("*" if p.get("pareto") else "-") + " / " + ("*" if p.get("pareto_method") else "-")
        size = f"{p['memory_bits'] / 8e6:>9.4g}" if p.get("memory_bits") is not None else f"{'-':>9}"
        print(f"{p['name']:<26} {100 * p['top1']:>8.2f} {100 * p['relative_bops']:>12.4f} {size}  {mark}")
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


__all__ = ["BUDGET_OPTIONS", "add_budget_sweep_args", "check_mode", "masked_eval_fn", "run_budget_sweep"]
