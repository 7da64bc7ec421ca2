"""Video frames, the RGB <-> YUV 4:2:0 conversion and video I/O (bitalloc.codec.frames, bitalloc.codec.video_io).

References: the BT.601 studio-range values of the primaries (published tables), the textbook inverse
coefficients, FFmpeg's own converter (swscale) and decoders (through PyAV, used differently from the code under
test), brute-force per-pixel loops, and bit-exact round trips through files written here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from bitalloc.codec.frames import YUVFrames, chroma_shape, rgb_to_yuv420, upsample_chroma, yuv420_to_rgb
from bitalloc.codec.video_io import (probe_video, read_video, write_lossless, write_png_frames, write_y4m,
                                     y4m_header)
from bitalloc.errors import ConfigError, DataError, ShapeError

av = pytest.importorskip("av", reason="video I/O needs PyAV (pip install 'bitalloc[codec]')")
Image = pytest.importorskip("PIL.Image", reason="image I/O needs Pillow (pip install 'bitalloc[codec]')")


def random_frames(t: int, h: int, w: int, seed: int = 0, fps: float = 25.0) -> YUVFrames:
    rng = np.random.default_rng(seed)
    ch, cw = chroma_shape(h, w)
    return YUVFrames(rng.integers(0, 256, (t, h, w), dtype=np.uint8), rng.integers(0, 256, (t, ch, cw), dtype=np.uint8),
                     rng.integers(0, 256, (t, ch, cw), dtype=np.uint8), fps)


def smooth_rgb(t: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([np.stack([128 + 100 * np.sin(xx / 9 + c + k / 3) * np.cos(yy / 11 - c) for c in range(3)], -1)
                     for k in range(t)]).clip(0, 255).round().astype(np.uint8)


def write_with_pyav(path: Path, frames: YUVFrames, codec: str, fmt: str | None = None) -> None:
    """Encode with PyAV's container API and VideoFrame.from_ndarray (even sizes): not the code under test."""
    with av.open(str(path), mode="w", format=fmt) as c:
        s = c.add_stream(codec, rate=Fraction(frames.fps).limit_denominator(1001))
        s.width, s.height, s.pix_fmt = frames.width, frames.height, "yuv420p"
        for t in range(len(frames)):
            f = av.VideoFrame.from_ndarray(packed(frames, t), format="yuv420p")
            f.pts = t
            c.mux(s.encode(f))
        c.mux(s.encode(None))


def decode_with_pyav(path: Path) -> list[np.ndarray]:
    """Frames as FFmpeg's packed yuv420p arrays [H * 3 / 2, W] (even sizes), by PyAV's to_ndarray."""
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="yuv420p") for f in c.decode(video=0)]


def packed(frames: YUVFrames, t: int) -> np.ndarray:
    return np.concatenate([frames.y[t], frames.u[t].reshape(-1, frames.width), frames.v[t].reshape(-1, frames.width)])


# ---------------------------------------------------------------- the conversion

@pytest.mark.parametrize("rgb, yuv", [((255, 255, 255), (235, 128, 128)), ((0, 0, 0), (16, 128, 128)),
                                      ((255, 0, 0), (81, 90, 240)), ((0, 255, 0), (145, 54, 34)),
                                      ((0, 0, 255), (41, 240, 110)), ((128, 128, 128), (126, 128, 128))])
def test_primaries_map_to_their_bt601_studio_values(rgb, yuv):
    f = rgb_to_yuv420(np.broadcast_to(np.array(rgb, np.uint8), (1, 4, 6, 3)).copy())
    assert (f.y == yuv[0]).all() and (f.u == yuv[1]).all() and (f.v == yuv[2]).all()
    back = yuv420_to_rgb(f)
    assert np.abs(back.astype(int) - np.array(rgb)).max() <= 1


