"""ROI-aware dynamic precision in the codec (issue 16, "Evaluation" and "Goals"): rate-distortion, ROI quality and
Bit-FLOPs of the dynamic codec against the FP32 codec, static widths and a fixed assignment of the same cost.

    python benchmarks/codec_dynamic.py --clips "$DATA/video/carphone_qcif.mp4" "$DATA/video/tree.avi" \\
        --dynamic-weights src/bitalloc/codec/weights/bitalloc-codec-dynamic.pt --dynamic-weights runs/codec/dyn248.pt \\
        --float-checkpoint src/bitalloc/codec/weights/bitalloc-codec.pt

($DATA: the benchmark data folder.) For each clip (first ``--frames`` frames, an I frame every ``--intra-period``)
and each quality level of ``--levels``, real streams are written (rate = stream bytes, side information included)
for these variants:

* ``dyn{C}-selector``: each dynamic codec (``--dynamic-weights``, one per candidate set C) with its selector's widths;
* ``dyn{C}-fixed-R/N``: the same codec with the widths forced to (ROI R, non-ROI N) in every frame
  (``VideoCoder.compress(widths=...)``; ROI and mask still computed and coded), for the pairs of ``--variants``
  (``diagonal``: R = N for every candidate, i.e. static 4-, 8-, 16-bit LSQ of the same weights; ``all``: every pair
  with R >= N; or a list ``16/8,8/4``), plus always the **matched pair**: the pair whose mean Bit-FLOPs per frame
  (over all frames and levels, with the selector runs' masks) is nearest to the selector's (all K^2 pairs considered);
* ``dyn{C}-search-G`` (with ``--search-gamma G[,G...]``, or ``--search-gamma C=G[,G...]`` for the candidate set C
  only, e.g. ``4-8-16=0.04``; repeatable): the same codec with the encoder's width search instead of the selector
  (``VideoCoder.compress(search_gamma=G, search_lookahead=N)``: every frame coded at every pair, the one of least
  bpp + lambda * MSE + G * relative Bit-FLOPs kept, with ``--search-lookahead N`` that of the next N frames coded at
  the same pair added to each pair's score), each with its own matched pair;
* a second codec of the same candidate set (e.g. the same weights with another selector, ``bitalloc codec
  fit-selector``; named ``dyn{C}:FILE``) runs its selector and its matched pair only (no --variants, no search);
* ``static-8``: the shipped 8-bit codec (``--static-weights``); ``fp32``: the float codec (``--float-checkpoint``, a
  training checkpoint or the float weights of codec weights, :func:`bitalloc.train.codec.load_float_start`; run with
  ``VideoCoder(exact=False)``: float networks, its streams decode in this process only).

Per point: kbps, bits per pixel, PSNR_YUV; luma PSNR inside and outside the ROI (per frame over the ROI / non-ROI
pixels, averaged over the frames that have such pixels; the mask is the one the encoder used, for static-8 and fp32
the mask of the first dynamic codec's selector run at the same level: same ROI source, same frames); the widths of
every frame; Bit-FLOPs per frame (SPEC: float MACs + BOPs / 64, and the rebuttal's A6 formula = BOPs / 16;
:func:`bitalloc.codec.cost.region_cost` per network, summed over the networks the frame type runs: all four networks
of each coder, as the training objective counts them, and the decoder's two apart) and the saving against the same
codec at 8 bits everywhere (the (8, 8) assignment, costed with the same masks); the side information's share of the
rate (two 16-bit width fields per frame + the coded mask bits); the ROI source's time per frame. Per curve: BD-rate
(Akima and PCHIP, :func:`bitalloc.codec.metrics.bd_rate`) against fp32, of the selector against the matched pair,
and ROI PSNR at equal rate against fp32 (PCHIP in log-rate: the difference at the middle of the overlapping
log-rate range, and its mean over that range). Each goal of the issue is checked and printed PASS / MISS.

Writes ``RESULTS/codec_dynamic.json``, PNGs in ``RESULTS/codec_dynamic/`` (RD curves, widths over time, one frame
with its ROI) and the "codec-dynamic" section of BENCHMARKS.md (unless ``--no-md``). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, command_line, git_revision, machine, md_table, repo_path, update_section  # noqa: E402

from bitalloc.errors import ConfigError  # noqa: E402

#: the networks each frame type runs (coders of bitalloc.codec.precision.coders)
NETWORKS = {"I": ("intra",), "P": ("motion", "residual")}
#: goals of issue 16 per candidate set: (max BD-rate % vs fp32, max Bit-FLOPs relative to static 8-bit)
GOALS = {(4, 8, 16): (3.0, 0.5), (2, 4, 8): (10.0, 0.25)}
ROI_GOAL_DB = 0.2
SCOPES = ("all", "decoder")
COST_KEYS = ("macs", "bops", "bit_flops", "bit_flops_a6")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- pure helpers ---------------------------------------------------------------------------------------------

def region_psnr(ref: np.ndarray, dec: np.ndarray, masks: np.ndarray) -> dict[str, Any]:
    """Luma PSNR inside and outside the ROI: per frame, 10 log10(255^2 / MSE) over the ROI (non-ROI) pixels, capped
    at 100 dB (:func:`bitalloc.codec.metrics.psnr_from_mse`), averaged over the frames that have ROI (non-ROI)
    pixels. ``ref``, ``dec``: uint8 [T, H, W]; ``masks``: bool [T, H, W]. None where no frame has such pixels."""
    from bitalloc.codec.metrics import psnr_from_mse

    ref, dec, masks = np.asarray(ref), np.asarray(dec), np.asarray(masks, dtype=bool)
    if not ref.shape == dec.shape == masks.shape or ref.ndim != 3:
        raise ConfigError(f"region_psnr: reference {ref.shape}, decoded {dec.shape} and masks {masks.shape} must be "
                          "the same [T, H, W]")
    err = (ref.astype(np.float64) - dec.astype(np.float64)) ** 2
    out: dict[str, Any] = {}
    for name, sel in (("roi", masks), ("non_roi", ~masks)):
        vals = [float(psnr_from_mse(err[t][sel[t]].mean())) for t in range(len(err)) if sel[t].any()]
        out[name] = float(np.mean(vals)) if vals else None
        out[f"{name}_frames"] = len(vals)
    return out


def value_at_rate(rates: Sequence[float], values: Sequence[float], rate: float) -> float:
    """The curve's value at ``rate``: PCHIP interpolation of value against ln(rate) (the BD-PSNR convention); NaN
    outside the curve's rate range."""
    from scipy.interpolate import PchipInterpolator

    x, y = np.log(np.asarray(rates, dtype=np.float64)), np.asarray(values, dtype=np.float64)
    order = np.argsort(x)
    x, y = x[order], y[order]
    lr = math.log(rate)
    if len(x) < 2 or not x[0] <= lr <= x[-1]:
        return math.nan
    return float(PchipInterpolator(x, y)(lr))


