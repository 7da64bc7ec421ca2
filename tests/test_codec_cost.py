"""Cost per frame, region and layer (bitalloc.codec.cost) against hand-computed values for a tiny conv net.

Net: c1 Conv2d(3, 4, 3, stride 2, pad 1), region-quantized (candidates 2/4/8); c2 Conv2d(4, 4, 1), plain LSQ at 6
bits; c3 Conv2d(4, 2, 3, pad 1) left in float. Input 8 x 8, so every output is 4 x 4 (16 positions):
MACs c1 = 3*4*9*16 = 1728, c2 = 4*4*1*16 = 256, c3 = 4*2*9*16 = 1152 (SPEC: C_in * C_out * k^2 * H_out * W_out).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bitalloc
from bitalloc.codec.cost import region_cost, summarize
from bitalloc.config import LayerConfig, QuantConfig, TensorConfig
from bitalloc.errors import ShapeError
from bitalloc.model.region import region_precision

pytestmark = pytest.mark.usefixtures("one_thread")

MACS = {"c1": 1728.0, "c2": 256.0, "c3": 1152.0}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 4, 1)
        self.c3 = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


def prepared():
    torch.manual_seed(0)
    opts = {"candidates": [2, 4, 8]}
    cfg = QuantConfig(default=LayerConfig(
        weight=TensorConfig(bits=8, granularity="channel", symmetric=True, quantizer="lsq_region", options=opts),
        act=TensorConfig(bits=8, quantizer="lsq_region", options=opts)), first_last_bits=None, fold_bn=False,
        overrides=[("c2", {"weight.quantizer": "lsq", "act.quantizer": "lsq", "weight.bits": 6, "act.bits": 6}),
                   ("c3", {"quantize": False})])
    x = torch.rand(1, 3, 8, 8)
    q = bitalloc.prepare(Net().eval(), cfg, x)
    with bitalloc.calibration(q):
        q(x)
    return q, x


def masks() -> torch.Tensor:
    m = torch.zeros(2, 8, 8, dtype=torch.bool)
    m[0, :4, :4] = True  # 4 of the 16 output blocks (2 x 2 pixels each)
    m[1, 5, 5] = True  # one pixel: block (2, 2) under "any", nothing under "fraction"
    return m


def test_hand_computed_frame_costs():
    q, x = prepared()
    frames = region_cost(q, x, masks(), roi_bits=[8, 4], non_roi_bits=2)
    assert [f.roi_bits for f in frames] == [8, 4] and [f.non_roi_bits for f in frames] == [2, 2]
    f0, f1 = frames
    assert f0.roi_fraction == 16 / 64 and f1.roi_fraction == 1 / 64
    by = {l.name: l for l in f0.layers}
    assert set(by) == set(MACS) and all(l.positions == 16 for l in f0.layers)
    assert by["c1"].region_quantized and not by["c2"].region_quantized and by["c2"].quantized and not by["c3"].quantized
    share = 4 / 16
    # c1: ROI at 8 x 8 bits, the rest at 2 x 2
    assert by["c1"].roi.macs == share * 1728 and by["c1"].non_roi.macs == (1 - share) * 1728
    assert by["c1"].roi.bops == share * 1728 * 64 and by["c1"].non_roi.bops == (1 - share) * 1728 * 4
    assert by["c1"].roi.bit_flops == share * 1728 * 64 / 64
    assert by["c1"].non_roi.bit_flops == (1 - share) * 1728 * 4 / 64
    assert by["c1"].roi.bit_flops_a6 == 8 * 8 / 32 * 2 * 3 * 4 * 9 * 4  # ||b_a b_w|| / 32 * 2 Cin Cout F^2 H W
    assert (by["c1"].roi.w_bits, by["c1"].roi.a_bits, by["c1"].non_roi.w_bits) == (8, 8, 2)
    # c2: its own 6 bits in both regions
    assert by["c2"].roi.bops == share * 256 * 36 and by["c2"].non_roi.bops == (1 - share) * 256 * 36
    assert by["c2"].non_roi.bit_flops_a6 == 6 * 6 / 32 * 2 * 4 * 4 * 1 * 12
    # c3: float, 32 x 32 bits; SPEC Bit-FLOPs count its MACs, A6 counts 32 * 32 / 32 * 2 per MAC
    assert by["c3"].roi.bops == share * 1152 * 1024 and by["c3"].roi.bit_flops == share * 1152
    assert by["c3"].non_roi.bit_flops_a6 == 32 * 32 / 32 * 2 * 1152 * (1 - share)
    roi_bf = share * (1728 * 64 / 64 + 256 * 36 / 64 + 1152)
    non_bf = (1 - share) * (1728 * 4 / 64 + 256 * 36 / 64 + 1152)
    assert f0.roi.bit_flops == pytest.approx(roi_bf, rel=1e-12)
    assert f0.total.bit_flops == pytest.approx(roi_bf + non_bf, rel=1e-12)
    assert f0.total.macs == sum(MACS.values())
    # frame 1: one ROI block of 16 at 4 bits
    c1 = {l.name: l for l in f1.layers}["c1"]
    assert c1.roi_fraction == 1 / 16 and c1.roi.bops == 1728 / 16 * 16 and c1.non_roi.bops == 1728 * 15 / 16 * 4
    # rules: "fraction" drops the one-pixel ROI, "soft" counts a quarter of a block
    assert {l.name: l for l in region_cost(q, x, masks(), 4, 2, rule="fraction")[1].layers}["c1"].roi_fraction == 0
    soft = region_cost(q, x, masks()[1].float(), 4, 2, rule="soft")[0]
    assert {l.name: l for l in soft.layers}["c1"].roi_fraction == pytest.approx(0.25 / 16)
    s = summarize(frames)
    assert s["frames"] == 2 and s["total"]["macs"] == sum(MACS.values())
    assert s["roi"]["bops"] == pytest.approx((f0.roi.bops + f1.roi.bops) / 2)


def test_full_roi_equals_cost_model_at_that_width_and_float_models():
    q, x = prepared()
    full = torch.ones(1, 8, 8, dtype=torch.bool)
    frame = region_cost(q, x, full, 4, 2)[0]
    with region_precision(q, full, 4, 4):
        rep = bitalloc.cost_report(q, x)
    assert frame.non_roi.macs == 0 and frame.non_roi.bops == 0
    assert frame.roi.bops == pytest.approx(rep.bops, rel=1e-12) and frame.roi.macs == rep.macs
    assert frame.roi.bit_flops == pytest.approx(rep.bireal_ops, rel=1e-12)
    assert frame.roi.bit_flops_a6 == pytest.approx(rep.bops / 16, rel=1e-12)
    # a model without region quantizers: its own widths (here all float) in both regions
    torch.manual_seed(1)
    plain = Net().eval()
    f = region_cost(plain, x, masks()[:1], 8, 2)[0]
    assert f.roi.macs == 0.25 * sum(MACS.values()) and f.roi.bops == 1024 * f.roi.macs
    assert f.total.bit_flops == sum(MACS.values())
    with pytest.raises(ShapeError):
        region_cost(q, x, masks(), [8, 4, 2], 2)
    with pytest.raises(ShapeError):
        region_cost(q, x, torch.zeros(1, 1, 8, 8), 8, 2)


def test_macs_per_pixel_of_a_codec_against_hook_counts(tmp_path, capsys):
    """``macs_per_pixel``: every network against an independent count (forward hooks on the float copy's
    convolutions, :func:`bitalloc.codec.timing.network_macs`), frame types as the sums of their coders' networks
    (decoding: synthesis and hyper synthesis), the same per pixel at another frame size; ``codec info`` prints and
    writes them; a size off the hyperprior's grid is refused."""
    import dataclasses
    import json

    from bitalloc.cli import main
    from bitalloc.codec.cost import macs_per_pixel
    from bitalloc.codec.precision import ALL_PARTS, coders, network_input, save_codec
    from bitalloc.codec.timing import network_macs
    from tests.codec_util import TINY, tiny_codec

    model = tiny_codec(cfg=dataclasses.replace(TINY, residual_context=True))
    got = macs_per_pixel(model, luma=64)
    for cname, coder in coders(model).items():
        for part in ALL_PARTS:
            x = network_input(coder, part, 64)
            ref = network_macs(getattr(coder, part), x if isinstance(x, tuple) else (x,)) / 64 ** 2
            assert ref > 0 and got["networks"][f"{cname}.{part}"] == pytest.approx(ref, rel=1e-12), (cname, part)
    n = got["networks"]
    assert got["frames"]["I"]["decode"] == pytest.approx(n["intra.synthesis"] + n["intra.hyper_synthesis"])
    assert got["frames"]["I"]["encode"] == pytest.approx(sum(n[f"intra.{p}"] for p in ALL_PARTS))
    assert got["frames"]["P"]["encode"] == pytest.approx(sum(n[f"{c}.{p}"] for c in ("motion", "residual")
                                                             for p in ALL_PARTS))
    assert got["frames"]["P"]["decode"] == pytest.approx(sum(n[f"{c}.{p}"] for c in ("motion", "residual")
                                                             for p in ("synthesis", "hyper_synthesis")))
    big = macs_per_pixel(model, luma=128)
    for kind in "IP":
        assert big["frames"][kind] == pytest.approx(got["frames"][kind], rel=1e-12)
    with pytest.raises(ShapeError, match="multiple of 64"):
        macs_per_pixel(model, luma=100)
    weights = save_codec(model, tmp_path / "w.pt")
    assert main(["codec", "info", "--weights", str(weights), "--json", str(tmp_path / "i.json")]) == 0
    assert "P frame, decode" in capsys.readouterr().out
    info = json.loads((tmp_path / "i.json").read_text())["macs_per_pixel"]
    assert info["luma"] == 256 and info["frames"]["P"] == pytest.approx(got["frames"]["P"], rel=1e-12)
