"""GPTQ's column order (act-order) and damping chosen by cross-validation.

References: the float64 numpy column-by-column recursion of tests/test_gptq.py run on explicitly permuted
columns (act-order); brute force over the dampings with that same reference and numpy losses (cross-validation);
Hessians of explicitly sliced sample sets (folds); fresh samples of the same distribution (what the damping is
for). The options through preset, config files and the CLI, with their one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import bitalloc
from bitalloc.calibration.gptq import CV_DAMPS, CV_FOLDS, batches_moments, input_hessian, round_layer
from bitalloc.config import QuantConfig, preset
from bitalloc.errors import ConfigError, DataError, ShapeError
from bitalloc.model.layers import quant_layers
from bitalloc.quant.gptq import gptq_round, heldout_damping, reconstruction_error
from tests.nets import make_net
from tests.test_gptq import _grid, _reference
from tests.test_mixed_cli import _net, user  # noqa: F401  (fixture)
from tests.test_user_models import run

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(seed, K=12, R=5, n=60):
    g = torch.Generator().manual_seed(seed)
    scales = torch.rand(K, generator=g) * 3 + 0.1  # inputs of very different energy: the order matters
    X = (torch.randn(n, K, generator=g) @ torch.randn(K, K, generator=g)) * scales
    W = torch.randn(1, R, K, generator=g)
    return X.double(), W


def test_act_order_is_the_recursion_on_columns_sorted_by_hessian_diagonal():
    X, W = _problem(0)
    H = X.T @ X
    s, z, lo, hi = _grid(W, bits=3)
    codes = gptq_round(W, H[None], s, z, lo, hi, damp=0.01, act_order=True)
    order = np.argsort(-np.diag(H.numpy()), kind="stable")
    ref = _reference(W[0].numpy()[:, order], H.numpy()[np.ix_(order, order)], s[0].numpy(), z[0].numpy(),
                     lo[0].numpy(), hi[0].numpy(), 0.01)
    back = np.empty_like(ref)
    back[:, order] = ref
    assert (codes[0].numpy() == back).all()
    assert not torch.equal(codes, gptq_round(W, H[None], s, z, lo, hi, damp=0.01))  # the order changed something


def test_act_order_permutes_group_wise_grids_with_their_columns():
    X, W = _problem(1, K=16)
    H = X.T @ X
    s, z, lo, hi = _grid(W.reshape(1, 5, 4, 4), bits=3)
    per_weight = [t.repeat_interleave(4, dim=-1) for t in (s, z)]
    codes = gptq_round(W, H[None], *per_weight, lo[..., 0], hi[..., 0], damp=0.01, act_order=True)
    order = np.argsort(-np.diag(H.numpy()), kind="stable")
    ref = _reference(W[0].numpy()[:, order], H.numpy()[np.ix_(order, order)], per_weight[0][0].numpy()[:, order],
                     per_weight[1][0].numpy()[:, order], lo[0, :, 0].numpy(), hi[0, :, 0].numpy(), 0.01)
    back = np.empty_like(ref)
    back[:, order] = ref
    assert (codes[0].numpy() == back).all()


def test_heldout_damping_is_the_brute_force_minimum():
    X, W = _problem(2, K=10, n=24)
    folds = torch.stack([X[k::3].T @ X[k::3] for k in range(3)])[:, None]  # [3, 1, K, K]
    s, z, lo, hi = _grid(W, bits=3)
    damps = (0.001, 0.01, 0.1, 1.0, 10.0)
    best, losses = heldout_damping(W, folds, s, z, lo, hi, damps)
    ref = []
    for d in damps:
        total = 0.0
        for k in range(3):
            fit = sum(folds[j, 0] for j in range(3) if j != k).numpy()
            c = _reference(W[0].numpy(), fit, s[0].numpy(), z[0].numpy(), lo[0].numpy(), hi[0].numpy(), d)
            dw = W[0].numpy().astype(np.float64) - (c - z[0].numpy()[:, None]) * s[0].numpy()[:, None].astype(np.float64)
            total += float(np.einsum("rk,kl,rl->", dw, folds[k, 0].numpy(), dw))
        ref.append(total)
    np.testing.assert_allclose(losses, ref, rtol=1e-5)
    assert best == damps[int(np.argmin(ref))]
    with pytest.raises(ShapeError):
        heldout_damping(W, folds[:1], s, z, lo, hi, damps)


def test_fold_hessians_sum_to_the_hessian_and_split_samples_round_robin():
    layer = torch.nn.Conv2d(4, 6, 3, padding=1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 4, 5, 5, generator=g)
    whole = input_hessian(layer, x)
    folds = input_hessian(layer, x, folds=4, offset=2, chunk=3)
    assert folds.shape == (4, *whole.shape)
    assert torch.allclose(folds.sum(0), whole, rtol=1e-10, atol=1e-9)
    for k in range(4):  # sample i is in fold (2 + i) % 4
        idx = [i for i in range(7) if (2 + i) % 4 == k]
        assert torch.allclose(folds[k], input_hessian(layer, x[idx]), rtol=1e-10, atol=1e-9)
    # over batches, the samples are numbered across them: the same folds as one batch
    split = batches_moments(layer, [x[:3], x[3:]], folds=4).hessian
    assert torch.allclose(split, input_hessian(layer, x, folds=4), rtol=1e-10, atol=1e-9)


def test_cross_validated_damping_generalises_where_the_calibration_samples_are_few():
    """64 inputs, 48 calibration samples: GPTQ at 1% damping over-fits them; the damping chosen by cross-validation
    on those 48 samples alone reconstructs 4000 fresh samples better, and the layer records it."""
    torch.manual_seed(4)
    K = 64
    mix = torch.randn(K, K) / K ** 0.5 + torch.eye(K)
    lin = torch.nn.Linear(K, 16)
    calib, fresh = torch.randn(48, K) @ mix, torch.randn(4000, K) @ mix
    H_fresh = (fresh.T @ fresh).double()[None]
    err = {}
    for damp in (0.01, "cv"):
        cfg = preset("minmax", 3, None, first_last_bits=None, rounding="gptq", gptq_damp=damp)
        q = bitalloc.prepare(torch.nn.Sequential(lin), cfg, calib[:2])
        layer = dict(quant_layers(q))["0"]
        H = input_hessian(layer.layer, calib, folds=CV_FOLDS if damp == "cv" else None)
        info = round_layer(layer, H)
        err[damp] = float(reconstruction_error(lin.weight.detach()[None], layer.layer.weight.detach()[None], H_fresh))
        if damp == "cv":
            assert info["damp"] in CV_DAMPS and info["damp"] > 0.01 and len(info["cv_losses"]) == len(CV_DAMPS)
            assert info["damp"] == CV_DAMPS[int(np.argmin(info["cv_losses"]))]
    assert err["cv"] < 0.9 * err[0.01], err
    with pytest.raises(DataError, match="per fold"):
        round_layer(layer, input_hessian(layer.layer, calib), damp="cv")


def test_quantize_records_each_layers_damping_and_the_config_round_trips(tmp_path):
    net = make_net()
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(8, 3, 16, 16, generator=g),) for _ in range(2)]
    cfg = preset("aciq-gptq", 4, 8, first_last_bits=None, gptq_damp="cv", gptq_act_order=True)
    q = bitalloc.quantize(net, cfg, data)
    damps = q.bitalloc_calibration["gptq_damp"]
    assert list(damps) == q.bitalloc_calibration["gptq_layers"] and set(damps.values()) <= set(CV_DAMPS)
    back = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.default.weight.gptq_damp == "cv" and back.default.weight.gptq_act_order is True
    plain = bitalloc.quantize(net, preset("aciq-gptq", 4, 8, first_last_bits=None), data)
    assert set(plain.bitalloc_calibration["gptq_damp"].values()) == {0.01}


@pytest.mark.parametrize("kwargs, match", [
    ({"gptq_damp": 0.0}, "number > 0"), ({"gptq_damp": "auto"}, "number > 0"), ({"gptq_damp": True}, "number > 0"),
    ({"gptq_damp": float("nan")}, "number > 0")])
def test_bad_damping_is_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        preset("aciq-gptq", 4, 8, **kwargs)


def test_gptq_options_without_gptq_rounding_are_refused():
    with pytest.raises(ConfigError, match="rounding='gptq'"):
        preset("aciq", 4, 8, gptq_act_order=True)
    with pytest.raises(ConfigError, match="rounding='gptq'"):
        preset("minmax", 4, 8, gptq_damp="cv")


def test_cli_gptq_options_report_and_errors(user, capsys, tmp_path):  # noqa: F811
    common = [*_net(user), "--inputs", str(user / "data.pt"), "--calib", "16", "--no-plot"]
    code, out, err = run(["ptq", *common, "--preset", "aciq-gptq", "--gptq-damp", "cv", "--gptq-act-order",
                          "--out", str(tmp_path / "p")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["config"]["default"]["weight"]["gptq_damp"] == "cv"
    assert report["config"]["default"]["weight"]["gptq_act_order"] is True
    assert set(report["calibration"]["gptq_damp"].values()) <= set(CV_DAMPS)
    for extra, needle in ((["--preset", "aciq-gptq", "--gptq-damp", "-1"], "--gptq-damp"),
                          (["--preset", "aciq-gptq", "--gptq-damp", "lots"], "--gptq-damp"),
                          (["--preset", "aciq", "--gptq-act-order"], "--rounding gptq")):
        code, out, err = run(["ptq", *common, *extra, "--out", str(tmp_path / "bad")], capsys)
        assert code == 2 and needle in err and err.count("\n") == 1, (extra, err)
    (tmp_path / "nearest.json").write_text(json.dumps(preset("aciq", 4, 8).to_dict()))
    code, out, err = run(["ptq", *common, "--config", str(tmp_path / "nearest.json"), "--gptq-damp", "cv",
                          "--out", str(tmp_path / "bad")], capsys)
    assert code == 2 and "--rounding gptq" in err and err.count("\n") == 1, err
