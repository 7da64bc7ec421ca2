"""Standard-codec anchors: HEVC (x265 through PyAV's bundled libx265), x265 intra, and JPEG (Pillow).

**The HEVC anchor** (SPEC section 3, "The HEVC anchor, fairly"): libx265, 8-bit ``yuv420p``, constant QP,
``tune=zerolatency`` (no look-ahead, no scene cuts: key frames exactly every K frames, no B frames),
x265-params ``keyint=K:min-keyint=K`` (K = the intra period; intra period -1 gives ``keyint=-1``, a single
intra frame), ``bframes=0``, ``info=0`` (x265 otherwise writes a ~2.3 kB version/options SEI at every key
frame, a rate the codec under test is not charged), ``pools=2`` (2 threads; the stream does not depend on it),
``qp=QP`` and ``log-level=error`` (silences x265's report on stderr; no effect on the stream). The encoder runs
in a bare codec context (no container), so the rate is the byte count of the raw Annex-B HEVC stream: every
packet, with the parameter sets FFmpeg's libx265 wrapper repeats at each key frame (as ``ffmpeg -f hevc``
writes it). The stream is then split by FFmpeg's HEVC parser and decoded by its HEVC decoder; PSNR compares the
decoded frames with the source. Frames with an odd width or height are padded to even by replicating the last
row / column (4:2:0 HEVC needs even sizes) and cropped back after decoding; rate counts the padded stream.

**Timing**: ``time.perf_counter`` around the encode calls (frames already converted, encoder already opened)
and around the parse + decode calls (decoder already opened): frames per second of the codec itself.

**JPEG anchor**: Pillow (libjpeg), baseline, 4:2:0 chroma sub-sampling by default, optimized Huffman tables
(``optimize=True``: the stronger anchor), one JPEG file per frame; rate = the bytes of the JPEG files. Pillow
converts RGB to YCbCr itself (JFIF full range); the source RGB is the input image, or the documented conversion
(:func:`~bitalloc.codec.frames.yuv420_to_rgb`) of YUV input. PSNR on RGB against the source RGB, and on YUV
4:2:0 after converting the decoded RGB by :func:`~bitalloc.codec.frames.rgb_to_yuv420`.

Every result records the exact parameters, library versions and an equivalent FFmpeg command line, so that
BENCHMARKS.md can print how to reproduce it.
"""

from __future__ import annotations

import functools
import io
import re
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from bitalloc.errors import ConfigError

from .frames import YUVFrames, check_rgb, rgb_to_yuv420, yuv420_to_rgb
from .metrics import bits_per_pixel, kbps, psnr_rgb, psnr_yuv
from .video_io import _av, _pil, _rate, av_frame, av_frames_to_yuv

X265_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                "placebo")
ANCHOR_QPS = (22, 27, 32, 37)
JPEG_QUALITIES = (10, 25, 50, 75, 90)
JPEG_SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


