"""``bitalloc demo``: the direction of each part's numbers (not their values), its files, its errors.

Parts ptq and budget need Debian's Fashion-MNIST (skipped with a reason when it is absent) and run on a LeNet-5
trained for 150 steps at lr 3e-3 (86% top-1; after 60 steps, 77%, min-max still holds at W2A4), placed where the
demo caches its model, and 500 test images; part codec runs on tiny untrained codecs written here
(tests/codec_util.py), never on shipped weights.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bitalloc.cli import main
from tests.test_cli import FASHION, needs_fashion, run

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lenet_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "lenet5.pt"
    with _one_thread():
        code = main(["train", "--model", "lenet5", "--dataset", "fashion-mnist", "--data", str(FASHION), "--steps",
                     "150", "--batch-size", "128", "--lr", "3e-3", "--out", str(out), "--progress", "off"])
    assert code == 0 and out.exists()
    return out


def _run_part(part: str, checkpoint: Path, tmp_path: Path, capsys) -> tuple[dict, str, Path]:
    """``bitalloc demo --part PART`` on 500 test images with ``checkpoint`` as the demo's cached model (no
    training here); returns the part's JSON, the printed text and the output folder."""
    out = tmp_path / "demo"
    out.mkdir()
    shutil.copy(checkpoint, out / "lenet5-fashion-mnist.pt")
    code, stdout, stderr = run(["demo", "--part", part, "--data", str(FASHION), "--out", str(out),
                                "--eval-images", "500"], capsys)
    assert code == 0, stderr
    return json.loads((out / f"{part}.json").read_text()), stdout, out


@needs_fashion
@pytest.mark.needs_fashion_mnist
def test_ptq_part_full_pipeline_beats_minmax_where_the_demo_says(lenet_checkpoint, tmp_path, capsys):
    res, stdout, out = _run_part("ptq", lenet_checkpoint, tmp_path, capsys)
    assert res["eval_images"] == 500 and "(500 test images" in res["sentence"]
    by = {w["width"]: w for w in res["widths"]}
    # W2A4: every layer's weights at 2 bits; min-max falls apart, the full pipeline (GPTQ rounding) holds
    assert by["W2A4"]["full_top1"] > by["W2A4"]["minmax_top1"] + 2  # measured: 84.2 against 79.0
    assert by["W4A2"]["full_top1"] > by["W4A2"]["minmax_top1"]  # measured: 85.4 against 83.2 (clipping)
    for w in res["widths"]:  # the sentence says what the numbers say
        holds = w["full_top1"] > w["minmax_top1"]
        assert (f"{w['width']} naive min-max gets {w['minmax_top1']:.1f}% and the full pipeline "
                f"{'keeps' if holds else 'does not beat'}") in res["sentence"]
    assert res["sentence"] in stdout
    runs = {r["name"]: r for r in res["runs"]}
    assert len(runs) == 10 and {r["relative_bops"] for r in res["runs"] if r["width"] == "W2A4"} == {2 * 4 / 1024}
    for r in res["runs"]:  # every layer, first and last too, at the width
        assert all(l["w_bits"] == int(r["width"][1]) for l in r["layers"] if l.get("status") == "quantized")
    for name in ("ptq_stages.png", "ptq_bitmap.png"):
        assert (out / name).stat().st_size > 1000
    summary = json.loads((out / "demo.json").read_text())
    assert list(summary["parts"]) == ["ptq"]


@needs_fashion
@pytest.mark.needs_fashion_mnist
def test_budget_part_search_not_worse_than_uniform_at_equal_budget(lenet_checkpoint, tmp_path, capsys):
    res, stdout, out = _run_part("budget", lenet_checkpoint, tmp_path, capsys)
    u, s = res["uniform"], res["searched"]
    assert s["relative_bops"] <= u["relative_bops"] * (1 + 1e-9)  # the same budget (the search may spend less)
    assert u["relative_bops"] == pytest.approx(2 * 4 / 1024)
    assert s["top1"] >= u["top1"]
    assert set(u["widths"].values()) == {"W2A4"} and len(set(s["widths"].values())) > 1  # really per layer
    # the search's widths are the ones quantized and costed
    assert s["widths"] == {l["name"]: l["candidate"] for l in res["search"]["layers"]}
    assert res["sentence"] in stdout and f"{s['top1']:.1f}% against {u['top1']:.1f}%" in res["sentence"]
    for name in ("budget_sensitivity.png", "budget_bitmap.png"):
        assert (out / name).stat().st_size > 1000


# ---- part codec ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_codec_files(tmp_path_factory):
    pytest.importorskip("constriction")
    pytest.importorskip("cv2")
    from bitalloc.codec.precision import save_codec
    from tests.codec_util import tiny_dynamic_codec, tiny_weights

    d = tmp_path_factory.mktemp("codec")
    with _one_thread():
        return tiny_weights(d / "static.pt"), save_codec(tiny_dynamic_codec(), d / "dynamic.pt")


def test_synthetic_clip_is_deterministic_and_moves():
    from bitalloc.cli.demo_codec import synthetic_clip

    a, b = synthetic_clip(4, seed=3), synthetic_clip(4, seed=3)
    assert a.equal(b) and (len(a), a.height, a.width) == (4, 144, 176)
    assert not synthetic_clip(4, seed=4).equal(a)
    diff = np.abs(a.y[1:].astype(int) - a.y[:-1].astype(int))
    assert (diff > 40).mean() > 0.005  # shapes move from frame to frame, not just noise (sigma 1.5)


