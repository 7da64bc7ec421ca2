"""Reading and writing video as :class:`~bitalloc.codec.frames.YUVFrames` (PyAV / FFmpeg, Pillow).

Readers: anything FFmpeg demuxes and decodes through PyAV (``.mp4``, ``.mov``, ``.mkv``, ``.webm``, ``.avi``,
``.y4m``, raw ``.hevc`` / ``.h264`` streams, ...), a folder of PNG frames (read in natural order: ``f2.png``
before ``f10.png``) and a single image (PNG, JPEG, BMP, PPM, TIFF, WebP). Frames that FFmpeg decodes to
``yuv420p`` (limited range) are taken plane by plane, with no conversion; everything else (RGB images, 4:2:2 /
4:4:4 / full-range / high-bit-depth video) is decoded to 8-bit RGB and converted by the documented BT.601
limited-range conversion of :mod:`bitalloc.codec.frames`. Any frame size, odd ones included.

Writers (each atomic: a temporary file in the target folder, checked, then ``os.replace``): Y4M (``yuv420p``,
bit-exact), PNG frames (RGB by the documented conversion), and lossless FFV1 in Matroska (bit-exact; the
written file is decoded again and compared before it replaces anything).

Bad input (a missing path, an unreadable or corrupt file, no frames, an unsupported extension) raises
:class:`~bitalloc.errors.DataError` with one line naming the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from bitalloc.errors import ConfigError, DataError
from bitalloc.io import atomic_path

from .frames import YUVFrames, chroma_shape, rgb_to_yuv420, yuv420_to_rgb

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".y4m", ".mpg", ".mpeg", ".ts",
                              ".m2ts", ".flv", ".ogv", ".wmv", ".3gp", ".hevc", ".h265", ".265", ".h264", ".264",
                              ".ivf", ".nut"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".pnm", ".tif", ".tiff", ".webp"})
DEFAULT_IMAGE_FPS = 25.0
# codecs whose standard puts 4:2:0 chroma on the left of each 2x2 block when the stream does not say
# (H.264 / HEVC VUI chroma_sample_loc_type 0, MPEG-2): only used to label Y4M output (C420mpeg2 vs C420jpeg)
_LEFT_SITED_CODECS = frozenset({"h264", "hevc", "mpeg2video", "vvc"})
_Y4M_SITING = {"center": "420jpeg", "left": "420mpeg2"}
_PNG_NAME = "frame_{:06d}.png"


@dataclasses.dataclass
class VideoInfo:
    """What :func:`probe_video` reports. ``frames`` counts the non-empty packets of the video stream (no
    decoding; container headers can be wrong); ``codec`` is FFmpeg's decoder name (``png`` / ``jpeg`` / ... for
    images)."""

    path: str
    frames: int
    width: int
    height: int
    fps: float
    pix_fmt: str
    codec: str


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise ConfigError("video input/output needs PyAV: pip install 'bitalloc[codec]'") from None
    return av


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("image input/output needs Pillow: pip install 'bitalloc[codec]'") from None
    return Image


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _png_files(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png"),
                   key=lambda p: _natural_key(p.name))
    if not files:
        raise DataError(f"{folder} holds no PNG frames; give a folder of .png files, a video file or an image.")
    return files


def _kind(path: Path) -> str:
    """'folder', 'image' or 'video' (DataError for a missing path or an unsupported extension)."""
    if not path.exists():
        raise DataError(f"{path} does not exist; give an existing video file, image or folder of PNG frames.")
    if path.is_dir():
        return "folder"
    ext = path.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    if ext == ".yuv":
        raise DataError(f"{path}: raw .yuv has no header (size, frame rate); wrap it in Y4M first "
                        f"(ffmpeg -s WxH -r FPS -pix_fmt yuv420p -i {path.name} out.y4m).")
    raise DataError(f"{path}: unsupported extension {ext or '(none)'!r}; give a video "
                    f"({', '.join(sorted(VIDEO_EXTENSIONS))}), an image ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                    f"or a folder of PNG frames.")


def _y4m_frame_bytes(header: bytes) -> int | None:
    """Bytes of one frame's samples from a Y4M stream header (None for a chroma format not handled here)."""
    fields = {t[:1]: t[1:] for t in header.split()[1:]}
    try:
        w, h = int(fields[b"W"]), int(fields[b"H"])
    except (KeyError, ValueError):
        return None
    c = fields.get(b"C", b"420jpeg").decode("ascii", "replace")
    depth = re.search(r"p(\d+)$", c)
    sample = 2 if depth and int(depth.group(1)) > 8 else 1
    cw, ch = (w + 1) // 2, (h + 1) // 2
    chroma = {"420": 2 * cw * ch, "422": 2 * cw * h, "444": 2 * w * h, "mono": 0}
    for prefix, size in chroma.items():
        if c.startswith(prefix):
            return sample * (w * h + size)
    return None


