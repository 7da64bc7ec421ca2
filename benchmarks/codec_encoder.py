"""Encoder settings of the learned video codec against its default encoder, on the same frames and weights.

    python benchmarks/codec_encoder.py --clips "$DATA/video/carphone_qcif.mp4" "$DATA/video/tree.avi" \\
        --frames 96 --levels 1,3,5,7 --variant "p-2:p_level_offsets=-2" \\
        --variant "p-search:p_level_offsets=-3,-2,-1,0" --section codec-p-levels --out codec_p_levels.json

($DATA: the benchmark data folder.) Each ``--variant NAME:KEY=VALUE[;KEY=VALUE...]`` is a
:class:`bitalloc.codec.VideoCoder` with those settings (``p_level_offsets``, ``analysis_scales``, ``refine_steps``,
``adaptive_intra`` ...; values as the command line writes them), against ``VideoCoder(model)`` (the default encoder)
on every clip: the curves at ``--levels``, the BD-rate (Akima, YUV PSNR) of each variant against the default encoder
and of both against x265 medium (zerolatency, bframes 0, the same intra period; `codec_rd.py`'s anchor), every
variant's stream decoded again in a separate process with 1 thread and compared with the encoder's reconstruction,
encode seconds per frame, and the quality levels the P frames were coded at. Writes ``--out`` (in
benchmarks/results/) and the ``--section`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, command_line, finish_results, git_revision, machine, md_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT = "bitalloc"


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:KEY=VALUE;KEY=VALUE`` -> (name, VideoCoder keyword arguments); integers and floats converted, anything
    else passed as text (VideoCoder checks it)."""
    name, _, spec = text.partition(":")
    if not name or not spec:
        raise SystemExit(f"--variant {text!r}: write NAME:KEY=VALUE[;KEY=VALUE...]")
    def value(v: str) -> int | float | str:
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    return name, {key.strip(): value(v) for key, _, v in (item.partition("=") for item in spec.split(";"))}


def _levels_of(points: list[dict]) -> str:
    """The P frames' levels over a curve's points, e.g. "L1: 0 x31; L3: 1 x9, 2 x22"."""
    return "; ".join(f"L{p['level']}: " + ", ".join(f"{lv} x{n}" for lv, n in sorted(Counter(p["p_levels"]).items()))
                     for p in points if p.get("p_levels"))


def render(res: dict) -> str:
    lines = [f"Command: `{res['command']}`  ", f"Revision: {res['revision']}; machine: {res['machine']}; torch threads: "
             f"{res['threads']}. Variants: " + "; ".join(f"`{n}` = {v}" for n, v in res["variants"].items()) + ".", ""]
    rows = []
    for c in res["clips"]:
        cur = c["curves"]
        rows.append([c["clip"], c["frames"], DEFAULT, "", f"{c['bd'][DEFAULT]['x265']:+.1f}", "yes",
                     f"{c['seconds_per_frame'][DEFAULT]:.2f}", _levels_of(cur[DEFAULT])])
        for name in res["variants"]:
            b = c["bd"][name]
            rows.append([c["clip"], c["frames"], name, f"{b['default']:+.2f}", f"{b['x265']:+.1f}",
                         "yes" if c["exact"][name] else "**no**", f"{c['seconds_per_frame'][name]:.2f}",
                         _levels_of(cur[name])])
    lines.append(md_table(["clip", "frames", "encoder", "BD-rate vs default (%)", "vs x265 medium (%)",
                           "exact in another process", "encode s/frame", "P-frame levels per level"], rows))
    lines.append("")
    if len(res["clips"]) > 1:
        mean = [[name, f"{np.mean([c['bd'][name]['default'] for c in res['clips']]):+.2f}",
                 f"{np.mean([c['bd'][name]['x265'] for c in res['clips']]):+.1f}"] for name in res["variants"]]
        lines.append(md_table(["encoder", "mean BD-rate vs default (%)", "mean vs x265 medium (%)"],
                              [[DEFAULT, "", f"{np.mean([c['bd'][DEFAULT]['x265'] for c in res['clips']]):+.1f}"]]
                              + mean))
        lines.append("")
    pts = [[c["clip"], name, p["level"], f"{p['bpp']:.4f}", f"{p['psnr_yuv']:.2f}"]
           for c in res["clips"] for name in (DEFAULT, *res["variants"]) for p in c["curves"][name]]
    lines.append(md_table(["clip", "encoder", "level", "bits/pixel", "PSNR YUV"], pts))
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", nargs="+", required=True)
    ap.add_argument("--variant", action="append", required=True, metavar="NAME:KEY=VALUE[;KEY=VALUE]")
    ap.add_argument("--weights")
    ap.add_argument("--frames", type=int, default=96)
    ap.add_argument("--levels", default="1,3,5,7")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--section", required=True, help="the BENCHMARKS.md section to write")
    ap.add_argument("--out", required=True, help="results JSON, in benchmarks/results/")
    ap.add_argument("--no-md", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from bitalloc.codec.codec import VideoCoder
    from bitalloc.codec.evaluate import bd_rates, codec_point, cross_process_decode, evaluate_clip
    from bitalloc.codec.video_io import read_video
    from bitalloc.codec.weights import load_default_or

    model = load_default_or(args.weights)
    variants = dict(parse_variant(v) for v in args.variant)
    coders = {name: VideoCoder(model, **kw) for name, kw in variants.items()}
    levels = [int(v) for v in args.levels.split(",")]
    res: dict = {"command": command_line(), "revision": git_revision(), "machine": machine(), "threads": args.threads,
                 "variants": {n: " ".join(f"{k}={v}" for k, v in kw.items()) for n, kw in variants.items()},
                 "levels": levels, "clips": []}
    for clip in args.clips:
        r = evaluate_clip(clip, VideoCoder(model), frames=args.frames, levels=levels, presets=("medium",))
        src = read_video(clip, frames=args.frames)
        cur, r["exact"], r["bd"] = r["curves"], {}, {}
        for name, coder in coders.items():  # each stream also decoded in another process with 1 thread
            cur[name] = []
            for level in levels:
                point, stream, recon = codec_point(coder, src, level, r["intra_period"])
                point["exact_cross_process"] = bool(cross_process_decode(stream, args.weights, 1).equal(recon))
                cur[name].append(point)
            r["exact"][name] = all(p["exact"] and p["exact_cross_process"] for p in cur[name])
        r["seconds_per_frame"] = {n: float(np.mean([1.0 / p["encode_fps"] for p in cur[n]])) for n in (DEFAULT, *coders)}
        for name in (DEFAULT, *coders):
            r["bd"][name] = {"x265": bd_rates(cur["x265-medium"], cur[name], rate="bpp")["akima"],
                             "default": bd_rates(cur[DEFAULT], cur[name], rate="bpp")["akima"]}
        res["clips"].append(r)
        print(f"{r['clip']}: " + ", ".join(f"{n} {r['bd'][n]['default']:+.2f}% vs default (x265 medium "
                                          f"{r['bd'][n]['x265']:+.1f}%)" for n in coders), flush=True)
    out = Path(args.out)
    finish_results(out if out.is_absolute() or out.parent != Path(".") else RESULTS / out, None, res, args.section,
                   None if args.no_md else render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
