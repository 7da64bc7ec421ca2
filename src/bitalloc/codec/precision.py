"""Quantizing the codec's networks with bitalloc's own pipeline, and the codec's weight files.

The decoder-side networks of every coder (synthesis and hyper synthesis of the intra, motion and residual coders)
are prepared with :func:`bitalloc.prepare` like any model: weights per output channel on symmetric grids,
activations per tensor, at ``bits`` bits (8 by default: Balle et al. 2019 integer networks), with LSQ quantizers
for fine-tuning (Esser et al. 2020) or fixed ones calibrated on data. After :func:`bitalloc.freeze` they run in
:func:`bitalloc.runtime.integer.integer_mode` with the exact float kernel, which makes decoding bit-exact.
Analysis transforms (the sender's) stay in float: their output is written to the stream, so their arithmetic
does not need to be reproducible. Which layers are quantized and why the others are not is the ordinary
``bitalloc.prepare_info`` report of each network.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from bitalloc.codec.model import CONTEXT_CHANNELS, CodecConfig, HyperpriorCoder, VideoCodec
from bitalloc.config import LayerConfig, QuantConfig, TensorConfig
from bitalloc.errors import CheckpointError

#: the networks a decoder runs, per coder
DECODER_PARTS = ("synthesis", "hyper_synthesis")
FORMAT = "bitalloc.codec.weights"
VERSION = 1


def coders(model: VideoCodec) -> dict[str, HyperpriorCoder]:
    """The three coders of a video codec, by name."""
    return {"intra": model.intra.coder, "motion": model.inter.motion, "residual": model.inter.residual}


def decoder_networks(model: VideoCodec) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every decoder-side network, e.g. ``("intra.synthesis", ...)``."""
    for cname, coder in coders(model).items():
        for part in DECODER_PARTS:
            yield f"{cname}.{part}", getattr(coder, part)


#: every network of a coder, in the order a frame runs them
ALL_PARTS = ("analysis", "hyper_analysis", "hyper_synthesis", "synthesis")

#: the coders each frame type runs: an I frame the intra coder, a P frame the motion and residual coders
FRAME_CODERS = {"I": ("intra",), "P": ("motion", "residual")}


