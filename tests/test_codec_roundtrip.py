"""Encoding and decoding are exact: same process, another process with another thread count, odd sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bitalloc.codec.codec import VideoCoder
from bitalloc.codec.bitstream import BitstreamError, read_stream
from bitalloc.codec.metrics import psnr_yuv
from bitalloc.codec.precision import load_codec, model_id
from bitalloc.errors import ConfigError

from tests.codec_util import compress_with_threads, moving_video, tiny_codec, tiny_weights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return tiny_weights(tmp_path_factory.mktemp("codec") / "tiny.pt")


def test_roundtrip_exact_with_frame_types_and_odd_size(weights):
    coder = VideoCoder(load_codec(weights))
    video = moving_video(6, 38, 50)  # odd chroma, not a multiple of 16
    res = coder.compress(video, quality=1, intra_period=4)
    assert "".join(f.kind for f in res.frames) == "IPPPIP"
    assert res.bytes == len(res.stream) == sum(f.bytes for f in res.frames) + 42
    dec = coder.decompress(res.stream)
    assert dec.equal(res.reconstruction)
    assert (dec.height, dec.width) == (38, 50) and len(dec) == 6
    header, records = read_stream(res.stream)
    assert header.intra_period == 4 and header.quality == 1 and header.model_id == model_id(coder.model)
    assert all(r.roi_bits == 8 and r.non_roi_bits == 8 for r in records)
    # single intra frame, first frames only
    res1 = coder.compress(video, quality=0, intra_period=-1)
    assert "".join(f.kind for f in res1.frames) == "IPPPPP"
    first = coder.decompress(res1.stream, frames=3)
    assert first.equal(res1.reconstruction[:3])


def test_reconstruction_psnr_reported_per_frame(weights):
    coder = VideoCoder(load_codec(weights))
    video = moving_video(2, 32, 32)
    res = coder.compress(video, quality=2)
    per = psnr_yuv(video, res.reconstruction)["per_frame"]["psnr_yuv"]
    assert [f.psnr for f in res.frames] == pytest.approx(per)


def test_decoding_in_another_process_with_other_threads_is_exact(weights, tmp_path):
    coder = VideoCoder(load_codec(weights))
    video = moving_video(4, 48, 64)
    res = compress_with_threads(coder, video, quality=2, intra_period=32)
    stream = tmp_path / "s.bav"
    stream.write_bytes(res.stream)
    out = tmp_path / "rec.npz"
    code = ("import sys, numpy as np, torch; torch.set_num_threads(int(sys.argv[3]));"
            "from bitalloc.codec.codec import VideoCoder; from bitalloc.codec.precision import load_codec;"
            "f = VideoCoder(load_codec(sys.argv[1])).decompress(open(sys.argv[2], 'rb').read());"
            "np.savez(sys.argv[4], y=f.y, u=f.u, v=f.v)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", code, str(weights), str(stream), "1", str(out)], check=True, env=env)
    got = np.load(out)
    assert np.array_equal(got["y"], res.reconstruction.y)
    assert np.array_equal(got["u"], res.reconstruction.u)
    assert np.array_equal(got["v"], res.reconstruction.v)


def test_stream_from_another_model_is_refused(weights):
    coder = VideoCoder(load_codec(weights))
    other = VideoCoder(tiny_codec(seed=1))
    res = other.compress(moving_video(2, 32, 32), quality=0)
    with pytest.raises(BitstreamError, match="another codec model"):
        coder.decompress(res.stream)


def test_bad_settings_are_errors(weights):
    coder = VideoCoder(load_codec(weights))
    video = moving_video(2, 32, 32)
    with pytest.raises(ConfigError, match="quality 7 is out of range"):
        coder.compress(video, quality=7)
    with pytest.raises(ConfigError, match="intra period 0"):
        coder.compress(video, quality=0, intra_period=0)


def test_unquantized_codec_is_refused():
    from bitalloc.codec.model import VideoCodec

    from tests.codec_util import TINY

    with pytest.raises(ConfigError, match="not quantized"):
        VideoCoder(VideoCodec(TINY))
