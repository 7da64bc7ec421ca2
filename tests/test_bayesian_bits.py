"""Bayesian Bits: decomposition, gates, expected bits, regulariser, autoregressive structure, parameter count.

References used here are independent of the implementation: direct quantization on the grid of each level
(float64), the hard-concrete closed forms checked by Monte Carlo, and brute-force enumeration of all gate
configurations for expected bits and the regulariser.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from bitalloc.config import TensorConfig
from bitalloc.errors import ConfigError
from bitalloc.quant import bayesian_bits as BB
from bitalloc.quant import gates as G
from bitalloc.quantizers import BayesianBitsQuantizer


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- decomposition ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False])
def test_nested_scales_closed_form(signed):
    a = torch.tensor(1.7, dtype=torch.float64)
    s2 = BB.range_width(a, signed) / 3
    for bits, s in zip(BB.LEVELS, BB.nested_scales(s2)):
        width = 2 * 1.7 if signed else 1.7
        assert float(s) == pytest.approx(width / (2 ** bits - 1), rel=1e-12)
        assert float(s) == pytest.approx(float(BB.level_scale(a, bits, signed)), rel=1e-12)


@pytest.mark.parametrize("signed", [True, False])
def test_sum_of_first_k_terms_equals_direct_quantization(signed):
    """Paper eq. 3: x2 + e4 + ... + e_{2^k} == s_{2^k} round(x / s_{2^k}) at every level (float64)."""
    torch.manual_seed(0)
    a = torch.tensor(1.3, dtype=torch.float64)
    x = torch.randn(20000, dtype=torch.float64) * 0.9 + (0.0 if signed else 0.6)
    xc = BB.clip_to_range(x, a, signed)
    scales = BB.nested_scales(BB.range_width(a, signed) / 3)
    terms = BB.residual_terms(xc, scales, torch.round)
    acc = torch.zeros_like(x)
    for k, bits in enumerate(BB.LEVELS):
        acc = acc + terms[k]
        s = BB.level_scale(a, bits, signed)
        direct = BB.direct_quantize(xc, a, bits, signed)
        codes_nested = torch.round(acc / s)
        assert torch.equal(codes_nested, torch.round(xc / s)), bits
        assert torch.allclose(acc, direct, rtol=0, atol=1e-9 * float(s) * 2 ** bits), bits
        # codes stay in the grid's range: signed [-(2^(b-1)-1), 2^(b-1)-1], unsigned [0, 2^b-1]
        lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        assert float(codes_nested.min()) >= lo and float(codes_nested.max()) <= hi
        if bits <= 8:  # every code of the grid is used by enough data
            assert float(codes_nested.max()) == hi


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_collapsed_terms_equal_the_full_decomposition_in_values_and_gradients(signed, per_channel):
    """Leading gates at exactly 1 folded into one direct quantization: same output and straight-through
    gradients (to the input, the range and the remaining gates) as the term-by-term decomposition (float64)."""
    torch.manual_seed(11)
    shape = (6, 50)
    x0 = torch.randn(shape, dtype=torch.float64) * 0.8 + (0.0 if signed else 0.5)
    a0 = (torch.rand(6, 1, dtype=torch.float64) + 0.7) if per_channel else torch.tensor(1.1, dtype=torch.float64)
    tail = [0.63, 0.0, 0.37, 0.81]
    for j in range(len(BB.LEVELS)):  # j leading gates at 1, then partial / off gates
        gate_vals = [1.0] * j + tail[: len(BB.LEVELS) - 1 - j]
        results = []
        for collapsed in (0, j):
            x = x0.clone().requires_grad_(True)
            a = a0.clone().requires_grad_(True)
            gates = [torch.tensor(g, dtype=torch.float64, requires_grad=True) for g in gate_vals]
            xc = BB.clip_to_range(x, a, signed)
            scales = BB.nested_scales(BB.range_width(a, signed) / 3)
            terms = BB.residual_terms(xc, scales, BB.round_ste, collapsed=collapsed)
            assert len(terms) == len(BB.LEVELS) - collapsed
            y = BB.gated_sum(terms, [None] + gates[collapsed:])
            (y * torch.linspace(-1, 2, y.numel(), dtype=torch.float64).view(shape)).sum().backward()
            grads = [g.grad if g.grad is not None else torch.zeros(()) for g in gates[j:]]
            results.append((y.detach(), x.grad, a.grad, grads))
        (y0, gx0, ga0, gz0), (y1, gx1, ga1, gz1) = results
        assert torch.allclose(y0, y1, rtol=0, atol=1e-12), j
        assert torch.allclose(gx0, gx1, rtol=0, atol=1e-12), j
        assert torch.allclose(ga0, ga1, rtol=1e-9, atol=1e-12), j
        assert float(ga0.abs().sum()) > 0
        for g0, g1 in zip(gz0, gz1):
            assert torch.allclose(g0.double(), g1.double(), rtol=1e-9, atol=1e-12), j
    with pytest.raises(ValueError, match="collapsed"):
        BB.residual_terms(x0, BB.nested_scales(torch.tensor(1.0, dtype=torch.float64), 3), collapsed=3)


def test_training_gradients_equal_the_full_decomposition_with_the_sampled_gates():
    """The quantizer's training forward (collapsing gates sampled at exactly 1) gives the gradients of the
    term-by-term decomposition with the same differentiable gate samples, to the input, range and log-alpha."""
    torch.manual_seed(12)
    q = make_bb(role="act", channels=3, gate_init=[6.0, 4.0, 0.3, -1.0], skip_below=None)
    x0 = torch.relu(torch.randn(8, 3, 5, 5)) + 0.05 * torch.randn(8, 3, 5, 5)
    q.train()
    q(x0)  # initialises the range (signed: the data has negative values)
    assert q.is_signed
    seen, gate_grad_seen = set(), False
    for _ in range(40):
        step = int(q.noise_step)
        q.zero_grad()
        x = x0.clone().requires_grad_(True)
        weights = torch.randn_like(x0)
        (q(x) * weights).sum().backward()
        grad_or_0 = lambda p: torch.zeros_like(p) if p.grad is None else p.grad.clone()  # noqa: E731
        got = (x.grad, grad_or_0(q.clip_max), grad_or_0(q.log_alpha))
        seen.add(BB.leading_ones(q.last_gates))
        gate_grad_seen = gate_grad_seen or float(got[2].abs().sum()) > 0
        q.noise_step.fill_(step)
        q.zero_grad()
        gates, _ = q.sample_gates()
        x = x0.clone().requires_grad_(True)
        a, signed = q._range(), q.is_signed
        xc = BB.clip_to_range(x, a, signed)
        terms = BB.residual_terms(xc, BB.nested_scales(BB.range_width(a, signed) / 3), BB.round_ste)
        (BB.gated_sum(terms, [None] + gates) * weights).sum().backward()
        assert torch.allclose(got[0], x.grad, atol=1e-6)
        assert torch.allclose(got[1], grad_or_0(q.clip_max), rtol=1e-4, atol=1e-4)
        assert float(got[1].abs()) > 0
        assert torch.allclose(got[2], grad_or_0(q.log_alpha), rtol=1e-4, atol=1e-5)
    assert {1, 2} <= seen  # both collapsed prefixes occurred
    assert gate_grad_seen  # and samples strictly between 0 and 1 that pass gradients to log-alpha


def test_hard_concrete_gate_at_log_alpha_6_is_exactly_one_99_percent_of_the_time():
    """Why collapsing pays: P(z = 1) = 1 - sigmoid(beta log((1 - gamma) / (zeta - 1)) - log_alpha) (Monte Carlo)."""
    u = G.uniform_noise((200_000,), torch.Generator().manual_seed(3))
    z = G.hard_concrete_sample(torch.tensor(6.0), u)
    closed = 1.0 - 1.0 / (1.0 + math.exp(-(G.HC_BETA * math.log((1 - G.HC_GAMMA) / (G.HC_ZETA - 1)) - 6.0)))
    assert float((z == 1.0).double().mean()) == pytest.approx(closed, abs=3e-3)
    assert closed > 0.98


def test_gated_sum_selects_the_level_and_prunes():
    torch.manual_seed(1)
    a = torch.tensor(1.0, dtype=torch.float64)
    x = torch.randn(3, 50, dtype=torch.float64)
    xc = BB.clip_to_range(x, a, True)
    terms = BB.residual_terms(xc, BB.nested_scales(BB.range_width(a, True) / 3), torch.round)
    for on in range(5):  # z4..z32: the first `on` gates on
        gates = [None] + [1.0] * on + [0.0] * (4 - on)
        out = BB.gated_sum(terms, gates)
        assert torch.allclose(out, BB.direct_quantize(xc, a, BB.LEVELS[on], True), atol=1e-9)
    # a gate above an off gate changes nothing (multiplicative structure)
    assert torch.equal(BB.gated_sum(terms, [None, 0.0, 1.0, 1.0, 1.0]), BB.gated_sum(terms, [None, 0.0, 0.0, 0.0, 0.0]))
    z2 = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64).view(3, 1)
    out = BB.gated_sum(terms, [z2, 1.0, 0.0, 0.0, 0.0])
    assert torch.equal(out[1], torch.zeros(50, dtype=torch.float64))
    assert BB.bits_from_gates([1, 1, 0, 1]) == 8 and BB.bits_from_gates([0, 1, 1, 1]) == 2


# ---- gates -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("log_alpha", [-3.0, -0.5, 0.0, 1.2, 4.0])
def test_hard_concrete_probabilities_monte_carlo(log_alpha):
    n = 200_000
    gen = torch.Generator().manual_seed(2)
    u = G.uniform_noise((n,), gen, dtype=torch.float64)
    la = torch.tensor(log_alpha, dtype=torch.float64)
    z = G.hard_concrete_sample(la, u)
    p_pos = float(G.hard_concrete_prob_nonzero(la))
    # closed form: sigmoid(log_alpha - beta log(-gamma/zeta))
    assert p_pos == pytest.approx(1 / (1 + math.exp(-(log_alpha - (2 / 3) * math.log(0.1 / 1.1)))), rel=1e-12)
    assert float(G.hard_concrete_prob_zero(la)) == pytest.approx(1 - p_pos, rel=1e-9, abs=1e-12)
    tol = 4 * math.sqrt(p_pos * (1 - p_pos) / n) + 1e-4
    assert float((z > 0).double().mean()) == pytest.approx(p_pos, abs=tol)
    assert float(z.min()) >= 0 and float(z.max()) <= 1
    # P(z = 1) = P(s >= (1 - gamma)/(zeta - gamma)) = sigmoid(log_alpha - beta * logit((1 - gamma)/(zeta - gamma)))
    t1 = 1.1 / 1.2
    p_one = 1 / (1 + math.exp(-(log_alpha - (2 / 3) * math.log(t1 / (1 - t1)))))
    assert float((z == 1).double().mean()) == pytest.approx(p_one, abs=4 * math.sqrt(p_one * (1 - p_one) / n) + 1e-4)


def test_test_time_gate_thresholds_prob_zero():
    la = torch.linspace(-4, 4, 801)
    gate = G.hard_concrete_test_gate(la)
    assert torch.equal(gate, (G.hard_concrete_prob_zero(la) < 0.34).float())
    # the switch point: P(z=0) = 0.34 <=> log_alpha = beta log(-gamma/zeta) - logit(0.34)
    la0 = (2 / 3) * math.log(0.1 / 1.1) - math.log(0.34 / 0.66)
    assert float(G.hard_concrete_test_gate(torch.tensor(la0 + 1e-3))) == 1.0
    assert float(G.hard_concrete_test_gate(torch.tensor(la0 - 1e-3))) == 0.0


def test_gumbel_gates_monte_carlo():
    n = 100_000
    gen = torch.Generator().manual_seed(3)
    u = G.uniform_noise((n,), gen, dtype=torch.float64)
    logit = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    z = G.gumbel_sample(logit, u, tau=0.5, hard=True)
    p = float(G.gumbel_prob_on(logit.detach()))
    assert set(torch.unique(z.detach()).tolist()) <= {0.0, 1.0}
    assert float(z.detach().mean()) == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))
    z.sum().backward()  # straight-through: the relaxed sample's gradient
    assert float(logit.grad) > 0
    assert float(G.gumbel_test_gate(torch.tensor(0.1))) == 1.0 and float(G.gumbel_test_gate(torch.tensor(-0.1))) == 0.0


# ---- expected bits and the regulariser: brute force over all gate configurations ---------------------------

def _configs(probs: list[float]):
    for cfg in itertools.product([0, 1], repeat=len(probs)):
        p = math.prod(q if c else 1 - q for c, q in zip(cfg, probs))
        yield cfg, p


def test_expected_bits_brute_force():
    probs = [0.9, 0.6, 0.3, 0.2]
    brute = sum(p * BB.bits_from_gates(list(cfg)) for cfg, p in _configs(probs))
    assert float(BB.expected_bits(torch.tensor(probs, dtype=torch.float64))) == pytest.approx(brute, rel=1e-12)
    assert float(BB.expected_bits(torch.tensor([1.0, 1.0, 0.0, 0.0]))) == 8.0


def test_regularizer_brute_force_and_reference_formula():
    """R = r * E_c[ sum_k bits_k * 1(gates z2..z_k all on) ] under independent gates (the AR product form)."""
    probs = [0.8, 0.5, 0.4, 0.1]
    q2 = torch.tensor([0.9, 0.3, 1.0], dtype=torch.float64)
    r = 0.37
    brute = 0.0
    for c in range(3):
        for cfg, p in _configs([float(q2[c])] + probs):
            on = 0
            for g in cfg:
                if not g:
                    break
                on += 1
            brute += p * sum(BB.LEVELS[k] for k in range(on))
    brute = r * brute / 3
    got = BB.regularizer(torch.tensor(probs, dtype=torch.float64), r, q2)
    assert float(got) == pytest.approx(brute, rel=1e-12)
    # the reference code's kl_b2 + kl_b4 + ... summed over channels / C
    q4, q8, q16, q32 = probs
    ref = (r * 2 * q2 + q2 * r * 4 * q4 + q2 * q4 * r * 8 * q8 + q2 * q4 * q8 * r * 16 * q16
           + q2 * q4 * q8 * q16 * r * 32 * q32).sum() / 3
    assert float(got) == pytest.approx(float(ref), rel=1e-12)
    # no pruning gate: q2 = 1
    assert float(BB.regularizer(torch.tensor(probs), 1.0)) == pytest.approx(2 + 4 * 0.8 + 8 * 0.4 + 16 * 0.16 + 32 * 0.016, rel=1e-6)


def test_autoregressive_regulariser_does_not_regularise_gates_above_an_off_gate():
    la = torch.tensor([-30.0, 3.0, 3.0, 3.0], requires_grad=True)  # z4 certainly off
    BB.regularizer(G.hard_concrete_prob_nonzero(la), 1.0).backward()
    assert la.grad[1:].abs().max() < 1e-9  # z8.. get (essentially) no regularisation gradient
    # with independent (non-autoregressive) terms they would be pushed down
    la2 = la.detach().clone().requires_grad_(True)
    p = G.hard_concrete_prob_nonzero(la2)
    (4 * p[0] + 8 * p[1] + 16 * p[2] + 32 * p[3]).backward()
    assert float(la2.grad[1:].abs().min()) > 1e-3
    # a gate whose lower gates are on is regularised in proportion to their probability
    la3 = torch.tensor([3.0, 0.0, 3.0, 3.0], requires_grad=True)
    BB.regularizer(G.hard_concrete_prob_nonzero(la3), 1.0).backward()
    assert float(la3.grad[1]) > 0


# ---- the quantizer ----------------------------------------------------------------------------------------

def make_bb(role="weight", channels=4, **options) -> BayesianBitsQuantizer:
    cfg = TensorConfig(bits=32, symmetric=role == "weight", quantizer="bb", options=options)
    return BayesianBitsQuantizer(cfg, role, 0 if role == "weight" else 1, channels)


def test_data_term_blocks_gradients_above_a_sampled_off_gate():
    torch.manual_seed(4)
    q = make_bb(gate_init=[-1.0, 3.0, 3.0, 3.0], skip_below=None)
    w = torch.randn(4, 10)
    q.calibrate_weight(w)
    q.train()
    seen_off = seen_on = False
    for _ in range(60):
        q.zero_grad()
        y = q(w.clone().requires_grad_(True))
        (y ** 2).sum().backward()
        z4 = q.last_gates[0]
        g = q.log_alpha.grad
        if z4 == 0.0:
            seen_off = True
            assert g is None or float(g.abs().sum()) == 0.0  # neither z4 (clamped at 0) nor the gates above get a gradient
        elif 0.0 < z4 < 1.0:
            seen_on = True
            assert float(g[0].abs()) > 0
    assert seen_off and seen_on


def test_skip_below_turns_low_gates_off_in_training():
    q = make_bb(gate_init=[6.0, -2.5, 6.0, 6.0])
    w = torch.randn(4, 10)
    q.calibrate_weight(w)
    q.train()
    q(w)
    assert q.last_gates[1:] == [0.0, 0.0, 0.0]
    assert q.last_gates[0] > 0
    assert q.test_bits() == 4


def test_quantizer_eval_is_the_thresholded_grid_and_kept_mask():
    torch.manual_seed(5)
    q = make_bb(gate_init=[6.0, 6.0, -6.0, 6.0], prune_init=6.0)
    w = torch.randn(4, 3, 3, 3)
    q.calibrate_weight(w)
    with torch.no_grad():
        q.log_alpha_prune[1] = -6.0
    q.eval()
    assert q.test_bits() == 8  # z16 off stops the chain even though z32 is on
    assert q.kept_mask().tolist() == [True, False, True, True]
    p = q.qparams()
    assert int(p.qmin) == -127 and int(p.qmax) == 127 and p.signed
    assert float(p.scale) == pytest.approx(2 * float(w.abs().max()) / 255, rel=1e-6)
    with torch.no_grad():
        y = q(w)
    assert torch.equal(y, p.dequantize(p.quantize(w)))
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    # the test-time grid equals the nested decomposition with 0/1 gates (up to float rounding of the steps)
    a = q._range().double()
    xc = BB.clip_to_range(w.double(), a, True)
    ref = BB.direct_quantize(xc, a, 8, True) * torch.tensor([1.0, 0, 1, 1], dtype=torch.float64).view(4, 1, 1, 1)
    assert torch.allclose(y.double(), ref, atol=1e-6)
    assert q.bits_per_channel().tolist() == [8.0]
    q.train()
    exp = 2 + 2 * float(G.hard_concrete_prob_nonzero(torch.tensor(6.0))) * (
        1 + 2 * float(G.hard_concrete_prob_nonzero(torch.tensor(6.0))) * (1 + 2 * float(G.hard_concrete_prob_nonzero(torch.tensor(-6.0)))
                                                                           * (1 + 2 * float(G.hard_concrete_prob_nonzero(torch.tensor(6.0))))))
    assert float(q.bits_per_channel()) == pytest.approx(exp, rel=1e-6)


def test_training_forward_equals_nested_decomposition_with_its_gates():
    torch.manual_seed(6)
    q = make_bb(role="act", channels=3, gate_init=[2.0, 1.0, 0.5, 0.0], skip_below=None)
    x = torch.relu(torch.randn(5, 3, 4, 4))
    q.train()
    q(x)  # initialises the range from the first batch
    assert not q.is_signed and float(q.clip_max.detach()) == pytest.approx(float(x.max()))
    step = int(q.noise_step)
    y = q(x)
    gates = q.last_gates
    a = q._range()
    xc = BB.clip_to_range(x, a, False)
    terms = BB.residual_terms(xc, BB.nested_scales(BB.range_width(a, False) / 3), torch.round)
    assert torch.allclose(y, BB.gated_sum(terms, [None] + [torch.tensor(g) for g in gates]), atol=1e-6)
    # the noise is a function of (noise_key, noise_step): replaying the step replays the gates
    q.noise_step.fill_(step)
    q(x)
    assert q.last_gates == gates


def test_per_channel_weight_ranges():
    """granularity="channel": one learned range per output channel (bit gates per tensor). Reference: each
    channel quantized on its own as a per-tensor quantizer with that channel's range (float64 nested
    decomposition in training, direct quantization on the thresholded grid at test time); freezing is exact."""
    from bitalloc.model.freeze import freeze_quantizer

    torch.manual_seed(8)
    w = torch.randn(4, 3, 3, 3) * torch.tensor([0.01, 0.1, 1.0, 10.0]).view(4, 1, 1, 1)  # BN-folded scales
    cfg = TensorConfig(bits=32, granularity="channel", symmetric=True, quantizer="bb",
                       options={"gate_init": [6.0, 3.0, -6.0, -6.0], "skip_below": None, "prune": False})
    q = BayesianBitsQuantizer(cfg, "weight", 0, 4)
    q.calibrate_weight(w)
    assert q.clip_max.shape == (4,)
    assert torch.allclose(q.clip_max.detach(), w.abs().amax(dim=(1, 2, 3)))
    q.train()
    y = q(w)
    gates = [torch.tensor(g, dtype=torch.float64) for g in q.last_gates]
    for c in range(4):
        a = q._range()[c].detach().double()
        xc = BB.clip_to_range(w[c].double(), a, True)
        terms = BB.residual_terms(xc, BB.nested_scales(BB.range_width(a, True) / 3), torch.round)
        assert torch.allclose(y[c].double(), BB.gated_sum(terms, [None] + gates), rtol=1e-5, atol=1e-6 * float(a))
    y.sum().backward()
    assert q.clip_max.grad.shape == (4,)  # each channel's range learns from its own channel
    q.eval()
    bits = q.test_bits()
    with torch.no_grad():
        y = q(w)
    for c in range(4):
        a = q._range()[c].detach().double()
        ref = BB.direct_quantize(BB.clip_to_range(w[c].double(), a, True), a, bits, True)
        assert torch.allclose(y[c].double(), ref, rtol=1e-5, atol=1e-6 * float(a))
    p = q.qparams()
    assert p.scale.shape == (4,) and p.per_channel and int(p.qmax.max()) == (1 << (bits - 1)) - 1
    frozen = freeze_quantizer(q)
    with torch.no_grad():
        assert torch.equal(frozen(w), y)
    with pytest.raises(ConfigError, match="per tensor"):
        BayesianBitsQuantizer(TensorConfig(bits=8, granularity="channel", quantizer="bb"), "act", 1, 3)


def test_regularizer_of_quantizer_uses_mac_weight_and_fixed_has_none():
    q = make_bb(gate_init=[1.0, 0.0, -1.0, -2.0], prune_init=2.0)
    q.mac_weight = 0.25
    probs = G.hard_concrete_prob_nonzero(torch.tensor([1.0, 0.0, -1.0, -2.0]))
    q2 = G.hard_concrete_prob_nonzero(torch.full((4,), 2.0))
    assert float(q.regularizer().detach()) == pytest.approx(float(BB.regularizer(probs, 0.25, q2)), rel=1e-6)
    fixed = BayesianBitsQuantizer(TensorConfig(bits=8, quantizer="bb", options={"fixed": True}), "act", 1, 3)
    assert float(fixed.regularizer()) == 0.0 and fixed.test_bits() == 8
    assert not any(n.startswith("log_alpha") for n, _ in fixed.named_parameters())


def test_lenet5_parameter_overhead_is_636_gates():
    """The rebuttal: 4 gates per quantized tensor + one z2 per output channel = 636 for LeNet-5 (583k params).

    Our count: 4 weight + 3 activation tensors with learned gates (the network input is at a fixed 8 bits, the
    last layer's outputs are logits and are not pruned): 7 * 4 + (32 + 64 + 512) = 636 gates, plus one learned
    range per quantized tensor (8, counting the fixed 8-bit input), which the paper's 636 does not include."""
    from bitalloc.models import create
    from bitalloc.train.methods import prepare_qat

    model = prepare_qat(create("lenet5"), "bb", {"input_shape": [1, 28, 28], "dataset": "mnist"})
    gates = sum(p.numel() for n, p in model.named_parameters() if "log_alpha" in n)
    ranges = sum(p.numel() for n, p in model.named_parameters() if n.endswith("clip_max"))
    base = sum(p.numel() for n, p in model.named_parameters() if "quantizer" not in n)
    assert gates == 636
    assert ranges == 8
    assert base == 582_026
    from bitalloc.model.layers import parameter_overhead

    assert parameter_overhead(model) == {"model": 582_026, "quantizers_total": 644, "quantizers": {
        "log_alpha": 28, "log_alpha_prune": 32 + 64 + 512, "clip_max": 8}}


# ---- Gumbel-softmax gates (the rebuttal's variant) ------------------------------------------------------------

def test_gumbel_quantizer_forward_is_nested_decomposition_with_0_1_gates():
    torch.manual_seed(7)
    q = make_bb(role="act", channels=3, gates="gumbel", gate_init=[1.0, 0.5, -3.0, -1.0])
    assert q.gate_type == "gumbel" and q.skip_below is None and q.threshold == 0.5
    x = torch.relu(torch.randn(6, 3, 4, 4))
    q.train()
    q(x)  # initialises the range
    seen_bits = set()
    for _ in range(30):
        step = int(q.noise_step)
        y = q(x)
        gates = q.last_gates
        assert set(gates) <= {0.0, 1.0}  # hard (straight-through) samples
        a = q._range()
        xc = BB.clip_to_range(x, a, False)
        terms = BB.residual_terms(xc, BB.nested_scales(BB.range_width(a, False) / 3), torch.round)
        ref = BB.gated_sum(terms, [None] + [torch.tensor(g) for g in gates])
        assert torch.allclose(y, ref, atol=1e-6)
        # the gates above the first off gate change nothing: the output is the grid of bits_from_gates(gates)
        # (float64 reference; at 16+ bits float32 rounding of the nested sum may flip a code near a tie)
        bits = BB.bits_from_gates(gates)
        seen_bits.add(bits)
        if bits <= 8:
            assert torch.allclose(y.double(), BB.direct_quantize(xc.double(), a.double(), bits, False), atol=1e-6)
        q.noise_step.fill_(step)  # replay: same noise, same gates
        q(x)
        assert q.last_gates == gates
    assert {2, 4, 8} <= seen_bits  # several widths were sampled


def test_gumbel_gate_frequencies_match_sigmoid_monte_carlo():
    """The quantizer's own training samples: P(z4 = 1) = sigmoid(logit) (binary concrete, hard)."""
    q = make_bb(gates="gumbel", gate_init=[0.8, 6.0, 6.0, 6.0], prune=False)
    w = torch.randn(4, 10)
    q.calibrate_weight(w)
    q.train()
    n = 4000
    on = 0
    with torch.no_grad():
        for _ in range(n):
            q.sample_gates()
            on += q.last_gates[0]
    p = 1 / (1 + math.exp(-0.8))
    assert on / n == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))


