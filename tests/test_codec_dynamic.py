"""Dynamic precision in the codec: ROI masks in the stream, per-frame widths, exact decoding, cost, training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bitalloc.cli import main
from bitalloc.codec.bitstream import BitstreamError, read_stream
from bitalloc.codec.codec import VideoCoder
from bitalloc.codec.dynamic import (BitFlopsTable, decode_mask, encode_mask, latent_mask, mask_function,
                                    roi_fractions)
from bitalloc.codec.precision import load_codec, save_codec
from bitalloc.codec.video_io import write_y4m

from tests.codec_util import compress_with_threads, moving_video, tiny_dynamic_codec, tiny_weights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dyn_weights(tmp_path_factory):
    return save_codec(tiny_dynamic_codec(), tmp_path_factory.mktemp("dyn") / "dyn.pt")


def test_mask_coding_round_trip():
    import constriction

    rng = np.random.default_rng(0)
    masks = [np.zeros((3, 4), bool), np.ones((3, 4), bool), rng.random((9, 11)) < 0.3, rng.random((1, 1)) < 0.5]
    enc = constriction.stream.queue.RangeEncoder()
    bits = [encode_mask(enc, m) for m in masks]
    dec = constriction.stream.queue.RangeDecoder(enc.get_compressed())
    for m in masks:
        assert np.array_equal(decode_mask(dec, m.shape), m)
    # the count costs log2(n + 1) bits, then n H(k/n) for the blocks
    k, n = int(masks[2].sum()), masks[2].size
    p = k / n
    assert bits[2] == int(np.ceil(np.log2(n + 1) - k * np.log2(p) - (n - k) * np.log2(1 - p)))


def _h_bits(flat: np.ndarray) -> float:
    """log2(n + 1) + n H(k / n): the count, then the blocks (closed form, float64)."""
    n, k = flat.size, int(flat.sum())
    h = 0.0 if k in (0, n) else -(k * np.log2(k / n) + (n - k) * np.log2(1 - k / n))
    return np.log2(n + 1) + h


def test_mask_coding_in_the_context_of_the_previous_mask():
    """P frames: the blocks are coded per context of the previous mask (count + Bernoulli in each); round trip
    exact, bits as the closed form per context, an unchanged mask costs only the two counts, and a mask that
    moved a little costs far fewer bits than on its own; a previous mask of another size is refused."""
    import constriction

    from bitalloc.errors import ShapeError

    rng = np.random.default_rng(1)
    prev = rng.random((9, 11)) < 0.3
    moved = prev.copy()
    moved[rng.random((9, 11)) < 0.05] ^= True
    cases = [(prev, prev), (moved, prev), (rng.random((9, 11)) < 0.5, prev), (np.ones((9, 11), bool), prev),
             (prev, np.zeros((9, 11), bool)), (prev, np.ones((9, 11), bool))]
    enc = constriction.stream.queue.RangeEncoder()
    bits = [encode_mask(enc, m, p) for m, p in cases]
    dec = constriction.stream.queue.RangeDecoder(enc.get_compressed())
    for m, p in cases:
        assert np.array_equal(decode_mask(dec, m.shape, p), m)
    for (m, p), b in zip(cases, bits):
        parts = [m.reshape(-1)[~p.reshape(-1)], m.reshape(-1)[p.reshape(-1)]]
        assert b == sum(int(np.ceil(_h_bits(f))) if f.size else 0 for f in parts)
    n0, n1 = int((~prev).sum()), int(prev.sum())
    assert bits[0] == int(np.ceil(np.log2(n0 + 1))) + int(np.ceil(np.log2(n1 + 1)))
    assert bits[1] < 0.6 * np.ceil(_h_bits(moved.reshape(-1)))
    with pytest.raises(ShapeError, match="previous ROI mask"):
        encode_mask(constriction.stream.queue.RangeEncoder(), prev, np.zeros((3, 3), bool))


def test_version_1_dynamic_streams_still_decode(dyn_weights, monkeypatch):
    """A version 1 stream (every ROI mask coded on its own) decodes to the same frames; version 2 streams and later
    (3: the current one, with per-frame levels) code P frames' masks in context and are smaller or equal."""
    import dataclasses

    import bitalloc.codec.dynamic as dynamic
    from bitalloc.codec.bitstream import write_stream

    coder = VideoCoder(load_codec(dyn_weights))
    video = moving_video(4, 48, 64)
    v2 = coder.compress(video, quality=1, intra_period=-1)
    assert read_stream(v2.stream)[0].version == 4
    assert all(f.roi_bits != f.non_roi_bits for f in v2.frames)  # every frame carries its mask, as in versions 1-3
    own = dynamic.encode_mask
    monkeypatch.setattr(dynamic, "encode_mask", lambda enc, mask, prev=None: own(enc, mask))
    v1 = coder.compress(video, quality=1, intra_period=-1)
    monkeypatch.undo()
    header, records = read_stream(v1.stream)
    old = write_stream(dataclasses.replace(header, version=1), records)
    assert coder.decompress(old).equal(v1.reconstruction)
    assert v1.reconstruction.equal(v2.reconstruction) and len(v2.stream) <= len(v1.stream)
    h3, r3 = read_stream(v2.stream)  # as version 2 (no level bytes; masks in context as in 3): the same frames
    assert coder.decompress(write_stream(dataclasses.replace(h3, version=2), r3)).equal(v2.reconstruction)
    assert sum(f.mask_bits for f in v2.frames[1:]) <= sum(f.mask_bits for f in v1.frames[1:])


