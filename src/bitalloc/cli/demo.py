"""``bitalloc demo``: what bitalloc is for, in three parts on embedded data (about two minutes on 2 cores).

1. ``ptq`` -- bit widths where methods differ: a LeNet-5 trained on Debian's Fashion-MNIST (or loaded from the
   demo's cache) quantized with every layer (first and last too) at W2A4 and at W4A2, stage by stage: naive
   min-max, + ACIQ clipping, + per-channel bit allocation, + bias correction (the full ACIQ pipeline), + GPTQ
   rounding. Table (top-1, relative BOPs), ``ptq.json``, the per-channel bit maps and a bar chart.
2. ``budget`` -- bits per layer under a budget: the per-layer sensitivity (:func:`bitalloc.layer_sensitivity`,
   KL divergence on the calibration samples) and the exact search (:func:`bitalloc.search.search`) spend the
   BOPs of uniform W2A4 per layer; both are quantized and evaluated. ``budget.json``, the sensitivity heat map
   with the chosen widths outlined.
3. ``codec`` -- the learned video codec on a synthesized clip (:mod:`bitalloc.cli.demo_codec`).

Each part prints one sentence built from its measured numbers (a direction that does not hold is said so);
``demo.json`` collects them. The widths and the budget were chosen by measuring on the demo's LeNet-5 (W3A3,
W2A4, W4A2, W2A2, W3A4, W4A3, W2A8 tried, 2,000 test images): with the first and last layers at 8 bits (the
default) every method stays within about a point of FP32 down to W2A4, so the demo quantizes every layer; then
min-max falls apart when the weights get 2 bits (77.9% at W2A4, FP32 90.4%), where GPTQ rounding holds (88.2%),
and ACIQ clipping counts when the activations get 2 bits (+1.3 points at W4A2). Per-channel allocation changes
no width at integer budgets on this model (its channels' standard deviations differ by less than 2.6x).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bitalloc.cli.common import batches, flag, given, load_splits, make_eval_fn, output_dir
from bitalloc.errors import ConfigError
from bitalloc.io import write_json
from bitalloc.report.tables import print_table

PARTS = ("ptq", "budget", "codec")
#: part 1: weights at 2 bits (where rounding decides), activations at 2 bits (where clipping decides)
PTQ_WIDTHS = ((2, 4), (4, 2))
STAGES = [("minmax", "min-max (naive)"), ("aciq-clip", "+ ACIQ clipping"), ("aciq-alloc", "+ bit allocation"),
          ("aciq", "+ bias correction (ACIQ)"), ("aciq-gptq", "+ GPTQ rounding")]
#: part 2: the budget (BOPs of every layer at W2A4), the preset and the candidate widths of the search
BUDGET = "W2A4"
BUDGET_PRESET = "aciq"
CANDIDATES = "8x8,8x4,8x2,4x8,4x4,4x2,2x8,2x4,2x2"
#: options that only the LeNet-5 parts / only the codec part read
LENET_OPTIONS = ("data", "epochs", "retrain", "calib", "eval_images")
CODEC_OPTIONS = ("codec_weights", "dynamic_weights", "frames", "quality")


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="what bitalloc is for: PTQ stage by stage, bits per layer under a budget, "
                                    "the video codec (about two minutes)")
    p.add_argument("--part", action="append", choices=PARTS,
                   help="run only this part (repeatable; default: ptq, budget and codec, in that order)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--data", help="Fashion-MNIST folder (default: $BITALLOC_DATA or /usr/share/datasets/fashion-mnist)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs when no cached model exists (default 3)")
    p.add_argument("--retrain", action="store_true", help="train again even if a cached model exists")
    p.add_argument("--calib", type=int, default=32, help="calibration samples (default 32)")
    p.add_argument("--eval-images", type=int, default=2000,
                   help="Fashion-MNIST test images to evaluate on (default 2000, the first ones; 10000 = all)")
    p.add_argument("--codec-weights", help="8-bit codec weights (default: the weights shipped with bitalloc)")
    p.add_argument("--dynamic-weights", help="dynamic-precision codec weights (default: the shipped ones)")
    p.add_argument("--frames", type=int, default=16, help="frames of the synthesized clip (default 16)")
    p.add_argument("--quality", type=int, help="codec quality level (default: the middle one)")
    p.set_defaults(func=run)


def _train_or_load(ckpt: Path, data: str | None, epochs: int, retrain: bool) -> Any:
    from bitalloc import models
    from bitalloc.data import load_dataset
    from bitalloc.errors import CheckpointError
    from bitalloc.train.checkpoint import load_model_checkpoint
    from bitalloc.train.loop import fit
    from bitalloc.train.presets import get_preset

    if ckpt.exists() and not retrain:
        try:
            model = load_model_checkpoint(ckpt)
            print(f"loaded the cached model {ckpt} (pass --retrain to train again)", file=sys.stderr)
            return model.eval()
        except CheckpointError as exc:
            print(f"cached model unusable ({exc}); training again", file=sys.stderr)
    train = load_dataset("fashion-mnist", data, "train")
    test = load_dataset("fashion-mnist", data, "test")
    model = models.create("lenet5")
    cfg = get_preset("lenet5").train_config(epochs=epochs, checkpoint=str(ckpt), overwrite=True,
                                            dataset="fashion-mnist", model_name="lenet5")
    print(f"training LeNet-5 on Fashion-MNIST for {epochs} epochs ...", file=sys.stderr)
    fit(model, train, test, cfg)
    return model.eval()


def _check_options(args: argparse.Namespace, parts: list[str]) -> None:
    typed = given(args)
    for group, part_names in ((LENET_OPTIONS, ("ptq", "budget")), (CODEC_OPTIONS, ("codec",))):
        if not any(p in parts for p in part_names):
            for dest in group:
                if dest in typed:
                    raise ConfigError(f"{flag(dest)} is read only by part {' / '.join(part_names)}, which this run "
                                      f"does not include (--part {' --part '.join(parts)}); drop {flag(dest)} or add "
                                      f"--part {part_names[0]}")
    for dest, lo in (("epochs", 1), ("calib", 1), ("eval_images", 1), ("frames", 1)):
        if getattr(args, dest) < lo:
            raise ConfigError(f"{flag(dest)} {getattr(args, dest)}: give at least {lo}")


class _LeNet:
    """The model, data and evaluation the ptq and budget parts share (loaded once)."""

    def __init__(self, args: argparse.Namespace, out: Path):
        from bitalloc.ptq import fp32_pass_seconds

        self.model = _train_or_load(out / "lenet5-fashion-mnist.pt", args.data, args.epochs, args.retrain)
        calib, test = load_splits("fashion-mnist", args.data, args.calib, limit=args.eval_images)
        self.images = len(test)
        self.calib_samples = args.calib
        self.calib = batches(calib, args.calib)
        self.evaluate = make_eval_fn(test, 500, progress="off")
        self.fp32_top1, self.fp32_seconds = self.evaluate(self.model)
        self.fp32_calib = fp32_pass_seconds(self.model, self.calib, args.calib)

    def config(self, name: str, w: int, a: int) -> Any:
        from bitalloc.config import preset

        return preset(name, w, a, first_last_bits=None, calibration_samples=self.calib_samples)

    @property
    def where(self) -> str:
        return f"LeNet-5 on Fashion-MNIST ({self.images:,} test images, {self.calib_samples} calibration images)"


def _plot(paths: list[Path], make: Any) -> None:
    """Run one plot; plots are optional (matplotlib extra): a missing matplotlib is a note, not a failure."""
    from bitalloc.report.plots import PlotsUnavailable

    try:
        paths.append(make())
    except PlotsUnavailable as exc:
        print(f"plot skipped: {exc}", file=sys.stderr)


# ---- part 1 ------------------------------------------------------------------------------------------------------

def part_ptq(lenet: _LeNet, out: Path) -> dict[str, Any]:
    """Every stage of the pipeline at each of :data:`PTQ_WIDTHS`; returns the part's summary."""
    from bitalloc.ptq import run_ptq

    runs: list[dict[str, Any]] = []
    rows: list[list[Any]] = [["FP32", "float", lenet.fp32_top1, None, 100.0]]
    for w, a in PTQ_WIDTHS:
        base = None
        for key, label in STAGES:
            res = run_ptq(lenet.model, lenet.config(key, w, a), lenet.calib, lenet.evaluate, fp32_top1=lenet.fp32_top1,
                          fp32_eval_seconds=lenet.fp32_seconds, fp32_calib_seconds=lenet.fp32_calib,
                          name=f"W{w}A{a} {key}")
            r = dict(res.report, width=f"W{w}A{a}", preset=key, stage=label)
            base = r["top1"] if base is None else base
            runs.append(r)
            rows.append([f"W{w}A{a}", label, r["top1"], r["top1"] - base, 100 * r["relative_bops"]])
    print_table(f"Post-training quantization stage by stage: {lenet.where}; every layer at the width",
                ["bits", "stage", "top-1 %", "vs min-max", "rel. BOPs %"], rows)
    widths = []
    for w, a in PTQ_WIDTHS:
        mine = [r for r in runs if r["width"] == f"W{w}A{a}"]
        steps = [(mine[i]["top1"] - mine[i - 1]["top1"], mine[i]["stage"]) for i in range(1, len(mine))]
        widths.append({"width": f"W{w}A{a}", "minmax_top1": mine[0]["top1"], "aciq_top1": mine[3]["top1"],
                       "full_top1": mine[-1]["top1"], "best_stage": max(steps)[1], "best_stage_gain": max(steps)[0]})
    phrases = []
    for s in widths:
        verb = "keeps" if s["full_top1"] > s["minmax_top1"] else "does not beat min-max, reaching"
        phrases.append(f"at {s['width']} naive min-max gets {s['minmax_top1']:.1f}% and the full pipeline {verb} "
                       f"{s['full_top1']:.1f}% ({s['best_stage'].lstrip('+ ')} adds the most: "
                       f"{s['best_stage_gain']:+.1f} points)")
    allocated = [r for r in runs if r["preset"] == "aciq-alloc"]
    if all(b == int(r["width"][1]) for r in allocated for l in r["layers"] if l.get("status") == "quantized"
           for b in l.get("w_bits_per_channel") or []):
        phrases.append("per-channel allocation leaves every channel at the budget on this model (its channels' "
                       "ranges differ too little)")
    sentence = (f"PTQ, every layer of LeNet-5 ({lenet.images:,} test images, FP32 {lenet.fp32_top1:.1f}%): "
                + "; ".join(phrases) + ".")
    summary = {"sentence": sentence, "model": "lenet5", "dataset": "fashion-mnist", "eval_images": lenet.images,
               "calibration_samples": lenet.calib_samples, "fp32_top1": lenet.fp32_top1,
               "widths": widths, "runs": runs}
    write_json(out / "ptq.json", summary)
    paths = [out / "ptq.json"]
    from bitalloc.report.plots import bar_chart, bit_heatmap

    series = {label: [r["top1"] for r in runs if r["preset"] == key] for key, label in STAGES}
    _plot(paths, lambda: bar_chart([f"W{w}A{a}" for w, a in PTQ_WIDTHS], series, out / "ptq_stages.png",
                                   ylabel="top-1 (%)", title=f"LeNet-5 / Fashion-MNIST, every layer quantized "
                                                             f"(FP32 {lenet.fp32_top1:.1f}%)"))
    w, a = PTQ_WIDTHS[-1]
    full = next(r for r in runs if r["name"] == f"W{w}A{a} aciq-gptq")
    _plot(paths, lambda: bit_heatmap([l for l in full["layers"] if l.get("status") == "quantized"],
                                     out / "ptq_bitmap.png", title=f"Full pipeline (aciq-gptq) W{w}A{a}: bits per channel"))
    summary["files"] = [str(p) for p in paths]
    return summary


