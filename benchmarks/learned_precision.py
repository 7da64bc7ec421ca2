"""Learned precision (Bayesian Bits, LSQ, PACT) against the Bayesian Bits paper, and training-step cost.

Steps (each resumable; long runs are meant for ``nohup ... &``)::

    # LeNet-5 / MNIST: Bayesian Bits mu sweep, LSQ 4/4 and PACT 4/4 (8-bit first/last layers), 10 epochs
    python benchmarks/learned_precision.py sweep --model lenet5 --data $DATA/mnist \\
        --init runs/models/lenet5-mnist.pt --out-dir runs/learned/lenet5-mnist --method bb --mu 0.1,0.2,0.3 \\
        -- --gate-lr 1e-2 --bb-fix-gates-epochs 2
    python benchmarks/learned_precision.py sweep --model lenet5 --data $DATA/mnist \\
        --init runs/models/lenet5-mnist.pt --out-dir runs/learned/lenet5-mnist --method lsq,pact --bits 4
    # CIFAR-10 (ResNet-20 on 2 CPU cores; VGG-7 where a GPU is available): LSQ / PACT points + mu sweep
    python benchmarks/learned_precision.py sweep --model resnet20 --data $DATA/cifar10-jpeg.zip \\
        --init runs/models/resnet20-cifar10.pt --out-dir runs/learned/resnet20-cifar10 --method lsq,pact --bits 4 \\
        --epochs 3 -- --lr 1e-4 --q-granularity channel
    python benchmarks/learned_precision.py sweep --model resnet20 --data $DATA/cifar10-jpeg.zip \\
        --init runs/models/resnet20-cifar10.pt --out-dir runs/learned/resnet20-cifar10 --method bb --mu 0.01,0.03 \\
        --epochs 3 -- --lr 1e-4 --q-granularity channel --gate-lr 1e-2 --gate-init 6,6,-6,-6 --bb-fix-gates-epochs 1
    # the same with 6 epochs for every method (folder resnet20-cifar10-6ep): --epochs 6, --bb-fix-gates-epochs 2,
    # LSQ 4/4, Bayesian Bits mu 0.04 (8-bit start) and, with --tag=-init4 and --gate-init 6,-6,-6,-6, mu 0.03
    # from a 4-bit start (--tag keeps runs of other train options apart in one folder); ranges at the weights' lr
    # (the default since; runs tagged -rlr), mu 0.02,0.025,0.03, and seed replicates of LSQ 4/4 and mu 0.02:
    python benchmarks/learned_precision.py sweep --model resnet20 --data $DATA/cifar10-jpeg.zip \\
        --init runs/models/resnet20-cifar10.pt --out-dir runs/learned/resnet20-cifar10-6ep --method bb \\
        --mu 0.02,0.025,0.03 --epochs 6 --tag=-rlr -- --lr 1e-4 --q-granularity channel --gate-lr 1e-2 \\
        --gate-init 6,6,-6,-6 --bb-fix-gates-epochs 2
    #   ... --method bb --mu 0.02 --tag=-rlr-s1 -- <as above> --seed 1
    #   ... --method lsq --bits 4 --tag=-s1 -- --lr 1e-4 --q-granularity channel --seed 1
    # Sweeps may run at the same time into one folder (one per core: OMP_NUM_THREADS=1 each).
    # 20-epoch runs (folder resnet20-cifar10-20ep): --epochs 20; LSQ 4/4, and Bayesian Bits mu 0.03, 0.015, 0.01
    # (one sweep per mu, so that each runs on its own core) with --bb-fix-gates-epochs 5:
    python benchmarks/learned_precision.py sweep --model resnet20 --data $DATA/cifar10-jpeg.zip \\
        --init runs/models/resnet20-cifar10.pt --out-dir runs/learned/resnet20-cifar10-20ep --method bb --mu 0.015 \\
        --epochs 20 -- --lr 1e-4 --q-granularity channel --gate-lr 1e-2 --gate-init 6,6,-6,-6 --bb-fix-gates-epochs 5
    # 8-epoch runs (folder resnet20-cifar10-8ep): LSQ 4/4 and Bayesian Bits mu 0.02, seeds 0 and 1 (--tag=-s1 ...
    # --seed 1), the last 2 epochs with fixed gates; their per-sample outcomes are kept in the results file, so
    # runs of later sessions from the same FP32 checkpoint pair with them without their run folders:
    python benchmarks/learned_precision.py sweep --model resnet20 --data $DATA/cifar10-jpeg.zip \\
        --init runs/models/resnet20-cifar10.pt --out-dir runs/learned/resnet20-cifar10-8ep --method lsq \\
        --bits 4 --epochs 8 -- --lr 1e-4 --q-granularity channel
    python benchmarks/learned_precision.py sweep --model resnet20 --data $DATA/cifar10-jpeg.zip \\
        --init runs/models/resnet20-cifar10.pt --out-dir runs/learned/resnet20-cifar10-8ep --method bb \\
        --mu 0.02 --epochs 8 -- --lr 1e-4 --q-granularity channel --gate-lr 1e-2 --gate-init 6,6,-6,-6 \\
        --bb-fix-gates-epochs 2
    #   ... likewise --mu 0.015 and --mu 0.04 (one sweep per mu and seed, one per core), and LSQ 3/4 (0.76x the
    #   BOPs of 4/4): --method lsq --bits 3x4 (seed 1: --tag=-s1 ... --seed 1); likewise --bits 2x4 (two seeds)
    #   and 3x3, and --method pact --bits 4
    # Issue 17: LSQ from per-layer widths searched without training (bitalloc ptq --budget bops=W4A4 / W3A4 / W2A4,
    # candidates 8x8,8x4,4x8,4x4,3x4,4x2,2x8,2x4,2x2, aciq-gptq, anchors split; searched.json copied to
    # benchmarks/results/mixed_lsq/mixed-<budget>.json), 8 epochs as the uniform runs (one sweep per file and core):
    python benchmarks/learned_precision.py sweep --model resnet20 --data $DATA/cifar10-jpeg.zip \
        --init runs/models/resnet20-cifar10.pt --out-dir runs/learned/resnet20-cifar10-8ep --method lsq \
        --configs benchmarks/results/mixed_lsq/mixed-W4A4.json --epochs 8 -- --lr 1e-4 --q-granularity channel
    #   ... likewise mixed-W3A4.json and mixed-W2A4.json, and mixed-W4A4.json with --tag=-s1 ... --seed 1;
    #   mixed-W3A3.json: searched at bops=W3A3 with candidates 8x8,8x4,4x8,4x4,3x4,2x8,2x4 (no 2-bit activations);
    #   mixed-W2A4-a3.json: at bops=W2A4 with candidates 8x8,8x4,4x8,4x4,3x4,2x8,2x4,4x3,3x3,2x3 (3-bit activations)
    # Issue 17: do short fine-tunes rank configurations as the 8-epoch ones do? One epoch (391 steps) of LSQ from
    # each searched configuration and from the uniform widths of its budget, trained on all but 5,000 training
    # images and chosen on those 5,000 (--holdout; two sweeps into one folder, one per core, OMP_NUM_THREADS=1):
    bitalloc sweep --model resnet20 --data $DATA/cifar10-jpeg.zip --init runs/models/resnet20-cifar10.pt \\
        --out-dir runs/trials/resnet20-cifar10-1ep --method lsq --bits 2x4 --steps 391 \\
        --configs benchmarks/results/mixed_lsq/mixed-W2A4-a3.json -- --lr 1e-4 --q-granularity channel \\
        --holdout 5000
    #   ... and --bits 3x3 --configs benchmarks/results/mixed_lsq/mixed-W3A3.json
    python benchmarks/learned_precision.py trials --trial-dir runs/trials/resnet20-cifar10-1ep \\
        --experiment resnet20-cifar10-8ep
    # LeNet-5 gate types (folder lenet5-mnist-gates): hard-concrete mu 0.1 and Gumbel-softmax mu 0.1, 0.03, 0.01
    python benchmarks/learned_precision.py sweep --model lenet5 --data $DATA/mnist \\
        --init runs/models/lenet5-mnist.pt --out-dir runs/learned/lenet5-mnist-gates --method bb --mu 0.1 \\
        -- --gate-lr 1e-2 --bb-fix-gates-epochs 2 --gates hard_concrete
    python benchmarks/learned_precision.py sweep --model lenet5 --data $DATA/mnist \\
        --init runs/models/lenet5-mnist.pt --out-dir runs/learned/lenet5-mnist-gates --method bb \\
        --mu 0.1 --tag=-gumbel -- --gate-lr 1e-2 --bb-fix-gates-epochs 2 --gates gumbel   # and --mu 0.03, 0.01
    # time per training step of each method relative to FP32 (same data, batch and optimizer, interleaved)
    python benchmarks/learned_precision.py timing --model lenet5 --data $DATA/mnist --steps 20 --rounds 3
    python benchmarks/learned_precision.py timing --model resnet20 --data $DATA/cifar10-jpeg.zip \\
        --steps 6 --warmup 2 --rounds 2
    python benchmarks/learned_precision.py timing --model vgg7 --data $DATA/cifar10-jpeg.zip \\
        --steps 3 --warmup 1 --rounds 1
    # collect everything: benchmarks/results/learned_precision.json and the BENCHMARKS.md section
    python benchmarks/learned_precision.py report

``sweep`` is ``bitalloc sweep`` (every point trained, frozen, evaluated and costed; finished runs are skipped,
interrupted ones resumed) plus the FP32 reference point. ``report`` reads ``sweep.json`` of every folder under
``runs/learned`` and the timing files, keeps the points of the previous results file whose run folders are not
there (``--drop-missing`` drops them; :func:`carry_points`), and checks the CIFAR-10 goal with paired comparisons
on the test images (:func:`goal_check`; points evaluated before per-sample outcomes were recorded get them by
re-running their sweep command, which only re-evaluates finished runs, or keep their earlier comparison). Each
experiment's Pareto plot (from all its points) and copies of its runs' bit-width plots are kept in
``benchmarks/results/learned_precision/<experiment>/`` (:func:`keep_plots`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, command_line, git_revision, machine, md_table, repo_path, update_section  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = ROOT / "runs" / "learned"

PAPER = {
    "lenet5-mnist": {"bb": "99.30% at 0.36% relative BOPs (mu = 0.1; 636 extra parameters)",
                     "bb-gumbel": "99.38% at 0.38%"},
    "lenet5-mnist-gates": {"bb": "hard-concrete gates 99.30% at 0.36% (mu = 0.1)",
                           "bb-gumbel": "Gumbel-softmax gates 99.38% at 0.38%; here both from one FP32 start"},
    "vgg7-cifar10": {"bb": "93.23% at 0.51% relative BOPs (mu = 0.01); 91.96% at 0.29% (mu = 0.1)",
                     "bb-gumbel": "93.19% at 0.44%"},
    "resnet20-cifar10": {"none": "the paper's CIFAR-10 network is VGG-7 (Bayesian Bits 93.23% at 0.51% relative BOPs, "
                                 "LSQ / PACT 4/4 below it); ResNet-20 stands in for it on this machine (see above)"},
    "resnet20-cifar10-6ep": {"none": "as resnet20-cifar10, with 6-epoch fine-tunes for every method (see above)"},
    "resnet20-cifar10-20ep": {"none": "as resnet20-cifar10, with 20-epoch fine-tunes (Bayesian Bits: the last 5 "
                                      "with fixed gates)"},
    "resnet20-cifar10-8ep": {"none": "as resnet20-cifar10, with 8-epoch fine-tunes (Bayesian Bits: the last 2 "
                                      "with fixed gates)"},
}


def _cli(argv: list[str]) -> int:
    from bitalloc.cli import main

    print("+ bitalloc " + " ".join(argv), file=sys.stderr, flush=True)
    return main(argv)


# ---- sweep ---------------------------------------------------------------------------------------------------

def cmd_sweep(args: argparse.Namespace, extra: list[str]) -> int:
    argv = ["sweep", "--model", args.model, "--method", args.method, "--out-dir", args.out_dir, "--progress",
            args.progress]
    for flag, value in (("--dataset", args.dataset), ("--data", args.data), ("--epochs", args.epochs),
                        ("--init", args.init), ("--mu", args.mu), ("--bits", args.bits), ("--configs", args.configs),
                        ("--fp32", args.fp32 or args.init), ("--tag", args.tag or None)):
        if value is not None:
            argv.append(f"{flag}={value}")
    if extra:
        argv += ["--"] + extra
    return _cli(argv)


# ---- timing --------------------------------------------------------------------------------------------------

def cmd_timing(args: argparse.Namespace, extra: list[str]) -> int:
    """Time per optimizer step of fp32 / lsq / pact / bb training on the same data, batch and optimizer.

    Each method trains ``--steps`` steps (after ``--warmup`` untimed steps) from the same initial weights;
    methods are interleaved over ``--rounds`` rounds and the fastest round per method is kept (the machine
    is shared, the minimum is the least disturbed measurement)."""
    import torch

    from bitalloc.cli import build_parser
    from bitalloc.cli.train import build_model, load_data
    from bitalloc.io import write_json
    from bitalloc.train import TrainConfig, fit
    from bitalloc.train.presets import get_method

    from bitalloc.models import model_info

    parser = build_parser()
    methods = [m for m in args.methods.split(",") if m]
    times: dict[str, list[float]] = {m: [] for m in methods}
    base_argv = ["train", "--model", args.model] + (["--dataset", args.dataset] if args.dataset else []) + (
        ["--data", args.data] if args.data else [])
    ns0 = parser.parse_args(base_argv)
    ns0.dataset = ns0.dataset or model_info(args.model).default_dataset
    train_set, _, num_classes = load_data(ns0, augment=False)
    bs = args.batch_size
    warm = torch.utils.data.Subset(train_set, range(bs * max(args.warmup, 1)))
    timed = torch.utils.data.Subset(train_set, range(bs * args.warmup, bs * (args.warmup + args.steps)))

    def config(steps: int) -> TrainConfig:
        return TrainConfig(optimizer="adam", lr=1e-3, batch_size=bs, steps=steps, schedule="constant",
                           progress="off", shuffle=False)

    for r in range(args.rounds):
        for m in methods:
            ns = parser.parse_args(base_argv + ["--method", m] + extra)
            ns.dataset = ns0.dataset
            method = get_method(m)
            opts = method.options(ns)
            torch.manual_seed(0)
            model, _, _ = build_model(ns, num_classes, False)
            model = method.prepare(model, opts)
            obj = method.make_objective(model, opts)
            if args.warmup:  # first batches: activation quantizers initialise, allocators warm up
                fit(model, warm, None, config(args.warmup), objective=obj)
            res = fit(model, timed, None, config(args.steps), objective=obj)
            times[m].append(float(res.time_per_step))
            print(f"round {r + 1}: {m}: {1000 * times[m][-1]:.1f} ms/step", file=sys.stderr, flush=True)
    best = {m: min(v) for m, v in times.items()}
    base = best.get("fp32")
    out = {"model": args.model, "dataset": ns0.dataset, "batch_size": args.batch_size, "steps": args.steps,
           "rounds": args.rounds, "threads": torch.get_num_threads(), "seconds_per_step": times, "best": best,
           "relative_to_fp32": {m: v / base for m, v in best.items()} if base else None,
           "median_relative_to_fp32": ({m: statistics.median(v) / statistics.median(times["fp32"]) for m, v in times.items()}
                                       if base else None),
           "machine": machine(), "command": command_line()}
    path = write_json(RESULTS / f"learned_timing_{args.model}.json", out)
    print(json.dumps(out["relative_to_fp32"], indent=1))
    print(f"results: {path}")
    return 0


# ---- report --------------------------------------------------------------------------------------------------

def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _pct(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}"


def _bits_summary(p: dict[str, Any]) -> str:
    parts = []
    for l in p.get("layers", []):
        kept = f", kept {100 * l['kept_fraction']:.0f}%" if l.get("kept_fraction", 1.0) < 0.999 else ""
        parts.append(f"{l['name']}: W{l['w_bits']:g}/A{l['a_bits']:g}{kept}")
    return "; ".join(parts)


def _uniform(p: dict[str, Any]) -> bool:
    """One weight and one activation bit width in every layer (the network input excepted) and nothing pruned:
    a network the gates did not make mixed-precision."""
    layers = p.get("layers") or []
    return (len({l["w_bits"] for l in layers}) <= 1 and len({l["a_bits"] for l in layers[1:]}) <= 1
            and all(l.get("kept_fraction", 1.0) >= 0.999 for l in layers))


def _setting(name: str) -> str:
    """A run's name without its seed suffix (``bb-mu0.02-rlr-s1`` -> ``bb-mu0.02-rlr``; ``--tag=-s<seed>``)."""
    return re.sub(r"-s\d+$", "", name)


