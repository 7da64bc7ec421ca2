"""LSQ and PACT: forward and the papers' gradients, against closed forms and an independent autograd reference.

* LSQ (Esser et al., ICLR 2020): forward eq. 1-2; d/dv eq. 5; d/ds eq. 3 with the gradient scale
  1/sqrt(N * Q_P); initial step 2 mean|v| / sqrt(Q_P). The independent reference is the paper's own
  formulation in autograd (``grad_scale`` and ``round_pass`` of its appendix), which must give the same
  gradients as the custom autograd Function.
* PACT (Choi et al. 2018): forward eq. 1-2; d/d alpha = 1 where x >= alpha (eq. 3); STE for x inside the range;
  the signed extension; the L2 decay's gradient.
* The quantizer modules: initialisation from weights and from the first batch (signedness detected), and
  train-mode forward == eval-mode forward == the frozen grid (bitwise).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bitalloc.config import TensorConfig
from bitalloc.quant.grid import fake_quantize, integer_range
from bitalloc.quant.lsq import lsq_bounds, lsq_grad_scale, lsq_init_step, lsq_quantize
from bitalloc.quant.pact import pact_l2, pact_quantize, pact_range, pact_step
from bitalloc.quantizers import LSQQuantizer, PACTQuantizer


pytestmark = pytest.mark.usefixtures("one_thread")


def away_from_ties(v: torch.Tensor, s: torch.Tensor | float, q_n: int, q_p: int) -> torch.Tensor:
    """Move values off rounding ties and off the clipping boundaries (where the STE is discontinuous)."""
    r = v / s
    frac = r - torch.floor(r)
    bad = (frac - 0.5).abs() < 1e-3
    r = torch.where(bad, r + 0.01, r)
    edge = ((r + q_n).abs() < 1e-3) | ((r - q_p).abs() < 1e-3)
    r = torch.where(edge, r + 0.02, r)
    return r * s


# ---- LSQ ----------------------------------------------------------------------------------------------------

def lsq_paper_reference(v: torch.Tensor, s: torch.Tensor, q_n: int, q_p: int, g: float) -> torch.Tensor:
    """The LSQ paper's appendix code: gradient scaling and round-pass, with plain autograd."""
    def grad_scale(x, scale):
        y = x * scale
        return (x - y).detach() + y

    def round_pass(x):
        return (x.round() - x).detach() + x

    s_ = grad_scale(s, g)
    r = torch.clamp(v / s_, -q_n, q_p)
    return round_pass(r) * s_


@pytest.mark.parametrize("bits,signed", [(2, True), (4, True), (3, False), (8, False)])
def test_lsq_bounds_match_integer_range(bits, signed):
    q_n, q_p = lsq_bounds(bits, signed)
    qmin, qmax = integer_range(bits, signed)
    assert (-q_n, q_p) == (int(qmin), int(qmax))


@pytest.mark.parametrize("signed", [True, False])
def test_lsq_forward_and_gradients_closed_form(signed):
    torch.manual_seed(0)
    bits = 3
    q_n, q_p = lsq_bounds(bits, signed)
    s = torch.tensor(0.37)
    v = away_from_ties(torch.randn(500) * 1.5, s, q_n, q_p).requires_grad_(True)
    step = s.clone().requires_grad_(True)
    g = lsq_grad_scale(v.numel(), q_p)
    up = torch.randn(500)
    y = lsq_quantize(v, step, q_n, q_p, g)
    (y * up).sum().backward()

    # forward: s * round(clip(v / s, -Q_N, Q_P)) (float64 reference; no value is at a tie)
    r = v.detach().double() / 0.37
    ref = 0.37 * torch.round(torch.clamp(r, -q_n, q_p))
    assert torch.allclose(y.detach().double(), ref, atol=1e-6)
    # bitwise what the frozen grid computes
    qmin, qmax = integer_range(bits, signed)
    frozen = fake_quantize(v.detach(), s, torch.tensor(0), qmin, qmax)
    assert torch.equal(y.detach(), frozen)
    # d/dv (eq. 5): 1 strictly inside, 0 outside
    inside = (r > -q_n) & (r < q_p)
    assert torch.equal(v.grad, up * inside.float())
    # d/ds (eq. 3) times g
    local = torch.where(inside, torch.round(r) - r, torch.where(r <= -q_n, torch.full_like(r, -q_n), torch.full_like(r, q_p)))
    expected = g * float((up.double() * local).sum())
    assert float(step.grad) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # the paper's own autograd formulation gives the same gradients
    v2 = v.detach().clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    (lsq_paper_reference(v2, s2, q_n, q_p, g) * up).sum().backward()
    assert torch.allclose(v2.grad, v.grad)
    assert float(s2.grad) == pytest.approx(float(step.grad), rel=1e-4, abs=1e-7)


