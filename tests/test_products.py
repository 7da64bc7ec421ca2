"""Quantized activation x activation products (``QuantConfig.product_bits``, bitalloc.model.products).

References: a float64 numpy per-sample min-max quantizer, a hand-written attention with the operands quantized
by it, and the cost report's MACs times the bit widths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitalloc
from bitalloc.errors import ConfigError
from bitalloc.model.products import quantize_operand
from bitalloc.model.serialize import load_quantized, save_quantized


def _reference(x: np.ndarray, bits: int) -> np.ndarray:
    rows = x.reshape(x.shape[0], -1).astype(np.float64)
    out = np.empty_like(rows)
    for i, r in enumerate(rows):
        lo, hi = min(r.min(), 0.0), max(r.max(), 0.0)
        if lo < 0:  # signed symmetric: 2^b - 1 steps over [-a, a], codes -2^(b-1) .. 2^(b-1) - 1
            s = 2 * max(-lo, hi) / (2 ** bits - 1)
            q = np.clip(np.round(r / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        else:  # unsigned from 0
            s = hi / (2 ** bits - 1)
            q = np.clip(np.round(r / s), 0, 2 ** bits - 1)
        out[i] = q * s
    return out.reshape(x.shape)


@pytest.mark.parametrize("bits", [8, 4])
def test_operands_use_each_samples_min_max_grid(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1]).reshape(3, 1, 1)
    probs = torch.rand(2, 6, generator=g).softmax(-1)  # >= 0: unsigned grid
    for t in (x, probs):
        got, ref = quantize_operand(t, bits).numpy(), _reference(t.numpy(), bits)
        close = np.isclose(got, ref, rtol=1e-5, atol=1e-7)
        # float32 x * (1/s) against float64 x / s: a value at half a step may round the other way
        step = np.abs(np.diff(np.unique(ref))).min()
        assert (~close).sum() <= 2 and np.abs(got - ref).max() <= step * 1.001
    # every sample on its own grid: at most 2^b distinct values per sample
    assert all(len(np.unique(quantize_operand(x, bits)[i].numpy())) <= 2 ** bits for i in range(3))


class Attention(nn.Module):
    def __init__(self, sdpa: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.randn(8, 8))  # a parameter operand: not an activation product
        self.sdpa = sdpa

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v) @ self.scale
        w = torch.matmul(q, k.transpose(-1, -2)).softmax(-1)
        return torch.matmul(w, v) @ self.scale


def test_prepared_model_quantizes_exactly_the_activation_products():
    m = Attention().eval()
    x = torch.randn(2, 5, 8)
    cfg = bitalloc.preset("minmax", 8, None, product_bits=4)
    q = bitalloc.prepare(m, cfg, x)
    with torch.no_grad():
        got = q(x)
        assert q.bitalloc_products.calls == 2  # q k^T and weights x v; not the product with the parameter
        qq, kk, vv = (l(x) for l in (q.q, q.k, q.v))  # the layers alone (8-bit weights): no product mode
        w = torch.matmul(quantize_operand(qq, 4), quantize_operand(kk.transpose(-1, -2), 4)).softmax(-1)
        ref = torch.matmul(quantize_operand(w, 4), quantize_operand(vv, 4)) @ q.scale
    assert torch.allclose(got, ref, atol=1e-6)
    with torch.no_grad(), bitalloc.float_mode(q):  # float mode: products in float too
        qq, kk, vv = (l(x) for l in (q.q, q.k, q.v))
        plain = torch.matmul(torch.matmul(qq, kk.transpose(-1, -2)).softmax(-1), vv) @ q.scale
        assert torch.allclose(q(x), plain, atol=1e-6) and q.bitalloc_products.calls == 2
    assert not torch.allclose(got, plain, atol=1e-3)  # 4-bit products do change the output


@pytest.mark.parametrize("sdpa", [False, True])
def test_cost_report_counts_quantized_products_at_their_widths(sdpa):
    m = Attention(sdpa).eval()
    x = torch.randn(1, 5, 8)
    plain = bitalloc.cost_report(bitalloc.prepare(m, bitalloc.preset("minmax", 8, 8), x), x)
    rep = bitalloc.cost_report(bitalloc.prepare(m, bitalloc.preset("minmax", 8, 8, product_bits=6), x), x)
    prods = [l for l in rep.layers if l.kind == "matmul"]
    assert prods and all(l.quantized and l.w_bits == l.a_bits == 6 for l in prods)
    floats = {l.name: l for l in plain.layers if l.kind == "matmul"}
    for l in prods:
        assert l.macs == floats[l.name].macs and not floats[l.name].quantized
        if sdpa:  # q k^T at 6 x 6, the softmax weights x v at 32 x 6: L S E each here (L = S = 5, E = 8)
            assert l.bops == pytest.approx(36 * 200 + 32 * 6 * 200)
        else:
            assert l.bops == pytest.approx(36 * l.macs)
    assert rep.bops < plain.bops


def test_product_bits_are_validated_saved_and_refused_by_the_export(tmp_path):
    for bad in (1, 17, 4.5):
        with pytest.raises(ConfigError, match="product_bits"):
            bitalloc.preset("minmax", 8, 8, product_bits=bad)
    m = Attention().eval()
    x = torch.randn(2, 5, 8)
    q = bitalloc.quantize(m, bitalloc.preset("minmax", 8, 8, product_bits=4), [(x,)])
    again = load_quantized(save_quantized(q, tmp_path / "q.pt", example_shape=(2, 5, 8)), Attention().eval())
    with torch.no_grad():
        assert torch.equal(again(x), q(x)) and again.bitalloc_products.bits == 4
    pytest.importorskip("onnx")
    with pytest.raises(ConfigError, match="product_bits=None") as err:
        bitalloc.runtime.export_onnx(q, x, tmp_path / "q.onnx")
    assert "\n" not in str(err.value)


def test_cli_product_bits(tmp_path, capsys):
    from bitalloc.cli import main

    torch.save([torch.randn(5, 8) for _ in range(12)], tmp_path / "data.pt")
    (tmp_path / "net.py").write_text("import sys\nsys.path.insert(0, %r)\nfrom tests.test_products import Attention\n\n"
                                     "def build():\n    return Attention()\n" % str(__import__("pathlib").Path(
                                         __file__).resolve().parents[1]))
    argv = ["ptq", "--model", f"{tmp_path / 'net.py'}:build", "--trust-code", "--inputs", str(tmp_path / "data.pt"),
            "--calib", "4", "--preset", "minmax", "--w-bits", "8", "--a-bits", "8", "--no-plot", "--out",
            str(tmp_path / "o"), "--product-bits", "8"]
    assert main(argv) == 0, capsys.readouterr().err
    import json

    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["config"]["product_bits"] == 8
