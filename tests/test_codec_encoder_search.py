"""The encoder's choices that the decoder never sees: the analysis scale searched per frame, and the calibration
of the decoder networks' latent readers (their 16-bit grids cover the pixel range's extremes)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from bitalloc.cli import main
from bitalloc.codec.bitstream import BitstreamError, read_stream, write_stream
from bitalloc.codec.codec import VideoCoder, check_analysis_scales, check_level_offsets
from bitalloc.codec.model import VideoCodec
from bitalloc.codec.networks import Analysis
from bitalloc.codec.precision import (calibrate_codec, coders, decoder_quant_configs, extreme_clips, latent_readers,
                                      quantize_decoders, save_codec)
from bitalloc.codec.video_io import write_y4m
from bitalloc.errors import ConfigError

from tests.codec_util import TINY, moving_video, tiny_codec

pytestmark = pytest.mark.usefixtures("one_thread")


def _branchy_codec() -> VideoCodec:
    """The tiny codec with analysis nonlinear branches that change the latents (their last convolution starts at
    zero). The analyses are the encoder's: changing them leaves the decoder networks as they were."""
    model = tiny_codec()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for coder in coders(model).values():
            last = coder.analysis.nonlinear[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.3)
    return model


def test_analysis_scale_weights_the_nonlinear_branch():
    a = Analysis(6, 16, 384).eval()
    with torch.no_grad():
        a.nonlinear[-1].weight.normal_(0, 0.1)
        x = torch.rand(2, 6, 32, 48)
        lin, nl = a.linear(x), a.nonlinear(x)
        assert a(x).equal(lin + nl)
        assert a(x, 0.0).equal(lin)
        assert torch.allclose(a(x, 0.5), lin + 0.5 * nl, atol=1e-6)


def test_rounding_proxies():
    from bitalloc.codec.entropy import rounding_proxy

    x = (torch.randn(4000, dtype=torch.float64) * 3).requires_grad_()
    for proxy in ("noise", "ste"):
        assert rounding_proxy(x, proxy, False).equal(torch.round(x))  # coding rounds, whatever the proxy
    ste = rounding_proxy(x, "ste", True)
    assert ste.equal(torch.round(x))
    ste.sum().backward()
    assert x.grad.equal(torch.ones_like(x))  # straight-through
    noisy = rounding_proxy(x.detach(), "noise", True)
    d = noisy - x.detach()
    assert d.abs().max() <= 0.5 and abs(float(d.mean())) < 0.03 and abs(float(d.var()) - 1 / 12) < 0.01
    with pytest.raises(ValueError, match="proxy"):
        rounding_proxy(x, "floor", True)
    coder = VideoCodec(TINY).intra.coder
    with pytest.raises(ValueError, match="proxy"):
        coder.proxy = "floor"
    coder.proxy = "ste"
    assert coder.entropy_bottleneck.proxy == "ste"


def _weighted_mse(src, rec) -> np.ndarray:
    """Per frame (6 MSE_Y + MSE_U + MSE_V) / 8 in pixel units, float64 numpy."""
    def mse(a, b):
        return ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return (6 * mse(src.y, rec.y) + mse(src.u, rec.u) + mse(src.v, rec.v)) / 8


def test_encoder_keeps_the_scale_of_least_rate_distortion_cost():
    model = _branchy_codec()
    video = moving_video(3, 32, 48, seed=4)
    scales = (0.0, 0.5, 1.0)
    level = 1
    lam = float(model.lambdas[level])
    # brute force: every frame coded at every scale alone (I frames only: frames are independent)
    costs, payloads = [], []
    for a in scales:
        res = VideoCoder(model, analysis_scales=(a,)).compress(video, quality=level, intra_period=1)
        pay = [r.payload for r in read_stream(res.stream)[1]]
        bpp = np.array([8.0 * len(p) / (32 * 48) for p in pay])
        costs.append(bpp + lam * _weighted_mse(video, res.reconstruction))
        payloads.append(pay)
        assert all(f.analysis_scale == a for f in res.frames)
    costs = np.stack(costs)
    assert np.ptp(costs, axis=0).max() > 0  # the scales make a difference
    coder = VideoCoder(model, analysis_scales=scales)
    res = coder.compress(video, quality=level, intra_period=1)
    best = costs.argmin(0)
    assert [f.analysis_scale for f in res.frames] == [scales[i] for i in best]
    assert [r.payload for r in read_stream(res.stream)[1]] == [payloads[i][t] for t, i in enumerate(best)]
    assert coder.decompress(res.stream).equal(res.reconstruction)
    # P frames too: the chosen stream decodes exactly, with the decoder that never saw the scales
    res = coder.compress(moving_video(4, 32, 48, seed=5), quality=2, intra_period=-1)
    assert "".join(f.kind for f in res.frames) == "IPPP"
    assert VideoCoder(model, analysis_scales=(1.0,)).decompress(res.stream).equal(res.reconstruction)


