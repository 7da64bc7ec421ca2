"""PSNR, Bjontegaard deltas, rates (bitalloc.codec.metrics) and the rate-distortion plot.

References: closed forms, brute-force float64 loops, and the PyPI ``bjontegaard`` package (FAU-LMS) on its own
README example and on random monotone curves.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from bitalloc.codec.frames import YUVFrames, chroma_shape, yuv420_to_rgb
from bitalloc.codec.metrics import bd_psnr, bd_rate, bits_per_pixel, kbps, mse_yuv_per_frame, psnr_rgb, psnr_yuv
from bitalloc.errors import ConfigError, DataError, ShapeError
from bitalloc.report.plots import rd_plot

bjontegaard = pytest.importorskip("bjontegaard",
                                  reason="the BD-rate cross-check needs bjontegaard (pip install 'bitalloc[codec]')")

METHODS = ("akima", "pchip", "cubic")
# the example of the bjontegaard package's README (libx265 presets measured with ffmpeg)
README = dict(rate_anchor=[9487.76, 4593.60, 2486.44, 1358.24], psnr_anchor=[40.037, 38.615, 36.845, 34.851],
              rate_test=[9787.80, 4469.00, 2451.52, 1356.24], psnr_test=[40.121, 38.651, 36.970, 34.987])


def frames(t: int, h: int, w: int, seed: int) -> YUVFrames:
    rng = np.random.default_rng(seed)
    ch, cw = chroma_shape(h, w)
    return YUVFrames(rng.integers(0, 256, (t, h, w), dtype=np.uint8), rng.integers(0, 256, (t, ch, cw), dtype=np.uint8),
                     rng.integers(0, 256, (t, ch, cw), dtype=np.uint8))


def brute_psnr(a: np.ndarray, b: np.ndarray) -> float:
    total = 0.0
    for x, y in zip(a.ravel().tolist(), b.ravel().tolist()):
        total += (x - y) ** 2
    mse = total / a.size
    return 100.0 if mse == 0 else min(100.0, 10 * math.log10(255 * 255 / mse))


def test_psnr_yuv_closed_form_and_cap():
    ref = frames(3, 4, 6, 0)
    dec = ref.copy()
    dec.y[0] = np.where(dec.y[0] < 255, dec.y[0] + 1, dec.y[0] - 1)  # MSE 1 on Y of frame 0
    dec.u[1, 0, 0] ^= 4  # one chroma sample of frame 1 off by 4: MSE 16/6
    r = psnr_yuv(ref, dec)
    p1 = 10 * math.log10(255**2)
    pu = 10 * math.log10(255**2 / (16 / 6))
    assert r["per_frame"]["psnr_y"] == pytest.approx([p1, 100, 100])
    assert r["per_frame"]["psnr_u"] == pytest.approx([100, pu, 100])
    assert r["per_frame"]["psnr_yuv"] == pytest.approx([(6 * p1 + 200) / 8, (600 + pu + 100) / 8, 100])
    assert r["psnr_y"] == pytest.approx((p1 + 200) / 3)
    assert r["psnr_yuv"] == pytest.approx(np.mean(r["per_frame"]["psnr_yuv"]))
    assert r["psnr_y_mse"] == pytest.approx(10 * math.log10(255**2 / (1 / 3)))
    assert r["psnr_yuv_mse"] == pytest.approx((6 * r["psnr_y_mse"] + r["psnr_u_mse"] + r["psnr_v_mse"]) / 8)
    assert r["psnr_v"] == 100 and r["mse_v"] == 0 and r["frames"] == 3
    assert psnr_yuv(ref, ref)["psnr_yuv"] == 100.0


def test_psnr_against_brute_force_on_random_frames():
    ref, dec = frames(2, 5, 7, 1), frames(2, 5, 7, 2)
    r = psnr_yuv(ref, dec)
    for name in "yuv":
        a, b = getattr(ref, name), getattr(dec, name)
        assert r[f"psnr_{name}"] == pytest.approx(np.mean([brute_psnr(a[t], b[t]) for t in range(2)]))
    rgb = psnr_rgb(ref, dec)
    ra, rb = yuv420_to_rgb(ref), yuv420_to_rgb(dec)
    assert rgb["per_frame"]["psnr_rgb"] == pytest.approx([brute_psnr(ra[t], rb[t]) for t in range(2)])
    assert psnr_rgb(ra, rb)["psnr_rgb"] == rgb["psnr_rgb"]  # RGB arrays are used as they are
    assert psnr_rgb(ra[0], rb[0])["psnr_rgb"] == pytest.approx(brute_psnr(ra[0], rb[0]))
    with pytest.raises(ShapeError, match="differ"):
        psnr_yuv(ref, dec[:1])
    with pytest.raises(ShapeError, match="RGB"):
        psnr_rgb(ra.astype(np.float32), rb)


@pytest.mark.parametrize("method", METHODS)
def test_bd_rate_and_psnr_match_the_bjontegaard_package_on_its_readme_example(method):
    a, p, b, q = README["rate_anchor"], README["psnr_anchor"], README["rate_test"], README["psnr_test"]
    assert bd_rate(a, p, b, q, method) == pytest.approx(bjontegaard.bd_rate(a, p, b, q, method=method), abs=1e-7)
    assert bd_psnr(a, p, b, q, method) == pytest.approx(bjontegaard.bd_psnr(a, p, b, q, method=method), abs=1e-8)
    assert -4.5 < bd_rate(a, p, b, q, method) < -4.3  # the test encodes are ~4.4% cheaper at equal PSNR


@pytest.mark.parametrize("method", METHODS)
def test_bd_matches_the_bjontegaard_package_on_random_monotone_curves(method):
    rng = np.random.default_rng(7)
    for _ in range(25):
        n = int(rng.integers(4, 7))
        curves = []
        for _ in range(2):
            rates = np.sort(rng.uniform(100, 10000, n))
            psnr = 30 + np.cumsum(rng.uniform(0.3, 3.0, n)) + rng.uniform(-1, 1)
            curves.append((rates, psnr))
        (a, p), (b, q) = curves
        kw = dict(method=method, min_overlap=0)
        ref_rate = bjontegaard.bd_rate(a, p, b, q, **kw)
        ref_psnr = bjontegaard.bd_psnr(a, p, b, q, **kw)
        assert bd_rate(a, p, b, q, method) == pytest.approx(ref_rate, rel=1e-6, abs=1e-6)
        assert bd_psnr(a, p, b, q, method) == pytest.approx(ref_psnr, rel=1e-6, abs=1e-7)
        # points given in any order
        order = rng.permutation(n)
        assert bd_rate(a[order], p[order], b, q, method) == pytest.approx(ref_rate, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_bd_closed_forms(method):
    rates = np.array([200.0, 450.0, 900.0, 2000.0, 3900.0])
    psnr = np.array([30.0, 32.5, 34.0, 36.8, 38.0])
    assert bd_rate(rates, psnr, 0.8 * rates, psnr, method) == pytest.approx(-20.0)  # same PSNR, 20% fewer bits
    assert bd_psnr(rates, psnr, rates, psnr + 0.7, method) == pytest.approx(0.7)
    assert bd_rate(rates, psnr, rates, psnr, method) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(bd_rate(rates, psnr, rates, psnr + 20, method))  # no overlap


def test_bd_bad_inputs():
    with pytest.raises(ConfigError, match="at least 4 points"):
        bd_rate([1, 2, 3], [30, 31, 32], [1, 2, 3], [30, 31, 32], "cubic")
    with pytest.raises(ConfigError, match="unknown"):
        bd_rate([1, 2], [30, 31], [1, 2], [30, 31], "spline")
    with pytest.raises(DataError, match="positive"):
        bd_rate([0, 2], [30, 31], [1, 2], [30, 31])
    with pytest.raises(ShapeError, match="one PSNR per rate"):
        bd_rate([1, 2, 3], [30, 31], [1, 2], [30, 31])
    with pytest.raises(DataError, match="duplicate"):
        bd_rate([1, 2, 3], [30, 31, 31], [1, 2], [30, 31])
    assert bd_rate([1, 2], [30, 31], [1, 2], [30.5, 31.5], "akima") == pytest.approx(
        bjontegaard.bd_rate([1, 2], [30, 31], [1, 2], [30.5, 31.5], method="akima", min_overlap=0))


def test_rates():
    assert bits_per_pixel(1000, 4, 50, 40) == pytest.approx(8000 / 8000)
    assert kbps(12500, 50, 25.0) == pytest.approx(50.0)  # 100 kbit in 2 s
    with pytest.raises(ConfigError):
        kbps(10, 0, 25)


def test_rd_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install 'bitalloc[plots]')")
    out = rd_plot({"x265": [(300, 36.0), (100, 32.0), (180, 34.0)], "ours": [(120, 33.0), (260, 35.5)]},
                  tmp_path / "rd.png", title="carphone")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rd.png"]


def test_mse_yuv_per_frame_against_float64_planes():
    rng = np.random.default_rng(7)
    ref = YUVFrames(rng.integers(0, 256, (3, 6, 8), dtype=np.uint8), rng.integers(0, 256, (3, 3, 4), dtype=np.uint8),
                    rng.integers(0, 256, (3, 3, 4), dtype=np.uint8))
    dec = YUVFrames(rng.integers(0, 256, (3, 6, 8), dtype=np.uint8), rng.integers(0, 256, (3, 3, 4), dtype=np.uint8),
                    rng.integers(0, 256, (3, 3, 4), dtype=np.uint8))
    for t, got in enumerate(mse_yuv_per_frame(ref, dec)):
        planes = [float(np.mean((getattr(ref, p)[t].astype(np.float64) - getattr(dec, p)[t]) ** 2)) for p in "yuv"]
        assert got == pytest.approx((6 * planes[0] + planes[1] + planes[2]) / 8, rel=1e-12)
    assert np.array_equal(mse_yuv_per_frame(ref, ref), np.zeros(3))
    with pytest.raises(ShapeError):
        mse_yuv_per_frame(ref, YUVFrames(ref.y[:2], ref.u[:2], ref.v[:2]))
