"""Integer-exact execution and accumulator-width analysis.

References: the integer accumulators are compared *as int64* (torch.equal) with (1) a float64 convolution of
the integer codes recovered from the fake-quant tensors (exact: every partial sum is an integer far below
2^53) and (2) brute-force Python loops on tiny shapes; the dequantized integer output is compared with the
float32 fake-quant output against the stated float32 rounding bound. The overflow analysis is compared with
exhaustive enumeration of all input codes.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitalloc
from bitalloc.model.layers import quant_layers
from bitalloc.runtime.integer import (IntegerExecutionError, analyze_layer, fake_quant_codes, integer_forward,
                                      integer_mode, step_groups)
from bitalloc.runtime.overflow import (AccumulatorOverflowError, analyze, exact_weight_bound,
                                       grid_accumulator_bound, signed_bits)
from tests.nets import SamePadConv, make_net


class One(nn.Module):
    """A model made of one layer (so that it is both first and last: bits as configured)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def quantize_one(layer: nn.Module, x: torch.Tensor, preset: str, w: float, a: float, **kw) -> nn.Module:
    cfg = bitalloc.preset(preset, w_bits=w, a_bits=a, first_last_bits=None, **kw)
    return bitalloc.quantize(One(layer), cfg, [x], num_samples=x.shape[0])


def act_codes(ql, x):
    """Centred input codes recovered from the *fake-quant* activation (independent of the integer path)."""
    p = ql.input_quantizer.qparams()
    axis = p.axis if p.per_channel else None
    x_hat = ql.input_quantizer(x)
    q = fake_quant_codes(x_hat, p.scale, p.zero_point, axis)
    from bitalloc.quant.grid import reshape_for_axis

    return q - reshape_for_axis(p.zero_point, x.ndim, axis), p


def weight_codes(ql):
    """Centred weight codes recovered from the fake-quant weight: (w_hat - beta) / xi / s."""
    p = ql.weight_quantizer.qparams()
    w_hat = ql.weight_quantizer(ql.layer.weight).double()
    shape = [-1] + [1] * (w_hat.ndim - 1)
    beta = p.corr_shift.double().reshape(shape) if p.corr_shift is not None else 0.0
    xi = p.corr_scale.double().reshape(shape) if p.corr_scale is not None else 1.0
    s = p.scale.double().reshape(shape) if p.scale.ndim else p.scale.double()
    v = (w_hat - beta) / xi / s
    r = torch.round(v)
    assert bool(((v - r).abs() < 1e-2 + v.abs() * 2**-20).all())
    return r.to(torch.int64)


def check_against_fake_quant(ql, x, res, out):
    """Codes equal, accumulators equal a float64 conv of the fake-quant codes, output within the bound."""
    a, p = act_codes(ql, x)
    assert torch.equal(a, res.x_codes)
    w = weight_codes(ql)
    assert torch.equal(w, res.w_codes)
    fq = ql(x).detach()
    diff = (out.double() - fq.double()).abs()
    assert bool((diff <= res.bound).all()), float((diff / res.bound).max())
    return a, w, p


def conv_ref(layer, a, w, groups_idx=None, shift=None, g=0):
    """float64 convolution of integer codes through the layer's own padding (exact for these magnitudes)."""
    x = a.double()
    if groups_idx is not None:
        shape = [-1] if isinstance(layer, nn.Linear) else [1, -1, *[1] * (a.ndim - 2)]
        x = x * (groups_idx == g).double().reshape(shape) * torch.pow(2.0, shift.double()).reshape(shape)
    if isinstance(layer, nn.Linear):
        return torch.round(x @ w.double().t()).to(torch.int64)
    if isinstance(layer, SamePadConv):
        x = layer.static_padding(x)
    conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
    if getattr(layer, "padding_mode", "zeros") != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        pad = 0
    else:
        pad = layer.padding
    return torch.round(conv(x, w.double(), None, layer.stride, pad, layer.dilation, layer.groups)).to(torch.int64)


