"""Observers and the calibration context. References: exact statistics of the concatenated data
(float64), and invariances (online quantization per sample does not depend on batching)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bitalloc
from bitalloc.calibration.observer import Observer
import itertools

import numpy as np

from bitalloc.config import TensorConfig
from bitalloc.errors import ConfigError, DataError
from bitalloc.quantizers.fixed import FixedQuantizer
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
    if granularity == "channel":  # fc's input is (N, 52): one value per sample and channel, see the next test
        with pytest.raises(ConfigError, match="'fc'.*shape \\(2, 52\\) has 1 value per sample and channel"):
            bitalloc.quantize(net, cfg, [x])
        cfg.overrides.append(("fc", {"act.granularity": "tensor", "act.allocate": False}))
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


def _online_minmax_reference(x: np.ndarray, bits: int) -> np.ndarray:
    """Per-sample, per-channel (last axis) affine min-max fake quantization of x [N, L, C] in float64, with the
    scale rounded to float32 as the grid stores it."""
    out = np.empty_like(x)
    qmax = 2 ** bits - 1
    for n in range(x.shape[0]):
        for c in range(x.shape[2]):
            v = x[n, :, c]
            lo, hi = min(v.min(), 0.0), max(v.max(), 0.0)
            scale = float(np.float32((hi - lo) / qmax))
            zp = min(max(np.round(-lo / scale), 0), qmax)
            q = np.clip(np.round(v / scale) + zp, 0, qmax)
            out[n, :, c] = (q - zp) * scale
    return out


def test_online_per_channel_linear_input():
    """A Linear layer's (N, L, C) input is quantized per sample and channel over its L values (reference: float64
    numpy); a (N, C) input has one value per sample and channel, whose range [x, x] would represent it exactly,
    so it is a clear error (at prepare, from the traced shape, and at run time) instead of a silent no-op."""
    q = FixedQuantizer(TensorConfig(bits=2, granularity="channel", online=True), "act", -1, 5)
    x = torch.randn(3, 7, 5, dtype=torch.float32)
    got = q(x).double().numpy()
    ref = _online_minmax_reference(x.double().numpy(), 2)
    assert np.allclose(got, ref, atol=1e-6)
    assert np.abs(got - x.numpy()).max() > 0.05  # 2 bits really quantize
    with pytest.raises(ConfigError, match="shape \\(7, 5\\) has 1 value per sample and channel.*per tensor"):
        q(torch.randn(7, 5))
    per_tensor = FixedQuantizer(TensorConfig(bits=2, online=True), "act", -1, None)
    with pytest.raises(ConfigError, match="has 1 value per sample:"):
        per_tensor(torch.randn(7, 1))
    assert per_tensor(torch.randn(7, 5)).shape == (7, 5)  # 5 values per sample: fine
    # prepare checks the traced input shape of each layer and names it
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    cfg = bitalloc.preset("minmax", 8, 2, online=True, act_granularity="channel", first_last_bits=None)
    with pytest.raises(ConfigError, match="layer '0' \\(Linear\\) input activation.*\\(4, 6\\)"):
        bitalloc.prepare(m, cfg, torch.randn(4, 6))
    qm = bitalloc.quantize(m, cfg, [torch.randn(4, 3, 6)])  # (N, L, C) inputs are fine
    assert qm[0].input_quantizer.online and qm[0].input_quantizer.per_channel
    # offline per-channel statistics of a (N, C) input pool the calibration samples: fine
    off = bitalloc.quantize(m, bitalloc.preset("minmax", 8, 2, act_granularity="channel", first_last_bits=None),
                            [torch.randn(16, 6)])
    assert off[0].input_quantizer.scale.shape == (6,)


def _batches(n_batches, size=4, seed=0, pulled=None):
    g = torch.Generator().manual_seed(seed)
    for i in itertools.count() if n_batches is None else range(n_batches):
        if pulled is not None:
            pulled.append(i)
        yield (torch.randn(size, 3, 16, 16, generator=g),)


def test_one_shot_generators_calibrate_like_lists():
    """A generator is read once, up to num_samples, and calibrates exactly as the same batches in a list."""
    net = make_net()
    cfg = bitalloc.preset("aciq", w_bits=4, a_bits=4)
    for n_batches, num in ((1, None), (3, 12), (None, 8)):  # one batch, several, an endless stream
        pulled = []
        q = bitalloc.quantize(net, cfg, _batches(n_batches, pulled=pulled), num_samples=num)
        ref = bitalloc.quantize(net, cfg, list(_batches(n_batches if n_batches else 2)), num_samples=num)
        seen = q.bitalloc_calibration["calibration_samples"]
        assert seen == ref.bitalloc_calibration["calibration_samples"] == min(4 * (n_batches or 2), num or 32)
        assert len(pulled) == -(-seen // 4)  # no batch read beyond the samples needed
        for (_, a), (_, b) in zip(bitalloc.quant_layers(q), bitalloc.quant_layers(ref)):
            if a.input_quantizer is not None:
                assert torch.equal(a.input_quantizer.scale, b.input_quantizer.scale)
    # run_ptq (example batch, FP32 timing pass, calibration) on a one-batch generator
    from bitalloc.ptq import run_ptq

    res = run_ptq(net, cfg, _batches(1), lambda m: (0.0, 0.0), fp32_top1=0.0, fp32_eval_seconds=1.0)
    assert res.report["timing"]["calibration_samples"] == 4
    with pytest.raises(DataError, match="empty"):
        bitalloc.quantize(net, cfg, _batches(0))


def test_take_inputs_cuts_the_last_batch_and_reads_no_further():
    """Brute-force reference: the first ``n`` rows of the concatenated inputs; a one-shot generator is read up to
    the batch that completes ``n`` and no further; an empty batch ends the data."""
    from bitalloc.batches import batch_inputs, take_inputs

    xs = [torch.arange(5 * i, 5 * i + 5, dtype=torch.float32)[:, None] for i in range(3)]
    for n in (None, 0, 1, 5, 7, 15, 40):
        got = list(take_inputs([(x, torch.zeros(5)) for x in xs], n))
        ref = torch.cat(xs)[: (15 if n is None else n)]
        assert torch.equal(torch.cat(got) if got else torch.empty(0, 1), ref), n
        assert all(g.shape[0] > 0 for g in got)
    read = []

    def stream():
        for x in xs:
            read.append(x)
            yield x

    assert [g.shape[0] for g in take_inputs(stream(), 7)] == [5, 2] and len(read) == 2
    assert len(list(take_inputs([xs[0], xs[0][:0], xs[1]], None))) == 1
    assert batch_inputs([xs[0], 1]) is xs[0] and batch_inputs(xs[0]) is xs[0]
