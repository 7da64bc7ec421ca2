"""ACIQ bias correction (bitalloc.quant.bias_correction). References: numpy per-channel moments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitalloc.errors import ShapeError
from bitalloc.quant.bias_correction import bias_correct
from bitalloc.quant.grid import fake_quantize, qparams_from_range
from bitalloc.quant.stats import to_rows


def quantize_per_channel(w: torch.Tensor, bits: int, axis: int = 0) -> torch.Tensor:
    """4-bit-ish asymmetric per-channel quantization clipped at 60% of the range (shifts the means)."""
    rows = to_rows(w, axis)
    lo, hi = rows.amin(1) * 0.6, rows.amax(1) * 0.6
    s, z, qmin, qmax = qparams_from_range(lo, hi, bits, symmetric=False)
    return fake_quantize(w.float(), s, z, qmin, qmax, axis=axis).to(w.dtype)


def channel_moments(t: torch.Tensor, axis: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.moveaxis(t.detach().double().numpy(), axis, 0).reshape(t.shape[axis], -1)
    mean = r.mean(axis=1)
    return mean, np.linalg.norm(r - mean[:, None], axis=1)


@pytest.mark.parametrize("shape,axis", [((16, 8, 3, 3), 0), ((10, 32), 0), ((4, 6, 5), 1)])
def test_mean_only_restores_means_and_keeps_scale(shape, axis):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.2 + 0.05).abs() - 0.1
    w_q = quantize_per_channel(w, 4, axis)
    corrected, xi, beta = bias_correct(w, w_q, axis=axis)
    C = shape[axis]
    assert xi.shape == beta.shape == (C,) and xi.dtype == beta.dtype == torch.float64
    assert torch.all(xi == 1.0)
    mean_w, _ = channel_moments(w, axis)
    mean_q, norm_q = channel_moments(w_q, axis)
    mean_c, norm_c = channel_moments(corrected, axis)
    assert np.max(np.abs(mean_q - mean_w)) > 1e-4  # quantization did shift the means
    scale = np.abs(w.numpy()).max()
    np.testing.assert_allclose(mean_c, mean_w, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(beta.numpy(), mean_w - mean_q, rtol=0, atol=1e-12)
    np.testing.assert_allclose(norm_c, norm_q, rtol=1e-10)  # a shift leaves the centred norm unchanged
    assert corrected.shape == w.shape and corrected.dtype == torch.float64


@pytest.mark.parametrize("shape,axis", [((16, 8, 3, 3), 0), ((10, 32), 0), ((4, 6, 5), -1)])
def test_norm_restores_mean_and_centred_norm(shape, axis):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * 0.3 + 0.02
    w_q = quantize_per_channel(w, 3, axis)
    corrected, xi, beta = bias_correct(w, w_q, axis=axis, norm=True)
    mean_w, norm_w = channel_moments(w, axis)
    mean_q, norm_q = channel_moments(w_q, axis)
    mean_c, norm_c = channel_moments(corrected, axis)
    assert np.max(np.abs(norm_q / norm_w - 1)) > 1e-3  # clipping did shrink the spread
    np.testing.assert_allclose(mean_c, mean_w, rtol=0, atol=1e-10 * np.abs(w.numpy()).max())
    np.testing.assert_allclose(norm_c, norm_w, rtol=1e-10)
    np.testing.assert_allclose(xi.numpy(), norm_w / norm_q, rtol=1e-12)
    np.testing.assert_allclose(beta.numpy(), mean_w - xi.numpy() * mean_q, rtol=1e-12, atol=1e-15)
    # corrected = xi * w_q + beta per channel, along the requested axis
    view = [1] * w.ndim
    view[axis] = -1
    torch.testing.assert_close(corrected, xi.reshape(view) * w_q + beta.reshape(view), rtol=1e-14, atol=1e-15)


def test_constant_quantized_channel_keeps_unit_scale():
    w = torch.tensor([[0.1, 0.2, 0.3], [1.0, -1.0, 0.5]], dtype=torch.float64)
    w_q = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5]], dtype=torch.float64)
    corrected, xi, beta = bias_correct(w, w_q, norm=True)
    assert xi[0] == 1.0 and beta[0] == pytest.approx(0.2)
    assert torch.allclose(corrected[0], torch.full((3,), 0.2, dtype=torch.float64))
    assert xi[1] == pytest.approx(1.0) and beta[1] == pytest.approx(0.0, abs=1e-15)


def test_float32_inputs_and_validation():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 4, 3, 3, generator=g)
    w_q = quantize_per_channel(w, 4)
    corrected, xi, beta = bias_correct(w, w_q, norm=True)
    assert corrected.dtype == torch.float32 and xi.dtype == torch.float64
    mean_w, norm_w = channel_moments(w, 0)
    mean_c, norm_c = channel_moments(corrected, 0)
    np.testing.assert_allclose(mean_c, mean_w, atol=1e-6)
    np.testing.assert_allclose(norm_c, norm_w, rtol=1e-6)
    with pytest.raises(ShapeError):
        bias_correct(w, w_q[:4])
    with pytest.raises(ShapeError):
        bias_correct(torch.tensor(1.0), torch.tensor(1.0))