def test_conversion_matches_ffmpeg_and_textbook_inverse_on_flat_frames():
    rng = np.random.default_rng(1)
    cols = rng.integers(0, 256, (64, 3)).astype(np.uint8)
    rgb = np.broadcast_to(cols[:, None, None, :], (64, 4, 4, 3)).copy()
    f = rgb_to_yuv420(rgb)
    for t in range(64):
        ref = av.VideoFrame.from_ndarray(rgb[t], format="rgb24").reformat(format="yuv420p").to_ndarray()
        assert abs(int(ref[0, 0]) - int(f.y[t, 0, 0])) <= 1  # swscale's fixed point
        assert abs(int(ref[4, 0]) - int(f.u[t, 0, 0])) <= 1 and abs(int(ref[5, 0]) - int(f.v[t, 0, 0])) <= 1
    # textbook inverse (coefficients rounded to 3 decimals)
    y, cb, cr = (f.y.astype(float) - 16), (upsample_chroma(f.u, 4, 4) - 128), (upsample_chroma(f.v, 4, 4) - 128)
    ref_rgb = np.stack([1.164 * y + 1.596 * cr, 1.164 * y - 0.392 * cb - 0.813 * cr, 1.164 * y + 2.017 * cb], -1)
    assert np.abs(yuv420_to_rgb(f) - np.clip(ref_rgb, 0, 255)).max() <= 1.0
    assert np.abs(yuv420_to_rgb(f).astype(int) - rgb).max() <= 2  # the documented round-trip bound


