"""`bitalloc codec train`: every stage runs through the training loop and the qat stage ships usable weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bitalloc.cli import main
from bitalloc.codec.video_io import write_y4m

from tests.codec_util import moving_video

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

SIZES = json.dumps({"n": 16, "nz": 8, "motion_n": 8, "motion_nz": 8,
                    "lambdas": [0.005, 0.05]})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("codec_train")
    video = write_y4m(d / "clip.y4m", moving_video(6, 48, 64))
    rng = np.random.default_rng(0)
    for i in range(12):
        (d / "images" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        img = (rng.random((40, 52, 3)) * 64 + np.linspace(0, 190, 52)[None, :, None]).astype(np.uint8)
        Image.fromarray(img).save(d / "images" / f"c{i % 2}" / f"{i:02d}.png")
    return d, video


def _train(*args: str) -> int:
    return main(["codec", "train", "--batch-size", "2", "--crop", "32", "--samples-per-epoch", "4",
                 "--warmup-steps", "0", "--progress", "off", *args])


def test_all_stages_then_encode_with_the_shipped_weights(data, tmp_path):
    d, video = data
    intra, inter, joint, qat, ship = (tmp_path / f"{n}.pt" for n in ("intra", "inter", "joint", "qat", "ship"))
    assert _train("--stage", "intra", "--videos", str(video), "--images", str(d / "images"), "--steps", "3",
                  "--codec-config", SIZES, "--out", str(intra)) == 0
    assert _train("--stage", "inter", "--videos", str(video), "--steps", "2", "--init", str(intra),
                  "--out", str(inter)) == 0
    # images (40x52) join clips of several frames as synthetic pans (crop 32 + pan 8 fits)
    assert _train("--stage", "joint", "--videos", str(video), "--images", str(d / "images"), "--image-share", "0.5",
                  "--steps", "2", "--init", str(intra), "--init-inter", str(inter), "--out", str(joint)) == 0
    assert _train("--stage", "qat", "--videos", str(video), "--steps", "2", "--init", str(joint),
                  "--out", str(qat), "--ship", str(ship)) == 0
    log = [json.loads(line) for line in Path(str(qat) + ".jsonl").read_text().splitlines()]
    assert log[-1]["event"] == "end" and log[-1]["steps"] == 2
    assert "bpp" in log[1]["extra"] and "psnr" in log[1]["extra"]
    out, js = tmp_path / "a.bav", tmp_path / "a.json"
    assert main(["codec", "encode", str(video), "-o", str(out), "-q", "1", "--weights", str(ship),
                 "--json", str(js)]) == 0
    assert json.loads(js.read_text())["exact"] is True
    # ptq: the same networks on calibrated fixed grids, no training; frozen, shipped, and coding exactly
    ptq_ship = tmp_path / "ptq_ship.pt"
    assert _train("--stage", "ptq", "--videos", str(video), "--init", str(joint), "--ship", str(ptq_ship)) == 0
    assert main(["codec", "encode", str(video), "-o", str(tmp_path / "p.bav"), "-q", "1", "--weights", str(ptq_ship),
                 "--json", str(js), "--overwrite"]) == 0
    assert json.loads(js.read_text())["exact"] is True
    # encoder: the analyses trained against the shipped decoder; everything the decoder reads is unchanged
    from bitalloc.codec.codec import VideoCoder
    from bitalloc.codec.precision import coders, load_codec

    enc_ship = tmp_path / "enc_ship.pt"
    assert _train("--stage", "encoder", "--videos", str(video), "--images", str(d / "images"), "--steps", "2",
                  "--init", str(ptq_ship), "--out", str(tmp_path / "enc.pt"), "--ship", str(enc_ship)) == 0
    before, after = load_codec(ptq_ship), load_codec(enc_ship)
    changed = {k for k, v in before.state_dict().items() if not torch.equal(v, after.state_dict()[k])}
    assert changed and all(".analysis." in k or ".hyper_analysis." in k for k in changed)
    assert any(".hyper_analysis." in k for k in changed) and any("inter." in k for k in changed)
    for c in coders(after).values():
        assert c.proxy == "noise"  # the training proxy is not part of the weights
    res = VideoCoder(after).compress(moving_video(3, 32, 32), quality=1)
    # the old decoder decodes the new encoder's frames exactly (only the model id in the header differs)
    from bitalloc.codec.bitstream import read_stream, write_stream

    header, records = read_stream(res.stream)
    header = dataclasses.replace(header, model_id=VideoCoder(before).id)
    assert VideoCoder(before).decompress(write_stream(header, records)).equal(res.reconstruction)
    assert _train("--stage", "encoder", "--videos", str(video), "--steps", "1", "--init", str(joint),
                  "--out", str(tmp_path / "enc2.pt"), "--ship", str(tmp_path / "e2.pt")) == 2
    # the inter stage trained only the inter codec
    from bitalloc.train.checkpoint import load_model_checkpoint

    a, b = load_model_checkpoint(intra), load_model_checkpoint(inter)
    assert all(torch.equal(x, y) for x, y in zip(a.intra.parameters(), b.intra.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.inter.parameters(), b.inter.parameters()))


def test_stage_options_are_checked(data, tmp_path, capsys):
    d, video = data
    assert _train("--stage", "qat", "--videos", str(video), "--out", str(tmp_path / "q.pt")) == 2
    assert "--ship" in capsys.readouterr().err
    assert _train("--stage", "inter", "--out", str(tmp_path / "i.pt")) == 2
    assert "--videos" in capsys.readouterr().err
    assert _train("--stage", "inter", "--videos", str(video)) == 2
    assert "--out" in capsys.readouterr().err
    assert _train("--stage", "ptq", "--videos", str(video), "--init", str(tmp_path / "j.pt"), "--steps", "3",
                  "--ship", str(tmp_path / "s.pt")) == 2
    assert "drop --steps" in capsys.readouterr().err
    assert _train("--stage", "intra", "--videos", str(video), "--frames", "2", "--out", str(tmp_path / "x.pt")) == 2
    for bad, message in ((["--image-pan", "3"], "even number"), (["--image-pan", "0"], "--image-pan > 0")):
        assert _train("--stage", "inter", "--videos", str(video), "--images", str(d / "images"), *bad,
                      "--out", str(tmp_path / "p.pt")) == 2
        assert message in capsys.readouterr().err
    assert _train("--stage", "ptq", "--videos", str(video), "--images", str(d / "images"), "--init",
                  str(tmp_path / "j.pt"), "--ship", str(tmp_path / "s.pt")) == 2
    assert "drop --images" in capsys.readouterr().err
    assert _train("--stage", "intra", "--videos", str(video), "--codec-config", "{bad", "--out",
                  str(tmp_path / "y.pt")) == 2
