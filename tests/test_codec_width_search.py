"""The encoder's width search (VideoCoder.compress(search_gamma=...)) and fitting the selector to it
(bitalloc.codec.selector.search_costs / fit_selector, `bitalloc codec fit-selector`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bitalloc.cli import main
from bitalloc.codec.bitstream import read_stream
from bitalloc.codec.codec import VideoCoder
from bitalloc.codec.precision import load_codec, save_codec
from bitalloc.codec.selector import NUM_FEATURES, WidthSelector, cross_validate, fit_selector, search_costs
from bitalloc.codec.video_io import read_video, write_y4m
from bitalloc.errors import ConfigError, ShapeError

from tests.codec_util import moving_video, tiny_codec, tiny_dynamic_codec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dyn_weights(tmp_path_factory):
    return save_codec(tiny_dynamic_codec(candidates=(4, 8)), tmp_path_factory.mktemp("search") / "dyn.pt")


@pytest.fixture(scope="module")
def searched(dyn_weights):
    coder = VideoCoder(load_codec(dyn_weights), analysis_scales=(0.5, 1.0))
    video = moving_video(3, 48, 64)
    return coder, video, coder.compress(video, quality=1, intra_period=2, search_gamma=0.01)


def test_search_keeps_the_least_cost_pair_and_decodes_exactly(searched):
    coder, video, res = searched
    _, records = read_stream(res.stream)
    for f, rec in zip(res.frames, records):
        assert set(f.pair_costs) == set(coder.search_pairs(f.roi_fraction))
        # every pair's cost is recomputed here by brute force: the kept pair is the least rd + gamma * relative cost
        total = {p: rd + 0.01 * rel for p, (rd, rel) in f.pair_costs.items()}
        assert (f.roi_bits, f.non_roi_bits) == min(total, key=total.get)
        assert (rec.roi_bits, rec.non_roi_bits) == (f.roi_bits, f.non_roi_bits)
        for (r, n), (_, rel) in f.pair_costs.items():
            assert rel == pytest.approx(coder.relative_bit_flops(f.kind, f.latent_mask, r, n))
    assert coder.decompress(res.stream).equal(res.reconstruction)
    # the kept payload is the one a fixed assignment of the kept pair writes (frame 0, an I frame: no reference)
    pair = (res.frames[0].roi_bits, res.frames[0].non_roi_bits)
    one = coder.compress(video[:1], quality=1, widths=pair)
    assert read_stream(one.stream)[1][0].payload == records[0].payload


def test_relative_bit_flops_is_one_at_8_bits_and_grows_with_the_widths(searched):
    coder, _, res = searched
    m = res.frames[1].latent_mask
    assert coder.relative_bit_flops("P", m, 8, 8) == pytest.approx(1.0)
    assert coder.relative_bit_flops("P", m, 4, 4) < coder.relative_bit_flops("P", m, 8, 4) < 1.0


def test_search_conflicts_and_bad_gamma(dyn_weights):
    coder = VideoCoder(load_codec(dyn_weights))
    video = moving_video(1, 32, 32)
    with pytest.raises(ConfigError, match="not both"):
        coder.compress(video, quality=0, widths=(4, 4), search_gamma=0.1)
    with pytest.raises(ConfigError, match=">= 0"):
        coder.compress(video, quality=0, search_gamma=-1.0)


def _objective(coder, video, res, j, level, gamma):
    """Frame j's bpp + lambda * (6 MSE_Y + MSE_U + MSE_V) / 8 + gamma * relative Bit-FLOPs, recomputed from the
    stream's payload and the planes in float64 numpy (even frame sizes: no padding to crop)."""
    f, rec = res.frames[j], read_stream(res.stream)[1][j]

    def mse(a, b):
        return np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)

    out = res.reconstruction
    d = (6 * mse(video.y[j], out.y[j]) + mse(video.u[j], out.u[j]) + mse(video.v[j], out.v[j])) / 8
    bpp = 8 * len(rec.payload) / (video.height * video.width)
    return bpp + float(coder.model.lambdas[level]) * d + gamma * coder.relative_bit_flops(f.kind, f.latent_mask,
                                                                                        f.roi_bits, f.non_roi_bits)


def test_search_lookahead_scores_pairs_by_the_next_frames_against_fixed_encodes(dyn_weights):
    coder = VideoCoder(load_codec(dyn_weights), analysis_scales=(0.5, 1.0))
    video, g = moving_video(4, 48, 64, seed=3), 0.01
    res = coder.compress(video, quality=1, intra_period=3, search_gamma=g, search_lookahead=2)
    for f in res.frames:  # the kept pair is the least own + lookahead score
        assert set(f.pair_lookahead) == set(f.pair_costs)
        total = {p: rd + g * rel + f.pair_lookahead[p][0] + g * f.pair_lookahead[p][1]
                 for p, (rd, rel) in f.pair_costs.items()}
        assert (f.roi_bits, f.non_roi_bits) == min(total, key=total.get)
    # frame 2's next frame is an I frame and frame 3 is the last: nothing to look ahead to
    assert all(v == (0, 0) for f in res.frames[2:] for v in f.pair_lookahead.values())
    # the fitting data of a lookahead search: each pair's cost includes the next frames' at the same pair
    feats, costs = search_costs(res.frames, (4, 8), g)
    for f, table in zip(res.frames, costs):
        for (r, n), (rd, rel) in f.pair_costs.items():
            la_rd, la_rel = f.pair_lookahead[(r, n)]
            assert table[(4, 8).index(r), (4, 8).index(n)] == pytest.approx(rd + la_rd + g * (rel + la_rel))
    assert coder.decompress(res.stream).equal(res.reconstruction)
    # brute force for frame 0: each pair held on frames 0..2 by a fixed assignment; its frames 1 and 2 cost what
    # the lookahead says, and the kept pair is the least over the three frames
    whole = {}
    for p in res.frames[0].pair_costs:
        fixed = coder.compress(video[:3], quality=1, intra_period=3, widths=p)
        costs = [_objective(coder, video[:3], fixed, j, 1, g) for j in range(3)]
        la_rd, la_rel = res.frames[0].pair_lookahead[p]
        assert la_rd + g * la_rel == pytest.approx(costs[1] + costs[2], rel=1e-9)
        rd, rel = res.frames[0].pair_costs[p]
        assert rd + g * rel == pytest.approx(costs[0], rel=1e-9)
        whole[p] = sum(costs)
    assert (res.frames[0].roi_bits, res.frames[0].non_roi_bits) == min(whole, key=whole.get)
    la_rd, la_rel = res.frames[0].pair_lookahead[(res.frames[0].roi_bits, res.frames[0].non_roi_bits)]
    assert _objective(coder, video, res, 0, 1, g) == pytest.approx(min(whole.values()) - la_rd - g * la_rel, rel=1e-9)