def network_input(coder: HyperpriorCoder, part: str, luma: int = 64,
                  width: int | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A zero input of network ``part`` of ``coder`` for a padded frame of ``luma`` x ``width`` luma pixels
    (multiples of 16; ``width`` default: square); for a conditional synthesis or hyper synthesis the tuple (its
    input, the context: a packed frame at 1/2 luma resolution)."""
    h, w = luma, luma if width is None else width
    m, nz = coder.log_gain.shape[-1], coder.log_hyper_gain.shape[-1]
    if part == "analysis":
        return torch.zeros(1, coder.analysis_channels, h // 2, w // 2)
    channels, scale = {"hyper_analysis": (m, 16), "synthesis": (m, 16), "hyper_synthesis": (nz, 64)}[part]
    x = torch.zeros(1, channels, -(-h // scale), -(-w // scale))
    if not coder.reads_context(part):
        return x
    return x, torch.zeros(1, CONTEXT_CHANNELS, h // 2, w // 2)


#: layers that read decoded latents get 16-bit inputs (latents span a wide range at fine steps: an 8-bit grid would
#: add noise comparable to the finest quantization step); the inverse block transform has 16-bit weights too
WIDE_LAYERS = {"synthesis": {"re:^linear\\.0$": {"weight.bits": 16, "act.bits": 16},
                             "re:^nonlinear\\.0$": {"act.bits": 16}},
               "hyper_synthesis": {"re:^(nonlinear\\.)?0\\.0$": {"act.bits": 16}}}

#: with dynamic precision, layers that keep one fixed grid (min-max calibrated) whatever widths a frame signals, as
#: bitalloc keeps first layers at 8 bits elsewhere: at 8 bits those that read an encoder's input (the frame or the
#: motion-compensated residual: the block transform and the first convolution of the analysis), and the hyper
#: synthesis (the path from the hyper-latent to the entropy model's scales, at 1/16 to 1/64 of the resolution) at
#: ``hyper_bits`` (8 by default; :func:`bitalloc.codec.dynamic.prepare_dynamic`). Measured on carphone (4 frames,
#: every other layer at 4 bits): a 4-bit grid on the frame caps the I frames at 31.6 dB (35.9 dB at 8 bits). The
#: hyper synthesis switching with the frame's widths breaks down at 2 bits (carphone, 4 frames, level 1: 32,382
#: bytes against 2,862 at 8 bits); on a fixed 4-bit grid it costs 0.1 dB and under 1% of the rate at 2 bits
#: elsewhere (2,946 against 2,862 bytes at level 1, 17,126 against 17,046 at level 7, -0.08 dB), where at 8 bits
#: it would be a quarter of a {2,4,8} codec's Bit-FLOPs. WIDE_LAYERS win where both match.
FIXED_LAYERS = {"analysis": ("re:^linear\\.1$", "re:^nonlinear\\.0$"), "hyper_synthesis": ("*",)}
#: with dynamic precision, the layer of a conditional synthesis or hyper synthesis that reads the prediction (a frame:
#: the first convolution of its context branch) keeps a fixed 8-bit grid too, as the analysis' first layers do
#: (:data:`FIXED_LAYERS`), also where the rest of the hyper synthesis has narrower fixed grids
CONTEXT_FIXED_LAYERS = {"synthesis": "re:^context\\.0$", "hyper_synthesis": "re:^context\\.1$"}

#: with dynamic precision, networks that stay in float: the hyper analysis. It runs only at the sender (its output,
#: the hyper-latent, is rounded and written to the stream, so decoding does not depend on its arithmetic), at 1/16 to
#: 1/64 of the resolution (under 3% of a frame's MACs). Quantized, it blocks the encoder's search over analysis
#: scales (:data:`bitalloc.codec.codec.ANALYSIS_SCALES`): the search shrinks the latents and a grid calibrated on
#: unscaled ones codes their magnitudes coarsely, so the hyper-latent, and with it the scales of the entropy model,
#: fit them worse. Measured (carphone, 4 frames, level 3, everything else at 4 bits, with the search): 5,034 bytes
#: with a float hyper analysis, 6,482 with an 8-bit one (recalibrated on every searched scale: no better), against
#: 5,234 for the static 8-bit codec; at 4 bits the hyper analysis triples the I frames' rate at level 1. Bit-FLOPs
#: count a float layer's MACs once, as an 8-bit layer's (SPEC section 3: float FLOPs + BOPs / 64).
DYNAMIC_FLOAT_PARTS = ("hyper_analysis",)


def decoder_quant_config(bits: int = 8, quantizer: str = "lsq", part: str | None = None) -> QuantConfig:
    """Weights per channel (symmetric), activations per tensor, ``bits`` each (no 8-bit first/last rule: every
    layer is already at ``bits``); for ``part`` ("synthesis" / "hyper_synthesis") the layers of
    :data:`WIDE_LAYERS` at 16 bits."""
    w = TensorConfig(bits=bits, granularity="channel", symmetric=True, quantizer=quantizer)
    a = TensorConfig(bits=bits, granularity="tensor", quantizer=quantizer)
    overrides = list(WIDE_LAYERS.get(part or "", {}).items())
    return QuantConfig(default=LayerConfig(weight=w, act=a), overrides=overrides, first_last_bits=None,
                       fold_bn=False).validate()


def decoder_quant_configs(bits: int = 8, quantizer: str = "lsq") -> dict[str, QuantConfig]:
    """:func:`decoder_quant_config` for every decoder network, by name (for :func:`quantize_decoders`)."""
    return {f"{c}.{part}": decoder_quant_config(bits, quantizer, part)
            for c in ("intra", "motion", "residual") for part in DECODER_PARTS}


def quantize_decoders(model: VideoCodec, config: QuantConfig | dict[str, QuantConfig]) -> VideoCodec:
    """Replace every decoder-side network by ``bitalloc.prepare(network, config)`` (in place; returns model).
    ``config``: one QuantConfig for all, or one per network name (``"intra.synthesis"``, ...; a dict may also
    name analysis networks, e.g. for dynamic precision, where every network is quantized)."""
    import bitalloc

    for cname, coder in coders(model).items():
        for part in ALL_PARTS:
            name = f"{cname}.{part}"
            if isinstance(config, dict):
                if name not in config:
                    continue
                cfg = config[name]
            elif part in DECODER_PARTS:
                cfg = config
            else:
                continue
            net = getattr(coder, part)
            q = bitalloc.prepare(net, cfg, network_input(coder, part))
            q.train(net.training)
            setattr(coder, part, q)
    return model


def freeze_decoders(model: VideoCodec) -> VideoCodec:
    """:func:`bitalloc.freeze` every decoder-side network (in place; returns model)."""
    import bitalloc

    for cname, coder in coders(model).items():
        for part in DECODER_PARTS:
            setattr(coder, part, bitalloc.freeze(getattr(coder, part)))
    return model


def latent_readers(model: VideoCodec) -> list[nn.Module]:
    """The quantized layers of the decoder networks that read decoded latents: the layers of :data:`WIDE_LAYERS`
    with 16-bit inputs (the synthesis' first layers, the hyper synthesis' first layer)."""
    import re

    from bitalloc.model.layers import quant_layers

    out = []
    for coder in coders(model).values():
        for part in DECODER_PARTS:
            patterns = [p[3:] for p, o in WIDE_LAYERS.get(part, {}).items() if o.get("act.bits", 0) >= 16]
            out += [m for n, m in quant_layers(getattr(coder, part)) if any(re.search(p, n) for p in patterns)]
    return out


def extreme_clips(frames: int, crop: int, seed: int = 0) -> list[torch.Tensor]:
    """Packed clips [frames, 6, crop/2, crop/2] at the limits of the pixel range: black and white frames in turn,
    from either (the largest DC coefficients of I frames, and residuals of +-1), and binary noise and its negative
    in turn, from either (the largest high-frequency coefficients)."""
    from bitalloc.codec.networks import pack_yuv

    g = torch.Generator().manual_seed(seed)
    h = crop // 2
    turns = torch.arange(frames).remainder(2).float().reshape(frames, 1, 1)
    noise = (torch.rand(1, crop, crop, generator=g) < 0.5).float()
    out = []
    for luma in (turns.expand(frames, crop, crop), 1 - turns.expand(frames, crop, crop), (noise - turns).abs(),
                 (1 - noise - turns).abs()):
        chroma = (luma[:, ::2, ::2] if luma.shape[-1] == crop else luma).expand(frames, h, h)
        out.append(pack_yuv(luma, chroma, 1 - chroma))
    return out


def calibrate_codec(model: VideoCodec, sources: list[Any], *, frames: int = 3, crop: int = 128, clips: int = 16,
                    seed: int = 0) -> None:
    """Set the quantizers of ``model``'s quantized networks (LSQ steps or fixed grids) from ``clips`` random clips
    of ``sources`` (bitalloc's calibration context, min-max for fixed grids).

    The latent readers (:func:`latent_readers`, 16-bit inputs) are then calibrated again on those clips plus
    :func:`extreme_clips` at every quality level: a clip that the calibration content lacks (a white sky: a DC
    coefficient of 8 where the training videos reach 5) would otherwise be clipped by the first layer of the
    synthesis and decode several dB below the float codec (measured on tree.avi: 32.6 dB against 38.2 dB at the top
    level). At 16 bits the wider grid costs nothing measurable; the 8-bit layers keep the content's ranges."""
    import contextlib
    import warnings

    import bitalloc
    from bitalloc.codec.dataset import ClipDataset

    data = ClipDataset(sources, crop=crop, frames=frames, samples=clips, levels=model.cfg.levels)
    gen = torch.Generator().manual_seed(seed)
    state = torch.get_rng_state()
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    try:
        batches = [data[i] for i in range(clips)]
    finally:
        torch.set_rng_state(state)
    with torch.no_grad(), bitalloc.calibration(model):
        for clip, level in batches:
            model(clip[None], level[None])
    readers = latent_readers(model)
    if not readers:
        return
    batches += [(clip, torch.tensor(level)) for clip in extreme_clips(frames, crop, seed)
                for level in range(model.cfg.levels)]
    for layer in readers:
        if hasattr(layer.input_quantizer, "reset"):
            layer.input_quantizer.reset()  # learned steps initialise once: forget the content-only start
    with torch.no_grad(), warnings.catch_warnings(), contextlib.ExitStack() as stack:
        # data here are a superset of the first pass's: what would warn (constant data) already warned there
        warnings.simplefilter("ignore")
        for layer in readers:
            stack.enter_context(bitalloc.calibration(layer))
        for clip, level in batches:
            model(clip[None], level[None])


def network_configs(model: VideoCodec) -> dict[str, dict[str, Any]]:
    """The QuantConfig (as a dict) of every quantized network, by name ("intra.synthesis", ...)."""
    from bitalloc.model.prepare import prepare_info

    out = {}
    for cname, coder in coders(model).items():
        for part in ALL_PARTS:
            net = getattr(coder, part)
            if getattr(net, "bitalloc_info", None) is not None:
                out[f"{cname}.{part}"] = prepare_info(net).config.to_dict()
    return out


def is_quantized(model: VideoCodec) -> bool:
    """Whether every decoder-side network is quantized (what exact decoding needs)."""
    configs = network_configs(model)
    return all(name in configs for name, _ in decoder_networks(model))


def model_id(model: VideoCodec) -> bytes:
    """8 bytes identifying a codec: SHA-256 over its configuration and every tensor of its state (names, shapes,
    dtypes and values, in order). Streams carry it; a decoder with other weights refuses them."""
    h = hashlib.sha256(repr(model.cfg.to_dict()).encode())
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.digest()[:8]


def save_codec(model: VideoCodec, path: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> Path:
    """Write a codec (configuration, the quantization configs of its quantized networks, state; large weights in
    float16, see :func:`_compact`) with bitalloc's checksummed, atomic :func:`bitalloc.io.torch_save`. Encode and
    decode with the codec loaded back from the file (:func:`load_codec`)."""
    from bitalloc.io import torch_save

    for coder in coders(model).values():
        coder.update()  # the coding tables (gains, hyper-latent pmfs) of the weights being saved
    sd = {k: (v.detach().to(torch.float16) if _compact(k, v) else v) for k, v in model.state_dict().items()}
    state = {"format": FORMAT, "version": VERSION, "config": model.cfg.to_dict(),
             "decoders": network_configs(model) or None, "state_dict": sd, "extra": extra or {}}
    return torch_save(state, path)


def _compact(name: str, t: torch.Tensor) -> bool:
    """Tensors stored as float16: the large weight tensors (4096 values or more). Scales, steps, gains and
    probability tables keep their precision. Loading widens them back to float32, so the codec that encodes and the
    one that decodes (both loaded from the file) hold identical values; the float32 originals never code anything."""
    return t.dtype == torch.float32 and t.numel() >= 4096 and name.endswith(".weight")


_WEIGHTS_FIX = "use the codec weights shipped with bitalloc, or re-create the file with `bitalloc codec train`"


def load_codec(path: str | os.PathLike) -> VideoCodec:
    """Rebuild a codec written by :func:`save_codec` (checksum verified), in eval mode."""
    from bitalloc.io import torch_load

    return codec_from_state(torch_load(path, what="codec weights file", fix=_WEIGHTS_FIX), path)


def codec_from_state(state: Any, path: str | os.PathLike) -> VideoCodec:
    """The codec of the contents of a weights file (``state``, already read and checksum-verified from ``path``,
    which messages name), in eval mode; CheckpointError naming the fix when it is not such a file."""
    fix = _WEIGHTS_FIX
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bitalloc codec weights file; {fix}")
    if int(state.get("version", 0)) != VERSION:
        raise CheckpointError(f"{path} has codec weights version {state.get('version')}; this bitalloc reads version "
                              f"{VERSION}; {fix}")
    model = VideoCodec(CodecConfig.from_dict(state["config"]))
    if state.get("decoders"):
        quantize_decoders(model, {k: QuantConfig.from_dict(v) for k, v in state["decoders"].items()})
    try:
        model.load_state_dict(state["state_dict"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path} does not fit the codec it describes ({str(exc).splitlines()[0][:200]}); "
                              f"{fix}") from None
    return model.eval()


def float_codec(model: VideoCodec) -> VideoCodec:
    """The FP32 codec with ``model``'s weights: the same sizes and weights (as stored, e.g. the float16-compacted
    large tensors of a weights file, widened), every network in float, no quantizer and no width selector. For
    comparisons: code with ``VideoCoder(float_codec(m), exact=False)`` (streams that decode in the same process)."""
    import dataclasses

    out = VideoCodec(dataclasses.replace(model.cfg, candidates=None))
    state = {k.replace(".layer.", "."): v for k, v in model.state_dict().items()
             if "quantizer." not in k and not k.startswith("selector.")}
    missing, unexpected = out.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"cannot carry the codec's weights into a float codec ({missing[:3]}, {unexpected[:3]})")
    for coder in coders(out).values():
        coder.update()  # its coding tables
    return out.train(model.training)