def _seed(p: dict[str, Any]) -> int:
    return int((p.get("options") or {}).get("seed") or 0)


def _searched(p: dict[str, Any]) -> bool:
    """A run fine-tuned from a searched configuration's per-layer widths (``bitalloc sweep --configs``)."""
    return bool((p.get("setting") or {}).get("config"))


def _series(p: dict[str, Any]) -> str:
    """The front a point belongs to: its method, with runs from searched widths apart from uniform ones."""
    return f"{p['method']} (searched widths)" if _searched(p) else p["method"]


def _compare(p: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any] | None:
    """``p`` against ``ref`` on the same test images (:func:`bitalloc.report.stats.paired_comparison` of their
    per-sample outcomes): top-1 difference, its paired standard error and McNemar's exact p; None when either
    point has no per-sample outcomes."""
    from bitalloc.report.stats import decode_mask, paired_comparison

    if not (p.get("correct") and ref.get("correct")):
        return None
    c = paired_comparison(decode_mask(p["correct"]), decode_mask(ref["correct"]))
    return {"name": p["name"], "reference": ref["name"], "top1": p["top1"], "relative_bops": p["relative_bops"],
            "diff": c.diff, "se": c.se, "p_value": c.p_value, "only_bb": c.only_a, "only_reference": c.only_b}