def test_gumbel_pruning_threshold_and_freeze():
    from bitalloc.model.freeze import freeze
    from bitalloc.train.methods import prepare_qat

    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model = prepare_qat(net, "bb", {"input_shape": [6], "gates": "gumbel", "gate_init": [2.0, -0.3, 0.4, 1.0]})
    x = torch.randn(7, 6)
    model.train()
    model(x)
    wq = model[0].weight_quantizer
    assert wq.gate_type == "gumbel"
    with torch.no_grad():
        wq.log_alpha_prune.copy_(torch.tensor([3.0, -0.1, 0.1, -3.0, 2.0]))
        model[0].layer.bias.fill_(0.5)
    # test time: on iff P(off) = 1 - sigmoid(logit) < 0.5, i.e. logit > 0
    assert wq.kept_mask().tolist() == [True, False, True, False, True]
    assert wq.test_gates().tolist() == [1.0, 0.0, 1.0, 1.0] and wq.test_bits() == 4
    # another threshold moves the decision: P(off) < 0.45 <=> logit > logit(0.55) = 0.2007
    q2 = make_bb(gates="gumbel", threshold=0.45, gate_init=[0.1, 0.3, 6.0, 6.0])
    assert q2.test_gates().tolist() == [0.0, 1.0, 1.0, 1.0] and q2.test_bits() == 2
    # pruned channels output exactly 0 in eval, frozen and (sampled z2 = 0) training forwards
    seen = {}
    model[0].register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    model.eval()
    with torch.no_grad():
        ref = model(x)
    assert torch.equal(seen["out"][:, [1, 3]], torch.zeros(7, 2))
    frozen = freeze(model)
    with torch.no_grad():
        assert torch.equal(frozen(x), ref)
    assert frozen[0].weight_quantizer.kept.tolist() == [True, False, True, False, True]
    assert int(frozen[0].weight_quantizer.bits) == 4 and frozen[0].layer.bias.tolist()[1] == 0.0
    model.train()
    for _ in range(10):
        model(x)
        z2 = wq.output_gate()
        assert set(z2.detach().tolist()) <= {0.0, 1.0}
        off = [c for c in range(5) if z2[c] == 0]
        assert torch.equal(seen["out"][:, off], torch.zeros(7, len(off)))


