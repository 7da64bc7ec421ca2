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


pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("method", ["lsq", "pact", "bb"])
def test_frozen_model_equals_trained_model_in_eval(method, granularity):
    torch.manual_seed(1)
    model = prepare_qat(SmallConv(), method, {"input_shape": [2, 8, 8], "w_bits": 3, "a_bits": 3,
                                              "granularity": granularity})
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
        def one(t):  # the single value of a per-tensor or per-channel (uniform) parameter
            assert t.unique().numel() == 1, t
            return int(t.reshape(-1)[0])

        assert one(layers["c1"].weight_quantizer.bits) == 4 and one(layers["c2"].weight_quantizer.bits) == 2
        assert int(layers["c1"].input_quantizer.bits) == 8  # the network input: fixed 8 bits
        assert int(layers["c2"].input_quantizer.bits) == 16 and int(layers["fc"].input_quantizer.bits) == 4
        assert layers["c1"].weight_quantizer.kept.tolist() == [True, False, True, True, False, True]
        assert bool(layers["fc"].weight_quantizer.kept.all())  # the last layer is never pruned
        assert one(layers["c2"].weight_quantizer.qmin) == -1 and one(layers["c2"].weight_quantizer.qmax) == 1
    if granularity == "channel":
        assert all(l.weight_quantizer.scale.shape == (l.layer.weight.shape[0],) for _, l in quant_layers(frozen))


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
    from bitalloc.errors import CheckpointError

    data = path.read_bytes()
    for name, content, reason in [("truncated.pt", data[: len(data) // 2], "corrupt or truncated"),
                                  ("pickled.pt", b"\x80\x02cos\nsystem\nq\x00.", "unpickling failed")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=f"quantized model .*{name} is corrupt or truncated") as e:
            load_quantized(tmp_path / name, SmallConv())
        assert reason in str(e.value) and "bitalloc freeze" in str(e.value) and "\n" not in str(e.value)


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


# ---- exact pruning: the bias of a pruned channel is gated too ---------------------------------------------------

def _capture(layer: nn.Module) -> dict:
    seen = {}
    layer.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    return seen


def test_pruned_channels_output_exactly_zero():
    """A pruned output channel outputs exactly 0 (not relu(bias)) in eval mode, in the frozen model and in a
    training forward whose z2 sample is 0; the bias gradient is the closed form z2_c * (outputs per channel)."""
    torch.manual_seed(3)
    model = prepare_qat(SmallConv(), "bb", {"input_shape": [2, 8, 8]})
    x = torch.randn(5, 2, 8, 8)
    model.train()
    model(x)
    _bb_mixed(model)  # c1 channels 1 and 4 pruned
    c1 = dict(quant_layers(model))["c1"]
    with torch.no_grad():
        c1.layer.bias.copy_(torch.tensor([0.3, 0.7, -0.2, 0.4, 0.9, 0.1]))  # pruned channels with a positive bias
    pruned, kept = [1, 4], [0, 2, 3, 5]

    model.eval()
    seen = _capture(c1)
    with torch.no_grad():
        ref = model(x)
    out = seen["out"]
    assert torch.equal(out[:, pruned], torch.zeros_like(out[:, pruned]))
    assert bool((out[:, kept].abs() > 0).any(-1).any(-1).all())  # the kept channels do output something

    frozen = freeze(model)
    f1 = dict(quant_layers(frozen))["c1"]
    assert f1.layer.bias[pruned].tolist() == [0.0, 0.0] and f1.layer.bias[kept].tolist() == c1.layer.bias[kept].tolist()
    fseen = _capture(f1)
    with torch.no_grad():
        assert torch.equal(frozen(x), ref)
    assert torch.equal(fseen["out"][:, pruned], torch.zeros_like(fseen["out"][:, pruned]))
    # the integer/ONNX description agrees: the frozen layer computes conv(x_q, w_q) + bias with zeroed bias
    assert bool(f1.weight_quantizer.qparams().kept.tolist() == [True, False, True, True, False, True])

    # training mode: z2 sampled; with log-alpha -30 the pruned channels' sample is exactly 0
    model.train()
    with torch.no_grad():
        c1.weight_quantizer.log_alpha_prune[pruned] = -30.0
    c1.layer.bias.grad = None
    y = model(x)
    z2 = c1.weight_quantizer.output_gate()
    assert z2 is not None and z2.requires_grad and z2[pruned].tolist() == [0.0, 0.0]
    out = seen["out"]
    assert torch.equal(out[:, pruned], torch.zeros_like(out[:, pruned]))
    out.sum().backward(retain_graph=True)
    n_out = x.shape[0] * out.shape[2] * out.shape[3]
    assert torch.allclose(c1.layer.bias.grad, z2.detach() * n_out)
    y.sum().backward()  # the graph through the gated bias is intact
    assert c1.weight_quantizer.log_alpha_prune.grad is not None


# ---- BatchNorm left unfolded in training, folded at freeze time -----------------------------------------------------

class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.c1 = nn.Conv2d(2, 6, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 4, 3)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.c1(x)))
        x = torch.relu(self.bn2(self.c2(x)))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("method", ["lsq", "pact"])