# ---- part 2 ------------------------------------------------------------------------------------------------------

def part_budget(lenet: _LeNet, out: Path) -> dict[str, Any]:
    """Uniform :data:`BUDGET` against the searched per-layer widths at the same BOPs; returns the summary."""
    import bitalloc
    from bitalloc.search import search

    w, a = int(BUDGET[1]), int(BUDGET[3])
    cfg = lenet.config(BUDGET_PRESET, w, a)
    t0 = time.perf_counter()
    sens = bitalloc.layer_sensitivity(lenet.model, cfg, lenet.calib, bits=CANDIDATES)
    found = search(sens, f"bops={BUDGET}")
    search_seconds = time.perf_counter() - t0
    results, models = {}, {}
    for key, config in (("uniform", cfg), ("searched", found.config)):
        q = models[key] = bitalloc.quantize(lenet.model, config, lenet.calib)
        top1, _ = lenet.evaluate(q)
        cost = bitalloc.cost_report(q, lenet.calib[0][0][:1])
        widths = {l.name: f"W{l.w_bits:g}A{l.a_bits:g}" for l in cost.layers if l.quantized}
        results[key] = {"top1": top1, "relative_bops": cost.relative_bops, "bops": cost.bops, "widths": widths}
    u, s = results["uniform"], results["searched"]
    rows = [[name, f"{sens.macs[i]:,.0f}", u["widths"].get(name, "-"), s["widths"].get(name, "-"),
             float(sens.values[i, sens.candidates.index(found.choice[name])])]
            for i, name in enumerate(sens.layers)]
    print_table(f"Bits per layer under a budget (BOPs of uniform {BUDGET}): {lenet.where}",
                ["layer", "MACs", "uniform", "searched", "predicted KL"], rows)
    print_table("Same budget, spent uniformly and by the search",
                ["configuration", "top-1 %", "rel. BOPs %"],
                [[f"uniform {BUDGET}", u["top1"], 100 * u["relative_bops"]],
                 ["searched per layer", s["top1"], 100 * s["relative_bops"]]])
    better = s["top1"] - u["top1"]
    verb = (f"gain {better:.1f} points" if better > 0 else f"do not beat uniform ({better:+.1f} points)")
    costly = max(range(len(sens.layers)), key=lambda i: float(sens.values[i, sens.candidates.index(
        next(c for c in sens.candidates if c.label == BUDGET))]))
    sentence = (f"Budget: at the BOPs of uniform {BUDGET} ({100 * u['relative_bops']:.2f}% of FP32) the "
                f"per-layer widths of the search {verb} over uniform ({s['top1']:.1f}% against {u['top1']:.1f}%, "
                f"{100 * s['relative_bops']:.2f}% BOPs); it gives {sens.layers[costly]}, the layer most sensitive "
                f"at {BUDGET}, {s['widths'].get(sens.layers[costly], '?')}.")
    summary = {"sentence": sentence, "budget": f"bops={BUDGET}", "preset": BUDGET_PRESET, "candidates": CANDIDATES,
               "eval_images": lenet.images, "calibration_samples": lenet.calib_samples, "fp32_top1": lenet.fp32_top1,
               "uniform": u, "searched": s, "search": found.to_dict(), "sensitivity_and_search_seconds": search_seconds,
               "sensitivity": {"layers": sens.layers, "candidates": [c.label for c in sens.candidates],
                               "metric": sens.metric, "values": sens.values.tolist()}}
    write_json(out / "budget.json", summary)
    paths = [out / "budget.json"]
    from bitalloc.report.plots import bit_heatmap, sensitivity_heatmap

    chosen = [sens.candidates.index(found.choice[n]) for n in sens.layers]
    _plot(paths, lambda: sensitivity_heatmap(sens.layers, [c.label for c in sens.candidates], sens.values,
                                             out / "budget_sensitivity.png", label=f"{sens.metric} divergence",
                                             title=f"LeNet-5 sensitivity per layer and width (outlined: the "
                                                   f"search at bops={BUDGET})", chosen=chosen))
    _plot(paths, lambda: bit_heatmap(bitalloc.bit_map(models["searched"]), out / "budget_bitmap.png",
                                     title=f"Searched widths at the BOPs of uniform {BUDGET}: bits per channel"))
    summary["files"] = [str(p) for p in paths]
    return summary


