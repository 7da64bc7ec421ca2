"""Fixed width assignments of a dynamic codec (VideoCoder.compress(widths=...), encode --widths), the float
reference coder (VideoCoder(exact=False)), and the pure helpers of benchmarks/codec_dynamic.py."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from bitalloc.cli import main
from bitalloc.codec.bitstream import read_stream
from bitalloc.codec.codec import VideoCoder
from bitalloc.codec.metrics import psnr_yuv
from bitalloc.codec.precision import load_codec, save_codec
from bitalloc.codec.video_io import write_y4m
from bitalloc.errors import ConfigError

from tests.codec_util import moving_video, tiny_codec, tiny_dynamic_codec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dyn_weights(tmp_path_factory):
    return save_codec(tiny_dynamic_codec(), tmp_path_factory.mktemp("fixed") / "dyn.pt")


@pytest.fixture(scope="module")
def dyn_coder(dyn_weights):
    return VideoCoder(load_codec(dyn_weights))


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "codec_dynamic.py"
    spec = importlib.util.spec_from_file_location("codec_dynamic_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_forced_widths_in_every_record_and_exact(dyn_coder):
    video = moving_video(3, 32, 48)
    sel = dyn_coder.compress(video, quality=1, intra_period=2)
    assert {(f.roi_bits, f.non_roi_bits) for f in sel.frames} == {(16, 4)}  # what the tiny selector picks
    for pair in ((8, 8), (4, 16)):  # the selector is bypassed, even for a pair it would never choose
        res = dyn_coder.compress(video, quality=1, intra_period=2, widths=pair)
        _, records = read_stream(res.stream)
        assert [(r.roi_bits, r.non_roi_bits) for r in records] == [pair] * 3
        assert [(f.roi_bits, f.non_roi_bits) for f in res.frames] == [pair] * 3
        assert dyn_coder.decompress(res.stream).equal(res.reconstruction)
        for f, s in zip(res.frames, sel.frames):
            # the ROI and its latent mask are still computed, and coded where the two widths differ
            assert f.mask_bits == (s.mask_bits if pair[0] != pair[1] else 0) and s.mask_bits > 0
            assert np.array_equal(f.latent_mask, s.latent_mask) and f.latent_mask.shape == (2, 3)
            assert f.roi_mask.shape == (32, 48) and np.array_equal(f.roi_mask, s.roi_mask)
            # every ROI pixel lies in an ROI block of the latent mask (rule "any")
            assert not (f.roi_mask & ~np.kron(f.latent_mask, np.ones((16, 16), bool))[:32, :48]).any()
    assert not sel.reconstruction.equal(dyn_coder.compress(video, quality=1, intra_period=2,
                                                           widths=(8, 8)).reconstruction)


def test_bad_widths_raise(dyn_coder):
    video = moving_video(1, 16, 16)
    for bad in ((6, 4), (8,), (8, 8, 8), ("a", 8)):
        with pytest.raises(ConfigError, match=r"candidate widths are \[4, 8, 16\]"):
            dyn_coder.compress(video, quality=0, widths=bad)
    fixed = VideoCoder(tiny_codec())
    assert fixed.compress(video, quality=0, widths=(8, 8)).frames[0].roi_bits == 8
    with pytest.raises(ConfigError, match="one fixed precision, 8 bits"):
        fixed.compress(video, quality=0, widths=(4, 4))


def test_float_reference_round_trips_and_is_close_to_the_quantized_codec():
    from bitalloc.codec.timing import float_codec

    q = tiny_codec()
    f = float_codec(q)
    with pytest.raises(ConfigError, match="exact=False"):
        VideoCoder(f)
    ref = VideoCoder(f, exact=False)
    assert not ref.exact and VideoCoder(q).exact and ref.bits == 32
    video = moving_video(3, 32, 48)
    for level in (0, 2):
        a = VideoCoder(q).compress(video, quality=level, intra_period=2)
        b = ref.compress(video, quality=level, intra_period=2)
        assert [(f.roi_bits, f.non_roi_bits) for f in b.frames] == [(32, 32)] * 3
        assert ref.decompress(b.stream).equal(b.reconstruction)
        pa, pb = psnr_yuv(video, a.reconstruction)["psnr_yuv"], psnr_yuv(video, b.reconstruction)["psnr_yuv"]
        assert abs(pa - pb) < 0.3, (level, pa, pb)  # 8-bit decoder networks vs float: close on the tiny model
        assert abs(a.bytes - b.bytes) <= 0.05 * a.bytes


def test_cli_widths(dyn_weights, tmp_path, capsys):
    import json

    video = write_y4m(tmp_path / "clip.y4m", moving_video(2, 32, 32))
    base = ["codec", "encode", str(video), "-q", "0", "--weights", str(dyn_weights)]
    assert main(base + ["-o", str(tmp_path / "a.bav"), "--dynamic", "--widths", "6,4"]) == 2
    err = capsys.readouterr().err
    assert "--widths '6,4'" in err and "[4, 8, 16]" in err and len(err.strip().splitlines()) == 1
    assert main(base + ["-o", str(tmp_path / "a.bav"), "--dynamic", "--widths", "8"]) == 2
    assert main(base + ["-o", str(tmp_path / "a.bav"), "--widths", "8,8"]) == 2
    assert "--widths goes with --dynamic" in capsys.readouterr().err
    assert main(base + ["-o", str(tmp_path / "b.bav"), "--dynamic", "--widths", "8,4", "--json", str(tmp_path / "b.json")]) == 0
    summary = json.loads((tmp_path / "b.json").read_text())
    assert summary["exact"] and [(f["roi_bits"], f["non_roi_bits"]) for f in summary["per_frame"]] == [(8, 4)] * 2


# ---- benchmark helpers -----------------------------------------------------------------------------------------

def test_region_psnr_against_numpy():
    bench = _bench()
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (3, 10, 12), dtype=np.uint8)
    dec = np.clip(ref.astype(int) + rng.integers(-6, 7, ref.shape), 0, 255).astype(np.uint8)
    masks = rng.random(ref.shape) < 0.3
    masks[1] = False  # a frame without ROI counts for the non-ROI mean only
    dec[2][masks[2]] = ref[2][masks[2]]  # exact ROI pixels: capped at 100 dB
    got = bench.region_psnr(ref, dec, masks)
    d = (ref.astype(np.float64) - dec) ** 2
    roi = [min(100.0, 10 * np.log10(255 ** 2 / d[t][masks[t]].mean())) if d[t][masks[t]].mean() > 0 else 100.0
           for t in (0, 2)]
    non = [10 * np.log10(255 ** 2 / d[t][~masks[t]].mean()) for t in range(3)]
    assert got["roi"] == pytest.approx(np.mean(roi)) and got["roi_frames"] == 2 and roi[1] == 100.0
    assert got["non_roi"] == pytest.approx(np.mean(non)) and got["non_roi_frames"] == 3
    assert bench.region_psnr(ref, dec, np.zeros_like(masks))["roi"] is None
    with pytest.raises(ConfigError):
        bench.region_psnr(ref, dec, masks[:2])


def test_equal_rate_interpolation_against_closed_forms():
    bench = _bench()
    # curves linear in ln(rate): PCHIP reproduces them exactly, so values and differences have closed forms
    ra = np.array([100.0, 200.0, 400.0, 800.0])
    rb = np.array([150.0, 300.0, 600.0, 1200.0])
    va, vb = 30 + 3 * np.log(ra), 29 + 3.2 * np.log(rb)
    assert bench.value_at_rate(ra, va, 250.0) == pytest.approx(30 + 3 * math.log(250.0))
    assert math.isnan(bench.value_at_rate(ra, va, 50.0))
    eq = bench.equal_rate(ra[::-1], va[::-1], rb, vb)  # unsorted input is fine
    lo, hi = math.log(150.0), math.log(800.0)
    assert eq["rate"] == pytest.approx(math.exp((lo + hi) / 2))
    assert eq["delta"] == pytest.approx(-1 + 0.2 * (lo + hi) / 2)
    mean = np.mean(-1 + 0.2 * np.linspace(lo, hi, 100001))  # numerical mean of the difference over the overlap
    assert eq["mean_delta"] == pytest.approx(mean, abs=1e-6)
    # against numpy's piecewise-linear interpolation where PCHIP is linear (two points)
    r2, v2 = np.array([100.0, 400.0]), np.array([30.0, 36.0])
    assert bench.value_at_rate(r2, v2, 170.0) == pytest.approx(np.interp(np.log(170.0), np.log(r2), v2))
    assert bench.equal_rate(ra, va, ra * 10, vb) is None  # no overlap


def test_matched_pair_variants_and_frame_kinds():
    bench = _bench()
    costs = {(16, 4): 10.0, (8, 8): 11.0, (4, 4): 4.0, (16, 16): 40.0}
    assert bench.matched_pair(10.4, costs) == (16, 4) and bench.matched_pair(10.6, costs) == (8, 8)
    assert bench.parse_variants("diagonal", (4, 8, 16)) == [(4, 4), (8, 8), (16, 16)]
    assert bench.parse_variants("all", (2, 4)) == [(2, 2), (4, 2), (4, 4)]
    assert bench.parse_variants("16/8,2/2", (4, 8, 16)) == [(16, 8)]
    with pytest.raises(ConfigError, match="--variants"):
        bench.parse_variants("16-8", (4, 8, 16))
    assert "".join(bench.frame_kinds(7, 3)) == "IPPIPPI" and "".join(bench.frame_kinds(3, -1)) == "IPP"


@pytest.mark.parametrize("flags", [(), ("residual_context", "prior_context")])
def test_cost_table_matches_region_cost(flags):
    """The table's per-frame cost is region_cost's, per network, summed over the networks of the frame type; also
    for a codec whose synthesis and hyper synthesis read the prediction (their inputs are tuples with it)."""
    import dataclasses

    import torch

    from bitalloc.codec.cost import region_cost
    from bitalloc.codec.precision import ALL_PARTS, coders, network_input
    from tests.codec_util import TINY

    bench = _bench()
    model = tiny_dynamic_codec(cfg=dataclasses.replace(TINY, **{f: True for f in flags}))
    rng = np.random.default_rng(2)
    m16 = rng.random((2, 3, 4)) < 0.5
    table = bench.CostTable(model, m16, ["I", "P"], model.cfg.candidates)
    big = torch.from_numpy(np.kron(m16, np.ones((16, 16), bool)))  # the same masks at luma resolution
    for t, names in ((0, ("intra",)), (1, ("motion", "residual"))):
        want = 0.0
        for name in names:
            coder = coders(model)[name]
            for part in ALL_PARTS:
                fc = region_cost(getattr(coder, part), network_input(coder, part, 48, 64), big[t:t + 1], 16, 4)
                want += fc[0].total.bit_flops
        assert table.frame(t, 16, 4)["all"]["bit_flops"] == pytest.approx(want, rel=1e-9)
    # a_6 = BOPs / 16 and, for all-quantized networks, SPEC = BOPs / 64
    row = table.frame(1, 8, 8)["all"]
    assert row["bit_flops_a6"] == pytest.approx(row["bops"] / 16)
    assert table.frame(0, 16, 4)["decoder"]["bit_flops"] < table.frame(0, 16, 4)["all"]["bit_flops"]
    if flags:  # the context branches are counted: P frames cost more than the plain codec's, I frames the same
        plain = bench.CostTable(tiny_dynamic_codec(), m16, ["I", "P"], model.cfg.candidates)
        assert table.frame(0, 8, 8)["all"]["macs"] == plain.frame(0, 8, 8)["all"]["macs"]
        assert table.frame(1, 8, 8)["decoder"]["macs"] > plain.frame(1, 8, 8)["decoder"]["macs"]


def test_cost_table_masks_are_the_run_time_masks():
    """region_cost's resampling of the blown-up latent mask equals the codec's mask_function at every layer size
    of a 48x64 frame (finer, coarser, and the padded 1/16 output of the upsampling hyper networks)."""
    import torch

    from bitalloc.codec.dynamic import mask_function
    from bitalloc.quantizers.region import mask_at

    rng = np.random.default_rng(3)
    m16 = rng.random((3, 4)) < 0.4
    big = torch.from_numpy(np.kron(m16, np.ones((16, 16), bool)))
    at = mask_function(torch.from_numpy(m16)[None, None])
    for size in ((24, 32), (12, 16), (6, 8), (3, 4), (2, 2), (1, 1), (4, 4)):
        assert torch.equal(mask_at(big, size), at(size)), size


def test_float_codec_is_the_quantized_codec_with_its_quantizers_off(tmp_path):
    """float_codec(m): every network equals m's network run with its quantizers disabled (float_mode), on random
    inputs; no quantizer and no selector remain; the coding tables are those of the same gains."""
    import torch

    from bitalloc.codec.precision import ALL_PARTS, coders, float_codec, load_codec, network_input
    from bitalloc.model.layers import float_mode, quant_layers
    from tests.codec_util import tiny_dynamic_codec, tiny_weights

    for model in (load_codec(tiny_weights(tmp_path / "s.pt")), tiny_dynamic_codec()):
        f = float_codec(model)
        assert f.cfg.candidates is None and not any("quantizer" in k for k in f.state_dict())
        for name, coder in coders(model).items():
            for part in ALL_PARTS:
                net, ref = getattr(coders(f)[name], part), getattr(coder, part)
                assert not list(quant_layers(net))
                x = torch.randn_like(network_input(coder, part, 64)).abs()
                with torch.no_grad(), float_mode(ref):
                    torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-5)
