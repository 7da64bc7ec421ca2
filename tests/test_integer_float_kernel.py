"""The exact float kernel of integer execution gives the reference kernel's integers, on any thread count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bitalloc
from bitalloc.runtime.integer import exact_float_dtype, integer_mode


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(5, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(32, 8, 1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


@pytest.mark.parametrize("bits", [4, 8])
def test_float_kernel_equals_reference_kernel_bitwise(bits):
    torch.manual_seed(0)
    net = _net().eval()
    cfg = bitalloc.preset("minmax", w_bits=bits, a_bits=bits)
    cfg.first_last_bits = None
    x = torch.randn(6, 5, 8, 8)
    q = bitalloc.quantize(net, cfg, [x[:3], x[3:]])
    with torch.no_grad():
        with integer_mode(q, kernel="reference", strict=True):
            ref = q(x)
        outs = []
        before = torch.get_num_threads()
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                with integer_mode(q, kernel="float", strict=True) as run:
                    outs.append(q(x))
        finally:
            torch.set_num_threads(before)
    assert all(a.accumulator in ("int32", "int64") for a in run.analyses.values())
    for out in outs:
        assert torch.equal(out, ref)


def test_exact_float_dtype_boundaries():
    assert exact_float_dtype(2**24) is torch.float32
    assert exact_float_dtype(2**24 + 1) is torch.float64
    assert exact_float_dtype(2**53) is torch.float64
    assert exact_float_dtype(2**53 + 1) is None
    # the reason: 2^24 + 1 is the first integer float32 cannot hold
    assert float(torch.tensor(2**24 + 1, dtype=torch.float32)) != 2**24 + 1
    assert float(torch.tensor(2**24, dtype=torch.float32)) == 2**24


def test_wide_layers_fall_back_to_float64_and_stay_exact():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(64, 8, 3, padding=1)).eval()
    cfg = bitalloc.preset("minmax", w_bits=16, a_bits=16)
    cfg.first_last_bits = None
    x = torch.randn(2, 64, 6, 6)
    q = bitalloc.quantize(net, cfg, [x])
    with torch.no_grad():
        with integer_mode(q, kernel="reference") as r1:
            ref = q(x)
        with integer_mode(q, kernel="float") as r2:
            got = q(x)
    assert next(iter(r2.analyses.values())).bound > 2**24  # 16-bit codes: float32 would not be exact
    assert torch.equal(got, ref)


@pytest.mark.parametrize("w_bits,a_bits,cin", [(8, 16, 64), (16, 8, 64), (8, 8, 512)])
def test_float64_sums_run_as_split_float32_kernels_and_stay_exact(w_bits, a_bits, cin, monkeypatch):
    """Layers whose bound exceeds 2^24 run as two float32 kernels (split weights or split input codes) when
    each part's bound fits float32; the integers equal the reference kernel's, and no float64 conv runs."""
    import bitalloc.runtime.integer as integer

    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(cin, 8, 3, padding=1)).eval()
    cfg = bitalloc.preset("minmax", w_bits=w_bits, a_bits=a_bits)
    cfg.first_last_bits = None
    x = torch.randn(2, cin, 6, 6) * 3
    q = bitalloc.quantize(net, cfg, [x])
    with torch.no_grad():
        with integer_mode(q, kernel="reference"):
            ref = q(x)
        requested = []
        real = integer.LayerInts.float_weight

        def float_weight(self, dtype):
            requested.append(dtype)
            return real(self, dtype)

        monkeypatch.setattr(integer.LayerInts, "float_weight", float_weight)
        with integer_mode(q, kernel="float") as run:
            got = q(x)
    assert next(iter(run.analyses.values())).bound > 2**24  # float32 alone would not be exact
    assert torch.equal(got, ref)
    assert torch.float64 not in requested  # no float64 kernel ran


def test_split_helpers_against_brute_force():
    """split_weight / split_codes_shift: the parts recombine to the codes, and every part's worst-case sum (brute
    force over the extreme codes) is within the limit."""
    from types import SimpleNamespace

    from bitalloc.runtime.integer import split_codes_shift, split_weight

    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (4, 300), generator=g)
    ints = SimpleNamespace(w=w, _cache={})
    limit = 2**20
    shift, hi, lo = split_weight(ints, 255, limit)
    assert torch.equal(hi.to(torch.int64) * 2**shift + lo.to(torch.int64), w)
    assert (lo >= 0).all() and (lo < 2**shift).all()
    for part in (hi, lo):
        assert int(part.abs().sum(1).max()) * 255 <= limit
    if shift > 1:  # the smallest such shift
        h1 = torch.div(w, 2 ** (shift - 1), rounding_mode="floor")
        l1 = w - h1 * 2 ** (shift - 1)
        assert max(int(h1.abs().sum(1).max()), int(l1.sum(1).max())) * 255 > limit
    ints = SimpleNamespace(w=w, _cache={})
    s = split_codes_shift(ints, 32767, 2**24)
    assert s is not None
    codes = torch.arange(-32767, 32768)
    x_hi = torch.div(codes, 2**s, rounding_mode="floor")
    x_lo = codes - x_hi * 2**s
    assert int(x_hi.abs().max()) * int(w.abs().sum(1).max()) <= 2**24
    assert int(x_lo.abs().max()) * int(w.abs().sum(1).max()) <= 2**24
    assert split_codes_shift(SimpleNamespace(w=w * 0 + 127, _cache={}), 2**23, 2**24) is None
