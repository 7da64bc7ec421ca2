"""Group-wise weight grids (granularity "group"): a range per block of input features of each output channel.

References: a float32 numpy block-by-block quantizer (the same x * (1/s) arithmetic), the per-block min-max
range computed by hand, and the per-channel path for blocks as wide as the row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bitalloc
from bitalloc.coding.packfile import pack_model, unpack_model
from bitalloc.config import TensorConfig
from bitalloc.errors import ConfigError, ShapeError
from bitalloc.model.freeze import freeze, save_frozen
from bitalloc.model.serialize import load_quantized, save_quantized
from bitalloc.quant.grid import dequantize, fake_quantize, group_params, quantize
from bitalloc.quantizers.fixed import FixedQuantizer
from bitalloc.runtime.integer import IntegerExecutionError, layer_ints


def _reference_codes(w: np.ndarray, scale: np.ndarray, qmin: np.ndarray, qmax: np.ndarray) -> np.ndarray:
    c, k = w.shape
    gs = k // scale.shape[1]
    out = np.empty((c, k), dtype=np.int64)
    for r in range(c):
        for b in range(scale.shape[1]):
            inv = np.float32(1.0) / np.float32(scale[r, b])
            block = w[r, b * gs:(b + 1) * gs].astype(np.float32) * inv
            out[r, b * gs:(b + 1) * gs] = np.clip(np.round(block), qmin[r], qmax[r])
    return out


def test_grid_functions_apply_one_scale_per_block():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 24, generator=g) * torch.logspace(-2, 1, 24)  # columns of very different magnitude
    scale = torch.rand(6, 3, generator=g) * 0.5 + 0.01
    zp = torch.zeros(6, 3, dtype=torch.int64)
    qmin, qmax = torch.full((6,), -8), torch.tensor([7, 7, 7, 3, 3, 1])  # a width per row
    codes = quantize(w, scale, zp, qmin, qmax, axis=0)
    assert np.array_equal(codes.numpy(), _reference_codes(w.numpy(), scale.numpy(), qmin.numpy(), qmax.numpy()))
    deq = dequantize(codes, scale, zp, axis=0)
    assert torch.equal(deq, codes.float() * scale.repeat_interleave(8, dim=1))
    assert torch.equal(fake_quantize(w, scale, zp, qmin, qmax, axis=0), deq)  # the no-gradient path
    x = w.clone().requires_grad_(True)  # the gradient path: same values, straight-through inside the range
    y = fake_quantize(x, scale, zp, qmin, qmax, axis=0)
    assert torch.equal(y.detach(), deq)
    y.sum().backward()
    inside = (codes > qmin[:, None]) & (codes < qmax[:, None])
    assert torch.allclose(x.grad[inside], torch.ones(int(inside.sum()))) and int(inside.sum()) > 20
    # blocks as wide as the row are the per-channel grid
    assert torch.equal(quantize(w, scale[:, :1], zp[:, :1], qmin, qmax, axis=0),
                       quantize(w, scale[:, 0], zp[:, 0], qmin, qmax, axis=0))
    with pytest.raises(ShapeError, match="blocks"):
        group_params(w, 0, torch.ones(6, 5))
    with pytest.raises(ShapeError, match="2-d tensor"):
        group_params(w.reshape(6, 4, 6), 0, scale)


def test_quantizer_ranges_are_per_block_min_max_and_beat_per_channel_on_uneven_rows():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 32, generator=g) * torch.tensor([1.0, 0.02]).repeat_interleave(8).repeat(2)
    errs = {}
    for gran in ("channel", "group"):
        q = FixedQuantizer(TensorConfig(bits=4, granularity=gran, symmetric=True, group_size=8), "weight", 0, 8,
                           shape=(8, 32))
        q.calibrate_weight(w)
        small = torch.tensor([False, True]).repeat_interleave(8).repeat(2)  # the blocks of small weights
        errs[gran] = float((q(w) - w)[:, small].pow(2).mean())
    assert tuple(q.scale.shape) == (8, 4) and tuple(q.bits.shape) == (8,)
    amax = w.reshape(8, 4, 8).abs().amax(-1)
    assert torch.allclose(q.scale, 2 * amax / 15)  # symmetric 4-bit grid over [-max|w|, max|w|] of each block
    assert errs["group"] < 0.1 * errs["channel"], errs


@pytest.mark.parametrize("cfg, shape, message", [
    (dict(granularity="group", group_size=1), (4, 8), "group_size"),
    (dict(granularity="group", group_size=3), (4, 8), "does not divide"),
    (dict(granularity="group", group_size=4), (4, 2, 3, 3), "2-d"),
    (dict(granularity="group", group_size=4, online=True), (4, 8), "offline"),
    (dict(granularity="group", group_size=4, quantizer="lsq"), (4, 8), "trained"),
])
def test_bad_group_configurations_are_one_line_errors(cfg, shape, message):
    with pytest.raises(ConfigError, match=message) as err:
        tc = TensorConfig(bits=4, symmetric=True, **cfg)
        FixedQuantizer(tc, "weight", 0, shape[0], shape=shape)
    assert "\n" not in str(err.value)


def test_activations_and_presets_refuse_groups():
    with pytest.raises(ConfigError, match="weights"):
        FixedQuantizer(TensorConfig(bits=8, granularity="group", group_size=4), "act", -1, 8, shape=(8, 8))
    with pytest.raises(ConfigError, match="activation granularity"):
        bitalloc.preset("minmax", 4, 8, act_granularity="group")
    with pytest.raises(ConfigError, match="--weight-granularity group"):
        bitalloc.preset("minmax", 4, 8, group_size=64)
    cfg = bitalloc.preset("aciq-gptq", 4, 8, weight_granularity="group", group_size=16)
    assert cfg.default.weight.granularity == "group" and not cfg.default.weight.allocate
    assert cfg.default.weight.group_size == 16 and cfg.default.weight.rounding == "gptq"


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))


def test_group_wise_model_saves_packs_freezes_and_costs_its_scales(tmp_path):
    net = _mlp()
    data = [(torch.randn(16, 64),) for _ in range(4)]
    q = bitalloc.quantize(net, bitalloc.preset("aciq-gptq", 4, 8, weight_granularity="group", group_size=16), data)
    x = torch.randn(5, 64)
    y = q(x)
    scales = {n: tuple(l.weight_quantizer.scale.shape) for n, l in bitalloc.quant_layers(q)}
    assert scales == {"0": (32, 4), "2": (16, 2), "4": (8, 1)}
    # the cost report counts every block's scale and zero point as metadata (32 bits each)
    per_channel = bitalloc.quantize(net, bitalloc.preset("aciq-gptq", 4, 8, weight_granularity="channel",
                                                         first_last_bits=8), data)
    c_group = bitalloc.cost_report(q, x[:1])
    c_chan = bitalloc.cost_report(per_channel, x[:1])
    extra_blocks = (32 * 4 - 32) + (16 * 2 - 16)  # blocks beyond one per channel
    assert c_group.overhead_bits - c_chan.overhead_bits == 2 * 32 * extra_blocks
    assert [l.w_bits for l in c_group.layers] == [8.0, 4.0, 8.0]
    # saved, packed (bit-identical) and frozen models compute the same function
    again = load_quantized(save_quantized(q, tmp_path / "q.pt", example_shape=(1, 64)), _mlp())
    assert torch.equal(again(x), y)
    pack_model(q, tmp_path / "q.bapk", example_shape=(1, 64))
    assert torch.equal(unpack_model(tmp_path / "q.bapk", model=_mlp())(x), y)
    frozen = freeze(q)
    assert torch.equal(frozen(x), y)
    save_frozen(frozen, tmp_path / "f.pt", model_name=None, example_shape=(1, 64))
    assert torch.equal(load_quantized(tmp_path / "f.pt", _mlp())(x), y)  # frozen group-wise grids rebuilt
    # where one scale per channel is all a backend can apply: a one-line refusal naming the fix
    with pytest.raises(IntegerExecutionError, match="per channel"):
        layer_ints(dict(bitalloc.quant_layers(q))["2"])
    pytest.importorskip("onnx")
    with pytest.raises(ConfigError, match="weight granularity 'channel'") as err:
        bitalloc.runtime.export_onnx(q, x[:1], tmp_path / "q.onnx")
    assert "\n" not in str(err.value) and not (tmp_path / "q.onnx").exists()


def test_conv_layers_name_the_fix_and_the_cli_takes_group_size(tmp_path, capsys):
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    with pytest.raises(ConfigError, match=r"layer '0' \(Conv2d\) weight: .*2-d .*weight.granularity"):
        bitalloc.prepare(conv, bitalloc.preset("minmax", 4, 8, weight_granularity="group", group_size=3),
                         torch.randn(1, 3, 8, 8))
    # a Linear-only override on a convolutional network
    cfg = bitalloc.preset("minmax", 4, 8, first_last_bits=None)
    cfg.overrides.append(("type:Linear", {"weight.granularity": "group", "weight.group_size": 12}))
    q = bitalloc.prepare(conv, cfg.validate(), torch.randn(1, 3, 8, 8))
    assert tuple(dict(bitalloc.quant_layers(q))["3"].weight_quantizer.scale.shape) == (10, 24)
    from bitalloc.cli import main

    data = tmp_path / "data.pt"
    torch.save([torch.randn(64) for _ in range(24)], data)
    model_file = tmp_path / "net.py"
    model_file.write_text("import torch\n\ndef build():\n    torch.manual_seed(0)\n    return torch.nn.Sequential("
                          "torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))\n")
    common = ["ptq", "--model", f"{model_file}:build", "--trust-code", "--inputs", str(data), "--calib", "8",
              "--preset", "aciq-gptq", "--w-bits", "4", "--a-bits", "8", "--first-last-bits", "none", "--no-plot"]
    assert main(common + ["--weight-granularity", "group", "--group-size", "16", "--out", str(tmp_path / "o")]) == 0
    import json

    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["config"]["default"]["weight"]["group_size"] == 16
    capsys.readouterr()
    assert main(common + ["--group-size", "16", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "--weight-granularity group" in err and err.count("\n") == 1