def uniform_check(points: list[dict[str, Any]], method: str = "lsq") -> tuple[str, dict[str, Any]] | None:
    """Bayesian Bits against uniform precision at no more cost: each Bayesian Bits point is compared, on the
    same test images (:func:`_compare`), with the ``method`` run of its seed (else of seed 0) that has the most
    relative BOPs not above its own (e.g. LSQ 3/4 for a point between LSQ 3/4 and 4/4): the question the
    paper's Pareto fronts answer, whether the learned allocation beats the best uniform network it can afford.
    None when no Bayesian Bits point has such a run."""
    uniform = [q for q in points if _series(q) == method and q.get("correct")]
    rows, results = [], []
    for p in sorted((p for p in points if p["method"] == "bb"), key=lambda p: (p["relative_bops"], p["name"])):
        cheaper = [q for q in uniform if q["relative_bops"] <= p["relative_bops"] * (1 + 1e-9)]
        same_seed = [q for q in cheaper if _seed(q) == _seed(p)] or [q for q in cheaper if _seed(q) == 0]
        if not same_seed:
            continue
        ref = max(same_seed, key=lambda q: (q["relative_bops"], q["top1"]))
        r = _compare(p, ref)  # None when the Bayesian Bits point has no per-sample outcomes (an old carried one)
        if r is None:
            continue
        r["verdict"] = ("more accurate" if r["diff"] > r["se"] else
                        "less accurate" if -r["diff"] > r["se"] else "within one standard error")
        results.append(r)
        rows.append([p["name"], f"{ref['name']} ({_pct(ref['top1'])}% at {_pct(ref['relative_bops'], 3)}%)",
                     _pct(p["top1"]), _pct(p["relative_bops"], 3), f"{p['relative_bops'] / ref['relative_bops']:.2f}x",
                     f"{100 * r['diff']:+.2f} ± {100 * r['se']:.2f}", f"{r['p_value']:.3f}", r["verdict"]])
    if not rows:
        return None
    text = (f"**Against uniform precision at no more cost:** each Bayesian Bits run against the {method.upper()} run "
            "of its seed with the most BOPs not above its own, on the same test images (\"more accurate\" / \"less "
            "accurate\": by more than one paired standard error).\n\n"
            + md_table(["Bayesian Bits run", "against", "top-1 %", "rel. BOPs %", "BOPs vs it",
                        "top-1 difference (points)", "McNemar p", "verdict"], rows))
    return text, {"method": method, "points": results}


