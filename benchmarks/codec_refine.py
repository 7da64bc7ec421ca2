"""The encoder's latent refinement (bitalloc.codec.refine): what it saves against the same encoder without it, and
where that leaves the codec against x265 medium and JPEG.

    python benchmarks/codec_refine.py --clips "$DATA/video/carphone_qcif.mp4" "$DATA/video/tree.avi" \\
        --images "$DATA/imagenet-sample.zip" --image-limit 24 --frames 96 --levels 1,3,5,7 --refine-steps 100

($DATA: the benchmark data folder.) The shipped codec with the default encoder (analysis scales searched per frame)
and the same encoder with ``refine_steps`` iterations of latent refinement on every frame's best trial, on the same
frames: per clip the curves, the BD-rate (Akima, YUV PSNR) of the refined encoder against the unrefined one and of
both against x265 medium (zerolatency, bframes 0, the same intra period; `codec_rd.py`'s anchor), every refined
stream decoded again in a separate process with 1 thread and compared with the encoder's reconstruction; for the
held-out images (256x256 centre crops, I frames) the same against JPEG. Encode time per frame of both encoders.
Writes benchmarks/results/codec_refine.json and the "codec-refine" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, command_line, finish_results, git_revision, machine, md_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
REFINED = "bitalloc-refined"


def _timed(coder):
    """Wrap ``coder.compress`` to add up its encode seconds and frames."""
    totals = {"seconds": 0.0, "frames": 0}
    compress = coder.compress

    def timed(frames, **kw):
        t0 = time.perf_counter()
        res = compress(frames, **kw)
        totals["seconds"] += time.perf_counter() - t0
        totals["frames"] += len(frames)
        return res

    coder.compress = timed
    return totals


def render(res: dict) -> str:
    lines = [f"Command: `{res['command']}`  ", f"Revision: {res['revision']}; machine: {res['machine']}; torch threads: "
             f"{res['threads']}. Refinement: {res['refine_steps']} Adam steps at {res['refine_lr']} (cosine), from the "
             "best analysis scale of each frame; the cheaper payload is kept.", ""]
    rows = []
    for c in res["clips"]:
        ref_bd = c["bd_refined_vs_plain"]
        rows.append([c["clip"], c["frames"], f"{ref_bd:+.2f}" if ref_bd is not None else "n/a",
                     f"{c['bd_plain_vs_x265']:+.1f}", f"{c['bd_refined_vs_x265']:+.1f}",
                     f"{c['refined_share']:.0%}", f"{c['exact']}", f"{c['seconds_per_frame_plain']:.2f}",
                     f"{c['seconds_per_frame_refined']:.2f}"])
    if res.get("images"):
        i = res["images"]
        rows.append([f"{i['images']} held-out images (I frames)", i["images"], f"{i['bd_refined_vs_plain']:+.2f}",
                     f"{i['bd_plain_vs_jpeg']:+.1f} (JPEG)", f"{i['bd_refined_vs_jpeg']:+.1f} (JPEG)", "", "",
                     f"{i['seconds_per_frame_plain']:.2f}", f"{i['seconds_per_frame_refined']:.2f}"])
    lines.append(md_table(["clip", "frames", "BD-rate refined vs unrefined (%)", "unrefined vs anchor (%)",
                           "refined vs anchor (%)", "frames refined", "exact in another process",
                           "encode s/frame, unrefined", "encode s/frame, refined"], rows))
    lines.append("")
    pts = []
    for c in res["clips"]:
        for name in ("bitalloc", REFINED):
            for p in c["curves"][name]:
                pts.append([c["clip"], name, p["level"], f"{p['bpp']:.4f}", f"{p['psnr_yuv']:.2f}"])
    lines.append(md_table(["clip", "encoder", "level", "bits/pixel", "PSNR YUV"], pts))
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", nargs="*", default=[])
    ap.add_argument("--images")
    ap.add_argument("--image-limit", type=int, default=24)
    ap.add_argument("--weights")
    ap.add_argument("--frames", type=int, default=96)
    ap.add_argument("--levels", default="1,3,5,7")
    ap.add_argument("--refine-steps", type=int, default=100)
    ap.add_argument("--refine-lr", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-md", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from bitalloc.codec.codec import VideoCoder
    from bitalloc.codec.evaluate import bd_rates, codec_point, cross_process_decode, evaluate_clip, evaluate_images
    from bitalloc.codec.refine import DEFAULT_LR
    from bitalloc.codec.video_io import read_video
    from bitalloc.codec.weights import load_default_or

    model = load_default_or(args.weights)
    lr = DEFAULT_LR if args.refine_lr is None else args.refine_lr
    plain, refined = VideoCoder(model), VideoCoder(model, refine_steps=args.refine_steps, refine_lr=lr)
    levels = [int(v) for v in args.levels.split(",")]
    res: dict = {"command": command_line(), "revision": git_revision(), "machine": machine(), "threads": args.threads,
                 "refine_steps": args.refine_steps, "refine_lr": lr, "levels": levels, "clips": []}
    for clip in args.clips:
        r = evaluate_clip(clip, plain, frames=args.frames, levels=levels, presets=("medium",))
        src = read_video(clip, frames=args.frames)
        r["curves"][REFINED] = []
        for level in levels:  # the refined streams, each also decoded in another process with 1 thread
            point, stream, recon = codec_point(refined, src, level, r["intra_period"])
            point["exact_cross_process"] = bool(cross_process_decode(stream, args.weights, 1).equal(recon))
            r["curves"][REFINED].append(point)
        cur = r["curves"]
        spf = lambda name: float(np.mean([1.0 / p["encode_fps"] for p in cur[name]]))  # noqa: E731
        r.update(bd_refined_vs_plain=bd_rates(cur["bitalloc"], cur[REFINED], rate="bpp")["akima"],
                 bd_plain_vs_x265=bd_rates(cur["x265-medium"], cur["bitalloc"], rate="bpp")["akima"],
                 bd_refined_vs_x265=bd_rates(cur["x265-medium"], cur[REFINED], rate="bpp")["akima"],
                 refined_share=sum(p["refined_frames"] for p in cur[REFINED]) / (len(levels) * len(src)),
                 exact=all(p["exact_cross_process"] and p["exact"] for p in cur[REFINED]),
                 seconds_per_frame_plain=spf("bitalloc"), seconds_per_frame_refined=spf(REFINED))
        res["clips"].append(r)
        print(f"{r['clip']}: refined vs unrefined {r['bd_refined_vs_plain']:+.2f}%, vs x265 medium "
              f"{r['bd_plain_vs_x265']:+.1f}% -> {r['bd_refined_vs_x265']:+.1f}%, exact {r['exact']}", flush=True)
    if args.images:
        tp, tr = _timed(plain), _timed(refined)
        img = evaluate_images(args.images, plain, levels=levels, limit=args.image_limit,
                              extra_coders={REFINED: refined})
        cur = img["curves"]
        img.update(bd_refined_vs_plain=bd_rates(cur["bitalloc-intra"], cur[REFINED], rate="bpp")["akima"],
                   bd_plain_vs_jpeg=bd_rates(cur["jpeg"], cur["bitalloc-intra"], rate="bpp")["akima"],
                   bd_refined_vs_jpeg=bd_rates(cur["jpeg"], cur[REFINED], rate="bpp")["akima"],
                   seconds_per_frame_plain=tp["seconds"] / tp["frames"],
                   seconds_per_frame_refined=tr["seconds"] / tr["frames"])
        res["images"] = img
        print(f"images: refined vs unrefined {img['bd_refined_vs_plain']:+.2f}%, vs JPEG {img['bd_plain_vs_jpeg']:+.1f}% "
              f"-> {img['bd_refined_vs_jpeg']:+.1f}%", flush=True)
    finish_results(RESULTS / "codec_refine.json", None, res, "codec-refine", None if args.no_md else render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