def test_no_fold_bn_trains_with_batchnorm_and_freeze_folds_it_exactly(method, tmp_path):
    from bitalloc.model.serialize import load_quantized, save_quantized

    opts = {"input_shape": [2, 8, 8], "w_bits": 4, "a_bits": 4, "fold_bn": False}
    model = prepare_qat(ConvBN(), method, opts)
    assert isinstance(model.bn1, nn.BatchNorm2d) and isinstance(model.bn2, nn.BatchNorm2d)  # not folded
    folded_model = prepare_qat(ConvBN(), method, dict(opts, fold_bn=True))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded_model.modules())  # the default folds
    x = torch.randn(16, 2, 8, 8)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for _ in range(4):  # a few steps: running statistics and the BN affine parameters move
        opt.zero_grad()
        model(x + 0.3 * torch.randn_like(x)).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():  # a negative scale on some channels: codes are negated (PACT's grid is symmetric)
        model.bn2.weight[1] = -abs(float(model.bn2.weight[1])) - 0.2
        if method == "lsq":  # LSQ's -2^(b-1) has no negation: keep the channel off that code
            model.bn2.weight[1] = abs(float(model.bn2.weight[1]))
    model.eval()
    with torch.no_grad():
        ref = model(x)
    frozen = freeze(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    layers = dict(quant_layers(frozen))
    for name in ("c1", "c2"):
        wq = layers[name].weight_quantizer
        assert isinstance(wq, FrozenQuantizer) and wq.cfg.granularity == "channel"
        p = wq.qparams()
        w = layers[name].layer.weight
        assert torch.equal(wq(w), p.dequantize(p.quantize(w)))
    with torch.no_grad():
        out = frozen(x)
    # Same codes, same function; only the float rounding of conv(x, g Q(W)) vs g conv(x, Q(W)) differs, which
    # can flip an activation code that lies within float error of a rounding boundary. With the activation
    # quantizers off the comparison is at float precision; with them on, the predictions agree.
    from bitalloc.model.layers import set_quantization_enabled

    for m in (model, frozen):
        set_quantization_enabled(m, False, weights=False, acts=True)
    with torch.no_grad():
        ref_w, out_w = model(x), frozen(x)
    for m in (model, frozen):
        set_quantization_enabled(m, True, weights=False, acts=True)
    assert torch.allclose(out_w, ref_w, rtol=1e-5, atol=1e-5 * float(ref_w.abs().max()))
    assert torch.equal(out.argmax(1), ref.argmax(1))
    # the folded weights are the trained grid times g = gamma / sqrt(var + eps), per output channel (float64)
    bn, ql = model.bn2, dict(quant_layers(model))["c2"]
    g = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).view(-1, 1, 1, 1)
    trained = ql.weight_quantizer.qparams()
    wq_trained = trained.dequantize(trained.quantize(ql.layer.weight)).double()
    folded = layers["c2"].weight_quantizer(layers["c2"].layer.weight).double()
    assert torch.allclose(folded, wq_trained * g, rtol=1e-6, atol=1e-7)
    b_ref = (ql.layer.bias.double() - bn.running_mean.double()) * g.view(-1) + bn.bias.double()
    assert torch.allclose(layers["c2"].layer.bias.double(), b_ref, rtol=1e-6, atol=1e-7)
    # the frozen config records the fold, so load_quantized rebuilds the same structure
    assert frozen.bitalloc_info.config.fold_bn
    path = save_quantized(frozen, tmp_path / "f.pt", example_shape=(2, 8, 8))
    loaded = load_quantized(path, ConvBN())
    with torch.no_grad():
        assert torch.equal(loaded(x), out)  # the saved frozen model: bitwise


def test_bb_with_pruning_requires_folded_batchnorm():
    with pytest.raises(ConfigError, match="fold-bn"):
        prepare_qat(ConvBN(), "bb", {"input_shape": [2, 8, 8], "fold_bn": False})
    prepare_qat(ConvBN(), "bb", {"input_shape": [2, 8, 8], "fold_bn": False, "prune": False})  # no pruning: allowed
    prepare_qat(SmallConv(), "bb", {"input_shape": [2, 8, 8], "fold_bn": False})  # no BatchNorm: nothing to fold


def test_freeze_refuses_inexact_batchnorm_fold():
    """LSQ's code range [-2^(b-1), 2^(b-1)-1] has no negation for -2^(b-1): a negative BatchNorm scale on a
    channel using that code cannot be folded on the grid; a clear error instead of a silent change."""
    model = prepare_qat(ConvBN(), "lsq", {"input_shape": [2, 8, 8], "fold_bn": False})
    model.train()
    model(torch.randn(4, 2, 8, 8))  # initialises the activation steps
    ql = dict(quant_layers(model))["c1"]  # the first layer: 8-bit codes [-128, 127]
    with torch.no_grad():
        s = float(ql.weight_quantizer.step)
        ql.layer.weight[0, 0, 0, 0] = -1000 * s  # clamps to the code -128
        model.bn1.weight[0] = -1.0
    model.eval()
    with pytest.raises(ConfigError, match="negative scale on channel 0"):
        freeze(model)