def test_frames_at_equal_widths_carry_no_mask_and_contexts_skip_them(dyn_weights, monkeypatch):
    """Stream version 4: a frame whose two widths are equal carries no ROI mask (nothing reads it); the next P frame's
    mask is coded against the last mask carried since the I frame (none after an I frame without one), and the
    decoder, keeping the same context, reproduces every frame exactly. Versions 1-3 still carry every mask."""
    import dataclasses

    import constriction

    from bitalloc.codec.bitstream import write_stream
    from bitalloc.codec.dynamic import carried_mask, mask_in_stream

    pairs = [(16, 4), (8, 8), (4, 16), (4, 4), (8, 8), (16, 4), (8, 16)]  # I P P P | I P P (intra period 4)
    coder = VideoCoder(load_codec(dyn_weights))
    own = VideoCoder._choose

    def forced(self, x, prev, flow, info, widths=None, level=0):
        return own(self, x, prev, flow, info, pairs[info.index])

    monkeypatch.setattr(VideoCoder, "_choose", forced)
    video = moving_video(7, 48, 64)
    res = coder.compress(video, quality=1, intra_period=4)
    assert [(f.roi_bits, f.non_roi_bits) for f in res.frames] == pairs
    assert coder.decompress(res.stream).equal(res.reconstruction)
    assert [f.kind for f in res.frames] == list("IPPPIPP")
    # frame 2 is coded against frame 0's mask (frame 1 carries none), frame 5 against none (the I frame 4 carries
    # none, and frame 2's belongs to the previous intra period), frame 6 against frame 5's
    context_of = {0: None, 2: 0, 5: None, 6: 5}
    for i, f in enumerate(res.frames):
        if f.roi_bits == f.non_roi_bits:
            assert f.mask_bits == 0
        else:
            ctx = None if context_of[i] is None else res.frames[context_of[i]].latent_mask
            assert 0 < f.mask_bits == encode_mask(constriction.stream.queue.RangeEncoder(), f.latent_mask, ctx)
    assert carried_mask(None, None, intra=False) is None and carried_mask(res.frames[0].latent_mask, None,
                                                                             intra=True) is None
    assert mask_in_stream(8, 8, 3) and not mask_in_stream(8, 8, 4) and mask_in_stream(4, 8, 4)
    # the same frames with every mask coded (as in version 3) decode the same and cost more (payloads are whole
    # 32-bit words, so a few bits may not lengthen the stream)
    monkeypatch.setattr("bitalloc.codec.dynamic.mask_in_stream", lambda rb, nb, version: True)
    old = coder.compress(video, quality=1, intra_period=4)
    assert all(f.mask_bits > 0 for f in old.frames)
    assert old.reconstruction.equal(res.reconstruction) and len(old.stream) >= len(res.stream)
    monkeypatch.undo()
    header, records = read_stream(old.stream)
    v3 = write_stream(dataclasses.replace(header, version=3), records)
    assert VideoCoder(load_codec(dyn_weights)).decompress(v3).equal(res.reconstruction)