# ---- fixed-gate fine-tuning mode ------------------------------------------------------------------------------

def test_fixed_gates_forward_is_the_test_time_grid_with_gradients_to_range_only():
    torch.manual_seed(9)
    q = make_bb(gate_init=[6.0, 0.5, -1.0, 3.0], prune_init=6.0, skip_below=None)
    w = torch.randn(4, 3, 3)
    q.calibrate_weight(w)
    with torch.no_grad():
        q.log_alpha_prune[2] = -6.0
    q.train()
    q.fix_gates(True)
    step = int(q.noise_step)
    wr = w.clone().requires_grad_(True)
    y = q(wr)
    assert int(q.noise_step) == step  # no noise drawn
    assert q.bits_per_channel().tolist() == [float(q.test_bits())]
    q.eval()
    with torch.no_grad():
        y_eval = q(w)
    q.train()
    assert torch.allclose(y.detach(), y_eval, atol=1e-6)  # the nested sum with 0/1 gates == the test-time grid
    assert torch.equal(y.detach()[2], torch.zeros_like(y[2]))
    y.pow(2).sum().backward()
    assert q.clip_max.grad is not None and float(q.clip_max.grad.abs()) > 0  # the range still learns
    assert wr.grad is not None and float(wr.grad.abs().sum()) > 0
    assert q.log_alpha.grad is None and q.log_alpha_prune.grad is None  # the gates do not
    q.fix_gates(False)
    q(w)
    assert int(q.noise_step) == step + 1  # sampling again
