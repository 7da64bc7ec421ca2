"""GPTQ with asymmetric calibration: each layer fitted to the float network's output on its float inputs.

References: numpy least squares on the explicit samples (the target), the column-by-column float64 recursion of
tests/test_gptq.py on that target (the codes), brute force over the dampings with losses summed over the held-out
samples themselves (cross-validation), moments of explicitly unfolded and quantized inputs, and the float
network run beside the quantized one (what the method is for). Options through preset, config files and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bitalloc
from bitalloc.calibration.gptq import CV_DAMPS, Moments, batches_moments, input_moments, layer_moments, round_layer
from bitalloc.config import QuantConfig, preset
from bitalloc.errors import ConfigError, DataError, ShapeError
from bitalloc.model.layers import float_mode, quant_layers
from bitalloc.quant.gptq import asymmetric_target, damping, gptq_round, heldout_damping, reconstruction_error
from tests.nets import make_net
from tests.test_gptq import _grid, _reference
from tests.test_mixed_cli import _net, user  # noqa: F401  (fixture)
from tests.test_user_models import run

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(seed, K=10, R=4, n=40, noise=0.3):
    """Float inputs x_f and 'quantized' inputs x_q = x_f + error correlated with x_f, and a weight."""
    g = torch.Generator().manual_seed(seed)
    Xf = torch.randn(n, K, generator=g) @ torch.randn(K, K, generator=g)
    Xq = Xf @ (torch.eye(K) + noise * torch.randn(K, K, generator=g)) + noise * torch.randn(n, K, generator=g)
    return Xf.double(), Xq.double(), torch.randn(1, R, K, generator=g)


def _np_target(W, Xf, Xq, lam):
    """argmin_T ||Xf W^T - Xq T^T||^2 + lam ||T - W||^2 by numpy least squares on the stacked system."""
    K = W.shape[1]
    A = np.vstack([Xq, np.sqrt(lam) * np.eye(K)])
    B = np.vstack([Xf @ W.T, np.sqrt(lam) * W.T])
    return np.linalg.lstsq(A, B, rcond=None)[0].T


def test_target_is_the_ridge_least_squares_fit_to_the_float_outputs():
    Xf, Xq, W = _pair(0)
    H, C = (Xq.T @ Xq)[None], (Xf.T @ Xq)[None]
    for damp in (0.01, 0.3):
        lam = float(damping(H, damp)[0])
        assert lam == pytest.approx(damp * float(torch.diagonal(H[0]).mean()))
        T = asymmetric_target(W, H, C, damp)
        np.testing.assert_allclose(T[0].numpy(), _np_target(W[0].double().numpy(), Xf.numpy(), Xq.numpy(), lam),
                                   rtol=1e-8, atol=1e-10)


def test_the_asymmetric_loss_is_gptqs_loss_around_the_target_plus_a_constant():
    """sum ||W x_f - Q x_q||^2 + lam ||Q - W||^2 - tr((Q - T)(H + lam I)(Q - T)^T) is the same for every Q."""
    Xf, Xq, W = _pair(1)
    H, C = (Xq.T @ Xq)[None], (Xf.T @ Xq)[None]
    lam = float(damping(H, 0.1)[0])
    T = asymmetric_target(W, H, C, 0.1)[0].numpy()
    Wn, g = W[0].double().numpy(), np.random.default_rng(1)
    gaps = []
    for _ in range(4):
        Q = Wn + g.normal(size=Wn.shape)
        direct = ((Xf.numpy() @ Wn.T - Xq.numpy() @ Q.T) ** 2).sum() + lam * ((Q - Wn) ** 2).sum()
        D = Q - T
        gaps.append(direct - np.einsum("rk,kl,rl->", D, H[0].numpy() + lam * np.eye(W.shape[2]), D))
    np.testing.assert_allclose(gaps, gaps[0], rtol=1e-9)


def test_asymmetric_codes_are_the_recursion_on_the_target_and_plain_gptq_when_inputs_agree():
    Xf, Xq, W = _pair(2, K=12, R=5)
    H, C = (Xq.T @ Xq)[None], (Xf.T @ Xq)[None]
    s, z, lo, hi = _grid(W, bits=3)
    for act_order in (False, True):
        codes = gptq_round(W, H, s, z, lo, hi, damp=0.05, cross=C, act_order=act_order)
        T = asymmetric_target(W, H, C, 0.05)
        assert torch.equal(codes, gptq_round(T, H, s, z, lo, hi, damp=0.05, act_order=act_order))
    lam = float(damping(H, 0.05)[0])
    Hn = H[0].numpy()
    Tn = np.linalg.solve(Hn + lam * np.eye(12), (C[0].numpy() + lam * np.eye(12)).T @ W[0].double().numpy().T).T
    ref = _reference(Tn, Hn, s[0].numpy(), z[0].numpy(), lo[0].numpy(), hi[0].numpy(), 0.05)
    assert (gptq_round(W, H, s, z, lo, hi, damp=0.05, cross=C)[0].numpy() == ref).all()
    # the same inputs in both networks: plain GPTQ
    Hq = (Xf.T @ Xf)[None]
    assert torch.equal(gptq_round(W, Hq, s, z, lo, hi, cross=Hq.clone()), gptq_round(W, Hq, s, z, lo, hi))
    assert not torch.equal(gptq_round(W, H, s, z, lo, hi, cross=C), gptq_round(W, H, s, z, lo, hi))
    with pytest.raises(ShapeError, match="cross"):
        gptq_round(W, H, s, z, lo, hi, cross=C[:, :3])


def test_asymmetric_heldout_damping_is_the_brute_force_minimum_over_the_held_out_samples():
    Xf, Xq, W = _pair(3, K=10, n=30, noise=0.5)
    k_of = np.arange(30) % 3
    fold = lambda a, b: torch.stack([a[k_of == k].T @ b[k_of == k] for k in range(3)])[:, None]  # noqa: E731
    Hk, Ck, Rk = fold(Xq, Xq), fold(Xf, Xq), fold(Xf, Xf)
    s, z, lo, hi = _grid(W, bits=3)
    damps = (0.001, 0.01, 0.1, 1.0, 10.0)
    best, losses = heldout_damping(W, Hk, s, z, lo, hi, damps, fold_cross=Ck, fold_reference=Rk)
    Wn = W[0].double().numpy()
    ref = []
    for d in damps:
        total = 0.0
        for k in range(3):
            fit = k_of != k
            Hf, Cf = Xq[fit].numpy().T @ Xq[fit].numpy(), Xf[fit].numpy().T @ Xq[fit].numpy()
            lam = d * np.mean(np.diag(Hf))
            T = np.linalg.solve(Hf + lam * np.eye(10), (Cf + lam * np.eye(10)).T @ Wn.T).T
            c = _reference(T, Hf, s[0].numpy(), z[0].numpy(), lo[0].numpy(), hi[0].numpy(), d)
            Q = (c - z[0].numpy()[:, None]) * s[0].numpy()[:, None].astype(np.float64)
            held = k_of == k
            total += float(((Xf[held].numpy() @ Wn.T - Xq[held].numpy() @ Q.T) ** 2).sum())
        ref.append(total)
    np.testing.assert_allclose(losses, ref, rtol=1e-6)
    assert best == damps[int(np.argmin(ref))]
    with pytest.raises(ShapeError, match="both"):
        heldout_damping(W, Hk, s, z, lo, hi, damps, fold_cross=Ck)


def test_reconstruction_error_asymmetric_is_the_sum_over_samples():
    Xf, Xq, W = _pair(4)
    Q = W + 0.1 * torch.randn(W.shape, generator=torch.Generator().manual_seed(0))
    err = reconstruction_error(W, Q, (Xq.T @ Xq)[None], cross=(Xf.T @ Xq)[None], reference=(Xf.T @ Xf)[None])
    direct = ((Xf @ W[0].double().T - Xq @ Q[0].double().T) ** 2).sum()
    assert float(err[0]) == pytest.approx(float(direct), rel=1e-9)


class _Halve(torch.nn.Module):  # a stand-in input quantizer: coarse rounding
    def forward(self, x):
        return torch.round(x * 2) / 2


def test_input_moments_with_a_float_reference_are_those_of_the_unfolded_inputs():
    layer = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2)
    g = torch.Generator().manual_seed(5)
    xf = torch.randn(7, 4, 5, 5, generator=g)
    xq_in = xf + 0.2 * torch.randn(xf.shape, generator=g)  # the quantized network's input differs upstream too
    m = input_moments(layer, xq_in, _Halve(), xf, chunk=3)
    assert m.reference is None  # the float Gram matrix is only kept per fold (for the cross-validated loss)

    def cols(x):  # [N * L, G, K]
        c = F.unfold(x, 3, padding=1)  # [N, 4 * 9, L]
        return c.reshape(7, 2, 18, -1).permute(0, 3, 1, 2).reshape(-1, 2, 18).double()
    cq, cf = cols(_Halve()(xq_in)), cols(xf)
    assert torch.allclose(m.hessian, torch.einsum("ngk,ngl->gkl", cq, cq), rtol=1e-10, atol=1e-9)
    assert torch.allclose(m.cross, torch.einsum("ngk,ngl->gkl", cf, cq), rtol=1e-10, atol=1e-9)
    folds = input_moments(layer, xq_in, _Halve(), xf, folds=4, offset=1, chunk=2)
    assert folds.folds == 4 and torch.allclose(folds.total().cross, m.cross, rtol=1e-10, atol=1e-9)
    for k in range(4):
        idx = [i for i in range(7) if (1 + i) % 4 == k]
        one = input_moments(layer, xf[idx], None, xf[idx])
        assert torch.allclose(folds.reference[k], one.cross, rtol=1e-10, atol=1e-9)  # x_f x_f^T of fold k
    split = batches_moments(layer, [xf[:3], xf[3:]], _Halve(), folds=4, asymmetric=True)
    whole = input_moments(layer, xf, _Halve(), xf, folds=4)
    for a, b in ((split.hessian, whole.hessian), (split.cross, whole.cross), (split.reference, whole.reference)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-9)
    with pytest.raises(DataError, match="same samples"):
        input_moments(layer, xq_in, None, xf[:3])


def _two_layers(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()


def test_layer_moments_pair_the_quantized_and_the_float_networks_inputs():
    net = _two_layers()
    x = torch.randn(24, 16)
    q = bitalloc.prepare(net, preset("minmax", 3, 3, first_last_bits=None, rounding="gptq"), x[:2])
    with bitalloc.calibration(q):
        q(x)
    ref = bitalloc.prepare(net, preset("minmax", 3, 3, first_last_bits=None, rounding="gptq"), x[:2])
    layers = dict(quant_layers(q))
    with float_mode(ref):
        m = layer_moments(q, layers["2"], [(x[:10],), (x[10:],)], 24, reference=ref)
    xq = layers["2"].input_quantizer(torch.relu(q[0](x)))  # the quantized network's input, quantized
    xf = torch.relu(net[0](x))
    assert torch.allclose(m.hessian[0], (xq.T @ xq).double(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(m.cross[0], (xf.T @ xq).double(), rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError, match="no layer"):
        layer_moments(q, layers["2"], [(x,)], 24, reference=torch.nn.Sequential(torch.nn.Linear(16, 8)))


def test_asymmetric_gptq_matches_the_float_network_better():
    """3-bit weights and activations, 2048 calibration samples, cross-validated damping: fitted to the float network's
    output, the network reproduces it better than with plain GPTQ, on the calibration samples and on fresh ones
    (about 0.7x the squared error over seeds 0-3)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    g = torch.Generator().manual_seed(6)
    calib, fresh = torch.randn(2048, 8, generator=g), torch.randn(4000, 8, generator=g)
    err = {}
    for asym in (False, True):
        cfg = preset("minmax", 3, 3, first_last_bits=None, rounding="gptq", gptq_damp="cv",
                     gptq_asymmetric=asym or None, calibration_samples=2048)
        q = bitalloc.quantize(net, cfg, [(calib[i:i + 256],) for i in range(0, 2048, 256)])
        assert q.bitalloc_calibration["gptq_asymmetric"] == (["0", "2"] if asym else [])
        with torch.no_grad():
            err[asym] = [float((q(x) - net(x)).pow(2).mean()) for x in (calib, fresh)]
    assert err[True][0] < 0.85 * err[False][0] and err[True][1] < 0.85 * err[False][1], err