def test_latent_mask_and_resampling_against_brute_force():
    rng = np.random.default_rng(1)
    luma = rng.random((40, 52)) < 0.02
    m16 = latent_mask(luma, 48, 64)
    for i in range(3):
        for j in range(4):
            assert m16[i, j] == luma[16 * i:16 * i + 16, 16 * j:16 * j + 16].any()
    at = mask_function(torch.from_numpy(m16)[None, None])
    up = at((24, 32))[0, 0].numpy()
    assert np.array_equal(up, np.kron(m16, np.ones((8, 8), bool)))
    down = at((2, 2))[0, 0].numpy()  # ceil(3 / 2) x 4 / 2: pooled 2x2 blocks, the last row padded
    assert np.array_equal(down, np.array([[m16[:2, :2].any(), m16[:2, 2:].any()], [m16[2:, :2].any(), m16[2:, 2:].any()]]))
    padded = at((4, 4))[0, 0].numpy()  # an upsampling network's 1/16 output before its crop: same scale, padded
    assert np.array_equal(padded[:3], m16) and not padded[3].any()
    fr = roi_fractions(torch.from_numpy(m16)[None, None], [2, 16, 32])
    assert float(fr[2]) == float(fr[16]) == pytest.approx(m16.mean())


def test_bit_flops_table_reference_and_widths():
    model = tiny_dynamic_codec()
    table = BitFlopsTable.build(model, size=64)
    for kind in ("I", "P"):
        ones = torch.ones(1)
        fr = {l.stride: ones for l in table.layers[kind]}
        assert float(table.expected(kind, fr, ones * 64, ones * 64) / table.reference(kind)) == pytest.approx(1.0)
        # everything at 4 bits: region layers cost (16 / 64) of their 8-bit cost, fixed layers unchanged
        region = sum(l.macs_per_pixel for l in table.layers[kind] if l.region)
        fixed = sum(l.macs_per_pixel * l.bits_product / 64 for l in table.layers[kind] if not l.region)
        got = float(table.expected(kind, fr, ones * 16, ones * 16))
        assert got == pytest.approx(region * 16 / 64 + fixed)
        assert region > 0 and fixed > 0  # the 16-bit latent readers stay fixed


