"""Where the learned codec's bits go: I against P frames, motion against residual, and how good the prediction is.

    python benchmarks/codec_pframe_bits.py --clips "$DATA/video/carphone_qcif.mp4" "$DATA/video/tree.avi" \\
        --frames 32 --levels 1,3,5,7

($DATA: the benchmark data folder.) One group of pictures per clip (the first ``--frames`` frames, one I frame):

* **streams**: the codec's real streams (the default encoder, :class:`bitalloc.codec.VideoCoder`) and x265 medium's
  (zerolatency, bframes 0, QP 22-37, the anchor of ``codec_rd.py``): bits per pixel of the I frame and of the mean P
  frame, their ratio, and the PSNR_YUV of each;
* **inside the P frames**: the float codec of the same weights with its trained analysis, run as coding runs it
  (each P frame predicted from the previous reconstruction, rounded to 8 bits; motion from DIS optical flow on the
  decoded reference): the ideal code lengths (-log2 p of the rounded latents) of the motion and of the residual,
  and the PSNR_YUV of the reconstruction, of the motion-compensated prediction, of the reference unmoved (no motion
  compensation), and of the reference warped by the uncoded flow estimate.

Writes ``--out`` (in benchmarks/results/) and the ``codec-pframe-bits`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, command_line, finish_results, git_revision, machine, md_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def psnr_packed(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR_YUV = (6 Y + U + V) / 8 of per-plane PSNRs, on packed frames [1, 6, h, w] in [0, 1] (4 luma phases, U, V)."""
    from bitalloc.codec.metrics import psnr_from_mse

    d = (a.double() - b.double()).pow(2)
    y, u, v = psnr_from_mse([float(d[:, :4].mean()), float(d[:, 4].mean()), float(d[:, 5].mean())], peak=1.0)
    return float(6 * y + u + v) / 8


def inside_p_frames(model, frames, level: int) -> dict:
    """The float codec's ideal code lengths and PSNRs along one group of pictures (module docstring)."""
    from bitalloc.codec.dataset import frames_to_tensor
    from bitalloc.codec.model import bits_of
    from bitalloc.codec.motion import estimate_flow_packed, warp

    x = frames_to_tensor(frames)
    px = frames.height * frames.width
    lv = torch.tensor([level])
    to8 = lambda t: t.clamp(0, 1).mul(255).round().div(255)  # noqa: E731
    with torch.no_grad():
        out = model.intra(x[:1], lv)
        ref = to8(out["x_hat"])
        rows = {"i_bpp": float(bits_of(out["likelihoods"])) / px, "i_psnr": psnr_packed(ref, x[:1])}
        acc: dict[str, list[float]] = {k: [] for k in ("motion_bpp", "residual_bpp", "psnr", "prediction_psnr",
                                                      "unmoved_psnr", "uncoded_flow_psnr")}
        for t in range(1, len(frames)):
            cur = x[t:t + 1]
            flow = estimate_flow_packed(cur, ref)
            out = model.inter(cur, ref, flow, lv)
            lik = out["likelihoods"]
            rec = to8(out["x_hat"])
            acc["motion_bpp"].append(float(bits_of({k: v for k, v in lik.items() if k.startswith("motion")})) / px)
            acc["residual_bpp"].append(float(bits_of({k: v for k, v in lik.items() if k.startswith("residual")})) / px)
            acc["psnr"].append(psnr_packed(rec, cur))
            acc["prediction_psnr"].append(psnr_packed(out["prediction"], cur))
            acc["unmoved_psnr"].append(psnr_packed(ref, cur))
            acc["uncoded_flow_psnr"].append(psnr_packed(warp(ref, flow), cur))
            ref = rec
    return rows | {k: float(np.mean(v)) for k, v in acc.items()}


def split_frames(bytes_per_frame: list[int], psnr: list[float], px: int) -> dict:
    """I frame (the first) against the mean P frame: bits per pixel, their ratio, PSNR."""
    i_bpp, p_bpp = 8 * bytes_per_frame[0] / px, 8 * float(np.mean(bytes_per_frame[1:])) / px
    return {"i_bpp": i_bpp, "p_bpp": p_bpp, "p_over_i": p_bpp / i_bpp, "i_psnr": psnr[0],
            "p_psnr": float(np.mean(psnr[1:]))}