def test_lsq_per_channel_gradients():
    torch.manual_seed(1)
    q_n, q_p = lsq_bounds(4, True)
    s = torch.tensor([0.05, 0.1, 0.2])
    w = torch.randn(3, 4, 5) * s.view(3, 1, 1) * 4
    w = away_from_ties(w, s.view(3, 1, 1), q_n, q_p).requires_grad_(True)
    step = s.clone().requires_grad_(True)
    g = lsq_grad_scale(20, q_p)
    up = torch.randn_like(w)
    (lsq_quantize(w, step, q_n, q_p, g, axis=0) * up).sum().backward()
    for c in range(3):
        v2 = w.detach()[c].clone().requires_grad_(True)
        s2 = s[c].clone().requires_grad_(True)
        (lsq_paper_reference(v2, s2, q_n, q_p, g) * up[c]).sum().backward()
        assert float(step.grad[c]) == pytest.approx(float(s2.grad), rel=1e-4, abs=1e-7)
        assert torch.allclose(w.grad[c], v2.grad)


def test_lsq_init_and_gradient_scale():
    v = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    assert float(lsq_init_step(v, 7)) == pytest.approx(2 * 1.25 / math.sqrt(7))
    assert torch.allclose(lsq_init_step(v, 7, axis=0), torch.tensor([2 * 2.0, 2 * 0.5]) / math.sqrt(7))
    assert lsq_grad_scale(100, 7) == pytest.approx(1 / math.sqrt(700))


def test_lsq_quantizer_weight_and_activation():
    torch.manual_seed(2)
    w = torch.randn(6, 3, 3, 3)
    q = LSQQuantizer(TensorConfig(bits=4, symmetric=True, quantizer="lsq"), "weight", 0, 6)
    q.calibrate_weight(w)
    assert bool(q.initialized) and q.is_signed
    assert float(q.step.detach()) == pytest.approx(2 * float(w.abs().mean()) / math.sqrt(7), rel=1e-6)
    q.calibrate_weight(w * 10)  # initialised once: a second calibration does not reset the learned step
    assert float(q.step.detach()) == pytest.approx(2 * float(w.abs().mean()) / math.sqrt(7), rel=1e-6)
    # the module's step gradient uses N = number of weights
    wr = w.clone().requires_grad_(True)
    up = torch.randn_like(w)
    (q(wr) * up).sum().backward()
    s2 = q.step.detach().clone().requires_grad_(True)
    (lsq_paper_reference(w.clone(), s2, 8, 7, lsq_grad_scale(w.numel(), 7)) * up).sum().backward()
    assert float(q.step.grad) == pytest.approx(float(s2.grad), rel=1e-4, abs=1e-7)

    # activations: unsigned after a ReLU, step from the first batch, N = features per sample
    a = LSQQuantizer(TensorConfig(bits=4, quantizer="lsq"), "act", 1, 3)
    x = torch.relu(torch.randn(8, 3, 5, 5))
    a.train()
    y = a(x.requires_grad_(True))
    assert not a.is_signed and a.bounds == (0, 15)
    assert float(a.step.detach()) == pytest.approx(2 * float(x.detach().abs().mean()) / math.sqrt(15), rel=1e-5)
    up = torch.randn_like(y)
    (y * up).sum().backward()
    s2 = a.step.detach().clone().requires_grad_(True)
    (lsq_paper_reference(x.detach(), s2, 0, 15, lsq_grad_scale(75, 15)) * up).sum().backward()
    assert float(a.step.grad) == pytest.approx(float(s2.grad), rel=1e-4, abs=1e-7)
    # signed activations are detected from negative data
    b = LSQQuantizer(TensorConfig(bits=4, quantizer="lsq"), "act", 1, 3)
    b(torch.randn(4, 3, 2, 2))
    assert b.is_signed and b.bounds == (8, 7)