def test_search_shortlist_against_the_full_and_the_greedy_search(dyn_weights):
    coder = VideoCoder(load_codec(dyn_weights), analysis_scales=(1.0,))
    video, g = moving_video(4, 40, 56, seed=7), 0.01
    full = coder.compress(video, quality=1, search_gamma=g, search_lookahead=1)
    # a shortlist of every pair is the full search; of one pair, the greedy search's choice
    assert coder.compress(video, quality=1, search_gamma=g, search_lookahead=1,
                          search_shortlist=4).stream == full.stream
    one = coder.compress(video, quality=1, search_gamma=g, search_lookahead=1, search_shortlist=1)
    assert one.stream == coder.compress(video, quality=1, search_gamma=g).stream
    assert all(len(f.pair_lookahead) == 1 for f in one.frames)
    # two pairs: frame 0 (same input as the full search's) keeps the least own + lookahead score of the two pairs
    # of least own score, recomputed from the full search's costs
    two = coder.compress(video, quality=1, search_gamma=g, search_lookahead=1, search_shortlist=2)
    f0, t0 = full.frames[0], two.frames[0]
    own = {p: rd + g * rel for p, (rd, rel) in f0.pair_costs.items()}
    short = sorted(own, key=lambda p: (own[p], p))[:2]
    assert set(t0.pair_lookahead) == set(short)
    total = {p: own[p] + f0.pair_lookahead[p][0] + g * f0.pair_lookahead[p][1] for p in short}
    assert (t0.roi_bits, t0.non_roi_bits) == min(total, key=total.get)
    assert coder.decompress(two.stream).equal(two.reconstruction)
    # its frames cannot be fitted to (the other pairs' lookahead costs are unknown)
    with pytest.raises(ConfigError, match="shortlist"):
        search_costs(two.frames, (4, 8), g)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="shortlist"):
            coder.compress(video[:2], quality=0, search_gamma=g, search_lookahead=1, search_shortlist=bad)
    with pytest.raises(ConfigError, match="search_lookahead"):
        coder.compress(video[:2], quality=0, search_gamma=g, search_shortlist=2)


def test_search_lookahead_bad_input(dyn_weights):
    coder = VideoCoder(load_codec(dyn_weights))
    video = moving_video(2, 32, 32)
    with pytest.raises(ConfigError, match="search_gamma"):
        coder.compress(video, quality=0, search_lookahead=1)
    assert coder.compress(video, quality=0, search_gamma=0.1, search_lookahead=np.int64(1)).frames[0].pair_lookahead
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="lookahead"):
            coder.compress(video, quality=0, search_gamma=0.1, search_lookahead=bad)


def _synthetic(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Frames whose best ROI width depends on feature 0's sign and best non-ROI width on feature 5's, features
    at very different scales (a fit without standardisation would struggle); wrong choices cost 1 each."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, NUM_FEATURES)) * np.array([0.01, 1, 5, 1, 1, 100, 1, 1])
    f += np.array([0.3, 0, 0, 0, 0, 20, 0, 0])
    best_r = np.where(f[:, 0] > 0.3, 2, 0)
    best_n = np.where(f[:, 5] > 20, 1, 0)
    c = np.ones((n, 3, 3)) * 5.0
    for t in range(n):
        for i in range(3):
            for j in range(3):
                c[t, i, j] += (i != best_r[t]) + (j != best_n[t])
    return f, c


def test_fit_selector_recovers_a_linear_rule_against_brute_force():
    f, c = _synthetic()
    sel = WidthSelector((2, 4, 8))
    out = fit_selector(sel, f, c, l2=1e-4)
    idx = sel.logits(f).argmax(-1).numpy()
    brute = np.array([np.unravel_index(c[t].argmin(), (3, 3)) for t in range(len(c))])
    assert np.mean((idx == brute).all(1)) >= 0.95 and out["agreement"] >= 0.95
    assert out["selector_cost"] < out["fixed_cost"] and out["search_cost"] == pytest.approx(5.0)
    # the best fixed pair by brute force over the 9 pairs
    sums = c.sum(0)
    i, j = np.unravel_index(sums.argmin(), sums.shape)
    assert out["fixed_pair"] == [(2, 4, 8)[i], (2, 4, 8)[j]] and out["fixed_cost"] == pytest.approx(sums.min() / len(c))
    # the report counts the choices of the float32 layer reading raw features (standardisation folded in)
    assert sum(out["selector_pairs"].values()) == len(c)
    for (i, j), count in zip(np.ndindex(3, 3), out["selector_pairs"].values()):
        assert count == int(np.sum((idx[:, 0] == i) & (idx[:, 1] == j)))


def test_fit_selector_without_signal_picks_the_best_fixed_pair():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(200, NUM_FEATURES))
    c = np.tile(np.array([[3.0, 2.0, 4.0], [1.0, 2.5, 3.0], [2.0, 2.0, 2.0]]), (200, 1, 1))
    sel = WidthSelector((2, 4, 8))
    out = fit_selector(sel, f, c)
    assert out["selector_pairs"]["4/2"] == 200 and out["fixed_pair"] == [4, 2]