@pytest.mark.parametrize("h, w", [(6, 8), (5, 7)])
def test_chroma_is_the_rounded_mean_of_each_2x2_block(h, w):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (2, h, w, 3)).astype(np.uint8)
    f = rgb_to_yuv420(rgb)
    kr, kb = 0.299, 0.114
    for t in range(2):
        for i in range((h + 1) // 2):
            for j in range((w + 1) // 2):
                cbs, crs = [], []
                for di in range(2):
                    for dj in range(2):
                        r, g, b = (float(c) for c in rgb[t, min(2 * i + di, h - 1), min(2 * j + dj, w - 1)])
                        e = kr * r + (1 - kr - kb) * g + kb * b
                        cbs.append(128 + 224 / 255 * (b - e) / 1.772)
                        crs.append(128 + 224 / 255 * (r - e) / 1.402)
                assert f.u[t, i, j] == np.clip(np.rint(np.mean(cbs)), 0, 255)
                assert f.v[t, i, j] == np.clip(np.rint(np.mean(crs)), 0, 255)
        e = rgb[t].astype(float) @ np.array([kr, 1 - kr - kb, kb])
        assert np.array_equal(f.y[t], np.clip(np.rint(16 + 219 / 255 * e), 0, 255))


def test_upsampling_reproduces_a_linear_ramp_at_the_centre_sited_positions():
    c = np.arange(10, dtype=np.float64)[None, None, :] * 7 + 20  # chroma sample i at full-res x = 2 i + 0.5
    up = upsample_chroma(np.broadcast_to(c, (1, 3, 10)), 6, 20)
    j = np.arange(20)
    expected = 7 * (j / 2 - 0.25) + 20
    assert np.allclose(up[0, :, 1:-1], expected[1:-1])  # borders replicate
    assert up[0, 0, 0] == 20 and up[0, 0, -1] == 7 * 9 + 20


def test_round_trip_of_smooth_frames_is_accurate():
    rgb = smooth_rgb(2, 64, 96)
    back = yuv420_to_rgb(rgb_to_yuv420(rgb))
    mse = np.mean((back.astype(float) - rgb) ** 2)
    assert 10 * np.log10(255**2 / mse) > 45


# ---------------------------------------------------------------- YUVFrames

def test_yuvframes_validation_and_helpers():
    f = random_frames(5, 7, 9)
    assert (len(f), f.height, f.width, f.u.shape) == (5, 7, 9, (5, 4, 5))
    with pytest.raises(ShapeError, match="chroma"):
        YUVFrames(f.y, f.u[:, :3], f.v)
    with pytest.raises(ShapeError, match="uint8"):
        YUVFrames(f.y.astype(np.int16), f.u, f.v)
    with pytest.raises(ConfigError, match="fps"):
        YUVFrames(f.y, f.u, f.v, fps=0)
    assert f[1].equal(YUVFrames(f.y[1:2], f.u[1:2], f.v[1:2])) and len(f[1:4]) == 3 and f[-1].equal(f[4:5])
    assert YUVFrames.concat([f[:2], f[2:]]).equal(f)
    with pytest.raises(ShapeError, match="sizes"):
        YUVFrames.concat([f, random_frames(1, 8, 8)])
    padded = f.pad(16, 16)
    assert padded.y.shape == (5, 16, 16) and padded.u.shape == (5, 8, 8)
    assert (padded.y[:, 7:, :9] == f.y[:, 6:7, :]).all()  # last row replicated
    assert padded.crop(7, 9).equal(f)
    inner = f.crop(3, 5, top=2, left=4)
    assert np.array_equal(inner.y, f.y[:, 2:5, 4:9]) and np.array_equal(inner.u, f.u[:, 1:3, 2:5])
    with pytest.raises(ConfigError, match="even"):
        f.crop(3, 3, top=1)
    with pytest.raises(ShapeError):
        f.crop(8, 9)


def test_torch_planes_round_trip_exactly():
    f = random_frames(3, 5, 6)
    y, u, v = f.to_torch_planes()
    assert y.shape == (3, 1, 5, 6) and u.shape == (3, 1, 3, 3) and y.dtype == torch.float32
    assert torch.allclose(y * 255, torch.from_numpy(f.y).float().unsqueeze(1))
    assert YUVFrames.from_torch_planes(y, u, v).equal(f)


# ---------------------------------------------------------------- reading and writing

@pytest.mark.parametrize("h, w", [(48, 64), (47, 63)])
def test_y4m_round_trip_is_bit_exact_and_ffmpeg_reads_it(tmp_path, h, w):
    f = random_frames(4, h, w, fps=30000 / 1001)
    path = write_y4m(tmp_path / "a.y4m", f)
    assert path.read_bytes().startswith(b"YUV4MPEG2 W%d H%d F30000:1001 Ip A1:1 C420jpeg" % (w, h))
    back = read_video(path)
    assert back.equal(f) and abs(back.fps - 30000 / 1001) < 1e-9 and back.chroma_siting == "center"
    if h % 2 == 0:  # FFmpeg's own packed layout (to_ndarray) needs even sizes
        assert all(np.array_equal(a, packed(f, t)) for t, a in enumerate(decode_with_pyav(path)))
    left = YUVFrames(f.y, f.u, f.v, f.fps, chroma_siting="left")
    assert b"C420mpeg2" in y4m_header(left)
    assert read_video(write_y4m(tmp_path / "b.y4m", left)).chroma_siting == "left"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_reads_ffmpeg_written_y4m_mp4_and_avi_without_conversion(tmp_path):
    f = rgb_to_yuv420(smooth_rgb(6, 48, 64))
    write_with_pyav(tmp_path / "ff.y4m", f, "rawvideo", "yuv4mpegpipe")
    assert read_video(tmp_path / "ff.y4m").equal(f)
    for name, codec in (("a.mp4", "libx264"), ("a.avi", "mpeg4"), ("a.mkv", "libx265")):
        write_with_pyav(tmp_path / name, f, codec)
        ref = decode_with_pyav(tmp_path / name)  # lossy: compare with FFmpeg's decoded frames
        got = read_video(tmp_path / name)
        assert len(got) == 6 and all(np.array_equal(packed(got, t), ref[t]) for t in range(6))
        part = read_video(tmp_path / name, frames=2, start=3)
        assert part.equal(got[3:5])
        info = probe_video(tmp_path / name)
        assert (info.frames, info.width, info.height, info.pix_fmt) == (6, 64, 48, "yuv420p")
        assert abs(info.fps - 25) < 1e-6
    assert read_video(tmp_path / "a.mp4").chroma_siting == "left"  # H.264's default siting
    assert probe_video(tmp_path / "a.avi").codec == "mpeg4"


def test_non_yuv420p_sources_go_through_the_documented_conversion(tmp_path):
    rgb = smooth_rgb(3, 32, 48)
    with av.open(str(tmp_path / "rgb.mkv"), mode="w") as c:  # lossless RGB video (FFV1 bgr0)
        s = c.add_stream("ffv1", rate=25)
        s.width, s.height, s.pix_fmt = 48, 32, "bgr0"
        for t in range(3):
            c.mux(s.encode(av.VideoFrame.from_ndarray(rgb[t], format="rgb24").reformat(format="bgr0")))
        c.mux(s.encode(None))
    assert read_video(tmp_path / "rgb.mkv").equal(rgb_to_yuv420(rgb))
    folder = tmp_path / "png"
    folder.mkdir()
    for t in (2, 0, 10):  # natural order: 0, 2, 10
        Image.fromarray(rgb[min(t, 2)]).save(folder / f"f{t}.png")
    got = read_video(folder)
    assert got.equal(rgb_to_yuv420(rgb[[0, 2, 2]])) and got.fps == 25.0
    assert read_video(folder, fps=12.5).fps == 12.5
    Image.fromarray(rgb[1][:31, :47]).save(tmp_path / "odd.png")
    one = read_video(tmp_path / "odd.png")
    assert (len(one), one.height, one.width) == (1, 31, 47) and one.equal(rgb_to_yuv420(rgb[1:2, :31, :47]))
    info = probe_video(folder)
    assert (info.frames, info.width, info.height) == (3, 48, 32)


@pytest.mark.parametrize("h, w", [(48, 64), (47, 63)])
def test_lossless_ffv1_round_trip(tmp_path, h, w):
    f = random_frames(5, h, w, seed=3, fps=12.5)
    write_lossless(tmp_path / "a.mkv", f)
    back = read_video(tmp_path / "a.mkv")
    assert back.equal(f) and back.fps == 12.5 and probe_video(tmp_path / "a.mkv").codec == "ffv1"
    with pytest.raises(ConfigError, match=".mkv"):
        write_lossless(tmp_path / "a.mp4", f)


def test_png_frames_written_atomically_and_replaced(tmp_path):
    f = rgb_to_yuv420(smooth_rgb(4, 31, 47))
    out = write_png_frames(tmp_path / "rec", f)
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"frame_{i:06d}.png" for i in range(4)]
    assert np.array_equal(np.asarray(Image.open(out / names[2])), yuv420_to_rgb(f)[2])
    assert read_video(out).equal(rgb_to_yuv420(yuv420_to_rgb(f)))
    write_png_frames(tmp_path / "rec", f[:2])  # an earlier output is replaced whole
    assert sorted(p.name for p in out.iterdir()) == ["frame_000000.png", "frame_000001.png"]
    assert stat_mode(out) == 0o777 & ~umask()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="notes.txt"):
        write_png_frames(out, f)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec"]