def test_lsq_eval_equals_train_equals_frozen_grid():
    torch.manual_seed(3)
    q = LSQQuantizer(TensorConfig(bits=3, quantizer="lsq"), "act", 1, 4)
    x = torch.randn(16, 4, 6, 6) * 2
    q.train()
    y_train = q(x.clone().requires_grad_(True)).detach()
    q.eval()
    with torch.no_grad():
        y_eval = q(x)
    p = q.qparams()
    assert torch.equal(y_train, y_eval)
    assert torch.equal(y_eval, p.dequantize(p.quantize(x)))


# ---- PACT ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4])
def test_pact_unsigned_forward_and_gradients(bits):
    torch.manual_seed(4)
    alpha = torch.tensor(2.3, requires_grad=True)
    levels = 2 ** bits - 1
    s = 2.3 / levels
    x = torch.randn(400) * 2.5
    x = away_from_ties(x, s, 0, levels)
    x = torch.where((x - 2.3).abs() < 1e-3, x + 0.01, x).requires_grad_(True)
    up = torch.randn(400)
    y = pact_quantize(x, alpha, bits)
    (y * up).sum().backward()
    # eq. 1-2: round(clip(x, 0, a) * (2^k - 1) / a) * a / (2^k - 1)
    ref = torch.round(torch.clamp(x.detach().double(), 0, 2.3) * levels / 2.3) * 2.3 / levels
    assert torch.allclose(y.detach().double(), ref, atol=1e-6)
    # eq. 3: d y_q / d alpha = 1 for x >= alpha; d y_q / d x = 1 on [0, alpha)
    assert float(alpha.grad) == pytest.approx(float((up * (x.detach() >= 2.3).float()).sum()), rel=1e-6, abs=1e-6)
    inside = (x.detach() >= 0) & (x.detach() < 2.3)
    assert torch.equal(x.grad, up * inside.float())
    # the grid is bitwise the frozen one
    qmin, qmax = integer_range(bits, False)
    assert torch.equal(y.detach(), fake_quantize(x.detach(), pact_step(alpha.detach(), bits, False), torch.tensor(0), qmin, qmax))


