"""Freezing trained quantizers into fixed mixed-precision, pruned models.

* the frozen model computes bitwise what the trained model computes in eval mode (LSQ, PACT, Bayesian Bits
  with mixed bit widths and pruned channels, and calibrated PTQ quantizers);
* its QuantParams are the test-time description (thresholded gates -> bits and kept channels);
* cost_report counts BOPs with the kept fraction of a pruned layer carried into the next layer (hand count);
* serialize.save_quantized / load_quantized round-trips a frozen model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bitalloc
from bitalloc.config import LayerConfig, QuantConfig, TensorConfig
from bitalloc.errors import ConfigError
from bitalloc.model.freeze import freeze, is_frozen
from bitalloc.model.layers import quant_layers
from bitalloc.quantizers import FrozenQuantizer
from bitalloc.train.methods import prepare_qat


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class SmallConv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(2, 6, 3)
        self.c2 = nn.Conv2d(6, 5, 3)
        self.fc = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(x.flatten(1))


def _bb_mixed(model: nn.Module) -> nn.Module:
    """Set Bayesian Bits gates by hand: mixed widths and pruned channels."""
    layers = dict(quant_layers(model))
    with torch.no_grad():
        layers["c1"].weight_quantizer.log_alpha.copy_(torch.tensor([6.0, -6.0, -6.0, -6.0]))  # 4 bits
        layers["c1"].weight_quantizer.log_alpha_prune[[1, 4]] = -6.0  # 2 of 6 channels pruned
        layers["c2"].weight_quantizer.log_alpha.copy_(torch.tensor([-6.0, 6.0, 6.0, 6.0]))  # 2 bits (z4 off)
        layers["c2"].input_quantizer.log_alpha.copy_(torch.tensor([6.0, 6.0, 6.0, -6.0]))  # 16 bits
        layers["fc"].input_quantizer.log_alpha.copy_(torch.tensor([6.0, -6.0, 6.0, 6.0]))  # 4 bits
    return model


@pytest.mark.parametrize("method", ["lsq", "pact", "bb"])
def test_frozen_model_equals_trained_model_in_eval(method):
    torch.manual_seed(1)
    model = prepare_qat(SmallConv(), method, {"input_shape": [2, 8, 8], "w_bits": 3, "a_bits": 3})
    x = torch.randn(16, 2, 8, 8)
    model.train()
    y = model(x)  # initialises activation quantizers from the first batch
    y.sum().backward()
    with torch.no_grad():  # move every learned parameter a little, as training would
        for n, p in model.named_parameters():
            if "log_alpha" not in n:
                p.mul_(1.03)
    if method == "bb":
        _bb_mixed(model)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    frozen = freeze(model)
    assert is_frozen(frozen) and not is_frozen(model)
    with torch.no_grad():
        out = frozen(x)
    assert torch.equal(out, ref)
    # the frozen weight equals QuantParams.dequantize(QuantParams.quantize(w))
    for name, layer in quant_layers(frozen):
        p = layer.weight_quantizer.qparams()
        w = layer.layer.weight
        assert torch.equal(layer.weight_quantizer(w), p.dequantize(p.quantize(w))), name
    if method == "bb":
        layers = dict(quant_layers(frozen))
        assert int(layers["c1"].weight_quantizer.bits) == 4 and int(layers["c2"].weight_quantizer.bits) == 2
        assert int(layers["c1"].input_quantizer.bits) == 8  # the network input: fixed 8 bits
        assert int(layers["c2"].input_quantizer.bits) == 16 and int(layers["fc"].input_quantizer.bits) == 4
        assert layers["c1"].weight_quantizer.kept.tolist() == [True, False, True, True, False, True]
        assert bool(layers["fc"].weight_quantizer.kept.all())  # the last layer is never pruned
        assert int(layers["c2"].weight_quantizer.qmin) == -1 and int(layers["c2"].weight_quantizer.qmax) == 1


def test_frozen_cost_carries_kept_fraction_into_next_layer():
    model = prepare_qat(SmallConv(), "bb", {"input_shape": [2, 8, 8]})
    model.train()
    model(torch.randn(4, 2, 8, 8))
    _bb_mixed(model)
    frozen = freeze(model)
    rep = bitalloc.cost_report(frozen, torch.zeros(1, 2, 8, 8))
    by = {l.name: l for l in rep.layers}
    macs_c1 = 2 * 6 * 9 * 36
    macs_c2 = 6 * 5 * 9 * 16
    macs_fc = 80 * 3
    # c1: 4-bit weights x 8-bit input, 4 of 6 output channels kept
    assert by["c1"].bops == pytest.approx(4 * 8 * macs_c1 * 4 / 6)
    # c2: 2-bit weights x 16-bit input; 4 of its 6 input channels survive c1's pruning
    assert by["c2"].kept_fraction == pytest.approx(4 / 6)
    assert by["c2"].bops == pytest.approx(2 * 16 * macs_c2 * 4 / 6)
    # fc: 32-bit weights (default gate init off MNIST: 6,6,6,6) x 4-bit input, all kept
    assert by["fc"].bops == pytest.approx(32 * 4 * macs_fc)
    total = macs_c1 + macs_c2 + macs_fc
    assert rep.relative_bops == pytest.approx((by["c1"].bops + by["c2"].bops + by["fc"].bops) / (1024 * total))
    # the trained model in eval mode reports the same test-time cost; in train mode the expected bits
    model.eval()
    assert bitalloc.cost_report(model, torch.zeros(1, 2, 8, 8)).bops == pytest.approx(rep.bops)
    model.train()
    assert bitalloc.cost_report(model, torch.zeros(1, 2, 8, 8)).bops != pytest.approx(rep.bops)


def test_serialize_round_trip_of_frozen_model(tmp_path):
    from bitalloc.model.serialize import load_quantized, save_quantized

    model = prepare_qat(SmallConv(), "bb", {"input_shape": [2, 8, 8]})
    model.train()
    x = torch.randn(8, 2, 8, 8)
    model(x)
    frozen = freeze(_bb_mixed(model))
    path = save_quantized(frozen, tmp_path / "q.pt", example_shape=(2, 8, 8))
    loaded = load_quantized(path, SmallConv())
    assert all(isinstance(q, FrozenQuantizer) for _, l in quant_layers(loaded) for q in l.quantizers())
    with torch.no_grad():
        assert torch.equal(loaded(x), frozen(x))


def test_freeze_ptq_model_and_errors():
    torch.manual_seed(2)
    model = SmallConv()
    x = torch.randn(16, 2, 8, 8)
    q = bitalloc.quantize(model, bitalloc.preset("aciq", w_bits=4, a_bits=4), [(x, None)])
    q.eval()
    with torch.no_grad():
        ref = q(x)
        assert torch.equal(freeze(q)(x), ref)
    unready = bitalloc.prepare(model, QuantConfig(default=LayerConfig(
        weight=TensorConfig(bits=4, symmetric=True, quantizer="lsq"), act=TensorConfig(bits=4, quantizer="lsq"))),
        x[:1])
    with pytest.raises(ConfigError, match="uninitialised"):
        freeze(unready)
    with pytest.raises(ConfigError):
        freeze(SmallConv())
