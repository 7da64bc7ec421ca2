"""The codec's networks, entropy models and motion compensation, against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bitalloc.codec.entropy import SCALE_LEVELS, EntropyBottleneck, GaussianConditional, Z_RANGE
from bitalloc.codec.model import CodecConfig, VideoCodec, bits_of
from bitalloc.codec.motion import MV_FRACTION, quantize_flow, warp, warp_int
from bitalloc.codec.networks import pack_yuv, unpack_yuv, weighted_mse

TINY = CodecConfig(n=16, nz=8, motion_n=8, motion_nz=8, lambdas=(0.01, 0.05))


def test_pack_unpack_inverse_and_layout():
    y = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6)
    u = torch.rand(2, 2, 3)
    v = torch.rand(2, 2, 3)
    x = pack_yuv(y, u, v)
    assert x.shape == (2, 6, 2, 3)
    # channel k of the luma phases holds Y[2i + k // 2, 2j + k % 2]
    for k in range(4):
        assert torch.equal(x[:, k], y[:, k // 2::2, k % 2::2])
    yy, uu, vv = unpack_yuv(x)
    assert torch.equal(yy, y) and torch.equal(uu, u) and torch.equal(vv, v)


def test_weighted_mse_is_the_6_1_1_psnr_weighting():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.random((3, 6, 4, 5)).astype(np.float64))
    b = torch.from_numpy(rng.random((3, 6, 4, 5)).astype(np.float64))
    ya, ua, va = unpack_yuv(a)
    yb, ub, vb = unpack_yuv(b)
    for i in range(3):
        ref = (6 * np.mean((ya[i] - yb[i]).numpy() ** 2) + np.mean((ua[i] - ub[i]).numpy() ** 2)
               + np.mean((va[i] - vb[i]).numpy() ** 2)) / 8
        assert float(weighted_mse(a, b)[i]) == pytest.approx(ref, rel=1e-12)


def test_gaussian_likelihood_matches_the_normal_cdf():
    from scipy.stats import norm

    gc = GaussianConditional()
    v = torch.tensor([-3.0, -0.4, 0.0, 0.3, 2.0, 7.5], dtype=torch.float64)
    log_s = torch.tensor([0.0, -1.0, 1.5, 0.2, 2.0, 0.7], dtype=torch.float64)
    s = np.maximum(np.exp(log_s.numpy()), 0.11)
    ref = norm.cdf((0.5 - np.abs(v.numpy())) / s) - norm.cdf((-0.5 - np.abs(v.numpy())) / s)
    got = gc.likelihood(v, log_s).numpy()
    assert np.allclose(got, np.maximum(ref, 1e-9), rtol=1e-9, atol=1e-15)


def test_scale_index_is_the_nearest_table_scale_in_log():
    gc = GaussianConditional()
    table = gc.scale_table.numpy()
    log_s = torch.linspace(math.log(0.05), math.log(400), 1001)
    idx = gc.scale_index(log_s).numpy()
    brute = np.abs(np.log(table)[None, :] - log_s.numpy()[:, None]).argmin(1)
    # ties on a boundary may go either way; everywhere else the same index
    diff = idx != brute
    assert diff.sum() <= 2 and idx.min() == 0 and idx.max() == SCALE_LEVELS - 1


def test_entropy_bottleneck_pmf_sums_to_one_and_matches_likelihood():
    torch.manual_seed(0)
    eb = EntropyBottleneck(3)
    eb.update()
    assert eb.ready
    sums = eb.pmf.sum(1).numpy()
    assert np.allclose(sums, 1.0, atol=1e-4)
    z = torch.tensor([[-2.0, 0.0, 5.0]]).reshape(1, 3, 1, 1)
    lik = eb.likelihood(z).reshape(-1).double()
    rows = eb.symbol_probabilities(np.arange(3))
    ref = torch.tensor([rows[0, Z_RANGE - 2], rows[1, Z_RANGE], rows[2, Z_RANGE + 5]])
    assert torch.allclose(lik, ref, rtol=1e-6)


def _warp_brute(plane: np.ndarray, q: np.ndarray, frac_bits: int) -> np.ndarray:
    """Per-pixel bilinear interpolation with clamped coordinates, exact rational arithmetic."""
    h, w = plane.shape
    one = 1 << frac_bits
    out = np.zeros_like(plane)
    for i in range(h):
        for j in range(w):
            px = j * one + int(q[0, i, j])
            py = i * one + int(q[1, i, j])
            x0, y0 = px // one, py // one
            fx, fy = px - x0 * one, py - y0 * one

            def at(yy: int, xx: int) -> int:
                return int(plane[min(max(yy, 0), h - 1), min(max(xx, 0), w - 1)])

            acc = ((one - fx) * (one - fy) * at(y0, x0) + fx * (one - fy) * at(y0, x0 + 1)
                   + (one - fx) * fy * at(y0 + 1, x0) + fx * fy * at(y0 + 1, x0 + 1))
            out[i, j] = (acc + one * one // 2) // (one * one)
    return out


def test_integer_warp_matches_brute_force_and_float_warp():
    rng = np.random.default_rng(1)
    h, w = 6, 8  # packed half resolution: luma 12 x 16
    ref = torch.from_numpy(rng.integers(0, 256, (1, 6, h, w)))
    flow = torch.from_numpy(rng.normal(0, 3, (1, 2, h, w))).float()
    q = quantize_flow(flow)
    got = warp_int(ref, q)
    y, u, v = unpack_yuv(ref)
    qy = q.repeat_interleave(2, 2).repeat_interleave(2, 3)
    gy, gu, gv = unpack_yuv(got)
    assert np.array_equal(gy[0].numpy(), _warp_brute(y[0].numpy(), qy[0].numpy(), 2))
    assert np.array_equal(gu[0].numpy(), _warp_brute(u[0].numpy(), q[0].numpy(), 3))
    assert np.array_equal(gv[0].numpy(), _warp_brute(v[0].numpy(), q[0].numpy(), 3))
    # the float (training) warp with the same quarter-pel flow agrees up to the final rounding
    flt = warp(ref.double(), q.double() / MV_FRACTION)
    assert (flt - got.double()).abs().max() <= 0.5 + 1e-9


def test_zero_flow_warp_is_identity():
    ref = torch.randint(0, 256, (2, 6, 4, 5))
    assert torch.equal(warp_int(ref, torch.zeros(2, 2, 4, 5, dtype=torch.int64)), ref)
    assert torch.allclose(warp(ref.float(), torch.zeros(2, 2, 4, 5)), ref.float(), atol=1e-4)


def test_video_codec_forward_shapes_and_bits():
    torch.manual_seed(0)
    model = VideoCodec(TINY)
    clip = torch.rand(2, 3, 6, 16, 24)  # luma 32 x 48
    level = torch.tensor([0, 1])
    out = model(clip, level)
    assert len(out["frames"]) == 3
    for f in out["frames"]:
        assert f["x_hat"].shape == (2, 6, 16, 24)
        bits = bits_of(f["likelihoods"])
        assert bits.shape == (2,) and bool((bits > 0).all())
    loss, terms = model.loss(clip, level, out)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert model.inter.residual.synthesis.linear[0].weight.grad is not None
    assert model.inter.residual.synthesis.nonlinear[-1].weight.grad is not None
    # "reference" mode: frame 0 is the reference, not coded
    out2 = model(clip, level, first="reference")
    assert len(out2["frames"]) == 2 and out2["offset"] == 1
