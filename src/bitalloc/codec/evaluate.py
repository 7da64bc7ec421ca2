"""Rate-distortion evaluation of the codec against x265 (video) and JPEG / x265 intra (images).

For each clip: the codec at its quality levels and x265 at QP 22, 27, 32, 37 with each preset (SPEC section 3,
"The HEVC anchor, fairly": zerolatency, bframes=0, the codec's intra period, info=0, pools=2), the same frames;
rate from real bytes (the .bav file, the raw HEVC stream), PSNR_YUV = (6 Y + U + V) / 8 averaged over frames, and
PSNR on RGB; BD-rate of the codec against each anchor (Akima and PCHIP interpolation, :mod:`bitalloc.codec.metrics`,
checked against the ``bjontegaard`` package); encode and decode frames per second of both, measured here. Every
codec point is decoded again and compared with the encoder's reconstruction (``exact``); ``cross_check`` also
decodes each stream in a *separate process* with a different thread count and compares the frames.

For images: the intra codec (every image an I frame) against JPEG (Pillow, 4:2:0) and x265 intra (keyint 1),
curves of mean bits per pixel and mean PSNR over the held-out images at each setting, BD-rate on RGB and YUV PSNR.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bitalloc.codec.anchors import ANCHOR_QPS, JPEG_QUALITIES, jpeg_encode, x265_encode
from bitalloc.codec.frames import YUVFrames
from bitalloc.codec.metrics import bd_rate, bits_per_pixel, kbps, psnr_rgb, psnr_yuv
from bitalloc.errors import ConfigError

BD_METHODS = ("akima", "pchip")


def codec_point(coder: Any, frames: YUVFrames, level: int, intra_period: int) -> tuple[dict[str, Any], bytes, YUVFrames]:
    """Encode, decode and measure one quality level: (point, stream, reconstruction)."""
    res = coder.compress(frames, quality=level, intra_period=intra_period)
    t0 = time.perf_counter()
    dec = coder.decompress(res.stream)
    dec_s = time.perf_counter() - t0
    p = psnr_yuv(frames, res.reconstruction)
    kinds = [f.kind for f in res.frames]
    point = {"level": level, "bytes": res.bytes, "bpp": bits_per_pixel(res.bytes, len(frames), frames.height, frames.width),
             "kbps": kbps(res.bytes, len(frames), frames.fps), "psnr_yuv": p["psnr_yuv"], "psnr_y": p["psnr_y"],
             "psnr_u": p["psnr_u"], "psnr_v": p["psnr_v"], "psnr_yuv_mse": p["psnr_yuv_mse"],
             "psnr_rgb": psnr_rgb(frames, res.reconstruction)["psnr_rgb"],
             "encode_fps": len(frames) / res.encode_seconds, "decode_fps": len(frames) / dec_s,
             "exact": bool(dec.equal(res.reconstruction)), "frame_types": "".join(kinds),
             "i_bytes": sum(f.bytes for f in res.frames if f.kind == "I"),
             "p_bytes": sum(f.bytes for f in res.frames if f.kind == "P"),
             "clamped_symbols": sum(f.clamped for f in res.frames),
             "refined_frames": sum(f.refined for f in res.frames),
             "p_levels": [f.level for f in res.frames if f.kind == "P"]}
    return point, res.stream, res.reconstruction


def anchor_point(r: Any) -> dict[str, Any]:
    """The JSON point of an :class:`~bitalloc.codec.anchors.AnchorResult`."""
    return {"qp": r.params.get("qp"), "quality": r.params.get("quality"), "bytes": r.num_bytes, "bpp": r.bpp,
            "kbps": r.kbps, "psnr_yuv": r.psnr["psnr_yuv"], "psnr_y": r.psnr["psnr_y"], "psnr_u": r.psnr["psnr_u"],
            "psnr_v": r.psnr["psnr_v"], "psnr_yuv_mse": r.psnr["psnr_yuv_mse"], "psnr_rgb": r.psnr_rgb["psnr_rgb"],
            "encode_fps": r.encode_fps, "decode_fps": r.decode_fps, "keyframes": r.keyframes, "command": r.command,
            "params": r.params}


def cross_process_decode(stream: bytes, weights: str | None, threads: int) -> YUVFrames:
    """Decode ``stream`` with ``bitalloc codec decode`` in a new Python process using ``threads`` torch threads."""
    from bitalloc.codec.video_io import read_video

    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "s.bav", Path(d) / "rec.y4m"
        src.write_bytes(stream)
        cmd = [sys.executable, "-m", "bitalloc", "codec", "decode", str(src), "-o", str(out), "--threads", str(threads)]
        if weights:
            cmd += ["--weights", str(weights)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1")
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"decoding in a separate process failed: {r.stderr.strip().splitlines()[-1:]}")
        return read_video(out)


def bd_rates(anchor: Sequence[dict[str, Any]], test: Sequence[dict[str, Any]], key: str = "psnr_yuv",
             rate: str = "bytes") -> dict[str, float | None]:
    """BD-rate (%) of ``test`` against ``anchor`` by each method (None where the curves do not overlap)."""
    out: dict[str, float | None] = {}
    for m in BD_METHODS:
        try:
            out[m] = float(bd_rate([p[rate] for p in anchor], [p[key] for p in anchor],
                                   [p[rate] for p in test], [p[key] for p in test], method=m))
        except (ValueError, ConfigError):
            out[m] = None
    return out


def evaluate_clip(path: str | os.PathLike, coder: Any, *, frames: int = 96, levels: Sequence[int],
                  qps: Sequence[int] = ANCHOR_QPS, presets: Sequence[str] = ("medium", "veryslow"),
                  intra_period: int = 32, cross_check: int | None = None, weights: str | None = None,
                  progress: Any = None, extra_coders: dict[str, Any] | None = None) -> dict[str, Any]:
    """The codec and the x265 anchors on one clip (module docstring). ``extra_coders``: more codec curves by name
    (e.g. another encoder setting), coded on the same frames (not cross-checked; the BD-rate table is ``coder``'s)."""
    from bitalloc.codec.video_io import read_video

    src = read_video(path, frames=frames)
    out: dict[str, Any] = {"clip": Path(path).name, "frames": len(src), "width": src.width, "height": src.height,
                           "fps": src.fps, "intra_period": intra_period, "curves": {}}
    points = []
    for level in levels:
        point, stream, recon = codec_point(coder, src, level, intra_period)
        if cross_check:
            other = cross_process_decode(stream, weights, cross_check)
            point["exact_cross_process"] = bool(other.equal(recon))
            point["cross_process_threads"] = cross_check
        points.append(point)
        if progress:
            progress(1)
    out["curves"]["bitalloc"] = points
    for preset in presets:
        out["curves"][f"x265-{preset}"] = []
        for qp in qps:
            out["curves"][f"x265-{preset}"].append(anchor_point(x265_encode(src, qp, preset, intra_period)))
            if progress:
                progress(1)
    out["bd_rate"] = {name: {"yuv": bd_rates(curve, points), "rgb": bd_rates(curve, points, "psnr_rgb")}
                      for name, curve in out["curves"].items() if name != "bitalloc"}
    for name, other in (extra_coders or {}).items():
        out["curves"][name] = [codec_point(other, src, level, intra_period)[0] for level in levels]
    return out


def evaluate_images(path: str | os.PathLike, coder: Any, *, levels: Sequence[int], limit: int | None = None,
                    crop: int = 256, jpeg_qualities: Sequence[int] = JPEG_QUALITIES, qps: Sequence[int] = ANCHOR_QPS,
                    progress: Any = None, extra_coders: dict[str, Any] | None = None) -> dict[str, Any]:
    """Intra codec vs JPEG and x265 intra on the held-out images (centre crops of ``crop`` pixels).
    ``extra_coders``: more codec curves by name (e.g. another encoder setting), measured on the same images; the
    BD-rate table is ``coder``'s."""
    from bitalloc.codec.dataset import load_images

    images = load_images(path, "test", limit=limit, min_size=crop)
    crops = []
    for im in images:
        top, left = (im.height - crop) // 4 * 2, (im.width - crop) // 4 * 2
        crops.append(im.crop(crop, crop, top, left))

    def aggregate(name: str, fn: Any, settings: Sequence[int], key: str) -> list[dict[str, Any]]:
        pts = []
        for s in settings:
            rows = [fn(im, s) for im in crops]
            pts.append({key: s, "bpp": float(np.mean([r[0] for r in rows])), "psnr_yuv": float(np.mean([r[1] for r in rows])),
                        "psnr_rgb": float(np.mean([r[2] for r in rows])), "images": len(rows)})
            if progress:
                progress(1)
        return pts

    def ours(im: YUVFrames, level: int, c: Any = coder) -> tuple[float, float, float]:
        res = c.compress(im, quality=level, intra_period=1)
        return (bits_per_pixel(res.bytes, 1, im.height, im.width), psnr_yuv(im, res.reconstruction)["psnr_yuv"],
                psnr_rgb(im, res.reconstruction)["psnr_rgb"])

    def jpeg(im: YUVFrames, q: int) -> tuple[float, float, float]:
        r = jpeg_encode(im, q)
        return r.bpp, r.psnr["psnr_yuv"], r.psnr_rgb["psnr_rgb"]

    def hevc(im: YUVFrames, qp: int) -> tuple[float, float, float]:
        r = x265_encode(im, qp, "medium", 1)
        return r.bpp, r.psnr["psnr_yuv"], r.psnr_rgb["psnr_rgb"]

    curves = {"bitalloc-intra": aggregate("bitalloc", ours, levels, "level"),
              "jpeg": aggregate("jpeg", jpeg, jpeg_qualities, "quality"),
              "x265-intra": aggregate("x265", hevc, qps, "qp")}
    for name, other in (extra_coders or {}).items():
        curves[name] = aggregate(name, lambda im, lv, c=other: ours(im, lv, c), levels, "level")
    bd = {name: {"yuv": bd_rates(c, curves["bitalloc-intra"], rate="bpp"),
                 "rgb": bd_rates(c, curves["bitalloc-intra"], "psnr_rgb", rate="bpp")}
          for name, c in curves.items() if name != "bitalloc-intra"}
    return {"images": len(crops), "crop": crop, "curves": curves, "bd_rate": bd}


# ---- command line ----------------------------------------------------------------------------------------------

def add_eval_args(p: Any) -> None:
    from bitalloc.codec.codec import add_p_level_args
    from bitalloc.codec.refine import add_refine_args

    p.add_argument("--clips", nargs="*", default=[], help="video clips to evaluate (e.g. held-out carphone, tree)")
    p.add_argument("--images", help="ImageFolder folder / zip: intra codec vs JPEG and x265 intra on its held-out part")
    p.add_argument("--image-limit", type=int, help="at most this many held-out images")
    p.add_argument("--image-crop", type=int, default=256, help="centre crop of each image (default 256; smaller "
                                                               "images are skipped)")
    p.add_argument("--frames", type=int, default=96, help="frames per clip (96, or all if fewer)")
    p.add_argument("--intra-period", type=int, default=32)
    p.add_argument("--levels", help="codec quality levels, comma-separated (default: all)")
    p.add_argument("--qps", default="22,27,32,37", help="x265 QPs (default 22,27,32,37)")
    p.add_argument("--presets", default="medium,veryslow", help="x265 presets (default medium,veryslow)")
    p.add_argument("--cross-check", type=int, metavar="THREADS",
                   help="also decode every stream in a separate process with THREADS torch threads and compare")
    p.add_argument("--weights", help="codec weights file (default: the shipped weights)")
    p.add_argument("--analysis-scales", metavar="A,B,...",
                   help="the encoder's analysis scales (default 0,0.25,0.5,0.75,1; see `codec encode --help`)")
    p.add_argument("--adaptive-intra", action="store_true", help="the encoder may code P frames as I frames (see "
                                                                 "`codec encode --help`)")
    add_refine_args(p)
    add_p_level_args(p)
    p.add_argument("--out", required=True, help="output folder: results.json and one RD plot (PNG) per clip")
    p.add_argument("--threads", type=int, help="torch threads of this process")


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: give comma-separated integers") from None


def run_eval_cli(args: Any) -> int:
    import torch

    from bitalloc.codec.codec import ANALYSIS_SCALES, VideoCoder
    from bitalloc.codec.weights import load_default_or
    from bitalloc.io import write_json
    from bitalloc.report.plots import rd_plot
    from bitalloc.report.tables import print_table
    from bitalloc.train.progress import Progress

    if not args.clips and not args.images:
        raise ConfigError("nothing to evaluate: give --clips and/or --images")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_default_or(args.weights)
    scales = ANALYSIS_SCALES if args.analysis_scales is None else args.analysis_scales  # VideoCoder checks them
    coder = VideoCoder(model, analysis_scales=scales, adaptive_intra=args.adaptive_intra,
                       refine_steps=args.refine_steps, refine_lr=args.refine_lr, p_level_offsets=args.p_level_offsets)
    levels = _ints(args.levels, "--levels") if args.levels else list(range(model.cfg.levels))
    qps, presets = _ints(args.qps, "--qps"), [p for p in args.presets.split(",") if p]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"clips": [], "levels": levels, "qps": qps, "presets": presets}
    for clip in args.clips:
        with Progress(len(levels) + len(qps) * len(presets), f"eval {Path(clip).name}", mode="auto") as bar:
            r = evaluate_clip(clip, coder, frames=args.frames, levels=levels, qps=qps, presets=presets,
                              intra_period=args.intra_period, cross_check=args.cross_check, weights=args.weights,
                              progress=bar.update)
        results["clips"].append(r)
        rd_plot({name: [(p["kbps"], p["psnr_yuv"]) for p in pts] for name, pts in r["curves"].items()},
                out_dir / f"rd_{Path(clip).stem}.png", title=f"{r['clip']} ({r['frames']} frames, intra period "
                f"{r['intra_period']})", xlabel="kbps", ylabel="PSNR YUV (dB)")
        rows = [[name, p.get("level", p.get("qp")), round(p["kbps"], 1), round(p["psnr_yuv"], 2), round(p["psnr_rgb"], 2),
                 round(p["encode_fps"], 1), round(p["decode_fps"], 1), p.get("exact", "")]
                for name, pts in r["curves"].items() for p in pts]
        print_table(f"{r['clip']}: {r['width']}x{r['height']}, {r['frames']} frames", ["codec", "level/QP", "kbps",
                    "PSNR YUV", "PSNR RGB", "enc fps", "dec fps", "exact"], rows)
        print_table(f"{r['clip']}: BD-rate of bitalloc (%)", ["anchor", "YUV akima", "YUV pchip", "RGB akima", "RGB pchip"],
                    [[a, v["yuv"]["akima"], v["yuv"]["pchip"], v["rgb"]["akima"], v["rgb"]["pchip"]]
                     for a, v in r["bd_rate"].items()])
    if results["clips"]:
        results["mean_bd_rate"] = {a: {k: _mean([c["bd_rate"][a]["yuv"][k] for c in results["clips"]])
                                       for k in BD_METHODS} for a in results["clips"][0]["bd_rate"]}
    if args.images:
        with Progress(len(levels) + len(JPEG_QUALITIES) + len(qps), "eval images", mode="auto") as bar:
            img = evaluate_images(args.images, coder, levels=levels, limit=args.image_limit, qps=qps,
                                  crop=args.image_crop, progress=bar.update)
        results["images"] = img
        rd_plot({name: [(p["bpp"], p["psnr_rgb"]) for p in pts] for name, pts in img["curves"].items()},
                out_dir / "rd_images.png", title=f"{img['images']} held-out images ({img['crop']}x{img['crop']})",
                xlabel="bits per pixel", ylabel="PSNR RGB (dB)")
        print_table(f"images ({img['images']} held out): BD-rate of the intra codec (%)",
                    ["anchor", "YUV akima", "YUV pchip", "RGB akima", "RGB pchip"],
                    [[a, v["yuv"]["akima"], v["yuv"]["pchip"], v["rgb"]["akima"], v["rgb"]["pchip"]]
                     for a, v in img["bd_rate"].items()])
    write_json(out_dir / "results.json", results)
    print(f"results: {out_dir / 'results.json'}")
    return 0


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if len(vals) == len(values) and vals else None