def test_cross_validate_generalising_rule_against_brute_force():
    f, c = _synthetic(300)
    groups = np.array(["a", "b", "c"])[np.arange(300) % 3]
    cv = cross_validate((2, 4, 8), f, c, groups, l2=1e-4)
    assert [r["group"] for r in cv["groups"]] == ["a", "b", "c"]
    for r in cv["groups"]:
        test = groups == r["group"]
        ct, co = c[test], c[~test]
        # brute force: the best fixed pair of the held-out frames and that of the other frames, the search's least
        sums = ct.sum(0)
        i, j = np.unravel_index(sums.argmin(), sums.shape)
        assert r["fixed_pair"] == [(2, 4, 8)[i], (2, 4, 8)[j]]
        assert r["fixed_cost"] == pytest.approx(sums.min() / len(ct))
        oi, oj = np.unravel_index(co.sum(0).argmin(), (3, 3))
        assert r["train_fixed_pair"] == [(2, 4, 8)[oi], (2, 4, 8)[oj]]
        assert r["train_fixed_cost"] == pytest.approx(ct[:, oi, oj].mean())
        assert r["search_cost"] == pytest.approx(5.0) and r["frames"] == 100
        # the held-out selector is the one fit_selector makes without these frames, costed on them
        sel = WidthSelector((2, 4, 8))
        fit_selector(sel, f[~test], co, l2=1e-4)
        idx = sel.logits(f[test]).argmax(-1).numpy()
        assert r["selector_cost"] == pytest.approx(ct[np.arange(len(ct)), idx[:, 0], idx[:, 1]].mean())
        # the rule is linear in the features, so it carries over: nearly all of the search's gain is kept
        assert r["beats_fixed"] and r["captured"] >= 0.9
        assert r["captured"] == pytest.approx((r["fixed_cost"] - r["selector_cost"]) / (r["fixed_cost"] - 5.0))
    assert cv["beats_fixed_on_every_group"] and cv["mean"]["search_cost"] == pytest.approx(5.0)
    assert cv["mean"]["selector_cost"] == pytest.approx(np.mean([r["selector_cost"] for r in cv["groups"]]))


def test_cross_validate_content_specific_choices_do_not_carry_over():
    """Each group's best pair is a constant of that group, unrelated to the features: a selector fitted to the other
    groups can at best pick their pair, which is not this group's, so it does not beat the fixed pair here."""
    rng = np.random.default_rng(3)
    f = rng.normal(size=(240, NUM_FEATURES))
    groups = np.repeat(["x", "y", "z"], 80)
    c = np.full((240, 2, 2), 2.0)
    for g, (i, j) in zip("xyz", [(0, 0), (1, 1), (0, 1)]):
        c[groups == g, i, j] = 1.0
    cv = cross_validate((4, 8), f, c, groups, l2=1e-1)
    for r in cv["groups"]:
        assert r["fixed_cost"] == pytest.approx(1.0) and r["search_cost"] == pytest.approx(1.0)
        assert not r["beats_fixed"] and r["captured"] is None  # no gap: the best fixed pair is the search here
    assert not cv["beats_fixed_on_every_group"] and cv["mean"]["selector_cost"] > 1.5


def test_cross_validate_bad_input():
    f, c = _synthetic(20)
    with pytest.raises(ConfigError, match="at least two groups"):
        cross_validate((2, 4, 8), f, c, ["v"] * 20)
    with pytest.raises(ShapeError, match="group labels"):
        cross_validate((2, 4, 8), f, c, ["v", "w"])


def test_fit_selector_bad_input():
    sel = WidthSelector((4, 8))
    with pytest.raises(ShapeError, match="costs"):
        fit_selector(sel, np.zeros((3, NUM_FEATURES)), np.zeros((3, 3, 3)))
    with pytest.raises(ConfigError, match="non-finite"):
        fit_selector(sel, np.zeros((2, NUM_FEATURES)), np.full((2, 2, 2), np.nan))


def test_search_costs_completes_one_region_frames(searched):
    coder, _, res = searched
    feats, costs = search_costs(res.frames, coder.model.cfg.candidates, 0.01)
    assert feats.shape == (3, NUM_FEATURES) and costs.shape == (3, 2, 2)
    for f, table in zip(res.frames, costs):
        for (r, n), (rd, rel) in f.pair_costs.items():
            assert table[(4, 8).index(r), (4, 8).index(n)] == pytest.approx(rd + 0.01 * rel)
    with pytest.raises(ConfigError, match="search_gamma"):
        search_costs(coder.compress(moving_video(1, 32, 32), quality=0).frames, (4, 8), 0.01)