def _check_y4m(path: Path) -> None:
    """A Y4M file must hold whole frames: FFmpeg silently drops a truncated last frame; this names it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.readline(4096)
        frame_bytes = _y4m_frame_bytes(header)
        if not header.startswith(b"YUV4MPEG2 ") or frame_bytes is None:
            return  # FFmpeg's reader judges it
        index = 0
        while f.tell() < size:
            line = f.readline(4096)
            if not (line.startswith(b"FRAME") and line.endswith(b"\n")):
                raise DataError(f"{path}: frame {index} has no FRAME header; the Y4M file is corrupt: re-create it.")
            if f.tell() + frame_bytes > size:
                raise DataError(f"{path}: frame {index} is truncated ({size - f.tell()} of {frame_bytes} bytes); "
                                f"the file was cut short: re-create it.")
            f.seek(frame_bytes, os.SEEK_CUR)
            index += 1


def _open_container(path: Path) -> Any:
    av = _av()
    if path.suffix.lower() == ".y4m":
        _check_y4m(path)
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable video ({_reason(exc)}); check the file or re-encode it "
                        f"(e.g. ffmpeg -i {path.name} out.mkv).") from None
    if not container.streams.video:
        container.close()
        raise DataError(f"{path} has no video stream; give a file with video in it.")
    return container


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:160]


def _stream_fps(stream: Any) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return DEFAULT_IMAGE_FPS


def _y4m_siting(path: Path) -> str | None:
    """The chroma siting a Y4M header states ('center' for C420jpeg / C420, 'left' for C420mpeg2), or None."""
    with open(path, "rb") as f:
        header = f.readline(4096)
    for token in header.split()[1:]:
        if token.startswith(b"C"):
            return "left" if token[1:].lower() == b"420mpeg2" else "center"
    return None


def plane_arrays(frame: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Y, U, V planes of a PyAV ``yuv420p`` VideoFrame as uint8 arrays [H, W], [(H+1)//2, (W+1)//2] (copies,
    without the row padding FFmpeg allocates)."""
    h, w = frame.height, frame.width
    ch, cw = chroma_shape(h, w)
    out = []
    for plane, (ph, pw) in zip(frame.planes, ((h, w), (ch, cw), (ch, cw))):
        rows = np.frombuffer(plane, dtype=np.uint8)[: ph * plane.line_size].reshape(ph, plane.line_size)
        out.append(rows[:, :pw].copy())
    return out[0], out[1], out[2]


def av_frame(frames: YUVFrames, index: int) -> Any:
    """Frame ``index`` of ``frames`` as a PyAV ``yuv420p`` VideoFrame (limited range, ``pts`` = index)."""
    av = _av()
    frame = av.VideoFrame(frames.width, frames.height, "yuv420p")
    for plane, src in zip(frame.planes, frames.planes):
        rows = np.zeros((src.shape[1], plane.line_size), dtype=np.uint8)
        rows[:, : src.shape[2]] = src[index]
        plane.update(rows)
    frame.pts = index
    frame.color_range = 1  # MPEG (limited)
    return frame


