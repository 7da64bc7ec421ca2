"""Per-layer sensitivity against independent references: the layer quantized alone by bitalloc.quantize (the
PTQ pipeline itself, run whole), float64 exact Hessian traces, and the whole-model engine against the fx one."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitalloc
from bitalloc.errors import ConfigError
from bitalloc.search import Candidate, Sensitivity, layer_sensitivity
from bitalloc.search.hessian import hutchinson_traces
from bitalloc.search.space import exact_pattern
from tests.nets import make_net

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=3, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


def _minmax_act(cfg):
    """Activations with min-max ranges: exact statistics (no subsample), so a layer's grid does not depend on
    which other layers observe at the same time (the independent reference quantizes one layer only)."""
    cfg.default.act.method, cfg.default.act.options = "minmax", {}
    return cfg.validate()


def _alone(model, cfg, name, cand, data):
    """The reference: bitalloc.quantize with only ``name`` quantized, at ``cand``; outputs on ``data``."""
    cfg = copy.deepcopy(cfg)
    patch = {"quantize": True, "weight.bits": cand.w_bits, "act.bits": cand.a_bits}
    cfg.overrides = [("*", {"quantize": False}), (exact_pattern(name), patch)] + cfg.overrides
    q = bitalloc.quantize(model, cfg, data)
    with torch.no_grad():
        return torch.cat([q(x) for x, _ in data])


def _kl(ref, out):
    lp, lq = F.log_softmax(ref.double(), 1), F.log_softmax(out.double(), 1)
    return float((lp.exp() * (lp - lq)).sum(1).mean())


@pytest.mark.parametrize("preset", ["minmax", "aciq", "aciq-gptq"])
def test_sensitivity_is_the_layer_quantized_alone_by_ptq(preset):
    net = make_net()
    data = _data()
    cfg = _minmax_act(bitalloc.preset(preset, 4, 4, first_last_bits=None))
    cands = [Candidate(32, 32), Candidate(8, 8), Candidate(4, 4), Candidate(2, 8)]
    s = layer_sensitivity(net, cfg, data, cands)
    assert s.engine == "fx-suffix"
    assert set(s.layers) == {"stem", "dw", "pw", "conv1d", "fc"}
    with torch.no_grad():
        ref = torch.cat([net(x) for x, _ in data])
    torch.testing.assert_close(s.reference, ref, rtol=1e-5, atol=1e-5)
    for i, name in enumerate(s.layers):
        for j, cand in enumerate(s.candidates):
            if cand.is_float:
                continue
            want = _kl(ref, _alone(net, cfg, name, cand, data))
            assert s.values[i, j] == pytest.approx(want, rel=2e-3, abs=1e-9), (name, cand.label)
    # deltas are the layer's own change of the outputs
    j = s.column(Candidate(4, 4))
    torch.testing.assert_close(s.reference + s.deltas[1, j], _alone(net, cfg, s.layers[1], Candidate(4, 4), data),
                               rtol=1e-4, atol=1e-4)


def test_sensitivity_at_32_bits_is_exactly_zero_and_narrower_hurts_more():
    s = layer_sensitivity(make_net(), bitalloc.preset("aciq", 4, 4), _data(), "32x32,8x8,4x4,2x4")
    f = s.column(Candidate(32, 32))
    assert (s.values[:, f] == 0).all()
    assert (s.deltas[:, f] == 0).all()
    w8, w4, w2 = (s.values[:, s.column(Candidate.parse(c))] for c in ("8x8", "4x4", "2x4"))
    assert (w8 > 0).all() and (w4 > w8).all() and (w2 > w4).all()


def test_fx_engine_equals_whole_model_runs():
    cfg = bitalloc.preset("aciq-gptq", 4, 4)
    a = layer_sensitivity(make_net(), cfg, _data(), "8x8,4x4,2x8,32x32")
    b = layer_sensitivity(make_net(), cfg, _data(), "8x8,4x4,2x8,32x32", use_fx=False)
    assert (a.engine, b.engine) == ("fx-suffix", "full-forward")
    np.testing.assert_allclose(a.values, b.values, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(a.costs["bops"], b.costs["bops"])


def test_untraceable_model_falls_back_to_whole_runs():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 4)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace it
                h = torch.relu(h)
            return self.b(h)

    torch.manual_seed(0)
    data = [(torch.randn(8, 6), torch.randint(0, 4, (8,)))]
    s = layer_sensitivity(DataDependent(), bitalloc.preset("minmax", 4, 4, first_last_bits=None), data, "32x32,4x4")
    assert s.engine == "full-forward"
    assert (s.values[:, 0] == 0).all() and (s.values[:, 1] > 0).all()


def test_loss_metric_is_the_cross_entropy_increase():
    net, data = make_net(), _data()
    cfg = _minmax_act(bitalloc.preset("minmax", 4, 4, first_last_bits=None))
    s = layer_sensitivity(net, cfg, data, "4x4", metric="loss", layers=["pw"])
    y = torch.cat([y for _, y in data])
    with torch.no_grad():
        ref = torch.cat([net(x) for x, _ in data])
    out = _alone(net, cfg, "pw", Candidate(4, 4), data)
    want = float(F.cross_entropy(out.double(), y) - F.cross_entropy(ref.double(), y))
    assert s.values[0, 0] == pytest.approx(want, rel=1e-3, abs=1e-9)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("metric", ["kl", "loss"])
def test_hutchinson_traces_match_the_exact_hessian(metric):
    torch.manual_seed(0)
    model = Tiny().double()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    q = bitalloc.prepare(model, bitalloc.preset("minmax", 8, 8, first_last_bits=None), x)
    with torch.no_grad():
        ref = model(x) + (0.3 * torch.randn(6, 3, dtype=torch.float64) if metric == "kl" else 0)

    def objective(out):
        if metric == "kl":
            lp = F.log_softmax(ref, 1)
            return (lp.exp() * (lp - F.log_softmax(out, 1))).sum() / 6
        return F.cross_entropy(out, y, reduction="sum") / 6

    w = model.b.weight.detach().clone()
    hw = torch.autograd.functional.hessian(
        lambda w_: objective(torch.tanh(model.a(x)) @ w_.T + model.b.bias), w)
    h_in = torch.tanh(model.a(x)).detach()
    hx = torch.autograd.functional.hessian(lambda h: objective(model.b(h)), h_in)
    exact_w = float(torch.einsum("ijij->", hw)) / w.numel()
    exact_x = float(torch.einsum("ijij->", hx)) / h_in.numel()
    tr = hutchinson_traces(q, ["b"], [x], [y], [ref], metric, samples=400, seed=1)["b"]
    assert abs(tr["weight"] - exact_w) <= 4 * tr["weight_se"] + 1e-12
    assert abs(tr["act"] - exact_x) <= 4 * tr["act_se"] + 1e-12
    assert tr["weight_se"] < 0.2 * abs(exact_w)  # the test has power


def test_hessian_estimate_tracks_the_measured_damage():
    s = layer_sensitivity(make_net(), bitalloc.preset("aciq", 4, 4), _data(), "8x8,4x4,2x4", hessian=True,
                          hutchinson_samples=8)
    assert s.hessian is not None and s.hessian.shape == s.values.shape and (s.hessian > 0).all()
    assert set(s.traces) == set(s.layers)
    # narrower widths: larger estimate, as measured
    assert (np.diff(s.hessian, axis=1) > 0).all() and (np.diff(s.values, axis=1) > 0).all()


def test_hessian_added_later_is_the_same_estimate():
    cfg = bitalloc.preset("aciq-gptq", 4, 4)
    s = layer_sensitivity(make_net(), cfg, _data(), "8x8,4x4,2x4", hessian=True, hutchinson_samples=8)
    plain = layer_sensitivity(make_net(), cfg, _data(), "8x8,4x4,2x4")
    assert plain.hessian is None
    from bitalloc.search import add_hessian

    later = add_hessian(make_net(), plain, _data(), hutchinson_samples=8)
    np.testing.assert_allclose(later.hessian, s.hessian, rtol=1e-9)
    np.testing.assert_array_equal(later.values, plain.values)


def test_state_round_trip_and_progress(tmp_path):
    from bitalloc.io import torch_load, torch_save

    calls = []
    s = layer_sensitivity(make_net(), bitalloc.preset("aciq", 4, 4), _data(n=1), "8x8,4x4",
                          progress=lambda n, total: calls.append((n, total)))
    assert calls == [(1, 2 * len(s.layers))] * (2 * len(s.layers))
    torch_save(s.state(), tmp_path / "s.pt")
    back = Sensitivity.from_state(torch_load(tmp_path / "s.pt", what="sensitivity", fix="recompute"))
    np.testing.assert_array_equal(back.values, s.values)
    assert back.candidates == s.candidates and back.patches == s.patches and back.fixed == s.fixed
    d = s.to_dict()
    assert [r["name"] for r in d["layers"]] == s.layers and set(d["layers"][0]["damage"]) == {"W8A8", "W4A4"}


def test_errors_name_the_fix():
    net, data = make_net(), _data(n=1)
    with pytest.raises(ConfigError, match="metric"):
        layer_sensitivity(net, bitalloc.preset("aciq"), data, "4x4", metric="top5")
    with pytest.raises(ConfigError, match="labelled"):
        layer_sensitivity(net, bitalloc.preset("aciq"), [x for x, _ in data], "4x4", metric="loss")
    with pytest.raises(ConfigError, match="in float"):
        layer_sensitivity(net, bitalloc.preset("aciq", 4, None), data, "4x4")
    lsq = bitalloc.preset("minmax", 4, 4)
    lsq.default.weight.quantizer = "lsq"
    with pytest.raises(ConfigError, match="post-training"):
        layer_sensitivity(net, lsq, data, "4x4")
    with pytest.raises(ConfigError, match="not quantized layers"):
        layer_sensitivity(net, bitalloc.preset("aciq"), data, "4x4", layers=["nope"])
    with pytest.raises(ConfigError, match="at least 1"):
        layer_sensitivity(net, bitalloc.preset("aciq"), data, "4x4", num_samples=0)
