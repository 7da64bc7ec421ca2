"""``bitalloc sweep``: train a method at several settings, freeze, evaluate and cost each; Pareto front.

Examples::

    bitalloc sweep --method bb --mu 0.01,0.03,0.1,0.3 --model lenet5 --dataset mnist --data DIR \\
        --epochs 10 --init runs/models/lenet5-mnist.pt --out-dir runs/sweep-lenet5
    bitalloc sweep --method lsq,pact --bits 2,3,4,8 --model lenet5 --dataset mnist --data DIR --out-dir runs/sweep-lenet5
    bitalloc sweep ... -- --gate-lr 1e-2 --batch-size 256        # after "--": passed to every `bitalloc train`

Each point is one ``bitalloc train`` run (in this process; under ``torchrun`` every run is data-parallel)
with its checkpoint, log and result in ``--out-dir`` (``<method>-mu<mu>`` / ``<method>-w<b>a<b>``). Runs are
resumable: a finished run (complete checkpoint and result file) is not trained again, an interrupted one
continues from its checkpoint. Every trained model is then frozen (:func:`bitalloc.model.freeze.freeze`:
test-time bit widths and kept channels), evaluated on the validation split and costed
(:func:`bitalloc.cost_report`, BOPs relative to 32x32 bits).

Outputs in ``--out-dir``: ``sweep.json`` (every point so far, all methods: accuracy, relative BOPs, per-layer
bits and kept fractions, time per training step; points of earlier sweeps into the same folder are kept),
``pareto.png`` (accuracy vs relative BOPs, one front per method) and, for Bayesian Bits runs,
``<run>-bits.png`` (each layer's expected weight and activation bit width over training, from the log).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bitalloc.errors import CheckpointError, ConfigError


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def register(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("sweep", help="train at several settings (mu, bit widths), freeze, evaluate: Pareto front",
                       description=(__doc__ or "").split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", required=True, help="bb, lsq, pact (comma-separated for several)")
    p.add_argument("--mu", type=_floats, default=None, help="bb: regulariser strengths, e.g. 0.01,0.03,0.1")
    p.add_argument("--bits", default=None,
                   help="lsq/pact: bit widths, e.g. 2,3,4,8 (W=A) or WxA pairs such as 4x8,4x4")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", default=None)
    p.add_argument("--data", default=None, help="data path (default: $BITALLOC_DATA)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run instead of epochs")
    p.add_argument("--init", default=None, help="start every run from this checkpoint (e.g. the FP32 model)")
    p.add_argument("--fp32", default=None, help="an FP32 checkpoint to add as the 100%% BOPs reference point")
    p.add_argument("--out-dir", required=True, help="folder of the runs and the sweep outputs")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--retrain", action="store_true", help="train again even if a run is finished (overwrites it)")
    p.add_argument("--progress", choices=["auto", "bar", "log", "off"], default=None)
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="after '--': more `bitalloc train` options for every run (e.g. -- --gate-lr 1e-2)")
    p.set_defaults(func=run)
    return p


# ---- points ------------------------------------------------------------------------------------------------

def sweep_points(methods: list[str], mu: list[float] | None, bits: str | None) -> list[dict[str, Any]]:
    """The runs of a sweep: ``{"method", "name", "args": [...train options], "setting": {...}}``."""
    points = []
    for method in methods:
        if method == "bb":
            if not mu:
                raise ConfigError("--method bb needs --mu, e.g. --mu 0.01,0.03,0.1")
            for m in mu:
                points.append({"method": "bb", "name": f"bb-mu{m:g}", "args": ["--mu", repr(float(m))],
                               "setting": {"mu": float(m)}})
        elif method in ("lsq", "pact"):
            if not bits:
                raise ConfigError(f"--method {method} needs --bits, e.g. --bits 2,3,4,8 or 4x8,4x4")
            for item in str(bits).split(","):
                item = item.strip().lower()
                if not item:
                    continue
                w, _, a = item.partition("x")
                try:
                    wb, ab = int(w), int(a or w)
                except ValueError:
                    raise ConfigError(f"--bits item {item!r} must be B or WxA (integers)") from None
                points.append({"method": method, "name": f"{method}-w{wb}a{ab}",
                               "args": ["--w-bits", str(wb), "--a-bits", str(ab)],
                               "setting": {"w_bits": wb, "a_bits": ab}})
        else:
            raise ConfigError(f"unknown sweep method {method!r}; choose bb, lsq or pact")
    return points


def run_state(out: Path) -> str:
    """"done" (complete checkpoint + result), "partial" (checkpoint to resume) or "fresh"."""
    from bitalloc.train.checkpoint import checkpoint_info

    result = out.with_suffix(".json")
    if not out.exists():
        return "fresh"
    try:
        info = checkpoint_info(out)
    except CheckpointError:
        return "fresh"
    return "done" if info.get("complete") and result.exists() else "partial"


def train_argv(args: argparse.Namespace, point: dict[str, Any], out: Path, state: str) -> list[str]:
    argv = ["train", "--model", args.model, "--method", point["method"], "--out", str(out)]
    for flag, value in (("--dataset", args.dataset), ("--data", args.data), ("--epochs", args.epochs),
                        ("--steps", args.steps), ("--init", args.init), ("--progress", args.progress)):
        if value is not None:
            argv += [flag, str(value)]
    argv += point["args"]
    extra = list(args.train_args or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    argv += extra
    if state == "partial":
        argv.append("--resume")
    elif state == "fresh" or args.retrain:
        argv.append("--overwrite")
    return argv


# ---- evaluation -------------------------------------------------------------------------------------------

def bits_history(log_path: Path) -> dict[str, list[tuple[float, float]]]:
    """Each layer's expected weight / activation bits per epoch, from a training log's ``state`` records."""
    series: dict[str, list[tuple[float, float]]] = {}
    if not log_path.exists():
        return series
    for line in log_path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") != "epoch" or "state" not in rec:
            continue
        for layer, d in (rec["state"].get("layers") or {}).items():
            for role in ("w", "a"):
                q = d.get(role)
                if q is None:
                    continue
                b = q.get("expected_bits", q.get("bits"))
                if b is not None:
                    series.setdefault(f"{layer} {role}", []).append((float(rec["epoch"]), float(b)))
    return series


def evaluate_run(out: Path, train_ns: argparse.Namespace, eval_batch_size: int) -> dict[str, Any]:
    """Freeze the trained model of checkpoint ``out``, evaluate it and cost it."""
    import torch

    from bitalloc.cli.train import load_data
    from bitalloc.cost import cost_report
    from bitalloc.model.freeze import freeze
    from bitalloc.train.checkpoint import load_checkpoint, load_model_checkpoint
    from bitalloc.train.loop import evaluate
    from bitalloc.train.methods import example_input

    state = load_checkpoint(out)
    model = load_model_checkpoint(out)
    frozen = freeze(model)
    _, val_set, _ = load_data(train_ns, augment=False)
    ev = evaluate(frozen, val_set, batch_size=eval_batch_size, progress="off")
    opts = state.get("method_options") or {}
    shape = opts.get("input_shape")
    if shape is None:
        x, _ = val_set[0]
        shape = list(x.shape)
    with torch.no_grad():
        rep = cost_report(frozen, example_input(shape))
    hist = state.get("history") or []
    steps_time = [h.get("time_per_step") for h in hist if h.get("time_per_step")]
    last_state = (hist[-1].get("state") or {}) if hist else {}
    return {
        "top1": ev.accuracy, "val_loss": ev.loss, "relative_bops": rep.relative_bops, "bops": rep.bops,
        "macs": rep.macs, "memory_bits": rep.memory_bits, "epochs": state.get("epoch"), "steps": state.get("step"),
        "time_per_step": sum(steps_time) / len(steps_time) if steps_time else None,
        "train_last_val_accuracy": hist[-1].get("val_accuracy") if hist else None,
        "relative_bops_expected": last_state.get("relative_bops_expected"),
        "layers": [{"name": l.name, "w_bits": l.w_bits, "a_bits": l.a_bits, "kept_fraction": l.kept_fraction,
                    "macs": l.macs, "bops": l.bops} for l in rep.layers],
        "options": opts,
    }


def fp32_point(path: str, train_ns: argparse.Namespace, eval_batch_size: int) -> dict[str, Any]:
    from bitalloc.cli.train import load_data
    from bitalloc.train.checkpoint import load_model_checkpoint
    from bitalloc.train.loop import evaluate

    model = load_model_checkpoint(path)
    _, val_set, _ = load_data(train_ns, augment=False)
    ev = evaluate(model, val_set, batch_size=eval_batch_size, progress="off")
    return {"method": "fp32", "name": "fp32", "setting": {}, "top1": ev.accuracy, "relative_bops": 1.0,
            "checkpoint": path}


def write_outputs(out_dir: Path, points: dict[str, dict[str, Any]]) -> dict[str, Path]:
    from bitalloc.io import write_json

    paths = {"json": write_json(out_dir / "sweep.json", {"points": list(points.values())})}
    series: dict[str, list[tuple[float, float]]] = {}
    for p in points.values():
        series.setdefault(p["method"], []).append((100.0 * float(p["relative_bops"]), 100.0 * float(p["top1"])))
    try:
        from bitalloc.report.plots import pareto_plot

        paths["pareto"] = pareto_plot(series, out_dir / "pareto.png", title="accuracy vs relative BOPs")
    except ImportError:  # matplotlib is optional
        pass
    return paths


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points not dominated by another (lower or equal BOPs and higher or equal accuracy, one strictly)."""
    front = []
    for p in points:
        dominated = any(q is not p and q["relative_bops"] <= p["relative_bops"] and q["top1"] >= p["top1"]
                        and (q["relative_bops"] < p["relative_bops"] or q["top1"] > p["top1"]) for q in points)
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p["relative_bops"])