def stat_mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_bad_inputs_are_one_line_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(2000))  # seeded: ~1 in 200 random files
    # probes as a container without a video stream (another one-line error)
    with pytest.raises(DataError, match="not a readable video"):
        read_video(tmp_path / "junk.mp4")
    f = rgb_to_yuv420(smooth_rgb(6, 48, 64))
    write_with_pyav(tmp_path / "a.mp4", f, "libx264")
    data = (tmp_path / "a.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.mp4"):
        read_video(tmp_path / "cut.mp4")
    write_y4m(tmp_path / "a.y4m", f)
    data = (tmp_path / "a.y4m").read_bytes()
    (tmp_path / "cut.y4m").write_bytes(data[:-100])  # FFmpeg alone would silently drop the last frame
    with pytest.raises(DataError, match="frame 5 is truncated"):
        read_video(tmp_path / "cut.y4m")
    third = data.index(b"FRAME", data.index(b"FRAME", data.index(b"FRAME") + 1) + 1)
    (tmp_path / "bad.y4m").write_bytes(data[:third] + b"FRAMX" + data[third + 5:])
    with pytest.raises(DataError, match="frame 2 has no FRAME header"):
        probe_video(tmp_path / "bad.y4m")
    with pytest.raises(DataError, match="none from start=6; choose a start below 6"):
        read_video(tmp_path / "a.mp4", start=6)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported extension '.txt'"):
        read_video(tmp_path / "notes.txt")
    (tmp_path / "raw.yuv").write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match="wrap it in Y4M"):
        probe_video(tmp_path / "raw.yuv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG frames"):
        read_video(tmp_path / "empty")
    (tmp_path / "mixed").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "mixed" / "1.png")
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(tmp_path / "mixed" / "2.png")
    with pytest.raises(DataError, match="differ in size"):
        read_video(tmp_path / "mixed")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="not a readable image"):
        read_video(tmp_path / "bad.png")
    with pytest.raises(ConfigError, match="frames=0"):
        read_video(tmp_path / "a.mp4", frames=0)
    with pytest.raises(DataError, match="no frames"):
        write_y4m(tmp_path / "z.y4m", f[:0])
    with pytest.raises(DataError) as info:
        read_video(tmp_path / "junk.mp4")
    assert "\n" not in str(info.value) and "re-encode it" in str(info.value)


def test_core_and_codec_modules_import_without_av_scipy_or_pillow():
    code = ("import sys, bitalloc, bitalloc.codec.frames, bitalloc.codec.video_io, bitalloc.codec.metrics, "
            "bitalloc.codec.anchors; print(sorted(m for m in ('av', 'scipy', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