def test_round_layer_needs_the_cross_moments_when_asymmetric():
    net = _two_layers()
    x = torch.randn(16, 16)
    q = bitalloc.prepare(net, preset("minmax", 4, 4, first_last_bits=None, rounding="gptq", gptq_asymmetric=True), x[:2])
    with bitalloc.calibration(q):
        q(x)
    layer = dict(quant_layers(q))["0"]
    with pytest.raises(DataError, match="gptq_asymmetric"):
        round_layer(layer, Moments((x.T @ x).double()[None]))


def test_asymmetric_config_round_trips_and_needs_gptq_rounding():
    cfg = preset("aciq-gptq", 4, 4, gptq_asymmetric=True, gptq_damp="cv")
    back = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.default.weight.gptq_asymmetric is True
    with pytest.raises(ConfigError, match="rounding='gptq'"):
        preset("aciq", 4, 8, gptq_asymmetric=True)
    bad = cfg.to_dict()
    bad["default"]["weight"]["gptq_asymmetric"] = "yes"
    with pytest.raises(ConfigError, match="gptq_asymmetric"):
        QuantConfig.from_dict(bad)


def test_quantize_with_cross_validated_asymmetric_gptq_on_a_cnn():
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(8, 3, 16, 16, generator=g),) for _ in range(2)]
    q = bitalloc.quantize(net, preset("aciq-gptq", 4, 4, first_last_bits=None, gptq_damp="cv",
                                      gptq_asymmetric=True), data)
    info = q.bitalloc_calibration
    assert info["gptq_asymmetric"] == info["gptq_layers"] and set(info["gptq_damp"].values()) <= set(CV_DAMPS)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the user's model is untouched
    plain = bitalloc.quantize(net, preset("aciq-gptq", 4, 4, first_last_bits=None, gptq_damp="cv"), data)
    assert any(not torch.equal(a.layer.weight, b.layer.weight)
               for (_, a), (_, b) in zip(quant_layers(q), quant_layers(plain)))


def test_cli_gptq_asymmetric_ptq_sensitivity_and_errors(user, capsys, tmp_path):  # noqa: F811
    common = [*_net(user), "--inputs", str(user / "data.pt"), "--calib", "16", "--no-plot"]
    code, out, err = run(["ptq", *common, "--preset", "aciq-gptq", "--gptq-asymmetric", "--out", str(tmp_path / "p")],
                         capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["config"]["default"]["weight"]["gptq_asymmetric"] is True
    assert report["calibration"]["gptq_asymmetric"] == list(report["calibration"]["gptq_damp"]) != []
    code, out, err = run(["sensitivity", *common, "--preset", "aciq-gptq", "--gptq-asymmetric", "--candidates",
                          "8x8,4x4", "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    code, out, err = run(["ptq", *common, "--preset", "aciq", "--gptq-asymmetric", "--out", str(tmp_path / "b")],
                         capsys)
    assert code == 2 and "--rounding gptq" in err and err.count("\n") == 1, err
