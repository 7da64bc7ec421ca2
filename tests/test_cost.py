"""Cost accounting against closed forms and brute-force sums over channel pairs."""

from __future__ import annotations

import torch
from torch import nn

import bitalloc
from bitalloc.cost import cost_report
from tests.nets import make_net


def test_macs_closed_form_and_fp32_relative_bops():
    net = make_net()
    x = torch.randn(1, 3, 16, 16)
    rep = cost_report(net, x)
    macs = {l.name: l.macs for l in rep.layers}
    assert macs["stem"] == 3 * 8 * 9 * 8 * 8  # C_in * C_out * k*k * H_out * W_out
    assert macs["dw"] == 8 * 1 * 9 * 8 * 8  # depthwise: C_in/groups = 1
    assert macs["pw"] == 8 * 16 * 8 * 8
    assert macs["conv1d"] == 16 * 4 * 3 * 8
    assert macs["tconv"] == 16 * 4 * 2 * 2 * 8 * 8  # weight elements x input positions
    assert macs["fc"] == 52 * 10
    assert macs["unused"] == 0
    assert rep.macs == sum(macs.values())
    assert abs(rep.relative_bops - 1.0) < 1e-12  # all float: 32 x 32 bits
    assert rep.float_macs == rep.macs and rep.bireal_ops == rep.macs
    n_params = sum(p.numel() for p in net.parameters())
    assert rep.memory_bits == 32 * n_params == rep.fp32_memory_bits
    # batch size does not change per-sample costs
    assert cost_report(net, torch.randn(5, 3, 16, 16)).macs == rep.macs


def _brute_force_bops(w_bits, a_bits, c_out, c_in, groups, macs):
    per_pair = macs / (c_out * (c_in // groups))
    total = 0.0
    for o in range(c_out):
        g = o // (c_out // groups)
        for i in range(c_in):
            if i // (c_in // groups) == g:
                total += float(w_bits[o]) * float(a_bits[i]) * per_pair
    return total


def test_bops_with_per_channel_bits_match_brute_force():
    net = make_net()
    x = torch.randn(8, 3, 16, 16)
    cfg = bitalloc.preset("aciq", w_bits=3.5, a_bits=4.5, act_granularity="channel")
    q = bitalloc.quantize(net, cfg, [(x,)])
    rep = cost_report(q, x[:1])
    by_name = {l.name: l for l in rep.layers}
    total_q = 0.0
    for name, layer in bitalloc.quant_layers(q):
        lc = by_name[name]
        w = layer.weight_quantizer.bits_per_channel()
        a = layer.input_quantizer.bits_per_channel() if layer.input_quantizer is not None else torch.full((1,), 32.0)
        c_out = layer.layer.weight.shape[0]
        groups = getattr(layer.layer, "groups", 1)
        c_in = layer.layer.weight.shape[1] * groups
        w = w.expand(c_out) if w.numel() == 1 else w
        a = a.expand(c_in) if a.numel() == 1 else a
        ref = _brute_force_bops(w, a, c_out, c_in, groups, lc.macs)
        assert abs(lc.bops - ref) <= 1e-9 * ref, name
        total_q += ref
    # allocated layers (not first/last) really have mixed widths
    assert len(set(q.dw.weight_quantizer.bits.tolist())) > 1 or len(set(q.pw.weight_quantizer.bits.tolist())) > 1
    float_bops = sum(l.bops for l in rep.layers if not l.quantized)
    assert abs(rep.bops - (total_q + float_bops)) < 1e-6 * rep.bops
    assert abs(rep.relative_bops - rep.bops / (1024 * rep.macs)) < 1e-15
    assert abs(rep.bireal_ops - (rep.float_macs + total_q / 64)) < 1e-6 * rep.bireal_ops


def test_memory_bits_brute_force():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3), nn.LayerNorm(3))
    x = torch.randn(4, 2, 6, 6)
    cfg = bitalloc.preset("minmax", w_bits=4, a_bits=8, first_last_bits=None)
    q = bitalloc.quantize(m, cfg, [(x,)])
    rep = cost_report(q, x[:1])
    conv, fc = q[0], q[3]
    expected = 4 * conv.layer.weight.numel() + 32 * conv.layer.bias.numel()
    expected += 4 * fc.layer.weight.numel() + 32 * fc.layer.bias.numel()
    expected += 32 * sum(p.numel() for p in q[4].parameters())  # LayerNorm stays real-valued
    overhead = sum(32 * b.numel() for l in (conv, fc) for qz in l.quantizers()
                   for n, b in qz.named_buffers() if b.dtype != torch.bool)
    assert rep.overhead_bits == overhead
    assert rep.memory_bits == expected + overhead
    assert rep.fp32_memory_bits == 32 * sum(p.numel() for p in m.parameters())
    assert [l.w_bits for l in rep.layers if l.quantized] == [4.0, 4.0]
    assert rep.relative_bops == (4 * 8 * rep.layers[0].macs + 4 * 8 * rep.layers[1].macs) / (1024 * rep.macs)