def test_adaptive_intra_keeps_the_cheaper_frame_type():
    model = _branchy_codec()
    # the untrained tiny codec codes I frames cheaper than P frames; with its I frames quantized 8x finer (gain
    # tables of encoder and decoder alike) P frames win at the higher levels: both choices are exercised
    finer = copy.deepcopy(model)
    with torch.no_grad():
        finer.intra.coder.gain_table[0] *= 8
        finer.intra.coder.gain_table[1] /= 8
    video = moving_video(2, 32, 48, seed=6)
    chosen = set()
    for m, level in ((model, 1), (finer, 2)):
        lam = float(m.lambdas[level])
        cost = {}
        for kind, period in (("P", -1), ("I", 1)):  # frame 1 coded each way after the same frame 0
            res = VideoCoder(m, analysis_scales=(0.5,)).compress(video, quality=level, intra_period=period)
            assert res.frames[1].kind == kind
            pay = read_stream(res.stream)[1][1].payload
            cost[kind] = 8.0 * len(pay) / (32 * 48) + lam * _weighted_mse(video[1:], res.reconstruction[1:])[0]
        coder = VideoCoder(m, analysis_scales=(0.5,), adaptive_intra=True)
        res = coder.compress(video, quality=level, intra_period=-1)
        assert res.frames[1].kind == min(cost, key=cost.get)
        chosen.add(res.frames[1].kind)
        assert coder.decompress(res.stream).equal(res.reconstruction)
    assert chosen == {"I", "P"}


@pytest.mark.parametrize("bad", ["", "abc", "-0.5", "3", "1,1", [], [0.5, float("nan")]])
def test_bad_analysis_scales_are_config_errors(bad):
    with pytest.raises(ConfigError, match="analysis scales"):
        check_analysis_scales(bad)


def test_analysis_scales_parse():
    assert check_analysis_scales("0, 0.25,1") == (0.0, 0.25, 1.0)
    assert check_analysis_scales([1]) == (1.0,)