def _frame_planes(frame: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One decoded frame as (y, u, v): ``yuv420p`` limited range as it is, anything else by 8-bit RGB and
    :func:`~bitalloc.codec.frames.rgb_to_yuv420`."""
    if frame.format.name == "yuv420p" and frame.color_range != 2:  # 2 = JPEG (full) range
        return plane_arrays(frame)
    f = rgb_to_yuv420(frame.to_ndarray(format="rgb24")[None])
    return f.y[0], f.u[0], f.v[0]


def _stack(planes: list[tuple[np.ndarray, np.ndarray, np.ndarray]], fps: float, siting: str) -> YUVFrames:
    return YUVFrames(*(np.stack([p[i] for p in planes]) for i in range(3)), fps=fps, chroma_siting=siting)


def av_frames_to_yuv(decoded: list[Any], fps: float, siting: str = "center") -> YUVFrames:
    """PyAV VideoFrames -> :class:`YUVFrames`: ``yuv420p`` limited-range frames plane by plane, any other
    format through 8-bit RGB and :func:`~bitalloc.codec.frames.rgb_to_yuv420`."""
    if not decoded:
        raise DataError("no frames decoded")
    return _stack([_frame_planes(f) for f in decoded], fps, siting)


def _check_range(frames: int | None, start: int) -> None:
    if frames is not None and (int(frames) != frames or frames < 1):
        raise ConfigError(f"frames={frames!r} must be a positive integer (or None for all frames).")
    if int(start) != start or start < 0:
        raise ConfigError(f"start={start!r} must be a frame index >= 0.")


def _no_frames(path: Path, start: int, total: int) -> DataError:
    if total == 0:
        return DataError(f"{path} holds no decodable frames; check the file or re-encode it.")
    return DataError(f"{path} has {total} frames, none from start={start}; choose a start below {total}.")


def _decode_video(path: Path, frames: int | None, start: int) -> tuple[YUVFrames, str]:
    """Frames ``start`` .. of a video file (each converted as it is decoded), and the decoder's name."""
    av = _av()
    container = _open_container(path)
    planes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    seen = 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps, codec = _stream_fps(stream), stream.codec_context.name
        for frame in container.decode(stream):
            if seen >= start:
                planes.append(_frame_planes(frame))
            seen += 1
            if frames is not None and len(planes) >= frames:
                break
    except (av.FFmpegError, OSError) as exc:
        raise DataError(f"{path}: decoding failed at frame {seen} ({_reason(exc)}); the file is corrupt or "
                        f"truncated: re-encode or re-download it.") from None
    finally:
        container.close()
    if not planes:
        raise _no_frames(path, start, seen)
    siting = (_y4m_siting(path) if path.suffix.lower() == ".y4m" else None) or \
        ("left" if codec in _LEFT_SITED_CODECS else "center")
    return _stack(planes, fps, siting), codec


def _load_image(path: Path) -> np.ndarray:
    Image = _pil()
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path} is not a readable image ({_reason(exc)}); check or re-save the file.") from None


