"""Observers and the calibration context. References: exact statistics of the concatenated data
(float64), and invariances (online quantization per sample does not depend on batching)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bitalloc
from bitalloc.calibration.observer import Observer
from bitalloc.errors import DataError
from bitalloc.quant.ranges import estimate_range
from bitalloc.quant.stats import ChannelStats
from tests.nets import make_net


@pytest.mark.parametrize("axis", [None, 1])
def test_streaming_statistics_equal_exact_statistics(axis):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 5, 4, 4, generator=g) * (i + 1) + i - 1 for i in range(4)]
    batches = [torch.relu(b) if i == 2 else b for i, b in enumerate(batches)]
    obs = Observer(axis)
    for b in batches:
        obs.update(b)
    got = obs.stats()
    ref = ChannelStats.of(torch.cat(batches), axis)
    for field in ("count", "min", "max", "mean", "mad", "pos_mean"):
        assert torch.allclose(getattr(got, field).double(), getattr(ref, field).double(), rtol=1e-10, atol=1e-12), field
    for field in ("std", "pos_rms"):  # squares are formed in float32 (accumulated in float64)
        assert torch.allclose(getattr(got, field).double(), getattr(ref, field).double(), rtol=1e-6), field
    assert got.samples.shape == ref.samples.shape  # below capacity every value is kept


def test_subsample_is_uniform_over_the_stream():
    obs = Observer(None, capacity=4000, seed=1)
    for i in range(20):  # 20 batches of 1000 values, batch i holds the constant i
        obs.update(torch.full((1000,), float(i)))
    s = obs.stats().samples.reshape(-1)
    assert 2000 <= s.numel() <= 4000
    counts = torch.bincount(s.long(), minlength=20).double()
    expected = s.numel() / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 45.3  # chi-square, 19 degrees of freedom, p = 0.001
    assert obs.stats().count[0] == 20000  # exact moments still count everything


def test_empty_calibration_is_a_clear_error():
    with pytest.raises(DataError, match="no calibration data"):
        Observer(None).stats()
    q = bitalloc.prepare(make_net(), bitalloc.preset("minmax"), torch.randn(1, 3, 16, 16))
    with pytest.raises(DataError, match="empty"):
        bitalloc.calibrate(q, [])
    assert not bool(q.dw.input_quantizer.calibrated)
    with pytest.raises(DataError, match="non-finite"):
        bitalloc.calibrate(q, [torch.full((2, 3, 16, 16), float("nan"))])


def test_calibration_sets_the_estimator_range_of_the_pooled_data():
    net = make_net()
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(3)]
    for preset_name in ("minmax", "aciq-clip", "kld", "percentile", "mse", "ksigma"):
        cfg = bitalloc.preset(preset_name, w_bits=4, a_bits=4, first_last_bits=None)
        q = bitalloc.quantize(net, cfg, data, num_samples=12)
        # the stem's input is the raw data: compare with the estimator on the pooled input
        aq = q.stem.input_quantizer
        stats = ChannelStats.of(torch.cat(data), aq.stat_axis)
        bits = torch.full((stats.channels,), 4, dtype=torch.int64)
        lo, hi = estimate_range(cfg.default.act.method, stats, bits, symmetric=False, one_sided=stats.one_sided,
                                **cfg.default.act.options)
        from bitalloc.quant.grid import qparams_from_range

        scale, zp, _, _ = qparams_from_range(lo, hi, bits, symmetric=False)
        assert torch.allclose(aq.scale.reshape(-1), scale.reshape(-1), rtol=1e-5), preset_name
        assert torch.equal(aq.zero_point.reshape(-1), zp.reshape(-1)), preset_name


def test_calibration_uses_only_num_samples():
    net = make_net()
    data = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    q = bitalloc.quantize(net, bitalloc.preset("minmax"), data, num_samples=6)
    assert q.bitalloc_calibration["calibration_samples"] == 6
    ref = bitalloc.quantize(net, bitalloc.preset("minmax"), [torch.cat(data)[:6]], num_samples=6)
    assert torch.equal(q.pw.input_quantizer.scale, ref.pw.input_quantizer.scale)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_online_statistics_are_per_sample(granularity):
    net = make_net()
    cfg = bitalloc.preset("aciq", w_bits=8, a_bits=4, online=True, act_granularity=granularity)
    x = torch.randn(6, 3, 16, 16)
    q = bitalloc.quantize(net, cfg, [x])
    full = q(x)
    for i in range(6):
        assert torch.allclose(q(x[i:i + 1]), full[i:i + 1], atol=1e-5)
    # online per-tensor minmax on one sample == offline minmax calibrated on that one sample
    if granularity == "tensor":
        on = bitalloc.quantize(net, bitalloc.preset("minmax", a_bits=4, online=True), [x])
        off = bitalloc.quantize(net, bitalloc.preset("minmax", a_bits=4), [x[:1]], num_samples=1)
        assert torch.allclose(on.stem(x[:1]), off.stem(x[:1]), atol=1e-6)


def test_a_failed_calibration_changes_nothing():
    q = bitalloc.prepare(make_net(), bitalloc.preset("minmax"), torch.randn(1, 3, 16, 16))
    with pytest.raises(RuntimeError):
        with bitalloc.calibration(q):
            q(torch.randn(2, 3, 16, 16))
            raise RuntimeError("user error")
    assert not bool(q.pw.input_quantizer.calibrated)
    assert q.pw.input_quantizer.observer is None
    assert all(qz.enabled for _, l in bitalloc.quant_layers(q) for qz in l.quantizers())
