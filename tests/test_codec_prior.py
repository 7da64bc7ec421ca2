"""Conditional entropy model of P frames (``CodecConfig.prior_context``): the residual's hyper synthesis reads the
motion-compensated prediction. It starts as the plain hyper synthesis, the decoder really uses the prediction for the
entropy parameters, streams decode exactly in another process, old weights keep their identity, and every code path
(PTQ, dynamic precision, cost, refinement, training, codec info) sees the branch."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from bitalloc.cli import main
from bitalloc.codec.codec import VideoCoder
from bitalloc.codec.evaluate import cross_process_decode
from bitalloc.codec.model import CodecConfig, VideoCodec, with_context
from bitalloc.codec.networks import ConditionalHyperSynthesis, HyperSynthesis, pad_to
from bitalloc.codec.precision import load_codec, model_id, save_codec

from tests.codec_util import TINY, moving_video, tiny_codec

pytestmark = pytest.mark.usefixtures("one_thread")

PRIOR = dataclasses.replace(TINY, prior_context=True)
BOTH = dataclasses.replace(TINY, residual_context=True, prior_context=True)


@pytest.fixture(scope="module")
def model():
    return tiny_codec(cfg=BOTH)


def _as_if_trained(m: VideoCodec) -> VideoCodec:
    with torch.no_grad():  # the zero-initialised layers act
        for conv in m.modules():
            if isinstance(conv, torch.nn.Conv2d) and not bool(conv.weight.any()):
                conv.weight.normal_(0.0, 0.05)
    return m


def test_the_branch_starts_at_zero_and_joins_the_last_hidden_layer():
    torch.manual_seed(0)
    h = ConditionalHyperSynthesis(8, 16, 384, 6).eval()
    # latents of 3 x 5 (a 48 x 80 frame): the hyper-latent 1 x 2, the hidden layer 4 x 8, the context's features 3 x 5
    z, c = torch.randn(2, 8, 1, 2), torch.rand(2, 6, 24, 40) - 0.5
    with torch.no_grad():
        plain = HyperSynthesis(8, 16, 384)
        plain.load_state_dict(h.nonlinear.state_dict())
        assert torch.equal(h(z, c), plain(z))  # zero-initialised: the plain hyper synthesis, whatever the context
        torch.nn.init.normal_(h.context[3].weight, std=0.1)
        # by hand: the context's 16x16 luma blocks as 384 values, 1x1 conv, ReLU, 3x3 conv, zero-padded to the hidden
        # layer's 4 x 8 and added before the last convolution
        hidden = torch.nn.Sequential(*list(plain)[:-1])(z)
        blocks = F.pixel_unshuffle(c, 8)
        feat = F.conv2d(torch.relu(F.conv2d(blocks, h.context[1].weight, h.context[1].bias)), h.context[3].weight,
                        h.context[3].bias, padding=1)
        assert feat.shape[-2:] == (3, 5) and hidden.shape[-2:] == (4, 8)
        joined = hidden + F.pad(feat, (0, 3, 0, 1))
        want = F.conv2d(joined, plain[-1].weight, plain[-1].bias, padding=1)
        assert torch.allclose(h(z, c), want, atol=1e-5)
        assert not torch.allclose(h(z, c), plain(z), atol=1e-3)
    with pytest.raises(ValueError, match="reads a context"):
        h(z)
    with pytest.raises(ValueError, match="does not fit"):
        pad_to(torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 4, 8))
    # only the residual coder of such a codec has the branch
    m = VideoCodec(PRIOR)
    assert isinstance(m.inter.residual.hyper_synthesis, ConditionalHyperSynthesis)
    assert m.inter.residual.reads_context("hyper_synthesis") and not m.inter.residual.reads_context("synthesis")
    assert not any(isinstance(c.hyper_synthesis, ConditionalHyperSynthesis) for c in (m.intra.coder, m.inter.motion))


def test_adding_the_branch_to_a_trained_codec_changes_nothing_until_it_trains():
    torch.manual_seed(0)
    ctx = _as_if_trained(VideoCodec(dataclasses.replace(TINY, residual_context=True))).eval()
    both = with_context(ctx, prior=True)
    assert both.cfg == BOTH and with_context(both, prior=True, residual=True) is both
    # the plain hyper synthesis' weights are the conditional one's nonlinear part
    assert torch.equal(both.inter.residual.hyper_synthesis.nonlinear[-1].weight,
                       ctx.inter.residual.hyper_synthesis[-1].weight)
    clip, level = torch.rand(1, 3, 6, 32, 48), torch.tensor([1])
    with torch.no_grad():
        a, b = ctx(clip, level), both(clip, level)
    for fa, fb in zip(a["frames"], b["frames"]):
        assert torch.equal(fa["x_hat"], fb["x_hat"])
        assert all(torch.equal(fa["likelihoods"][k], fb["likelihoods"][k]) for k in fa["likelihoods"])
    with torch.no_grad():
        torch.nn.init.normal_(both.inter.residual.hyper_synthesis.context[3].weight, std=0.1)
        c = both(clip, level)
    assert torch.equal(a["frames"][0]["likelihoods"]["y"], c["frames"][0]["likelihoods"]["y"])  # the I frame
    assert not torch.equal(a["frames"][1]["likelihoods"]["residual_y"], c["frames"][1]["likelihoods"]["residual_y"])
    assert torch.equal(a["frames"][1]["likelihoods"]["motion_y"], c["frames"][1]["likelihoods"]["motion_y"])


def test_weights_made_before_the_branch_keep_their_configuration_and_identity():
    cfg = CodecConfig()
    assert "prior_context" not in cfg.to_dict() and CodecConfig.from_dict(cfg.to_dict()) == cfg
    assert PRIOR.to_dict()["prior_context"] is True and CodecConfig.from_dict(PRIOR.to_dict()) == PRIOR
    # the identity streams carry: a plain codec's is what it was before the field existed (its configuration's repr
    # without the field, then every tensor), and the branch changes it
    import hashlib

    torch.manual_seed(0)
    m = VideoCodec(TINY)
    d = dataclasses.asdict(TINY)
    del d["prior_context"]
    d["lambdas"], d["candidates"] = list(TINY.lambdas), None
    h = hashlib.sha256(repr(d).encode())
    for k, v in m.state_dict().items():
        t = v.detach().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    assert model_id(m) == h.digest()[:8]
    assert model_id(with_context(m, prior=True)) != model_id(m)


def test_the_decoder_uses_the_prediction_and_decodes_exactly_in_another_process(model, tmp_path):
    video = moving_video(4, 48, 64)
    weights = save_codec(model, tmp_path / "prior.pt")
    loaded = load_codec(weights)
    assert loaded.cfg.prior_context and loaded.inter.residual.reads_context("hyper_synthesis")
    res = VideoCoder(loaded).compress(video, quality=2, intra_period=-1)
    dec = cross_process_decode(res.stream, str(weights), 1)
    assert dec.equal(res.reconstruction)
    # the frozen integer network reads the prediction: the same hyper-latent with another prediction gives other
    # entropy parameters
    from bitalloc.runtime.integer import integer_mode

    net = model.inter.residual.hyper_synthesis
    z = torch.randn(1, BOTH.nz, 1, 2, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad(), integer_mode(model, kernel="float", strict=True):
        a, b = net(z, torch.zeros(1, 6, 24, 40)), net(z, torch.full((1, 6, 24, 40), 0.3))
    assert not torch.equal(a, b)


def test_ptq_quantizes_the_branch_and_codec_info_says_why(model):
    from bitalloc.codec.weights import layer_table

    rows = {r["layer"]: r for r in layer_table(model) if r["network"] == "residual.hyper_synthesis"}
    assert {"context.1", "context.3", "nonlinear.0.0", "nonlinear.4"} <= set(rows)
    assert all(rows[k]["status"] == "quantized" and rows[k]["weight_bits"] == "8" for k in rows)
    assert rows["nonlinear.0.0"]["act_bits"] == "16"  # reads decoded hyper-latents, as in the plain hyper synthesis
    assert rows["context.1"]["act_bits"] == rows["context.3"]["act_bits"] == "8"
    assert "reads the prediction" in rows["context.1"]["reason"]
    from tests.codec_util import tiny_dynamic_codec

    # dynamic precision with a 4-bit hyper synthesis: the layer that reads the prediction keeps its 8-bit grid
    dyn = tiny_dynamic_codec(cfg=PRIOR, hyper_bits=4)
    rows = {r["layer"]: r for r in layer_table(dyn) if r["network"] == "residual.hyper_synthesis"}
    assert rows["context.1"]["act_bits"] == rows["context.1"]["weight_bits"] == "8"
    assert rows["context.3"]["act_bits"] == "4" and "reads the prediction" in rows["context.1"]["reason"]
    res = VideoCoder(dyn).compress(moving_video(3, 64, 64), quality=1)
    assert VideoCoder(dyn).decompress(res.stream).equal(res.reconstruction)


def test_the_cost_model_counts_the_branch():
    from bitalloc.codec.cost import macs_per_pixel
    from bitalloc.codec.dynamic import BitFlopsTable

    plain, prior = BitFlopsTable.build(VideoCodec(TINY)), BitFlopsTable.build(VideoCodec(PRIOR))
    assert prior.layers["I"] == plain.layers["I"]
    # at the latents' resolution (1/256 of the luma pixels): a 1x1 convolution of the 384 unshuffled values to n
    # channels and a 3x3 convolution n -> n
    n = TINY.n
    extra = (384 * n + n * n * 9) / 256
    p_plain = sum(l.macs_per_pixel for l in plain.layers["P"])
    p_prior = sum(l.macs_per_pixel for l in prior.layers["P"])
    assert p_prior - p_plain == pytest.approx(extra, rel=1e-9)
    a, b = macs_per_pixel(VideoCodec(TINY)), macs_per_pixel(VideoCodec(PRIOR))
    assert b["frames"]["P"]["decode"] - a["frames"]["P"]["decode"] == pytest.approx(extra, rel=1e-9)


def test_refinement_of_residual_latents_reads_the_context(model):
    from bitalloc.codec.codec import frame_tensor, padded_size
    from bitalloc.codec.motion import estimate_flow_packed

    video = moving_video(3, 32, 48)
    coder = VideoCoder(model, refine_steps=10, refine_lr=0.05)
    res = coder.compress(video, quality=1, intra_period=-1)
    assert coder.decompress(res.stream).equal(res.reconstruction)
    # a P frame's residual latents, refined with the prediction as the entropy model's (and synthesis') context,
    # cost no more than the analysis' own
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
def test_training_a_prior_context_codec_from_the_command_line(tmp_path, capsys):
    from bitalloc.codec.video_io import write_y4m
    from bitalloc.train.codec import load_float_start

    video = write_y4m(tmp_path / "clip.y4m", moving_video(6, 48, 64))
    sizes = {"n": 16, "nz": 8, "motion_n": 8, "motion_nz": 8, "lambdas": [0.005, 0.05]}
    common = ["--batch-size", "2", "--crop", "32", "--samples-per-epoch", "4", "--warmup-steps", "0", "--progress",
              "off", "--videos", str(video)]
    fresh, plain, joint, ship = (tmp_path / f"{n}.pt" for n in ("fresh", "plain", "joint", "ship"))
    assert main(["codec", "train", "--stage", "inter", "--steps", "2", "--codec-config",
                 json.dumps(sizes | {"prior_context": True}), "--out", str(fresh), *common]) == 0
    m = load_float_start(str(fresh))
    assert m.cfg.prior_context and not m.cfg.residual_context
    assert float(m.inter.residual.hyper_synthesis.context[3].weight.detach().abs().sum()) > 0  # it trained
    # both branches added to a trained plain codec: its weights carried over, the branches trained from zero
    assert main(["codec", "train", "--stage", "inter", "--steps", "2", "--codec-config", json.dumps(sizes),
                 "--out", str(plain), *common]) == 0
    assert main(["codec", "train", "--stage", "joint", "--steps", "2", "--init", str(plain), "--prior-context",
                 "--residual-context", "--out", str(joint), *common]) == 0
    before, after = load_float_start(str(plain)), load_float_start(str(joint))
    assert after.cfg.prior_context and after.cfg.residual_context and not before.cfg.prior_context
    assert torch.equal(before.intra.coder.hyper_synthesis[0][0].weight,
                       after.intra.coder.hyper_synthesis[0][0].weight)
    assert float(after.inter.residual.hyper_synthesis.context[3].weight.detach().abs().sum()) > 0
    # the I-frame codec of the plain checkpoint with the P-frame codec of the conditional one
    assert main(["codec", "train", "--stage", "ptq", "--init", str(plain), "--init-inter", str(joint), "--ship",
                 str(ship), "--videos", str(video), "--crop", "32"]) == 0
    assert load_codec(ship).cfg.prior_context
    enc = tmp_path / "a.bav"
    assert main(["codec", "encode", str(video), "-o", str(enc), "-q", "1", "--weights", str(ship)]) == 0
    assert main(["codec", "decode", str(enc), "-o", str(tmp_path / "a.y4m"), "--weights", str(ship)]) == 0
    capsys.readouterr()
    assert main(["codec", "info", "--weights", str(ship)]) == 0
    assert "'prior_context': True" in capsys.readouterr().out
    assert main(["codec", "train", "--stage", "ptq", "--init", str(plain), "--ship", str(ship), "--videos",
                 str(video), "--prior-context"]) == 2
    assert "--prior-context adds a branch that needs training" in capsys.readouterr().err
