"""The codec's training clips (bitalloc.codec.dataset.ClipDataset): windows of videos, and synthetic pans over
images for clips of several frames, checked by locating every frame's window in its source by brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitalloc.codec.dataset import ClipDataset, _unpack
from bitalloc.codec.frames import YUVFrames
from bitalloc.errors import DataError


def _image(h: int, w: int, seed: int) -> YUVFrames:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 256, (1, h, w), dtype=np.uint8)
    u = rng.integers(0, 256, (1, h // 2, w // 2), dtype=np.uint8)
    v = rng.integers(0, 256, (1, h // 2, w // 2), dtype=np.uint8)
    return YUVFrames(y, u, v, fps=25.0)


def _locate(plane: np.ndarray, window: np.ndarray) -> tuple[int, int]:
    """The one (top, left) where ``window`` sits in ``plane`` (random content: unique), by exhaustive search."""
    c = window.shape[0]
    hits = [(i, j) for i in range(plane.shape[0] - c + 1) for j in range(plane.shape[1] - c + 1)
            if np.array_equal(plane[i:i + c, j:j + c], window)]
    assert len(hits) == 1, hits
    return hits[0]


def _frames(clip: torch.Tensor, flipped: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    y, u, _ = (np.rint(p.numpy() * 255.0).astype(np.uint8) for p in _unpack(clip))
    if flipped:
        y, u = y[..., ::-1], u[..., ::-1]
    return [(y[t], u[t]) for t in range(y.shape[0])]


def test_panned_image_clips_are_translations_inside_the_image():
    img = _image(56, 64, 0)
    torch.manual_seed(0)
    data = ClipDataset([img], crop=16, frames=3, samples=24, levels=4, pan=8)
    velocities = set()
    for i in range(24):
        clip, level = data[i]
        assert clip.shape == (3, 6, 8, 8) and 0 <= int(level) < 4
        for flipped in (False, True):
            y0 = _frames(clip, flipped)[0][0]
            if any(np.array_equal(img.y[0, a:a + 16, b:b + 16], y0) for a in range(41) for b in range(49)):
                break
        where = []
        for y, u in _frames(clip, flipped):
            top, left = _locate(img.y[0], y)
            assert top % 2 == 0 and left % 2 == 0
            assert np.array_equal(img.u[0, top // 2:top // 2 + 8, left // 2:left // 2 + 8], u)  # chroma aligned
            where.append((top, left))
        (t0, l0), (t1, l1), (t2, l2) = where
        dy, dx = t1 - t0, l1 - l0
        assert (t2 - t1, l2 - l1) == (dy, dx)  # one velocity per clip
        assert abs(dy) <= 8 and abs(dx) <= 8 and dy % 2 == 0 and dx % 2 == 0
        velocities.add((dy, dx))
    assert len(velocities) > 5  # velocities are drawn, not fixed


def test_images_serve_multi_frame_clips_only_with_a_pan():
    still = _image(32, 32, 1)
    video = YUVFrames(*(np.concatenate([p] * 4) for p in (still.y, still.u, still.v)), fps=25.0)
    img = _image(40, 40, 2)
    with pytest.raises(DataError, match="frames"):
        ClipDataset([img], crop=16, frames=2)
    assert len(ClipDataset([video, img], crop=16, frames=2).sources) == 1
    assert len(ClipDataset([video, img], crop=16, frames=2, pan=8).sources) == 2
    # an image too small for crop + pan (frames - 1) on a side is left out
    assert len(ClipDataset([video, _image(30, 40, 3)], crop=16, frames=2, pan=16).sources) == 1
    with pytest.raises(ValueError, match="pan"):
        ClipDataset([video], crop=16, frames=2, pan=-2)
    # the share of image clips follows image_share
    torch.manual_seed(1)
    data = ClipDataset([video, img], crop=16, frames=2, pan=8, image_share=0.25)
    assert float(data.weights[1]) == pytest.approx(0.25)
