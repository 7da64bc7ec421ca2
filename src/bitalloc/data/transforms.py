"""Image transforms written with PIL, numpy and torch (no torchvision).

- :class:`Normalization`: ``(x / scale - mean) / std`` per channel on ``uint8`` pixels, e.g. CIFAR-10's
  mean/std on ``x / 255``, or EfficientNet-Lite's ``(x - 127) / 128`` (``scale=1``).
- :func:`random_crop_flip`: the standard CIFAR training augmentation (He et al. 2016, "Deep Residual Learning
  for Image Recognition", sec. 4.2: pad 4 pixels, random 32x32 crop, random horizontal flip), on a whole
  ``uint8`` batch with tensor indexing. Padding uses zero (black) pixels, as torchvision's
  ``RandomCrop(32, padding=4)`` does on the image before ``Normalize``.
- :func:`resize_short_side` / :func:`center_crop`: torchvision's ``Resize(int)`` / ``CenterCrop`` rules on PIL
  images (new long side ``int(size * long / short)``; crop offsets ``round((H - h) / 2)``).
- :class:`Preprocess` and :data:`TRANSFORMS`: named PIL -> tensor pipelines. ``"imagenet-lite"`` is the
  EfficientNet-Lite evaluation preprocessing (resize short side 256 bilinear, center crop 224,
  ``(x - 127) / 128``), following the reference TF-Lite EfficientNet-Lite code
  (tensorflow/tpu models/official/efficientnet/lite, ``MEAN_RGB = [127.0]*3``, ``STDDEV_RGB = [128.0]*3``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from bitalloc.errors import ConfigError

__all__ = [
    "Normalization", "random_crop_flip", "resize_short_side", "center_crop", "pil_to_array",
    "Preprocess", "TRANSFORMS", "get_transform",
    "CIFAR10_NORM", "MNIST_NORM", "FASHION_MNIST_NORM", "IMAGENET_LITE_NORM", "IMAGENET_NORM",
]


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x / scale - mean) / std`` applied to ``uint8`` pixel values ``x`` in 0..255."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 255.0

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ConfigError(f"Normalization mean {self.mean} and std {self.std} differ in length.")
        if any(s <= 0 for s in self.std) or self.scale <= 0:
            raise ConfigError(f"Normalization std {self.std} and scale {self.scale} must be positive.")

    def __call__(self, x: torch.Tensor, *, channel_dim: int = -3) -> torch.Tensor:
        """Normalize ``x`` (uint8 or float pixel values, channels at ``channel_dim``) to float32."""
        y = x.to(torch.float32)
        if y is x:
            y = y.clone()
        if self.scale != 1.0:
            y.div_(self.scale)
        shape = [1] * y.ndim
        shape[channel_dim] = len(self.mean)
        y.sub_(torch.tensor(self.mean, dtype=torch.float32).view(shape))
        y.div_(torch.tensor(self.std, dtype=torch.float32).view(shape))
        return y

    def invert(self, y: torch.Tensor, *, channel_dim: int = -3) -> torch.Tensor:
        """Pixel values (float, 0..255) from normalized ``y``."""
        shape = [1] * y.ndim
        shape[channel_dim] = len(self.mean)
        std = torch.tensor(self.std, dtype=y.dtype).view(shape)
        mean = torch.tensor(self.mean, dtype=y.dtype).view(shape)
        return (y * std + mean) * self.scale

    def as_dict(self) -> dict[str, Any]:
        """JSON-able description (also used in cache keys)."""
        return {"mean": list(self.mean), "std": list(self.std), "scale": self.scale}


MNIST_NORM = Normalization((0.1307,), (0.3081,))
FASHION_MNIST_NORM = Normalization((0.2860,), (0.3530,))
CIFAR10_NORM = Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
IMAGENET_LITE_NORM = Normalization((127.0, 127.0, 127.0), (128.0, 128.0, 128.0), scale=1.0)
IMAGENET_NORM = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def random_crop_flip(batch: torch.Tensor, *, padding: int = 4, flip: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Random ``H x W`` crop of the zero-padded batch and random horizontal flip, per image.

    ``batch`` is ``[N, C, H, W]`` or a single ``[C, H, W]`` image (any dtype); the result has the same shape
    and dtype. Each image gets its own offsets in ``0..2*padding`` and its own flip (probability 1/2), drawn
    from ``generator`` (the global torch RNG when None).
    """
    single = batch.ndim == 3
    if single:
        batch = batch.unsqueeze(0)
    if batch.ndim != 4:
        raise ConfigError(f"random_crop_flip expects [N, C, H, W] or [C, H, W], got shape {list(batch.shape)}.")
    n, c, h, w = batch.shape
    out = batch
    if padding > 0:
        padded = torch.nn.functional.pad(batch, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # [N, 1, H, 1]
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # [N, 1, 1, W]
        out = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        if bool(mask.any()):
            out = out.clone() if out is batch else out
            out[mask] = out[mask].flip(-1)
    return out[0] if single else out


def resize_short_side(img: Image.Image, size: int, resample: int = Image.BILINEAR) -> Image.Image:
    """Resize so the shorter side is ``size`` (torchvision ``Resize(size)`` rule; unchanged if already so)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return img.resize((new_w, new_h), resample)


def center_crop(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Central ``size`` crop (torchvision ``CenterCrop`` offsets); the image must be at least that large."""
    ch, cw = (size, size) if isinstance(size, int) else size
    w, h = img.size
    if w < cw or h < ch:
        raise ConfigError(f"cannot center-crop {cw}x{ch} from a {w}x{h} image; resize it first.")
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return img.crop((left, top, left + cw, top + ch))


def pil_to_array(img: Image.Image, mode: str = "RGB") -> np.ndarray:
    """``uint8`` array ``[H, W, C]`` of ``img`` converted to ``mode``."""
    arr = np.array(img.convert(mode), dtype=np.uint8)  # a writable copy
    return arr[..., None] if arr.ndim == 2 else arr


@dataclass(frozen=True)
class Preprocess:
    """A named PIL-image pipeline: convert ``mode``, resize the short side, center-crop, then normalize.

    :meth:`to_array` gives the ``uint8`` ``[H, W, C]`` image before normalization (what caches store);
    calling the object gives the normalized float32 ``[C, H, W]`` tensor.
    """

    name: str
    resize: int | None = None
    crop: int | None = None
    normalization: Normalization = field(default_factory=lambda: Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    mode: str = "RGB"

    def to_array(self, img: Image.Image) -> np.ndarray:
        img = img.convert(self.mode)
        if self.resize is not None:
            img = resize_short_side(img, self.resize)
        if self.crop is not None:
            img = center_crop(img, self.crop)
        return pil_to_array(img, self.mode)

    def normalize(self, arr: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalized float32 ``[C, H, W]`` (or ``[N, C, H, W]``) from ``uint8`` ``[H, W, C]`` (``[N, H, W, C]``)."""
        t = torch.as_tensor(arr)
        return self.normalization(t.movedim(-1, -3))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_array(img))

    def params(self) -> dict[str, Any]:
        """The parameters that change :meth:`to_array`'s output (used as cache keys)."""
        return {"name": self.name, "resize": self.resize, "crop": self.crop, "mode": self.mode,
                "resample": "PIL.BILINEAR"}


#: Named transforms: ``get_transform(name)``.
TRANSFORMS: dict[str, Preprocess] = {
    "imagenet-lite": Preprocess("imagenet-lite", 256, 224, IMAGENET_LITE_NORM),
    "imagenet": Preprocess("imagenet", 256, 224, IMAGENET_NORM),
    "to-tensor": Preprocess("to-tensor", None, None, Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))),
}
_ALIASES = {"efficientnet-lite": "imagenet-lite", "efficientnet_lite": "imagenet-lite",
            "imagenet_lite": "imagenet-lite", "to_tensor": "to-tensor", "totensor": "to-tensor"}


def get_transform(name: str) -> Preprocess:
    """The named transform: ``"imagenet-lite"`` (resize 256, crop 224, ``(x-127)/128``; for EfficientNet-Lite),
    ``"imagenet"`` (resize 256, crop 224, torchvision ImageNet mean/std), ``"to-tensor"`` (``x / 255``)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in TRANSFORMS:
        raise ConfigError(f"unknown transform {name!r}; valid names: {', '.join(TRANSFORMS)}.")
    return TRANSFORMS[key]