CASES = [
    # (name, layer factory, input shape, preset, w bits, a bits, extra kwargs)
    ("conv2d-w8a8", lambda: nn.Conv2d(3, 5, 3, padding=1), (2, 3, 7, 7), "minmax", 8, 8, {}),
    ("conv2d-w4a4-stride-dilation", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2), (2, 4, 9, 9), "minmax", 4, 4, {}),
    ("depthwise-w4a4", lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), (2, 6, 6, 6), "minmax", 4, 4, {}),
    ("grouped-mixed-bits", lambda: nn.Conv2d(8, 6, 3, padding=1, groups=2), (2, 8, 6, 6), "aciq", 3.5, 4,
     {"act_granularity": "channel"}),
    ("same-pad-subclass", lambda: SamePadConv(3, 4, 3, stride=2, image_size=9), (2, 3, 9, 9), "aciq", 4, 4,
     {"act_granularity": "channel"}),
    ("same-pad-subclass-tensor", lambda: SamePadConv(3, 4, 3, stride=2, image_size=9), (2, 3, 9, 9), "aciq", 4, 4, {}),
    ("conv1d", lambda: nn.Conv1d(4, 5, 3, padding=2, dilation=2), (3, 4, 11), "aciq", 4, 8, {}),
    ("conv2d-padding-same-string", lambda: nn.Conv2d(3, 4, 4, padding="same"), (2, 3, 7, 7), "minmax", 6, 5, {}),
    ("conv2d-reflect", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 6, 6), "minmax", 8, 4, {}),
    ("linear-2d", lambda: nn.Linear(12, 5), (7, 12), "aciq", 4, 4, {"act_granularity": "channel"}),
    ("linear-3d", lambda: nn.Linear(6, 4), (2, 5, 6), "aciq", 5, 3, {"act_granularity": "channel"}),
]


@pytest.mark.parametrize("name,make,shape,preset,wb,ab,kw", CASES, ids=[c[0] for c in CASES])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # torch's note on the case
def test_integer_accumulators_equal_fake_quant(name, make, shape, preset, wb, ab, kw):
    torch.manual_seed(hash(name) % 1000)
    layer = make()
    x = torch.randn(*shape) * 1.5 + 0.3  # asymmetric: non-zero zero points, negative values padded with 0
    q = quantize_one(layer, x, preset, wb, ab, **kw)
    (_, ql), = quant_layers(q)
    out, results = integer_forward(ql, x, with_bound=True, keep_codes=True)
    res = results[0]
    a, w, p = check_against_fake_quant(ql, x, res, out)
    assert torch.equal(out, res.output)
    inner = ql.layer
    if p.per_channel:
        sg = step_groups(p.scale)
        assert res.acc.shape[0] == sg.count
        for g in range(sg.count):
            ref = conv_ref(inner, a, w, sg.index, sg.shift, g)
            assert torch.equal(res.acc[g], ref)
    else:
        assert res.acc.shape[0] == 1
        assert torch.equal(res.acc[0], conv_ref(inner, a, w))
    if res.xsum is not None:  # bias correction: the second accumulator is the receptive-field code sum
        ones = torch.ones_like(w)
        if p.per_channel:
            for g in range(res.acc.shape[0]):
                assert torch.equal(res.xsum[g], conv_ref(inner, a, ones, sg.index, sg.shift, g))
        else:
            assert torch.equal(res.xsum[0], conv_ref(inner, a, ones))
    if preset == "aciq":
        assert res.xsum is not None, "the aciq preset applies bias correction"
    assert res.accumulator == torch.int32  # these layers cannot overflow int32


def test_brute_force_loops_on_a_tiny_conv():
    torch.manual_seed(3)
    layer = nn.Conv2d(2, 3, 3, stride=2, padding=1, groups=1)
    x = torch.randn(1, 2, 5, 5)
    q = quantize_one(layer, x, "minmax", 4, 4)
    (_, ql), = quant_layers(q)
    _, (res,) = integer_forward(ql, x, keep_codes=True)
    a, w = res.x_codes[0].tolist(), res.w_codes.tolist()
    for c in range(3):
        for oy in range(3):
            for ox in range(3):
                s = 0
                for i, ky, kx in itertools.product(range(2), range(3), range(3)):
                    y, xx = oy * 2 - 1 + ky, ox * 2 - 1 + kx
                    if 0 <= y < 5 and 0 <= xx < 5:  # zero padding = code z = centred 0
                        s += a[i][y][xx] * w[c][i][ky][kx]
                assert int(res.acc[0, 0, c, oy, ox]) == s


