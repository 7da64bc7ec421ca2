"""``bitalloc freeze``: turn a quantization-aware checkpoint (``bitalloc train --method lsq|pact|bb``) into a
fixed quantized model file that ``bitalloc cost / export onnx / pack --quantized`` read.

Example::

    bitalloc train --method bb --model lenet5 --dataset mnist --out runs/bb.pt   # also writes runs/bb-frozen.pt
    bitalloc freeze --checkpoint runs/bb.pt --out runs/bb-frozen.pt
    bitalloc cost --quantized runs/bb-frozen.pt
    bitalloc export onnx --quantized runs/bb-frozen.pt --out runs/bb.onnx

Freezing (:func:`bitalloc.model.freeze.freeze`) replaces every trained quantizer by its test-time grid: Bayesian
Bits gates thresholded into one bit width per tensor and a mask of kept output channels (their weights and
bias zeroed), LSQ steps and PACT clip levels as fixed grids; BatchNorms left unfolded in training
(``--no-fold-bn``) are folded exactly on the learned grid. The file is written with
:func:`bitalloc.model.serialize.save_quantized`. Prints each layer's bit widths and kept channels and the
model's relative BOPs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bitalloc.errors import ConfigError


def frozen_path(checkpoint: str | Path) -> Path:
    """The default frozen-model path next to a checkpoint: ``run.pt`` -> ``run-frozen.pt``."""
    p = Path(checkpoint)
    stem = p.name[:-3] if p.name.endswith(".pt") else p.name
    return p.with_name(f"{stem}-frozen.pt")


def register(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("freeze", help="freeze a quantization-aware checkpoint into a quantized model file",
                       description=(__doc__ or "").split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by `bitalloc train --method lsq|pact|bb`")
    p.add_argument("--out", default=None, help="the frozen model file (default: <checkpoint>-frozen.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--json", default=None, help="also write the per-layer summary and cost as JSON here")
    p.set_defaults(func=run)
    return p


def freeze_checkpoint(checkpoint: str | Path, out: str | Path | None = None, *,
                      overwrite: bool = False) -> tuple[Any, Path, dict[str, Any]]:
    """Load a quantization-aware checkpoint, freeze it and write the frozen model.

    Returns ``(frozen model, path written, checkpoint metadata)``."""
    from bitalloc.model.freeze import save_frozen
    from bitalloc.train.checkpoint import checkpoint_summary, load_checkpoint, load_model_checkpoint

    state = load_checkpoint(checkpoint)
    method = state.get("method") or "fp32"
    if method == "fp32":
        raise ConfigError(f"checkpoint {checkpoint} is an FP32 checkpoint: there are no trained quantizers to freeze; "
                          f"quantize it with `bitalloc ptq --checkpoint {checkpoint} --save-model`")
    model = load_model_checkpoint(checkpoint)
    meta = checkpoint_summary(state)
    opts = state.get("method_options") or {}
    shape = opts.get("input_shape") or getattr(model, "bitalloc_example_shape", None)
    spec = state.get("model") or {}
    out = Path(out) if out is not None else frozen_path(checkpoint)
    extra = {"source_checkpoint": str(checkpoint), "method": method, "method_options": opts,
             "dataset": state.get("dataset"), "model_factory": spec.get("factory"),
             "model_kwargs": spec.get("kwargs") or {}, "epoch": state.get("epoch"), "step": state.get("step")}
    frozen, path = save_frozen(model, out, model_name=spec.get("name"), example_shape=shape, overwrite=overwrite,
                               extra=extra)
    return frozen, path, meta


def frozen_summary(frozen: Any, shape: Any) -> dict[str, Any]:
    """Per-layer bit widths, kept channels and the cost of a frozen model (JSON-like)."""
    import torch

    from bitalloc.cost import cost_report

    with torch.no_grad():
        rep = cost_report(frozen, torch.zeros(1, *shape))
    return {"relative_bops": rep.relative_bops, "bops": rep.bops, "macs": rep.macs, "memory_bits": rep.memory_bits,
            "layers": [{"name": l.name, "w_bits": l.w_bits, "a_bits": l.a_bits, "kept_fraction": l.kept_fraction,
                        "macs": l.macs, "bops": l.bops} for l in rep.layers]}


def run(args: argparse.Namespace) -> int:
    from bitalloc.io import write_json
    from bitalloc.model.layers import quant_layers
    from bitalloc.report.tables import print_table

    frozen, path, meta = freeze_checkpoint(args.checkpoint, args.out, overwrite=bool(args.overwrite))
    summary = frozen_summary(frozen, frozen.bitalloc_example_shape)
    rows = []
    for name, layer in quant_layers(frozen):
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        kept = wq.kept_mask() if wq is not None else None
        rows.append([name, "-" if wq is None else f"{wq.qparams().mean_bits():g}",
                     "-" if aq is None else f"{aq.qparams().mean_bits():g}",
                     "-" if kept is None else f"{int(kept.sum())}/{kept.numel()}"])
    print_table(f"{args.checkpoint} ({meta.get('method')}, epoch {meta.get('epoch')}): frozen",
                ["layer", "w bits", "a bits", "kept channels"], rows)
    print(f"relative BOPs: {100 * summary['relative_bops']:.4f}%")
    print(f"frozen model: {path}  (read it with --quantized: bitalloc cost / export onnx / pack)", file=sys.stderr)
    if args.json:
        write_json(args.json, {"checkpoint": str(args.checkpoint), "frozen": str(path), "method": meta.get("method"),
                               **summary})
    return 0


__all__ = ["register", "run", "freeze_checkpoint", "frozen_path", "frozen_summary"]
