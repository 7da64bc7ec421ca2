"""The encoder's latent refinement (bitalloc.codec.refine): its objective against a float64 reference, that it only
ever lowers the cost it keeps, and that refined streams decode exactly with the unchanged decoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import norm

from bitalloc.cli import main
from bitalloc.codec.codec import VideoCoder, frame_tensor, padded_size
from bitalloc.codec.motion import estimate_flow_packed
from bitalloc.codec.precision import save_codec
from bitalloc.codec.refine import LatentRefiner, objective
from bitalloc.codec.video_io import write_y4m
from bitalloc.errors import ConfigError

from tests.codec_util import moving_video, tiny_codec, tiny_dynamic_codec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_codec()


def _start(model, level: int, video):
    """The intra coder's analysis latents of the video's first frame, and the coder's target x - 1/2."""
    coder = model.intra.coder
    x = frame_tensor(video, 0, padded_size(video.height, video.width)).float() / 255.0 - model.intra.OFFSET
    lv = torch.tensor([level])
    with torch.no_grad():
        yg = coder.analysis(x) * coder.gain("y", lv, coding=True)
        zg = coder.hyper_analysis(yg) * coder.gain("z", lv, coding=True)
    return yg, zg, x


def test_objective_matches_a_float64_reference(model):
    video = moving_video(1, 32, 48)
    level = 1
    coder = model.intra.coder
    yg, zg, x = _start(model, level, video)
    yg = yg + torch.randn(yg.shape, generator=torch.Generator().manual_seed(0)) * 0.7  # off the analysis' latents
    lam = float(model.lambdas[level])
    with torch.no_grad():
        j = float(objective(coder, yg, zg, level, x, lam))
        # the reference: rates from the coding tables' pmf (z) and the Gaussian CDF in float64 (y), the synthesis of
        # the rounded latents, and the weighted MSE written out with numpy
        z = torch.round(zg)
        pmf = coder.entropy_bottleneck.pmf.numpy()
        zi = z.numpy().astype(np.int64)[0]
        from bitalloc.codec.entropy import Z_RANGE
        bits_z = -np.log2(np.maximum(pmf[np.arange(zi.shape[0])[:, None, None], zi + Z_RANGE], 1e-9)).sum()
        mu, log_scale = coder.entropy_parameters(z, torch.tensor([level]), tuple(yg.shape[-2:]), coding=True)
        v = torch.round(yg - mu)
        s = np.maximum(np.exp(np.minimum(log_scale.double().numpy(), np.log(256.0))), 0.11)
        a = np.abs(v.double().numpy())
        p = norm.cdf((0.5 - a) / s) - norm.cdf((-0.5 - a) / s)
        bits_y = -np.log2(np.maximum(p, 1e-9)).sum()
        x_hat = coder.synthesis((v + mu) * coder.gain("y_inv", torch.tensor([level]), coding=True)).double().numpy()
        w = np.array([1.5, 1.5, 1.5, 1.5, 1.0, 1.0])[:, None, None]  # 6 MSE_Y over the 4 luma phases, U, V
        err = ((x_hat[0] - x.double().numpy()[0]) ** 2 * w).mean(axis=(1, 2)).sum() / 8.0
        pixels = 4 * x.shape[-2] * x.shape[-1]
        ref = (bits_z + bits_y) / pixels + lam * 255.0 ** 2 * err
    assert j == pytest.approx(ref, rel=2e-3)


def test_refinement_lowers_the_objective_and_keeps_the_best_iterate(model):
    video = moving_video(1, 32, 48)
    yg, zg, x = _start(model, 1, video)
    # latents far from good ones (the tiny codec is untrained, its analysis already near the objective's minimum)
    yg = yg + torch.randn(yg.shape, generator=torch.Generator().manual_seed(1)) * 3.0
    ref = LatentRefiner(model, 30, 0.05)
    y2, z2, hist = ref.refine("intra", yg, zg, 1, x)
    assert len(hist) == 31
    lam = float(model.lambdas[1])
    with torch.no_grad(), ref.coder("intra") as coder:
        j0 = float(objective(coder, yg, zg, 1, x, lam))
        j2 = float(objective(coder, y2, z2, 1, x, lam))
    assert hist[0] == pytest.approx(j0, rel=1e-6)
    assert j2 == pytest.approx(min(hist), rel=1e-6) and j2 < 0.99 * j0  # it improves, and keeps the least
    y0, z0, hist0 = LatentRefiner(model, 0).refine("intra", yg, zg, 1, x)  # no steps: the start itself
    assert y0.equal(yg) and z0.equal(zg) and len(hist0) == 1