def test_codec_part_rates_exactness_and_widths(tiny_codec_files, tmp_path, capsys):
    from bitalloc.codec.bitstream import read_stream  # noqa: F401  (the codec extra is importable)

    static, dynamic = tiny_codec_files
    out = tmp_path / "demo"
    code, stdout, stderr = run(["demo", "--part", "codec", "--codec-weights", str(static), "--dynamic-weights",
                                str(dynamic), "--frames", "3", "--out", str(out)], capsys)
    assert code == 0, stderr
    res = json.loads((out / "codec.json").read_text())
    f, s, d = res["codecs"]
    for c in (f, s, d):
        assert c["exact"] and c["bytes"] > 0
        assert c["bpp"] == pytest.approx(8 * c["bytes"] / (3 * 176 * 144))
        assert c["kbps"] == pytest.approx(8 * c["bytes"] / 1000 * 25 / 3)
        assert 10 < c["psnr_yuv"] < 100 and [f["type"] for f in c["frames"]] == ["I", "P", "P"]
    assert s["widths"] == {"8/8": 3} and s["relative_to_8bit_codec"] == 1.0
    # FP32 (the 8-bit codec's weights in float networks): float MACs count once, as 8-bit ones; 16-bit layers 4 x
    assert f["widths"] == {"32/32": 3} and 0 < f["relative_to_8bit_codec"] < 1
    # the tiny dynamic codec's selector gives the ROI the widest candidate and the rest the narrowest
    assert all((f["roi_bits"], f["non_roi_bits"]) == (16, 4) for f in d["frames"] if 0 < f["roi_fraction"] < 1)
    assert all(0 <= f["roi_fraction"] <= 1 for f in d["frames"])
    assert res["sentence"] in stdout and "decode exactly" in res["sentence"]
    assert (out / "codec_frame.png").stat().st_size > 1000


def test_bit_flops_match_the_cost_report(tiny_codec_files):
    """Per frame Bit-FLOPs = the Bi-Real OPs of every network of the frame's type (cost_report, an independent
    path: no masks, no region split) at one width; with two widths, the ROI-share-weighted mix per layer."""
    import bitalloc
    from bitalloc.cli.demo_codec import bit_flops
    from bitalloc.codec.precision import ALL_PARTS, coders, load_codec, network_input
    from bitalloc.model.region import region_precision, region_quantizers

    static, dynamic = (load_codec(p) for p in tiny_codec_files)
    h, w = 64, 128
    ones, zeros = np.ones((2, h, w), dtype=bool), np.zeros((2, h, w), dtype=bool)

    def reference(model, names, bits=None):
        total = 0.0
        for name in names:
            coder = coders(model)[name]
            for part in ALL_PARTS:
                net, x = getattr(coder, part), network_input(coder, part, h, w)
                if bits is None or not list(region_quantizers(net)):  # fixed widths (e.g. the hyper analysis)
                    total += bitalloc.cost_report(net, x).bireal_ops
                else:
                    with region_precision(net, torch.ones(1, 1, 1, 1, dtype=torch.bool), bits, bits):
                        total += bitalloc.cost_report(net, x).bireal_ops
        return total

    got = bit_flops(static, ["I", "P"], ones, [8, 8], [8, 8])
    assert got == pytest.approx([reference(static, ["intra"]), reference(static, ["motion", "residual"])], rel=1e-9)
    for mask, bits in ((ones, 16), (zeros, 4)):  # all ROI at 16 bits / no ROI: the rest at 4 bits
        got = bit_flops(dynamic, ["I", "P"], mask, [16, 16], [4, 4])
        want = [reference(dynamic, ["intra"], bits), reference(dynamic, ["motion", "residual"], bits)]
        assert got == pytest.approx(want, rel=1e-9)
    half = np.zeros((1, h, w), dtype=bool)
    half[:, :, : w // 2] = True  # left half ROI: 16-pixel blocks, so every resolution splits it in halves
    mixed = bit_flops(dynamic, ["I"], half, [16], [4])[0]
    lo, hi = reference(dynamic, ["intra"], 4), reference(dynamic, ["intra"], 16)
    assert lo < mixed < hi


def test_missing_codec_weights_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import bitalloc.codec.weights as weights

    missing = tmp_path / "nothing.pt"
    code, _, stderr = run(["demo", "--part", "codec", "--codec-weights", str(missing), "--out", str(tmp_path / "o")],
                          capsys)
    assert code == 2 and str(missing) in stderr and "--codec-weights" in stderr and len(stderr.strip().splitlines()) == 1
    monkeypatch.setattr(weights, "SHIPPED", tmp_path / "shipped.pt")  # the shipped files, absent
    monkeypatch.setattr(weights, "SHIPPED_DYNAMIC", tmp_path / "shipped-dynamic.pt")
    code, _, stderr = run(["demo", "--out", str(tmp_path / "o")], capsys)  # all parts: fails before the first
    assert code == 2 and "shipped.pt" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_swapped_codec_weights_are_an_error(tiny_codec_files, tmp_path, capsys):
    static, dynamic = tiny_codec_files
    code, _, stderr = run(["demo", "--part", "codec", "--codec-weights", str(dynamic), "--dynamic-weights",
                           str(static), "--frames", "2", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "not a fixed-precision" in stderr and "--codec-weights" in stderr


@pytest.mark.parametrize("args, option", [(["--part", "ptq", "--frames", "3"], "--frames"),
                                          (["--part", "codec", "--eval-images", "100"], "--eval-images"),
                                          (["--part", "ptq", "--calib", "0"], "--calib")])
def test_options_the_run_would_ignore_are_errors(args, option, tmp_path, capsys):
    code, _, stderr = run(["demo", *args, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and option in stderr and len(stderr.strip().splitlines()) == 1