def test_dynamic_round_trip_exact_across_processes(dyn_weights, tmp_path):
    coder = VideoCoder(load_codec(dyn_weights))
    video = moving_video(4, 48, 64)
    res = compress_with_threads(coder, video, quality=1, intra_period=3)
    kinds = [(f.kind, f.roi_bits, f.non_roi_bits) for f in res.frames]
    assert [k[0] for k in kinds] == list("IPPI")
    assert all(f.roi_bits in (4, 8, 16) and f.non_roi_bits in (4, 8, 16) for f in res.frames)
    assert any(f.roi_bits != f.non_roi_bits for f in res.frames)  # split execution is exercised
    _, records = read_stream(res.stream)
    assert [(r.roi_bits, r.non_roi_bits) for r in records] == [(f.roi_bits, f.non_roi_bits) for f in res.frames]
    assert coder.decompress(res.stream).equal(res.reconstruction)
    stream, out = tmp_path / "s.bav", tmp_path / "rec.npz"
    stream.write_bytes(res.stream)
    code = ("import sys, numpy as np, torch; torch.set_num_threads(1);"
            "from bitalloc.codec.codec import VideoCoder; from bitalloc.codec.precision import load_codec;"
            "f = VideoCoder(load_codec(sys.argv[1])).decompress(open(sys.argv[2], 'rb').read());"
            "np.savez(sys.argv[3], y=f.y, u=f.u, v=f.v)")
    subprocess.run([sys.executable, "-c", code, str(dyn_weights), str(stream), str(out)], check=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    got = np.load(out)
    assert np.array_equal(got["y"], res.reconstruction.y) and np.array_equal(got["v"], res.reconstruction.v)


def test_widths_outside_the_candidates_are_refused(dyn_weights):
    coder = VideoCoder(load_codec(dyn_weights))
    res = coder.compress(moving_video(2, 32, 32), quality=0)
    header_and = bytearray(res.stream)
    # frame 0's ROI width field sits right after the 42-byte header and the type byte; rewrite it to 6 bits
    header_and[43:45] = (6).to_bytes(2, "little")
    import zlib

    from bitalloc.codec.bitstream import HEADER_SIZE
    _, recs = read_stream(res.stream)
    end = HEADER_SIZE + recs[0].size
    body = bytes(header_and[HEADER_SIZE:end - 4])
    header_and[end - 4:end] = zlib.crc32(body).to_bytes(4, "little")
    with pytest.raises(BitstreamError, match="candidate widths are \\[4, 8, 16\\]"):
        coder.decompress(bytes(header_and))


def test_cli_dynamic_training_and_encoding(tmp_path):
    from tests.test_codec_train import SIZES

    video = write_y4m(tmp_path / "clip.y4m", moving_video(4, 48, 64))
    base = ["codec", "train", "--batch-size", "2", "--crop", "32", "--samples-per-epoch", "4", "--warmup-steps", "0",
            "--progress", "off", "--videos", str(video)]
    assert main(base + ["--stage", "intra", "--steps", "1", "--codec-config", SIZES, "--out", str(tmp_path / "i.pt")]) == 0
    ship = tmp_path / "dyn.pt"
    assert main(base + ["--stage", "dynamic", "--steps", "2", "--init", str(tmp_path / "i.pt"), "--gamma", "0.5",
                        "--candidates", "2,4,8", "--explore", "0.5", "--out", str(tmp_path / "d.pt"),
                        "--ship", str(ship)]) == 0
    log = [json.loads(line) for line in (tmp_path / "d.pt.jsonl").read_text().splitlines()]
    extra = log[1]["extra"]
    assert {"bit_flops", "roi_bits", "non_roi_bits"} <= set(extra) and extra["bit_flops"] > 0
    out, js = tmp_path / "a.bav", tmp_path / "a.json"
    assert main(["codec", "encode", str(video), "-o", str(out), "-q", "0", "--dynamic", "--weights", str(ship),
                 "--json", str(js)]) == 0
    s = json.loads(js.read_text())
    assert s["exact"] and s["dynamic"] and 0 < s["width_fields_share"] < 1 and s["roi_source"].startswith("spectral")
    assert all(p["roi_bits"] in (2, 4, 8) for p in s["per_frame"])
    assert main(["codec", "decode", str(out), "-o", str(tmp_path / "r.y4m"), "--weights", str(ship)]) == 0
    # a fixed-precision codec is not a dynamic one
    static = tiny_weights(tmp_path / "static.pt")
    assert main(["codec", "encode", str(video), "-o", str(tmp_path / "b.bav"), "-q", "0", "--dynamic",
                 "--weights", str(static)]) == 2
    assert main(["codec", "train"] + base[2:] + ["--stage", "dynamic", "--init", str(tmp_path / "i.pt"),
                                                  "--out", str(tmp_path / "e.pt"), "--ship", str(tmp_path / "e2.pt")]) == 2
    # exploration belongs to the dynamic stage and is a share of frames
    assert main(base + ["--stage", "intra", "--steps", "1", "--codec-config", SIZES, "--out", str(tmp_path / "k.pt"),
                        "--explore", "0.5"]) == 2
    assert main(base + ["--stage", "dynamic", "--steps", "1", "--init", str(tmp_path / "i.pt"), "--gamma", "0.5",
                        "--explore", "2", "--out", str(tmp_path / "x.pt"), "--ship", str(tmp_path / "x2.pt")]) == 2
    # the selector's lr belongs to the dynamic stage
    assert main(base + ["--stage", "intra", "--steps", "1", "--codec-config", SIZES, "--out", str(tmp_path / "j.pt"),
                        "--selector-lr-scale", "10"]) == 2
    # a selector with a bias per quality level: trained with the stage, shipped, read by the encoder
    lvl = tmp_path / "lvl.pt"
    assert main(base + ["--stage", "dynamic", "--steps", "1", "--init", str(tmp_path / "i.pt"), "--gamma", "0.5",
                        "--per-level-selector", "--out", str(tmp_path / "l.pt"), "--ship", str(lvl)]) == 0
    model = load_codec(lvl)
    assert model.cfg.selector_per_level and model.selector.levels == model.cfg.levels
    assert main(["codec", "encode", str(video), "-o", str(tmp_path / "l.bav"), "-q", "1", "--dynamic", "--weights",
                 str(lvl)]) == 0
    assert main(base + ["--stage", "intra", "--steps", "1", "--codec-config", SIZES, "--out", str(tmp_path / "m.pt"),
                        "--per-level-selector"]) == 2


def test_selector_learns_in_its_own_lr_group():
    """The selector starts untrained in a fine-tuning stage whose base lr suits the pretrained codec: it gets its
    own parameter group at selector_lr_scale x the base lr (and the gains theirs)."""
    from bitalloc.train.codec import SELECTOR_LR_SCALE, STAGES, CodecObjective

    model = tiny_dynamic_codec()
    groups = {g["name"]: g for g in CodecObjective("all", gamma=0.5).param_groups(model)}
    assert {id(p) for p in groups["selector"]["params"]} == {id(p) for p in model.selector.parameters()}
    assert groups["selector"]["lr_scale"] == SELECTOR_LR_SCALE and groups["gains"]["lr_scale"] == 10.0
    # the default scale gives the selector an absolute lr of 0.02 at the dynamic stage's default lr (docs/roi.md)
    assert abs(SELECTOR_LR_SCALE * STAGES["dynamic"][3] - 0.02) < 1e-3
    steps = [p for n, p in model.named_parameters() if n.endswith("quantizer.log_steps")]
    assert steps and {id(p) for p in groups["log steps"]["params"]} == {id(p) for p in steps}
    assert groups["log steps"]["lr_scale"] == 100.0
    assert CodecObjective("all", gamma=0.5, selector_lr_scale=50.0).param_groups(model)[1]["lr_scale"] == 50.0


def test_exploration_codes_a_share_of_frames_at_uniform_random_pairs():
    """DynamicFrames(explore=p): a frame keeps the selector's sample with probability 1 - p (its gradient reaches the
    selector), else each region gets a uniform one-hot (no gradient); Monte Carlo against the closed forms
    (share kept = 1 - p, each other candidate p / K per region, regions independent); p outside [0, 1] refused."""
    from bitalloc.codec.dynamic import DynamicFrames
    from bitalloc.errors import ConfigError

    torch.manual_seed(0)
    n, k, p = 40000, 3, 0.5
    logits = torch.zeros(n, k, requires_grad=True)
    sel = torch.softmax(logits, -1) + (torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.long), k)
                                       - torch.softmax(logits, -1)).detach()  # straight-through one-hot at 0
    r, m = DynamicFrames(None, None, None, explore=p)._explored(sel, sel)
    assert torch.equal(r.detach().sum(-1), torch.ones(n)) and torch.equal(m.detach().sum(-1), torch.ones(n))
    share = r.detach().mean(0)
    se = (p / k * (1 - p / k) / n) ** 0.5
    assert abs(float(share[0]) - (1 - p + p / k)) < 5 * se and all(abs(float(share[j]) - p / k) < 5 * se
                                                                   for j in (1, 2))
    # the two regions are drawn independently: among explored frames (those off the selector's 0 in either region
    # are explored), both off 0 with probability (2/3)^2 of the explored share
    both = float(((r.detach().argmax(-1) > 0) & (m.detach().argmax(-1) > 0)).float().mean())
    assert abs(both - p * (1 - 1 / k) ** 2) < 5 * (both * (1 - both) / n) ** 0.5
    (r[:, 1] + m[:, 2]).sum().backward()  # gradient only through the rows that kept the selector's sample
    kept = (r.detach().argmax(-1) == 0) & (m.detach().argmax(-1) == 0)
    assert logits.grad[kept].abs().sum() > 0
    assert torch.equal(logits.grad[~kept], torch.zeros_like(logits.grad[~kept]))  # explored rows: no gradient
    r0, m0 = DynamicFrames(None, None, None, explore=0.0)._explored(sel, sel)
    assert r0 is sel and m0 is sel
    with pytest.raises(ConfigError, match="explore"):
        DynamicFrames(None, None, None, explore=1.5)


