"""GPTQ rounding. References: round-to-nearest (identity Hessian), an independent float64 numpy
column-by-column implementation with explicit inverses of the remaining Hessian, and the layers' own
convolutions (the captured input columns must reproduce each layer's output)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bitalloc
from bitalloc.calibration.gptq import input_columns, op_call
from bitalloc.model.layers import quant_layers
from bitalloc.quant.grid import qparams_from_range
from bitalloc.quant.gptq import gptq_round, reconstruction_error
from tests.nets import make_net


def _grid(w, bits=3):
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    return qparams_from_range(lo, hi, bits, symmetric=True)


def _reference(W, H, scale, zp, qmin, qmax, damp):
    """Column-by-column OBQ recursion in float64 numpy, inverting the remaining Hessian explicitly."""
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    d = np.diag(H).copy()
    dead = d == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices_from(H)] += damp * np.mean(np.diag(H))
    R, K = W.shape
    codes = np.zeros((R, K), dtype=np.int64)
    for i in range(K):
        rest = np.arange(i, K)
        Hinv = np.linalg.inv(H[np.ix_(rest, rest)])
        w = W[:, i]
        s, z = (t[:, i] if t.ndim == 2 else t for t in (scale, zp))  # per weight: group-wise grids
        inv = (1.0 / s.astype(np.float32)).astype(np.float32)
        q = np.clip(np.round((w.astype(np.float32) * inv)).astype(np.int64) + z, qmin, qmax)
        codes[:, i] = q
        deq = ((q - z).astype(np.float32) * s.astype(np.float32)).astype(np.float64)
        err = (w - deq) / Hinv[0, 0]
        W[:, rest[1:]] -= np.outer(err, Hinv[0, 1:])
    return codes


def test_identity_hessian_is_round_to_nearest():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2, 5, 12, generator=g)
    s, z, lo, hi = _grid(W)
    codes = gptq_round(W, torch.eye(12).expand(2, 12, 12).clone(), s, z, lo, hi, damp=0.0)
    nearest = torch.clamp(torch.round(W * torch.reciprocal(s)[..., None]).long() + z[..., None], lo[..., None],
                          hi[..., None])
    assert torch.equal(codes, nearest)


@pytest.mark.parametrize("block", [128, 4])
def test_matches_column_by_column_reference(block):
    g = torch.Generator().manual_seed(1)
    K, R = 16, 6
    X = torch.randn(200, K, generator=g) @ torch.randn(K, K, generator=g)  # correlated inputs
    X[:, 3] = 0.0  # a dead input
    H = (X.T @ X).double()
    W = torch.randn(1, R, K, generator=g)
    s, z, lo, hi = _grid(W, bits=3)
    codes = gptq_round(W, H[None], s, z, lo, hi, damp=0.01, block=block)
    ref = _reference(W[0].numpy(), H.numpy(), s[0].numpy(), z[0].numpy(), lo[0].numpy(), hi[0].numpy(), 0.01)
    mismatch = (codes[0].numpy() != ref).mean()
    assert mismatch == 0.0, mismatch
    # and it reconstructs the layer better than round-to-nearest on these correlated inputs
    deq = lambda c: (c - z[..., None]).float() * s[..., None]
    rtn = torch.clamp(torch.round(W / s[..., None]).long() + z[..., None], lo[..., None], hi[..., None])
    assert reconstruction_error(W, deq(codes), H[None]) < 0.8 * reconstruction_error(W, deq(rtn), H[None])


def test_group_wise_grid_matches_column_by_column_reference():
    """A scale per block of 4 columns of each row ([G, R, K] per weight): the same recursion, each column on its
    block's grid."""
    g = torch.Generator().manual_seed(2)
    K, R, gs = 16, 5, 4
    X = torch.randn(150, K, generator=g) @ torch.randn(K, K, generator=g)
    H = (X.T @ X).double()
    W = torch.randn(1, R, K, generator=g)
    s, z, lo, hi = _grid(W.reshape(1, R, K // gs, gs), bits=3)  # [1, R, K / gs]
    per_weight = [t.repeat_interleave(gs, dim=-1) for t in (s, z)]
    qmin, qmax = lo[..., 0], hi[..., 0]
    codes = gptq_round(W, H[None], *per_weight, qmin, qmax, damp=0.01, block=8)
    ref = _reference(W[0].numpy(), H.numpy(), per_weight[0][0].numpy(), per_weight[1][0].numpy(), qmin[0].numpy(),
                     qmax[0].numpy(), 0.01)
    assert (codes[0].numpy() == ref).all()
    # and each block's grid is used: the codes reach both ends of the 3-bit range in blocks of small range
    assert int(codes.min()) == -4 and int(codes.max()) == 3


def test_apply_gptq_with_group_wise_weights_reconstructs_better_than_per_channel():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16),
                              torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with torch.no_grad():  # input-feature blocks of different magnitudes (as outlier features make them)
        for m in net[::2]:
            m.weight.mul_(torch.tensor([1.0, 0.05]).repeat_interleave(8).repeat(m.in_features // 16))
    mix = torch.randn(32, 32) * torch.tensor([1.0, 20.0]).repeat_interleave(8).repeat(2)  # ... and large inputs
    data = [(torch.randn(64, 32) @ mix,) for _ in range(4)]
    x = torch.randn(256, 32) @ mix
    errs = {}
    for gran, kw in (("channel", {}), ("group", {"group_size": 8})):
        cfg = bitalloc.preset("aciq-gptq", 3, None, weight_granularity=gran, first_last_bits=None, **kw)
        q = bitalloc.quantize(net, cfg, data)
        for _, layer in quant_layers(q):
            wq = layer.weight_quantizer
            p = wq.qparams()
            assert bool(wq.locked) and p.grouped == (gran == "group")
            # the weights sit exactly on their (block's) grid
            assert torch.equal(p.dequantize(p.quantize(layer.layer.weight)), layer.layer.weight)
        with torch.no_grad():
            errs[gran] = (q(x) - net(x)).pow(2).mean().item()
    assert errs["group"] < 0.8 * errs["channel"], errs


def test_captured_columns_reproduce_every_layer_output():
    """The columns GPTQ builds its Hessian from must be exactly what each layer multiplies its weight with
    (padding of the same-padding subclass, depthwise groups, Conv1d, Linear)."""
    net = make_net()
    x = torch.randn(3, 3, 16, 16)
    q = bitalloc.prepare(net, bitalloc.preset("minmax", 8, 8), x)
    inputs = {}
    hooks = [l.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0])) for n, l in quant_layers(q)]
    with bitalloc.float_mode(q):
        q(x)
    for h in hooks:
        h.remove()
    for name, layer in quant_layers(q):
        w = layer.layer.weight
        call = op_call(layer.layer, inputs[name])
        cols, G = input_columns(call, w)
        out = layer.layer(inputs[name])
        rows = w.shape[0]
        wg = w.reshape(G, rows // G, -1)
        y = torch.einsum("ngk,grk->ngr", cols.double(), wg.double()).reshape(cols.shape[0], rows)
        if layer.layer.bias is not None:
            y = y + layer.layer.bias.double()
        ref = out.movedim(1, -1).reshape(-1, rows) if out.ndim > 2 else out.reshape(-1, rows)
        assert torch.allclose(y.float(), ref, atol=1e-5), name


def test_apply_gptq_puts_weights_on_the_grid_and_helps():
    net = make_net()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 16, 16, generator=g),) for _ in range(2)]
    x = torch.randn(16, 3, 16, 16, generator=g)
    ref = net(x)
    err = {}
    for rounding in ("nearest", "gptq"):
        cfg = bitalloc.preset("minmax", 3, 8, first_last_bits=None, rounding=rounding)
        q = bitalloc.quantize(net, cfg, data)
        with torch.no_grad():
            err[rounding] = float((q(x) - ref).pow(2).mean())
        if rounding == "gptq":
            assert q.bitalloc_calibration["gptq_layers"] == ["stem", "dw", "pw", "conv1d", "fc"]
            for name, layer in quant_layers(q):
                w = layer.layer.weight
                assert torch.equal(layer.quantized_weight(), w), name  # exactly on the grid
                before = layer.weight_quantizer.scale.clone()
                layer.calibrate_weight()  # recalibration keeps the locked grid
                assert torch.equal(layer.weight_quantizer.scale, before)
            fresh = bitalloc.prepare(net, cfg, x[:2])
            fresh.load_state_dict(q.state_dict())
            assert torch.equal(fresh(x), q(x))
    assert err["gptq"] < err["nearest"]


def test_aciq_gptq_preset_rounds_allocated_channels_onto_mse_grids():
    """The aciq-gptq preset: every weight ends exactly on its channel's grid (allocated widths, MSE-searched
    ranges), with no data-free mean shift left, and its output error is below the round-to-nearest pipeline's."""
    net = make_net()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 16, 16, generator=g),) for _ in range(2)]
    x = torch.randn(16, 3, 16, 16, generator=g)
    ref = net(x)
    err = {}
    for name in ("aciq", "aciq-gptq"):
        q = bitalloc.quantize(net, bitalloc.preset(name, 3.5, 8, first_last_bits=None), data)
        with torch.no_grad():
            err[name] = float((q(x) - ref).pow(2).mean())
        if name == "aciq-gptq":
            for lname, layer in quant_layers(q):
                wq = layer.weight_quantizer
                assert torch.equal(layer.quantized_weight(), layer.layer.weight), lname
                assert not bool(wq.corr_shift.any()) and bool((wq.corr_scale == 1).all()), lname
                assert abs(float(wq.bits.double().mean()) - 3.5) <= 0.5 / wq.bits.numel() + 1e-9, lname
    assert err["aciq-gptq"] < err["aciq"]