def equal_rate(anchor_rates: Sequence[float], anchor_values: Sequence[float], test_rates: Sequence[float],
               test_values: Sequence[float]) -> dict[str, float] | None:
    """Test against anchor at equal rate: ``rate`` = the geometric middle of the overlapping rate range, ``anchor``
    and ``test`` the curves' values there (:func:`value_at_rate`), ``delta`` = test - anchor, ``mean_delta`` the
    mean difference over the whole overlap (:func:`bitalloc.codec.metrics.bd_psnr`, PCHIP). None without overlap."""
    from bitalloc.codec.metrics import bd_psnr

    lo, hi = max(min(anchor_rates), min(test_rates)), min(max(anchor_rates), max(test_rates))
    if not hi > lo:
        return None
    mid = math.sqrt(lo * hi)
    a, t = value_at_rate(anchor_rates, anchor_values, mid), value_at_rate(test_rates, test_values, mid)
    return {"rate": mid, "anchor": a, "test": t, "delta": t - a,
            "mean_delta": float(bd_psnr(anchor_rates, anchor_values, test_rates, test_values, method="pchip"))}


def frame_kinds(count: int, intra_period: int) -> list[str]:
    """The frame types VideoCoder.compress uses: I at frame 0 and every ``intra_period`` frames (-1: only the first)."""
    return ["I" if i == 0 or (intra_period > 0 and i % intra_period == 0) else "P" for i in range(count)]


def matched_pair(target: float, pair_costs: dict[tuple[int, int], float]) -> tuple[int, int]:
    """The (ROI, non-ROI) pair whose mean Bit-FLOPs is nearest to ``target`` (ties: the larger ROI width)."""
    return min(pair_costs, key=lambda p: (abs(pair_costs[p] - target), -p[0], -p[1]))


def bracket_pairs(target: float, pair_costs: dict[tuple[int, int], float]) -> list[tuple[int, int]]:
    """The fixed pairs on either side of ``target`` mean Bit-FLOPs: the dearest pair not above it and the cheapest
    not below it (one pair when ``target`` is outside their range or equal to a pair's)."""
    below = [p for p in pair_costs if pair_costs[p] <= target]
    above = [p for p in pair_costs if pair_costs[p] >= target]
    out = ([max(below, key=lambda p: (pair_costs[p], p))] if below else []) + \
          ([min(above, key=lambda p: (pair_costs[p], tuple(-b for b in p)))] if above else [])
    return list(dict.fromkeys(out))


def equal_cost_bd(points: list, cost: float, fixed: dict[str, tuple[list, float]], bd: Any) -> dict[str, Any] | None:
    """BD-rate of ``points`` (mean Bit-FLOPs ``cost``) against the best time-sharing of two fixed pairs at the same
    mean Bit-FLOPs, to first order: for pairs lo, hi with c_lo <= cost <= c_hi, bd_lo + t (bd_hi - bd_lo),
    t = (cost - c_lo) / (c_hi - c_lo), bd_x = BD-rate (Akima) of ``points`` against pair x's curve; the largest
    over all such (lo, hi), i.e. the mix that does best (``fixed``: name -> (points, mean Bit-FLOPs) of the pairs
    run). Without a pair on one side, against the nearest pair. Returns {"akima", "pchip", "t", "pairs"} or None
    when a curve does not overlap."""
    rates = {k: bd(p, points) for k, (p, _) in fixed.items()}
    if not rates or any(r.get(k) is None or math.isnan(r[k]) for r in rates.values() for k in ("akima", "pchip")):
        return None
    c = {k: float(v[1]) for k, v in fixed.items()}
    lows, highs = [k for k in c if c[k] <= cost], [k for k in c if c[k] >= cost]
    if not lows or not highs:
        k = min(c, key=lambda k: abs(c[k] - cost))
        return {"akima": rates[k]["akima"], "pchip": rates[k]["pchip"], "t": 0.0, "pairs": [k]}
    best = None
    for lo in lows:
        for hi in highs:
            t = (cost - c[lo]) / (c[hi] - c[lo]) if c[hi] > c[lo] else 0.0
            v = {m: rates[lo][m] + t * (rates[hi][m] - rates[lo][m]) for m in ("akima", "pchip")}
            if best is None or v["akima"] > best["akima"]:
                best = {**v, "t": t, "pairs": [lo, hi] if lo != hi else [lo]}
    return best


def parse_variants(text: str, candidates: Sequence[int]) -> list[tuple[int, int]]:
    """``--variants`` for one candidate set: diagonal, all (R >= N), none, or pairs ``R/N,R/N`` (those that are
    not both candidates are skipped)."""
    cands = sorted(candidates)
    if text == "diagonal":
        return [(b, b) for b in cands]
    if text == "all":
        return [(r, n) for r in cands for n in cands if r >= n]
    if text == "none":
        return []
    pairs = []
    for item in text.split(","):
        try:
            r, n = (int(v) for v in item.split("/"))
        except ValueError:
            raise ConfigError(f"--variants {text!r}: give diagonal, all, none, or pairs ROI/NON_ROI like 16/8,8/8"
                              ) from None
        if r in cands and n in cands:
            pairs.append((r, n))
    return pairs


# ---- cost -------------------------------------------------------------------------------------------------------