def test_region_lsq_range_init_is_the_min_max_grid():
    """options init='range': every candidate's step is max|v| / Q_P (no clipping at initialisation), per channel
    for weights; 'mean' keeps LSQ's 2 mean|v| / sqrt(Q_P); anything else is refused."""
    from bitalloc.config import TensorConfig
    from bitalloc.errors import ConfigError
    from bitalloc.quantizers.region import RegionLSQQuantizer

    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, 2, 2, generator=g) * torch.tensor([1.0, 4.0, 0.5]).reshape(3, 1, 1, 1)
    cfg = TensorConfig(bits=8, granularity="channel", symmetric=True, quantizer="lsq_region",
                       options={"candidates": [4, 8], "init": "range"})
    q = RegionLSQQuantizer(cfg, "weight", 0, 3)
    q.calibrate_weight(w)
    for k, b in enumerate((4, 8)):
        expect = w.abs().reshape(3, -1).max(1).values / (2 ** (b - 1) - 1)
        assert torch.allclose(q.steps[k].detach(), expect, rtol=1e-6)
    with pytest.raises(ConfigError, match="init"):
        RegionLSQQuantizer(TensorConfig(bits=8, quantizer="lsq_region", options={"init": "median"}), "act", None, None)


def test_freeze_codec_trains_only_the_selector_and_the_quantizer_steps():
    from bitalloc.train.codec import CodecObjective

    model = tiny_dynamic_codec()
    CodecObjective("all", gamma=1.0, freeze_codec=True)._freeze(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("selector.") or n.endswith("quantizer.log_steps") for n in trained)
    assert {n for n, _ in model.selector.named_parameters(prefix="selector")} <= trained
    assert not any(n.endswith(".weight") and "selector" not in n for n in trained)  # no network weight


