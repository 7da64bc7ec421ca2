"""The HEVC (x265) and JPEG anchors (bitalloc.codec.anchors) on tiny synthetic clips.

References: FFmpeg's demuxer and decoder reading the raw stream from a file (not the anchor's own parse/decode
path), Pillow decoding each JPEG file, brute-force PSNR, the stream's own key-frame flags.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from bitalloc.codec.anchors import jpeg_curve, jpeg_encode, x265_curve, x265_encode, x265_intra, x265_params
from bitalloc.codec.frames import YUVFrames, rgb_to_yuv420, yuv420_to_rgb
from bitalloc.errors import ConfigError

av = pytest.importorskip("av", reason="the x265 anchor needs PyAV (pip install 'bitalloc[codec]')")
Image = pytest.importorskip("PIL.Image", reason="the JPEG anchor needs Pillow (pip install 'bitalloc[codec]')")


def clip(t: int = 8, h: int = 48, w: int = 64) -> YUVFrames:
    """A textured pattern panning by one pixel per frame, with smooth colour."""
    yy, xx = np.mgrid[0:h + t, 0:w + t]
    rgb = np.stack([128 + 90 * np.sin(xx / (4 + c) + c) * np.cos(yy / (5 + c)) for c in range(3)], -1)
    rgb = rgb.clip(0, 255).round().astype(np.uint8)
    return rgb_to_yuv420(np.stack([rgb[k:k + h, k:k + w] for k in range(t)]), fps=25.0)


def mse_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return 100.0 if mse == 0 else min(100.0, 10 * np.log10(255**2 / mse))


@pytest.fixture(scope="module")
def curve() -> list:
    return x265_curve(clip(), qps=(22, 37), intra_period=4)


def test_x265_stream_decodes_elsewhere_to_the_measured_frames(curve, tmp_path):
    src = clip()
    for r in curve:
        assert r.num_bytes == len(r.stream) == sum(r.frame_bytes) and len(r.frame_bytes) == 8
        assert r.bpp == pytest.approx(8 * len(r.stream) / (8 * 48 * 64))
        assert r.kbps == pytest.approx(8 * len(r.stream) / 1000 / (8 / 25))
        path = tmp_path / f"qp{r.params['qp']}.hevc"
        path.write_bytes(r.stream)
        with av.open(str(path), format="hevc") as c:  # FFmpeg's raw-HEVC demuxer
            frames = [f.to_ndarray(format="yuv420p") for f in c.decode(video=0)]
        assert len(frames) == 8 and len(r.decoded) == 8
        for t, f in enumerate(frames):
            dec = r.decoded[t]
            assert np.array_equal(f, np.concatenate([dec.y[0], dec.u[0].reshape(-1, 64), dec.v[0].reshape(-1, 64)]))
            y_psnr = mse_psnr(src.y[t], f[:48])
            assert r.psnr["per_frame"]["psnr_y"][t] == pytest.approx(y_psnr)
        assert r.psnr_rgb["psnr_rgb"] == pytest.approx(
            np.mean([mse_psnr(a, b) for a, b in zip(yuv420_to_rgb(src), yuv420_to_rgb(r.decoded))]))
        assert b"x265 (build" not in r.stream  # info=0: no version / options record
        assert r.encode_fps > 0 and r.decode_fps > 0


def test_x265_quality_rises_as_qp_falls_and_key_frames_follow_the_intra_period(curve):
    hi, lo = curve
    assert hi.psnr["psnr_yuv"] > lo.psnr["psnr_yuv"] + 3 and hi.num_bytes > lo.num_bytes
    assert hi.keyframes == lo.keyframes == [0, 4]
    assert x265_encode(clip(), 32, intra_period=-1).keyframes == [0]
    intra = x265_intra(clip(4), 32)
    assert intra.keyframes == [0, 1, 2, 3] and intra.codec == "x265-intra"


def test_x265_is_reproducible_and_records_its_parameters(curve):
    again = x265_encode(clip(), 22, intra_period=4)
    assert again.stream == curve[0].stream
    p = curve[0].params
    assert p["x265_params"] == "keyint=4:min-keyint=4:bframes=0:info=0:pools=2:qp=22:log-level=error"
    assert (p["preset"], p["tune"], p["pix_fmt"], p["padded_to"]) == ("medium", "zerolatency", "yuv420p", None)
    assert "-x265-params keyint=4:min-keyint=4:bframes=0:info=0:pools=2:qp=22" in curve[0].command
    assert "-preset medium -tune zerolatency" in curve[0].command
    assert x265_params(27, -1) == "keyint=-1:bframes=0:info=0:pools=2:qp=27:log-level=error"
    d = curve[0].to_dict()
    assert "stream" not in d and "decoded" not in d and "per_frame" not in d["psnr"]


def test_the_ffmpeg_command_path_writes_the_same_stream(curve, tmp_path):
    """What ``ffmpeg ... -c:v libx265 ... -f hevc`` does: the encoder behind the raw-HEVC muxer, same options."""
    from fractions import Fraction

    src, r = clip(), curve[1]
    with av.open(str(tmp_path / "cli.hevc"), mode="w", format="hevc") as c:
        s = c.add_stream("libx265", rate=Fraction(25), options={"preset": "medium", "tune": "zerolatency",
                                                                 "x265-params": r.params["x265_params"]})
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for t in range(len(src)):
            packed = np.concatenate([src.y[t], src.u[t].reshape(-1, 64), src.v[t].reshape(-1, 64)])
            c.mux(s.encode(av.VideoFrame.from_ndarray(packed, format="yuv420p")))
        c.mux(s.encode(None))
    assert (tmp_path / "cli.hevc").read_bytes() == r.stream


def test_x265_odd_sizes_and_rgb_input():
    src = clip(3, 47, 63)
    r = x265_encode(src, 27, intra_period=32)
    assert r.decoded.y.shape == (3, 47, 63) and r.params["padded_to"] == [48, 64] and r.psnr["psnr_y"] > 30
    rgb = yuv420_to_rgb(clip(1))[0]
    img = x265_intra(rgb, 27)
    assert img.frames == 1 and img.psnr_rgb["psnr_rgb"] == pytest.approx(mse_psnr(rgb, yuv420_to_rgb(img.decoded)[0]))


def test_x265_bad_options():
    with pytest.raises(ConfigError, match="qp"):
        x265_encode(clip(2), 52)
    with pytest.raises(ConfigError, match="preset"):
        x265_encode(clip(2), 32, preset="fastest")
    with pytest.raises(ConfigError, match="intra_period"):
        x265_encode(clip(2), 32, intra_period=0)


def test_jpeg_anchor_counts_file_bytes_and_measures_psnr():
    src = clip(2)
    rgb = yuv420_to_rgb(src)
    lo, hi = jpeg_curve(src, qualities=(30, 90))
    for r in (lo, hi):
        files, pos = [], 0
        for n in r.frame_bytes:
            files.append(r.stream[pos:pos + n])
            pos += n
        assert pos == r.num_bytes == len(r.stream)
        for t, data in enumerate(files):
            im = Image.open(io.BytesIO(data))
            assert im.format == "JPEG"
            from PIL import JpegImagePlugin

            assert JpegImagePlugin.get_sampling(im) == 2  # 4:2:0
            decoded = np.asarray(im.convert("RGB"))
            assert r.psnr_rgb["per_frame"]["psnr_rgb"][t] == pytest.approx(mse_psnr(rgb[t], decoded))
        assert r.psnr["frames"] == 2 and r.params["quality"] in (30, 90)
    assert hi.psnr_rgb["psnr_rgb"] > lo.psnr_rgb["psnr_rgb"] and hi.num_bytes > lo.num_bytes
    assert hi.psnr["psnr_yuv"] > lo.psnr["psnr_yuv"]
    full = jpeg_encode(rgb[0], 90, "4:4:4")
    assert JpegImagePlugin.get_sampling(Image.open(io.BytesIO(full.stream))) == 0
    with pytest.raises(ConfigError, match="quality"):
        jpeg_encode(rgb, 0)
    with pytest.raises(ConfigError, match="subsampling"):
        jpeg_encode(rgb, 50, "4:1:1")
