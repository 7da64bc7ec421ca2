"""A tiny quantized codec and tiny synthetic videos for the codec tests (no shipped weights, no data needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from bitalloc.codec.frames import YUVFrames
from bitalloc.codec.model import CodecConfig, VideoCodec

TINY = CodecConfig(n=16, nz=8, motion_n=8, motion_nz=8, lambdas=(0.003, 0.03, 0.3))


def moving_video(frames: int = 5, height: int = 40, width: int = 56, *, seed: int = 0, fps: float = 25.0) -> YUVFrames:
    """A smooth textured pattern translating by (2, 1) pixels per frame, with mild noise (any size, odd too)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height + 2 * frames, 0:width + 2 * frames].astype(np.float64)
    base = 128 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + 20 * np.sin((xx + yy) / 11.0)
    y = np.stack([base[t:t + height, 2 * t:2 * t + width] for t in range(frames)])
    y = np.clip(y + rng.normal(0, 2, y.shape), 0, 255).astype(np.uint8)
    ch, cw = (height + 1) // 2, (width + 1) // 2
    u = np.clip(128 + 30 * np.sin(np.arange(frames)[:, None, None] / 3 + np.mgrid[0:ch, 0:cw][1] / 6), 0, 255)
    v = np.full((frames, ch, cw), 120.0) + np.mgrid[0:frames, 0:ch, 0:cw][1] % 7
    return YUVFrames(y, u.astype(np.uint8), v.astype(np.uint8), fps=fps)


def tiny_codec(seed: int = 0, cfg: CodecConfig = TINY) -> VideoCodec:
    """An untrained tiny codec with 8-bit decoder networks, calibrated on a synthetic clip and frozen (with
    ``cfg.residual_context``, its context branch and the layer it feeds given random weights: zero-initialised, they
    would not act; with ``cfg.prior_context``, the hyper synthesis' context branch likewise)."""
    from bitalloc.codec.precision import coders, decoder_quant_configs, freeze_decoders, quantize_decoders

    torch.manual_seed(seed)
    model = VideoCodec(cfg).eval()
    for coder in (model.intra.coder, model.inter.motion, model.inter.residual):
        with torch.no_grad():  # an untrained hyper-analysis gives |z| << 1: make the hyper-latents vary
            coder.log_hyper_gain[0].fill_(math.log(30.0))
    syn = model.inter.residual.synthesis
    if syn.context is not None:
        with torch.no_grad():  # the layer the context joins starts at zero as well
            syn.context[-1].weight.normal_(0.0, 0.1)
            syn.nonlinear[-1].weight.normal_(0.0, 0.05)
    hyper = model.inter.residual.hyper_synthesis
    if getattr(hyper, "context", None) is not None:
        with torch.no_grad():
            hyper.context[-1].weight.normal_(0.0, 0.1)
    quantize_decoders(model, decoder_quant_configs(8, "fixed"))
    calibrate_on(model, moving_video(3, 32, 48))
    freeze_decoders(model)
    for coder in coders(model).values():
        coder.update()  # the coding tables, as save_codec stores them
    return model


def tiny_weights(path: Path) -> Path:
    from bitalloc.codec.precision import save_codec

    return save_codec(tiny_codec(), path)


def tiny_dynamic_codec(candidates: tuple[int, ...] = (4, 8, 16), seed: int = 0, roi: str = "spectral",
                       hyper_bits: int = 8, cfg: CodecConfig = TINY) -> VideoCodec:
    """An untrained tiny codec with region-quantized networks at ``candidates`` and a width selector whose bias
    makes it pick different widths for the ROI and the rest; quantizers initialised on a synthetic clip."""
    import dataclasses

    from bitalloc.codec.dynamic import prepare_dynamic
    from bitalloc.codec.precision import coders

    torch.manual_seed(seed)
    model = VideoCodec(dataclasses.replace(cfg, candidates=candidates, roi=roi)).eval()
    for coder in coders(model).values():
        with torch.no_grad():
            coder.log_hyper_gain[0].fill_(math.log(30.0))
            # the nonlinear branches start at zero output (their last convolution is zero-initialised): give them
            # some, so that the region-quantized layers of analysis and synthesis change the reconstruction
            for conv in coder.modules():
                if isinstance(conv, torch.nn.Conv2d) and not bool(conv.weight.any()):
                    conv.weight.normal_(0.0, 0.05)
    prepare_dynamic(model, hyper_bits=hyper_bits)
    calibrate_on(model, moving_video(3, 64, 64))
    k = len(candidates)
    with torch.no_grad():  # ROI at the widest candidate, the rest at the narrowest
        model.selector.fc.weight.zero_()
        model.selector.fc.bias.copy_(torch.tensor([0.0] * (k - 1) + [5.0] + [5.0] + [0.0] * (k - 1)))
    for coder in coders(model).values():
        coder.update()
    return model.eval()


def calibrate_on(model: VideoCodec, video: YUVFrames) -> None:
    """Calibrate the codec's quantizers on ``video`` as one clip, at every quality level."""
    import bitalloc
    from bitalloc.codec.codec import frame_tensor, padded_size

    size = padded_size(video.height, video.width)
    clip = torch.stack([frame_tensor(video, i, size)[0].float() / 255 for i in range(len(video))])[None]
    with torch.no_grad(), bitalloc.calibration(model):
        for level in range(model.cfg.levels):
            model(clip, torch.tensor([level]))


def compress_with_threads(coder, video: YUVFrames, threads: int = 2, **kwargs):
    """``coder.compress(video, **kwargs)`` with ``threads`` torch threads (then back to 1)."""
    torch.set_num_threads(threads)
    try:
        return coder.compress(video, **kwargs)
    finally:
        torch.set_num_threads(1)