# ---- the command -------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    parts = [p for p in PARTS if p in (args.part or PARTS)]
    _check_options(args, parts)
    codec_paths = None
    if "codec" in parts:  # fail before spending minutes on the other parts
        from bitalloc.cli.demo_codec import weight_paths

        codec_paths = weight_paths(args.codec_weights, args.dynamic_weights)
    out = output_dir(args.out)
    summaries: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    lenet = None
    for part in parts:
        t0 = time.perf_counter()
        if part in ("ptq", "budget"):
            lenet = lenet or _LeNet(args, out)
            summaries[part] = (part_ptq if part == "ptq" else part_budget)(lenet, out)
        else:
            from bitalloc.cli.demo_codec import part_codec

            summaries[part] = part_codec(out, *codec_paths, frames=args.frames, quality=args.quality)
        seconds[part] = time.perf_counter() - t0
        print(f"\n{summaries[part]['sentence']}\n")
    write_json(out / "demo.json", {"parts": {p: {"sentence": s["sentence"], "files": s["files"]}
                                             for p, s in summaries.items()},
                                   "seconds": {**seconds, "total": time.perf_counter() - start}})
    print(f"Done in {time.perf_counter() - start:.0f} s ({', '.join(f'{p} {s:.0f} s' for p, s in seconds.items())}). "
          "Outputs:", file=sys.stderr)
    for p in [out / "demo.json"] + [Path(f) for s in summaries.values() for f in s["files"]]:
        print(f"  {p}", file=sys.stderr)
    return 0