def test_power_of_two_steps_share_one_accumulator_with_shifts():
    torch.manual_seed(4)
    layer = nn.Conv2d(4, 3, 3, padding=1)
    x = torch.randn(2, 4, 6, 6)
    q = quantize_one(layer, x, "aciq-clip", 8, 6, act_granularity="channel")
    (_, ql), = quant_layers(q)
    aq = ql.input_quantizer
    base = float(aq.scale[0])
    with torch.no_grad():  # steps base, 2 base, 8 base, and an unrelated one
        aq.scale.copy_(torch.tensor([base, 2 * base, 8 * base, base * 1.37]))
    sg = step_groups(aq.scale)
    assert sg.count == 2 and sg.shift.tolist()[:3] == [0, 1, 3]
    out, (res,) = integer_forward(ql, x, with_bound=True, keep_codes=True)
    assert res.acc.shape[0] == 2
    a, w, p = check_against_fake_quant(ql, x, res, out)
    for g in range(2):
        assert torch.equal(res.acc[g], conv_ref(ql.layer, a, w, sg.index, sg.shift, g))
    assert res.analysis.max_shift == 3


def test_step_groups_are_exact_and_bounded():
    s = torch.tensor([0.75, 1.5, 3.0, 0.3, 0.6, 0.75 * 2**20, 0.1], dtype=torch.float32)
    sg = step_groups(s, max_shift=8)
    assert torch.equal(sg.base[sg.index] * torch.pow(2.0, sg.shift.double()), s.double())
    assert int(sg.shift.max()) <= 8
    assert sg.index[0] == sg.index[1] == sg.index[2] and sg.index[3] == sg.index[4]
    assert sg.index[5] != sg.index[0]  # 2^20 apart: beyond max_shift, its own group
    assert step_groups(s, merge_pow2=False).count == 7


def test_whole_model_in_integer_mode_matches_fake_quant():
    net = make_net()
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    for preset, kw in (("minmax", {}), ("aciq", {"act_granularity": "channel"})):
        q = bitalloc.quantize(net, bitalloc.preset(preset, w_bits=4, a_bits=4, **kw), [x])
        ref = q(x)
        with integer_mode(q, record=True) as run:
            out = q(x)
        assert not run.fake_quant_layers
        assert set(run.analyses) == {"stem", "dw", "pw", "conv1d", "fc"}
        assert all(a.accumulator == "int32" for a in run.analyses.values())
        # each layer's output is within its float32 bound of the fake-quant output on the same input;
        # across layers a difference can move a code at the next quantizer, so compare loosely here
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
        assert torch.equal(q(x), ref)  # forward restored


def test_not_integer_executable_layers_are_clear_errors():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    q = quantize_one(nn.Conv2d(3, 4, 3), x, "minmax", 8, 8, online=True)
    (_, ql), = quant_layers(q)
    with pytest.raises(IntegerExecutionError, match="online"):
        integer_forward(ql, x)
    cfg = bitalloc.preset("minmax", w_bits=8, a_bits=None, first_last_bits=None)
    q = bitalloc.quantize(One(nn.Conv2d(3, 4, 3)), cfg, [x])
    with pytest.raises(IntegerExecutionError, match="float input activations"):
        integer_forward(q.layer, x)

    class Scaled(nn.Conv2d):
        def forward(self, x):
            return super().forward(x * 2.0)

    q = quantize_one(Scaled(3, 4, 3), x, "minmax", 8, 8)
    with pytest.raises(IntegerExecutionError, match="mul"):
        integer_forward(q.layer, x)
    with integer_mode(q) as run:  # in a model: left in fake quant, with the reason
        out = q(x)
    assert "mul" in run.fake_quant_layers["layer"]
    assert torch.equal(out, q(x))
    with pytest.raises(IntegerExecutionError), integer_mode(q, strict=True):
        q(x)


# ---- overflow analysis -------------------------------------------------------------------------------------

