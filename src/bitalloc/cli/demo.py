"""``bitalloc demo``: the main job on the embedded default.

Trains (or loads from its cache) a LeNet-5 on Fashion-MNIST, quantizes it at W8A8, W4A8 and W4A4 with naive
min-max and with the full ACIQ pipeline (analytical clipping, per-channel bit allocation, bias correction),
prints a table (accuracy, relative BOPs, size) and writes JSON and PNG results.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bitalloc.cli.common import batches, load_splits, make_eval_fn, output_dir
from bitalloc.io import write_json
from bitalloc.report.tables import print_table

CONFIGS = [(8, 8), (4, 8), (4, 4)]
METHODS = [("minmax", "min-max (naive)"), ("aciq", "ACIQ full pipeline")]


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="train LeNet-5 on Fashion-MNIST and compare min-max with ACIQ at W8A8/W4A8/W4A4")
    p.add_argument("--data", help="Fashion-MNIST folder (default: $BITALLOC_DATA or /usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs when no cached model exists (default 3)")
    p.add_argument("--retrain", action="store_true", help="train again even if a cached model exists")
    p.add_argument("--calib", type=int, default=32, help="calibration samples (default 32)")
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
            return model
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


def run(args: argparse.Namespace) -> int:
    from bitalloc.config import preset
    from bitalloc.ptq import run_ptq, fp32_pass_seconds

    start = time.perf_counter()
    out = output_dir(args.out)
    model = _train_or_load(out / "lenet5-fashion-mnist.pt", args.data, args.epochs, args.retrain)
    calib, test = load_splits("fashion-mnist", args.data, args.calib)
    calib_batches = batches(calib, args.calib)
    evaluate = make_eval_fn(test, 500, progress="off")
    fp32_top1, fp32_seconds = evaluate(model)
    fp32_calib = fp32_pass_seconds(model, calib_batches, args.calib)
    reports: list[dict[str, Any]] = []
    rows = [["FP32", "-", fp32_top1, 0.0, 100.0, None, None]]
    for w, a in CONFIGS:
        for key, label in METHODS:
            cfg = preset(key, w, a, calibration_samples=args.calib)
            res = run_ptq(model, cfg, calib_batches, evaluate, fp32_top1=fp32_top1, fp32_eval_seconds=fp32_seconds,
                          fp32_calib_seconds=fp32_calib, name=f"W{w}A{a} {key}")
            r = res.report
            reports.append(r)
            rows.append([f"W{w}A{a}", label, r["top1"], r["top1_drop"], 100 * r["relative_bops"],
                         r["memory_bits"] / 8e3, r["compression"]])
    rows[0][5] = reports[0]["fp32_memory_bits"] / 8e3
    rows[0][6] = 1.0
    print_table("LeNet-5 on Fashion-MNIST (10,000 test images)",
                ["bits", "method", "top-1 %", "drop", "rel. BOPs %", "size kB", "compression"], rows)
    summary = {"model": "lenet5", "dataset": "fashion-mnist", "fp32_top1": fp32_top1, "runs": reports}
    write_json(out / "demo.json", summary)
    paths = [out / "demo.json"]
    try:
        from bitalloc.report.plots import bar_chart, bit_heatmap

        labels = [f"W{w}A{a}" for w, a in CONFIGS]
        series = {label: [r["top1"] for r in reports if r["name"].endswith(key)] for key, label in METHODS}
        paths.append(bar_chart(labels, series, out / "accuracy.png", ylabel="top-1 (%)",
                               title=f"LeNet-5 / Fashion-MNIST (FP32 {fp32_top1:.2f}%)"))
        w4a4 = next(r for r in reports if r["name"] == "W4A4 aciq")
        paths.append(bit_heatmap([l for l in w4a4["layers"] if l.get("status") == "quantized"], out / "bitmap_w4a4_aciq.png",
                                 title="ACIQ W4A4: bits per channel"))
    except Exception as exc:  # plots are optional (matplotlib extra)
        print(f"plots skipped: {exc}", file=sys.stderr)
    print(f"\nDone in {time.perf_counter() - start:.0f} s. Outputs:", file=sys.stderr)
    for p in paths + [out / "lenet5-fashion-mnist.pt"]:
        print(f"  {p}", file=sys.stderr)
    return 0