def _frame_costs(res, video, model, level):
    """Per frame: bits per pixel + lambda * MSE_YUV (pixel units) of the coded stream, as the encoder scores it."""
    px = video.height * video.width
    lam = float(model.lambdas[level])
    return [8.0 * f.bytes / px + lam * 255.0 ** 2 * 10 ** (-f.psnr / 10) for f in res.frames]


def test_refined_streams_decode_exactly_and_cost_no_more(model):
    video = moving_video(4, 32, 48)
    level = 1
    plain = VideoCoder(model).compress(video, quality=level, intra_period=1)
    assert VideoCoder(model, refine_steps=0).compress(video, quality=level, intra_period=1).stream == plain.stream
    coder = VideoCoder(model, refine_steps=25, refine_lr=0.05)
    res = coder.compress(video, quality=level, intra_period=1)  # I frames only: each frame's cost is its own
    assert coder.decompress(res.stream).equal(res.reconstruction)
    assert any(f.refined for f in res.frames)
    for a, b in zip(_frame_costs(res, video, model, level), _frame_costs(plain, video, model, level)):
        assert a <= b * (1 + 1e-9) + 0.02  # the record's 5-byte header and the rounding of psnr aside
    # P frames: the residual's latents, for the same reference and motion
    size = padded_size(video.height, video.width)
    x, ref = frame_tensor(video, 1, size), frame_tensor(res.reconstruction, 0, size)
    flow = estimate_flow_packed(x.float() / 255.0, ref.float() / 255.0)
    args = (x, ref, flow, level, None, [(coder.bits, coder.bits)], False, None, (video.height, video.width), None)
    with torch.no_grad(), coder._whole():
        refined = coder._trials(*args)[(coder.bits, coder.bits)]
    with torch.no_grad(), VideoCoder(model)._whole():
        unrefined = VideoCoder(model)._trials(*args)[(coder.bits, coder.bits)]
    assert refined[0] <= unrefined[0] and (refined[4] or refined[0] == unrefined[0])
    p = coder.compress(video, quality=level, intra_period=-1)
    assert coder.decompress(p.stream).equal(p.reconstruction)


def test_dynamic_codecs_refine_at_the_frames_widths():
    model = tiny_dynamic_codec()
    video = moving_video(3, 64, 64)
    plain = VideoCoder(model).compress(video, quality=1, intra_period=1, widths=(8, 4))
    coder = VideoCoder(model, refine_steps=10, refine_lr=0.05)
    res = coder.compress(video, quality=1, intra_period=1, widths=(8, 4))
    assert coder.decompress(res.stream).equal(res.reconstruction)
    assert [(f.roi_bits, f.non_roi_bits) for f in res.frames] == [(8, 4)] * 3
    for a, b in zip(_frame_costs(res, video, model, 1), _frame_costs(plain, video, model, 1)):
        assert a <= b * (1 + 1e-9) + 0.02


def test_refinement_options_are_checked(tmp_path, capsys):
    model = tiny_codec()
    for steps in (-1, 2.5, True):
        with pytest.raises(ConfigError, match="refinement steps"):
            VideoCoder(model, refine_steps=steps)
    with pytest.raises(ConfigError, match="step size"):
        VideoCoder(model, refine_steps=3, refine_lr=0.0)
    weights = save_codec(model, tmp_path / "tiny.pt")
    src = write_y4m(tmp_path / "src.y4m", moving_video(2, 32, 32))
    js = tmp_path / "s.json"
    assert main(["codec", "encode", str(src), "-o", str(tmp_path / "a.bav"), "-q", "1", "--weights", str(weights),
                 "--refine-steps", "5", "--json", str(js)]) == 0
    s = json.loads(js.read_text())
    assert s["exact"] is True and s["frames_refined"].endswith("of 2 (5 steps)")
    assert all(isinstance(f["refined"], bool) for f in s["per_frame"])
    capsys.readouterr()
    assert main(["codec", "encode", str(src), "-o", str(tmp_path / "b.bav"), "-q", "1", "--weights", str(weights),
                 "--refine-steps", "-2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refinement steps" in err[0]
