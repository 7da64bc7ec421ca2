"""Video frames as 8-bit YUV 4:2:0 planes, and the one RGB <-> YUV conversion bitalloc uses.

:class:`YUVFrames` holds ``y`` (uint8 [T, H, W]) and ``u``, ``v`` (uint8 [T, (H+1)//2, (W+1)//2]): the
planes of FFmpeg's ``yuv420p``, any height and width (odd ones included), and the frame rate.

**The conversion** (used for RGB inputs, RGB outputs, and RGB PSNR of source and decoded frames alike) is
BT.601 (ITU-R BT.601-7, Kr = 0.299, Kb = 0.114, Kg = 1 - Kr - Kb) in limited ("TV", "MPEG") range, the usual
convention of ``yuv420p`` video. With R, G, B in [0, 255] and E = Kr R + Kg G + Kb B:

    Y  = 16  + 219/255 * E
    Cb = 128 + 224/255 * (B - E) / (2 (1 - Kb))
    Cr = 128 + 224/255 * (R - E) / (2 (1 - Kr))

(white -> (235, 128, 128), black -> (16, 128, 128), red -> (81.48, 90.20, 240)). Everything is computed in
float64 and rounded half to even (``np.rint``) once, at the end, then clipped to [0, 255].

*Chroma down-sampling* (4:4:4 -> 4:2:0): Cb and Cr are computed at full resolution, then each output sample is
the mean of its 2x2 block (an odd last row / column is replicated, i.e. the mean of the samples that exist):
chroma sited at the centre of the 2x2 block, the JPEG / MPEG-1 siting that Y4M calls ``C420jpeg``.

*Chroma up-sampling* (4:2:0 -> 4:4:4): separable linear interpolation for centre-sited samples: along each
axis, full-resolution sample 2i is 3/4 c[i] + 1/4 c[i-1] and sample 2i+1 is 3/4 c[i] + 1/4 c[i+1], the
border sample replicated (c[-1] = c[0], c[n] = c[n-1]); i.e. the 2x bilinear ("triangle") filter with
weights (1/4, 3/4) that the siting implies. Applied in float64, before the inverse matrix, without rounding.

The inverse matrix is the exact inverse of the forward one; on frames whose chroma is constant over each 2x2
block (and around it), RGB -> YUV -> RGB is exact up to the rounding of the YUV values: at most 2 per channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from bitalloc.errors import ConfigError, ShapeError

KR, KB = 0.299, 0.114
KG = 1.0 - KR - KB

# rows: Y, Cb, Cr; columns: R, G, B (inputs in [0, 255]); offsets added after the product
_E = np.array([KR, KG, KB])
RGB_TO_YUV = np.stack([
    219.0 / 255.0 * _E,
    224.0 / 255.0 * (np.array([0.0, 0.0, 1.0]) - _E) / (2.0 * (1.0 - KB)),
    224.0 / 255.0 * (np.array([1.0, 0.0, 0.0]) - _E) / (2.0 * (1.0 - KR)),
])
YUV_OFFSET = np.array([16.0, 128.0, 128.0])
YUV_TO_RGB = np.linalg.inv(RGB_TO_YUV)


def chroma_shape(height: int, width: int) -> tuple[int, int]:
    """Height and width of a 4:2:0 chroma plane for a ``height`` x ``width`` luma plane (rounded up)."""
    return (height + 1) // 2, (width + 1) // 2


@dataclass(eq=False)
class YUVFrames:
    """Frames as 8-bit YUV 4:2:0 planes (FFmpeg's ``yuv420p``).

    ``y``: uint8 [T, H, W]; ``u`` (Cb), ``v`` (Cr): uint8 [T, (H+1)//2, (W+1)//2]; ``fps``: frames per second;
    ``chroma_siting``: where the chroma samples sit in their 2x2 block, ``"center"`` (JPEG / MPEG-1, what
    :func:`rgb_to_yuv420` makes) or ``"left"`` (MPEG-2 / H.264 / HEVC default); it only labels output files
    (Y4M ``C420jpeg`` / ``C420mpeg2``). Index with an int or a slice to get frames (always a ``YUVFrames``;
    the planes are views).
    """

    y: np.ndarray
    u: np.ndarray
    v: np.ndarray
    fps: float = 25.0
    chroma_siting: str = "center"

    def __post_init__(self) -> None:
        for name in ("y", "u", "v"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 3:
                got = (f"{arr.dtype} array of shape {tuple(arr.shape)}" if isinstance(arr, np.ndarray)
                       else type(arr).__name__)
                raise ShapeError(f"YUVFrames.{name} must be a uint8 array [T, H, W], got {got}; "
                                 f"convert RGB frames with rgb_to_yuv420.")
        t, h, w = self.y.shape
        want = (t, *chroma_shape(h, w))
        if self.u.shape != want or self.v.shape != want:
            raise ShapeError(f"4:2:0 chroma planes of {t} frames of {h}x{w} must be {list(want)}, got u "
                             f"{list(self.u.shape)} and v {list(self.v.shape)}; chroma is (H+1)//2 x (W+1)//2.")
        if not (isinstance(self.fps, (int, float, np.floating, np.integer)) and np.isfinite(self.fps) and self.fps > 0):
            raise ConfigError(f"fps={self.fps!r} must be a positive number of frames per second.")
        self.fps = float(self.fps)
        if self.chroma_siting not in ("center", "left"):
            raise ConfigError(f"chroma_siting={self.chroma_siting!r} must be 'center' or 'left'.")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, index: int | slice) -> "YUVFrames":
        if isinstance(index, (int, np.integer)):
            n = len(self)
            if not -n <= index < n:
                raise IndexError(f"frame {index} out of range for {n} frames")
            index = slice(int(index) % n, int(index) % n + 1)
        if not isinstance(index, slice):
            raise TypeError(f"YUVFrames index must be an int or a slice, got {type(index).__name__}")
        return self._with(self.y[index], self.u[index], self.v[index])

    @property
    def height(self) -> int:
        return int(self.y.shape[1])

    @property
    def width(self) -> int:
        return int(self.y.shape[2])

    @property
    def planes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(y, u, v)."""
        return self.y, self.u, self.v

    def __repr__(self) -> str:
        return f"YUVFrames({len(self)} frames, {self.width}x{self.height}, {self.fps:g} fps)"

    def equal(self, other: "YUVFrames") -> bool:
        """Whether both hold the same planes bit for bit (the frame rate is not compared)."""
        return all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(self.planes, other.planes))

    def _with(self, y: np.ndarray, u: np.ndarray, v: np.ndarray) -> "YUVFrames":
        return YUVFrames(y, u, v, self.fps, self.chroma_siting)

    def copy(self) -> "YUVFrames":
        """A copy owning contiguous planes."""
        return self._with(*(np.ascontiguousarray(p).copy() for p in self.planes))

    def crop(self, height: int, width: int, top: int = 0, left: int = 0) -> "YUVFrames":
        """The ``height`` x ``width`` window at (``top``, ``left``) (e.g. to undo padding). ``top`` and ``left``
        must be even so that the chroma samples stay on their 2x2 blocks; chroma keeps (height+1)//2 rows."""
        if top % 2 or left % 2:
            raise ConfigError(f"crop offsets top={top}, left={left} must be even in 4:2:0 (chroma is sub-sampled "
                              f"by 2); choose even offsets.")
        if height < 1 or width < 1 or top < 0 or left < 0 or top + height > self.height or left + width > self.width:
            raise ShapeError(f"crop {height}x{width} at ({top}, {left}) does not fit in {self.height}x{self.width} "
                             f"frames.")
        ch, cw = chroma_shape(height, width)
        return self._with(self.y[:, top:top + height, left:left + width],
                          self.u[:, top // 2:top // 2 + ch, left // 2:left // 2 + cw],
                          self.v[:, top // 2:top // 2 + ch, left // 2:left // 2 + cw])

    def pad(self, height: int, width: int) -> "YUVFrames":
        """Frames enlarged to ``height`` x ``width`` (at least the current size) by replicating the last row
        and column of every plane; :meth:`crop` to the old size gives the frames back exactly."""
        if height < self.height or width < self.width:
            raise ShapeError(f"pad to {height}x{width} is smaller than the frames ({self.height}x{self.width}); "
                             f"use crop to make frames smaller.")
        ch, cw = chroma_shape(height, width)

        def grow(p: np.ndarray, h: int, w: int) -> np.ndarray:
            return np.pad(p, ((0, 0), (0, h - p.shape[1]), (0, w - p.shape[2])), mode="edge")

        return self._with(grow(self.y, height, width), grow(self.u, ch, cw), grow(self.v, ch, cw))

    @staticmethod
    def concat(parts: Sequence["YUVFrames"]) -> "YUVFrames":
        """The frames of ``parts`` one after the other (same size; the first part's frame rate and siting)."""
        parts = list(parts)
        if not parts:
            raise ShapeError("concat needs at least one YUVFrames.")
        sizes = {(p.height, p.width) for p in parts}
        if len(sizes) != 1:
            raise ShapeError(f"cannot concatenate frames of different sizes {sorted(sizes)}; crop or pad them first.")
        return parts[0]._with(*(np.concatenate([p.planes[i] for p in parts]) for i in range(3)))

    def to_torch_planes(self, *, device: Any = None, dtype: Any = None) -> tuple[Any, Any, Any]:
        """The planes as float tensors [T, 1, H, W], [T, 1, Hc, Wc], [T, 1, Hc, Wc] with values / 255 in [0, 1]
        (dtype float32 unless given)."""
        import torch

        dtype = dtype or torch.float32
        return tuple(torch.from_numpy(np.ascontiguousarray(p)).to(device=device, dtype=dtype).unsqueeze(1) / 255.0
                     for p in self.planes)  # type: ignore[return-value]

    @staticmethod
    def from_torch_planes(y: Any, u: Any, v: Any, fps: float = 25.0, chroma_siting: str = "center") -> "YUVFrames":
        """Inverse of :meth:`to_torch_planes`: tensors in [0, 1] ([T, 1, H, W] or [T, H, W]) -> uint8 planes,
        round(255 x) (half to even) clipped to [0, 255]."""
        import torch

        def plane(t: Any) -> np.ndarray:
            t = t.detach()
            if t.ndim == 4:
                if t.shape[1] != 1:
                    raise ShapeError(f"a plane tensor must be [T, 1, H, W] or [T, H, W], got {list(t.shape)}")
                t = t[:, 0]
            return torch.round(t.to(torch.float64) * 255.0).clamp(0, 255).to(torch.uint8).cpu().numpy()

        return YUVFrames(plane(y), plane(u), plane(v), fps, chroma_siting)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _mean_2x2(p: np.ndarray) -> np.ndarray:
    """[T, H, W] float -> [T, (H+1)//2, (W+1)//2]: mean of each 2x2 block, an odd last row/column replicated."""
    t, h, w = p.shape
    p = np.pad(p, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    return p.reshape(t, p.shape[1] // 2, 2, p.shape[2] // 2, 2).mean(axis=(2, 4))


def _upsample_axis(c: np.ndarray, axis: int, size: int) -> np.ndarray:
    """2x linear up-sampling of centre-sited samples along ``axis`` (weights 3/4, 1/4; border replicated),
    cut to ``size`` samples."""
    c = np.moveaxis(c, axis, -1)
    prev = np.concatenate([c[..., :1], c[..., :-1]], axis=-1)
    nxt = np.concatenate([c[..., 1:], c[..., -1:]], axis=-1)
    out = np.empty(c.shape[:-1] + (2 * c.shape[-1],), dtype=np.float64)
    out[..., 0::2] = 0.75 * c + 0.25 * prev
    out[..., 1::2] = 0.75 * c + 0.25 * nxt
    return np.moveaxis(out[..., :size], -1, axis)


def upsample_chroma(c: np.ndarray, height: int, width: int) -> np.ndarray:
    """4:2:0 chroma [T, Hc, Wc] -> float64 [T, height, width] by the module's up-sampling filter."""
    c = np.asarray(c, dtype=np.float64)
    return _upsample_axis(_upsample_axis(c, 1, height), 2, width)


def check_rgb(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` as uint8 [T, H, W, 3] (one [H, W, 3] image gets T = 1); ShapeError for anything else."""
    rgb = np.asarray(rgb)
    if rgb.ndim == 3:
        rgb = rgb[None]
    if rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ShapeError(f"RGB frames must be uint8 [T, H, W, 3] (or one [H, W, 3] image), got {rgb.dtype} "
                         f"{list(rgb.shape)}.")
    return rgb


def rgb_to_yuv420(rgb: np.ndarray, fps: float = 25.0) -> YUVFrames:
    """RGB uint8 [T, H, W, 3] (or one [H, W, 3] image) -> :class:`YUVFrames` by the module's conversion
    (BT.601 limited range; chroma by 2x2 means). Float64 throughout, one rounding at the end."""
    rgb = check_rgb(rgb).astype(np.float64)
    yuv = rgb @ RGB_TO_YUV.T + YUV_OFFSET  # [T, H, W, 3]
    return YUVFrames(_to_uint8(yuv[..., 0]), _to_uint8(_mean_2x2(yuv[..., 1])), _to_uint8(_mean_2x2(yuv[..., 2])),
                     fps)


def yuv420_to_rgb(frames: YUVFrames) -> np.ndarray:
    """:class:`YUVFrames` -> RGB uint8 [T, H, W, 3] by the module's conversion (chroma up-sampled by the
    (1/4, 3/4) linear filter, the inverse BT.601 limited-range matrix, rounding half to even, clipping)."""
    h, w = frames.height, frames.width
    yuv = np.stack([frames.y.astype(np.float64), upsample_chroma(frames.u, h, w), upsample_chroma(frames.v, h, w)],
                   axis=-1)
    return _to_uint8((yuv - YUV_OFFSET) @ YUV_TO_RGB.T)

