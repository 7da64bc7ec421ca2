"""Conditional entropy model of P frames (``CodecConfig.prior_context``): the residual's hyper synthesis reads the
motion-compensated prediction. It starts as the plain hyper synthesis, the decoder really uses the prediction for the
entropy parameters (with exact decoding in another process, refinement and training from the command line:
tests/test_codec_context.py), old weights keep their identity, and PTQ, dynamic precision and the cost model see the
branch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from bitalloc.codec.codec import VideoCoder
from bitalloc.codec.model import LATER_FIELDS, CodecConfig, VideoCodec, with_context
from bitalloc.codec.networks import ConditionalHyperSynthesis, HyperSynthesis, pad_to
from bitalloc.codec.precision import model_id

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
    for later in LATER_FIELDS:  # prior_context and every field added after it
        del d[later]
    d["lambdas"], d["candidates"] = list(TINY.lambdas), None
    h = hashlib.sha256(repr(d).encode())
    for k, v in m.state_dict().items():
        t = v.detach().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    assert model_id(m) == h.digest()[:8]
    assert model_id(with_context(m, prior=True)) != model_id(m)


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
