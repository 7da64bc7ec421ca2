"""The per-frame width selector (bitalloc.codec.selector) and the categorical Gumbel-softmax gate it uses.

References: NumPy's own statistics (np.std, np.average with weights, np.hypot) for the features; the Gumbel-max
trick's closed form (argmax of logits + Gumbel noise is distributed as softmax(logits)) checked by Monte Carlo.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bitalloc
from bitalloc.codec.selector import FEATURE_NAMES, MOTION_SCALE, WidthSelector, frame_features, region_features
from bitalloc.config import LayerConfig, QuantConfig, TensorConfig
from bitalloc.errors import ConfigError, ShapeError
from bitalloc.model.region import region_precision
from bitalloc.quant.gates import categorical_test_choice, gumbel_softmax_sample, uniform_noise

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_features(luma: np.ndarray, mask: np.ndarray, flow: np.ndarray | None) -> np.ndarray:
    x = luma.astype(np.float64) / 255.0
    out = []
    for w in (mask.astype(np.float64), 1.0 - mask.astype(np.float64)):
        if w.sum() == 0:
            out += [0.0] * 4
            continue
        mu = np.average(x, weights=w)
        out += [np.sqrt(np.average((x - mu) ** 2, weights=w)), np.average(np.abs(x), weights=w)]
        if flow is None:
            out += [0.0, 0.0]
            continue
        vx, vy = flow[0] / MOTION_SCALE, flow[1] / MOTION_SCALE
        var = np.average((vx - np.average(vx, weights=w)) ** 2, weights=w) + np.average(
            (vy - np.average(vy, weights=w)) ** 2, weights=w)
        out += [np.sqrt(var), np.average(np.hypot(vx, vy), weights=w)]
    return np.array(out)


def test_features_against_numpy_reference():
    rng = np.random.default_rng(0)
    luma = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    flow = rng.normal(0, 3, (2, 24, 32))
    mask = np.zeros((24, 32), dtype=bool)
    mask[4:12, 6:20] = True
    got = region_features(luma, mask, flow)
    np.testing.assert_allclose(got, reference_features(luma, mask, flow), rtol=1e-12, atol=1e-12)
    # boolean masks: the plain statistics of the selected pixels
    x = luma / 255.0
    assert got[0] == pytest.approx(np.std(x[mask]), rel=1e-12)
    assert got[5] == pytest.approx(np.mean(x[~mask]), rel=1e-12)
    v = flow / MOTION_SCALE
    assert got[3] == pytest.approx(np.mean(np.hypot(v[0][mask], v[1][mask])), rel=1e-12)
    # soft masks weight both regions
    soft = rng.random((24, 32))
    np.testing.assert_allclose(region_features(luma, soft, flow), reference_features(luma, soft, flow), rtol=1e-11)
    # floats in [0, 1] are the same frame as uint8 / 255
    np.testing.assert_allclose(region_features(luma / 255.0, mask, flow), got, rtol=1e-14)
    assert len(FEATURE_NAMES) == 8 and FEATURE_NAMES[0] == "roi_frame_std"


def test_uniform_motion_has_no_spread_and_empty_or_full_regions_are_zero():
    luma = np.full((16, 16), 100, np.uint8)
    flow = np.stack([np.full((16, 16), 3.0), np.full((16, 16), -4.0)])
    empty = np.zeros((16, 16), dtype=bool)
    f = region_features(luma, empty, flow)
    assert np.all(f[:4] == 0)  # the empty ROI
    np.testing.assert_allclose(f[4:], [0.0, 100 / 255, 0.0, 5.0 / MOTION_SCALE], atol=1e-12)  # a pan: no spread
    full = region_features(luma, ~empty, flow)
    np.testing.assert_allclose(full[:4], f[4:], atol=1e-15)
    assert np.all(full[4:] == 0) and np.isfinite(full).all()


def test_frame_features_upsample_flows_and_skip_intra():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (3, 16, 24), dtype=np.uint8)
    masks = rng.random((3, 16, 24)) < 0.4
    half = rng.normal(0, 2, (3, 2, 8, 12)).astype(np.float32)
    feats = frame_features(frames, masks, torch.from_numpy(half), intra=[True, False, False])
    assert feats.shape == (3, 8) and feats.dtype == np.float64
    for t in range(3):
        full = np.kron(half[t], np.ones((1, 2, 2)))
        ref = reference_features(frames[t], masks[t], None if t == 0 else full)
        np.testing.assert_allclose(feats[t], ref, rtol=1e-6, atol=1e-9)
    again = frame_features(frames, masks, torch.from_numpy(half), intra=[True, False, False])
    np.testing.assert_array_equal(again, feats)  # reproducible bit for bit
    with pytest.raises(ShapeError):
        frame_features(frames, masks[:, :8], None)
    with pytest.raises(ShapeError):
        region_features(frames[0], masks[0], np.zeros((2, 8, 12)))


def test_eval_is_the_argmax_and_select_handles_empty_regions():
    sel = WidthSelector((4, 8, 16)).eval()
    with torch.no_grad():
        sel.fc.weight.zero_()
        sel.fc.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 2.0, 0.0, 0.0]))  # ROI -> 16, non-ROI -> 4
        sel.fc.weight[1, 0] = 10.0  # a large ROI frame_std makes the ROI pick 8
    feats = np.zeros((3, 8))
    feats[1, 0] = 1.0
    roi, non = sel(feats)
    assert torch.equal(roi, torch.tensor([[0, 0, 1.0], [0, 1.0, 0], [0, 0, 1.0]]))
    assert torch.equal(non, torch.tensor([[1.0, 0, 0]] * 3))
    bits = sel.select(feats)
    assert bits.tolist() == [[16, 4], [8, 4], [16, 4]]
    assert sel.select(feats, roi_fraction=[0.0, 0.5, 1.0]).tolist() == [[4, 4], [8, 4], [16, 16]]
    assert torch.equal(categorical_test_choice(torch.tensor([[0.1, 0.3, 0.2]])), torch.tensor([[0, 1.0, 0]]))
    with pytest.raises(ShapeError):
        sel(np.zeros((2, 7)))
    with pytest.raises(ConfigError):
        WidthSelector((8, 4))


def test_gumbel_samples_follow_the_softmax_monte_carlo():
    logits = torch.tensor([0.3, -1.2, 1.1, 0.0])
    n = 40000
    u = uniform_noise((n, 4), torch.Generator().manual_seed(0), dtype=torch.float64)
    hard = gumbel_softmax_sample(logits.double().expand(n, 4), u, tau=0.5, hard=True)
    assert bool(((hard == 0) | (hard == 1)).all()) and bool((hard.sum(1) == 1).all())
    freq = hard.mean(0)
    p = torch.softmax(logits.double(), 0)
    se = torch.sqrt(p * (1 - p) / n)
    assert bool(((freq - p).abs() < 4 * se).all()), (freq, p)
    # the soft sample is softmax((logits + g) / tau) with g = -log(-log u) (Jang et al. eq. 1)
    soft = gumbel_softmax_sample(logits.double(), u[0], tau=0.5)
    g = -np.log(-np.log(u[0].numpy()))
    ref = np.exp((logits.double().numpy() + g) / 0.5)
    np.testing.assert_allclose(soft.numpy(), ref / ref.sum(), rtol=1e-12)
    assert int(soft.argmax()) == int(hard[0].argmax())
    # the selector in training mode draws such samples per region; the same generator gives the same samples
    sel = WidthSelector().train()
    f = np.random.default_rng(2).random((5, 8))
    a = sel(f, generator=torch.Generator().manual_seed(3))
    b = sel(f, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert bool(((a[0] == 0) | (a[0] == 1)).all())


def test_gradients_reach_the_linear_layer_through_region_precision():
    torch.manual_seed(0)
    opts = {"candidates": [2, 4, 8]}
    cfg = QuantConfig(default=LayerConfig(
        weight=TensorConfig(bits=8, granularity="channel", symmetric=True, quantizer="lsq_region", options=opts),
        act=TensorConfig(bits=8, quantizer="lsq_region", options=opts)), first_last_bits=None, fold_bn=False)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 3, padding=1))
    x = torch.rand(2, 3, 8, 8)
    q = bitalloc.prepare(net.eval(), cfg, x)
    with bitalloc.calibration(q):
        q(x)
    q.train()
    sel = WidthSelector().train()
    mask = torch.rand(2, 8, 8) < 0.5
    feats = frame_features((x[:, 0] * 255).to(torch.uint8).numpy(), mask.numpy())
    roi, non = sel(feats, generator=torch.Generator().manual_seed(0))
    with region_precision(q, mask, roi, non):
        loss = (q(x) - x).square().mean()
    bitfl = (roi * torch.tensor([2.0, 4, 8]) ** 2).sum() + (non * torch.tensor([2.0, 4, 8]) ** 2).sum()
    (loss + 1e-3 * bitfl).backward()
    assert sel.fc.weight.grad is not None and bool(sel.fc.weight.grad.abs().sum() > 0)
    assert bool(sel.fc.bias.grad.abs().sum() > 0)
    torch.testing.assert_close(sel.expected_bits(feats),
                               (sel.probabilities(feats) * torch.tensor([2.0, 4, 8])).sum(-1))