class CostTable:
    """Per frame, the cost of its ROI and of the rest at each width, summed over the networks the frame type runs
    (:func:`bitalloc.codec.cost.region_cost`). The reference masks are the latent masks the stream carries, blown
    up to the padded luma frame: region_cost brings them to each layer's output size ("any" pooling), which gives
    the masks the codec uses at run time (:func:`bitalloc.codec.dynamic.mask_function`); padded frames must be at
    least 48 luma pixels on each side (the coarse layers of smaller frames need different factors per axis).
    ``widths`` None: a codec without region quantizers, costed at its own widths."""

    def __init__(self, model: Any, masks16: np.ndarray, kinds: Sequence[str], widths: Sequence[int] | None):
        from bitalloc.codec.cost import RegionCost, region_cost
        from bitalloc.codec.precision import ALL_PARTS, DECODER_PARTS, coders, network_input

        big = torch.from_numpy(np.kron(np.asarray(masks16, dtype=bool), np.ones((16, 16), dtype=bool)))
        hp, wp = big.shape[1:]
        if min(hp, wp) < 48:
            raise ConfigError(f"frames of {hp}x{wp} padded luma pixels are too small for the cost model's masks; "
                              "use clips of at least 48x48 pixels")
        self.fixed = widths is None
        self.parts: dict[int, tuple[list, list]] = {}
        for b in ([8] if widths is None else sorted(set(widths))):
            roi = [{s: RegionCost() for s in SCOPES} for _ in kinds]
            non = [{s: RegionCost() for s in SCOPES} for _ in kinds]
            for name, coder in coders(model).items():
                idx = [t for t, k in enumerate(kinds) if name in NETWORKS[k]]
                if not idx:
                    continue
                for part in ALL_PARTS:
                    costs = region_cost(getattr(coder, part), network_input(coder, part, hp, wp),
                                        big[idx], b, b)
                    for t, fc in zip(idx, costs):
                        for s in SCOPES if part in DECODER_PARTS else ("all",):
                            roi[t][s].add(fc.roi)
                            non[t][s].add(fc.non_roi)
            self.parts[b] = (roi, non)

    def frame(self, t: int, roi_bits: int, non_roi_bits: int) -> dict[str, dict[str, float]]:
        """Frame t's cost with the ROI at ``roi_bits`` and the rest at ``non_roi_bits``: scope -> MACs, BOPs,
        Bit-FLOPs (SPEC), Bit-FLOPs (A6)."""
        r, n = (8, 8) if self.fixed else (roi_bits, non_roi_bits)
        a, b = self.parts[r][0][t], self.parts[n][1][t]
        return {s: {k: getattr(a[s], k) + getattr(b[s], k) for k in COST_KEYS} for s in SCOPES}

    def mean(self, widths: Sequence[tuple[int, int]]) -> dict[str, dict[str, float]]:
        rows = [self.frame(t, r, n) for t, (r, n) in enumerate(widths)]
        return {s: {k: float(np.mean([row[s][k] for row in rows])) for k in COST_KEYS} for s in SCOPES}


# ---- one variant ------------------------------------------------------------------------------------------------

class Variant:
    """One curve: a coder, forced widths (or None), and where its Bit-FLOPs and ROI masks come from."""

    def __init__(self, name: str, coder: Any, widths: tuple[int, int] | None = None, group: str = "",
                 weights: str | None = None, search_gamma: float | None = None, search_lookahead: int = 0,
                 search_shortlist: int | None = None):
        self.name, self.coder, self.widths, self.group, self.weights = name, coder, widths, group, weights
        self.search_gamma, self.search_lookahead = search_gamma, search_lookahead
        self.search_shortlist = search_shortlist
        self.points: list[dict[str, Any]] = []


def measure(variant: Variant, src: Any, level: int, intra_period: int, verify: bool, ref_masks: np.ndarray | None,
            costs: Any, reference_cost: Any) -> tuple[dict[str, Any], Any]:
    """Encode (and decode when ``verify``) one point; returns (point, CompressResult)."""
    from bitalloc.codec.metrics import bits_per_pixel, kbps, psnr_yuv

    res = variant.coder.compress(src, quality=level, intra_period=intra_period, widths=variant.widths,
                                 search_gamma=variant.search_gamma, search_lookahead=variant.search_lookahead,
                                 search_shortlist=variant.search_shortlist)
    p = psnr_yuv(src, res.reconstruction)
    widths = [(f.roi_bits, f.non_roi_bits) for f in res.frames]
    masks = (np.stack([f.roi_mask for f in res.frames]) if res.frames[0].roi_mask is not None else ref_masks)
    side_bits = 32 * len(res.frames) + sum(f.mask_bits for f in res.frames)
    point: dict[str, Any] = {
        "level": level, "bytes": res.bytes, "kbps": kbps(res.bytes, len(src), src.fps),
        "bpp": bits_per_pixel(res.bytes, len(src), src.height, src.width), "psnr_yuv": p["psnr_yuv"],
        "psnr_y": p["psnr_y"], "widths": [list(w) for w in widths],
        "mean_roi_bits": float(np.mean([w[0] for w in widths])), "mean_non_roi_bits": float(np.mean([w[1] for w in widths])),
        "roi_fraction": (float(np.mean([f.roi_fraction for f in res.frames])) if res.frames[0].roi_fraction is not None
                         else None),
        "side_info_bits": side_bits, "side_info_share": side_bits / (8 * res.bytes),
        "mask_share": sum(f.mask_bits for f in res.frames) / (8 * res.bytes),
        "roi_ms_per_frame": 1000 * float(np.mean([f.roi_seconds for f in res.frames])),
        "encode_s": res.encode_seconds, "roi_mask_source": "own" if res.frames[0].roi_mask is not None else "reference"}
    if masks is not None:
        rp = region_psnr(src.y, res.reconstruction.y, masks)
        point.update(psnr_roi=rp["roi"], psnr_non_roi=rp["non_roi"], roi_frames=rp["roi_frames"])
    table = costs(res)
    per_frame = [table.frame(t, r, n) for t, (r, n) in enumerate(widths)]
    point["bit_flops_per_frame"] = [row["all"]["bit_flops"] for row in per_frame]
    for s in SCOPES:
        pre = "" if s == "all" else "decoder_"
        for k in COST_KEYS:
            point[f"{pre}{k}"] = float(np.mean([row[s][k] for row in per_frame]))
    ref = reference_cost(res)
    if ref is not None:
        point["static8_bit_flops"] = ref["all"]["bit_flops"]
        point["relative_bit_flops"] = point["bit_flops"] / ref["all"]["bit_flops"]
        point["relative_bit_flops_a6"] = point["bit_flops_a6"] / ref["all"]["bit_flops_a6"]
        point["saving"] = 1.0 - point["relative_bit_flops"]
    if verify:
        t0 = time.perf_counter()
        point["exact"] = bool(variant.coder.decompress(res.stream).equal(res.reconstruction))
        point["decode_s"] = time.perf_counter() - t0
    return point, res


# ---- the run ------------------------------------------------------------------------------------------------------

def _mask_key(masks16: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(masks16).tobytes() + str(masks16.shape).encode()).hexdigest()