def goal_check(points: list[dict[str, Any]], reference: str = "lsq-w4a4",
               previous: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]] | None:
    """The issue's CIFAR-10 goal, "Bayesian Bits needs fewer BOPs than LSQ 4/4 at equal accuracy", checked with a
    paired comparison on the same test images (:func:`bitalloc.report.stats.paired_comparison`).

    The references are ``reference`` and its other seeds (``<reference>-s<seed>``, trained with ``--seed``);
    every Bayesian Bits point with fewer relative BOPs is compared with the reference of its own seed (else
    ``reference``): its top-1 difference with the paired standard error and McNemar's exact p-value. It is "as
    accurate" when the difference is >= 0, "level" when it is below 0 by less than one paired standard error,
    else "less accurate". Points whose frozen network has uniform precision and nothing pruned do not count
    (their BOPs saving is not learned mixed precision). The goal is met when a counted point is as accurate or
    level and so is every seed replicate of its setting (``<run>-s<seed>``; a replicate that lands at the
    reference's BOPs or above fails).

    ``previous`` is this function's result dict from an earlier report: a point without per-sample outcomes (its
    run folder is gone and it was recorded before they were kept in the results file) reuses its comparison
    there against the same reference instead of going without a verdict."""
    refs = {_seed(p): p for p in points if _setting(p["name"]) == reference}
    base = next((p for p in points if p["name"] == reference), None)
    if base is None:
        return None
    stored = {(r["name"], r["reference"]): r for r in (previous or {}).get("points", [])}
    rows, results = [], []
    for p in sorted((p for p in points if p["method"] == "bb" and p["relative_bops"] < base["relative_bops"]),
                    key=lambda p: (p["relative_bops"], p["name"])):
        ref = refs.get(_seed(p), base)
        if (r := _compare(p, ref)) is not None:
            r["verdict"] = "as accurate" if r["diff"] >= 0 else ("level" if -r["diff"] < r["se"] else "less accurate")
            r["mixed"] = not _uniform(p)
        elif (r := stored.get((p["name"], ref["name"]))) is None:
            rows.append([p["name"], ref["name"], _pct(p["top1"]), _pct(p["relative_bops"], 3), "-", "-", "-", "-",
                         "no per-sample outcomes: re-run its sweep command (finished runs are only re-evaluated)"])
            continue
        results.append(r)
        rows.append([p["name"], f"{ref['name']} ({_pct(ref['top1'])}%)", _pct(p["top1"]), _pct(p["relative_bops"], 3),
                     f"{p['relative_bops'] / ref['relative_bops']:.2f}x", f"{100 * r['diff']:+.2f} ± {100 * r['se']:.2f}",
                     f"{r['p_value']:.3f}", "yes" if r["mixed"] else "no (uniform)", r["verdict"]])
    # a setting counts only if every seed replicate of it (``<run>-s<seed>``) has fewer BOPs and is level or better
    passed = {r["name"] for r in results if r["mixed"] and r["verdict"] != "less accurate"}
    replicates: dict[str, list[str]] = {}
    for p in points:
        if p["method"] == "bb":
            replicates.setdefault(_setting(p["name"]), []).append(p["name"])
    failing = {r["name"]: [n for n in replicates[_setting(r["name"])] if n not in passed]
               for r in results if r["name"] in passed}
    met = [r for r in results if r["name"] in passed and not failing[r["name"]]]
    failed_replicates = {name: others for name, others in failing.items() if others}
    seeds = sorted(refs)
    ref_txt = (f"{reference}: {_pct(base['top1'])}% at {_pct(base['relative_bops'], 3)}% relative BOPs"
               + (f"; over seeds {', '.join(map(str, seeds))}: "
                  f"{', '.join(_pct(refs[k]['top1']) for k in seeds)}%" if len(seeds) > 1 else ""))
    head = (f"**Goal check** (fewer BOPs than LSQ 4/4 at equal accuracy; {ref_txt}). Each Bayesian Bits run is "
            "compared with the LSQ 4/4 run of its seed on the same test images: top-1 difference in points with "
            "its paired standard error, McNemar's exact two-sided p. \"as accurate\": difference >= 0; \"level\": "
            "below by less than one standard error; uniform-precision networks (the gates made nothing mixed or "
            "pruned) do not count. ")
    if not rows:
        text = head + "**Not met**: no Bayesian Bits point has fewer BOPs."
    else:
        best = max(met, key=lambda r: (r["diff"], -r["relative_bops"])) if met else None
        text = head + (f"**Met** by {', '.join(r['name'] for r in met)} (best: {best['name']}, {_pct(best['top1'])}% "
                       f"at {_pct(best['relative_bops'], 3)}%)." if met else "**Not met.**")
        for name, others in failed_replicates.items():
            text += (f" {name} passes, but not its seed replicate{'s' if len(others) > 1 else ''} "
                     f"{', '.join(others)} (a setting counts only if every seed of it passes).")
        text += "\n\n" + md_table(["Bayesian Bits run", "against", "top-1 %", "rel. BOPs %", "BOPs vs LSQ 4/4",
                                    "top-1 difference (points)", "McNemar p", "mixed precision", "verdict"], rows)
    return text, {"reference": reference, "references": {str(k): v["name"] for k, v in refs.items()},
                  "met": bool(met), "met_by": [r["name"] for r in met], "failed_replicates": failed_replicates,
                  "points": results}