def test_cli_encode_reports_scales_and_rejects_bad_ones(tmp_path, capsys):
    weights = save_codec(_branchy_codec(), tmp_path / "tiny.pt")
    src = write_y4m(tmp_path / "src.y4m", moving_video(3, 32, 32))
    js = tmp_path / "s.json"
    assert main(["codec", "encode", str(src), "-o", str(tmp_path / "a.bav"), "-q", "1", "--weights", str(weights),
                 "--analysis-scales", "0,1", "--json", str(js)]) == 0
    s = json.loads(js.read_text())
    chosen = [f["analysis_scale"] for f in s["per_frame"]]
    assert set(chosen) <= {0.0, 1.0} and s["exact"] is True
    assert sum(int(part.split("x")[1]) for part in s["analysis_scales"].split(", ")) == 3
    capsys.readouterr()
    assert main(["codec", "encode", str(src), "-o", str(tmp_path / "b.bav"), "-q", "1", "--weights", str(weights),
                 "--analysis-scales", "0,5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "analysis scales" in err[0]


# ---- quality levels of P frames ----------------------------------------------------------------------------------

def test_p_frames_at_a_fixed_offset_carry_their_level_and_the_decoder_honours_it():
    model = _branchy_codec()
    video = moving_video(3, 32, 48, seed=7)
    coder = VideoCoder(model, analysis_scales=(0.5,), p_level_offsets=(-1,))
    res = coder.compress(video, quality=2, intra_period=-1)
    header, records = read_stream(res.stream)
    assert header.quality == 2 and [r.level for r in records] == [2, 1, 1] == [f.level for f in res.frames]
    assert VideoCoder(model, analysis_scales=(1.0,)).decompress(res.stream).equal(res.reconstruction)
    # the decoder reads the frame's level: the same records relabelled at level 2 decode to other frames
    relabelled = write_stream(header, [dataclasses.replace(r, level=2) for r in records])
    assert not coder.decompress(relabelled).equal(res.reconstruction)
    # levels clamp to the codec's: at quality 0, offset -1 is level 0, and offset 0 is the default's stream
    assert coder.p_levels(0) == [0] and VideoCoder(model, p_level_offsets=(1, 0)).p_levels(2) == [2]
    assert (VideoCoder(model, analysis_scales=(0.5,), p_level_offsets="-2").compress(video, quality=0).stream
            == VideoCoder(model, analysis_scales=(0.5,)).compress(video, quality=0).stream)
    with pytest.raises(BitstreamError, match="frame 1 signals quality level 3, but this codec has levels 0..2"):
        coder.decompress(write_stream(header, [records[0]] + [dataclasses.replace(r, level=3) for r in records[1:]]))


def test_p_level_search_keeps_the_level_of_least_cost_at_the_streams_lambda():
    model = _branchy_codec()
    video = moving_video(2, 32, 48, seed=8)
    quality, offsets = 2, (-2, -1, 0)
    lam = float(model.lambdas[quality])
    # brute force: the P frame coded at each level alone after the same I frame, costed in float64 numpy from the
    # stream's payload and the reconstruction at the stream's lambda
    cost, payload = {}, {}
    for o in offsets:
        res = VideoCoder(model, p_level_offsets=(o,)).compress(video, quality=quality, intra_period=-1)
        rec = read_stream(res.stream)[1]
        assert rec[0].level == quality and rec[1].level == quality + o
        payload[o] = rec[1].payload
        cost[o] = 8.0 * len(rec[1].payload) / (32 * 48) + lam * _weighted_mse(video[1:], res.reconstruction[1:])[0]
    assert len(set(cost.values())) == len(offsets)  # the levels make a difference
    coder = VideoCoder(model, p_level_offsets=offsets)
    res = coder.compress(video, quality=quality, intra_period=-1)
    best = min(cost, key=cost.get)
    assert res.frames[1].level == quality + best and read_stream(res.stream)[1][1].payload == payload[best]
    assert VideoCoder(model).decompress(res.stream).equal(res.reconstruction)
    # with the latent refinement too (its objective at the stream's lambda), still exact
    refined = VideoCoder(model, p_level_offsets=offsets, refine_steps=3).compress(video, quality=quality,
                                                                                  intra_period=-1)
    assert VideoCoder(model).decompress(refined.stream).equal(refined.reconstruction)


@pytest.mark.parametrize("bad", ["", "a", "1.5", "-17", "1,1", [], [0.5]])
def test_bad_p_level_offsets_are_config_errors(bad):
    with pytest.raises(ConfigError, match="P-frame level offsets"):
        check_level_offsets(bad)


def test_p_level_offsets_parse_and_the_cli_reports_the_levels(tmp_path, capsys):
    assert check_level_offsets("-3, -2,0") == (-3, -2, 0) and check_level_offsets([1]) == (1,)
    weights = save_codec(_branchy_codec(), tmp_path / "tiny.pt")
    src = write_y4m(tmp_path / "src.y4m", moving_video(3, 32, 32))
    js, info = tmp_path / "s.json", tmp_path / "info.json"
    out = tmp_path / "a.bav"
    assert main(["codec", "encode", str(src), "-o", str(out), "-q", "2", "--weights", str(weights),
                 "--analysis-scales", "1", "--p-level-offsets=-2,-1", "--json", str(js)]) == 0
    s = json.loads(js.read_text())
    levels = [f["level"] for f in s["per_frame"]]
    assert levels[0] == 2 and set(levels[1:]) <= {0, 1} and s["exact"] is True
    assert s["p_levels"] == ", ".join(f"{lv} x{levels[1:].count(lv)}" for lv in sorted(set(levels[1:])))
    assert main(["codec", "info", str(out), "--json", str(info)]) == 0
    got = json.loads(info.read_text())
    assert got["version"] == 4 and [r["level"] for r in got["frame_records"]] == levels
    capsys.readouterr()
    assert main(["codec", "encode", str(src), "-o", str(tmp_path / "b.bav"), "-q", "1", "--weights", str(weights),
                 "--p-level-offsets", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "P-frame level offsets" in err[0]


# ---- calibration of the latent readers --------------------------------------------------------------------------

def _reader_ranges(model: VideoCodec) -> list[tuple[float, float]]:
    out = []
    for layer in latent_readers(model):
        qp = layer.input_quantizer.qparams()
        out.append((float((qp.qmin - qp.zero_point) * qp.scale), float((qp.qmax - qp.zero_point) * qp.scale)))
    return out


def _calibrated(extremes: bool, monkeypatch) -> VideoCodec:
    torch.manual_seed(0)
    model = VideoCodec(TINY).eval()
    for coder in coders(model).values():
        with torch.no_grad():  # as tests.codec_util.tiny_codec: hyper-latents that vary
            coder.log_hyper_gain[0].fill_(math.log(30.0))
    quantize_decoders(model, decoder_quant_configs(8, "fixed"))
    if not extremes:
        import bitalloc.codec.precision as precision
        monkeypatch.setattr(precision, "extreme_clips", lambda *a, **k: [])
    # mid-grey, low-contrast content: far from the pixel range's limits
    video = moving_video(4, 64, 64)
    flat = type(video)(((video.y.astype(np.int32) - 128) // 4 + 128).astype(np.uint8), video.u, video.v)
    calibrate_codec(model, [flat], frames=2, crop=32, clips=2)
    monkeypatch.undo()
    return model


def test_latent_readers_cover_the_extremes_and_other_grids_keep_the_content(monkeypatch):
    plain = _calibrated(False, monkeypatch)
    wide = _calibrated(True, monkeypatch)
    readers = latent_readers(wide)
    assert len(readers) == 9  # 3 coders x (synthesis linear and nonlinear inputs, hyper synthesis input)
    assert all(q.input_quantizer.cfg.bits == 16 for q in readers)
    # 8-bit grids: the same as without the extremes
    reader_ids = {id(m) for m in latent_readers(plain)} | {id(m) for m in readers}
    for (name, a), (_, b) in zip(plain.named_modules(), wide.named_modules()):
        if hasattr(a, "input_quantizer") and id(a) not in reader_ids and hasattr(a.input_quantizer, "scale"):
            assert a.input_quantizer.scale.equal(b.input_quantizer.scale), name
    # 16-bit grids: wider, and every latent of the extreme clips, at every level, inside them
    for (plo, phi), (wlo, whi) in zip(_reader_ranges(plain), _reader_ranges(wide)):
        assert wlo <= plo and whi >= phi
    assert any(w[1] > p[1] * 1.2 for p, w in zip(_reader_ranges(plain), _reader_ranges(wide)))
    seen = []
    def keep(i):
        return lambda mod, inp: seen.append((i, inp[0].min().item(), inp[0].max().item()))

    hooks = [m.register_forward_pre_hook(keep(i)) for i, m in enumerate(readers)]
    ranges = _reader_ranges(wide)
    with torch.no_grad():
        for clip in extreme_clips(2, 32):
            for level in range(wide.cfg.levels):
                wide(clip[None], torch.tensor([level]))
    for h in hooks:
        h.remove()
    assert seen
    step = [(hi - lo) / 65535 for lo, hi in ranges]
    for i, lo, hi in seen:
        assert ranges[i][0] - step[i] <= lo and hi <= ranges[i][1] + step[i]


def test_extreme_clips_reach_the_pixel_limits():
    clips = extreme_clips(3, 32)
    assert len(clips) == 4 and all(c.shape == (3, 6, 16, 16) for c in clips)
    black_first, white_first = clips[0][:, :4], clips[1][:, :4]  # luma phases
    assert black_first[0].max() == 0 and black_first[1].min() == 1
    assert white_first[0].min() == 1 and white_first[1].max() == 0
    assert all(set(c[:, 4:].unique().tolist()) <= {0.0, 1.0} for c in clips)  # chroma at its limits too
    noise = clips[2][:, :4]
    assert set(noise.unique().tolist()) == {0.0, 1.0} and bool((noise[0] + noise[1] == 1).all())
