"""Content-adaptive precision in the codec: per-frame bit widths for the ROI and the rest (SPEC section 3; seed 000,
rebuttal A1-A6).

Every convolution of the codec's networks (analysis, synthesis, hyper analysis and hyper synthesis of the intra,
motion and residual coders) gets a region-masked multi-width LSQ quantizer (:mod:`bitalloc.quantizers.region`,
one learned step per candidate width, weights and activations at the same width) and a small selector
(:class:`bitalloc.codec.selector.WidthSelector`: 8 region statistics -> one linear layer -> K logits per region;
Gumbel-softmax while training, argmax at test) picks one width for the frame's region of interest and one for
the rest. Layers compute each region at its width ("split" execution: per output position, the layer at the
region's width). Exceptions, listed by ``bitalloc codec info``: the layers that read decoded latents keep a fixed
16-bit grid (:data:`bitalloc.codec.precision.WIDE_LAYERS`; an 8-bit or narrower grid there adds noise comparable to
the finest quantization step), the layers that read an encoder's input (the frame, the residual) and the hyper
synthesis keep one fixed grid (:data:`bitalloc.codec.precision.FIXED_LAYERS`: 8 bits, the hyper synthesis at
``hyper_bits``; at 4 bits the frame's grid alone caps the I frames at 31.6 dB, and a hyper synthesis that switches
to 2 bits with the frame multiplies the rate by 10), the hyper analysis stays in
float (:data:`bitalloc.codec.precision.DYNAMIC_FLOAT_PARTS`: sender-only, and quantized it loses the encoder
search's gain), and the encoders' simplified GDN stays in float (not a layer bitalloc quantizes).

**The ROI** comes from a pluggable source (:mod:`bitalloc.codec.roi`, default spectral-residual saliency) on the
frame's luma; it is brought to latent resolution (1/16, rule "any": a 16x16 block is ROI if any of its pixels is)
and that latent-resolution mask is what every layer uses (nearest-upsampled for finer layers, max-pooled for the
hyper networks at 1/32 and 1/64). The stream carries it (:func:`encode_mask`: the count of ROI blocks, then one
bit per block under a Bernoulli model; in P frames per context of the previous frame's mask, stream version 2),
so the decoder never recomputes it from data it does not have; its bits are counted in the rate and reported. From
stream version 4 on, a frame whose two widths are equal carries no mask (:func:`mask_in_stream`): nothing reads it.

**The objective** (``bitalloc codec train --stage dynamic --gamma G``): R + lambda D + gamma C, with C the frame's
expected Bit-FLOPs relative to the same codec at 8 bits everywhere (:class:`BitFlopsTable`): per region-quantized
layer its MACs per luma pixel times, at the layer's resolution, the ROI share times E[b_roi^2] plus the rest times
E[b_non_roi^2] (weights and activations share the width, so b_w b_a = b^2), over 64 (the SPEC's Bit-FLOPs =
float FLOPs + BOPs / 64), plus the MACs of layers that stay in float.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bitalloc.codec.bitstream import SPLIT_MASK_VERSION
from bitalloc.codec.model import VideoCodec
from bitalloc.codec.precision import ALL_PARTS, FRAME_CODERS, network_input
from bitalloc.config import LayerConfig, QuantConfig, TensorConfig
from bitalloc.errors import ConfigError, ShapeError

#: latent resolution of the mask that travels in the stream (luma pixels per block side)
MASK_FACTOR = 16


def dynamic_quant_config(candidates: Sequence[int], part: str, hyper_bits: int = 8, *,
                         context: bool = False) -> QuantConfig:
    """Region LSQ at ``candidates`` for every layer of network ``part`` (default width outside a region context:
    8 bits if it is a candidate, else the widest), with fixed grids (min-max calibrated) on
    :data:`~bitalloc.codec.precision.FIXED_LAYERS` (8 bits; the hyper synthesis at ``hyper_bits``), on a conditional
    synthesis or hyper synthesis (``context``) :data:`~bitalloc.codec.precision.CONTEXT_FIXED_LAYERS` (8 bits) and on
    :data:`~bitalloc.codec.precision.WIDE_LAYERS` (16-bit inputs, 8-bit weights: the static codec's 16-bit weights
    of the inverse block transform would make it 4 x its MACs in Bit-FLOPs, the largest single cost of a codec at
    2 bits; 8-bit weights there cost 0.02 dB at level 7 on carphone)."""
    from bitalloc.codec.precision import CONTEXT_FIXED_LAYERS, FIXED_LAYERS, WIDE_LAYERS

    cands = sorted({int(b) for b in candidates})
    default = 8 if 8 in cands else cands[-1]
    opts = {"candidates": cands, "init": "range"}  # PTQ's min-max grids to start from (measured: LSQ's mean rule
    # clips the decoder activations so hard that 200 fine-tuning steps leave 8/8 at +32% BD-rate against FP32)
    w = TensorConfig(bits=default, granularity="channel", symmetric=True, quantizer="lsq_region", options=opts)
    a = TensorConfig(bits=default, granularity="tensor", quantizer="lsq_region", options=dict(opts))

    def fixed(w_bits: int, a_bits: int) -> dict[str, Any]:
        # min-max calibrated fixed grids: at 16 bits there is nothing to learn (and a learned 16-bit step is a
        # parameter ~1e-5 of its range that an optimizer's update would move by many times its size)
        return {"weight.quantizer": "fixed", "weight.options": {}, "weight.bits": w_bits,
                "act.quantizer": "fixed", "act.options": {}, "act.bits": a_bits}

    if not 2 <= int(hyper_bits) <= 16:
        raise ConfigError(f"hyper_bits={hyper_bits}: give the hyper synthesis' width, 2 to 16 bits (8 by default)")
    bits = int(hyper_bits) if part == "hyper_synthesis" else 8
    overrides = [(pattern, fixed(bits, bits)) for pattern in FIXED_LAYERS.get(part, ())]
    if context:
        overrides.append((CONTEXT_FIXED_LAYERS[part], fixed(8, 8)))
    overrides += [(pattern, fixed(8, 16))  # later overrides win: 16-bit inputs stay
                  for pattern in WIDE_LAYERS.get(part, {})]
    return QuantConfig(default=LayerConfig(weight=w, act=a), overrides=overrides, first_last_bits=None,
                       fold_bn=False).validate()


def prepare_dynamic(model: VideoCodec, hyper_bits: int = 8) -> VideoCodec:
    """Quantize the networks of every coder of ``model`` (float, with ``cfg.candidates`` set) with region LSQ, all
    but :data:`~bitalloc.codec.precision.DYNAMIC_FLOAT_PARTS`, with the fixed grids of :func:`dynamic_quant_config`
    (the hyper synthesis at ``hyper_bits``) (in place; returns model). The quantizers are initialised by the first
    calibration or training batch."""
    import bitalloc
    from bitalloc.codec.precision import DYNAMIC_FLOAT_PARTS, coders

    if not model.cfg.candidates:
        raise ConfigError("the codec has no candidate widths: build it with CodecConfig(candidates=(4, 8, 16))")
    for coder in coders(model).values():
        for part in (p for p in ALL_PARTS if p not in DYNAMIC_FLOAT_PARTS):
            net = getattr(coder, part)
            q = bitalloc.prepare(net, dynamic_quant_config(model.cfg.candidates, part, hyper_bits,
                                                           context=coder.reads_context(part)),
                                 network_input(coder, part, 64))
            q.train(net.training)
            setattr(coder, part, q)
    return model


def with_candidates(model: VideoCodec, candidates: Sequence[int], roi: str = "spectral", *,
                    per_level: bool = False) -> VideoCodec:
    """A float codec like ``model`` (same weights) whose configuration has dynamic precision at ``candidates``
    with the ROI source ``roi``: it gains a fresh width selector (``per_level``: with a bias per quality level)."""
    import dataclasses

    from bitalloc.codec.precision import network_configs
    from bitalloc.codec.roi import parse_roi_spec

    if network_configs(model):
        raise ConfigError("dynamic precision starts from a float codec: give the training checkpoint of the joint "
                          "stage (--init), not quantized weights")
    parse_roi_spec(roi)  # checks the spec
    cfg = dataclasses.replace(model.cfg, candidates=tuple(sorted(int(b) for b in candidates)), roi=roi,
                              selector_per_level=bool(per_level))
    out = VideoCodec(cfg)
    missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("selector.") for k in missing):
        raise ConfigError(f"cannot carry the codec's weights over ({missing[:3]}, {unexpected[:3]})")
    return out.train(model.training)


# ---- the mask in the stream -----------------------------------------------------------------------------------

def latent_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A luma-resolution ROI mask (any size up to height x width, padded with non-ROI) -> bool [height/16, width/16]
    (a block is ROI if any of its pixels is)."""
    m = np.zeros((height, width), dtype=bool)
    h, w = min(mask.shape[0], height), min(mask.shape[1], width)
    m[:h, :w] = mask[:h, :w] > 0
    return m.reshape(height // MASK_FACTOR, MASK_FACTOR, width // MASK_FACTOR, MASK_FACTOR).any(axis=(1, 3))


def encode_mask(enc: Any, mask: np.ndarray, prev: np.ndarray | None = None) -> int:
    """Code a bool block mask into a constriction range encoder; returns the information content in bits.

    Without ``prev`` (I frames): the number k of ROI blocks (uniform over 0..n), then each block (C order) under
    Bernoulli(k / n), i.e. log2(n + 1) + n H(k / n) bits. With ``prev`` (P frames: the previous frame's mask, which
    the decoder has), the same per context c in {0, 1} of the previous mask's block: the n_c blocks with
    ``prev == c`` carry their count k_c (uniform over 0..n_c) and their values under Bernoulli(k_c / n_c), i.e.
    sum_c log2(n_c + 1) + n_c H(k_c / n_c) bits: a mask that moves little costs little (an unchanged one only the
    two counts), and since n H(k / n) >= sum_c n_c H(k_c / n_c) (conditioning does not increase the empirical
    entropy) it never costs more than the second count, at most log2(n + 1) bits."""
    flat = mask.reshape(-1).astype(np.int32)
    if prev is None:
        return _encode_bits(enc, flat)
    ctx = np.asarray(prev, dtype=bool).reshape(-1)
    if ctx.size != flat.size:
        raise ShapeError(f"the previous ROI mask has {ctx.size} blocks, this frame's {flat.size}")
    return _encode_bits(enc, flat[~ctx]) + _encode_bits(enc, flat[ctx])


def _encode_bits(enc: Any, flat: np.ndarray) -> int:
    import constriction

    n, k = flat.size, int(flat.sum())
    if n == 0:  # an empty context: nothing to code (the decoder knows n)
        return 0
    enc.encode(np.array([k], dtype=np.int32), constriction.stream.model.Uniform(n + 1))
    p = min(max(k / n, 1e-6), 1 - 1e-6)
    enc.encode(flat, constriction.stream.model.Bernoulli(p, perfect=False))
    bits = np.log2(n + 1) + (-(k * np.log2(p) + (n - k) * np.log2(1 - p)) if 0 < k < n else 0.0)
    return int(np.ceil(bits))


def mask_context(prev: np.ndarray | None, *, intra: bool, version: int) -> np.ndarray | None:
    """The mask a frame's ROI mask is coded against (:func:`encode_mask`'s ``prev``): in P frames of streams of
    version 2 on, the last mask the stream carried (:func:`carried_mask`: the previous frame's, unless frames
    without one came between); none in I frames (each decodable on its own) and in version 1 streams."""
    return None if intra or version < 2 else prev


def mask_in_stream(roi_bits: int, non_roi_bits: int, version: int) -> bool:
    """Whether a frame at widths (``roi_bits``, ``non_roi_bits``) carries its ROI mask in a stream of ``version``:
    always before :data:`~bitalloc.codec.bitstream.SPLIT_MASK_VERSION`, from it on only when the two widths differ.
    At equal widths every position runs at the one width (:func:`bitalloc.model.region.split_execution` does not
    read the mask), so the decoder has no use for the mask and its bits are saved (1.4% of the rate of 16 frames of
    carphone at the lowest level tested, 0.2% at the highest, for a codec whose selector picks equal widths)."""
    return version < SPLIT_MASK_VERSION or int(roi_bits) != int(non_roi_bits)


def carried_mask(prev: np.ndarray | None, coded: np.ndarray | None, *, intra: bool) -> np.ndarray | None:
    """The context state after a frame (what the next P frame's mask is coded against, :func:`mask_context`):
    ``coded``, the mask the frame carried, if it carried one; otherwise ``prev``, the last mask carried since the
    frame's I frame (none after an I frame without a mask, so that every intra period decodes on its own).
    Encoder and decoder both keep it, so they agree on every context."""
    if coded is not None:
        return coded
    return None if intra else prev


def decode_mask(dec: Any, shape: tuple[int, int], prev: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`encode_mask` for a mask of ``shape`` (with the same ``prev``)."""
    n = shape[0] * shape[1]
    if prev is None:
        return _decode_bits(dec, n).reshape(shape).astype(bool)
    ctx = np.asarray(prev, dtype=bool).reshape(-1)
    if ctx.size != n:
        raise ShapeError(f"the previous ROI mask has {ctx.size} blocks, this frame's {n}")
    flat = np.zeros(n, dtype=np.int32)
    flat[~ctx] = _decode_bits(dec, int((~ctx).sum()))
    flat[ctx] = _decode_bits(dec, int(ctx.sum()))
    return flat.reshape(shape).astype(bool)


def _decode_bits(dec: Any, n: int) -> np.ndarray:
    import constriction

    if n == 0:
        return np.zeros(0, dtype=np.int32)
    k = int(dec.decode(constriction.stream.model.Uniform(n + 1), 1)[0])
    p = min(max(k / n, 1e-6), 1 - 1e-6)
    return np.asarray(dec.decode(constriction.stream.model.Bernoulli(p, perfect=False), n), dtype=np.int32)


def mask_function(mask16: Tensor) -> Any:
    """The region context's mask at any layer resolution from the latent-resolution mask [B or 1, 1, H, W] (bool).

    A tensor of spatial size (h, w) lies at a power-of-two scale of the mask, rounded by strided convolutions
    (ceil) or padded by upsampling networks: the scale is the power of two nearest to h / H in log2. Finer tensors
    get the nearest-upsampled mask, coarser ones the max-pooled mask (rule "any", ceil mode), then the result is
    cropped or padded with non-ROI to (h, w) (positions past the frame's latent grid are outside the frame).
    Encoder and decoder use this one function, so their masks agree."""
    m = mask16.to(torch.bool)
    big_h = int(m.shape[-2])

    def at(size: tuple[int, int]) -> Tensor:
        h, w = int(size[0]), int(size[1])
        e = int(round(float(np.log2(h / big_h)))) if h != big_h else 0
        if e > 0:
            r = m.repeat_interleave(2 ** e, dim=2).repeat_interleave(2 ** e, dim=3)
        elif e < 0:
            r = F.max_pool2d(m.to(torch.float32), 2 ** -e, ceil_mode=True) > 0
        else:
            r = m
        r = r[..., :h, :w]
        if r.shape[-2:] != (h, w):
            r = F.pad(r, (0, w - r.shape[-1], 0, h - r.shape[-2]))
        return r

    return at


# ---- the cost the objective penalises -------------------------------------------------------------------------

@dataclass
class _Layer:
    macs_per_pixel: float  # MACs per luma pixel of the frame
    stride: int  # luma pixels per output position (1/2 .. 1/64 resolution -> 2 .. 64)
    region: bool  # region-quantized (else: fixed width, or float)
    bits_product: float  # b_w * b_a of a fixed-width layer; 64 for a float layer (its MACs count once: Bit-FLOPs =
    # float FLOPs + BOPs / 64, SPEC section 3)


@dataclass
class BitFlopsTable:
    """MACs per luma pixel and resolution of every layer of the networks a frame type runs (from bitalloc's cost
    model on a reference frame), for the objective's expected Bit-FLOPs (module docstring)."""

    layers: dict[str, list[_Layer]] = field(default_factory=dict)  # frame type "I" / "P" -> layers

    @classmethod
    def build(cls, model: VideoCodec, size: int = 128) -> "BitFlopsTable":
        from bitalloc.codec.cost import region_cost
        from bitalloc.codec.precision import coders

        c = coders(model)
        table = cls()
        pixels = size * size
        for kind, names in FRAME_CODERS.items():
            rows: list[_Layer] = []
            for name in names:
                coder = c[name]
                for part in ALL_PARTS:
                    net = getattr(coder, part)
                    frame = region_cost(net, network_input(coder, part, size), torch.ones(1, size, size, dtype=torch.bool),
                                        8, 8)[0]
                    for layer in frame.layers:
                        positions = max(layer.positions, 1)
                        stride = int(round((pixels / positions) ** 0.5))
                        prod = layer.roi.w_bits * layer.roi.a_bits if layer.quantized else 64.0  # float: 1 x MACs
                        rows.append(_Layer(layer.macs / pixels, stride, layer.region_quantized, float(prod)))
            table.layers[kind] = rows
        return table

    def reference(self, kind: str) -> float:
        """Bit-FLOPs per luma pixel of the frame type with every region layer at 8 bits."""
        return sum(l.macs_per_pixel * (64.0 if l.region else l.bits_product) / 64.0 for l in self.layers[kind])

    def expected(self, kind: str, fractions: dict[int, Tensor], e_roi: Tensor, e_non: Tensor) -> Tensor:
        """Expected Bit-FLOPs per luma pixel [B]: ``fractions`` maps a layer stride to the ROI share [B] at that
        resolution; ``e_roi`` / ``e_non`` are E[b^2] of each region [B]."""
        total = torch.zeros_like(e_roi)
        for l in self.layers[kind]:
            if l.region:
                f = fractions[l.stride]
                total = total + l.macs_per_pixel * (f * e_roi + (1 - f) * e_non) / 64.0
            else:
                total = total + l.macs_per_pixel * l.bits_product / 64.0
        return total

    def relative(self, kind: str, mask16: Tensor, e_roi: Tensor, e_non: Tensor) -> Tensor:
        """The objective's C [B]: expected Bit-FLOPs per luma pixel relative to every region layer at 8 bits, for
        latent masks ``mask16`` [B, 1, h, w] and E[b^2] per region ``e_roi`` / ``e_non`` [B]."""
        fr = roi_fractions(mask16, [l.stride for l in self.layers[kind]])
        return self.expected(kind, fr, e_roi, e_non) / self.reference(kind)


def roi_fractions(mask16: Tensor, strides: Sequence[int]) -> dict[int, Tensor]:
    """The ROI share [B] of each stride's tensors from the latent-resolution masks [B, 1, h, w] (bool): finer
    tensors are nearest-upsampled (the same share), coarser ones max-pooled."""
    m = mask16.to(torch.float32)
    out = {}
    for s in sorted(set(strides)):
        if s <= MASK_FACTOR:
            out[s] = m.mean(dim=(1, 2, 3))
        else:
            k = s // MASK_FACTOR
            out[s] = F.max_pool2d(m, k, ceil_mode=True).mean(dim=(1, 2, 3))
    return out


# ---- one frame under region precision (training) ---------------------------------------------------------------

@dataclass
class FrameChoice:
    """What the selector chose for a batch of frames: latent masks, widths (weights over candidates) and the
    expected relative Bit-FLOPs."""

    mask16: Tensor
    roi: Tensor
    non_roi: Tensor
    relative_bit_flops: Tensor
    roi_fraction: Tensor


class DynamicFrames:
    """Per-frame hook of :meth:`VideoCodec.forward` for training with dynamic precision: computes each frame's
    ROI (``roi_source`` on the crop's luma), its latent mask, the selector's features and Gumbel-softmax choice,
    and runs the frame's coding under :func:`bitalloc.model.region.region_precision`. ``choices`` collects one
    :class:`FrameChoice` per frame for the loss.

    ``explore`` (a probability p): each frame of the batch is, with probability p, coded at a pair drawn uniformly
    from the candidates (each region's width independently; one-hot, no gradient to the selector) instead of the
    selector's sample. The selectors trained so far settle on the narrowest pair, and then only that pair's
    quantization trains the shared weights: the wider pairs end up worse than the narrow one (the shipped {4,8,16}
    codec: 8/8 and 16/16 +5.7% BD-rate against FP32 on carphone where 4/4 is +1.1%), which leaves a width search
    nothing to choose. Exploration trains every pair, as switchable-precision training does (with p = 0.5, 8 frames
    of carphone / tree: 8/8 +1.8% / -0.8%, 4/4 +4.4% / +2.0%; docs/roi.md "Exploration")."""

    def __init__(self, model: VideoCodec, table: BitFlopsTable, roi_source: Any, explore: float = 0.0,
                 level: Tensor | None = None):
        if not 0.0 <= float(explore) <= 1.0:
            raise ConfigError(f"explore={explore}: give the share of frames coded at random widths, 0 to 1")
        self.model = model
        #: the batch's quality levels [B] (what a per-level selector reads; a plain one ignores them)
        self.level = level
        self.table = table
        self.roi_source = roi_source
        self.explore = float(explore)
        self.choices: list[FrameChoice] = []

    def _explored(self, r: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
        """``r``, ``n`` [B, K] with each row replaced, with probability ``explore``, by uniform random one-hots."""
        if self.explore <= 0.0:
            return r, n
        b, k = r.shape
        pick = (torch.rand(b) < self.explore).to(r.device)[:, None]
        rand = F.one_hot(torch.randint(k, (2, b)), k).to(device=r.device, dtype=r.dtype)
        return torch.where(pick, rand[0], r), torch.where(pick, rand[1], n)

    @contextlib.contextmanager
    def __call__(self, t: int, x: Tensor, ref: Tensor | None, flow: Tensor | None) -> Iterator[None]:
        from bitalloc.codec.networks import unpack_yuv
        from bitalloc.codec.selector import frame_features
        from bitalloc.model.region import region_precision

        y, _, _ = unpack_yuv(x.detach())
        luma = (y.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        masks = self.roi_source(luma).masks
        h, w = luma.shape[1:]
        m16 = torch.from_numpy(np.stack([latent_mask(m, h, w) for m in masks]))[:, None]
        flows = None if flow is None else flow.detach().cpu().numpy()
        feats = frame_features(luma, masks, flows)
        sel = self.model.selector
        r, n = self._explored(*sel(feats, level=self.level))
        cands = torch.tensor(sel.candidates, dtype=r.dtype, device=r.device)
        e_roi, e_non = (r * cands ** 2).sum(-1), (n * cands ** 2).sum(-1)
        rel = self.table.relative("I" if ref is None else "P", m16, e_roi, e_non)
        self.choices.append(FrameChoice(m16, r, n, rel, m16.float().mean(dim=(1, 2, 3))))
        with region_precision(self.model, mask_function(m16), r, n):
            yield


__all__ = ["BitFlopsTable", "with_candidates", "DynamicFrames", "FrameChoice", "MASK_FACTOR", "carried_mask",
           "decode_mask", "dynamic_quant_config", "encode_mask", "latent_mask", "mask_context", "mask_function",
           "mask_in_stream", "prepare_dynamic", "roi_fractions"]
