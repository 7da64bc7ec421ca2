"""`bitalloc codec encode / decode / info` on a tiny generated video with tiny weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bitalloc.cli import main
from bitalloc.codec.video_io import read_video, write_y4m

from tests.codec_util import moving_video, tiny_weights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("codec_cli")
    weights = tiny_weights(d / "tiny.pt")
    video = moving_video(5, 36, 44)
    src = write_y4m(d / "src.y4m", video)
    return d, weights, src, video


def test_encode_decode_info(setup, tmp_path, capsys):
    d, weights, src, video = setup
    out, js, rec = tmp_path / "a.bav", tmp_path / "a.json", tmp_path / "rec_enc.y4m"
    assert main(["codec", "encode", str(src), "-o", str(out), "--quality", "1", "--intra-period", "3",
                 "--weights", str(weights), "--json", str(js), "--reconstruction", str(rec)]) == 0
    s = json.loads(js.read_text())
    assert s["exact"] is True and s["frames"] == 5 and s["bytes"] == out.stat().st_size
    assert s["frame_types"] == "IPPIP"
    assert s["bpp"] == pytest.approx(8 * s["bytes"] / (5 * 36 * 44))
    assert s["kbps"] == pytest.approx(8 * s["bytes"] / 5 * 25 / 1000)
    assert "PSNR YUV" in capsys.readouterr().out
    # decode to y4m, lossless mkv and PNG frames: all equal to the encoder's reconstruction
    enc_rec = read_video(rec)
    for target in ("rec.y4m", "rec.mkv"):
        assert main(["codec", "decode", str(out), "-o", str(tmp_path / target), "--weights", str(weights),
                     "--reference", str(src), "--json", str(tmp_path / f"{target}.json")]) == 0
        assert read_video(tmp_path / target).equal(enc_rec)
        dj = json.loads((tmp_path / f"{target}.json").read_text())
        assert dj["psnr_yuv"] == pytest.approx(s["psnr_yuv"])
    assert main(["codec", "decode", str(out), "-o", str(tmp_path / "pngs"), "--weights", str(weights),
                 "--frames", "2"]) == 0
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 2
    assert main(["codec", "info", str(out), "--json", str(tmp_path / "info.json")]) == 0
    info = json.loads((tmp_path / "info.json").read_text())
    assert [r["type"] for r in info["frame_records"]] == list("IPPIP")
    assert all(r["roi_bits"] == 8 for r in info["frame_records"])


def test_errors_are_one_line_exit_2(setup, tmp_path, capsys):
    d, weights, src, video = setup
    out = tmp_path / "a.bav"
    assert main(["codec", "encode", str(tmp_path / "missing.mp4"), "-o", str(out), "-q", "0",
                 "--weights", str(weights)]) == 2
    assert main(["codec", "encode", str(src), "-o", str(out), "-q", "0", "--weights", str(weights)]) == 0
    assert main(["codec", "encode", str(src), "-o", str(out), "-q", "0", "--weights", str(weights)]) == 2
    assert "already exists" in capsys.readouterr().err
    data = bytearray(out.read_bytes())
    data[-10] ^= 0x40
    bad = tmp_path / "bad.bav"
    bad.write_bytes(bytes(data))
    assert main(["codec", "decode", str(bad), "-o", str(tmp_path / "x.y4m"), "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert "frame 4 is corrupted" in err and not (tmp_path / "x.y4m").exists()
    assert main(["codec", "decode", str(out), "-o", str(tmp_path / "x.avi"), "--weights", str(weights)]) == 2
    assert "unsupported extension" in capsys.readouterr().err
    assert main(["codec", "encode", str(src), "-o", str(tmp_path / "b.bav"), "-q", "9", "--weights", str(weights)]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["codec", "decode", str(out), "-o", str(tmp_path / "y.y4m"), "--weights", str(tmp_path / "nope.pt")]) == 2