def test_kept_fraction_carries_into_next_layer():
    """A pruned output channel of one layer removes that input channel of the next (through ReLU, flatten)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    x = torch.randn(4, 2, 4, 4)
    q = bitalloc.quantize(m, bitalloc.preset("minmax", w_bits=4, a_bits=4, first_last_bits=None), [(x,)])
    mask = torch.tensor([True, False, True, True])
    q[0].weight_quantizer.kept_mask = lambda: mask  # what a pruning quantizer (Bayesian Bits z2) reports
    rep = cost_report(q, x[:1])
    conv, fc = rep.layers
    assert conv.kept_fraction == 0.75 and fc.kept_fraction == 0.75
    assert conv.bops == 4 * 4 * conv.macs * 0.75
    assert fc.bops == 4 * 4 * fc.macs * 0.75
    assert conv.memory_bits - conv.overhead_bits == 4 * 3 * 2 * 9 + 32 * 4


def test_per_layer_relative_bops_and_bireal_ops_closed_form(capsys):
    """SPEC "Cost conventions" per layer: relative BOPs = b_w b_a MACs / (1024 MACs); Bi-Real OPs = BOPs / 64 for a
    quantized layer, MACs (real-valued FLOPs) for a float one. Hand-computed MACs of a 6x6 input."""
    import json

    from bitalloc.cli.cost import COST_COLUMNS, cost_rows, print_cost
    from bitalloc.report.tables import render_table

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(4, 2, 6, 6)
    cfg = bitalloc.preset("minmax", w_bits=4, a_bits=8, first_last_bits=None)
    cfg.overrides.append(("3", {"weight.bits": 6, "act.bits": 5}))
    cfg.overrides.append(("5", {"quantize": False}))
    q = bitalloc.quantize(m, cfg, [(x,)])
    rep = cost_report(q, x[:1])
    conv, fc1, fc2 = rep.layers
    assert (conv.macs, fc1.macs, fc2.macs) == (2 * 4 * 9 * 4 * 4, 64 * 8, 8 * 3)
    assert (conv.quantized, fc1.quantized, fc2.quantized) == (True, True, False)
    assert conv.relative_bops == 4 * 8 / 1024 and fc1.relative_bops == 6 * 5 / 1024 and fc2.relative_bops == 1.0
    assert conv.bireal_ops == 4 * 8 * 1152 / 64 and fc1.bireal_ops == 6 * 5 * 512 / 64 and fc2.bireal_ops == 24
    # the network values are the MAC-weighted mean and the sum of the layers'
    assert abs(rep.relative_bops - sum(l.relative_bops * l.macs for l in rep.layers) / rep.macs) < 1e-15
    assert rep.bireal_ops == sum(l.bireal_ops for l in rep.layers) == 576 + 240 + 24
    d = json.loads(json.dumps(rep.to_dict()))  # in the JSON report
    assert [(l["relative_bops"], l["bireal_ops"]) for l in d["layers"]] == [
        (l.relative_bops, l.bireal_ops) for l in rep.layers]
    # and in the terminal table (percent of the 32 x 32-bit layer)
    rows = cost_rows(rep)
    rel, bireal = COST_COLUMNS.index("rel. BOPs %"), COST_COLUMNS.index("Bi-Real OPs")
    assert [(r[rel], r[bireal]) for r in rows] == [(3.125, 576.0), (100 * 30 / 1024, 240.0), (100.0, 24.0)]
    table = render_table("t", COST_COLUMNS, rows)
    assert "Bi-Real OPs" in table and "3.12" in table and "576.0" in table
    print_cost(rep, "t")
    assert "576.0" in capsys.readouterr().out
    # a layer without MACs (never called) has relative BOPs 0, not a division by zero
    no_macs = {l.name: l.relative_bops for l in cost_report(make_net(), torch.randn(1, 3, 16, 16)).layers if l.macs == 0}
    assert "unused" in no_macs and set(no_macs.values()) == {0.0}