@dataclass
class AnchorResult:
    """One rate-distortion point of an anchor codec on some frames.

    ``num_bytes`` (the whole stream / all JPEG files), ``frame_bytes`` (per coded frame: HEVC packets in coding
    order, or JPEG files), ``bpp`` (bits per luma pixel), ``kbps`` (at the frames' rate), ``psnr`` (the dict of
    :func:`~bitalloc.codec.metrics.psnr_yuv`), ``psnr_rgb`` (of :func:`~bitalloc.codec.metrics.psnr_rgb`),
    ``encode_fps`` / ``decode_fps`` (measured), ``keyframes`` (indices of the frames decoded as key frames),
    ``params`` (every setting, library versions), ``command`` (an equivalent FFmpeg command line), ``stream``
    (the coded bytes: the raw HEVC stream, or the JPEG files one after the other) and ``decoded`` (the decoded
    frames).
    """

    codec: str
    params: dict[str, Any]
    command: str
    frames: int
    width: int
    height: int
    fps: float
    num_bytes: int
    frame_bytes: list[int]
    bpp: float
    kbps: float
    psnr: dict[str, Any]
    psnr_rgb: dict[str, Any]
    encode_fps: float
    decode_fps: float
    keyframes: list[int]
    stream: bytes = field(repr=False)
    decoded: YUVFrames = field(repr=False)

    def to_dict(self, *, per_frame: bool = False) -> dict[str, Any]:
        """Everything but ``stream`` and ``decoded`` as JSON-ready values (per-frame PSNR lists only when
        ``per_frame``)."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("stream", "decoded")}
        if not per_frame:
            out["psnr"] = {k: v for k, v in self.psnr.items() if k != "per_frame"}
            out["psnr_rgb"] = {k: v for k, v in self.psnr_rgb.items() if k != "per_frame"}
        return out


def _source(frames: YUVFrames | np.ndarray) -> tuple[YUVFrames, np.ndarray]:
    """(YUV frames, source RGB): RGB input is converted to YUV; YUV input to RGB, both by the documented
    conversion."""
    if isinstance(frames, YUVFrames):
        if len(frames) == 0:
            raise ConfigError("no frames to encode; pass at least one frame.")
        return frames, yuv420_to_rgb(frames)
    rgb = check_rgb(frames)
    return rgb_to_yuv420(rgb), rgb


@functools.lru_cache(maxsize=1)
def x265_version() -> str:
    """The version of PyAV's bundled libx265 (from the SEI record x265 writes with ``info=1``), e.g.
    ``4.2+1-e444744``; ``unknown`` if it cannot be found."""
    frames = YUVFrames(np.zeros((1, 64, 64), np.uint8), np.zeros((1, 32, 32), np.uint8),
                       np.zeros((1, 32, 32), np.uint8))
    ctx = _x265_context(frames, "ultrafast", "keyint=1:info=1:pools=1:qp=51:log-level=error", "zerolatency")
    data = b"".join(bytes(p) for p in ctx.encode(av_frame(frames, 0)) + ctx.encode(None))
    match = re.search(rb"x265 \(build \d+\) - ([^:\s]+)", data)
    return match.group(1).decode("ascii", "replace") if match else "unknown"


def _x265_context(frames: YUVFrames, preset: str, params: str, tune: str | None) -> Any:
    av = _av()
    ctx = av.CodecContext.create("libx265", "w")
    ctx.width, ctx.height, ctx.pix_fmt = frames.width, frames.height, "yuv420p"
    ctx.time_base = 1 / _rate(frames.fps)
    ctx.framerate = _rate(frames.fps)
    options = {"preset": preset, "x265-params": params}
    if tune:
        options["tune"] = tune
    ctx.options = options
    ctx.open()
    return ctx


def x265_params(qp: int, intra_period: int, pools: int = 2) -> str:
    """The x265-params string of the anchor: ``keyint=K:min-keyint=K:bframes=0:info=0:pools=P:qp=QP:
    log-level=error`` (``keyint=-1`` for intra period -1)."""
    keyint = "keyint=-1" if intra_period == -1 else f"keyint={intra_period}:min-keyint={intra_period}"
    return f"{keyint}:bframes=0:info=0:pools={pools}:qp={qp}:log-level=error"


def _decode_hevc(stream: bytes, threads: int) -> tuple[list[Any], float]:
    """Parse and decode a raw HEVC stream; (frames, seconds spent in parse + decode)."""
    av = _av()
    ctx = av.CodecContext.create("hevc", "r")
    ctx.thread_count = threads
    ctx.open()
    out: list[Any] = []
    start = time.perf_counter()
    for packet in ctx.parse(stream) + ctx.parse(None):
        out.extend(ctx.decode(packet))
    out.extend(ctx.decode(None))
    return out, time.perf_counter() - start


def _ffmpeg_command(frames: int, preset: str, tune: str | None, params: str) -> str:
    tune_opt = f" -tune {tune}" if tune else ""
    return (f"ffmpeg -i INPUT -frames:v {frames} -pix_fmt yuv420p -c:v libx265 -preset {preset}{tune_opt} "
            f"-x265-params {params} -f hevc OUT.hevc")


def _versions() -> dict[str, str]:
    av = _av()
    return {"pyav": av.__version__, "libavcodec": ".".join(map(str, av.library_versions["libavcodec"]))}


def _result(codec: str, params: dict[str, Any], command: str, src: YUVFrames, src_rgb: np.ndarray, dec: YUVFrames,
            dec_rgb: np.ndarray | None, frame_bytes: list[int], stream: bytes, enc_s: float, dec_s: float,
            keyframes: list[int]) -> AnchorResult:
    n = len(src)
    total = sum(frame_bytes)
    return AnchorResult(
        codec=codec, params=params, command=command, frames=n, width=src.width, height=src.height, fps=src.fps,
        num_bytes=total, frame_bytes=frame_bytes, bpp=bits_per_pixel(total, n, src.height, src.width),
        kbps=kbps(total, n, src.fps), psnr=psnr_yuv(src, dec),
        psnr_rgb=psnr_rgb(src_rgb, dec if dec_rgb is None else dec_rgb),
        encode_fps=n / max(enc_s, 1e-9), decode_fps=n / max(dec_s, 1e-9), keyframes=keyframes, stream=stream,
        decoded=dec)


def x265_encode(frames: YUVFrames | np.ndarray, qp: int, preset: str = "medium", intra_period: int = 32, *,
                tune: str | None = "zerolatency", pools: int = 2, decode_threads: int = 1) -> AnchorResult:
    """Encode ``frames`` (YUV 4:2:0, or RGB uint8 [T, H, W, 3] converted by the documented conversion) with
    x265 at constant ``qp`` as the SPEC's HEVC anchor (module docstring), decode the raw stream again, and
    measure rate, PSNR and speed.

    ``intra_period``: K >= 1 (a key frame every K frames; 1 = all intra) or -1 (one intra frame). ``pools``:
    x265 worker threads. ``decode_threads``: threads of FFmpeg's HEVC decoder.
    """
    if not (isinstance(qp, (int, np.integer)) and 0 <= qp <= 51):
        raise ConfigError(f"qp={qp!r} must be an integer between 0 and 51 (the anchor uses 22, 27, 32, 37).")
    if preset not in X265_PRESETS:
        raise ConfigError(f"x265 preset {preset!r} is unknown; choose one of {', '.join(X265_PRESETS)}.")
    if not (isinstance(intra_period, (int, np.integer)) and (intra_period == -1 or intra_period >= 1)):
        raise ConfigError(f"intra_period={intra_period!r} must be -1 (one intra frame) or an integer >= 1.")
    if pools < 1 or decode_threads < 1:
        raise ConfigError(f"pools={pools} and decode_threads={decode_threads} must be >= 1.")
    src, src_rgb = _source(frames)
    coded = src.pad(src.height + src.height % 2, src.width + src.width % 2)
    params_str = x265_params(int(qp), int(intra_period), pools)
    ctx = _x265_context(coded, preset, params_str, tune)
    inputs = [av_frame(coded, t) for t in range(len(coded))]
    start = time.perf_counter()
    packets = [p for f in inputs for p in ctx.encode(f)]
    packets += ctx.encode(None)
    enc_s = time.perf_counter() - start
    frame_bytes = [p.size for p in packets]
    stream = b"".join(bytes(p) for p in packets)
    decoded, dec_s = _decode_hevc(stream, decode_threads)
    if len(decoded) != len(src):
        raise RuntimeError(f"x265 stream of {len(src)} frames decoded to {len(decoded)} frames")
    dec = av_frames_to_yuv(decoded, src.fps, src.chroma_siting).crop(src.height, src.width)
    params = {"encoder": "libx265", "x265_version": x265_version(), **_versions(), "preset": preset, "tune": tune,
              "qp": int(qp), "intra_period": int(intra_period), "x265_params": params_str, "pix_fmt": "yuv420p",
              "decoder": "hevc", "decode_threads": decode_threads,
              "padded_to": [coded.height, coded.width] if coded.y.shape != src.y.shape else None}
    return _result("x265-intra" if intra_period == 1 else "x265", params,
                   _ffmpeg_command(len(src), preset, tune, params_str), src, src_rgb, dec, None, frame_bytes, stream,
                   enc_s, dec_s, [i for i, f in enumerate(decoded) if f.key_frame])


def x265_intra(frames: YUVFrames | np.ndarray, qp: int, preset: str = "medium", **kwargs: Any) -> AnchorResult:
    """x265 intra-only (``keyint=1``, every frame an IDR picture): the HEVC still-image anchor. Same settings
    as :func:`x265_encode` otherwise."""
    return x265_encode(frames, qp, preset, intra_period=1, **kwargs)


def x265_curve(frames: YUVFrames | np.ndarray, qps: Sequence[int] = ANCHOR_QPS, preset: str = "medium",
               intra_period: int = 32, **kwargs: Any) -> list[AnchorResult]:
    """:func:`x265_encode` at each QP of ``qps`` (default 22, 27, 32, 37)."""
    return [x265_encode(frames, qp, preset, intra_period, **kwargs) for qp in qps]


def jpeg_encode(frames: YUVFrames | np.ndarray, quality: int, subsampling: str = "4:2:0", *,
                optimize: bool = True) -> AnchorResult:
    """Encode each frame (RGB uint8 [T, H, W, 3] / [H, W, 3], or YUV converted to RGB by the documented
    conversion) as a JPEG file with Pillow at ``quality`` (1-95), decode it again, and measure rate (bytes of
    the JPEG files), PSNR on RGB and on YUV 4:2:0, and speed (module docstring)."""
    Image = _pil()
    if not (isinstance(quality, (int, np.integer)) and 1 <= quality <= 95):
        raise ConfigError(f"JPEG quality={quality!r} must be an integer between 1 and 95.")
    if subsampling not in JPEG_SUBSAMPLING:
        raise ConfigError(f"JPEG subsampling {subsampling!r} is unknown; choose one of {', '.join(JPEG_SUBSAMPLING)}.")
    src, src_rgb = _source(frames)
    images = [Image.fromarray(np.ascontiguousarray(im)) for im in src_rgb]
    files: list[bytes] = []
    start = time.perf_counter()
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(quality), subsampling=JPEG_SUBSAMPLING[subsampling],
                optimize=optimize)
        files.append(buf.getvalue())
    enc_s = time.perf_counter() - start
    start = time.perf_counter()
    dec_rgb = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in files])
    dec_s = time.perf_counter() - start
    from PIL import __version__ as pil_version

    params = {"encoder": "Pillow JPEG", "pillow": pil_version, "quality": int(quality), "subsampling": subsampling,
              "optimize": optimize, "progressive": False}
    command = (f"Image.fromarray(rgb).save(f, format='JPEG', quality={int(quality)}, "
               f"subsampling={JPEG_SUBSAMPLING[subsampling]}, optimize={optimize})")
    return _result("jpeg", params, command, src, src_rgb, rgb_to_yuv420(dec_rgb, fps=src.fps), dec_rgb,
                   [len(b) for b in files], b"".join(files), enc_s, dec_s, list(range(len(files))))


def jpeg_curve(frames: YUVFrames | np.ndarray, qualities: Sequence[int] = JPEG_QUALITIES,
               subsampling: str = "4:2:0", **kwargs: Any) -> list[AnchorResult]:
    """:func:`jpeg_encode` at each quality of ``qualities`` (default 10, 25, 50, 75, 90)."""
    return [jpeg_encode(frames, q, subsampling, **kwargs) for q in qualities]