def render(res: dict) -> str:
    lines = [f"Command: `{res['command']}`  ", f"Revision: {res['revision']}; machine: {res['machine']}; torch threads: "
             f"{res['threads']}. Weights: `{res['weights']}`. One group of pictures per clip (one I frame, then P "
             "frames). Stream rows: each frame's record (bitalloc; the stream header not included) or packet (x265; "
             "the first carries the parameter sets).", ""]
    rows = [[c["clip"], s["codec"], s["point"], f"{s['i_bpp']:.3f}", f"{s['p_bpp']:.3f}", f"{s['p_over_i']:.2f}",
             f"{s['i_psnr']:.2f}", f"{s['p_psnr']:.2f}"] for c in res["clips"] for s in c["streams"]]
    lines.append(md_table(["clip", "codec", "level / QP", "I frame bits/pixel", "P frame bits/pixel (mean)", "P / I",
                           "I PSNR", "P PSNR (mean)"], rows))
    lines += ["", "Inside the P frames (float codec of the same weights, trained analysis alone, ideal code lengths; "
              "means over the P frames):", ""]
    rows = [[c["clip"], p["level"], f"{p['i_bpp']:.3f}", f"{p['motion_bpp']:.3f}", f"{p['residual_bpp']:.3f}",
             f"{p['psnr']:.2f}", f"{p['prediction_psnr']:.2f}", f"{p['uncoded_flow_psnr']:.2f}", f"{p['unmoved_psnr']:.2f}"]
            for c in res["clips"] for p in c["inside"]]
    lines.append(md_table(["clip", "level", "I bits/pixel", "motion bits/pixel", "residual bits/pixel", "P PSNR",
                           "prediction PSNR", "uncoded-flow warp PSNR", "unmoved reference PSNR"], rows))
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", nargs="+", required=True)
    ap.add_argument("--weights", help="codec weights (default: the shipped ones)")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--levels", default="1,3,5,7")
    ap.add_argument("--qps", default="22,27,32,37")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="codec_pframe_bits.json", help="results JSON, in benchmarks/results/")
    ap.add_argument("--no-md", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from bitalloc.codec.anchors import x265_encode
    from bitalloc.codec.codec import VideoCoder
    from bitalloc.codec.precision import float_codec
    from bitalloc.codec.video_io import read_video
    from bitalloc.codec.weights import default_weights_path, load_default_or

    model = load_default_or(args.weights)
    fmodel = float_codec(model).eval()
    coder = VideoCoder(model)
    levels = [int(v) for v in args.levels.split(",")]
    res: dict = {"command": command_line(), "revision": git_revision(), "machine": machine(), "threads": args.threads,
                 "weights": Path(args.weights).name if args.weights else default_weights_path().name, "clips": []}
    for clip in args.clips:
        src = read_video(clip, frames=args.frames)
        px = src.height * src.width
        c: dict = {"clip": Path(clip).name, "frames": len(src), "size": [src.width, src.height], "streams": [],
                   "inside": []}
        for level in levels:
            r = coder.compress(src, quality=level, intra_period=len(src))
            c["streams"].append({"codec": "bitalloc", "point": level} | split_frames(
                [f.bytes for f in r.frames], [f.psnr for f in r.frames], px))
        for qp in (int(q) for q in args.qps.split(",")):
            a = x265_encode(src, qp, "medium", intra_period=len(src))
            c["streams"].append({"codec": "x265-medium", "point": qp} | split_frames(
                a.frame_bytes, a.psnr["per_frame"]["psnr_yuv"], px))
        padded = src.pad(-(-src.height // 16) * 16, -(-src.width // 16) * 16)
        for level in levels:
            c["inside"].append({"level": level} | inside_p_frames(fmodel, padded, level))
        res["clips"].append(c)
        print(render({**res, "clips": [c]}), flush=True)
    out = Path(args.out)
    finish_results(out if out.is_absolute() or out.parent != Path(".") else RESULTS / out, None, res,
                   "codec-pframe-bits", None if args.no_md else render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