def run_clip(path: str, args: argparse.Namespace, dyn: list[tuple[str, Any, str]], static: Any, fp32: Any,
             budget: dict[str, Any], folder: Path) -> dict[str, Any]:
    from bitalloc.codec.evaluate import bd_rates, cross_process_decode
    from bitalloc.codec.video_io import read_video

    src = read_video(path, frames=args.frames)
    kinds = frame_kinds(len(src), args.intra_period)
    clip: dict[str, Any] = {"clip": Path(path).name, "frames": len(src), "width": src.width, "height": src.height,
                            "fps": src.fps, "intra_period": args.intra_period, "frame_types": "".join(kinds),
                            "variants": {}, "groups": {}}
    log(f"{clip['clip']}: {src.width}x{src.height}, {len(src)} frames")
    tables: dict[tuple[str, str], CostTable] = {}
    fixed_tables: dict[int, CostTable] = {}
    ref_masks: dict[int, np.ndarray] = {}  # level -> luma masks of the first dynamic codec's selector run
    selector_runs: dict[str, dict[int, Any]] = {}

    def dyn_costs(group: str, model: Any) -> Any:
        def get(res: Any) -> CostTable:
            m16 = np.stack([f.latent_mask for f in res.frames])
            key = (group, _mask_key(m16))
            if key not in tables:
                t0 = time.perf_counter()
                tables[key] = CostTable(model, m16, kinds, model.cfg.candidates)
                log(f"  cost tables ({group}): {time.perf_counter() - t0:.1f} s")
            return tables[key]
        return get

    def fixed_costs(model: Any) -> Any:
        def get(res: Any) -> CostTable:
            if id(model) not in fixed_tables:
                hp, wp = -(-src.height // 16), -(-src.width // 16)
                fixed_tables[id(model)] = CostTable(model, np.zeros((len(kinds), hp, wp), bool), kinds, None)
            return fixed_tables[id(model)]
        return get

    def static8(costs: Any, has8: bool) -> Any:
        def get(res: Any) -> Any:
            return costs(res).mean([(8, 8)] * len(res.frames)) if has8 else None
        return get

    def run(variant: Variant, costs: Any, reference_cost: Any, verify: bool) -> list[Any]:
        results = []
        for level in args.levels:
            t0 = time.perf_counter()
            point, res = measure(variant, src, level, args.intra_period, verify, ref_masks.get(level), costs,
                                 reference_cost)
            variant.points.append(point)
            results.append(res)
            budget["done"] += 1
            budget["seconds"] += time.perf_counter() - t0
            left = budget["total"] - budget["done"]
            log(f"  {variant.name} level {level}: {point['kbps']:.1f} kbps, {point['psnr_yuv']:.2f} dB, "
                f"{time.perf_counter() - t0:.1f} s; about {left * budget['seconds'] / budget['done'] / 60:.1f} min left "
                f"({left} encodes)")
        clip["variants"][variant.name] = {"group": variant.group, "widths": variant.widths, "points": variant.points}
        return results

    verify_sel, verify_all = args.verify in ("selector", "all"), args.verify == "all"
    for gi, (group, coder, weights) in enumerate(dyn):
        model = coder.model
        cands = tuple(model.cfg.candidates)
        costs = dyn_costs(group, model)
        ref = static8(costs, 8 in cands)
        sel = Variant(f"{group}-selector", coder, None, group, weights)
        results = run(sel, costs, ref, verify_sel)
        selector_runs[group] = dict(zip(args.levels, results))
        if gi == 0:
            ref_masks.update({lv: np.stack([f.roi_mask for f in r.frames]) for lv, r in zip(args.levels, results)})
        # the fixed assignment with the selector's mean Bit-FLOPs (masks of the selector runs, all levels)
        sel_cost = float(np.mean([p["bit_flops"] for p in sel.points]))
        pair_cost = {(r, n): float(np.mean([costs(res).mean([(r, n)] * len(res.frames))["all"]["bit_flops"]
                                            for res in results])) for r in cands for n in cands}
        match = matched_pair(sel_cost, pair_cost)
        again = ":" in group  # another codec of a candidate set already run (e.g. another selector): its matched pair
        pairs = [] if again else parse_variants(args.variants, cands)
        search = {}
        for gamma in [] if again else search_gammas(args.search_gamma, cands):  # each with its own matched pair
            sv = Variant(f"{group}-search-{gamma:g}", coder, None, group, weights, search_gamma=gamma,
                         search_lookahead=args.search_lookahead, search_shortlist=args.search_shortlist)
            run(sv, costs, ref, verify_sel)
            cost = float(np.mean([p["bit_flops"] for p in sv.points]))
            search[f"{gamma:g}"] = {"gamma": gamma, "lookahead": args.search_lookahead,
                                    "shortlist": args.search_shortlist, "bit_flops": cost,
                                    "matched_pair": list(matched_pair(cost, pair_cost)),
                                    "bracket": [list(p) for p in bracket_pairs(cost, pair_cost)]}
        for m in [match, *bracket_pairs(sel_cost, pair_cost)] + [tuple(p) for v in search.values()
                                                                 for p in [v["matched_pair"], *v["bracket"]]]:
            if m not in pairs:
                pairs.append(m)
        clip["groups"][group] = {"candidates": list(cands), "weights": weights, "selector_bit_flops": sel_cost,
                                 "pair_bit_flops": {f"{r}/{n}": v for (r, n), v in pair_cost.items()},
                                 "matched_pair": list(match), "fixed_pairs": [list(p) for p in pairs],
                                 "search": search}
        budget["total"] += len(args.levels) * (len(pairs) - (0 if again else len(parse_variants(args.variants, cands))))
        for r, n in pairs:
            run(Variant(f"{group}-fixed-{r}/{n}", coder, (r, n), group, weights), costs, ref, verify_all)
        if args.cross_check:
            lv = args.levels[len(args.levels) // 2]
            res = selector_runs[group][lv]
            other = cross_process_decode(res.stream, weights, args.cross_check)
            clip["groups"][group]["cross_process"] = {"level": lv, "threads": args.cross_check,
                                                      "exact": bool(other.equal(res.reconstruction))}
            log(f"  {group}: decoded in another process with {args.cross_check} thread(s): "
                f"{'exact' if other.equal(res.reconstruction) else 'NOT exact'}")
    for name, coder in (("static-8", static), ("fp32", fp32)):
        if coder is not None:
            costs = fixed_costs(coder.model)
            run(Variant(name, coder, None, name), costs, lambda res: None, verify_sel)  # decoded: timed too
    summarize_clip(clip, bd_rates)
    mask0 = ref_masks[args.levels[len(args.levels) // 2]][0] if ref_masks else None
    clip["plots"] = plots(clip, src.y[0], mask0, folder)
    return clip


def summarize_clip(clip: dict[str, Any], bd: Any) -> None:
    """Per variant: mean Bit-FLOPs and saving, BD-rate and ROI PSNR at equal rate against fp32; per dynamic codec:
    BD-rate of the selector against its matched pair (None where the curves do not overlap)."""

    def bd_rates(anchor: Any, test: Any) -> dict[str, float | None]:
        return {k: None if v is None or math.isnan(v) else v for k, v in bd(anchor, test).items()}

    variants = clip["variants"]
    anchor = variants.get("fp32", {}).get("points")
    for name, v in variants.items():
        pts = v["points"]
        s: dict[str, Any] = {k: float(np.mean([p[k] for p in pts])) for k in ("bit_flops", "bit_flops_a6",
                                                                             "decoder_bit_flops", "kbps", "psnr_yuv")}
        if all("static8_bit_flops" in p for p in pts):
            s["relative_bit_flops"] = s["bit_flops"] / float(np.mean([p["static8_bit_flops"] for p in pts]))
            s["saving"] = 1.0 - s["relative_bit_flops"]
        if "static-8" in variants:  # the static 8-bit codec, costed with the same masks
            s["relative_to_static_codec"] = s["bit_flops"] / float(np.mean([p["bit_flops"] for p in
                                                                             variants["static-8"]["points"]]))
        if anchor and name != "fp32":
            s["bd_rate_vs_fp32"] = bd_rates(anchor, pts)
            if all(p.get("psnr_roi") is not None for p in pts + anchor):
                s["roi_equal_rate_vs_fp32"] = equal_rate([p["bytes"] for p in anchor], [p["psnr_roi"] for p in anchor],
                                                         [p["bytes"] for p in pts], [p["psnr_roi"] for p in pts])
        v["summary"] = s
    for group, g in clip["groups"].items():
        r, n = g["matched_pair"]
        matched = variants[f"{group}-fixed-{r}/{n}"]
        g["matched_pair_measured_bit_flops"] = matched["summary"]["bit_flops"]
        g["selector_vs_matched_bd_rate"] = bd_rates(matched["points"], variants[f"{group}-selector"]["points"])
        fixed = {k.rsplit("-fixed-", 1)[1]: (v["points"], v["summary"]["bit_flops"]) for k, v in variants.items()
                 if k.startswith(f"{group}-fixed-")}
        sel = variants[f"{group}-selector"]
        g["selector_equal_bit_flops_bd_rate"] = equal_cost_bd(sel["points"], sel["summary"]["bit_flops"], fixed,
                                                              bd_rates)
        for key, sg in g.get("search", {}).items():
            r, n = sg["matched_pair"]
            sg["vs_matched_bd_rate"] = bd_rates(variants[f"{group}-fixed-{r}/{n}"]["points"],
                                                variants[f"{group}-search-{key}"]["points"])
            sg["vs_selector_bd_rate"] = bd_rates(variants[f"{group}-selector"]["points"],
                                                 variants[f"{group}-search-{key}"]["points"])
            mine = variants[f"{group}-search-{key}"]
            sg["equal_bit_flops_bd_rate"] = equal_cost_bd(mine["points"], mine["summary"]["bit_flops"], fixed, bd_rates)


def _equal_cost_note(entry: dict[str, Any], key: str = "equal_bit_flops_bd_rate", sep: str = "; ") -> str:
    """``sep`` + "x% against the best time-sharing of fixed pairs (R/N and R/N) at equal Bit-FLOPs" for an entry (a
    search's, or a group's with ``key`` selector_equal_bit_flops_bd_rate) that has it; "" for results of earlier
    revisions, which do not."""
    if key not in entry:
        return ""
    eq = entry[key]
    if eq is None:
        return f"{sep}n/a against time-sharing of the fixed pairs (no overlap)"
    pairs = " and ".join(eq["pairs"])
    return f"{sep}{eq['akima']:+.2f}% against the best time-sharing of fixed pairs ({pairs}) at equal Bit-FLOPs"


def check_goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of issue 16: PASS / MISS (n/a where a variant it needs was not run) with the numbers."""
    goals = []
    clips = res["clips"]

    def row(goal: str, ok: bool | None, detail: str) -> None:
        goals.append({"goal": goal, "status": "n/a" if ok is None else ("PASS" if ok else "MISS"), "detail": detail})

    for group, cands in res["groups"].items():
        sel = f"{group}-selector"
        limits = GOALS.get(tuple(cands))
        bd = [c["variants"][sel]["summary"].get("bd_rate_vs_fp32", {}).get("akima") for c in clips]
        rel = [c["variants"][sel]["summary"].get("relative_to_static_codec") for c in clips]
        own = [c["variants"][sel]["summary"].get("relative_bit_flops") for c in clips]
        if limits:
            max_bd, max_rel = limits
            have = all(v is not None for v in bd + rel)
            mean_bd = float(np.mean(bd)) if have else None
            mean_rel = float(np.mean(rel)) if have else None
            row(f"{group} ({{{','.join(map(str, cands))}}}): BD-rate <= +{max_bd:g}% vs FP32 with Bit-FLOPs <= "
                f"{max_rel:g} x static 8-bit", None if not have else (mean_bd <= max_bd and mean_rel <= max_rel),
                "n/a (no fp32 or no 8-bit reference)" if not have else
                f"BD-rate (Akima, mean over clips) {mean_bd:+.2f}% [{', '.join(f'{v:+.2f}' for v in bd)}]; "
                f"Bit-FLOPs {mean_rel:.3f} x the static 8-bit codec [{', '.join(f'{v:.3f}' for v in rel)}]"
                + ("" if any(v is None for v in own) else
                   f" ({float(np.mean(own)):.3f} x the same codec at 8/8 [{', '.join(f'{v:.3f}' for v in own)}])"))
        eq = [c["variants"][sel]["summary"].get("roi_equal_rate_vs_fp32") for c in clips]
        have = all(e is not None for e in eq)
        row(f"{group}: ROI PSNR at equal rate within {ROI_GOAL_DB} dB of FP32",
            None if not have else all(e["mean_delta"] >= -ROI_GOAL_DB and e["delta"] >= -ROI_GOAL_DB for e in eq),
            "n/a (no fp32, no ROI, or no rate overlap)" if not have else
            "; ".join(f"{c['clip']}: {e['delta']:+.2f} dB at {e['rate'] * 8 / 1000 * c['fps'] / c['frames']:.1f} kbps, "
                      f"mean {e['mean_delta']:+.2f} dB" for c, e in zip(clips, eq)))
        sm = [c["groups"][group]["selector_vs_matched_bd_rate"]["akima"] for c in clips]
        pairs = [c["groups"][group]["matched_pair"] for c in clips]
        row(f"{group}: the selector beats the fixed assignment of the same mean Bit-FLOPs on every clip",
            None if any(v is None for v in sm) else all(v < 0 for v in sm),
            "; ".join(f"{c['clip']}: {'n/a' if v is None else f'{v:+.2f}%'} vs {p[0]}/{p[1]}"
                      + _equal_cost_note(c["groups"][group], "selector_equal_bit_flops_bd_rate", ", ")
                      for c, v, p in zip(clips, sm, pairs)))
        for key in clips[0]["groups"][group].get("search", {}):  # not a goal: what search at the encoder gives
            sv = [c["groups"][group]["search"][key] for c in clips]
            sm = [v["vs_matched_bd_rate"]["akima"] for v in sv]
            row(f"{group} (not the selector: the encoder's {search_name(sv[0])}, gamma {key}): beats the fixed "
                "assignment of the same mean Bit-FLOPs on every clip", None if any(v is None for v in sm) else all(v < 0 for v in sm),
                "; ".join(f"{c['clip']}: {'n/a' if v is None else f'{v:+.2f}%'} vs {s['matched_pair'][0]}/"
                          f"{s['matched_pair'][1]} ({s['bit_flops'] / 1e9:.3f} GBit-FLOPs/frame"
                          + _equal_cost_note(s) + ")" for c, v, s in zip(clips, sm, sv)))
        ex = [c["groups"][group].get("cross_process") for c in clips]
        inproc = [p.get("exact") for c in clips for p in c["variants"][sel]["points"] if "exact" in p]
        row(f"{group}: decoding is exact across processes and thread counts",
            None if not any(ex) else all(inproc) and all(e["exact"] for e in ex if e),
            f"in-process decodes exact: {sum(inproc)}/{len(inproc)}; other process ("
            + ", ".join(f"{c['clip']}: {'n/a' if e is None else ('exact' if e['exact'] else 'NOT exact')}"
                        for c, e in zip(clips, ex)) + ")")
    return goals


# ---- plots and report ---------------------------------------------------------------------------------------------

def plots(clip: dict[str, Any], src_y0: np.ndarray, mask0: np.ndarray | None, folder: Path) -> dict[str, str]:
    from bitalloc.report.plots import _pyplot, _save, line_plot, rd_plot

    stem = Path(clip["clip"]).stem
    out = {}
    rd = rd_plot({n: [(p["kbps"], p["psnr_yuv"]) for p in v["points"]] for n, v in clip["variants"].items()},
                 folder / f"rd_{stem}.png", title=f"{clip['clip']}: {clip['frames']} frames", ylabel="PSNR YUV (dB)")
    out["rd"] = rd
    series = {}
    for name, v in clip["variants"].items():
        if name.endswith("-selector") or "-search-" in name:
            mid = v["points"][len(v["points"]) // 2]
            series[f"{name} ROI (level {mid['level']})"] = [(t, w[0]) for t, w in enumerate(mid["widths"])]
            series[f"{name} non-ROI"] = [(t, w[1]) for t, w in enumerate(mid["widths"])]
    if series:
        out["widths"] = line_plot(series, folder / f"widths_{stem}.png", xlabel="frame", ylabel="bits",
                                  title=f"{clip['clip']}: widths chosen per frame")
    if mask0 is not None:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6, 6 * src_y0.shape[0] / src_y0.shape[1] + 0.5))
        ax.imshow(src_y0, cmap="gray", vmin=0, vmax=255)
        overlay = np.zeros(src_y0.shape + (4,))
        overlay[mask0] = (1.0, 0.2, 0.2, 0.45)
        ax.imshow(overlay)
        ax.set_title(f"{clip['clip']}, frame 0: ROI ({100 * mask0.mean():.0f}% of the pixels, red)")
        ax.axis("off")
        out["roi"] = _save(fig, folder / f"roi_{stem}.png")
    return {k: repo_path(p) for k, p in out.items()}


def _f(v: Any, fmt: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def point_rows(clip: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, v in clip["variants"].items():
        for p in v["points"]:
            rows.append([name, p["level"], _f(p["kbps"], ".1f"), _f(p["bpp"], ".4f"), _f(p["psnr_yuv"], ".2f"),
                         _f(p.get("psnr_roi"), ".2f"), _f(p.get("psnr_non_roi"), ".2f"),
                         f"{p['mean_roi_bits']:.1f}/{p['mean_non_roi_bits']:.1f}", _f(p["bit_flops"] / 1e9, ".3f"),
                         _f(p["bit_flops_a6"] / 1e9, ".3f"), _f(p.get("saving", None) and 100 * p["saving"], ".1f"),
                         _f(100 * p["side_info_share"], ".2f"), _f(p["roi_ms_per_frame"], ".1f"),
                         _f(1000 * p["encode_s"] / clip["frames"], ".1f"),
                         _f(p.get("decode_s") and 1000 * p["decode_s"] / clip["frames"], ".1f"),
                         {True: "yes", False: "NO"}.get(p.get("exact"), "")])
    return rows


POINT_COLUMNS = ["variant", "level", "kbps", "bits/pixel", "PSNR YUV", "PSNR ROI (Y)", "PSNR non-ROI (Y)",
                 "mean widths ROI/non", "GBit-FLOPs/frame (SPEC)", "GBit-FLOPs/frame (A6)", "saving vs 8-bit %",
                 "side info % of rate", "ROI ms/frame", "encode ms/frame", "decode ms/frame", "exact"]


def summary_rows(clip: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, v in clip["variants"].items():
        s = v["summary"]
        bd, eq = s.get("bd_rate_vs_fp32") or {}, s.get("roi_equal_rate_vs_fp32") or {}
        rows.append([name, _f(bd.get("akima"), "+.2f"), _f(bd.get("pchip"), "+.2f"), _f(eq.get("delta"), "+.2f"),
                     _f(eq.get("mean_delta"), "+.2f"), _f(s["bit_flops"] / 1e9, ".3f"),
                     _f(s.get("relative_to_static_codec"), ".3f"), _f(s.get("relative_bit_flops"), ".3f")])
    return rows


SUMMARY_COLUMNS = ["variant", "BD-rate vs FP32 % (Akima)", "(PCHIP)", "ROI PSNR vs FP32 at equal rate (dB)",
                   "mean over the overlap (dB)", "mean GBit-FLOPs/frame", "x static 8-bit codec", "x own 8/8"]


def render(res: dict[str, Any]) -> str:
    lines = ["### ROI-aware dynamic precision", "", f"Command: `{res['command']}`  ",
             f"Revision: {res['revision']}; machine: {res['machine']}; torch threads: {res['threads']}. "
             f"Dynamic codecs: {', '.join(f'`{w}` ({g})' for g, w in res['weights'].items())}; static: "
             f"`{res['static_weights']}`; FP32: `{res['float_checkpoint']}`. Levels {res['levels']}, "
             f"{res['frames']} frames, intra period {res['intra_period']}, ROI masks: {res['roi_sources']}."
             + (f" Summarized again at revision {res['summarized']['revision']} by `{res['summarized']['command']}`."
                if res.get("summarized") else ""), "",
             "Bit-FLOPs per frame: every network the frame type runs (encoder and decoder, as the training objective "
             "counts them), SPEC = float MACs + BOPs / 64, A6 = the rebuttal's formula (BOPs / 16); relative to the static "
             "8-bit codec (the goals' reference) and to the same codec at 8/8 (its fixed layers at their own widths), "
             "with the same masks. Side information: two 16-bit widths per frame plus the coded ROI mask in frames "
             "whose two widths differ (stream version 4). ROI PSNR of static-8 and fp32 uses the first dynamic "
             "codec's ROI masks.", "",
             "Goals (issue 16):", "", md_table(["goal", "status", "numbers"],
                                                 [[g["goal"], g["status"], g["detail"]] for g in res["goals"]]), ""]
    for c in res["clips"]:
        lines += [f"#### {c['clip']} ({c['width']}x{c['height']}, {c['frames']} frames, types {c['frame_types']})", ""]
        lines += [" ".join(f"![{k}]({p})" for k, p in c["plots"].items()), ""]
        lines += [md_table(SUMMARY_COLUMNS, summary_rows(c)), ""]
        for group, g in c["groups"].items():
            sm = g["selector_vs_matched_bd_rate"]
            lines.append(f"{group}: selector {g['selector_bit_flops'] / 1e9:.3f} GBit-FLOPs/frame; matched fixed pair "
                         f"{g['matched_pair'][0]}/{g['matched_pair'][1]} ({g['matched_pair_measured_bit_flops'] / 1e9:.3f}); "
                         f"BD-rate of the selector against it {_f(sm['akima'], '+.2f')}% (Akima), "
                         f"{_f(sm['pchip'], '+.2f')}% (PCHIP)"
                         f"{_equal_cost_note(g, 'selector_equal_bit_flops_bd_rate')}.  ")
            for key, sg in g.get("search", {}).items():
                vm, vs = sg["vs_matched_bd_rate"], sg["vs_selector_bd_rate"]
                lines.append(f"{group}, the encoder's {search_name(sg)} at gamma {key}: {sg['bit_flops'] / 1e9:.3f} "
                             f"GBit-FLOPs/frame; BD-rate against its matched pair {sg['matched_pair'][0]}/"
                             f"{sg['matched_pair'][1]} {_f(vm['akima'], '+.2f')}% (Akima), {_f(vm['pchip'], '+.2f')}% "
                             f"(PCHIP); against the selector {_f(vs['akima'], '+.2f')}% (Akima)"
                             f"{_equal_cost_note(sg)}.  ")
        lines += ["", md_table(POINT_COLUMNS, point_rows(c)), ""]
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", nargs="+", help="held-out clips (any FFmpeg input); required unless --from-json")
    ap.add_argument("--frames", type=int, default=32, help="first N frames of each clip (32)")
    ap.add_argument("--levels", default="0,2,4,6", help="quality levels, comma-separated (0,2,4,6)")
    ap.add_argument("--intra-period", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    ap.add_argument("--dynamic-weights", action="append",
                    help="a dynamic-precision codec (repeatable, one per candidate set; default: the shipped one)")
    ap.add_argument("--static-weights", help="the static 8-bit codec (default: the shipped weights)")
    ap.add_argument("--float-checkpoint", help="the FP32 codec: a training checkpoint (e.g. the joint stage's) or "
                    "codec weights, whose float weights it takes (e.g. the shipped 8-bit codec's)")
    ap.add_argument("--variants", default="diagonal",
                    help="fixed (ROI/non-ROI) pairs per dynamic codec: diagonal (R = N, default), all (R >= N), none, "
                         "or a list like 16/8,8/8; the pair matching the selector's Bit-FLOPs is always added")
    ap.add_argument("--search-gamma", action="append", default=[], metavar="[C=]G[,G...]",
                    help="also run each dynamic codec (with C, e.g. 4-8-16=: those of candidate set C only) with the "
                         "encoder's width search at these gammas (every frame coded at every pair: K^2 times the "
                         "encoding work), each against its matched fixed pair; repeatable")
    ap.add_argument("--search-lookahead", type=int, default=0, metavar="N",
                    help="the width search scores each pair with the next N frames coded at it too ((1 + N) times "
                         "its work; default 0)")
    ap.add_argument("--search-shortlist", type=int, metavar="M",
                    help="the lookahead scores only the M pairs that code each frame itself best (default: all)")
    ap.add_argument("--verify", choices=("none", "selector", "all"), default="selector",
                    help="decode the streams of these variants again and compare (default: the selector's, and "
                         "the static-8 and fp32 references; decoding is timed: the decode ms/frame column)")
    ap.add_argument("--cross-check", type=int, default=1, metavar="THREADS",
                    help="decode one selector stream per dynamic codec and clip in another process with THREADS "
                         "threads (default 1; 0: skip)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"),
                    help="folder for codec_dynamic.json and the codec_dynamic/ plots (default benchmarks/results)")
    ap.add_argument("--no-md", action="store_true", help="do not write BENCHMARKS.md")
    ap.add_argument("--from-json", metavar="FILE", help="encode nothing: summarize the results FILE of an earlier run "
                    "again (summaries, goals, tables, BENCHMARKS.md) with this revision's code; --clips is ignored")
    args = ap.parse_args(argv)
    try:
        args.levels = [int(v) for v in args.levels.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--levels {args.levels!r}: give comma-separated integers") from None
    if args.frames < 1 or args.threads < 1 or not args.levels:
        raise ConfigError("--frames, --threads and --levels need positive values")
    parse_variants(args.variants, [2, 4, 8, 16])  # checks the syntax
    args.search_gamma = parse_search_gamma(args.search_gamma)
    if args.search_lookahead < 0:
        raise ConfigError(f"--search-lookahead {args.search_lookahead}: give a number of frames >= 0")
    if args.search_shortlist is not None and (args.search_shortlist < 1 or not args.search_lookahead):
        raise ConfigError(f"--search-shortlist {args.search_shortlist}: give a number of pairs >= 1, with "
                          "--search-lookahead N")
    return args


def parse_search_gamma(values: Sequence[str]) -> dict[str, list[float]]:
    """``--search-gamma`` values ("G,G" for every candidate set, "4-8-16=G,G" for one) -> {"all" or "4-8-16": [G]}."""
    out: dict[str, list[float]] = {}
    for text in values:
        key, _, gammas = text.rpartition("=")
        try:
            if key:
                key = "-".join(str(int(b)) for b in key.split("-"))
            vals = [float(v) for v in gammas.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--search-gamma {text!r}: give comma-separated weights >= 0, optionally after a "
                              "candidate set like 4-8-16=") from None
        if not vals or any(not g >= 0 for g in vals):
            raise ConfigError(f"--search-gamma {text!r}: give comma-separated weights >= 0")
        out.setdefault(key or "all", []).extend(g for g in vals if g not in out.get(key or "all", []))
    return out


def search_gammas(spec: dict[str, list[float]] | list[float], candidates: Sequence[int]) -> list[float]:
    """The gammas of the width search for a candidate set: those for every set, then the set's own."""
    if isinstance(spec, list):  # results of an earlier revision
        return list(spec)
    own = spec.get("-".join(map(str, candidates)), [])
    return spec.get("all", []) + [g for g in own if g not in spec.get("all", [])]


def search_name(search: dict[str, Any]) -> str:
    """How a width search entry of the results is named: with its lookahead when it had one."""
    n, m = int(search.get("lookahead", 0)), search.get("shortlist")
    name = f"width search with {n} frame{'s' if n > 1 else ''} of lookahead" if n else "width search"
    return f"{name} from a shortlist of {m} pairs" if n and m else name


def resummarize(args: argparse.Namespace) -> int:
    """``--from-json``: the summaries, goals, tables and BENCHMARKS.md section of an earlier run's results, again."""
    import json

    from bitalloc.codec.evaluate import bd_rates
    from bitalloc.report.tables import print_table

    path = Path(args.from_json)
    try:
        res = json.loads(path.read_text())
        clips = res["clips"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--from-json {path}: not the results of benchmarks/codec_dynamic.py ({exc}); run the "
                          "benchmark first") from None
    for clip in clips:
        summarize_clip(clip, bd_rates)
        print_table(f"{clip['clip']}: per variant", SUMMARY_COLUMNS, summary_rows(clip))
    res["summarized"] = {"revision": git_revision(), "command": command_line()}
    finish(res, path, args)
    return 0


def finish(res: dict[str, Any], path: Path, args: argparse.Namespace) -> None:
    """Check the goals, print them, write the results JSON and (unless --no-md) the BENCHMARKS.md section."""
    from bitalloc.io import write_json
    from bitalloc.report.tables import print_table

    res["goals"] = check_goals(res)
    print_table("goals of issue 16", ["goal", "status", "numbers"],
                [[g["goal"], g["status"], g["detail"]] for g in res["goals"]])
    write_json(path, res)
    if not args.no_md:
        update_section("codec-dynamic", render(res))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return resummarize(args)
    if not args.clips:
        raise ConfigError("give --clips (held-out clips), or --from-json FILE to summarize an earlier run again")
    torch.set_num_threads(args.threads)
    from bitalloc.codec.codec import VideoCoder
    from bitalloc.codec.weights import default_weights_path, load_default_or
    from bitalloc.report.tables import print_table
    from bitalloc.train.codec import load_float_start

    dyn_paths = args.dynamic_weights or [str(default_weights_path(dynamic=True))]
    dyn = []
    for path in dyn_paths:
        model = load_default_or(path)
        if not model.cfg.candidates:
            raise ConfigError(f"--dynamic-weights {path} has one fixed precision; give weights written by `bitalloc "
                              "codec train --stage dynamic`")
        group = "dyn" + "-".join(map(str, model.cfg.candidates))
        if any(g.split(":")[0] == group for g, _, _ in dyn):  # a sweep (e.g. over gamma): name by file
            group += ":" + Path(path).stem
        dyn.append((group, VideoCoder(model), path))
    static = VideoCoder(load_default_or(args.static_weights))
    fp32 = VideoCoder(load_float_start(args.float_checkpoint), exact=False) if args.float_checkpoint else None
    if fp32 is None:
        log("no --float-checkpoint: the FP32 curve and the goals against it are skipped")
    for name, coder in [(g, c) for g, c, _ in dyn] + [("static", static)] + ([("fp32", fp32)] if fp32 else []):
        bad = [lv for lv in args.levels if not 0 <= lv < coder.model.cfg.levels]
        if bad:
            raise ConfigError(f"--levels {bad}: the {name} codec has levels 0..{coder.model.cfg.levels - 1}")
    per_clip = len(args.levels) * (sum(1 if ":" in g else
                                       1 + len(search_gammas(args.search_gamma, c.model.cfg.candidates))
                                       + len(parse_variants(args.variants, c.model.cfg.candidates))
                                       for g, c, _ in dyn)
                                   + 1 + (fp32 is not None))
    budget = {"total": per_clip * len(args.clips), "done": 0, "seconds": 0.0}
    log(f"{budget['total']} encodes of {args.frames} frames (+ the matched pairs where not among --variants); the "
        "time left is estimated after each")
    results = Path(args.results)
    folder = results / "codec_dynamic"
    folder.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"command": command_line(), "revision": git_revision(), "machine": machine(),
                           "threads": args.threads, "frames": args.frames, "levels": args.levels,
                           "intra_period": args.intra_period, "variants_option": args.variants,
                           "search_gamma": args.search_gamma, "search_lookahead": args.search_lookahead,
                           "search_shortlist": args.search_shortlist,
                           "weights": {g: Path(p).name for g, _, p in dyn},
                           "groups": {g: list(c.model.cfg.candidates) for g, c, _ in dyn},
                           "roi_sources": ", ".join(f"{g}: {c.roi.spec()}" for g, c, _ in dyn),
                           "static_weights": Path(args.static_weights or default_weights_path()).name,
                           "float_checkpoint": Path(args.float_checkpoint).name if args.float_checkpoint else None,
                           "clips": []}
    t_all = time.perf_counter()
    for path in args.clips:
        clip = run_clip(path, args, dyn, static, fp32, budget, folder)
        res["clips"].append(clip)
        print_table(f"{clip['clip']}: per variant", SUMMARY_COLUMNS, summary_rows(clip))
    res["seconds"] = time.perf_counter() - t_all
    finish(res, results / "codec_dynamic.json", args)
    log(f"wrote {results / 'codec_dynamic.json'} and the plots in {folder} ({res['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
