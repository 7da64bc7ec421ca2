"""The learned video codec against HEVC (x265) and JPEG: rate-distortion, BD-rate, speed, exactness.

    python benchmarks/codec_rd.py --clips "$DATA/video/carphone_qcif.mp4" "$DATA/video/tree.avi" \\
        --images "$DATA/imagenet-sample.zip" --speed-clip "$DATA/video/dhf1k_0068.avi"

($DATA: the benchmark data folder.) For each held-out clip: the shipped codec
at every quality level and x265 (PyAV's libx265) at QP 22, 27, 32, 37 with presets medium and veryslow,
tune=zerolatency, bframes=0, keyint = the codec's intra period (32), info=0, pools=2, on the first 96 frames (or all);
PSNR_YUV = (6 Y + U + V) / 8 per frame, averaged; BD-rate (Akima and PCHIP) on YUV and RGB PSNR; encode and decode
frames per second of both, this machine; every codec stream decoded again in a separate process with 1 thread
(the encoder uses 2) and compared with the encoder's reconstruction. For the intra codec: the held-out ImageNet
images (every tenth, 256x256 centre crops) against JPEG (Pillow, 4:2:0) and x265 intra (keyint 1). Decoding speed
at 176x144 comes from the clips; at 640x360 from ``--speed-clip`` (any clip; the default reference is a training
clip, which does not matter for speed). Writes benchmarks/results/codec_rd.json, the RD plots in
benchmarks/results/codec/, and the "Learned video codec" section of BENCHMARKS.md.
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
#: the curve of the same codec and weights with the trained analysis only (no encoder search)
SINGLE = "bitalloc-single-pass"
PLOTS = RESULTS / "codec"


def speed(coder, path: str, frames: int, quality: int) -> dict:
    """Encode and decode fps of the codec on the first ``frames`` frames of ``path`` (2 threads, then the decode
    alone timed again)."""
    from bitalloc.codec.video_io import read_video

    src = read_video(path, frames=frames)
    t0 = time.perf_counter()
    res = coder.compress(src, quality=quality, intra_period=32)
    enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec = coder.decompress(res.stream)
    dec_s = time.perf_counter() - t0
    return {"clip": Path(path).name, "width": src.width, "height": src.height, "frames": len(src),
            "quality": quality, "encode_fps": len(src) / enc, "decode_fps": len(src) / dec_s,
            "exact": bool(dec.equal(res.reconstruction))}


def render(res: dict) -> str:
    lines = ["## Learned video codec", "",
             f"Command: `{res['command']}`  ", f"Revision: {res['revision']}; machine: {res['machine']}; "
             f"torch threads: {res['threads']}. Weights: `{res['weights']}` ({res['parameters']:,} parameters). "
             f"Encoder: analysis scales {', '.join(f'{a:g}' for a in res.get('analysis_scales', [1.0]))} searched per "
             f"frame (`bitalloc` rows; docs/codec.md), and `{SINGLE}` rows with the trained analysis alone.", ""]
    for c in res["clips"]:
        lines += [f"### {c['clip']} ({c['width']}x{c['height']}, {c['frames']} frames, intra period {c['intra_period']})",
                  "", f"![RD]({c['plot']})", ""]
        rows = []
        for name, pts in c["curves"].items():
            for p in pts:
                rows.append([name, p.get("level", p.get("qp")), f"{p['kbps']:.1f}", f"{p['bpp']:.4f}",
                             f"{p['psnr_yuv']:.2f}", f"{p['psnr_rgb']:.2f}", f"{p['encode_fps']:.1f}",
                             f"{p['decode_fps']:.1f}", {True: "yes", False: "NO"}.get(p.get("exact_cross_process"), "")])
        lines += [md_table(["codec", "level / QP", "kbps", "bits/pixel", "PSNR YUV", "PSNR RGB", "encode fps",
                           "decode fps", "exact in another process"], rows)]
        lines += ["", "BD-rate of the codec against each anchor (%, negative = fewer bits at equal PSNR):", ""]
        lines += [md_table(["anchor", "YUV Akima", "YUV PCHIP", "RGB Akima", "RGB PCHIP"],
                          [[a, *(_pct(v[s][m]) for s in ("yuv", "rgb") for m in ("akima", "pchip"))]
                           for a, v in c["bd_rate"].items()])]
        if c.get("single_pass_bd_rate"):
            sp = c["single_pass_bd_rate"]
            lines += ["", f"Encoder search: `{SINGLE}` (the same weights, the trained analysis only) has BD-rate "
                          f"{_pct(sp['x265-medium'])}% against x265-medium (YUV, Akima); the search codes "
                          f"{_pct(sp['search_vs_single'])}% bits against it at equal PSNR."]
        lines.append("")
    if res.get("mean_bd_rate"):
        lines += ["### Mean BD-rate over the held-out clips", ""]
        lines += [md_table(["anchor", "YUV Akima", "YUV PCHIP"],
                          [[a, _pct(v["akima"]), _pct(v["pchip"])] for a, v in res["mean_bd_rate"].items()])]
        lines.append("")
    if res.get("images"):
        img = res["images"]
        lines += [f"### Intra coding: {img['images']} held-out ImageNet images ({img['crop']}x{img['crop']} centre crops)",
                  "", f"![RD]({img['plot']})", ""]
        rows = [[name, p.get("level", p.get("quality", p.get("qp"))), f"{p['bpp']:.4f}", f"{p['psnr_yuv']:.2f}",
                 f"{p['psnr_rgb']:.2f}"] for name, pts in img["curves"].items() for p in pts]
        lines += [md_table(["codec", "level / quality / QP", "bits/pixel", "PSNR YUV", "PSNR RGB"], rows)]
        lines += ["", "BD-rate of the intra codec (%):", ""]
        lines += [md_table(["anchor", "YUV Akima", "YUV PCHIP", "RGB Akima", "RGB PCHIP"],
                          [[a, *(_pct(v[s][m]) for s in ("yuv", "rgb") for m in ("akima", "pchip"))]
                           for a, v in img["bd_rate"].items()])]
        lines.append("")
    if res.get("speed"):
        lines += ["### Speed (this machine, 2 torch threads)", ""]
        lines += [md_table(["clip", "size", "frames", "level", "encode fps", "decode fps", "exact"],
                          [[s["clip"], f"{s['width']}x{s['height']}", s["frames"], s["quality"], f"{s['encode_fps']:.2f}",
                            f"{s['decode_fps']:.2f}", "yes" if s["exact"] else "NO"] for s in res["speed"]])]
        lines.append("")
    return "\n".join(lines)


def _mean(values) -> float | None:
    """Mean BD-rate over clips; None when a clip has none (its curves do not overlap the anchor's)."""
    if any(v is None or not np.isfinite(v) for v in values):
        return None
    return float(np.mean(values))


def _pct(v) -> str:
    return "n/a (no overlap)" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:+.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", nargs="+", required=True)
    ap.add_argument("--images")
    ap.add_argument("--image-limit", type=int, default=100)
    ap.add_argument("--speed-clip")
    ap.add_argument("--weights")
    ap.add_argument("--frames", type=int, default=96)
    ap.add_argument("--levels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--analysis-scales", help="the encoder's analysis scales (default: bitalloc's)")
    ap.add_argument("--no-md", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from bitalloc.codec.codec import ANALYSIS_SCALES, VideoCoder
    from bitalloc.codec.evaluate import BD_METHODS, bd_rates, evaluate_clip, evaluate_images
    from bitalloc.codec.weights import default_weights_path, load_default_or
    from bitalloc.report.plots import rd_plot

    model = load_default_or(args.weights)
    scales = ANALYSIS_SCALES if args.analysis_scales is None else args.analysis_scales  # VideoCoder checks them
    coder = VideoCoder(model, analysis_scales=scales)
    single = VideoCoder(model, analysis_scales=(1.0,))  # the trained analysis only: what the encoder search adds
    levels = [int(v) for v in args.levels.split(",")] if args.levels else list(range(model.cfg.levels))
    PLOTS.mkdir(parents=True, exist_ok=True)
    res: dict = {"command": command_line(), "revision": git_revision(), "machine": machine(),
                 "threads": args.threads, "analysis_scales": list(coder.analysis_scales),
                 "weights": str(Path(args.weights or default_weights_path()).name),
                 "parameters": sum(p.numel() for p in model.parameters()), "clips": []}
    for clip in args.clips:
        r = evaluate_clip(clip, coder, frames=args.frames, levels=levels, cross_check=1, weights=args.weights,
                          extra_coders={SINGLE: single})
        r["single_pass_bd_rate"] = {"x265-medium": bd_rates(r["curves"]["x265-medium"], r["curves"][SINGLE])["akima"],
                                    "search_vs_single": bd_rates(r["curves"][SINGLE], r["curves"]["bitalloc"])["akima"]}
        plot = PLOTS / f"rd_{Path(clip).stem}.png"
        rd_plot({n: [(p["kbps"], p["psnr_yuv"]) for p in pts] for n, pts in r["curves"].items()}, plot,
                title=f"{r['clip']}: {r['frames']} frames, intra period {r['intra_period']}", ylabel="PSNR YUV (dB)")
        r["plot"] = str(plot.relative_to(ROOT))
        res["clips"].append(r)
        print(f"{r['clip']}: BD-rate {r['bd_rate']}", flush=True)
    res["mean_bd_rate"] = {a: {m: _mean([c["bd_rate"][a]["yuv"][m] for c in res["clips"]]) for m in BD_METHODS}
                           for a in res["clips"][0]["bd_rate"]}
    if args.images:
        img = evaluate_images(args.images, coder, levels=levels, limit=args.image_limit,
                              extra_coders={SINGLE + "-intra": single})
        plot = PLOTS / "rd_images.png"
        rd_plot({n: [(p["bpp"], p["psnr_rgb"]) for p in pts] for n, pts in img["curves"].items()}, plot,
                title=f"{img['images']} held-out images", xlabel="bits per pixel", ylabel="PSNR RGB (dB)")
        img["plot"] = str(plot.relative_to(ROOT))
        res["images"] = img
        print(f"images: BD-rate {img['bd_rate']}", flush=True)
    res["speed"] = [speed(coder, args.clips[0], 32, levels[len(levels) // 2])]
    if args.speed_clip:
        res["speed"].append(speed(coder, args.speed_clip, 16, levels[len(levels) // 2]))
    finish_results(RESULTS / "codec_rd.json", None, res, "codec-rd", None if args.no_md else render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
