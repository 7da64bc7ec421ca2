"""Conditional reconstruction of P frames (``CodecConfig.residual_context``): the residual synthesis reads the
motion-compensated prediction. It starts as the plain synthesis, the decoder really uses the prediction, streams
decode exactly in another process, and every code path (PTQ, dynamic precision, cost, refinement, training, codec
info) sees the context branch. The refinement and command-line tests cover the conditional entropy model
(``CodecConfig.prior_context``, tests/test_codec_prior.py) as well."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bitalloc.cli import main
from bitalloc.codec.codec import VideoCoder
from bitalloc.codec.evaluate import cross_process_decode
from bitalloc.codec.model import VideoCodec
from bitalloc.codec.networks import Synthesis
from bitalloc.codec.precision import load_codec, save_codec

from tests.codec_util import TINY, moving_video, tiny_codec

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = dataclasses.replace(TINY, residual_context=True)


@pytest.fixture(scope="module")
def model():
    return tiny_codec(cfg=CONTEXT)


def test_the_context_branch_starts_at_zero_and_joins_the_last_hidden_layer():
    torch.manual_seed(0)
    s = Synthesis(384, 16, 6, "yuv", context=6).eval()
    y, c = torch.randn(2, 384, 2, 3), torch.rand(2, 6, 16, 24) - 0.5
    with torch.no_grad():
        plain = s.linear(y) + s.nonlinear(y)
        torch.nn.init.normal_(s.nonlinear[-1].weight, std=0.1)  # as if trained (it starts at zero too)
        plain = s.linear(y) + s.nonlinear(y)
        assert torch.equal(s(y, c), plain)  # zero-initialised: the plain synthesis, whatever the context
        torch.nn.init.normal_(s.context[2].weight, std=0.1)
        # by hand, one layer at a time: the context's features are added after the last hidden ReLU
        h = y
        for layer in list(s.nonlinear)[:-1]:
            h = layer(h)
        feat = torch.nn.functional.conv2d(torch.relu(torch.nn.functional.conv2d(c, s.context[0].weight,
                                                                                s.context[0].bias, padding=1)),
                                          s.context[2].weight, s.context[2].bias, padding=1)
        want = s.linear(y) + torch.nn.functional.conv2d(h + feat, s.nonlinear[-1].weight, s.nonlinear[-1].bias,
                                                        padding=1)
        assert torch.allclose(s(y, c), want, atol=1e-5)
        assert not torch.allclose(s(y, c), plain, atol=1e-3)
    with pytest.raises(ValueError, match="reads a context"):
        s(y)
    with pytest.raises(ValueError, match="takes no context"):
        Synthesis(384, 16, 6)(y, c)
    # only the residual coder of a context codec has the branch; plain configurations (old weights) have none
    m = VideoCodec(CONTEXT)
    assert m.inter.residual.synthesis.context is not None
    assert m.intra.coder.synthesis.context is None and m.inter.motion.synthesis.context is None
    assert VideoCodec(TINY).inter.residual.synthesis.context is None


def test_adding_the_branch_to_a_trained_codec_changes_nothing_until_it_trains():
    from bitalloc.codec.model import with_context

    torch.manual_seed(0)
    plain = VideoCodec(TINY).eval()
    with torch.no_grad():  # as if trained: the zero-initialised layers act
        for conv in plain.modules():
            if isinstance(conv, torch.nn.Conv2d) and not bool(conv.weight.any()):
                conv.weight.normal_(0.0, 0.05)
    ctx = with_context(plain, residual=True)
    assert ctx.cfg == dataclasses.replace(plain.cfg, residual_context=True) and with_context(ctx, residual=True) is ctx
    clip, level = torch.rand(1, 3, 6, 32, 32), torch.tensor([1])
    with torch.no_grad():
        a, b = plain(clip, level), ctx(clip, level)
    assert all(torch.equal(fa["x_hat"], fb["x_hat"]) for fa, fb in zip(a["frames"], b["frames"]))
    with torch.no_grad():
        torch.nn.init.normal_(ctx.inter.residual.synthesis.context[2].weight, std=0.1)
        c = ctx(clip, level)
    assert torch.equal(a["frames"][0]["x_hat"], c["frames"][0]["x_hat"])  # the I frame does not read it
    assert not torch.equal(a["frames"][1]["x_hat"], c["frames"][1]["x_hat"])


@pytest.mark.parametrize("flag", ["residual_context", "prior_context"])
def test_the_decoder_uses_the_prediction_and_decodes_exactly_in_another_process(flag, tmp_path):
    """With either branch: the synthesis or (``prior_context``) the hyper synthesis reads the prediction."""
    model = tiny_codec(cfg=dataclasses.replace(TINY, **{flag: True}))
    part = "synthesis" if flag == "residual_context" else "hyper_synthesis"
    video = moving_video(4, 48, 64)
    weights = save_codec(model, tmp_path / "ctx.pt")
    loaded = load_codec(weights)
    assert getattr(loaded.cfg, flag) and loaded.inter.residual.reads_context(part)
    res = VideoCoder(loaded).compress(video, quality=2, intra_period=-1)
    dec = cross_process_decode(res.stream, str(weights), 1)
    assert dec.equal(res.reconstruction)
    # the frozen integer network reads the prediction: the same latents (or hyper-latents) with another prediction
    # give another reconstruction (or other entropy parameters)
    from bitalloc.runtime.integer import integer_mode

    net = getattr(model.inter.residual, part)
    shape = (1, TINY.m, 2, 3) if part == "synthesis" else (1, TINY.nz, 1, 1)
    y = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad(), integer_mode(model, kernel="float", strict=True):
        a, b = net(y, torch.zeros(1, 6, 16, 24)), net(y, torch.full((1, 6, 16, 24), 0.3))
    assert not torch.equal(a, b)


def test_ptq_quantizes_the_context_layers_and_codec_info_says_why(model, tmp_path, capsys):
    from bitalloc.codec.weights import layer_table

    rows = [r for r in layer_table(model) if r["network"] == "residual.synthesis" and r["layer"].startswith("context")]
    assert [r["layer"] for r in rows] == ["context.0", "context.2"]
    assert all(r["status"] == "quantized" and r["weight_bits"] == "8" and r["act_bits"] == "8" for r in rows)
    from tests.codec_util import tiny_dynamic_codec

    dyn = tiny_dynamic_codec(cfg=CONTEXT)
    rows = {r["layer"]: r for r in layer_table(dyn) if r["network"] == "residual.synthesis"}
    assert "reads the prediction" in rows["context.0"]["reason"]
    assert "region LSQ" in rows["context.2"]["reason"]
    res = VideoCoder(dyn).compress(moving_video(3, 64, 64), quality=1)
    assert VideoCoder(dyn).decompress(res.stream).equal(res.reconstruction)


def test_the_cost_model_counts_the_context_branch():
    from bitalloc.codec.dynamic import BitFlopsTable

    plain, ctx = BitFlopsTable.build(VideoCodec(TINY)), BitFlopsTable.build(VideoCodec(CONTEXT))
    assert ctx.layers["I"] == plain.layers["I"]
    # two 3x3 convolutions at half luma resolution: 6 -> n/2 and n/2 -> n/2 channels, per luma pixel / 4
    half = TINY.n // 2
    extra = (6 * half * 9 + half * half * 9) / 4
    p_plain = sum(l.macs_per_pixel for l in plain.layers["P"])
    p_ctx = sum(l.macs_per_pixel for l in ctx.layers["P"])
    assert p_ctx - p_plain == pytest.approx(extra, rel=1e-9)


@pytest.mark.parametrize("flag", ["residual_context", "prior_context"])
def test_refinement_of_residual_latents_reads_the_context(flag):
    """With either branch (``prior_context``: the conditional entropy model of tests/test_codec_prior.py)."""
    from bitalloc.codec.codec import frame_tensor, padded_size
    from bitalloc.codec.motion import estimate_flow_packed

    model = tiny_codec(cfg=dataclasses.replace(TINY, **{flag: True}))
    video = moving_video(3, 32, 48)
    coder = VideoCoder(model, refine_steps=10, refine_lr=0.05)
    res = coder.compress(video, quality=1, intra_period=-1)
    assert coder.decompress(res.stream).equal(res.reconstruction)
    # a P frame's residual latents, refined with the prediction as the synthesis' or entropy model's context, cost
    # no more
    size = padded_size(video.height, video.width)
    x, ref = frame_tensor(video, 1, size), frame_tensor(res.reconstruction, 0, size)
    flow = estimate_flow_packed(x.float() / 255.0, ref.float() / 255.0)
    args = (x, ref, flow, 1, None, [(coder.bits, coder.bits)], False, None, (video.height, video.width), None)
    with torch.no_grad(), coder._whole():
        refined = coder._trials(*args)[(coder.bits, coder.bits)]
    with torch.no_grad(), VideoCoder(model)._whole():
        unrefined = VideoCoder(model)._trials(*args)[(coder.bits, coder.bits)]
    assert refined[0] <= unrefined[0] and (refined[4] or refined[0] == unrefined[0])


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["residual_context", "prior_context"])
def test_training_a_conditional_codec_from_the_command_line(flag, tmp_path, capsys):
    """Either branch (``prior_context``: tests/test_codec_prior.py) in a fresh codec, added to a trained one, mixed
    with a plain I-frame codec, shipped, coding, and refused where nothing trains it."""
    from bitalloc.codec.video_io import write_y4m
    from bitalloc.train.codec import load_float_start

    option = "--" + flag.replace("_", "-")

    def branch(m):  # the branch's zero-initialised last layer
        return (m.inter.residual.synthesis if flag == "residual_context" else m.inter.residual.hyper_synthesis
                ).context[-1].weight.detach()

    video = write_y4m(tmp_path / "clip.y4m", moving_video(6, 48, 64))
    sizes = {"n": 16, "nz": 8, "motion_n": 8, "motion_nz": 8, "lambdas": [0.005, 0.05]}
    common = ["--batch-size", "2", "--crop", "32", "--samples-per-epoch", "4", "--warmup-steps", "0", "--progress",
              "off", "--videos", str(video)]
    fresh, plain, joint, ship = (tmp_path / f"{n}.pt" for n in ("fresh", "plain", "joint", "ship"))
    # a fresh codec with the branch
    assert main(["codec", "train", "--stage", "inter", "--steps", "2", "--codec-config",
                 json.dumps(sizes | {flag: True}), "--out", str(fresh), *common]) == 0
    m = load_float_start(str(fresh))
    assert getattr(m.cfg, flag) and float(branch(m).abs().sum()) > 0  # it trained
    # the branch added to a trained plain codec: its weights carried over, the branch trained from zero
    assert main(["codec", "train", "--stage", "inter", "--steps", "2", "--codec-config", json.dumps(sizes),
                 "--out", str(plain), *common]) == 0
    assert main(["codec", "train", "--stage", "joint", "--steps", "2", "--init", str(plain), option,
                 "--out", str(joint), *common]) == 0
    before, after = load_float_start(str(plain)), load_float_start(str(joint))
    assert not getattr(before.cfg, flag) and getattr(after.cfg, flag)
    assert torch.equal(before.intra.coder.synthesis.linear[0].weight, after.intra.coder.synthesis.linear[0].weight)
    assert float(branch(after).abs().sum()) > 0
    assert main(["codec", "train", "--stage", "ptq", "--init", str(joint), "--ship", str(ship), "--videos",
                 str(video), "--crop", "32"]) == 0
    # the I-frame codec of a plain checkpoint with the P-frame codec of a conditional one: the shipped codec has it
    mixed = tmp_path / "mixed.pt"
    assert main(["codec", "train", "--stage", "ptq", "--init", str(plain), "--init-inter", str(joint), "--ship",
                 str(mixed), "--videos", str(video), "--crop", "32"]) == 0
    assert getattr(load_codec(mixed).cfg, flag)
    enc = tmp_path / "a.bav"
    assert main(["codec", "encode", str(video), "-o", str(enc), "-q", "1", "--weights", str(ship)]) == 0
    assert main(["codec", "decode", str(enc), "-o", str(tmp_path / "a.y4m"), "--weights", str(ship)]) == 0
    capsys.readouterr()
    assert main(["codec", "info", "--weights", str(ship)]) == 0
    assert f"'{flag}': True" in capsys.readouterr().out
    assert main(["codec", "train", "--stage", "ptq", "--init", str(plain), "--ship", str(ship), "--videos",
                 str(video), option]) == 2
    assert f"{option} adds a branch that needs training" in capsys.readouterr().err
