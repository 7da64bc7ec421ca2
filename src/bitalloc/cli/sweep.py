"""``bitalloc sweep``: train a method at several settings, freeze, evaluate and cost each; Pareto front.

Examples::

    bitalloc sweep --method bb --mu 0.01,0.03,0.1,0.3 --model lenet5 --dataset mnist --data DIR \\
        --epochs 10 --init runs/models/lenet5-mnist.pt --out-dir runs/sweep-lenet5
    bitalloc sweep --method lsq,pact --bits 2,3,4,8 --model lenet5 --dataset mnist --data DIR --out-dir runs/sweep-lenet5
    bitalloc sweep ... -- --gate-lr 1e-2 --batch-size 256        # after "--": passed to every `bitalloc train`

Each point is one ``bitalloc train`` run (in this process; under ``torchrun`` every run is data-parallel)
with its checkpoint, log, result and frozen model in ``--out-dir`` (``<method>-mu<mu>`` / ``<method>-w<b>a<b>``).
Runs are resumable: a finished run (complete checkpoint and result file) is not trained again, an interrupted
one continues from its checkpoint; ``--retrain`` trains every point again from scratch (replacing finished
and partial runs). Every trained model is then frozen (:func:`bitalloc.model.freeze.freeze`: test-time bit
widths and kept channels; written as ``<run>-frozen.pt``, readable with ``--quantized``), evaluated on the
validation split and costed (:func:`bitalloc.cost_report`, BOPs relative to 32x32 bits).

Outputs in ``--out-dir``: ``sweep.json`` (every point so far, all methods: accuracy, relative BOPs, per-layer
bits and kept fractions, time per training step, the frozen model's path, ``correct``: which validation samples
the point classifies correctly (:func:`bitalloc.report.stats.encode_mask`, for paired comparisons of points with
:func:`bitalloc.report.stats.paired_comparison`), and ``pareto`` / ``pareto_method``: whether the point is on the
Pareto front of all points / of its method; points of earlier sweeps into the same folder are kept, also of
sweeps running at the same time), ``pareto.png`` (accuracy vs relative BOPs: every point, and each method's
Pareto front as a line) and, for Bayesian Bits runs, ``<run>-bits.png`` (each layer's expected weight and
activation bit width over training, from the log; ``bitalloc plot-bits LOG.jsonl`` draws it for any run). Without matplotlib the
plots are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from bitalloc.errors import CheckpointError, ConfigError
from bitalloc.report.stats import encode_mask


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
    p.add_argument("--method", default=None, help="bb, lsq, pact (comma-separated for several); or --budget below")
    p.add_argument("--mu", type=_floats, default=None, help="bb: regulariser strengths, e.g. 0.01,0.03,0.1")
    p.add_argument("--bits", default=None,
                   help="lsq/pact: bit widths, e.g. 2,3,4,8 (W=A) or WxA pairs such as 4x8,4x4")
    p.add_argument("--configs", default=None, metavar="FILE,...",
                   help="lsq/pact: also a run from each of these QuantConfig files' per-layer widths (e.g. the "
                        "searched.json of `bitalloc ptq --budget`), named <method>-<file name without .json>")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", default=None)
    p.add_argument("--data", default=None, help="data path (default: $BITALLOC_DATA)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run instead of epochs")
    p.add_argument("--init", default=None, help="start every run from this checkpoint (e.g. the FP32 model)")
    p.add_argument("--fp32", default=None, help="an FP32 checkpoint to add as the 100%% BOPs reference point")
    p.add_argument("--out-dir", required=True, help="folder of the runs and the sweep outputs")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--tag", default="",
                   help="suffix of every run name, to keep runs of other train options apart in one folder "
                        "(e.g. --tag=-init4 gives bb-mu0.03-init4; a tag that starts with '-' needs the '=' form)")
    p.add_argument("--retrain", action="store_true", help="train again even if a run is finished (overwrites it)")
    p.add_argument("--progress", choices=["auto", "bar", "log", "off"], default=None)
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="after '--': more `bitalloc train` options for every run whose method uses them (e.g. -- "
                        "--gate-lr 1e-2 reaches the bb runs only; an option no method of the sweep uses is an error)")
    from bitalloc.cli.budget_sweep import add_budget_sweep_args

    add_budget_sweep_args(p)
    p.set_defaults(func=run)
    b = sub.add_parser("plot-bits", help="plot each layer's bit width over training from a `bitalloc train` log",
                       description="Plot each quantized layer's weight and input bit widths per epoch from the "
                                   "JSON-lines log of a quantization-aware run (`bitalloc train --method bb|lsq|pact`; "
                                   "Bayesian Bits: expected bits, or --kind test for the thresholded gates).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("log", help="the .jsonl log written by `bitalloc train`")
    b.add_argument("--out", default=None, help="PNG to write (default: <log without .jsonl>-bits.png)")
    b.add_argument("--kind", choices=["expected", "test"], default="expected",
                   help="bb: expected bits under the gate posteriors, or test-time bits")
    b.add_argument("--roles", choices=["wa", "w", "a"], default="wa", help="weights (w), input activations (a) or both")
    b.set_defaults(func=run_plot_bits)
    return p


def run_plot_bits(args: argparse.Namespace) -> int:
    """``bitalloc plot-bits LOG.jsonl --out bits.png``."""
    from bitalloc.errors import DataError
    from bitalloc.report.plots import line_plot

    log = Path(args.log)
    if not log.is_file():
        raise DataError(f"{log}: no such log file; give the .jsonl log written by `bitalloc train`")
    series = bits_history(log, kind=args.kind, roles=args.roles)
    if not series:
        raise DataError(f"{log} has no per-layer bit widths (no epoch records with a quantization-aware state); "
                        "give the log of a `bitalloc train --method bb|lsq|pact` run that finished an epoch")
    name = log.name[:-6] if log.name.endswith(".jsonl") else log.stem
    out = Path(args.out) if args.out else log.with_name(f"{name}-bits.png")
    label = "expected bits" if args.kind == "expected" else "test-time bits"
    line_plot(series, out, xlabel="epoch", ylabel=label, title=f"{name}: bit width per layer")
    print(f"bit widths of {len(series)} tensors over {max(len(v) for v in series.values())} epochs: {out}")
    return 0


# ---- points ------------------------------------------------------------------------------------------------

def _config_points(method: str, configs: str, tag: str) -> list[dict[str, Any]]:
    """One lsq / pact run per QuantConfig file of ``configs`` (comma-separated): ``--config FILE`` (the run
    starts from the file's per-layer widths, :func:`bitalloc.train.methods.qat_config_from`), named
    ``<method>-<file stem><tag>``, setting ``{"config": FILE}``."""
    points = []
    for item in (i.strip() for i in str(configs).split(",")):
        if not item:
            continue
        path = Path(item)
        if not path.is_file():
            raise ConfigError(f"--configs: {path} does not exist; give QuantConfig JSON files, e.g. the searched.json "
                              "written by `bitalloc ptq --budget`")
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", path.stem):
            raise ConfigError(f"--configs: {path.name}: the file name becomes the run name; rename it to letters, "
                              "digits and . _ + - only")
        points.append({"method": method, "name": f"{method}-{path.stem}{tag}", "args": ["--config", str(path)],
                       "setting": {"config": str(path)}})
    return points


def sweep_points(methods: list[str], mu: list[float] | None, bits: str | None, tag: str = "",
                 configs: str | None = None) -> list[dict[str, Any]]:
    """The runs of a sweep: ``{"method", "name", "args": [...train options], "setting": {...}}``.

    ``tag`` is appended to every name (runs of other train options can then share one folder and front);
    ``configs`` adds lsq / pact runs from QuantConfig files (:func:`_config_points`)."""
    if tag and not re.fullmatch(r"[A-Za-z0-9_.+-]+", tag):
        raise ConfigError(f"--tag {tag!r}: use letters, digits and . _ + - only (it becomes part of file names)")
    if configs and not set(methods) & {"lsq", "pact"}:
        raise ConfigError("--configs starts lsq or pact runs: add --method lsq (or pact)")
    points = []
    for method in methods:
        if method == "bb":
            if not mu:
                raise ConfigError("--method bb needs --mu, e.g. --mu 0.01,0.03,0.1")
            for m in mu:
                points.append({"method": "bb", "name": f"bb-mu{m:g}{tag}", "args": ["--mu", repr(float(m))],
                               "setting": {"mu": float(m)}})
        elif method in ("lsq", "pact"):
            if not bits and not configs:
                raise ConfigError(f"--method {method} needs --bits, e.g. --bits 2,3,4,8 or 4x8,4x4 (or --configs)")
            points += _config_points(method, configs, tag) if configs else []
            for item in str(bits or "").split(","):
                item = item.strip().lower()
                if not item:
                    continue
                w, _, a = item.partition("x")
                try:
                    wb, ab = int(w), int(a or w)
                except ValueError:
                    raise ConfigError(f"--bits item {item!r} must be B or WxA (integers)") from None
                points.append({"method": method, "name": f"{method}-w{wb}a{ab}{tag}",
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


def _extra(args: argparse.Namespace) -> list[str]:
    extra = list(args.train_args or [])
    return extra[1:] if extra and extra[0] == "--" else extra


def _option_groups(tokens: list[str]) -> list[list[str]]:
    """``bitalloc train`` options split into groups: an option and the values after it (tokens not starting
    with "--"; a negative number such as -2 is a value)."""
    groups: list[list[str]] = []
    for tok in tokens:
        if tok.startswith("--") or not groups:
            groups.append([tok])
        else:
            groups[-1].append(tok)
    return groups


def _option_methods(group: list[str], train_parser: argparse.ArgumentParser) -> tuple[str, ...] | None:
    """The methods that use the option of ``group`` (None: every method, or not a method's option)."""
    from bitalloc.train.methods import METHOD_OPTIONS

    action = train_parser._option_string_actions.get(group[0].split("=", 1)[0])
    if action is None or not any(action.dest in o for o in METHOD_OPTIONS.values()):
        return None
    return tuple(m for m, o in METHOD_OPTIONS.items() if action.dest in o)


def method_train_args(extra: list[str], method: str, train_parser: argparse.ArgumentParser) -> list[str]:
    """The options of ``extra`` (after ``--``) that a run of ``method`` uses: a method's own options (e.g.
    ``--gate-lr`` of bb) are passed to that method's runs only, since ``bitalloc train`` refuses options its
    method would ignore."""
    kept = []
    for g in _option_groups(extra):
        used_by = _option_methods(g, train_parser)
        if used_by is None or method in used_by:
            kept += g
    return kept


def check_train_args(extra: list[str], methods: list[str], train_parser: argparse.ArgumentParser) -> None:
    """ConfigError for an option after ``--`` that no method of the sweep uses (it would be ignored)."""
    for g in _option_groups(extra):
        used_by = _option_methods(g, train_parser)
        if used_by is not None and not set(used_by) & set(methods):
            raise ConfigError(f"{g[0]} (after --) applies to --method {' / '.join(used_by)}, which this sweep does "
                              f"not train ({', '.join(methods)}): drop it")


def train_argv(args: argparse.Namespace, point: dict[str, Any], out: Path, state: str,
               train_parser: argparse.ArgumentParser | None = None) -> list[str]:
    """The ``bitalloc train`` command line of one point: ``--resume`` for a partial run, ``--overwrite`` for a
    fresh one or with ``--retrain`` (which trains again from scratch, also over a partial run). With
    ``train_parser``, the options after ``--`` are those the point's method uses (:func:`method_train_args`)."""
    argv = ["train", "--model", args.model, "--method", point["method"], "--out", str(out)]
    for flag, value in (("--dataset", args.dataset), ("--data", args.data), ("--epochs", args.epochs),
                        ("--steps", args.steps), ("--init", args.init), ("--progress", args.progress)):
        if value is not None:
            argv += [flag, str(value)]
    if getattr(args, "trust_code", False):
        argv.append("--trust-code")
    if getattr(args, "model_kwargs", None):
        argv += ["--model-kwargs", args.model_kwargs]
    argv += point["args"]
    extra = _extra(args)
    argv += extra if train_parser is None else method_train_args(extra, point["method"], train_parser)
    if args.retrain or state == "fresh":
        argv.append("--overwrite")
    elif state == "partial":
        argv.append("--resume")
    return argv


# ---- evaluation -------------------------------------------------------------------------------------------

def bits_history(log_path: Path, *, kind: str = "expected", roles: str = "wa") -> dict[str, list[tuple[float, float]]]:
    """Each layer's weight / activation bits per epoch, from a training log's ``state`` records.

    ``kind``: "expected" (Bayesian Bits: E[bits] under the gate posteriors) or "test" (the test-time bits of
    thresholded gates); LSQ / PACT logs have one fixed width ("bits") either way. ``roles``: "w", "a" or "wa".
    Series are named ``"<layer> w"`` / ``"<layer> a"``."""
    from bitalloc.errors import DataError

    if kind not in ("expected", "test"):
        raise ConfigError(f"bits kind {kind!r} must be 'expected' or 'test'")
    key = "expected_bits" if kind == "expected" else "test_bits"
    series: dict[str, list[tuple[float, float]]] = {}
    if not log_path.exists():
        return series
    for i, line in enumerate(log_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{log_path}:{i} is not JSON; give the .jsonl log written by `bitalloc train`") from None
        if rec.get("event") != "epoch" or "state" not in rec:
            continue
        for layer, d in (rec["state"].get("layers") or {}).items():
            for role in ("w", "a"):
                q = d.get(role)
                if q is None or role not in roles:
                    continue
                b = q.get(key, q.get("bits"))
                if b is not None:
                    series.setdefault(f"{layer} {role}", []).append((float(rec["epoch"]), float(b)))
    return series


def evaluate_run(out: Path, train_ns: argparse.Namespace, eval_batch_size: int) -> dict[str, Any]:
    """Freeze the trained model of checkpoint ``out``, evaluate it and cost it."""
    import torch

    from bitalloc.cost import cost_report
    from bitalloc.model.freeze import freeze
    from bitalloc.model.layers import parameter_overhead
    from bitalloc.train.checkpoint import load_checkpoint, load_model_checkpoint
    from bitalloc.train.loop import evaluate
    from bitalloc.train.methods import example_input

    from bitalloc.cli.freeze import frozen_path
    from bitalloc.model.freeze import save_frozen
    from bitalloc.train import distributed as D

    state = load_checkpoint(out)
    model = load_model_checkpoint(out, trust_factory=bool(getattr(train_ns, "trust_code", False)))
    frozen = freeze(model)
    frozen_file = frozen_path(out)
    if D.is_main_process() and (not frozen_file.exists() or frozen_file.stat().st_mtime < out.stat().st_mtime):
        spec = state.get("model") or {}  # runs trained before `train` wrote frozen models: write it here
        save_frozen(frozen, frozen_file, model_name=spec.get("name"),
                    example_shape=(state.get("method_options") or {}).get("input_shape"),
                    extra={"source_checkpoint": str(out), "method": state.get("method"),
                           "method_options": state.get("method_options"), "model_factory": spec.get("factory")})
    val_set, held = evaluation_sets(train_ns)
    ev = evaluate(frozen, val_set, batch_size=eval_batch_size, progress="off", per_sample=True)
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
        "options": opts, "frozen": str(frozen_file), "parameters": parameter_overhead(model),
        "correct": encode_mask(ev.per_sample),
        **holdout_record(frozen, held, eval_batch_size),
    }


def evaluation_sets(train_ns: argparse.Namespace) -> tuple[Any, Any]:
    """(the set a sweep's points are evaluated on, the held-out training samples or None): with ``--holdout``
    (after ``--``) every point is evaluated on the test split *and* on the held-out samples, so that runs can be
    chosen on the latter without looking at the test images; a data set without a test split has only the
    held-out samples (``--holdout`` replaces its ``--val-fraction`` split), which are then both."""
    from bitalloc.cli.train import has_test_split, holdout_split, load_data

    holdout = getattr(train_ns, "holdout", None)
    if holdout is None or not has_test_split(train_ns.dataset):
        _, val_set, _ = load_data(train_ns, augment=False)
        return val_set, None
    # one load: the unaugmented training split gives the held-out samples, as it does to `train --holdout`
    train, test_set, _ = load_data(argparse.Namespace(**{**vars(train_ns), "holdout": None}), augment=False)
    return test_set, holdout_split(train, train, holdout)[1]


def holdout_record(model: Any, held: Any, eval_batch_size: int) -> dict[str, Any]:
    """``{"holdout": {samples, top1, loss, correct}}`` of ``model`` on the held-out training samples ({} without)."""
    from bitalloc.train.loop import evaluate

    if held is None:
        return {}
    ev = evaluate(model, held, batch_size=eval_batch_size, progress="off", per_sample=True)
    return {"holdout": {"samples": len(held), "top1": ev.accuracy, "loss": ev.loss,
                        "correct": encode_mask(ev.per_sample)}}


def fp32_point(path: str, train_ns: argparse.Namespace, eval_batch_size: int) -> dict[str, Any]:
    from bitalloc.train.checkpoint import load_model_checkpoint
    from bitalloc.train.loop import evaluate

    model = load_model_checkpoint(path, trust_factory=bool(getattr(train_ns, "trust_code", False)))
    val_set, held = evaluation_sets(train_ns)
    ev = evaluate(model, val_set, batch_size=eval_batch_size, progress="off", per_sample=True)
    return {"method": "fp32", "name": "fp32", "setting": {}, "top1": ev.accuracy, "relative_bops": 1.0,
            "checkpoint": path, "correct": encode_mask(ev.per_sample),
            **holdout_record(model, held, eval_batch_size)}


def mark_pareto(points: dict[str, dict[str, Any]]) -> None:
    """Set ``pareto`` (on the front of all points) and ``pareto_method`` (on its method's front) on every point."""
    allp = [p for p in points.values() if p.get("relative_bops") is not None and p.get("top1") is not None]
    front = {id(p) for p in pareto_front(allp)}
    by_method: dict[str, list[dict[str, Any]]] = {}
    for p in allp:
        by_method.setdefault(p["method"], []).append(p)
    method_front = {id(p) for pts in by_method.values() for p in pareto_front(pts)}
    for p in points.values():
        p["pareto"] = id(p) in front
        p["pareto_method"] = id(p) in method_front


def _plots_missing(note: str) -> None:
    from bitalloc.train import distributed as D

    if D.is_main_process():
        print(f"sweep: {note}: plots skipped (pip install 'bitalloc[plots]' for pareto.png and the bit-width plots)",
              file=sys.stderr)


def read_points(sweep_json: Path) -> dict[str, dict[str, Any]]:
    """The points of an existing ``sweep.json`` by name ({} if there is none); a corrupt file is an error, not
    silently replaced (its points would be lost)."""
    if not sweep_json.exists():
        return {}
    try:
        return {p["name"]: p for p in json.loads(sweep_json.read_text())["points"]}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{sweep_json} is not a sweep result ({exc.__class__.__name__}: {exc}); move it away "
                          "(the runs' checkpoints are kept next to it: the sweep re-evaluates them)") from exc


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX ``flock``; without fcntl, no lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_outputs(out_dir: Path, points: dict[str, dict[str, Any]], *, plots: bool = True
                  ) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """Merge ``points`` into ``sweep.json`` (Pareto points flagged) and, when matplotlib is installed, draw
    ``pareto.png``; returns the paths and all points. The read-merge-write holds a lock on ``.sweep.lock``, so
    that sweeps running at the same time into one folder keep each other's points."""
    from bitalloc.io import write_json

    sweep_json = out_dir / "sweep.json"
    with _locked(out_dir / ".sweep.lock"):
        merged = read_points(sweep_json)
        merged.update(points)
        mark_pareto(merged)
        paths = {"json": write_json(sweep_json, {"points": list(merged.values())})}
    if not plots:
        return paths, merged
    series: dict[str, list[tuple[float, float]]] = {}
    names: dict[str, list[str]] = {}
    for p in merged.values():
        series.setdefault(p["method"], []).append((100.0 * float(p["relative_bops"]), 100.0 * float(p["top1"])))
        names.setdefault(p["method"], []).append(p["name"])
    from bitalloc.report.plots import PlotsUnavailable, pareto_plot

    try:
        paths["pareto"] = pareto_plot(series, out_dir / "pareto.png", title="accuracy vs relative BOPs",
                                      labels=names)
    except PlotsUnavailable as exc:  # matplotlib is optional
        _plots_missing(str(exc).split(":")[0])
    return paths, merged


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
    from bitalloc.cli.budget_sweep import check_mode, run_budget_sweep
    from bitalloc.train import distributed as D

    check_mode(args)
    if args.budget:
        return run_budget_sweep(args)
    if any(g[0].split("=", 1)[0] == "--config" for g in _option_groups(_extra(args))):
        raise ConfigError("--config after -- would give every run the same widths: use --configs FILE,... "
                          "(one run per file)")

    if args.dataset is None:  # as `bitalloc train` does
        from bitalloc.train.presets import default_dataset

        args.dataset = default_dataset(args.model)
    methods = [m.strip() for m in str(args.method).split(",") if m.strip()]
    points = sweep_points(methods, args.mu, args.bits, getattr(args, "tag", ""), getattr(args, "configs", None))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    read_points(out_dir / "sweep.json")  # a corrupt sweep.json stops the sweep before any training
    done: dict[str, dict[str, Any]] = {}  # this sweep's points (merged into sweep.json at every write)
    from bitalloc.report.plots import plots_available

    plots = plots_available()
    if not plots:
        _plots_missing("matplotlib is not installed")
    parser = build_parser()
    train_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    check_train_args(_extra(args), methods, train_parser)
    train_ns = None
    for point in points:
        out = out_dir / f"{point['name']}.pt"
        state = D.on_main_then_share(lambda: run_state(out))
        argv = train_argv(args, point, out, state, train_parser)
        train_ns = parser.parse_args(argv)
        if state != "done" or args.retrain:
            if D.is_main_process():
                doing = "resuming" if "--resume" in argv else ("retraining" if state != "fresh" else "training")
                print(f"sweep: {point['name']}: {doing} (bitalloc {' '.join(argv)})", file=sys.stderr)
            code = main(argv)
            if code:
                raise ConfigError(f"sweep run {point['name']} failed (exit code {code}); see its log {out.with_suffix('.jsonl')}")
        elif D.is_main_process():
            print(f"sweep: {point['name']}: finished earlier ({out}); evaluating", file=sys.stderr)
        rec = evaluate_run(out, train_ns, args.eval_batch_size)
        rec.update(method=point["method"], name=point["name"], setting=point["setting"], checkpoint=str(out))
        done[point["name"]] = rec
        if D.is_main_process():
            series = bits_history(out.with_suffix(".jsonl"))
            if point["method"] == "bb" and series and plots:
                from bitalloc.report.plots import PlotsUnavailable, line_plot

                try:
                    rec["bits_plot"] = str(line_plot(series, out_dir / f"{point['name']}-bits.png", xlabel="epoch",
                                                     ylabel="expected bits", title=f"{point['name']}: bit width per layer"))
                except PlotsUnavailable as exc:
                    plots = False
                    _plots_missing(str(exc).split(":")[0])
            write_outputs(out_dir, done, plots=plots)
            held_txt = f" (held-out {100 * rec['holdout']['top1']:.2f}%)" if rec.get("holdout") else ""
            print(f"sweep: {point['name']}: top-1 {100 * rec['top1']:.2f}%{held_txt} at {100 * rec['relative_bops']:.3f}% "
                  f"relative BOPs", file=sys.stderr)
    if args.fp32 and train_ns is not None:
        done["fp32"] = fp32_point(args.fp32, train_ns, args.eval_batch_size)
    if D.is_main_process():
        paths, merged = write_outputs(out_dir, done, plots=plots)
        rows = sorted(merged.values(), key=lambda p: (p["method"], p["relative_bops"]))
        held = any(p.get("holdout") for p in rows)
        print(f"{'run':<22} {'top-1 %':>8}" + (f" {'held-out %':>10}" if held else "")
              + f" {'rel. BOPs %':>12}  Pareto (all / method)")
        for p in rows:
            flag = ("*" if p.get("pareto") else "-") + " / " + ("*" if p.get("pareto_method") else "-")
            h = (f" {100 * p['holdout']['top1']:>10.2f}" if p.get("holdout") else f" {'-':>10}") if held else ""
            print(f"{p['name']:<22} {100 * p['top1']:>8.2f}{h} {100 * p['relative_bops']:>12.4f}  {flag}")
        if held:
            print("held-out %: top-1 on the training samples that --holdout kept out of training (choose runs by "
                  "it; top-1 % is the test split's)")
        for k, v in paths.items():
            print(f"{k}: {v}")
    return 0


__all__ = ["register", "run", "run_plot_bits", "sweep_points", "pareto_front", "mark_pareto", "bits_history",
           "evaluate_run", "train_argv", "run_state", "write_outputs", "read_points"]