def test_pact_signed_gradients_and_decay():
    torch.manual_seed(5)
    alpha = torch.tensor(1.1, requires_grad=True)
    x = (torch.randn(300) * 1.5)
    x = torch.where((x.abs() - 1.1).abs() < 1e-3, x + 0.01, x).requires_grad_(True)
    up = torch.randn(300)
    y = pact_quantize(x, alpha, 4, signed=True)
    (y * up).sum().backward()
    xd = x.detach()
    sign = (xd >= 1.1).float() - (xd <= -1.1).float()
    assert float(alpha.grad) == pytest.approx(float((up * sign).sum()), rel=1e-6, abs=1e-6)
    assert torch.equal(x.grad, up * (xd.abs() < 1.1).float())
    # float64 closed form: round(clip(x, -a, a) * 7 / a) * a / 7 (symmetric codes -7..7 on 4 bits)
    ref = torch.round(torch.clamp(xd.double(), -1.1, 1.1) * 7 / 1.1) * 1.1 / 7
    assert torch.allclose(y.detach().double(), ref, atol=1e-6)
    # L2 decay: gradient decay * alpha
    a = torch.tensor([0.5, 2.0], requires_grad=True)
    pact_l2([a], 0.1).backward()
    assert torch.allclose(a.grad, 0.1 * a.detach())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pact_signed_grid_is_exactly_the_clip_range(bits):
    """Signed PACT clips to [-alpha, alpha]: the extreme outputs are exactly +-alpha, the codes are symmetric
    (-(2^(k-1)-1) .. 2^(k-1)-1), and the alpha-gradient (+-1 outside the range, eq. 3) equals the derivative of
    the forward, checked by central differences in float64. The asymmetric two's-complement grid fails all three
    (at alpha = 1, k = 4 its outputs span [-16/15, 14/15] and its true alpha-derivatives are -16/15 and 14/15)."""
    qmax = 2 ** (bits - 1) - 1
    assert pact_range(bits, True) == (-qmax, qmax) and pact_range(bits, False) == (0, 2 ** bits - 1)
    a0 = 1.0
    x = torch.linspace(-3, 3, 6001, dtype=torch.float64)
    y = pact_quantize(x, torch.tensor(a0, dtype=torch.float64), bits, signed=True)
    assert float(y.max()) == a0 and float(y.min()) == -a0
    codes = torch.round(y * qmax / a0)
    assert torch.allclose(codes * a0 / qmax, y, atol=1e-12)
    assert set(codes.unique().tolist()) == set(range(-qmax, qmax + 1))
    # d y / d alpha outside the range: autograd (eq. 3) == central difference of the forward
    outside = torch.tensor([-2.5, -1.7, 1.3, 2.9], dtype=torch.float64)
    al = torch.tensor(a0, dtype=torch.float64, requires_grad=True)
    grads = []
    for v in outside:
        al.grad = None
        pact_quantize(v.reshape(1), al, bits, signed=True).sum().backward()
        grads.append(float(al.grad))
    h = 1e-6
    fd = [(float(pact_quantize(v.reshape(1), torch.tensor(a0 + h, dtype=torch.float64), bits, signed=True))
           - float(pact_quantize(v.reshape(1), torch.tensor(a0 - h, dtype=torch.float64), bits, signed=True))) / (2 * h)
          for v in outside]
    assert grads == [-1.0, -1.0, 1.0, 1.0]
    assert fd == pytest.approx(grads, abs=1e-6)
    # the quantizer's frozen description is the same grid
    q = PACTQuantizer(TensorConfig(bits=bits, symmetric=True, quantizer="pact"), "weight", 0, 3)
    w = torch.randn(3, 5) * 2
    q.calibrate_weight(w)
    p = q.qparams()
    assert int(p.qmin) == -qmax and int(p.qmax) == qmax
    assert float(p.scale) * qmax == pytest.approx(float(w.abs().max()), rel=1e-6)
    with torch.no_grad():
        assert torch.equal(q(w), p.dequantize(p.quantize(w)))
    assert float(q(w).detach().abs().max()) == pytest.approx(float(w.abs().max()), rel=1e-6)


def test_pact_quantizer_init_and_frozen_equivalence():
    torch.manual_seed(6)
    w = torch.randn(5, 8)
    q = PACTQuantizer(TensorConfig(bits=4, symmetric=True, quantizer="pact"), "weight", 0, 5)
    q.calibrate_weight(w)
    assert float(q.alpha.detach()) == pytest.approx(float(w.abs().max()))
    a = PACTQuantizer(TensorConfig(bits=3, quantizer="pact", options={"init": 10.0}), "act", -1, 8)
    x = torch.relu(torch.randn(4, 8))
    a.train()
    y = a(x.clone().requires_grad_(True)).detach()
    assert float(a.alpha.detach()) == 10.0 and not a.is_signed
    p = a.qparams()
    assert torch.equal(y, p.dequantize(p.quantize(x)))
    m = PACTQuantizer(TensorConfig(bits=3, quantizer="pact"), "act", -1, 8)
    m(x)
    assert float(m.alpha.detach()) == pytest.approx(float(x.max()))


def test_learned_quantizers_calibration_protocol():
    """The calibration context initialises LSQ / PACT activation quantizers from all calibration batches."""
    import bitalloc
    from bitalloc.config import LayerConfig, QuantConfig

    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    cfg = QuantConfig(default=LayerConfig(weight=TensorConfig(bits=4, symmetric=True, quantizer="lsq"),
                                          act=TensorConfig(bits=4, quantizer="lsq")), first_last_bits=None)
    q = bitalloc.prepare(model, cfg, torch.randn(2, 6))
    batches = [torch.randn(5, 6) for _ in range(3)]
    with bitalloc.calibration(q):
        for b in batches:
            q(b)
    aq = q[2].input_quantizer
    h = torch.cat([torch.relu(model[0](b)) for b in batches]).detach()
    assert bool(aq.initialized) and not aq.is_signed
    assert float(aq.step.detach()) == pytest.approx(2 * float(h.abs().mean()) / math.sqrt(15), rel=1e-5)
    with pytest.raises(Exception):
        q[0].weight_quantizer.set_bias_correction(model[0].weight, "mean")
