"""Region-masked multi-width LSQ (bitalloc.quantizers.region, bitalloc.model.region).

References: a float64 NumPy fake quantizer per region (LSQ eq. 1-2), bitalloc.quant.lsq's own functions for the
gradients (themselves tested against the LSQ paper's appendix code in test_lsq_pact.py), a brute-force loop for
the block rule of masks at other resolutions, and layer-by-layer recomputation with plain frozen copies for split
execution (fake quant and the integer runtime).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import bitalloc
from bitalloc.config import LayerConfig, QuantConfig, TensorConfig
from bitalloc.errors import ConfigError, ShapeError
from bitalloc.model.region import freeze_at, frozen_branches, region_precision, split_execution
from bitalloc.quant.gates import gumbel_softmax_sample, uniform_noise
from bitalloc.quant.lsq import lsq_bounds, lsq_grad_scale, lsq_quantize
from bitalloc.quantizers import QUANTIZERS, FrozenQuantizer, LSQQuantizer, RegionLSQQuantizer
from bitalloc.quantizers.region import RegionContext, mask_at, max_distribution

pytestmark = pytest.mark.usefixtures("one_thread")

CANDS = (2, 4, 8)


def act_quantizer(bits: int = 8, cands=CANDS, **kw) -> RegionLSQQuantizer:
    cfg = TensorConfig(bits=bits, quantizer="lsq_region", options={"candidates": list(cands)}, **kw)
    return RegionLSQQuantizer(cfg, "act", None, None)


def weight_quantizer(channels: int, bits: int = 8, cands=CANDS) -> RegionLSQQuantizer:
    cfg = TensorConfig(bits=bits, granularity="channel", symmetric=True, quantizer="lsq_region",
                       options={"candidates": list(cands)})
    return RegionLSQQuantizer(cfg, "weight", 0, channels)


def ref_fake_quant(x: torch.Tensor, step: float, bits: int, signed: bool) -> np.ndarray:
    """float64 NumPy LSQ fake quantization s * clip(round(x / s), -Q_N, Q_P), half to even."""
    q_n, q_p = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    r = x.detach().double().numpy() / step
    return step * np.clip(np.rint(r), -q_n, q_p)


def off_tie(x: torch.Tensor, steps: list[float]) -> np.ndarray:
    """Elements whose ratio to every step is not within 1e-4 of a rounding tie (float32 vs float64 rounding)."""
    ok = np.ones(x.shape, dtype=bool)
    for s in steps:
        r = x.detach().double().numpy() / s
        ok &= np.abs(r - np.floor(r) - 0.5) > 1e-4
    return ok


def brute_mask(mask: np.ndarray, h: int, w: int, rule: str, min_fraction: float = 0.5) -> np.ndarray:
    """Loop reference of mask_at (downsampling): blocks of f x f (f the smallest power of two with h f >= H),
    pixels outside the mask counted as non-ROI."""
    big_h, big_w = mask.shape
    f = 1
    while h * f < big_h:
        f *= 2
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            total = 0.0
            for a in range(i * f, (i + 1) * f):
                for b in range(j * f, (j + 1) * f):
                    if a < big_h and b < big_w:
                        total += float(mask[a, b])
            out[i, j] = total / (f * f)
    if rule == "any":
        return out > 0
    if rule == "fraction":
        return out >= min_fraction
    return out


# ---- masks at other resolutions -------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["any", "fraction", "soft"])
@pytest.mark.parametrize("size", [(9, 11), (5, 6), (3, 3), (2, 2), (1, 1), (18, 22)])
def test_mask_at_matches_brute_force(rule, size):
    rng = np.random.default_rng(1)
    mask = rng.random((18, 22)) < 0.3
    got = mask_at(torch.from_numpy(mask), size, rule=rule)
    assert got.shape == (1, 1, *size)
    assert got.dtype == (torch.float32 if rule == "soft" else torch.bool)
    np.testing.assert_allclose(got[0, 0].double().numpy(), brute_mask(mask, *size, rule), rtol=0, atol=1e-7)


def test_mask_at_soft_input_upsampling_and_errors():
    m = torch.tensor([[0.0, 0.25], [1.0, 0.6]])
    assert torch.equal(mask_at(m, (2, 2), rule="fraction")[0, 0], torch.tensor([[False, False], [True, True]]))
    up = mask_at(m > 0.5, (8, 8))[0, 0]
    assert torch.equal(up, (m > 0.5).repeat_interleave(4, 0).repeat_interleave(4, 1))
    with pytest.raises(ShapeError):
        mask_at(torch.ones(16, 16, dtype=torch.bool), (8, 2))  # factors 2 and 8 differ
    with pytest.raises(ShapeError):
        mask_at(torch.ones(4, 4, dtype=torch.bool), (12, 12))  # not a power-of-two upsampling
    with pytest.raises(ConfigError):
        mask_at(torch.ones(4, 4, dtype=torch.bool), (2, 2), rule="median")


# ---- the quantizer --------------------------------------------------------------------------------------------

def test_registered_and_initialised_per_lsq_at_every_width():
    assert QUANTIZERS["lsq_region"] is RegionLSQQuantizer
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8).relu()
    w = torch.randn(5, 3, 3, 3)
    q = act_quantizer()
    q(x)  # the first batch initialises
    wq = weight_quantizer(5)
    wq.calibrate_weight(w)
    for k, b in enumerate(CANDS):
        lsq = LSQQuantizer(TensorConfig(bits=b, quantizer="lsq"), "act", None, None)
        lsq(x)
        torch.testing.assert_close(q.steps[k].detach(), lsq.step.detach(), rtol=1e-6, atol=0)  # exp(ln s)
        wl = LSQQuantizer(TensorConfig(bits=b, granularity="channel", symmetric=True, quantizer="lsq"), "weight", 0, 5)
        wl.calibrate_weight(w)
        torch.testing.assert_close(wq.steps[k].detach(), wl.step.detach(), rtol=1e-6, atol=0)
    assert not q.is_signed and wq.is_signed
    # outside any context: LSQ at the default width, bitwise
    lsq8 = LSQQuantizer(TensorConfig(bits=8, quantizer="lsq"), "act", None, None)
    lsq8(x)
    with torch.no_grad():  # the same step (exp(ln s) is within an ulp of LSQ's)
        lsq8.step.copy_(q.steps[CANDS.index(8)])
    assert torch.equal(q(x), lsq8(x))


def test_config_errors():
    with pytest.raises(ConfigError, match="candidates"):
        act_quantizer(bits=3)
    with pytest.raises(ConfigError, match="candidates"):
        RegionLSQQuantizer(TensorConfig(bits=8, quantizer="lsq_region", options={"candidates": [1, 8]}), "act", None,
                           None)
    with pytest.raises(ConfigError, match="candidates"):
        RegionLSQQuantizer(TensorConfig(bits=8, quantizer="lsq_region", options={"candidates": "8"}), "act", None, None)
    q = act_quantizer()
    q(torch.rand(1, 2, 4, 4))
    q.region = RegionContext(torch.ones(4, 4, dtype=torch.bool), 8, 3)
    with pytest.raises(ConfigError, match="not a candidate"):
        q(torch.rand(1, 2, 4, 4))
    q.region = RegionContext(torch.ones(4, 4, dtype=torch.bool), 8, 4)
    with pytest.raises(ShapeError, match="spatial"):
        q(torch.rand(3, 2))
    with pytest.raises(ConfigError, match="two bit widths"):
        q.qparams()


@pytest.mark.parametrize("grad", [False, True])
def test_activation_regions_match_float64_reference(grad):
    torch.manual_seed(1)
    q = act_quantizer(one_sided=False)
    x = torch.randn(2, 3, 12, 10)
    q(x)
    mask = torch.rand(2, 12, 10) < 0.4
    q.region = RegionContext(mask, roi=8, non_roi=2)
    xin = x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y = q(xin)
    s8, s2 = float(q.steps.detach()[2]), float(q.steps.detach()[0])
    ref = np.where(mask[:, None].numpy(), ref_fake_quant(x, s8, 8, True), ref_fake_quant(x, s2, 2, True))
    ok = off_tie(x, [s8, s2])
    assert ok.mean() > 0.99
    np.testing.assert_allclose(y.detach().double().numpy()[ok], ref[ok], rtol=1e-6, atol=1e-7)
    assert 0 < mask.float().mean() < 1  # both regions exercised


def test_step_gradients_per_region_equal_lsq():
    torch.manual_seed(2)
    q = act_quantizer()
    x = torch.randn(2, 4, 8, 8).abs() * 3
    q(x)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, 2:6, 1:5] = True
    q.region = RegionContext(mask, roi=4, non_roi=2)
    xin = x.clone().requires_grad_(True)
    up = torch.randn_like(x)
    (q(xin) * up).sum().backward()

    # reference: LSQ (bitalloc.quant.lsq) on the whole tensor at each width, selected by the mask
    x2 = x.clone().requires_grad_(True)
    steps = q.steps.detach().clone().requires_grad_(True)
    n = x[0].numel()
    m = mask[:, None].float()
    outs = []
    for k, b in ((1, 4), (0, 2)):
        q_n, q_p = lsq_bounds(b, False)
        outs.append(lsq_quantize(x2, steps[k], q_n, q_p, lsq_grad_scale(n, q_p)))
    ((m * outs[0] + (1 - m) * outs[1]) * up).sum().backward()
    # the parameter is ln s: its gradient is the step's times s (chain rule)
    torch.testing.assert_close(q.log_steps.grad, steps.grad * steps.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xin.grad, x2.grad)
    assert q.log_steps.grad[2] == 0 and q.log_steps.grad[0] != 0 and q.log_steps.grad[1] != 0


def test_adam_moves_every_width_step_by_the_same_relative_amount():
    """Regression: with linear-domain steps one Adam learning rate moved the 16-bit steps (~1e-4) by many times
    their size (some turned negative); in the log domain an update is a relative change at every width."""
    torch.manual_seed(5)
    cfg = TensorConfig(bits=8, granularity="channel", symmetric=True, quantizer="lsq_region",
                       options={"candidates": [4, 8, 16], "init": "range"})
    w = torch.randn(6, 4, 3, 3)
    q = RegionLSQQuantizer(cfg, "weight", 0, 6)
    q.calibrate_weight(w)
    start = q.steps.detach().clone()
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    target = torch.randn_like(w)
    for i in range(60):
        for k in range(3):
            q.branch = k
            loss = (q(w) - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    q.branch = None
    ratio = q.steps.detach() / start  # Adam moves ln s by at most ~lr per update: 180 updates -> within e^(+-0.2)
    assert bool((ratio > math.exp(-0.25)).all()) and bool((ratio < math.exp(0.25)).all()), ratio
    assert bool((ratio != 1).any())  # the steps did learn


def test_gumbel_weights_mix_and_one_hot_limit():
    torch.manual_seed(3)
    q = act_quantizer()
    x = torch.rand(3, 2, 6, 6) * 2
    q(x)
    mask = torch.rand(3, 6, 6) < 0.5
    with torch.no_grad():
        q.region = RegionContext(mask, 8, 2)
        hard = q(x)
        # one-hot weight vectors (per sample, [B, K]) are exactly the integer widths
        q.region = RegionContext(mask, torch.tensor([[0.0, 0.0, 1.0]] * 3), torch.tensor([1.0, 0.0, 0.0]))
        assert torch.equal(q(x), hard)
        # soft weights: the weighted mix of the K fake-quantized tensors in each region
        r, n = torch.tensor([0.2, 0.3, 0.5]), torch.tensor([[0.6, 0.4, 0.0], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]])
        q.region = RegionContext(mask, r, n)
        soft = q(x)
        per_k = [q.quantize_at(x, k) for k in range(3)]
        m = mask[:, None].float()
        ref = sum((m * r[k] + (1 - m) * n[:, k].reshape(3, 1, 1, 1)) * per_k[k] for k in range(3))
        torch.testing.assert_close(soft, ref)
    # straight-through hard Gumbel samples: forward exactly the chosen widths, gradient to the logits
    logits = torch.randn(2, 3, requires_grad=True)
    w = gumbel_softmax_sample(logits, uniform_noise((2, 3), torch.Generator().manual_seed(0)), hard=True)
    q.region = RegionContext(mask, w[:1].expand(3, 3), w[1:].expand(3, 3))
    y = q(x)
    chosen = [CANDS[int(i)] for i in w.detach().argmax(1)]
    with torch.no_grad():
        q.region = RegionContext(mask, chosen[0], chosen[1])
        assert torch.equal(y.detach(), q(x))
    y.sum().backward()
    assert logits.grad is not None and bool(logits.grad.abs().sum() > 0)


def test_mask_broadcasts_across_resolutions():
    torch.manual_seed(4)
    q = act_quantizer()
    q(torch.rand(2, 3, 8, 8))
    luma = torch.rand(2, 36, 44) < 0.3  # reference (luma) resolution
    ctx = RegionContext(luma, 8, 2)
    q.region = ctx
    for size in ((18, 22), (9, 11), (5, 6), (3, 3)):
        x = torch.rand(2, 3, *size) * 3
        with torch.no_grad():
            y = q(x)
        m = torch.from_numpy(np.stack([brute_mask(luma[b].numpy(), *size, "any") for b in range(2)]))[:, None]
        ref = torch.where(m, q.quantize_at(x, 2), q.quantize_at(x, 0))
        assert torch.equal(y, ref)
    # one mask for the whole batch, a mask function, per-sample widths
    q.region = RegionContext(lambda hw: torch.ones(1, 1, *hw, dtype=torch.bool),
                             torch.tensor([[0, 0, 1.0], [0, 1.0, 0]]), 2)
    x = torch.rand(2, 3, 5, 5)
    with torch.no_grad():
        y = q(x)
    assert torch.equal(y[0], q.quantize_at(x, 2)[0]) and torch.equal(y[1], q.quantize_at(x, 1)[1])
    q.region = RegionContext(torch.ones(3, 5, 5, dtype=torch.bool), 8, 2)
    with pytest.raises(ShapeError):
        q(torch.rand(2, 3, 5, 5))  # masks for 3 samples, a batch of 2


def test_weights_description_and_frozen_forms():
    torch.manual_seed(5)
    wq = weight_quantizer(4)
    w = torch.randn(4, 3, 3, 3)
    wq.calibrate_weight(w)
    mask = torch.rand(1, 6, 6) < 0.5
    wq.region = RegionContext(mask, 4, 8, mode="mask")
    assert int(wq.qparams().bits.max()) == 8  # weights at the larger width
    with torch.no_grad():
        assert torch.equal(wq(w), wq.quantize_at(w, 2))
    assert set(wq.region_qparams()) == {"roi", "non_roi"}
    assert int(wq.region_qparams()["roi"].bits.max()) == 4
    for b in CANDS:
        fq = wq.frozen_at(b)
        assert isinstance(fq, FrozenQuantizer) and int(fq.bits.max()) == b
        with torch.no_grad():
            assert torch.equal(fq(w), wq.quantize_at(w, CANDS.index(b)))
    # max rule: one-hot in, one-hot out; soft: distribution of the max of independent choices (brute force)
    r, n = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.6, 0.1, 0.3])
    brute = torch.zeros(3)
    for i in range(3):
        for j in range(3):
            brute[max(i, j)] += r[i] * n[j]
    torch.testing.assert_close(max_distribution(r, n), brute)
    one_hot = max_distribution(torch.tensor([0, 1.0, 0]), torch.tensor([1.0, 0, 0]))
    assert torch.equal(one_hot, torch.tensor([0, 1.0, 0]))
    wq.region = RegionContext(mask, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), 2, mode="mask")
    with pytest.raises(ConfigError, match="split"):
        wq(w)  # one weight tensor cannot take two samples' widths


# ---- models: split layers, frozen branches, integer execution -------------------------------------------------

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1)
        self.up = nn.PixelShuffle(2)
        self.c3 = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return self.c3(self.up(torch.relu(self.c2(torch.relu(self.c1(x))))))


def prepared_tiny(seed: int = 0):
    torch.manual_seed(seed)
    opts = {"candidates": list(CANDS)}
    cfg = QuantConfig(default=LayerConfig(
        weight=TensorConfig(bits=8, granularity="channel", symmetric=True, quantizer="lsq_region", options=opts),
        act=TensorConfig(bits=8, quantizer="lsq_region", options=opts)), first_last_bits=None, fold_bn=False)
    x = torch.randn(2, 3, 16, 12)
    q = bitalloc.prepare(Tiny().eval(), cfg, x)
    with bitalloc.calibration(q):
        q(x)
    return q, x


def test_split_layers_equal_layerwise_frozen_recomputation():
    q, x = prepared_tiny()
    mask = torch.zeros(2, 16, 12, dtype=torch.bool)
    mask[0, 3:9, 2:7] = True
    mask[1, 10:, 6:] = True
    with torch.no_grad(), region_precision(q, mask, 8, 2):
        y = q(x)
    f8, f2 = freeze_at(q, 8), freeze_at(q, 2)
    with torch.no_grad():
        def layer(a, b, name, inp):
            la, lb = getattr(f8, name), getattr(f2, name)
            out_a, out_b = la(inp), lb(inp)
            m = mask_at(mask, out_a.shape[-2:])
            return torch.where(m, out_a, out_b)
        h = torch.relu(layer(f8, f2, "c1", x))
        h = q.up(torch.relu(layer(f8, f2, "c2", h)))
        ref = layer(f8, f2, "c3", h)
    assert torch.equal(y, ref)
    with torch.no_grad():
        assert not torch.equal(y, f8(x)) and not torch.equal(y, f2(x))
        f4 = freeze_at(q, 4)
        with region_precision(q, mask, 4, 4):  # equal widths: the frozen model at that width
            assert torch.equal(q(x), f4(x))
    assert "forward" not in q.c1.__dict__ and q.c1.weight_quantizer.region is None  # restored


def test_frozen_branches_and_integer_execution_are_exact():
    from bitalloc.runtime.integer import integer_mode

    q, x = prepared_tiny(1)
    mask = torch.rand(2, 16, 12) < 0.3
    with torch.no_grad(), region_precision(q, mask, 8, 4):
        learned = q(x)
    nets = frozen_branches(q)
    assert sorted(nets) == list(CANDS)
    with torch.no_grad(), split_execution(nets, mask, 8, 4) as run:
        assert torch.equal(run(x), learned)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad(), integer_mode(nets[8], kernel="float", strict=True), \
                integer_mode(nets[4], kernel="float", strict=True), split_execution(nets, mask, 8, 4) as run:
            results.append(run(x))
    torch.set_num_threads(1)
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(results[0], learned, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="no frozen branch"):
        with split_execution(nets, mask, 16, 4):
            pass


def test_soft_split_training_mixes_outputs_and_trains_steps_and_selector():
    q, x = prepared_tiny(2)
    q.train()
    mask = torch.rand(2, 16, 12) < 0.5
    logits = torch.zeros(2, 2, 3, requires_grad=True)
    u = uniform_noise((2, 2, 3), torch.Generator().manual_seed(1))
    w = gumbel_softmax_sample(logits, u, tau=1.0, hard=False)
    with region_precision(q, mask, w[:, 0], w[:, 1]):
        y = q.c1(x)
    # reference: the layer at each candidate (branch), mixed at the output's resolution
    outs = []
    for k in range(3):
        with region_precision(q, mask, CANDS[k], CANDS[k]):
            outs.append(q.c1(x))
    m = mask_at(mask, y.shape[-2:]).float()
    ref = sum((m * w[:, 0, k].reshape(2, 1, 1, 1) + (1 - m) * w[:, 1, k].reshape(2, 1, 1, 1)) * outs[k]
              for k in range(3))
    torch.testing.assert_close(y, ref)
    y.square().mean().backward()
    assert logits.grad is not None and bool(logits.grad.abs().sum() > 0)
    assert bool((q.c1.weight_quantizer.log_steps.grad != 0).all())
    assert bool((q.c1.input_quantizer.log_steps.grad != 0).all())


def test_freeze_outside_context_is_the_default_width_and_cost_reads_widths():
    q, x = prepared_tiny(3)
    frozen = bitalloc.freeze(q)
    with torch.no_grad():
        assert torch.equal(frozen(x), freeze_at(q, 8)(x))
    rep = bitalloc.cost_report(q, x[:1])
    with region_precision(q, torch.ones(1, 1, 1, 1, dtype=torch.bool), 4, 4):
        rep4 = bitalloc.cost_report(q, x[:1])
    for a, b in zip(rep.layers, rep4.layers):
        assert a.bops == 64 * a.macs and b.bops == 16 * b.macs
    with region_precision(q, torch.rand(1, 16, 12) < 0.5, 8, 2):
        with pytest.raises(ConfigError, match="region context"):
            freeze_at(q, 8)
        with torch.no_grad():
            assert math.isfinite(float(q(x).sum()))