def mixed_check(points: list[dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    """Issue 17's ResNet-20 goal: LSQ fine-tuning from searched mixed-precision widths (``bitalloc ptq --budget``,
    then ``bitalloc sweep --configs``) is on or above the fronts of uniform LSQ and of Bayesian Bits at every BOPs
    level they share, in paired comparisons on the same test images.

    Every uniform LSQ and Bayesian Bits point ``q`` with per-sample outcomes is compared (:func:`_compare`) with the
    searched run of its seed (else of seed 0) that is the most accurate among those with relative BOPs not above
    ``q``'s (the searched front at ``q``'s level); a level without such a run is not shared and is skipped.
    Verdicts: "above" / "below" by more than one paired standard error, else "level". The goal is met when no
    comparison is "below". None without searched runs."""
    searched = [p for p in points if _searched(p) and p.get("correct")]
    if not searched:
        return None
    others = [q for q in points if q["method"] in ("lsq", "bb") and not _searched(q) and q.get("correct")]
    rows, results = [], []
    for q in sorted(others, key=lambda q: (q["relative_bops"], q["name"])):
        cheaper = [p for p in searched if p["relative_bops"] <= q["relative_bops"] * (1 + 1e-9)]
        same_seed = [p for p in cheaper if _seed(p) == _seed(q)] or [p for p in cheaper if _seed(p) == 0]
        if not same_seed:
            continue
        p = max(same_seed, key=lambda p: (p["top1"], -p["relative_bops"]))
        r = _compare(p, q)
        r["verdict"] = "above" if r["diff"] > r["se"] else ("below" if -r["diff"] > r["se"] else "level")
        results.append(r)
        rows.append([q["name"], f"{_pct(q['top1'])}% at {_pct(q['relative_bops'], 3)}%", p["name"], _pct(p["top1"]),
                     _pct(p["relative_bops"], 3), f"{p['relative_bops'] / q['relative_bops']:.2f}x",
                     f"{100 * r['diff']:+.2f} ± {100 * r['se']:.2f}", f"{r['p_value']:.3f}", r["verdict"]])
    below = [r for r in results if r["verdict"] == "below"]
    met = bool(results) and not below
    text = ("**Searched widths + LSQ against the uniform LSQ and Bayesian Bits fronts** (issue 17: on or above them at "
            "every BOPs level they share). Each uniform LSQ and Bayesian Bits run against the most accurate run "
            "fine-tuned from searched widths of its seed with no more BOPs, on the same test images: top-1 difference "
            "(searched minus the other) with its paired standard error, McNemar's exact p; \"above\" / \"below\": by "
            "more than one standard error. "
            + ("**Met.**" if met else f"**Not met**: below at {', '.join(r['reference'] for r in below)}."
               if results else "**Not met**: no shared BOPs level.")
            + "\n\n" + md_table(["run", "its top-1 at rel. BOPs", "searched run", "top-1 %", "rel. BOPs %", "BOPs vs it",
                                  "top-1 difference (points)", "McNemar p", "verdict"], rows))
    return text, {"met": met, "below": [r["reference"] for r in below], "points": results}


def carry_points(stored: list[dict[str, Any]], fresh: list[dict[str, Any]],
                 stored_revision: str) -> tuple[list[dict[str, Any]], list[str]]:
    """One experiment's points for the report: every point of its ``sweep.json`` (``fresh``), plus the points of
    the previous results file (``stored``) whose runs are not there, so that regenerating the report on a machine
    without an earlier session's run folders loses nothing. Returns the points (stored order, then new ones) and
    the names of the carried ones; a carried point keeps the revision it was reported at (``stored_revision``
    for points recorded before each point carried its own)."""
    by_name = {p["name"]: p for p in fresh}
    carried = [p["name"] for p in stored if p["name"] not in by_name]
    points = [by_name.pop(p["name"], None) or {"revision": stored_revision, **p} for p in stored]
    return points + list(by_name.values()), carried


def keep_plots(name: str, points: list[dict[str, Any]], folder: Path, plots_dir: Path) -> list[Path]:
    """The experiment's plots, kept next to the results file so that they outlive the run folders: its Pareto
    front drawn from ``points`` (every quantized point, carried ones included; one series per method; FP32's
    accuracy in the title) and copies of the runs' bit-width-over-training plots (``<run>-bits.png``; copies
    made by an earlier report stay when the run folder is gone). Returns every PNG in ``plots_dir / name``;
    no Pareto plot is drawn without matplotlib."""
    import shutil

    from bitalloc.io import atomic_path
    from bitalloc.report.plots import PlotsUnavailable, pareto_plot

    out = plots_dir / name
    series: dict[str, list[tuple[float, float]]] = {}
    names: dict[str, list[str]] = {}
    for p in points:
        if p["method"] != "fp32":  # at 100% it would squeeze the quantized points into one corner: in the title
            series.setdefault(_series(p), []).append((100.0 * float(p["relative_bops"]), 100.0 * float(p["top1"])))
            names.setdefault(_series(p), []).append(p["name"])
    fp32 = next((f", FP32 {_pct(p['top1'])}%" for p in points if p["method"] == "fp32"), "")
    costs = [c for pts in series.values() for c, _ in pts]
    try:
        if series:  # a log axis only where the costs span a decade (its tick labels are unreadable otherwise)
            pareto_plot(series, out / "pareto.png", title=f"{name}: top-1 vs relative BOPs{fp32}",
                        logx=max(costs) > 10 * min(costs), labels=names)
    except PlotsUnavailable as exc:  # matplotlib is an optional extra
        print(f"{name}: no Pareto plot ({exc})")
    for png in sorted(folder.glob("*-bits.png")) if folder.is_dir() else []:
        with atomic_path(out / png.name) as tmp:
            shutil.copyfile(png, tmp)
    return sorted(out.glob("*.png"))


#: unit-variance weight / activation models for :func:`grid_mse`: Gaussian and Laplace weights, and a ReLU of a
#: Gaussian (half the mass at exactly 0) for unsigned activations
DISTRIBUTIONS = ("gauss", "laplace", "relu-gauss")


def _cell_error(a: float, b: float, c: float, dist: str) -> float:
    """``integral_a^b (x - c)^2 p(x) dx`` in closed form for the unit-variance density ``p`` of ``dist``.

    Gaussian (``Phi``, ``phi``): ``(1 + c^2)(Phi(b) - Phi(a)) - (b phi(b) - a phi(a)) + 2c (phi(b) - phi(a))``.
    Laplace (``p = (l/2) exp(-l|x|)``, ``l = sqrt 2``): on ``x >= 0`` the antiderivative is
    ``-(1/2) exp(-l x) ((x - c)^2 + 2 (x - c) / l + 2 / l^2)``; the negative half by symmetry (``x -> -x``,
    ``c -> -c``)."""
    if dist == "laplace":
        lam = math.sqrt(2.0)

        def prim(x: float, c: float) -> float:
            if math.isinf(x):
                return 0.0
            return -0.5 * math.exp(-lam * x) * ((x - c) ** 2 + 2 * (x - c) / lam + 2 / lam ** 2)

        total = 0.0
        if b > 0:
            total += prim(b, c) - prim(max(a, 0.0), c)
        if a < 0:
            total += prim(-a, -c) - prim(max(-b, 0.0), -c)
        return total

    def pdf(x: float) -> float:
        return 0.0 if math.isinf(x) else math.exp(-x * x / 2) / math.sqrt(2 * math.pi)

    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    def x_pdf(x: float) -> float:
        return 0.0 if math.isinf(x) else x * pdf(x)

    return (1 + c * c) * (cdf(b) - cdf(a)) - (x_pdf(b) - x_pdf(a)) + 2 * c * (pdf(b) - pdf(a))


def grid_mse(q_n: int, q_p: int, step: float, dist: str = "gauss") -> float:
    """Exact expected squared error ``E[(x - step * clip(round(x / step), -q_n, q_p))^2]`` of a uniform grid with
    codes ``-q_n..q_p`` for ``x`` from ``dist`` (see :data:`DISTRIBUTIONS`; unit variance): the sum over the
    codes of the closed-form error over each code's rounding cell (:func:`_cell_error`)."""
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {DISTRIBUTIONS}, got {dist!r}")
    relu = dist == "relu-gauss"
    lo_code = 0 if relu else -q_n  # a ReLU output is >= 0: only codes >= 0 are reached
    total = 0.0
    for c in range(lo_code, q_p + 1):  # the cell of code c: [(c - 1/2) step, (c + 1/2) step], open at the ends
        a = -math.inf if c == lo_code else (c - 0.5) * step
        b = math.inf if c == q_p else (c + 0.5) * step
        if relu:
            a = max(a, 0.0)  # the negative half is 0 after the ReLU: quantized exactly
        total += _cell_error(a, b, c * step, "laplace" if dist == "laplace" else "gauss")
    return total


def best_step(q_n: int, q_p: int, dist: str = "gauss") -> tuple[float, float]:
    """The step that minimises :func:`grid_mse` (grid search over 0.05..3, then scipy's bounded scalar search around
    the best) and that minimum: ``(step, mse)``."""
    from scipy import optimize

    coarse = [0.05 * k for k in range(1, 61)]  # a grid search first: the error need not be unimodal in the step
    s0 = min(coarse, key=lambda s: grid_mse(q_n, q_p, s, dist))
    r = optimize.minimize_scalar(lambda s: grid_mse(q_n, q_p, s, dist), bounds=(s0 - 0.05, s0 + 0.05),
                                 method="bounded", options={"xatol": 1e-6})
    return float(r.x), float(r.fun)


def two_bit_grids() -> tuple[str, list[dict[str, Any]]]:
    """LSQ's and Bayesian Bits' 2-bit grids compared by expected squared error on unit-variance data.

    Both are costed at 2 bits, but a signed Bayesian Bits tensor on ``[-a, a]`` with ``s2 = 2a/3`` has the codes
    ``-1, 0, 1`` (three levels; module docstring of :mod:`bitalloc.quant.bayesian_bits`) where LSQ's signed
    2-bit grid has ``-2..1`` (four); and Bayesian Bits' step is tied to its higher levels (``s2 = 5 s4``), so a
    tensor lowered from 4 to 2 bits starts from the range its 4-bit grid learned. Rows: each grid at its best
    step, and Bayesian Bits' 2-bit grid at five times the best 4-bit step (codes ``-7..7`` / ``0..15``)."""
    rows, out = [], []
    for dist in DISTRIBUTIONS:
        signed = dist != "relu-gauss"
        lsq = (2, 1) if signed else (0, 3)
        bb2, bb4 = ((1, 1), (7, 7)) if signed else ((0, 3), (0, 15))
        s_lsq, m_lsq = best_step(*lsq, dist)
        s_bb, m_bb = best_step(*bb2, dist)
        s4, _ = best_step(*bb4, dist)
        m_tied = grid_mse(*bb2, 5 * s4, dist)
        out.append({"dist": dist, "lsq": {"codes": [-lsq[0], lsq[1]], "step": s_lsq, "mse": m_lsq},
                    "bb_best": {"codes": [-bb2[0], bb2[1]], "step": s_bb, "mse": m_bb},
                    "bb_from_4bit": {"step": 5 * s4, "mse": m_tied}})
        rows.append([dist, f"{-lsq[0]}..{lsq[1]}", f"{m_lsq:.4f} (step {s_lsq:.3f})",
                     f"{-bb2[0]}..{bb2[1]}", f"{m_bb:.4f} (step {s_bb:.3f}, {m_bb / m_lsq:.2f}x)",
                     f"{m_tied:.4f} (step {5 * s4:.3f}, {m_tied / m_lsq:.2f}x)"])
    text = ("### 2-bit grids: LSQ against Bayesian Bits (expected squared error, unit-variance data)\n\n"
            "Both are costed at 2 bits. Closed-form integrals (`grid_mse` in `benchmarks/learned_precision.py`, "
            "tested against Monte Carlo); weights modelled as Gaussian or Laplace, activations after a ReLU as a "
            "rectified Gaussian.\n\n"
            + md_table(["data", "LSQ codes", "LSQ best MSE", "Bayesian Bits codes", "Bayesian Bits best MSE",
                        "Bayesian Bits at 5x its best 4-bit step"], rows) + "\n")
    return text, out


def cmd_report(args: argparse.Namespace, extra: list[str]) -> int:
    from bitalloc.cli.sweep import pareto_front
    from bitalloc.io import write_json

    runs_dir, results_path = Path(args.runs), Path(args.results)
    revision = git_revision()
    previous = {} if args.drop_missing else (_load(results_path) or {})
    sections: list[str] = []
    summary: dict[str, Any] = {"experiments": {}, "timing": {}, "machine": machine(), "revision": revision,
                               "command": command_line()}
    fresh: dict[str, list[dict[str, Any]]] = {}
    for folder in sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.exists() else []:
        data = _load(folder / "sweep.json")
        if data:
            fresh[folder.name] = [{**p, "revision": revision} for p in data["points"]]
    stored = previous.get("experiments", {})
    for name in sorted(set(fresh) | set(stored)):
        folder = runs_dir / name
        points, carried = carry_points(stored.get(name, []), fresh.get(name, []),
                                       previous.get("revision", "unknown"))
        if carried:
            summary.setdefault("carried", {})[name] = carried
            print(f"{name}: {len(carried)} point(s) kept from {repo_path(results_path)} (their runs are not under "
                  f"{repo_path(runs_dir)}): {', '.join(carried)}")
        summary["experiments"][name] = points
        rows = []
        front = {p["name"] for p in pareto_front([p for p in points if p["method"] != "fp32"])}
        for p in sorted(points, key=lambda p: (p["method"] != "fp32", p["method"], p["relative_bops"])):
            opts = p.get("options") or {}
            setting = ", ".join(f"{k}={v}" for k, v in (p.get("setting") or {}).items())
            params = p.get("parameters") or {}
            extra = ", ".join(f"{v:,} {k}" for k, v in (params.get("quantizers") or {}).items()) or "-"
            rows.append([p["name"], setting, _pct(p["top1"]), _pct(p["relative_bops"], 3),
                         "*" if p["name"] in front else "", p.get("epochs") or "-", extra,
                         f"{1000 * p['time_per_step']:.0f}" if p.get("time_per_step") else "-",
                         _bits_summary(p) if p["method"] != "fp32" else "float"])
            if p["method"] == "bb":
                if opts.get("gates", "hard_concrete") != "hard_concrete":
                    rows[-1][1] += f", {opts['gates']} gates"
                if opts.get("gate_lr"):
                    rows[-1][1] += f", gate lr {opts['gate_lr']:g}"
                rows[-1][1] += (f", range lr {opts['range_lr']:g}" if opts.get("range_lr")
                                else ", range lr = weights' lr")
                if opts.get("gate_init"):
                    rows[-1][1] += ", gate init " + ",".join(f"{v:g}" for v in opts["gate_init"])
                if opts.get("fix_gates_epochs"):
                    rows[-1][1] += f", last {opts['fix_gates_epochs']:g} epoch(s) with fixed gates"
        table = md_table(["run", "setting", "top-1 %", "rel. BOPs %", "Pareto", "epochs", "quantizer parameters",
                          "ms/step (during the run, shared machine)", "bits per layer (frozen)"],
                         rows)
        paper = PAPER.get(name, {})
        paper_txt = "; ".join(v if k == "none" else f"{k}: {v}" for k, v in paper.items()) or "-"
        pngs = [f"`{repo_path(q)}`" for q in keep_plots(name, points, folder, results_path.with_suffix(""))]
        cifar = any((p.get("options") or {}).get("dataset") == "cifar10" for p in points)
        # the CIFAR-10 goal; LeNet-5's is absolute (notes)
        check = goal_check(points, previous=previous.get("goal_checks", {}).get(name)) if cifar else None
        goal_txt = ""
        if check:
            goal_txt = f"\n{check[0]}\n"
            summary.setdefault("goal_checks", {})[name] = check[1]
        if cifar and (front_check := uniform_check(points)):
            goal_txt += f"\n{front_check[0]}\n"
            summary.setdefault("uniform_checks", {})[name] = front_check[1]
        if cifar and (searched_check := mixed_check(points)):
            goal_txt += f"\n{searched_check[0]}\n"
            summary.setdefault("mixed_checks", {})[name] = searched_check[1]
        kept = ", ".join(f"{p['name']} ({p['revision']})" for p in points if p["name"] in carried)
        carried_txt = (f"Kept from the previous results file (their run folders were not on the machine that made "
                       f"this report; the revision each was reported at): {kept}.\n\n" if carried else "")
        sections.append(f"### {name}\n\nPaper: {paper_txt}.\n\n{carried_txt}{table}\n{goal_txt}\nPlots: "
                        f"{', '.join(pngs) or '-'}\n")
    for tfile in sorted(RESULTS.glob("learned_timing_*.json")):
        t = _load(tfile)
        summary["timing"][t["model"]] = t
        rel = t.get("relative_to_fp32") or {}
        rows = [[m, f"{1000 * t['best'][m]:.1f}", f"{rel.get(m, float('nan')):.2f}",
                 f"{(t.get('median_relative_to_fp32') or {}).get(m, float('nan')):.2f}"] for m in t["best"]]
        sections.append(f"### Time per training step, {t['model']} ({t['dataset']}, batch {t['batch_size']}, "
                        f"Adam; fastest of {t['rounds']} interleaved rounds of {t['steps']} steps)\n\n"
                        + md_table(["method", "ms/step", "relative to FP32 (fastest)", "relative (median)"], rows) + "\n")
    grids_text, summary["two_bit_grids"] = two_bit_grids()
    sections.append(grids_text)
    notes = Path(args.notes).read_text() if args.notes and Path(args.notes).exists() else ""
    body = (f"Machine: {machine()}. Revision {revision}. Generated by `python benchmarks/learned_precision.py "
            f"report` from `runs/learned/*/sweep.json` and the points of the previous results file whose runs are "
            f"not there (each point: trained, frozen with test-time gates, "
            f"evaluated on the test split, costed with `bitalloc.cost_report`).\n\n" + notes + "\n" + "\n".join(sections))
    path = write_json(results_path, summary)
    print(f"results: {path}")
    if not args.no_md:
        update_section("learned-precision", body)
        print("BENCHMARKS.md section 'learned-precision' updated")
    return 0


# ---- trials ----------------------------------------------------------------------------------------------------

def _trial_pairs(points: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(searched run, uniform run) pairs: each run from searched widths with the uniform run of the same seed that
    has the fewest relative BOPs not below its own (the uniform width of the budget it was searched at)."""
    uniform = [q for q in points if q["method"] == "lsq" and not _searched(q)]
    pairs = []
    for p in sorted((p for p in points if _searched(p)), key=lambda p: (p["relative_bops"], p["name"])):
        above = [q for q in uniform if q["relative_bops"] >= p["relative_bops"] * (1 - 1e-9) and _seed(q) == _seed(p)]
        if above:
            pairs.append((p, min(above, key=lambda q: q["relative_bops"])))
    return pairs


def _trial_score(p: dict[str, Any]) -> float:
    """What a trial is chosen by: top-1 on the training samples it held out (``--holdout``), else on the test split."""
    return p["holdout"]["top1"] if p.get("holdout") else p["top1"]


def cmd_trials(args: argparse.Namespace, extra: list[str]) -> int:
    """Do short fine-tunes predict full ones? The runs of ``--trial-dir`` (``bitalloc sweep`` of the same settings
    with ``--steps``: searched widths and the uniform widths of their budgets) against the runs of the same names
    in ``--experiment`` of the results file. Per pair (searched, uniform at its budget; :func:`_trial_pairs`): the
    top-1 difference in the trial and in the full run, each with its paired standard error on the same test images
    (:func:`_compare`), and the difference of test loss in the trial; the trial "picks" the more accurate run on
    the training samples the trials held out (``-- --holdout N``; else on the test split; a tie: the uniform one).
    Then, per budget, what picking by trial would put on the searched front: the full run of the pick against
    the full uniform run."""
    from bitalloc.io import write_json

    trial_data = _load(Path(args.trial_dir) / "sweep.json")
    if not trial_data:
        raise SystemExit(f"{args.trial_dir}/sweep.json: not found; run the trial sweep first")
    results = _load(Path(args.results)) or {}
    full = {p["name"]: p for p in results.get("experiments", {}).get(args.experiment, [])}
    if not full:
        raise SystemExit(f"{args.results}: no experiment {args.experiment!r}")
    trial = [p for p in trial_data["points"] if p["method"] != "fp32"]
    pairs = _trial_pairs(trial)
    if not pairs:
        raise SystemExit(f"{args.trial_dir}/sweep.json: no run from searched widths with a uniform run of its seed "
                         "at or above its BOPs; the trial sweep needs both (--configs and --bits)")
    held = all(p.get("holdout") for p in trial)
    rows, out, picks = [], [], {}
    for p, q in pairs:
        fp, fq = full.get(p["name"]), full.get(q["name"])
        t = _compare(p, q)
        f = _compare(fp, fq) if fp and fq else None
        pick = p["name"] if _trial_score(p) > _trial_score(q) else q["name"]
        entry = {"searched": p["name"], "uniform": q["name"], "relative_bops": p["relative_bops"],
                 "uniform_relative_bops": q["relative_bops"], "trial_steps": p.get("steps"),
                 "trial_top1": [p["top1"], q["top1"]], "trial_loss": [p["val_loss"], q["val_loss"]],
                 "trial_holdout_top1": [_trial_score(p), _trial_score(q)] if held else None,
                 "trial_diff": t and t["diff"], "trial_se": t and t["se"], "trial_pick": pick,
                 "full_top1": [fp and fp["top1"], fq and fq["top1"]], "full_diff": f and f["diff"],
                 "full_se": f and f["se"]}
        if f is not None:
            entry["agrees"] = (pick == p["name"]) == (f["diff"] > 0)
        out.append(entry)
        budget = q["name"]
        picks.setdefault(budget, {"uniform": q["name"], "candidates": {}})["candidates"][p["name"]] = _trial_score(p)
        picks[budget]["candidates"][q["name"]] = _trial_score(q) + 1e-12  # a tie goes to the uniform run
        rows.append([q["name"], p["name"], _pct(p["relative_bops"], 3),
                     f"{_pct(p['top1'])} / {_pct(q['top1'])}"
                     + (f" (held out: {_pct(_trial_score(p))} / {_pct(_trial_score(q))})" if held else ""),
                     "-" if t is None else f"{100 * t['diff']:+.2f} ± {100 * t['se']:.2f}",
                     f"{p['val_loss'] - q['val_loss']:+.4f}", pick,
                     "-" if f is None else f"{_pct(fp['top1'])} / {_pct(fq['top1'])}",
                     "-" if f is None else f"{100 * f['diff']:+.2f} ± {100 * f['se']:.2f}",
                     {True: "yes", False: "no"}.get(entry.get("agrees"), "-")])
    front_rows, fronts = [], []
    for budget, b in picks.items():
        chosen = max(b["candidates"], key=b["candidates"].get)
        fc, fu = full.get(chosen), full.get(b["uniform"])
        c = _compare(fc, fu) if fc and fu and chosen != b["uniform"] else None
        fronts.append({"budget": budget, "chosen": chosen, "full_top1": fc and fc["top1"],
                       "uniform_full_top1": fu and fu["top1"], "diff": c and c["diff"], "se": c and c["se"]})
        front_rows.append([budget, chosen, _pct(fc["top1"]) if fc else "-", _pct(fu["top1"]) if fu else "-",
                           "0 (the same run)" if chosen == b["uniform"] else
                           ("-" if c is None else f"{100 * c['diff']:+.2f} ± {100 * c['se']:.2f}")])
    steps = sorted({p.get("steps") for p in trial if p.get("steps")})
    summary = {"trial_dir": repo_path(args.trial_dir), "experiment": args.experiment, "steps": steps,
               "pairs": out, "fronts": fronts, "machine": machine(), "revision": git_revision(),
               "command": command_line()}
    path = write_json(Path(args.out), summary)
    print(f"results: {path}")
    agree = [e["agrees"] for e in out if "agrees" in e]
    text = (f"Command: `{command_line()}`  \nRevision: {git_revision()}; machine: {machine()}. Trials: "
            f"{', '.join(map(str, steps))} optimizer steps from the FP32 model, otherwise the full runs' settings; "
            f"full runs: {args.experiment}. Top-1 differences are searched minus uniform on the same test images "
            f"(paired standard error); the trial picks the more accurate run "
            + (f"on the {trial[0]['holdout']['samples']:,} training samples its runs held out (`--holdout`; the test "
               "images are only used to measure)" if held else "on the test images (a measurement, not a "
               "selection: choosing runs this way would need `--holdout`)")
            + f". The trial's pick agrees with "
            f"the sign of the full runs' difference in {sum(agree)} of {len(agree)} pairs.\n\n"
            + md_table(["uniform run (budget)", "searched run", "rel. BOPs %", "trial top-1 % (searched / uniform)",
                        "trial difference (points)", "trial loss difference", "trial picks",
                        "full top-1 % (searched / uniform)", "full difference (points)", "agree"], rows)
            + "\n\nPicking by trial at each budget (the full run of the pick against the full uniform run):\n\n"
            + md_table(["budget", "picked", "its full top-1 %", "uniform full top-1 %", "difference (points)"],
                       front_rows) + "\n")
    print(text)
    if not args.no_md:
        update_section("lsq-trials", text)
        print("BENCHMARKS.md section 'lsq-trials' updated")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep", help="bitalloc sweep + FP32 reference point")
    s.add_argument("--model", required=True)
    s.add_argument("--dataset")
    s.add_argument("--data")
    s.add_argument("--init", help="FP32 checkpoint to fine-tune from (also the FP32 reference point)")
    s.add_argument("--fp32", help="FP32 reference checkpoint (default: --init)")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--method", required=True)
    s.add_argument("--mu")
    s.add_argument("--bits")
    s.add_argument("--configs", help="lsq / pact: one run per QuantConfig file (e.g. searched widths)")
    s.add_argument("--epochs", type=int)
    s.add_argument("--tag", help="suffix of the run names (runs of other train options in one folder)")
    s.add_argument("--progress", default="log")
    t = sub.add_parser("timing", help="time per training step relative to FP32")
    t.add_argument("--model", required=True)
    t.add_argument("--dataset")
    t.add_argument("--data")
    t.add_argument("--methods", default="fp32,lsq,pact,bb")
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--rounds", type=int, default=2)
    t.add_argument("--batch-size", type=int, default=128)
    r = sub.add_parser("report", help="results JSON + BENCHMARKS.md section")
    r.add_argument("--runs", default=str(RUNS))
    r.add_argument("--notes", default=str(RESULTS / "learned_precision_notes.md"),
                   help="markdown inserted before the tables (what was run and why)")
    r.add_argument("--results", default=str(RESULTS / "learned_precision.json"),
                   help="results JSON, rewritten; its points whose runs are not under --runs are kept")
    r.add_argument("--drop-missing", action="store_true",
                   help="do not keep points of the previous --results file whose runs are not under --runs")
    r.add_argument("--no-md", action="store_true")
    tr = sub.add_parser("trials", help="short fine-tunes (a sweep with --steps) against the full runs")
    tr.add_argument("--trial-dir", required=True, help="the trial sweep's folder (its sweep.json)")
    tr.add_argument("--experiment", required=True, help="the full runs' experiment in --results")
    tr.add_argument("--results", default=str(RESULTS / "learned_precision.json"))
    tr.add_argument("--out", default=str(RESULTS / "lsq_trials.json"))
    tr.add_argument("--no-md", action="store_true")
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = ap.parse_args(argv)
    return {"sweep": cmd_sweep, "timing": cmd_timing, "report": cmd_report,
            "trials": cmd_trials}[args.cmd](args, extra)


if __name__ == "__main__":
    sys.exit(main())