def test_bit_flops_table_matches_the_cost_reports_bireal_ops():
    """SPEC's Bit-FLOPs (float MACs + BOPs / 64) of a frame type equal bitalloc's cost report (Bi-Real OPs: MACs
    for a float layer, BOPs / 64 for a quantized one), summed over the networks it runs: the static codec's
    float encoders and 8/16-bit decoders count once each, as its own per-layer cost says."""
    import bitalloc
    from bitalloc.codec.precision import ALL_PARTS, coders, network_input
    from tests.codec_util import tiny_codec

    model = tiny_codec()
    table = BitFlopsTable.build(model, size=64)
    for kind, names in (("I", ("intra",)), ("P", ("motion", "residual"))):
        total = 0.0
        for name in names:
            c = coders(model)[name]
            for part in ALL_PARTS:
                total += sum(l.bireal_ops for l in bitalloc.cost_report(getattr(c, part), network_input(c, part, 64)).layers)
        assert table.reference(kind) == pytest.approx(total / 64**2, rel=1e-9)


def test_codec_info_lists_every_layer_with_its_widths_and_why(dyn_weights, tmp_path, capsys):
    from bitalloc.codec.precision import ALL_PARTS, coders, load_codec

    assert main(["codec", "info", "--weights", str(dyn_weights), "--layers", "--json", str(tmp_path / "i.json")]) == 0
    assert "FIXED_LAYERS" in capsys.readouterr().out
    rows = json.loads((tmp_path / "i.json").read_text())["layers"]
    model = load_codec(dyn_weights)
    convs = {(f"{c}.{p}", n.removesuffix(".layer")) for c, coder in coders(model).items() for p in ALL_PARTS
             for n, m in getattr(coder, p).named_modules() if isinstance(m, torch.nn.Conv2d)}
    listed = {(r["network"], r["layer"]) for r in rows if r["type"] == "Conv2d"}
    assert listed == convs  # every convolution of every network, once
    by = {(r["network"], r["layer"]): r for r in rows}
    assert by[("intra.analysis", "nonlinear.0")]["weight_bits"] == "8"  # reads the frame: fixed 8 bits
    ha = by[("residual.hyper_analysis", "2")]  # the hyper analysis: float, sender-only
    assert ha["status"] == "float" and ha["act_bits"] == "float" and "DYNAMIC_FLOAT_PARTS" in ha["reason"]
    assert by[("residual.hyper_synthesis", "0.0")]["weight_bits"] == "8"  # the hyper synthesis: fixed 8 bits
    assert by[("intra.analysis", "nonlinear.2")]["weight_bits"] == "4/8/16"  # region LSQ
    assert by[("intra.synthesis", "linear.0")]["act_bits"] == "16" and "WIDE_LAYERS" in by[("intra.synthesis",
                                                                                            "linear.0")]["reason"]
    gdn = [r for r in rows if r["type"] == "SimplifiedGDN"]
    assert gdn and all(r["status"] == "float" and "not supported" in r["reason"] for r in gdn)


