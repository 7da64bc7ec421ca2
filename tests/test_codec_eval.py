"""`bitalloc codec eval`: codec and x265 curves, BD-rates, cross-process exactness, images against JPEG."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitalloc.cli import main
from bitalloc.codec.metrics import bd_rate
from bitalloc.codec.video_io import write_y4m

from tests.codec_util import moving_video, tiny_weights

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def test_eval_clip_and_images(tmp_path):
    from PIL import Image

    weights = tiny_weights(tmp_path / "tiny.pt")
    clip = write_y4m(tmp_path / "clip.y4m", moving_video(3, 32, 48))
    rng = np.random.default_rng(0)
    for i in range(11):
        (tmp_path / "img" / "c").mkdir(parents=True, exist_ok=True)
        img = (rng.random((64, 80, 3)) * 40 + np.linspace(0, 200, 80)[None, :, None]).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / "img" / "c" / f"{i:02d}.png")
    out = tmp_path / "eval"
    assert main(["codec", "eval", "--clips", str(clip), "--images", str(tmp_path / "img"), "--weights", str(weights),
                 "--qps", "27,37", "--presets", "ultrafast", "--intra-period", "2", "--cross-check", "1",
                 "--levels", "0,2", "--image-crop", "48", "--frames", "3", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    c = res["clips"][0]
    ours = c["curves"]["bitalloc"]
    assert [p["level"] for p in ours] == [0, 2]
    assert all(p["exact"] and p["exact_cross_process"] for p in ours)
    assert all(p["frame_types"] == "IPI" for p in ours)
    x265 = c["curves"]["x265-ultrafast"]
    assert [p["qp"] for p in x265] == [27, 37] and all(p["keyframes"] == [0, 2] for p in x265)
    # the BD-rate in the results is the metrics module's on the stored points
    bd = bd_rate([p["bytes"] for p in x265], [p["psnr_yuv"] for p in x265],
                 [p["bytes"] for p in ours], [p["psnr_yuv"] for p in ours], method="pchip")
    stored = c["bd_rate"]["x265-ultrafast"]["yuv"]["pchip"]
    assert (stored is None and np.isnan(bd)) or stored == pytest.approx(bd)
    assert (out / "rd_clip.png").is_file() and (out / "rd_images.png").is_file()
    img = res["images"]
    assert img["images"] == 2 and set(img["curves"]) == {"bitalloc-intra", "jpeg", "x265-intra"}
