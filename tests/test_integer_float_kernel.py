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