def test_grid_bounds_and_product_widths():
    assert grid_accumulator_bound(4, 4, 1) == 8 * 15  # signed 4-bit x unsigned 4-bit (centred, any zero point)
    assert grid_accumulator_bound(8, 8, 1) == 128 * 255 <= 2**15 - 1  # 8x8: fits int16
    assert signed_bits(120) == 8 and signed_bits(128) == 9 and signed_bits(0) == 1
    # int32 overflows at W8A8 once the fan-in exceeds (2^31 - 1) / (128 * 255)
    k = (2**31 - 1) // (128 * 255)
    assert grid_accumulator_bound(8, 8, k) <= 2**31 - 1 < grid_accumulator_bound(8, 8, k + 1)


def _extreme_products(ql):
    """Every product w * a the integer kernel can form: weight codes times the ends of the activation range."""
    p = ql.input_quantizer.qparams()
    w = ql.weight_quantizer.qparams().quantize(ql.layer.weight)
    ends = torch.stack([(p.qmin - p.zero_point).reshape(()), (p.qmax - p.zero_point).reshape(())]).to(torch.int64)
    return (w.reshape(-1, 1).to(torch.int64) * ends.reshape(1, -1)).abs()


@pytest.mark.parametrize("wb,ab,fits8", [(4, 4, True), (8, 8, False)])
def test_product_stage_of_real_layers(wb, ab, fits8):
    """The SPEC's 4x4 "8-bit products" and the 8x8 int16 products, from quantized layers (not constants)."""
    torch.manual_seed(3)
    x = torch.randn(64, 16) * 3 + 1  # asymmetric activations: a zero point inside the range
    q = quantize_one(nn.Linear(16, 5), x, "minmax", wb, ab)
    an = analyze_layer(q.layer)
    worst = int(_extreme_products(q.layer).max())
    assert an.weight_product_bound == worst  # exact: an input code at the end of its range attains it
    assert worst <= an.product_bound <= grid_accumulator_bound(wb, ab, 1)
    assert an.product_fits_int8 is fits8 and an.product_fits_int16 and an.product == "int16"
    assert not an.product_widened and an.to_dict()["product"] == "int16"
    # integer execution attains it: inputs saturating at both ends of the range
    xin = torch.cat([torch.full((1, 16), 1e3), torch.full((1, 16), -1e3)])
    _, (res,) = integer_forward(q.layer, xin, keep_codes=True)
    formed = (res.x_codes.abs().reshape(2, 1, 16) * res.w_codes.abs().reshape(1, 5, 16)).max()
    assert int(formed) == an.weight_product_bound


def test_int16_product_stage_widens_or_raises():
    """8-bit codes shifted left (per-channel power-of-two steps) or wider codes overflow the int16 products."""
    w = torch.tensor([[127, -128]], dtype=torch.int64)
    # 8-bit weights x 8-bit unsigned activations: 128 * 255 = 32640 fits int16
    r = analyze("x", w_codes=w, w_bits=8, a_lo=0, a_hi=255, a_bits=8, fan_in=2)
    assert r.weight_product_bound == 32640 and r.product == "int16" and r.product_fits_int16
    # boundary: 32767 fits, 32768 does not
    one = torch.tensor([[1]], dtype=torch.int64)
    assert analyze("x", w_codes=one, w_bits=8, a_lo=0, a_hi=2**15 - 1, a_bits=16, fan_in=1).product == "int16"
    r = analyze("x", w_codes=one, w_bits=8, a_lo=0, a_hi=2**15, a_bits=16, fan_in=1)
    assert r.product == "int32" and r.product_widened and not r.product_fits_int16
    # a shift of one bit on the channel of the -128 weight: 128 * (255 << 1) = 65280 needs 17 bits
    shifts = torch.tensor([[0, 1]])
    r = analyze("x", w_codes=w, w_bits=8, a_lo=0, a_hi=255, a_bits=8, fan_in=2, shifts=shifts)
    assert r.weight_product_bound == 65280 and r.product == "int32" and r.accumulator == "int32"
    assert r.to_dict()["product_widened"] is True
    with pytest.raises(AccumulatorOverflowError, match=r"layer 'x'.*shifts up to 1 bits.*int16 product stage could overflow"):
        analyze("x", w_codes=w, w_bits=8, a_lo=0, a_hi=255, a_bits=8, fan_in=2, shifts=shifts, on_overflow="raise")
    with pytest.raises(AccumulatorOverflowError, match="int16 product stage"):
        analyze("x", w_codes=w, w_bits=8, a_lo=0, a_hi=255, a_bits=8, fan_in=2, shifts=shifts, product="int16")
    # the same shift on the small weight only: exact bound 127 * 510 = 64770 still > 2^15 - 1; on a weight of 64: fits
    w2 = torch.tensor([[64, -128]], dtype=torch.int64)
    r = analyze("x", w_codes=w2, w_bits=8, a_lo=0, a_hi=255, a_bits=8, fan_in=2, shifts=torch.tensor([[1, 0]]))
    assert r.weight_product_bound == 64 * 510 == 32640 and r.product == "int16"
    assert r.product_bound == 128 * 510  # the data-free bound would have widened
    # products wider than 32 bits go to int64 registers, and the accumulator follows
    big = analyze("x", w_codes=torch.tensor([[2**15]]), w_bits=17, a_lo=0, a_hi=2**17, a_bits=18, fan_in=1)
    assert big.product == "int64" and big.accumulator == "int64"
    with pytest.raises(ValueError):
        analyze("x", w_codes=w, w_bits=8, a_lo=0, a_hi=255, a_bits=8, fan_in=2, product="int8")


