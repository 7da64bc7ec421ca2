"""The learned video codec (SPEC section 3): networks, entropy models, bitstream, video I/O, anchors, metrics.

Needs the ``codec`` extra (``pip install 'bitalloc[codec]'``): PyAV (video I/O and the x265 anchor),
constriction (entropy coding), bjontegaard (BD-rate cross-check), OpenCV (motion estimation, saliency).
See docs/codec.md::

    from bitalloc.codec import VideoCoder, load_codec, read_video
    coder = VideoCoder(load_codec())                    # the shipped weights (or load_codec("my.pt"))
    res = coder.compress(read_video("clip.mp4", frames=96), quality=4, intra_period=32)
    frames = coder.decompress(res.stream)               # == res.reconstruction, bit for bit
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VideoCoder": "bitalloc.codec.codec", "CompressResult": "bitalloc.codec.codec",
    "VideoCodec": "bitalloc.codec.model", "CodecConfig": "bitalloc.codec.model", "build_codec": "bitalloc.codec.model",
    "save_codec": "bitalloc.codec.precision", "quantize_decoders": "bitalloc.codec.precision",
    "freeze_decoders": "bitalloc.codec.precision",
    "YUVFrames": "bitalloc.codec.frames", "rgb_to_yuv420": "bitalloc.codec.frames",
    "yuv420_to_rgb": "bitalloc.codec.frames",
    "read_video": "bitalloc.codec.video_io", "write_y4m": "bitalloc.codec.video_io",
    "write_lossless": "bitalloc.codec.video_io", "write_png_frames": "bitalloc.codec.video_io",
    "psnr_yuv": "bitalloc.codec.metrics", "psnr_rgb": "bitalloc.codec.metrics", "bd_rate": "bitalloc.codec.metrics",
    "BitstreamError": "bitalloc.codec.bitstream",
}

__all__ = sorted([*_EXPORTS, "load_codec"])


def load_codec(path: Any = None) -> Any:
    """The codec weights in ``path`` (written by :func:`save_codec`), or the weights shipped with bitalloc."""
    from bitalloc.codec.weights import load_default_or

    return load_default_or(path)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bitalloc.codec' has no attribute {name!r}")
