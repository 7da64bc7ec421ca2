"""Per-layer mixed precision without training (issue 17): sensitivity, exact search under a BOPs or size budget,
against uniform widths, on the anchors' split.

    python benchmarks/mixed_precision.py --model efficientnet_lite0 --data $DATA/imagenet-sample.zip \\
        --split anchors --hessian
    python benchmarks/mixed_precision.py --model resnet20 --checkpoint runs/models/resnet20-cifar10.pt \\
        --data $DATA/cifar10-jpeg.zip --split anchors

Steps (each result is kept in ``benchmarks/results/mixed_precision_<model>.partial.json`` as it comes, and the
sensitivity in ``--work-dir``, so an interrupted run continues where it stopped):

1. FP32 top-1 on the evaluation images and the time of one FP32 pass over the calibration images;
2. the sensitivity of every searched layer at each candidate (``--candidates``, default {8,4,2} x {8,4}) with the
   base configuration ``--preset`` (default aciq-gptq), measured (KL divergence of the outputs on the calibration
   images) and, with ``--hessian``, the Hutchinson estimate;
3. uniform post-training quantization at each width of ``--widths`` with each preset of ``--uniform-presets``;
4. the searched mixed precision at the BOPs (``bops=WxAy``) and at the weight size (``size=WxAy``) of each uniform
   width, quantized with the base preset, evaluated, and checked (predicted against measured damage and
   calibration top-1; each layer's share at the BOPs budgets of ``--layer-check``);
5. with ``--hessian``: the same search on the Hessian estimates at the BOPs budgets, and the rank correlation of
   the two sensitivities.

Writes benchmarks/results/mixed_precision_<model>.json, plots under benchmarks/results/mixed_precision/<model>/,
and the BENCHMARKS.md section ``mixed-<model>``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (command_line, finish_results, git_revision, machine, md_table, model_data_parser,  # noqa: E402
                     update_section)

from bitalloc.cli.budget_sweep import masked_eval_fn  # noqa: E402
from bitalloc.cli.common import batches, load_model, load_splits  # noqa: E402
from bitalloc.config import preset  # noqa: E402
from bitalloc.io import torch_load, torch_save, write_json  # noqa: E402
from bitalloc.ptq import fp32_pass_seconds, run_ptq  # noqa: E402
from bitalloc.report.stats import decode_mask, encode_mask, paired_comparison  # noqa: E402
from bitalloc.search import (Sensitivity, add_hessian, check_choice, layer_sensitivity, parse_budget,  # noqa: E402
                             search)
from bitalloc.search.space import Candidate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average ties
            sel = x == v
            r[sel] = r[sel].mean()
        return r
    if len(a) < 3:
        return float("nan")
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def main() -> int:
    ap = model_data_parser(__doc__, batch_size=50)
    ap.add_argument("--split", choices=("random", "anchors"), default="anchors")
    ap.add_argument("--preset", default="aciq-gptq", help="base configuration of the search (default aciq-gptq)")
    ap.add_argument("--uniform-presets", default="aciq-gptq,aciq")
    ap.add_argument("--widths", default="W4A8,W4A4,W8A8,W2A8", help="uniform widths (and budgets), in run order")
    ap.add_argument("--candidates", default=None, help="search candidates (default 8x8,8x4,4x8,4x4,2x8,2x4)")
    ap.add_argument("--gptq-damp", help="GPTQ damping of the GPTQ presets (a number, or cv; default 0.01)")
    ap.add_argument("--gptq-asymmetric", action="store_true",
                    help="GPTQ presets: asymmetric calibration (each layer fitted to the float network's output)")
    ap.add_argument("--gptq-act-order", action="store_true", help="GPTQ presets: act-order (columns by diag(H))")
    ap.add_argument("--clip-check", choices=("none", "output", "network"),
                    help="how activation ranges are checked (default: each preset's)")
    ap.add_argument("--hessian", action="store_true", help="also the Hutchinson estimate (and a search on it)")
    ap.add_argument("--hutchinson", type=int, default=16, help="Rademacher vectors of the Hutchinson estimate")
    ap.add_argument("--layer-check", default="W4A8,W4A4", help="BOPs budgets whose per-layer shares are measured")
    ap.add_argument("--work-dir", default="runs/mixed", help="where the sensitivity is kept between runs")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--out", help="JSON results (default benchmarks/results/mixed_precision_MODEL.json)")
    ap.add_argument("--no-md", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--render-only", action="store_true", help="only render BENCHMARKS.md from the results JSON")
    args = ap.parse_args()
    from bitalloc import models

    args.checkpoint = args.checkpoint or None
    model, name, ckpt_ds = load_model(args)
    out = Path(args.out) if args.out else RESULTS / f"mixed_precision_{name}.json"
    if args.render_only:  # the final results, or those of an interrupted run
        import json

        src = out if out.exists() else out.with_name(out.stem + ".partial.json")
        update_section(f"mixed-{name}", render(json.loads(src.read_text())))
        return 0
    dataset = args.dataset or ckpt_ds or models.model_info(name).default_dataset
    calib, evaluation = load_splits(dataset, args.data, args.calib, limit=args.limit, split=args.split)
    calib_batches = batches(calib, min(args.batch_size, args.calib))
    masks: dict[int, np.ndarray] = {}
    evaluate = masked_eval_fn(evaluation, args.batch_size, masks)
    partial = out.with_name(out.stem + ".partial.json")
    state: dict[str, Any] = {}
    if partial.exists():
        import json

        state = json.loads(partial.read_text())
    rows: dict[str, dict] = {r["key"]: r for r in state.get("rows", [])}
    if rows and (state.get("revision"), state.get("command")) != (git_revision(), command_line()):
        # resumed from another run: say which rows (and the sensitivity, kept in --work-dir) it measured
        state.setdefault("earlier_runs", []).append(
            {"revision": state.get("revision"), "command": state.get("command"), "rows": list(rows),
             "sensitivity_seconds": (state.get("sensitivity") or {}).get("seconds")})
    # plots beside the main run's only for the default --out (a variant run, e.g. --gptq-damp cv, keeps its own)
    plots = RESULTS / "mixed_precision" / (name if args.out is None else out.stem.removeprefix("mixed_precision_"))
    work = Path(args.work_dir)

    def save() -> dict:
        s = {"model": name, "dataset": dataset, "data": args.data, "split": args.split,
             "eval_images": len(evaluation), "calibration_images": args.calib, "preset": args.preset,
             **{k: state[k] for k in ("fp32", "sensitivity", "hessian_correlation", "earlier_runs") if k in state},
             "rows": list(rows.values()), "machine": machine(), "command": command_line(), "revision": git_revision()}
        write_json(partial, s)
        return s

    if "fp32" not in state:
        top1, secs = evaluate(model)
        calib_s = fp32_pass_seconds(model, calib_batches, args.calib)
        state["fp32"] = {"top1": top1, "eval_seconds": secs, "calibration_pass_seconds": calib_s,
                         "correct": encode_mask(masks.pop(id(model)))}
        save()
    fp32 = state["fp32"]
    print(f"{name}: FP32 top-1 {fp32['top1']:.2f}% on {len(evaluation)} images; FP32 calibration pass "
          f"{fp32['calibration_pass_seconds']:.1f} s", flush=True)

    # ---- sensitivity ----------------------------------------------------------------------------------
    widths = [Candidate.parse(w) for w in args.widths.split(",") if w.strip()]

    def gptq_kw(p: str) -> dict:
        """The --gptq-* options, for the presets that round by GPTQ, and --clip-check."""
        check = {"clip_check": args.clip_check}
        if not p.endswith("-gptq"):
            return check
        damp = None if args.gptq_damp is None else (args.gptq_damp if args.gptq_damp == "cv" else float(args.gptq_damp))
        return {"gptq_damp": damp, "gptq_act_order": True if args.gptq_act_order else None,
                "gptq_asymmetric": True if args.gptq_asymmetric else None, **check}

    tag = "".join(f"-{k}{v}" for k, v in gptq_kw(args.preset).items() if v is not None)  # e.g. -gptq_dampcv
    sens_file = work / f"sensitivity-{name}-{args.preset}-{args.split}{tag}.pt"
    if sens_file.exists():
        sens = Sensitivity.from_state(torch_load(sens_file, what="sensitivity", fix="delete it to recompute"))
    else:
        done = [0]

        def tick(n: int, total: int) -> None:
            done[0] += n
            if done[0] % 10 == 0:
                print(f"  sensitivity: {done[0]} of {total} (layer, candidate) pairs measured", flush=True)

        cfg = preset(args.preset, 4, 4, calibration_samples=args.calib, **gptq_kw(args.preset))
        sens = layer_sensitivity(model, cfg, calib_batches, args.candidates, reference_bits=widths, progress=tick)
        torch_save(sens.state(), sens_file)
    state["sensitivity"] = {k: v for k, v in sens.to_dict().items() if k != "config"}
    state["sensitivity"]["base_config"] = sens.config
    save()
    print(f"sensitivity: {len(sens.layers)} layers x {len(sens.candidates)} candidates, {sens.engine}, "
          f"{sens.seconds}", flush=True)
    from bitalloc.report.plots import PlotsUnavailable, pareto_plot, sensitivity_heatmap

    try:
        sensitivity_heatmap(sens.layers, [c.label for c in sens.candidates], sens.values, plots / "sensitivity.png",
                            title=f"{name}: KL divergence of each layer alone ({args.preset})", label="KL divergence")
    except PlotsUnavailable:
        pass

    def record(key: str, cfg, label: str, extra: dict, check=None) -> dict:
        if key in rows:
            return rows[key]
        t0 = time.perf_counter()
        res = run_ptq(model, cfg, calib_batches, evaluate, fp32_top1=fp32["top1"],
                      fp32_eval_seconds=fp32["eval_seconds"], fp32_calib_seconds=fp32["calibration_pass_seconds"],
                      name=label)
        r = res.report
        row = {"key": key, "label": label, **extra, "top1": r["top1"], "relative_bops": r["relative_bops"],
               "bops": r["bops"], "memory_bits": r["memory_bits"], "size_mb": r["memory_bits"] / 8e6,
               "calibration_seconds": r["timing"]["calibration_seconds"],
               "calibration_ratio": r["timing"]["calibration_ratio"], "eval_seconds": r["timing"]["eval_seconds"],
               "correct": encode_mask(masks.pop(id(res.model))),
               "layers": [{k: l.get(k) for k in ("name", "w_bits", "a_bits", "status")} for l in r["layers"]]}
        if check is not None:
            row["check"] = check(res.model)
        rows[key] = row
        save()
        print(f"  {label:40s} top-1 {row['top1']:6.2f}  rel. BOPs {100 * row['relative_bops']:.3f}%  "
              f"size {row['size_mb']:.3f} MB  ({time.perf_counter() - t0:.0f} s)", flush=True)
        return row

    uniform_presets = [p for p in args.uniform_presets.split(",") if p.strip()]
    layer_check = {Candidate.parse(w) for w in args.layer_check.split(",") if w.strip()}

    def mixed(w: Candidate, kind: str) -> None:
        budget = parse_budget(f"{kind}={w.label}")
        found = search(sens, budget)
        record(f"mixed-{args.preset}-{kind}-{w.label}", found.config, f"mixed {args.preset} {kind}={w.label}",
               {"kind": "mixed", "preset": args.preset, "budget": budget.text, "budget_kind": kind,
                "width": w.label, "source": "measured", "search": found.to_dict()},
               check=lambda q: check_choice(model, found, sens, calib_batches, qmodel=q,
                                            layer_effects=kind == "bops" and w in layer_check))

    def uniform(w: Candidate, p: str) -> None:
        record(f"uniform-{p}-{w.label}", preset(p, w.w_bits, w.a_bits, calibration_samples=args.calib, **gptq_kw(p)),
               f"{p} {w.label}", {"kind": "uniform", "preset": p, "width": w.label})

    # most informative first (a shared machine may stop the run): the base preset and mixed at equal BOPs,
    # then equal size, then the other uniform presets
    for w in widths:
        uniform(w, args.preset)
        mixed(w, "bops")
    if args.hessian:  # after the goal rows (a shared machine may stop the run), before the rest
        hess_file = work / f"sensitivity-{name}-{args.preset}-{args.split}{tag}-hessian.pt"
        if hess_file.exists():
            sens = Sensitivity.from_state(torch_load(hess_file, what="sensitivity", fix="delete it to recompute"))
        else:
            sens = add_hessian(model, sens, calib_batches, hutchinson_samples=args.hutchinson)
            torch_save(sens.state(), hess_file)
        state["sensitivity"]["seconds"] = sens.seconds
        try:
            sensitivity_heatmap(sens.layers, [c.label for c in sens.candidates], sens.hessian,
                                plots / "sensitivity-hessian.png",
                                title=f"{name}: Hutchinson estimate of the KL divergence", label="estimate")
        except PlotsUnavailable:
            pass
        flat = [(sens.values[i, j], sens.hessian[i, j]) for i in range(len(sens.layers))
                for j, c in enumerate(sens.candidates) if not c.is_float]
        a, b = np.array(flat).T
        per = {c.label: spearman(sens.values[:, j], sens.hessian[:, j]) for j, c in enumerate(sens.candidates)}
        state["hessian_correlation"] = {"spearman_all": spearman(a, b), "spearman_per_candidate": per,
                                        "traces": sens.traces}
        save()
        hs = Sensitivity(**{**sens.__dict__, "values": sens.hessian, "metric": "kl (Hessian estimate)"})
        for w in widths:
            if w not in layer_check:
                continue
            found = search(hs, parse_budget(f"bops={w.label}"))
            record(f"mixed-hessian-{args.preset}-bops-{w.label}", found.config,
                   f"mixed (Hessian) {args.preset} bops={w.label}",
                   {"kind": "mixed-hessian", "preset": args.preset, "budget": found.budget.text, "budget_kind": "bops",
                    "width": w.label, "source": "hessian", "search": found.to_dict()})
    for w in widths:
        mixed(w, "size")
    for w in widths:
        for p in uniform_presets:
            if p != args.preset:
                uniform(w, p)
    final = save()
    try:
        for key, xlabel, title in (("relative_bops", "relative BOPs (%)", "accuracy vs relative BOPs"),
                                   ("size_mb", "size (MB)", "accuracy vs size")):
            series: dict[str, list] = {}
            labels: dict[str, list] = {}
            for r in rows.values():
                s = r["label"].split(" bops=")[0].split(" size=")[0] if r["kind"] != "uniform" else r["preset"]
                if r["kind"] != "uniform" and r.get("budget_kind") != ("bops" if key == "relative_bops" else "size"):
                    continue
                x = 100 * r["relative_bops"] if key == "relative_bops" else r["size_mb"]
                series.setdefault(s, []).append((x, r["top1"]))
                labels.setdefault(s, []).append(r["width"])
            pareto_plot(series, plots / f"pareto-{key.split('_')[0]}.png", xlabel=xlabel, title=f"{name}: {title}",
                        labels=labels)
    except PlotsUnavailable:
        pass
    finish_results(out, partial, final, f"mixed-{name}", None if args.no_md else render(final))
    return 0


def _widths(row: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in row["search"]["widths"].items())


def _g(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _num(v: float | None) -> str:
    return "n/a" if v is None or v != v else f"{v:.2f}"


def _row(rows: list[dict], key: str) -> dict | None:
    return next((r for r in rows if r["key"] == key), None)


def render(s: dict) -> str:
    rows, n = s["rows"], s["eval_images"]
    base = s["preset"]
    widths = list(dict.fromkeys(r["width"] for r in rows if r["kind"] == "uniform"))
    presets = list(dict.fromkeys(r["preset"] for r in rows if r["kind"] == "uniform"))
    sens = s.get("sensitivity", {})
    fp32 = s["fp32"]
    lines = [f"### {s['model']} on {s['dataset']}: mixed precision against uniform widths ({n} evaluation images, "
             f"{s['calibration_images']} calibration images, {s['split']} split)", "",
             f"FP32 top-1 **{fp32['top1']:.2f}%**. Mixed precision: the least summed sensitivity (KL divergence of the "
             f"outputs on the calibration images, each layer alone) within the budget, solved exactly "
             f"(integer program), with {', '.join(sens.get('candidates', []))} per layer and the first and last layer "
             f"at 8 bits; every layer then quantized by the `{base}` pipeline. Budgets: the relative BOPs, or the "
             "model size (weights at their widths, biases, metadata, as the cost report counts them), of the "
             "uniform width of the row. Paired: the mixed configuration against the uniform one on the same "
             "images (top-1 difference with its paired standard error, McNemar's exact p).", ""]
    table = []
    for w in widths:
        for p in presets:
            u = _row(rows, f"uniform-{p}-{w}")
            if u:
                table.append([f"uniform {p}", w, u["top1"], 100 * u["relative_bops"], u["size_mb"], ""])
        ub = _row(rows, f"uniform-{base}-{w}")
        for kind in ("bops", "size"):
            m = _row(rows, f"mixed-{base}-{kind}-{w}")
            if not m:
                continue
            paired = ""
            if ub:
                pc = paired_comparison(decode_mask(m["correct"]), decode_mask(ub["correct"]))
                paired = f"{100 * pc.diff:+.2f} +- {100 * pc.se:.2f} (p {pc.p_value:.2g})"
            table.append([f"mixed {base}, {kind} of {w}", _widths(m), m["top1"], 100 * m["relative_bops"],
                          m["size_mb"], paired])
        mh = _row(rows, f"mixed-hessian-{base}-bops-{w}")
        if mh:
            table.append([f"mixed {base} (Hessian sensitivity), bops of {w}", _widths(mh), mh["top1"],
                          100 * mh["relative_bops"], mh["size_mb"], ""])
    lines += [md_table(["configuration", "widths", "top-1 %", "rel. BOPs %", "size MB", f"paired vs uniform {base}"],
                       table), ""]
    goals = []
    targets = (("W4A8", 86.0), ("W4A4", 80.0)) if s["model"] == "efficientnet_lite0" else ()  # the goals
    for w, target in targets:
        m = _row(rows, f"mixed-{base}-bops-{w}")
        u = _row(rows, f"uniform-{base}-{w}")
        if m:
            goals.append(f"- at the relative BOPs of uniform {w} ({100 * m['relative_bops']:.3f}% used): mixed "
                         f"{m['top1']:.2f}% (goal >= {target:g}%: {'met' if m['top1'] >= target else 'NOT met'})"
                         + (f"; uniform {base} {u['top1']:.2f}%" if u else ""))
    secs = sens.get("seconds", {})
    ptq_cal = {p: _row(rows, f"uniform-{p}-W4A4") for p in presets}
    search_s = secs.get("total", 0.0)  # the measured sensitivity (the Hessian estimate is extra)
    solve_s = max((r["search"]["solve_seconds"] for r in rows if r.get("search")), default=0.0)
    for p, r in ptq_cal.items():
        if r:
            ratio = (search_s + solve_s) / r["calibration_seconds"]
            goals.append(f"- search time (sensitivity {search_s:.0f} s + solve {solve_s:.2f} s) against one `{p}` "
                         f"W4A4 calibration ({r['calibration_seconds']:.0f} s): {ratio:.1f}x (goal <= 5x: "
                         f"{'met' if ratio <= 5 else 'NOT met'})")
    lines += ["Goals:", *goals, ""]
    lines += [f"Times: FP32 pass over the calibration images {fp32['calibration_pass_seconds']:.1f} s; sensitivity "
              f"{', '.join(f'{k} {v:.0f} s' for k, v in secs.items())} ({sens.get('engine', '')} engine: the network "
              "is rerun from each layer on, from the float pass's kept values). Each (layer, candidate) costs "
              f"about {(secs.get('measure', 0) / max(1, len(sens.get('layers', [])) * len(sens.get('candidates', [])))):.1f} s.",
              ""]
    checks = []
    for r in rows:
        c = r.get("check")
        if not c:
            continue
        cost = c["cost"]
        checks.append([r["label"], *(_g(c.get(k)) for k in ("predicted_damage", "measured_damage",
                                                             "predicted_output_damage")),
                       c.get("predicted_top1"), c.get("measured_top1"), c.get("predicted_agreement"),
                       c.get("measured_agreement"), "yes" if cost["budget_met"] and cost["cost_matches"] else "NO"])
    if checks:
        lines += [f"Additivity on the {sens.get('samples', '')} calibration images: the summed KL of the layers "
                  "(predicted) against the KL of the configuration (measured), the KL and top-1 of the float outputs "
                  "plus every layer's own output change (predicted output), against the configuration's; and "
                  "whether the cost report counts exactly the predicted cost, within the budget:", "",
                  md_table(["configuration", "pred. KL", "meas. KL", "pred.-output KL", "pred. top-1", "meas. top-1",
                            "pred. agreement %", "meas. agreement %", "budget met exactly"], checks), ""]
        for r in rows:
            c = r.get("check")
            if c and c["layers"] and "measured_damage" in c["layers"][0]:
                p = np.array([l["predicted_damage"] for l in c["layers"]])
                m = np.array([l["measured_damage"] for l in c["layers"]])
                lines.append(f"- {r['label']}: per layer, the share measured in the configuration (its KL minus the "
                             f"KL with that layer back in float) against the layer's own sensitivity: rank "
                             f"correlation {_num(spearman(p, m))}, sum of shares {m.sum():.4g} against {p.sum():.4g}.")
        lines.append("")
    hc = s.get("hessian_correlation")
    if hc:
        lines += [f"Sensitivity by measurement against the Hutchinson (HAWQ-v2) estimate: Spearman rank correlation "
                  f"{_num(hc['spearman_all'])} over all (layer, candidate) pairs; per candidate "
                  + ", ".join(f"{k} {_num(v)}" for k, v in hc["spearman_per_candidate"].items()) + ".", ""]
    lines += [f"Plots: `benchmarks/results/mixed_precision/{s['model']}/` (sensitivity.png, pareto-relative.png, "
              "pareto-size.png).", "",
              f"Machine: {s['machine']}. Revision {s['revision']}. Command: `{s['command']}`"]
    for e in s.get("earlier_runs", []):
        lines += ["", f"Resumed from an earlier run (revision {e['revision']}, command `{e['command']}`), which "
                  f"measured the rows {', '.join(e['rows'])}, the FP32 top-1 and calibration pass, and the measured "
                  "sensitivity (its float_pass, costs, measure and total times above); this run added the other rows "
                  "and the Hessian estimate."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