def test_wide_activations_widen_products_in_integer_execution():
    """A real layer whose products overflow int16 (W8 x A10): widened and still exact, or a clear error."""
    torch.manual_seed(4)
    x = torch.randn(16, 12)
    q = quantize_one(nn.Linear(12, 3), x, "minmax", 8, 10)
    ql = q.layer
    an = analyze_layer(ql)
    assert not an.product_fits_int16 and an.product == "int32" and an.accumulator == "int32"
    assert an.weight_product_bound == int(_extreme_products(ql).max()) > 2**15 - 1
    out, (res,) = integer_forward(ql, x, with_bound=True, keep_codes=True)
    a, w, _ = check_against_fake_quant(ql, x, res, out)
    assert res.analysis.product == "int32"
    with pytest.raises(AccumulatorOverflowError, match=r"layer 'layer'.*8-bit weights x 10-bit activations.*int16 product"):
        integer_forward(ql, x, on_overflow="raise")
    with pytest.raises(AccumulatorOverflowError, match="int16 product"):
        analyze_layer(ql, product="int16")


def test_integer_check_reports_every_layer():
    from bitalloc.runtime import integer_check

    torch.manual_seed(0)
    net = make_net()
    x = torch.randn(6, 3, 16, 16)
    q = bitalloc.quantize(net, bitalloc.preset("minmax", w_bits=8, a_bits=8), [x])
    chk = integer_check(q, [(x, None)], samples=4)
    names = [n for n, _ in quant_layers(q)]
    assert chk.samples == 4 and [l.layer for l in chk.layers] == names and not chk.fake_quant_layers
    assert chk.within_bound and all(l.max_bound_ratio <= 1 for l in chk.layers)
    assert all(l.analysis.product == "int16" and l.analysis.accumulator == "int32" for l in chk.layers)
    assert chk.top1_agreement >= 75 and chk.output_max_abs_diff <= 1e-2 * max(1.0, chk.output_max_abs)
    d = chk.to_dict()
    assert d["layers"][0]["product"] == "int16" and d["within_bound"] is True
    # a layer whose products overflow int16 raises under on_overflow="raise"
    q10 = bitalloc.quantize(net, bitalloc.preset("minmax", w_bits=8, a_bits=10), [x])
    with pytest.raises(AccumulatorOverflowError, match="int16 product"):
        integer_check(q10, [x], samples=2, on_overflow="raise")
    widened = integer_check(q10, [x], samples=2)
    assert any(l.analysis.product_widened for l in widened.layers) and widened.within_bound


def test_exact_weight_bound_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        w = torch.randint(-8, 8, (3, 4), generator=g)
        lo = -torch.randint(0, 4, (4,), generator=g)
        hi = torch.randint(0, 4, (4,), generator=g)
        best = 0
        for vals in itertools.product(*[range(int(l), int(h) + 1) for l, h in zip(lo, hi)]):
            acc = w @ torch.tensor(vals)
            best = max(best, int(acc.abs().max()))
        assert exact_weight_bound(w, lo, hi) == best


