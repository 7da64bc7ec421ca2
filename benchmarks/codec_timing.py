"""Real run times of the learned video codec: its decoder networks and whole-frame encoding / decoding, for the
FP32 codec, the static 8-bit codec as the bitstream runs it, the same 8-bit networks on real int8 kernels
(onnxruntime QLinearConv, PyTorch quantized::conv2d) and the 4- / 2-bit widths, which have no native kernel here.

    python benchmarks/codec_timing.py                                   # the shipped weights, synthetic clips
    python benchmarks/codec_timing.py --weights runs/codec/codec.pt --video "$DATA/video/carphone_qcif.mp4" \\
        --video "$DATA/video/dhf1k_0068.avi" --threads 2
    python benchmarks/codec_timing.py --untrained --sizes 176x144 --runs 3 --no-md     # development

Backends and the timing protocol: :mod:`bitalloc.codec.timing` (every backend of one item timed in turns, each
turn after a 0.1 s pause; compare backends through the "x FP32" ratios of one run). ``--video`` clips are used
for the frame sizes they have (their first 2 frames), the other ``--sizes`` get the synthetic clip of
:func:`bitalloc.codec.timing.synthetic_video`. Writes benchmarks/results/codec_timing.json and the section
``codec-timing`` ("Codec run times") of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, git_revision, md_table, update_section  # noqa: E402

from bitalloc.codec import timing as T  # noqa: E402
from bitalloc.errors import BitallocError, ConfigError  # noqa: E402
from bitalloc.io import write_json  # noqa: E402
from bitalloc.report.machine import machine_description  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "codec_timing.json"
NETS = ("intra.synthesis", "intra.hyper_synthesis", "motion.synthesis", "motion.hyper_synthesis",
        "residual.synthesis", "residual.hyper_synthesis")
SHORT = {"intra.synthesis": "I syn", "intra.hyper_synthesis": "I hyper", "motion.synthesis": "M syn",
         "motion.hyper_synthesis": "M hyper", "residual.synthesis": "R syn", "residual.hyper_synthesis": "R hyper"}


def parse_size(s: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--sizes: {s!r} is not WIDTHxHEIGHT (e.g. 176x144)") from None
    if w < 16 or h < 16:
        raise ConfigError(f"--sizes: {s} is smaller than the codec's 16x16 block")
    return w, h


def load(args: argparse.Namespace, video_for_calibration) -> tuple[object, str]:
    """The quantized codec to time and a description of where it came from."""
    if args.untrained:
        model = T.quantize_codec(T.untrained_codec(seed=args.seed), 8, video_for_calibration)
        return model, ("untrained codec (default sizes, seed %d), decoder networks quantized to 8 bits on the timed "
                       "clip, frozen" % args.seed)
    from bitalloc.codec import load_codec
    from bitalloc.codec.weights import default_weights_path

    model = load_codec(args.weights)
    return model, f"weights {args.weights or default_weights_path().name}"


def cell(ms: float | None, ratio: float | None) -> str:
    if ms is None:
        return ""
    return f"{ms:.1f}" + (f" ({ratio:.2f}x)" if ratio is not None else "")


def size_markdown(s: dict) -> str:
    rows = {(r["item"], r["backend"]): r for r in s["rows"]}
    backends = [b["name"] for b in s["backends"]]
    frame_backends = [b for b in backends if ("decode I", b) in rows]
    macs = {n["name"]: n["macs"] for n in s["networks"]}

    def get(item: str, b: str) -> str:
        r = rows.get((item, b))
        return cell(r["median_ms"], r.get("x_" + T.BASELINE)) if r else ""

    nets = [n for n in NETS if n in macs]
    lines = [f"#### {s['size']} (padded {s['padded'][1]}x{s['padded'][0]})", "",
             "Decoder networks, median ms (x FP32 = torch-fp32 / backend, same run); MMAC per call: " +
             ", ".join(f"{SHORT[n]} {macs[n] / 1e6:.0f}" for n in nets) + ".", ""]
    lines.append(md_table(["backend", "kernels", *[SHORT[n] for n in nets]],
                          [[b["name"], b["kernels"], *[get(n, b["name"]) for n in nets]] for b in s["backends"]]))
    lines += ["", "Whole frames, median ms (x FP32); P = (I+P) - I, medians; fps = 1000 / decode ms.", ""]
    frame_rows = []
    for b in frame_backends:
        dp = rows.get(("decode P", b), {}).get("median_ms")
        di = rows[("decode I", b)]["median_ms"]
        frame_rows.append([b, get("decode I", b), get("decode P", b), get("encode I", b), get("encode P", b),
                           f"{1000 / di:.1f}", f"{1000 / dp:.1f}" if dp and dp > 0 else ""])
    lines.append(md_table(["backend", "decode I", "decode P", "encode I", "encode P", "fps I", "fps P"], frame_rows))
    lines += ["", "Agreement with the bitstream's path (bitalloc-int8) on the same inputs: max |difference| / max "
              "|reference| per network, in %; scale-index mismatches = share of latents whose entropy-model scale "
              "differs (a decoder needs 0 % to decode the other's stream); int8 convs = convolutions run by integer "
              "kernels / all; PSNR_YUV (dB) and bytes of the I and P frames coded with the backend (encoder and "
              "decoder both use it; exact = its decoder reproduced its encoder's frames in this process).", ""]
    err = {(e["item"], e["backend"]): e for e in s["errors"]}
    qual = {q["backend"]: q for q in s["frames"]}
    erows = []
    for b in s["backends"]:
        name = b["name"]
        rel = [f"{100 * err[(n, name)]['max_abs_error'] / max(err[(n, name)]['max_abs_reference'], 1e-30):.3g}"
               if (n, name) in err else "" for n in nets]
        mism = [err[(n, name)]["scale_index_mismatch"] for n in nets if (n, name) in err
                and err[(n, name)]["scale_index_mismatch"] is not None]
        int8 = int8_convs(b)
        q = qual.get(name)
        erows.append([name, *rel, f"{100 * max(mism):.2f}" if mism else "", int8,
                      "" if q is None else " / ".join(f"{p:.2f}" for p in q["psnr_yuv"]),
                      "" if q is None else " / ".join(str(v) for v in q["bytes"]),
                      "" if q is None else ("yes" if q["decode_exact"] else "no")])
    lines.append(md_table(["backend", *[SHORT[n] + " %" for n in nets], "scale mismatch % (max)", "int8 convs",
                           "PSNR I / P", "bytes I / P", "exact"], erows))
    return "\n".join(lines)


def int8_convs(b: dict) -> str:
    """QLinearConv / all convolutions in onnxruntime's optimized graphs, or the torch int8 notes' counts."""
    if b["ops"]:
        q = sum(v.get("QLinearConv", 0) for v in b["ops"].values())
        f = sum(v.get("Conv", 0) + v.get("FusedConv", 0) for v in b["ops"].values())
        return f"{q} / {q + f}"
    counts = [n.split(": ", 1)[1].split(" convolutions")[0] for n in b["notes"] if "quantized::conv2d" in n]
    if counts:
        done = sum(int(c.split(" of ")[0]) for c in counts)
        total = sum(int(c.split(" of ")[1]) for c in counts)
        return f"{done} / {total}"
    return "0"


def native_lines(nk: dict) -> list[str]:
    cpu = nk["cpu"]
    types = nk.get("ort_kernel_types") or {}
    feats = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu.items())
    lines = [f"- CPU: {feats}; PyTorch CPU capability {nk['torch_cpu_capability']}, quantized engines "
             f"{', '.join(nk['torch_engines'])}."]
    if nk.get("onnxruntime"):
        eight = lambda op: ", ".join(t for t in types.get(op, []) if t not in ("int32", "float"))  # noqa: E731
        lines.append(f"- onnxruntime {nk['onnxruntime']} CPU kernels: QLinearConv on {eight('QLinearConv')}, "
                     f"ConvInteger on {eight('ConvInteger')} (8-bit only); MatMulNBits: {nk['MatMulNBits_bits']} "
                     "(weights only, MatMul only, no convolution); DequantizeLinear reads "
                     f"{', '.join(t for t in types.get('DequantizeLinear', []) if t in ('int4', 'uint4', 'int2', 'uint2'))} "
                     "(then the convolution runs in float).")
    sub = nk.get("sub8bit_conv_kernels") or []
    lines.append("- **No native 4-bit or 2-bit convolution kernel** exists here (onnxruntime or PyTorch): those widths "
                 "run emulated, as integer codes in float32 kernels (bitalloc-int4 / -int2) or as narrow codes on the "
                 "int8 kernels (ort-int4-on-int8), at the cost of the 8-bit or float path."
                 if not sub else f"- sub-8-bit convolution kernel types found: {sub}")
    return lines


def markdown(result: dict) -> str:
    lines = ["### Codec run times", "",
             f"Codec: {result['codec']}; quality level {result['quality']}; {result['threads']} thread(s) "
             "(torch intra-op, onnxruntime intra-op, OpenCV). Each item (a network on its input captured while "
             "coding the clip, or the coding of a frame with `VideoCoder.compress` / `decompress`) is timed for "
             "every backend in turns (0.1 s pause per turn), at least "
             f"{result['runs']} runs per network and {result['frame_runs']} per frame and {result['min_seconds']:g} s "
             "of timed runs each; medians. Backends (bitalloc.codec.timing): torch-fp32 = the FP32 codec in float "
             "PyTorch; bitalloc-int8 = the static 8-bit codec as the bitstream runs it (integer_mode, integer codes "
             "in float32 kernels); fakequant-int8 = the same networks fake-quantized; ort-fp32 = the float networks "
             "in onnxruntime; ort-int8 = the 8-bit networks as ONNX QDQ with exactly bitalloc's quantization points "
             "(convolutions between 8-bit grids run as QLinearConv; 16-bit layers and each network's last "
             "convolution run in float), ort-int8-u8w = the same with uint8 weight codes (no int16 saturation), "
             "ort-int8-all = every 8-bit convolution in int8 (align model + 8-bit network outputs: extra "
             "roundings); torch-x86-int8 / torch-qnnpack-int8 = PyTorch's quantized::conv2d (x86 = fbgemm/oneDNN, "
             "QNNPACK) with 8-bit network outputs; bitalloc-int4 / -int2 = the decoder networks re-quantized at 4 / 2 "
             "bits in integer_mode; ort-int4-on-int8 = 4-bit codes on the int8 kernels. Encoding runs the analysis "
             "transforms (float PyTorch in every backend) and the DIS motion estimate too.", ""]
    lines += native_lines(result["native_kernels"]) + [""]
    if result.get("failed_backends"):
        lines += [f"- backend {k} could not be built: {v}" for k, v in result["failed_backends"].items()] + [""]
    for s in result["sizes"]:
        lines += [size_markdown(s), ""]
    lines += [f"Machine: {result['machine']}; load before the run: {result['load_before']}, after: "
              f"{result['load_after']}. Revision {result['revision']}. Command: `{result['command']}`"]
    return "\n".join(lines)


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="codec weights file (default: the shipped weights)")
    ap.add_argument("--untrained", action="store_true",
                    help="time an untrained codec of the default sizes, quantized to 8 bits (development)")
    ap.add_argument("--sizes", default="176x144,640x360", help="frame sizes WIDTHxHEIGHT, comma-separated")
    ap.add_argument("--video", action="append", default=[],
                    help="a clip to time at its own frame size (repeatable; its first 2 frames)")
    ap.add_argument("--quality", type=int, help="quality level (default: the middle one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=10, help="timed runs per network and backend (at least)")
    ap.add_argument("--frame-runs", type=int, default=5, help="timed runs per frame item and backend (at least)")
    ap.add_argument("--min-seconds", type=float, default=1.0, help="timed seconds per item and backend (at least)")
    ap.add_argument("--backends", default=",".join(T.BACKENDS), help=f"comma-separated, of: {', '.join(T.BACKENDS)}")
    ap.add_argument("--frame-backends", help="backends whose whole frames are timed (default: all of --backends)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-md", action="store_true", help="do not update BENCHMARKS.md / the results JSON")
    ap.add_argument("--json", help="also write the result to this file")
    args = ap.parse_args()
    try:
        if args.untrained and args.weights:
            raise ConfigError("--untrained and --weights exclude each other")
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: give 1 or more")
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        from bitalloc.codec.video_io import read_video

        clips = {}
        for path in args.video:
            v = read_video(path, frames=2)
            clips[(v.width, v.height)] = (v, Path(path).name)
        videos, sources = [], []
        for w, h in sizes:
            v, src = clips.get((w, h), (None, None))
            videos.append(v if v is not None else T.synthetic_video(2, h, w, seed=args.seed))
            sources.append(src or "synthetic")
        names = [n.strip() for n in args.backends.split(",") if n.strip()]
        frame_names = None if not args.frame_backends else [n.strip() for n in args.frame_backends.split(",")]
        load_before = load_average()
        torch.set_num_threads(args.threads)
        model, what = load(args, videos[0])
        result = T.codec_timing(model, videos, quality=args.quality, backends=names, frame_backends=frame_names,
                                threads=args.threads, runs=args.runs, frame_runs=args.frame_runs,
                                min_seconds=args.min_seconds, log=lambda s: print(s, file=sys.stderr, flush=True))
    except BitallocError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for s, src in zip(result["sizes"], sources):
        s["clip"] = src
    result = {"codec": what, "machine": machine_description(args.threads, onnxruntime=True),
              "load_before": load_before, "load_after": load_average(), "revision": git_revision(),
              "command": command_line(), **result}
    text = markdown(result)
    print(text)
    if args.json:
        write_json(Path(args.json), result)
    if not args.no_md:
        write_json(RESULTS, result)
        update_section("codec-timing", text)
        print(f"results: {RESULTS}; section codec-timing of BENCHMARKS.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