def test_dynamic_layer_rules_hyper_bits_and_float_hyper_analysis():
    """prepare_dynamic: the hyper analysis stays float (DYNAMIC_FLOAT_PARTS), the hyper synthesis is on fixed grids
    at hyper_bits (its 16-bit-input first layer excepted), the latent readers read 16-bit inputs with 8-bit weights,
    every other convolution of analysis and synthesis is region LSQ; the grids' widths are the ones the quantizers
    really apply (a fixed 4-bit weight grid holds at most 16 distinct values per channel)."""
    from bitalloc.codec.dynamic import dynamic_quant_config
    from bitalloc.codec.precision import coders
    from bitalloc.errors import ConfigError
    from bitalloc.model.layers import quant_layers

    model = tiny_dynamic_codec(hyper_bits=4)
    for name, coder in coders(model).items():
        assert getattr(coder.hyper_analysis, "bitalloc_info", None) is None, name
        assert not list(quant_layers(coder.hyper_analysis))
        for lname, layer in quant_layers(coder.hyper_synthesis):
            w, a = layer.weight_quantizer, layer.input_quantizer
            assert type(w).__name__ == "FixedQuantizer", (name, lname)
            expect_a = 16 if lname.startswith("0.0") else 4
            expect_w = 8 if lname.startswith("0.0") else 4
            assert int(a.qparams().bits.max()) == expect_a and int(w.qparams().bits.max()) == expect_w
            if expect_w == 4:
                wq = w(layer.layer.weight.detach() if hasattr(layer, "layer") else layer.weight.detach())
                per_channel = wq.reshape(wq.shape[0], -1)
                assert max(len(torch.unique(r)) for r in per_channel) <= 16
        syn = dict(quant_layers(coder.synthesis))
        first = next(v for k, v in syn.items() if k.startswith("linear.0"))
        assert int(first.input_quantizer.qparams().bits.max()) == 16
        assert int(first.weight_quantizer.qparams().bits.max()) == 8
        assert any(type(l.weight_quantizer).__name__ == "RegionLSQQuantizer" for l in syn.values())
    with pytest.raises(ConfigError, match="hyper_bits"):
        dynamic_quant_config((4, 8, 16), "hyper_synthesis", hyper_bits=1)


def test_init_from_codec_weights_takes_their_float_weights(tmp_path):
    """--init (load_float_start) accepts codec weights written by --ship: the float codec of their stored weights
    (bitalloc.codec.precision.float_codec), with no quantizer; a file that is neither is refused with the fix."""
    from bitalloc.codec.precision import float_codec, network_configs
    from bitalloc.errors import BitallocError
    from bitalloc.io import torch_save
    from bitalloc.train.codec import load_float_start

    path = tiny_weights(tmp_path / "static.pt")
    start = load_float_start(str(path))
    assert not network_configs(start) and not start.cfg.candidates
    ref = float_codec(load_codec(path)).state_dict()
    got = start.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    torch_save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(BitallocError, match="bitalloc train"):
        load_float_start(str(tmp_path / "other.pt"))
    assert main(["codec", "train", "--stage", "intra", "--videos", str(path), "--hyper-bits", "4", "--out",
                 str(tmp_path / "x.pt"), "--steps", "1"]) == 2