def test_worst_case_input_reaches_the_bound():
    torch.manual_seed(1)
    layer = nn.Linear(16, 3)
    x = torch.randn(64, 16)
    q = quantize_one(layer, x, "minmax", 4, 4)
    ql = q.layer
    an = analyze_layer(ql)
    p = ql.input_quantizer.qparams()
    w = ql.weight_quantizer.qparams().quantize(ql.layer.weight)
    c = int(torch.argmax((w.abs()).sum(1)))
    lo_val, hi_val = float((p.qmin - p.zero_point) * p.scale), float((p.qmax - p.zero_point) * p.scale)
    # per input: the extreme code whose product with the weight is largest (in magnitude, same sign)
    lo_c, hi_c = int(p.qmin - p.zero_point), int(p.qmax - p.zero_point)
    pick_hi = (w[c] * hi_c >= w[c] * lo_c)
    top = sum(max(int(v) * hi_c, int(v) * lo_c) for v in w[c])
    bottom = sum(min(int(v) * hi_c, int(v) * lo_c) for v in w[c])
    xin = torch.where(pick_hi, torch.tensor(hi_val + 1.0), torch.tensor(lo_val - 1.0)).reshape(1, 16)
    _, (res,) = integer_forward(ql, xin)
    assert int(res.acc[0, 0, c]) == top
    assert an.weight_bound >= max(top, -bottom)
    assert an.weight_bound <= an.grid_bound


def test_wide_layer_switches_to_int64_or_raises():
    torch.manual_seed(2)
    layer = nn.Linear(64, 4)
    x = torch.randn(32, 64)
    q = quantize_one(layer, x, "minmax", 16, 16)
    ql = q.layer
    an = analyze_layer(ql)
    assert not an.fits_int32 and an.accumulator == "int64"
    out, (res,) = integer_forward(ql, x, with_bound=True, keep_codes=True)
    assert res.accumulator == torch.int64
    a, w, _ = check_against_fake_quant(ql, x, res, out)
    assert torch.equal(res.acc[0], conv_ref(ql.layer, a, w))  # exact: |sums| < 2^53
    assert int(res.acc.abs().max()) < 2**53
    with pytest.raises(AccumulatorOverflowError, match=r"layer 'layer'.*16-bit weights x 16-bit activations, fan-in 64"):
        integer_forward(ql, x, on_overflow="raise")
    with pytest.raises(AccumulatorOverflowError, match="int32 accumulator could overflow"):
        integer_forward(ql, x, accumulator="int32")
    # the same layer at 8 bits fits int32
    q8 = quantize_one(nn.Linear(64, 4), x, "minmax", 8, 8)
    assert analyze_layer(q8.layer).accumulator == "int32"


def test_analyze_rejects_bad_options():
    w = torch.ones(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError):
        analyze("x", w_codes=w, w_bits=4, a_lo=-1, a_hi=1, a_bits=2, fan_in=3, on_overflow="wrap")
    r = analyze("x", w_codes=w, w_bits=4, a_lo=-1, a_hi=1, a_bits=2, fan_in=3, accumulator="int64")
    assert r.accumulator == "int64" and r.weight_bound == 3 and r.to_dict()["acc_bits"] == 3
    assert math.isclose(r.grid_bound, 3)


def test_frozen_model_with_pruned_channels():
    """Frozen quantizers (the description every trained method ends in) with pruned output channels."""
    from bitalloc.model.freeze import freeze

    torch.manual_seed(5)
    layer = nn.Conv2d(3, 6, 3, padding=1)
    x = torch.randn(4, 3, 6, 6)
    q = freeze(quantize_one(layer, x, "aciq", 4, 4))
    wq = q.layer.weight_quantizer
    with torch.no_grad():
        wq.kept[[1, 4]] = False
    out, (res,) = integer_forward(q.layer, x, with_bound=True, keep_codes=True)
    assert bool((res.w_codes[[1, 4]] == 0).all()) and bool((res.acc[0][:, [1, 4]] == 0).all())
    fq = q.layer(x).detach()
    assert bool(((out.double() - fq.double()).abs() <= res.bound).all())
    # a pruned channel outputs exactly 0: its bias is gated like its weights (QuantLayer.gated_bias)
    assert bool((out[:, [1, 4]] == 0).all()) and bool((fq[:, [1, 4]] == 0).all())