# ---- command -----------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from bitalloc.cli import build_parser, main
    from bitalloc.train import distributed as D

    if args.dataset is None:  # as `bitalloc train` does: the model's preset dataset
        from bitalloc.train.presets import get_preset

        preset = get_preset(args.model)
        if not preset.datasets:
            raise ConfigError(f"no default dataset for model {args.model!r}; pass --dataset NAME")
        args.dataset = preset.datasets[0]
    methods = [m.strip() for m in str(args.method).split(",") if m.strip()]
    points = sweep_points(methods, args.mu, args.bits)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing: dict[str, dict[str, Any]] = {}
    sweep_json = out_dir / "sweep.json"
    if sweep_json.exists():
        try:
            existing = {p["name"]: p for p in json.loads(sweep_json.read_text()).get("points", [])}
        except (json.JSONDecodeError, KeyError, TypeError):
            existing = {}
    parser = build_parser()
    train_ns = None
    for point in points:
        out = out_dir / f"{point['name']}.pt"
        state = D.on_main_then_share(lambda: run_state(out))
        argv = train_argv(args, point, out, state)
        train_ns = parser.parse_args(argv)
        if state != "done" or args.retrain:
            if D.is_main_process():
                print(f"sweep: {point['name']}: {'resuming' if state == 'partial' else 'training'} "
                      f"(bitalloc {' '.join(argv)})", file=sys.stderr)
            code = main(argv)
            if code:
                raise ConfigError(f"sweep run {point['name']} failed (exit code {code}); see its log {out.with_suffix('.jsonl')}")
        elif D.is_main_process():
            print(f"sweep: {point['name']}: finished earlier ({out}); evaluating", file=sys.stderr)
        rec = evaluate_run(out, train_ns, args.eval_batch_size)
        rec.update(method=point["method"], name=point["name"], setting=point["setting"], checkpoint=str(out))
        existing[point["name"]] = rec
        if D.is_main_process():
            series = bits_history(out.with_suffix(".jsonl"))
            if point["method"] == "bb" and series:
                try:
                    from bitalloc.report.plots import line_plot

                    rec["bits_plot"] = str(line_plot(series, out_dir / f"{point['name']}-bits.png", xlabel="epoch",
                                                     ylabel="expected bits", title=f"{point['name']}: bit width per layer"))
                except ImportError:
                    pass
            write_outputs(out_dir, existing)
            print(f"sweep: {point['name']}: top-1 {100 * rec['top1']:.2f}% at {100 * rec['relative_bops']:.3f}% "
                  f"relative BOPs", file=sys.stderr)
    if args.fp32 and train_ns is not None:
        existing["fp32"] = fp32_point(args.fp32, train_ns, args.eval_batch_size)
    if D.is_main_process():
        paths = write_outputs(out_dir, existing)
        rows = sorted(existing.values(), key=lambda p: (p["method"], p["relative_bops"]))
        front = {p["name"] for p in pareto_front(rows)}
        print(f"{'run':<22} {'top-1 %':>8} {'rel. BOPs %':>12}  Pareto")
        for p in rows:
            print(f"{p['name']:<22} {100 * p['top1']:>8.2f} {100 * p['relative_bops']:>12.4f}  {'*' if p['name'] in front else ''}")
        for k, v in paths.items():
            print(f"{k}: {v}")
    return 0


__all__ = ["register", "run", "sweep_points", "pareto_front", "bits_history", "evaluate_run", "train_argv", "run_state"]
