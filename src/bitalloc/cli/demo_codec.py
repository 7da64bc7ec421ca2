"""Part ``codec`` of ``bitalloc demo``: the learned video codec, 8-bit and ROI-aware dynamic precision, on a clip
synthesized here (nothing is downloaded).

Three codecs encode the clip: the FP32 codec (the 8-bit codec's weights in float networks,
:func:`bitalloc.codec.precision.float_codec`; its stream decodes exactly only in the same process), and the 8-bit
and dynamic-precision codecs (the shipped weights, or ``--codec-weights`` / ``--dynamic-weights``); each encodes
with :meth:`bitalloc.codec.VideoCoder.compress` (one I frame, then P frames) and decodes the stream with
:meth:`~bitalloc.codec.VideoCoder.decompress`; the demo reports

* rate: kbps = 8 bytes / 1000 x fps / frames, bits per pixel = 8 bytes / (frames x H x W)
  (:mod:`bitalloc.codec.metrics`; the whole stream: header, frame records, the ROI masks);
* PSNR_YUV = (6 PSNR_Y + PSNR_U + PSNR_V) / 8, mean over frames (:func:`bitalloc.codec.metrics.psnr_yuv`);
* whether the decoded frames equal the encoder's reconstruction bit for bit;
* per frame the widths the dynamic codec signals (ROI / rest) and the ROI share of its latent mask, read back from
  the stream (:func:`bitalloc.codec.dynamic.decode_mask`: the mask the decoder uses);
* Bit-FLOPs per frame in the SPEC convention (float MACs + BOPs / 64, docs/roi.md "cost") of every network the
  frame runs (analysis, hyper analysis, hyper synthesis, synthesis of the coders of its type), from
  :func:`bitalloc.codec.cost.region_cost` (bitalloc's cost model, each layer split by the ROI share of its output
  positions: f_l MACs_l at the ROI width, the rest at the other width) with the frame's decoded mask and widths;
  the 8-bit codec is costed the same way, and so is the dynamic codec with every region layer at 8 bits.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bitalloc.errors import ConfigError
from bitalloc.io import write_json
from bitalloc.report.tables import print_table

HEIGHT, WIDTH, FPS = 144, 176, 25.0


def weight_paths(static: str | None, dynamic: str | None) -> tuple[Path, Path]:
    """The two weight files the part reads (the shipped ones by default); ConfigError naming a missing one."""
    from bitalloc.codec.weights import default_weights_path

    out = []
    for given, is_dynamic, option, stage in ((static, False, "--codec-weights", "qat"),
                                             (dynamic, True, "--dynamic-weights", "dynamic")):
        path = Path(given) if given else default_weights_path(dynamic=is_dynamic)
        if not path.is_file():
            origin = "given" if given else "shipped"
            raise ConfigError(f"part codec needs the {origin} {'dynamic-precision ' if is_dynamic else '8-bit '}codec "
                              f"weights {path}, which do not exist; pass {option} FILE (written by `bitalloc codec "
                              f"train --stage {stage} --ship FILE`) or run the other parts (--part ptq --part budget)")
        out.append(path)
    return out[0], out[1]


def synthetic_clip(frames: int = 16, height: int = HEIGHT, width: int = WIDTH, *, seed: int = 0,
                   fps: float = FPS) -> Any:
    """A clip of textured shapes moving over a drifting colour gradient (RGB, converted to YUV 4:2:0 with
    :func:`bitalloc.codec.frames.rgb_to_yuv420`): a checkered disc moving right, a striped square moving left and
    down, a ringed ellipse moving up; Gaussian noise (sigma 1.5). Deterministic for a seed."""
    from bitalloc.codec.frames import rgb_to_yuv420

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    rgb = np.empty((frames, height, width, 3))
    for t in range(frames):
        g = np.clip((xx + 0.6 * yy + 1.5 * t) / (width + 0.6 * height), 0, 1)
        img = np.stack([50 + 130 * g, 80 + 70 * (1 - g), 170 - 90 * g], axis=-1)
        cx, cy = 0.2 * width + 3.0 * t, 0.35 * height + 6 * np.sin(t / 3)  # disc, checkerboard texture
        dx, dy = xx - cx, yy - cy
        inside = dx ** 2 + dy ** 2 < (0.13 * width) ** 2
        checker = (np.floor(dx / 4) + np.floor(dy / 4)) % 2
        img[inside] = np.array([230, 200, 40]) * (0.55 + 0.45 * checker[inside, None])
        sx, sy = 0.75 * width - 2.5 * t, 0.25 * height + 2.0 * t  # square, diagonal stripes
        dx, dy = xx - sx, yy - sy
        inside = (np.abs(dx) < 0.09 * width) & (np.abs(dy) < 0.09 * width)
        stripes = 0.5 + 0.5 * np.sin((dx + dy) / 1.7)
        img[inside] = np.array([40, 60, 200]) + np.array([180, 160, 40]) * stripes[inside, None]
        ex, ey = 0.5 * width, 0.8 * height - 2.0 * t  # ellipse, concentric rings
        dx, dy = (xx - ex) / 1.6, yy - ey
        r = np.sqrt(dx ** 2 + dy ** 2)
        inside = r < 0.08 * width
        img[inside] = np.array([200, 60, 60]) * (0.6 + 0.4 * np.cos(r[inside, None] * 1.3))
        rgb[t] = img
    rgb += rng.normal(0, 1.5, rgb.shape)
    return rgb_to_yuv420(np.clip(np.round(rgb), 0, 255).astype(np.uint8), fps=fps)


def _masks(stream: bytes) -> list[np.ndarray]:
    """The latent-resolution ROI mask of every frame of a dynamic-precision stream, decoded as the decoder does
    (each frame's payload starts with it)."""
    from bitalloc.codec.bitstream import read_stream
    from bitalloc.codec.bitstream import FRAME_I
    from bitalloc.codec.codec import _constriction, padded_size
    from bitalloc.codec.dynamic import MASK_FACTOR, decode_mask, mask_context

    header, records = read_stream(stream, source="demo stream")
    hp, wp = padded_size(header.height, header.width)
    queue = _constriction().stream.queue
    masks: list[np.ndarray] = []
    for r in records:
        prev = mask_context(masks[-1] if masks else None, intra=r.kind == FRAME_I, version=header.version)
        masks.append(decode_mask(queue.RangeDecoder(np.frombuffer(r.payload, dtype=np.uint32).copy()),
                                 (hp // MASK_FACTOR, wp // MASK_FACTOR), prev))
    return masks


def _code(name: str, path: Path, clip: Any, quality: int | None, dynamic: bool,
          as_float: bool = False) -> tuple[dict[str, Any], Any, Any]:
    """Encode and decode ``clip`` with the codec in ``path`` (``as_float``: its weights in float networks, the
    FP32 codec); returns the row of numbers, the coder, the result."""
    from bitalloc.codec import VideoCoder
    from bitalloc.codec.metrics import bits_per_pixel, kbps, psnr_yuv
    from bitalloc.codec.precision import float_codec, load_codec

    model = load_codec(path)
    if bool(model.cfg.candidates) != dynamic:
        option = "--dynamic-weights" if dynamic else "--codec-weights"
        what = "dynamic-precision" if dynamic else "fixed-precision (8-bit)"
        raise ConfigError(f"{path} is not a {what} codec; pass {option} with the weights of "
                          f"`bitalloc codec train --stage {'dynamic' if dynamic else 'qat'} --ship FILE`")
    coder = VideoCoder(float_codec(model), exact=False) if as_float else VideoCoder(model)
    levels = model.cfg.levels
    level = levels // 2 if quality is None else quality
    print(f"codec: {name}, quality {level} of 0..{levels - 1}: encoding {len(clip)} frames ...", file=sys.stderr)
    res = coder.compress(clip, quality=level, intra_period=-1)
    t0 = time.perf_counter()
    decoded = coder.decompress(res.stream)
    decode_seconds = time.perf_counter() - t0
    n, h, w = len(clip), clip.height, clip.width
    row = {"codec": name, "weights": str(path), "quality": level, "bytes": res.bytes,
           "kbps": kbps(res.bytes, n, clip.fps), "bpp": bits_per_pixel(res.bytes, n, h, w),
           "psnr_yuv": psnr_yuv(clip, decoded)["psnr_yuv"], "exact": bool(decoded.equal(res.reconstruction)),
           "encode_seconds": res.encode_seconds, "decode_seconds": decode_seconds,
           "frames": [{"index": f.index, "type": f.kind, "bytes": f.bytes, "psnr_yuv": f.psnr,
                       "roi_bits": f.roi_bits, "non_roi_bits": f.non_roi_bits} for f in res.frames]}
    return row, coder, (res, decoded)


def bit_flops(model: Any, kinds: list[str], masks: np.ndarray, roi_bits: list[int], non_roi_bits: list[int]) -> list[float]:
    """Bit-FLOPs (SPEC convention: float MACs + BOPs / 64) of each coded frame: the sum over every network its
    type runs (intra coder for I frames, motion and residual coders for P frames; analysis, hyper analysis,
    hyper synthesis, synthesis) of :func:`bitalloc.codec.cost.region_cost` with the frame's ROI mask (``masks``:
    bool [T, H, W] at padded luma resolution) and widths. A codec without region quantizers is costed at its own
    widths."""
    from bitalloc.codec.cost import region_cost
    from bitalloc.codec.precision import ALL_PARTS, coders, network_input

    height, width = masks.shape[1:]
    total = np.zeros(len(kinds))
    for name, coder in coders(model).items():
        frames = [t for t, k in enumerate(kinds) if (k == "I") == (name == "intra")]
        if not frames:
            continue
        for part in ALL_PARTS:
            costs = region_cost(getattr(coder, part), network_input(coder, part, height, width), masks[frames],
                                [roi_bits[t] for t in frames], [non_roi_bits[t] for t in frames])
            for t, cost in zip(frames, costs):
                total[t] += cost.total.bit_flops
    return total.tolist()


def part_codec(out: Path, static_path: Path, dynamic_path: Path, *, frames: int = 16,
               quality: int | None = None) -> dict[str, Any]:
    """Code a synthesized clip with both codecs; table, ``codec.json``, ``codec_frame.png``; returns the summary."""
    from bitalloc.codec.dynamic import MASK_FACTOR
    from bitalloc.codec.frames import yuv420_to_rgb

    clip = synthetic_clip(frames)
    fp32, f_coder, _ = _code("FP32 (same weights)", static_path, clip, quality, dynamic=False, as_float=True)
    static, s_coder, _ = _code("8-bit", static_path, clip, quality, dynamic=False)
    dyn, d_coder, (d_res, d_decoded) = _code("dynamic precision", dynamic_path, clip, quality, dynamic=True)
    kinds = [f["type"] for f in dyn["frames"]]
    masks = _masks(d_res.stream)
    luma = np.stack([np.kron(m, np.ones((MASK_FACTOR, MASK_FACTOR), dtype=bool)) for m in masks])
    widths = [(f["roi_bits"], f["non_roi_bits"]) for f in dyn["frames"]]
    t0 = time.perf_counter()
    s_flops = bit_flops(s_coder.model, kinds, luma, [s_coder.bits] * frames, [s_coder.bits] * frames)
    f_flops = bit_flops(f_coder.model, kinds, luma, [32] * frames, [32] * frames)
    d_flops = bit_flops(d_coder.model, kinds, luma, [w[0] for w in widths], [w[1] for w in widths])
    d_at8 = bit_flops(d_coder.model, kinds, luma, [8] * frames, [8] * frames)
    print(f"codec: Bit-FLOPs counted in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for row, flops in ((fp32, f_flops), (static, s_flops), (dyn, d_flops)):
        row["bit_flops_per_frame"] = float(np.mean(flops))
        row["relative_to_8bit_codec"] = float(np.mean(flops) / np.mean(s_flops))
        for f, v in zip(row["frames"], flops):
            f["bit_flops"] = v
    dyn["relative_to_itself_at_8bit"] = float(np.mean(d_flops) / np.mean(d_at8))
    for f, m in zip(dyn["frames"], masks):
        f["roi_fraction"] = float(m.mean())
    counts: dict[str, int] = {}
    for rb, nb in widths:
        counts[f"{rb}/{nb}"] = counts.get(f"{rb}/{nb}", 0) + 1
    dyn["widths"] = counts
    static["widths"] = {f"{s_coder.bits}/{s_coder.bits}": frames}
    fp32["widths"] = {"32/32": frames}
    rows = [[r["codec"], r["kbps"], r["bpp"], r["psnr_yuv"], "yes" if r["exact"] else "NO",
             ", ".join(f"{k} x{v}" for k, v in r["widths"].items()), r["bit_flops_per_frame"] / 1e9,
             100 * r["relative_to_8bit_codec"]] for r in (fp32, static, dyn)]
    print_table(f"Learned video codec: a synthesized {clip.width}x{clip.height} clip, {frames} frames at {FPS:g} fps "
                f"(one I frame, then P frames)",
                ["codec", "kbps", "bpp", "PSNR-YUV dB", "exact decode", "widths ROI/rest x frames",
                 "GBit-FLOPs/frame", "vs 8-bit %"], rows)
    print_table("Dynamic precision per frame (widths and ROI share as the stream signals them)",
                ["frame", "type", "ROI bits", "rest bits", "ROI share %", "bytes", "PSNR-YUV dB", "GBit-FLOPs"],
                [[f["index"], f["type"], f["roi_bits"], f["non_roi_bits"], 100 * f["roi_fraction"], f["bytes"],
                  f["psnr_yuv"], f["bit_flops"] / 1e9] for f in dyn["frames"]])
    exact = "both decode exactly" if static["exact"] and dyn["exact"] else "a decode DIFFERS from the encoder's"
    sentence = (f"Codec: on a synthesized {clip.width}x{clip.height} clip the dynamic-precision codec spends "
                f"{100 * dyn['relative_to_8bit_codec']:.0f}% of the 8-bit codec's Bit-FLOPs per frame "
                f"(ROI/rest widths {', '.join(counts)}) at {dyn['kbps']:.0f} kbps and {dyn['psnr_yuv']:.1f} dB "
                f"against {static['kbps']:.0f} kbps and {static['psnr_yuv']:.1f} dB (FP32: {fp32['kbps']:.0f} kbps, "
                f"{fp32['psnr_yuv']:.1f} dB), and {exact}.")
    summary = {"sentence": sentence, "clip": {"frames": frames, "width": clip.width, "height": clip.height,
                                              "fps": FPS, "source": "synthesized (bitalloc.cli.demo_codec)"},
               "bit_flops": "SPEC convention: float MACs + BOPs / 64, every network of the frame's type",
               "fp32": "the 8-bit codec's weights in float networks (bitalloc.codec.precision.float_codec); its "
                       "stream decodes exactly only in the same process",
               "codecs": [fp32, static, dyn]}
    write_json(out / "codec.json", summary)
    paths = [out / "codec.json"]
    from bitalloc.cli.demo import _plot
    from bitalloc.report.plots import roi_frames

    shown = frames // 2
    _plot(paths, lambda: roi_frames(
        [yuv420_to_rgb(clip[shown])[0], yuv420_to_rgb(d_decoded[shown])[0]],
        [None, luma[shown, :clip.height, :clip.width]],
        [f"source frame {shown}", f"decoded, dynamic precision: ROI {widths[shown][0]} bits, rest "
                                  f"{widths[shown][1]} bits ({dyn['frames'][shown]['psnr_yuv']:.1f} dB)"],
        out / "codec_frame.png"))
    summary["files"] = [str(p) for p in paths]
    return summary