def read_video(path: str | os.PathLike, frames: int | None = None, start: int = 0, *,
               fps: float | None = None) -> YUVFrames:
    """Frames ``start`` .. ``start + frames - 1`` (all from ``start`` when ``frames`` is None) of a video file,
    a folder of PNG frames or an image, as :class:`YUVFrames`.

    ``yuv420p`` sources are copied plane by plane (bit-exact); others go through 8-bit RGB and the documented
    BT.601 limited-range conversion. ``fps`` overrides the frame rate (images and PNG folders default to
    25). Y4M inputs keep the chroma siting of their header; H.264 / HEVC / MPEG-2 sources are marked
    ``left``-sited (their standard's default), everything else ``center``-sited.
    """
    _check_range(frames, start)
    p = Path(path)
    kind = _kind(p)
    if kind == "video":
        out, _ = _decode_video(p, frames, start)
        return out if fps is None else dataclasses.replace(out, fps=fps)
    files = [p] if kind == "image" else _png_files(p)
    chosen = files[start: None if frames is None else start + frames]
    if not chosen:
        raise _no_frames(p, start, len(files))
    images = [_load_image(f) for f in chosen]
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        raise DataError(f"{p}: PNG frames differ in size ({sorted(s[:2] for s in sizes)}); every frame of a "
                        f"video must have the same size.")
    return rgb_to_yuv420(np.stack(images), fps=DEFAULT_IMAGE_FPS if fps is None else fps)


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, size, frame rate, pixel format and codec of a video file, PNG folder or image, without
    decoding the video (frames counted from the demuxed packets)."""
    av = _av()
    p = Path(path)
    kind = _kind(p)
    if kind != "video":
        files = [p] if kind == "image" else _png_files(p)
        Image = _pil()
        try:
            with Image.open(files[0]) as im:
                w, h, mode, fmt = im.width, im.height, im.mode, (im.format or "").lower()
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{files[0]} is not a readable image ({_reason(exc)}); check or re-save the file.") \
                from None
        return VideoInfo(str(p), len(files), w, h, DEFAULT_IMAGE_FPS, mode, fmt)
    container = _open_container(p)
    try:
        stream = container.streams.video[0]
        cc = stream.codec_context
        count = sum(1 for pkt in container.demux(stream) if pkt.size)  # headers can be wrong (tree.avi says 444)
        pix_fmt = cc.format.name if cc.format else "unknown"
        return VideoInfo(str(p), count, int(cc.width), int(cc.height), _stream_fps(stream), pix_fmt, cc.name)
    except (av.FFmpegError, OSError) as exc:
        raise DataError(f"{p}: reading failed ({_reason(exc)}); the file is corrupt or truncated: re-encode or "
                        f"re-download it.") from None
    finally:
        container.close()


def _rate(fps: float) -> Fraction:
    """The frame rate as a fraction (30000/1001 for 29.97...; denominators up to 1001)."""
    return Fraction(fps).limit_denominator(1001)


def _require_frames(frames: YUVFrames) -> None:
    if not isinstance(frames, YUVFrames):
        raise ConfigError(f"expected YUVFrames, got {type(frames).__name__}; convert RGB with rgb_to_yuv420.")
    if len(frames) == 0:
        raise DataError("no frames to write; pass at least one frame.")


def y4m_header(frames: YUVFrames) -> bytes:
    """The YUV4MPEG2 stream header of ``frames`` (progressive, square pixels, ``C420jpeg`` for centre-sited
    chroma, ``C420mpeg2`` for left-sited chroma, limited range)."""
    rate = _rate(frames.fps)
    tag = _Y4M_SITING[frames.chroma_siting]
    return (f"YUV4MPEG2 W{frames.width} H{frames.height} F{rate.numerator}:{rate.denominator} Ip A1:1 C{tag} "
            f"XYSCSS={tag.upper()} XCOLORRANGE=LIMITED\n").encode("ascii")


def write_y4m(path: str | os.PathLike, frames: YUVFrames) -> Path:
    """Write ``frames`` as a Y4M (``yuv420p``) file, atomically; FFmpeg reads it back bit-exactly."""
    _require_frames(frames)
    header = y4m_header(frames)
    frame_bytes = sum(p[0].size for p in frames.planes)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header)
            for t in range(len(frames)):
                f.write(b"FRAME\n")
                for plane in frames.planes:
                    f.write(np.ascontiguousarray(plane[t]).tobytes())
        expected = len(header) + len(frames) * (6 + frame_bytes)
        if tmp.stat().st_size != expected:
            raise OSError(f"writing {path} failed: {tmp.stat().st_size} bytes instead of {expected}")
    return Path(path)


def write_png_frames(folder: str | os.PathLike, frames: YUVFrames) -> Path:
    """Write ``frames`` as RGB PNG files ``frame_000000.png``, ... (the documented conversion) into ``folder``.

    The frames are written into a temporary folder next to ``folder`` and renamed into place, so a reader
    never sees half the frames. ``folder`` may be absent, empty, or hold an earlier output of this function
    (only ``frame_NNNNNN.png`` files), which is replaced; anything else in it is an error.
    """
    _require_frames(frames)
    Image = _pil()
    target = Path(folder)
    if target.exists():
        if not target.is_dir():
            raise DataError(f"{target} exists and is not a folder; choose another output folder.")
        other = [p.name for p in target.iterdir() if not re.fullmatch(r"frame_\d{6,}\.png", p.name)]
        if other:
            raise DataError(f"{target} holds other files ({other[0]}, ...); choose an empty or new output folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = None
    try:
        rgb = yuv420_to_rgb(frames)
        for t in range(len(frames)):
            Image.fromarray(rgb[t]).save(tmp / _PNG_NAME.format(t), format="PNG")
        if len(list(tmp.iterdir())) != len(frames):
            raise OSError(f"writing {target} failed: not every frame was written")
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    os.chmod(target, 0o777 & ~_umask())
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _encode_ffv1(path: Path, frames: YUVFrames) -> None:
    av = _av()
    with av.open(str(path), mode="w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=_rate(frames.fps))
        stream.width, stream.height, stream.pix_fmt = frames.width, frames.height, "yuv420p"
        stream.codec_context.time_base = 1 / _rate(frames.fps)
        for t in range(len(frames)):
            container.mux(stream.encode(av_frame(frames, t)))
        container.mux(stream.encode(None))


def write_lossless(path: str | os.PathLike, frames: YUVFrames) -> Path:
    """Write ``frames`` losslessly (FFV1 in Matroska, ``.mkv``), atomically; the written file is decoded again
    and must give the frames back bit for bit before it replaces anything."""
    _require_frames(frames)
    if Path(path).suffix.lower() != ".mkv":
        raise ConfigError(f"{path}: lossless output is FFV1 in Matroska; give a path ending in .mkv.")
    with atomic_path(path) as tmp:
        _encode_ffv1(tmp, frames)
        back, _ = _decode_video(tmp, None, 0)
        if len(back) != len(frames) or not back.equal(frames):
            raise OSError(f"writing {path} failed: the FFV1 file does not decode to the frames written")
    return Path(path)

