"""Training data of the codec: random crops of consecutive frames from videos, and crops of images.

Sources are :class:`~bitalloc.codec.frames.YUVFrames` (videos as read by :func:`bitalloc.codec.video_io.read_video`;
images converted from RGB with the codec's one colour convention). Each item is ``(clip, level)``: a clip
[T, 6, crop/2, crop/2] of packed YUV 4:2:0 in [0, 1] (T consecutive frames, same crop window, random horizontal
flip) and a random quality level, drawn from torch's RNG (seeded per item by the training loop, so data order
and crops are reproducible and identical under torchrun).

Images are held out for evaluation by their index in sorted order: every ``HOLD_OUT_EVERY``-th image
(i % 10 == 0) is never trained on (:func:`image_split`).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from bitalloc.codec.frames import YUVFrames, rgb_to_yuv420
from bitalloc.codec.networks import pack_yuv
from bitalloc.errors import DataError

HOLD_OUT_EVERY = 10


def image_split(n: int, part: str) -> list[int]:
    """Indices of the images of ``part`` ("train": i % 10 != 0, "test": i % 10 == 0) among n sorted images."""
    if part == "train":
        return [i for i in range(n) if i % HOLD_OUT_EVERY != 0]
    if part == "test":
        return [i for i in range(n) if i % HOLD_OUT_EVERY == 0]
    raise ValueError(f"part={part!r}: use 'train' or 'test'")


def load_images(path: str | os.PathLike, part: str = "train", *, limit: int | None = None,
                min_size: int = 0) -> list[YUVFrames]:
    """Images of an ImageFolder folder / zip (e.g. the ImageNet sample) as one-frame YUVFrames, the ``part``
    of :func:`image_split`; even-sized (a trailing odd row / column is dropped)."""
    from bitalloc.data.imagefolder import ImageFolder

    folder = ImageFolder(path, split=None)
    out: list[YUVFrames] = []
    for i in image_split(len(folder), part)[:limit]:
        img, _ = folder.load(i)
        rgb = np.asarray(img.convert("RGB"))
        h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
        if min(h, w) < min_size:
            continue
        out.append(rgb_to_yuv420(rgb[None, :h, :w]))
    if not out:
        raise DataError(f"no images found in {path} ({part} part); pass a folder or zip of images")
    return out


def frames_to_tensor(frames: YUVFrames, start: int = 0, count: int | None = None) -> Tensor:
    """Packed frames [T, 6, H/2, W/2] in [0, 1] (H, W even) from YUVFrames."""
    count = len(frames) - start if count is None else count
    y = torch.from_numpy(frames.y[start:start + count]).float() / 255.0
    u = torch.from_numpy(frames.u[start:start + count]).float() / 255.0
    v = torch.from_numpy(frames.v[start:start + count]).float() / 255.0
    return pack_yuv(y, u, v)


class ClipDataset(Dataset):
    """Random (crop x crop)-pixel windows of ``frames`` consecutive frames, with a random quality level.

    ``sources``: YUVFrames (one-frame sources are images and serve only ``frames == 1``); a source is drawn with
    probability proportional to its number of usable windows times its area (so every pixel is about equally
    likely), except that one-frame sources (images) as a group get ``image_share`` of the samples when videos are
    there too (default one half: the video sources of the reference training set have 6x the images' area and are
    smoother, already compressed content; the intra codec is evaluated on images too); ``samples``: items per
    epoch; ``levels``: quality levels drawn uniformly.

    ``pan`` P > 0 (with ``frames`` > 1): images serve multi-frame clips too, as a synthetic camera pan: one
    velocity (dy, dx) per clip, even integers drawn uniformly from [-P, P] luma pixels per frame, and frame t the
    window shifted by t (dy, dx) inside the image (so every frame is real image content and the motion between
    frames is that translation, in whole chroma pixels). Images need crop + P (frames - 1) pixels on each side.
    """

    def __init__(self, sources: Sequence[YUVFrames], *, crop: int = 128, frames: int = 1, samples: int = 4096,
                 levels: int = 8, image_share: float | None = 0.5, pan: int = 0):
        if crop % 16:
            raise ValueError(f"crop={crop} must be a multiple of 16")
        if pan < 0:
            raise ValueError(f"pan={pan} must be >= 0 (pixels per frame)")
        self.pan = pan if frames > 1 else 0
        reach = crop + self.pan * (frames - 1)  # the pixels a panned clip of an image spans on each side

        def fits(s: YUVFrames) -> bool:
            if len(s) == 1 and self.pan:
                return s.height >= reach and s.width >= reach
            return len(s) >= frames and s.height >= crop and s.width >= crop

        usable = [s for s in sources if fits(s)]
        if not usable:
            raise DataError(f"no source has {frames} frames of at least {crop}x{crop} pixels; lower --crop")
        self.sources = usable
        self.crop, self.frames, self.samples, self.levels = crop, frames, samples, levels
        w = np.array([(max(len(s) - frames, 0) + 1) * s.height * s.width for s in usable], dtype=np.float64)
        images = np.array([len(s) == 1 for s in usable])
        if image_share is not None and images.any() and not images.all():
            # images (one-frame sources) get image_share of the samples, videos the rest (by area within each)
            w[images] *= image_share / w[images].sum()
            w[~images] *= (1 - image_share) / w[~images].sum()
        self.weights = torch.tensor(w / w.sum())

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        s = self.sources[int(torch.multinomial(self.weights, 1))]
        if len(s) == 1 and self.frames > 1:
            clip = self._panned(s)
        else:
            t0 = int(torch.randint(0, len(s) - self.frames + 1, ()))
            top, left = self._start(s.height), self._start(s.width)
            clip = self._windows(s, [(t0 + t, top, left) for t in range(self.frames)])
        if bool(torch.rand(()) < 0.5):
            clip = pack_yuv(*(p.flip(-1) for p in _unpack(clip)))
        level = torch.randint(0, self.levels, ())
        return clip, level

    def _windows(self, s: YUVFrames, where: Sequence[tuple[int, int, int]]) -> Tensor:
        """Packed [T, 6, crop/2, crop/2] clip of the windows (frame, top, left) of ``s`` (top, left even)."""
        c, hc = self.crop, self.crop // 2
        y = np.stack([s.y[t, top:top + c, left:left + c] for t, top, left in where])
        u = np.stack([s.u[t, top // 2:top // 2 + hc, left // 2:left // 2 + hc] for t, top, left in where])
        v = np.stack([s.v[t, top // 2:top // 2 + hc, left // 2:left // 2 + hc] for t, top, left in where])
        return pack_yuv(*(torch.from_numpy(p.astype(np.float32)) / 255.0 for p in (y, u, v)))

    def _start(self, size: int, d: int = 0) -> int:
        """A random even offset of the first window along an axis of ``size`` pixels such that every window of
        the clip, moved by ``d`` pixels per frame (0: a video clip), stays inside."""
        span = self.frames - 1
        lo, hi = max(0, -d * span), size - self.crop - max(0, d * span)
        return lo + int(torch.randint(0, (hi - lo) // 2 + 1, ())) * 2

    def _panned(self, s: YUVFrames) -> Tensor:
        """A synthetic pan over image ``s``: frame t is the window at (top + t dy, left + t dx)."""
        half = self.pan // 2
        dy, dx = (int(torch.randint(-half, half + 1, ())) * 2 for _ in range(2))
        top, left = self._start(s.height, dy), self._start(s.width, dx)
        return self._windows(s, [(0, top + t * dy, left + t * dx) for t in range(self.frames)])


def _unpack(clip: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    from bitalloc.codec.networks import unpack_yuv

    return unpack_yuv(clip)