def test_cli_encode_search_and_fit_selector(dyn_weights, tmp_path, capsys):
    src = tmp_path / "clip.y4m"
    write_y4m(src, moving_video(3, 48, 64))
    out, js = tmp_path / "s.bav", tmp_path / "s.json"
    assert main(["codec", "encode", str(src), "-o", str(out), "-q", "1", "--dynamic", "--weights", str(dyn_weights),
                 "--widths", "search", "--gamma", "0.01", "--analysis-scales", "1", "--json", str(js),
                 "--lookahead", "1"]) == 0
    assert json.loads(js.read_text())["width_search_gamma"] == 0.01
    assert json.loads(js.read_text())["width_search_lookahead"] == 1
    out2, js2 = tmp_path / "s2.bav", tmp_path / "s2.json"
    assert main(["codec", "encode", str(src), "-o", str(out2), "-q", "1", "--dynamic", "--weights", str(dyn_weights),
                 "--widths", "search", "--gamma", "0.01", "--analysis-scales", "1", "--json", str(js2),
                 "--lookahead", "1", "--shortlist", "4"]) == 0
    assert json.loads(js2.read_text())["width_search_shortlist"] == 4 and out2.read_bytes() == out.read_bytes()
    capsys.readouterr()
    assert main(["codec", "encode", str(src), "-o", str(tmp_path / "s3.bav"), "-q", "1", "--dynamic", "--weights",
                 str(dyn_weights), "--widths", "search", "--gamma", "0.01", "--shortlist", "2"]) == 2
    assert "--shortlist 2" in capsys.readouterr().err
    # the file is the API's stream with the same search (lookahead included)
    api = VideoCoder(load_codec(dyn_weights), analysis_scales=(1.0,)).compress(
        read_video(src), quality=1, search_gamma=0.01, search_lookahead=1)
    assert out.read_bytes() == api.stream
    fitted, fj = tmp_path / "fitted.pt", tmp_path / "fit.json"
    assert main(["codec", "fit-selector", str(src), "--weights", str(dyn_weights), "--gamma", "0.01", "--levels", "0,2",
                 "--frames", "3", "--analysis-scales", "1", "-o", str(fitted), "--json", str(fj)]) == 0
    report = json.loads(fj.read_text())
    assert report["frames"] == 6 and report["selector_cost"] <= report["fixed_cost"] + 1e-9
    model = load_codec(fitted)
    assert model.cfg.candidates == (4, 8)
    base = load_codec(dyn_weights)
    assert not torch.equal(model.selector.fc.weight, base.selector.fc.weight)
    # only the selector changed
    for (k, a), (_, b) in zip(model.state_dict().items(), base.state_dict().items()):
        if not k.startswith("selector."):
            assert torch.equal(a, b), k
    assert main(["codec", "encode", str(src), "-o", str(tmp_path / "f.bav"), "-q", "1", "--dynamic", "--weights",
                 str(fitted)]) == 0
    # refit from the saved search costs at another gamma: no encoding; a huge gamma makes the narrowest pair win
    refit, rj = tmp_path / "refit.pt", tmp_path / "refit.json"
    assert main(["codec", "fit-selector", "--from-search", str(fj), "--weights", str(dyn_weights), "--gamma", "1000",
                 "-o", str(refit), "--json", str(rj)]) == 0
    again = json.loads(rj.read_text())
    assert again["frames"] == 6 and again["selector_pairs"]["4/4"] == 6 and again["search_gamma"] == 0.01
    assert len(again["search"]["frames"]) == 6
    # a lookahead search: its costs travel in the report and a refit at the same gamma sees the same costs
    la_pt, la_js = tmp_path / "la.pt", tmp_path / "la.json"
    assert main(["codec", "fit-selector", str(src), "--weights", str(dyn_weights), "--gamma", "0.01", "--levels", "1",
                 "--frames", "3", "--analysis-scales", "1", "--lookahead", "1", "-o", str(la_pt), "--json",
                 str(la_js)]) == 0
    la = json.loads(la_js.read_text())
    assert la["search_lookahead"] == 1 and all(f["pair_lookahead"] for f in la["search"]["frames"][:2])
    assert not la["search"]["frames"][2]["pair_lookahead"] or all(
        row[2:] == [0, 0] for row in la["search"]["frames"][2]["pair_lookahead"])
    assert main(["codec", "fit-selector", "--from-search", str(la_js), "--weights", str(dyn_weights), "--gamma", "0.01",
                 "-o", str(tmp_path / "la2.pt"), "--json", str(tmp_path / "la2.json")]) == 0
    la2 = json.loads((tmp_path / "la2.json").read_text())
    assert la2["search_cost"] == pytest.approx(la["search_cost"]) and la2["search_lookahead"] == 1
    capsys.readouterr()
    assert main(["codec", "fit-selector", "--from-search", str(la_js), "--weights", str(dyn_weights), "--gamma", "0.01",
                 "--lookahead", "1", "-o", str(tmp_path / "la3.pt")]) == 2
    assert "--lookahead" in capsys.readouterr().err
    assert main(["codec", "fit-selector", str(src), "--from-search", str(fj), "--weights", str(dyn_weights),
                 "--gamma", "1", "-o", str(tmp_path / "y.pt")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["codec", "fit-selector", "--from-search", str(src), "--weights", str(dyn_weights),
                 "--gamma", "1", "-o", str(tmp_path / "y.pt")]) == 2
    assert "not a `bitalloc codec fit-selector --json` report" in capsys.readouterr().err
    # leave-one-video-out: needs two videos; the report names each frame's video, and older reports without the
    # names get them back from videos x levels x frames per video
    assert main(["codec", "fit-selector", str(src), "--weights", str(dyn_weights), "--gamma", "0.01",
                 "--cross-validate", "-o", str(tmp_path / "y.pt")]) == 2
    assert "two or more" in capsys.readouterr().err
    other = tmp_path / "other.y4m"
    write_y4m(other, moving_video(3, 48, 64, seed=5))
    cvj = tmp_path / "cv.json"
    assert main(["codec", "fit-selector", str(src), str(other), "--weights", str(dyn_weights), "--gamma", "0.01",
                 "--levels", "1", "--frames", "2", "--analysis-scales", "1", "--cross-validate",
                 "-o", str(tmp_path / "cv.pt"), "--json", str(cvj)]) == 0
    assert "leave-one-video-out" in capsys.readouterr().out
    cv = json.loads(cvj.read_text())
    assert [f["video"] for f in cv["search"]["frames"]] == [str(src)] * 2 + [str(other)] * 2
    assert [r["group"] for r in cv["cross_validation"]["groups"]] == [str(src), str(other)]
    assert all(r["frames"] == 2 for r in cv["cross_validation"]["groups"])
    for f in cv["search"]["frames"]:
        del f["video"]
    cvj.write_text(json.dumps(cv))
    assert main(["codec", "fit-selector", "--from-search", str(cvj), "--weights", str(dyn_weights), "--gamma",
                 "0.01", "--cross-validate", "-o", str(tmp_path / "cv2.pt"), "--json", str(tmp_path / "cv2.json")]) == 0
    again = json.loads((tmp_path / "cv2.json").read_text())["cross_validation"]
    assert again["groups"] == cv["cross_validation"]["groups"]
    cv["videos"] = [str(src)]  # the count no longer matches: the videos cannot be told apart
    cvj.write_text(json.dumps(cv))
    capsys.readouterr()
    assert main(["codec", "fit-selector", "--from-search", str(cvj), "--weights", str(dyn_weights), "--gamma",
                 "0.01", "--cross-validate", "-o", str(tmp_path / "cv3.pt")]) == 2
    assert "holds frames of 1 video" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["codec", "encode", str(src), "-o", str(tmp_path / "g.bav"), "-q", "1", "--dynamic", "--weights",
                 str(dyn_weights), "--widths", "search"]) == 2
    assert "needs --gamma" in capsys.readouterr().err
    assert main(["codec", "encode", str(src), "-o", str(tmp_path / "g.bav"), "-q", "1", "--dynamic", "--weights",
                 str(dyn_weights), "--lookahead", "1"]) == 2
    assert "--lookahead goes with --widths search" in capsys.readouterr().err
    assert main(["codec", "fit-selector", str(src), "--weights", str(dyn_weights), "--gamma", "0.01",
                 "-o", str(fitted)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["codec", "fit-selector", str(src), "--weights", str(dyn_weights), "--gamma", "0.01", "--crop", "8x8",
                 "-o", str(tmp_path / "x.pt")]) == 2
    assert "--crop" in capsys.readouterr().err


def test_benchmark_runs_the_width_search_with_its_matched_pair(dyn_weights, tmp_path):
    import importlib.util
    from pathlib import Path

    from tests.codec_util import tiny_weights

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "codec_dynamic.py"
    spec = importlib.util.spec_from_file_location("codec_dynamic_bench_search", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    src = tmp_path / "clip.y4m"
    write_y4m(src, moving_video(3, 48, 64))
    static = tiny_weights(tmp_path / "static.pt")
    second = tmp_path / "second.pt"
    second.write_bytes(Path(dyn_weights).read_bytes())
    assert bench.main(["--clips", str(src), "--frames", "3", "--levels", "0,1,2", "--threads", "1", "--variants", "none",
                       "--dynamic-weights", str(dyn_weights), "--dynamic-weights", str(second), "--static-weights",
                       str(static), "--search-gamma", "0", "--search-gamma", "4-8=1000", "--search-gamma", "2-4-8=5",
                       "--search-lookahead", "1", "--cross-check", "0", "--verify", "none",
                       "--results", str(tmp_path / "res"), "--no-md"]) == 0
    res = json.loads((tmp_path / "res" / "codec_dynamic.json").read_text())
    clip = res["clips"][0]
    g = clip["groups"]["dyn4-8"]
    assert set(g["search"]) == {"0", "1000"} and all(v["lookahead"] == 1 for v in g["search"].values())
    names = set(clip["variants"])
    assert {"dyn4-8-search-0", "dyn4-8-search-1000"} <= names
    # gamma 1000: the cost dominates, every frame at the narrowest pair, which is then its matched pair
    narrow = clip["variants"]["dyn4-8-search-1000"]["points"]
    assert all(w == [4, 4] for p in narrow for w in p["widths"]) and g["search"]["1000"]["matched_pair"] == [4, 4]
    for key, sg in g["search"].items():
        r, n = sg["matched_pair"]
        assert f"dyn4-8-fixed-{r}/{n}" in names
    # the second codec of the set runs its selector and its matched pair only, no search
    second_group = [k for k in clip["groups"] if k.startswith("dyn4-8:")]
    assert len(second_group) == 1 and clip["groups"][second_group[0]]["search"] == {}
    assert not any(n.startswith(second_group[0] + "-search") for n in names)
    assert any("width search with 1 frame of lookahead, gamma 0" in goal["goal"] for goal in res["goals"])
    for sg in g["search"].values():  # the pairs around the search's Bit-FLOPs ran, for the equal-cost comparison
        assert sg["bracket"] and all(f"dyn4-8-fixed-{r}/{n}" in names for r, n in sg["bracket"])
        assert "equal_bit_flops_bd_rate" in sg
    assert "selector_equal_bit_flops_bd_rate" in g
    assert bench.parse_search_gamma(["0.1,0.2", "04-8=0.3,0.1"]) == {"all": [0.1, 0.2], "4-8": [0.3, 0.1]}
    assert bench.search_gammas({"all": [0.1, 0.2], "4-8": [0.3, 0.1]}, (4, 8)) == [0.1, 0.2, 0.3]
    for bad in ("x", "4-8=", "a-b=0.1", "-1"):
        with pytest.raises(ConfigError, match="--search-gamma"):
            bench.parse_search_gamma([bad])


def test_benchmark_equal_cost_comparison_closed_form():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "codec_dynamic.py"
    spec = importlib.util.spec_from_file_location("codec_dynamic_bench_eq", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.search_name({"lookahead": 0}) == "width search"
    assert bench.search_name({"lookahead": 2, "shortlist": 3}) == ("width search with 2 frames of lookahead from a "
                                                                   "shortlist of 3 pairs")
    for argv in (["--search-shortlist", "2"], ["--search-lookahead", "1", "--search-shortlist", "0"]):
        with pytest.raises(ConfigError, match="--search-shortlist"):
            bench.parse_args(["--clips", "x.y4m", *argv])
    costs = {(4, 4): 1.0, (8, 4): 2.0, (4, 8): 3.0}
    assert bench.bracket_pairs(1.5, costs) == [(4, 4), (8, 4)]
    assert bench.bracket_pairs(2.0, costs) == [(8, 4)]
    assert bench.bracket_pairs(0.5, costs) == [(4, 4)] and bench.bracket_pairs(9.0, costs) == [(4, 8)]
    # BD-rates against pairs a, b, c at Bit-FLOPs 1, 2, 3 (-1%, +1%, +4%): at 1.5 the mixes a-b give 0, a-c +0.25
    # (the best mix: the search is 0.25% worse than it); at 2.5, b-c +2.5, a-c +2.75
    table = {"a": {"akima": -1.0, "pchip": -2.0}, "b": {"akima": 1.0, "pchip": 0.0}, "c": {"akima": 4.0, "pchip": 2.0}}
    fixed = {"a": ([], 1.0), "b": ([], 2.0), "c": ([], 3.0)}

    def bd(anchor, test):
        return table[next(k for k, v in fixed.items() if v[0] is anchor)]

    out = bench.equal_cost_bd(["me"], 1.5, fixed, bd)
    assert out["akima"] == pytest.approx(0.25) and out["pairs"] == ["a", "c"] and out["t"] == pytest.approx(0.25)
    out = bench.equal_cost_bd(["me"], 2.5, fixed, bd)
    assert out["akima"] == pytest.approx(2.75) and out["pairs"] == ["a", "c"] and out["pchip"] == pytest.approx(1.0)
    # brute force: the largest first-order mix over every pair below and above
    for cost in (1.2, 1.9, 2.0, 2.7):
        mixes = [table[lo]["akima"] + (cost - fixed[lo][1]) / (fixed[hi][1] - fixed[lo][1])
                 * (table[hi]["akima"] - table[lo]["akima"]) if fixed[hi][1] > fixed[lo][1] else table[lo]["akima"]
                 for lo in fixed for hi in fixed if fixed[lo][1] <= cost <= fixed[hi][1]]
        assert bench.equal_cost_bd(["me"], cost, fixed, bd)["akima"] == pytest.approx(max(mixes))
    assert bench.equal_cost_bd(["me"], 0.5, fixed, bd)["pairs"] == ["a"]
    table["b"] = {"akima": None, "pchip": 1.0}
    assert bench.equal_cost_bd(["me"], 1.5, fixed, bd) is None


# ---- a selector with a bias per quality level ---------------------------------------------------------------------

def test_per_level_selector_adds_the_level_bias_and_checks_levels():
    torch.manual_seed(0)
    sel = WidthSelector((4, 8, 16), levels=3)
    with torch.no_grad():
        sel.level_bias.normal_()
    f = np.random.default_rng(0).normal(size=(4, NUM_FEATURES))
    lv = np.array([0, 2, 1, 2])
    # float64 numpy reference: W f + b + B[level]
    w, b = sel.fc.weight.detach().double().numpy(), sel.fc.bias.detach().double().numpy()
    ref = (f @ w.T + b + sel.level_bias.detach().double().numpy()[lv]).reshape(4, 2, 3)
    assert np.allclose(sel.logits(f, lv).detach().numpy(), ref, atol=1e-5)
    one = sel.logits(f, 1).detach().numpy()  # one level for the batch
    assert np.allclose(one, (f @ w.T + b + sel.level_bias.detach().double().numpy()[1]).reshape(4, 2, 3), atol=1e-5)
    assert torch.equal(sel.select(f, level=lv), torch.tensor((4, 8, 16))[torch.from_numpy(ref.argmax(-1))])
    with pytest.raises(ConfigError, match="level"):
        sel.logits(f)
    with pytest.raises(ConfigError, match="outside"):
        sel.logits(f, 3)
    with pytest.raises(ShapeError, match="levels for 4 frames"):
        sel.logits(f, [0, 1])
    plain = WidthSelector((4, 8, 16))
    assert plain.levels == 0 and plain.level_bias is None
    assert torch.equal(plain.logits(f, lv), plain.logits(f))  # a plain selector ignores levels


def _level_costs(n: int = 240, levels: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Costs whose best pair depends on the level alone (level 0: 8/8, the others 4/4, by 0.3 on average), with
    frame-to-frame noise unrelated to the features."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, NUM_FEATURES))
    lv = np.arange(n) % levels
    c = 1.0 + 0.2 * rng.random((n, 2, 2))
    c[lv == 0, 1, 1] -= 0.3
    c[lv != 0, 0, 0] -= 0.3
    return f, c, lv


def test_fit_per_level_selector_against_brute_force():
    f, c, lv = _level_costs()
    sel = WidthSelector((4, 8), levels=5)  # level 4 has no frames
    out = fit_selector(sel, f, c, levels=lv, l2=1e-2)
    idx = sel.logits(f, lv).argmax(-1).numpy()
    # brute force: each level's best fixed pair, over its frames
    for level in range(4):
        m = lv == level
        i, j = np.unravel_index(c[m].sum(0).argmin(), (2, 2))
        assert (idx[m] == (i, j)).all(), level
        rep = out["per_level"][str(level)]
        assert rep["fixed_pair"] == [(4, 8)[i], (4, 8)[j]] and rep["fixed_cost"] == pytest.approx(c[m, i, j].mean())
        assert rep["selector_cost"] == pytest.approx(c[m, i, j].mean()) and rep["frames"] == int(m.sum())
    per_level = np.mean([c[t, 1, 1] if lv[t] == 0 else c[t, 0, 0] for t in range(len(c))])
    assert out["fixed_per_level_cost"] == pytest.approx(per_level)
    assert out["selector_cost"] == pytest.approx(per_level) and per_level < out["fixed_cost"]
    # the level without frames picks the best fixed pair of all frames (4/4)
    assert sel.select(f[:1], level=4).tolist() == [[4, 4]]
    # a plain selector cannot follow the level (the features carry none of it): at best the fixed pair
    plain = WidthSelector((4, 8))
    p = fit_selector(plain, f, c, l2=1e-2)
    assert p["selector_cost"] >= p["fixed_cost"] - 0.02 and "per_level" not in p
    with pytest.raises(ConfigError, match="levels"):
        fit_selector(WidthSelector((4, 8), levels=4), f, c)
    with pytest.raises(ConfigError, match="outside"):
        fit_selector(WidthSelector((4, 8), levels=3), f, c, levels=lv)


def test_cross_validate_per_level_selector_carries_a_level_rule_over():
    f, c, lv = _level_costs(300)
    groups = np.array(["a", "b", "c"])[np.arange(300) // 100]
    cv = cross_validate((4, 8), f, c, groups, levels=lv, num_levels=4, l2=1e-2)
    for r in cv["groups"]:
        test = groups == r["group"]
        ct, lt = c[test], lv[test]
        bar = np.mean([ct[t, 1, 1] if lt[t] == 0 else ct[t, 0, 0] for t in range(len(ct))])
        assert r["fixed_per_level_cost"] == pytest.approx(bar)
        assert r["selector_cost"] == pytest.approx(bar) and r["beats_fixed"]
    assert cv["beats_fixed_on_every_group"]
    plain = cross_validate((4, 8), f, c, groups, l2=1e-2)
    assert "fixed_per_level_cost" not in plain["mean"]


def test_encoder_reads_the_stream_level_and_decodes_exactly(tmp_path):
    import dataclasses

    from tests.codec_util import TINY

    model = tiny_dynamic_codec(candidates=(4, 8), cfg=dataclasses.replace(TINY, selector_per_level=True))
    assert model.selector.levels == 3 and model.cfg.to_dict()["selector_per_level"] is True
    with torch.no_grad():  # level 1: 8/8, every other level 4/4, whatever the features
        model.selector.fc.weight.zero_()
        model.selector.fc.bias.zero_()
        model.selector.level_bias.copy_(torch.tensor([[5.0, 0, 5, 0], [0, 5.0, 0, 5], [5.0, 0, 5, 0]]))
    path = save_codec(model, tmp_path / "lvl.pt")
    coder = VideoCoder(load_codec(path), analysis_scales=(1.0,))
    video = moving_video(3, 48, 64)
    for level, pair in ((1, (8, 8)), (2, (4, 4))):
        res = coder.compress(video, quality=level, intra_period=2)
        assert {(r.roi_bits, r.non_roi_bits) for r in read_stream(res.stream)[1]} == {pair}
        assert VideoCoder(load_codec(path)).decompress(res.stream).equal(res.reconstruction)
    # weights without the field keep their configuration (and so their identity)
    assert "selector_per_level" not in dataclasses.replace(TINY, candidates=(4, 8)).to_dict()


def test_training_reads_each_sample_level_into_the_selector():
    import dataclasses

    from bitalloc.train.codec import CodecObjective
    from tests.codec_util import TINY

    model = tiny_dynamic_codec(candidates=(4, 8), cfg=dataclasses.replace(TINY, selector_per_level=True)).train()
    clip = torch.rand(2, 2, 6, 32, 32)
    level = torch.tensor([0, 2])
    loss, _ = CodecObjective("all", gamma=0.5).task_loss(model, clip, level)
    loss.backward()
    g = model.selector.level_bias.grad
    # the bias rows of the batch's levels receive gradient, the unused level's none
    assert bool(g[0].abs().sum() > 0) and bool(g[2].abs().sum() > 0) and torch.equal(g[1], torch.zeros_like(g[1]))


def test_cli_fit_selector_per_level(dyn_weights, tmp_path, capsys):
    src = tmp_path / "clip.y4m"
    write_y4m(src, moving_video(3, 48, 64))
    fitted, fj = tmp_path / "lv.pt", tmp_path / "lv.json"
    assert main(["codec", "fit-selector", str(src), "--weights", str(dyn_weights), "--gamma", "0.01", "--levels", "0,2",
                 "--frames", "3", "--analysis-scales", "1", "--per-level", "-o", str(fitted), "--json", str(fj)]) == 0
    assert "best fixed pair of each level" in capsys.readouterr().out
    report = json.loads(fj.read_text())
    assert report["per_level_selector"] and set(report["per_level"]) == {"0", "2"}
    assert [fr["level"] for fr in report["search"]["frames"]] == [0, 0, 0, 2, 2, 2]
    model = load_codec(fitted)
    assert model.cfg.selector_per_level and model.selector.levels == model.cfg.levels
    base = load_codec(dyn_weights)
    for (k, a), (_, b) in zip(base.state_dict().items(), model.state_dict().items()):
        if not k.startswith("selector."):
            assert torch.equal(a, b), k
    out = tmp_path / "lv.bav"
    assert main(["codec", "encode", str(src), "-o", str(out), "-q", "2", "--dynamic", "--weights", str(fitted)]) == 0
    assert main(["codec", "decode", str(out), "-o", str(tmp_path / "lv.y4m"), "--weights", str(fitted)]) == 0
    # a report without each frame's level (made before it was stored): recovered from videos x levels x frames
    for fr in report["search"]["frames"]:
        del fr["level"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(report))
    again = tmp_path / "again.json"
    assert main(["codec", "fit-selector", "--from-search", str(old), "--weights", str(dyn_weights), "--gamma", "0.01",
                 "--per-level", "-o", str(tmp_path / "again.pt"), "--json", str(again)]) == 0
    assert json.loads(again.read_text())["per_level"] == report["per_level"]
    # without --per-level the fit makes a plain selector, even from per-level weights
    assert main(["codec", "fit-selector", "--from-search", str(fj), "--weights", str(fitted), "--gamma", "0.01",
                 "-o", str(tmp_path / "plain.pt")]) == 0
    assert load_codec(tmp_path / "plain.pt").selector.levels == 0
    report["frames_per_video"] = 2  # the order can no longer be recovered
    old.write_text(json.dumps(report))
    capsys.readouterr()
    assert main(["codec", "fit-selector", "--from-search", str(old), "--weights", str(dyn_weights), "--gamma", "0.01",
                 "--per-level", "-o", str(tmp_path / "x.pt")]) == 2
    assert "--per-level" in capsys.readouterr().err


def test_fixed_pair_costs_are_the_fixed_encodes_costs(dyn_weights):
    """Every pair's cost of every frame is that frame's bpp + lambda MSE_YUV (float64 numpy, from the stream's
    payload) in the clip coded at that pair throughout, and its relative Bit-FLOPs there."""
    coder = VideoCoder(load_codec(dyn_weights), analysis_scales=(1.0,))
    video = moving_video(3, 48, 64, seed=5)
    infos = coder.fixed_pair_costs(video, quality=1, intra_period=2)
    assert len(infos) == 3 and all(set(f.pair_costs) == {(4, 4), (4, 8), (8, 4), (8, 8)} for f in infos)
    for pair in ((4, 8), (8, 8)):
        res = coder.compress(video, quality=1, intra_period=2, widths=pair)
        for j, f in enumerate(infos):
            rd, rel = f.pair_costs[pair]
            assert rd == pytest.approx(_objective(coder, video, res, j, 1, 0.0), rel=1e-12)
            own = res.frames[j]
            assert rel == pytest.approx(coder.relative_bit_flops(own.kind, own.latent_mask, *pair))
    # the features are the first pair's encode's, as fit_selector reads them
    first = coder.compress(video, quality=1, intra_period=2, widths=(4, 4))
    assert all(np.array_equal(a.features, b.features) for a, b in zip(infos, first.frames))
    feats, costs = search_costs(infos, (4, 8), 0.5)
    assert costs[2, 1, 0] == pytest.approx(infos[2].pair_costs[(8, 4)][0] + 0.5 * infos[2].pair_costs[(8, 4)][1])
    with pytest.raises(ConfigError, match="dynamic"):
        VideoCoder(tiny_codec(), exact=False).fixed_pair_costs(video, quality=0)


def test_cli_fit_selector_to_fixed_pair_costs(dyn_weights, tmp_path, capsys):
    src = tmp_path / "clip.y4m"
    write_y4m(src, moving_video(3, 48, 64))
    fitted, fj = tmp_path / "fx.pt", tmp_path / "fx.json"
    assert main(["codec", "fit-selector", str(src), "--weights", str(dyn_weights), "--gamma", "0.01", "--levels", "0,2",
                 "--frames", "3", "--analysis-scales", "1", "--costs", "fixed", "--per-level", "-o", str(fitted),
                 "--json", str(fj)]) == 0
    report = json.loads(fj.read_text())
    assert report["costs"] == "fixed" and report["search_gamma"] is None and report["frames"] == 6
    # per level, the selector picks the pair of least summed cost, by brute force over the report's costs
    for level in ("0", "2"):
        rows = [f for f in report["search"]["frames"] if f["level"] == int(level)]
        total = {}
        for f in rows:
            for r, n, rd, rel in f["pair_costs"]:
                total[(r, n)] = total.get((r, n), 0.0) + rd + 0.01 * rel
        assert report["per_level"][level]["fixed_pair"] == list(min(total, key=total.get))
    assert load_codec(fitted).selector.levels == 3
    capsys.readouterr()
    assert main(["codec", "fit-selector", str(src), "--weights", str(dyn_weights), "--gamma", "0.01", "--costs", "fixed",
                 "--lookahead", "1", "-o", str(tmp_path / "x.pt")]) == 2
    assert "--lookahead" in capsys.readouterr().err
    assert main(["codec", "fit-selector", "--from-search", str(fj), "--weights", str(dyn_weights), "--gamma", "0.01",
                 "--costs", "fixed", "-o", str(tmp_path / "y.pt")]) == 2
    assert "--costs fixed" in capsys.readouterr().err
