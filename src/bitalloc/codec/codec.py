"""Compressing and decompressing video with a trained (quantized) :class:`~bitalloc.codec.model.VideoCodec`.

CompressAI-style verbs: :meth:`VideoCoder.compress` (frames -> stream bytes, plus the encoder's reconstruction)
and :meth:`VideoCoder.decompress` (stream -> frames). Frames are :class:`~bitalloc.codec.frames.YUVFrames` of any
size: padded by edge replication to a multiple of 16 luma pixels for the networks and cropped back.

**Exactness.** Everything the decoder computes is reproducible bit for bit on any machine and thread count:

* decoder networks are quantized and frozen (:mod:`bitalloc.codec.precision`) and run in
  :func:`~bitalloc.runtime.integer.integer_mode` with the exact float kernel;
* between them only exactly rounded elementwise operations run (gains, means, ReLU, rounding, clamping);
* scales become table indices by comparisons; probabilities come from stored tables or from ``constriction``;
* motion compensation is integer (:func:`bitalloc.codec.motion.warp_int`), reconstructions are 8-bit integers.

The encoder computes the same decoder-side values (it *is* the decoder, plus analysis transforms and motion
estimation), so the encoder's reconstruction is the decoder's output.

Per frame (one range-coded payload, FIFO): I frames code the hyper-latent z then the latent y of the intra coder;
P frames code the motion coder's z and y, then the residual coder's z and y. Symbols outside the coder's support
are clamped at the encoder (``clamped`` counts them).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bitalloc.codec.bitstream import (FRAME_I, FRAME_P, VERSION, BitstreamError, FrameRecord, StreamHeader, read_stream,
                                      write_stream)
from bitalloc.codec.entropy import Y_RANGE, Z_RANGE
from bitalloc.codec.frames import YUVFrames
from bitalloc.codec.model import FLOW_SCALE, HyperpriorCoder, VideoCodec
from bitalloc.codec.motion import estimate_flow_packed, quantize_flow, warp_int
from bitalloc.codec.networks import pack_yuv, unpack_yuv
from bitalloc.codec.precision import is_quantized, model_id
from bitalloc.codec.refine import DEFAULT_LR, LatentRefiner
from bitalloc.errors import ConfigError

#: spatial granularity of the networks (luma pixels): latents are at 1/16
ALIGN = 16
#: the weights of the analysis' nonlinear branch the encoder tries on every frame (y = L(x) + a N(x); see
#: :class:`VideoCoder`)
ANALYSIS_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)


def _values(given: Sequence[Any] | str, convert: Callable[[Any], Any]) -> list:
    """``given`` (a sequence, or its comma-separated text) converted item by item; [] when an item does not
    convert."""
    try:
        items = [t for t in given.split(",") if t.strip()] if isinstance(given, str) else list(given)
        return [convert(v) for v in items]
    except (TypeError, ValueError, OverflowError):
        return []


def _whole(value: Any) -> int:
    """``value`` (a number or its text) as an int; ValueError unless it is a whole number."""
    f = float(value)
    if f != int(f):
        raise ValueError(f"{value!r} is not a whole number")
    return int(f)


def check_analysis_scales(scales: Sequence[float] | str) -> tuple[float, ...]:
    """``scales`` (floats, or their comma-separated text) as a tuple of distinct values in [0, 2], in the given
    order; ConfigError naming the problem otherwise."""
    vals = _values(scales, float)
    if not vals or any(not (0.0 <= v <= 2.0) for v in vals) or len(set(vals)) != len(vals):
        raise ConfigError(f"analysis scales {scales!r}: give distinct values between 0 and 2, e.g. 0,0.25,0.5,0.75,1 "
                          "(1 alone: the trained analysis, fastest encoding)")
    return tuple(vals)


def check_level_offsets(offsets: Sequence[int] | int | str) -> tuple[int, ...]:
    """``offsets`` (an integer, integers, or their comma-separated text, e.g. "-2" or "-3,-2,-1,0") as a tuple of
    distinct integers between -16 and 16, in the given order; ConfigError naming the problem otherwise."""
    vals = _values([offsets] if isinstance(offsets, int) and not isinstance(offsets, bool) else offsets, _whole)
    if not vals or any(abs(v) > 16 for v in vals) or len(set(vals)) != len(vals):
        raise ConfigError(f"P-frame level offsets {offsets!r}: give distinct whole numbers between -16 and 16, e.g. -2 "
                          "(every P frame two levels below the I frames) or -3,-2,-1,0 (chosen per frame); 0 alone is "
                          "the default")
    return tuple(vals)


def add_p_level_args(p: Any) -> None:
    """The ``--p-level-offsets`` option of ``codec encode`` and ``codec eval`` (:class:`VideoCoder`'s
    ``p_level_offsets``)."""
    p.add_argument("--p-level-offsets", metavar="O[,O...]", default="0",
                   help="quality levels of P frames relative to --quality: one offset codes every P frame at it (e.g. "
                        "=-2: two levels below the I frames), several (e.g. =-3,-2,-1,0) code each P frame at each "
                        "and keep the least rate + lambda * distortion (lambda of --quality; one encode per offset); "
                        "the levels are in the stream (default 0; write negative values with '=')")


def _is_count(value: Any, least: int) -> bool:
    """Whether ``value`` is an integer (any integral type, not a bool) of at least ``least``."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= least


def _constriction() -> Any:
    try:
        import constriction
    except ImportError as exc:  # pragma: no cover - the codec extra is installed with `all`
        raise ConfigError("the video codec needs constriction: pip install 'bitalloc[codec]'") from exc
    return constriction


def padded_size(height: int, width: int) -> tuple[int, int]:
    return -(-height // ALIGN) * ALIGN, -(-width // ALIGN) * ALIGN


def frame_tensor(frames: YUVFrames, index: int, size: tuple[int, int]) -> Tensor:
    """Frame ``index`` as packed int64 codes [1, 6, H/2, W/2], edge-padded to ``size`` (luma, multiples of 2)."""
    hp, wp = size
    y = torch.from_numpy(frames.y[index].astype(np.int64))
    u = torch.from_numpy(frames.u[index].astype(np.int64))
    v = torch.from_numpy(frames.v[index].astype(np.int64))

    def pad(p: Tensor, h: int, w: int) -> Tensor:
        return F.pad(p[None, None].float(), (0, w - p.shape[1], 0, h - p.shape[0]), mode="replicate")[0, 0].long()

    return pack_yuv(pad(y, hp, wp)[None], pad(u, hp // 2, wp // 2)[None], pad(v, hp // 2, wp // 2)[None])


def crop_frame(packed: Tensor, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed int codes [1, 6, h, w] -> cropped uint8 planes."""
    y, u, v = unpack_yuv(packed)
    ch, cw = (height + 1) // 2, (width + 1) // 2
    to8 = lambda t: t[0].to(torch.uint8).numpy()  # noqa: E731
    return to8(y[:, :height, :width]), to8(u[:, :ch, :cw]), to8(v[:, :ch, :cw])


def to_pixels(x: Tensor) -> Tensor:
    """Network output in [0, 1] units -> 8-bit codes (int64): clamp(round(255 x), 0, 255)."""
    return torch.round(x * 255.0).clamp_(0, 255).to(torch.int64)


@dataclass
class LatentStats:
    """Symbols and bits of one coded latent pair (filled by the encoder)."""

    z_symbols: int = 0
    y_symbols: int = 0
    clamped: int = 0


class _Latents:
    """Entropy coding of one :class:`HyperpriorCoder`'s latents into / out of a range-coded payload."""

    def __init__(self, coder: HyperpriorCoder):
        self.coder = coder
        c = _constriction()
        self.gauss = c.stream.model.QuantizedGaussian(-Y_RANGE, Y_RANGE)
        self.categorical = c.stream.model.Categorical(perfect=False)

    def _level(self, level: int) -> Tensor:
        return torch.tensor([level])

    def _z_rows(self, shape: tuple[int, ...]) -> np.ndarray:
        ch = np.repeat(np.arange(shape[1]), shape[2] * shape[3])
        return self.coder.entropy_bottleneck.symbol_probabilities(ch)

    def _synthesize(self, z_hat: Tensor, y_from: Callable[[Tensor, Tensor], Tensor], level: int,
                    y_size: tuple[int, int], context: Tensor | None) -> Tensor:
        lv = self._level(level)
        mu, log_scale = self.coder.entropy_parameters(z_hat, lv, y_size, coding=True, context=context)
        return self.coder.synthesize(y_from(mu, log_scale), lv, context, coding=True)

    def encode(self, x: Tensor, level: int, enc: Any, stats: LatentStats, analysis_scale: float = 1.0,
               refine: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
               context: Tensor | None = None) -> Tensor:
        """Code x's latents into ``enc``; returns the decoder's synthesis output (float). ``analysis_scale``: the
        weight of the analysis' nonlinear branch (:class:`bitalloc.codec.networks.Analysis`; an encoder choice);
        ``refine(y_g, z_g) -> (y_g, z_g)``: the encoder's latent refinement (:mod:`bitalloc.codec.refine`);
        ``context``: what a conditional synthesis or hyper synthesis reads
        (:meth:`bitalloc.codec.model.InterCodec.residual_context`)."""
        lv = self._level(level)
        c = self.coder
        yg = c.analysis(x, analysis_scale) * c.gain("y", lv, coding=True)
        zg = c.hyper_analysis(yg) * c.gain("z", lv, coding=True)
        if refine is not None:
            yg, zg = refine(yg, zg)
        z_sym = torch.round(zg)
        stats.clamped += int((z_sym.abs() > Z_RANGE).sum())
        z_sym = z_sym.clamp(-Z_RANGE, Z_RANGE)
        zi = z_sym.to(torch.int64)
        enc.encode((zi + Z_RANGE).reshape(-1).numpy().astype(np.int32), self.categorical,
                   self._z_rows(tuple(zi.shape)))
        stats.z_symbols += zi.numel()

        def y_from(mu: Tensor, log_scale: Tensor) -> Tensor:
            y_sym = torch.round(yg - mu)
            stats.clamped += int((y_sym.abs() > Y_RANGE).sum())
            y_sym = y_sym.clamp(-Y_RANGE, Y_RANGE)
            idx = c.gaussian_conditional.scale_index(log_scale)
            enc.encode(y_sym.reshape(-1).to(torch.int32).numpy(), self.gauss, np.zeros(y_sym.numel()),
                       c.gaussian_conditional.table_scales(idx))
            stats.y_symbols += y_sym.numel()
            return y_sym + mu

        return self._synthesize(z_sym, y_from, level, tuple(yg.shape[-2:]), context)

    def decode(self, dec: Any, level: int, y_shape: tuple[int, int, int, int], context: Tensor | None = None) -> Tensor:
        """Decode latents of shape ``y_shape`` (its hyper-latent's shape follows) from ``dec``; ``context`` as for
        :meth:`encode`."""
        c = self.coder
        nz = c.entropy_bottleneck.channels
        hz, wz = -(-y_shape[2] // 4), -(-y_shape[3] // 4)
        z_shape = (1, nz, hz, wz)
        z = dec.decode(self.categorical, self._z_rows(z_shape)).astype(np.int64) - Z_RANGE
        z_hat = torch.from_numpy(z).reshape(z_shape).to(torch.float32)

        def y_from(mu: Tensor, log_scale: Tensor) -> Tensor:
            idx = c.gaussian_conditional.scale_index(log_scale)
            n = mu.numel()
            y = dec.decode(self.gauss, np.zeros(n), c.gaussian_conditional.table_scales(idx))
            return torch.from_numpy(y.astype(np.float32)).reshape(mu.shape) + mu

        return self._synthesize(z_hat, y_from, level, (y_shape[2], y_shape[3]), context)


@dataclass
class FrameInfo:
    """One coded frame: type, bytes of its record, PSNR_YUV, and with dynamic precision the widths, the ROI share
    of its latent mask, the mask's bits in the payload and the time the ROI source took."""

    index: int
    kind: str
    bytes: int
    psnr: float | None = None
    encode_s: float = 0.0
    symbols: int = 0
    clamped: int = 0
    roi_bits: int = 0
    non_roi_bits: int = 0
    roi_fraction: float | None = None
    mask_bits: int = 0
    roi_seconds: float = 0.0
    #: the weight of the analysis' nonlinear branch the encoder chose for this frame (:class:`VideoCoder`)
    analysis_scale: float = 1.0
    #: the quality level the frame was coded at (the stream's, or for a P frame one of ``p_level_offsets`` from it)
    level: int = 0
    #: whether the frame was coded with refined latents (``VideoCoder(refine_steps=...)``, :mod:`bitalloc.codec.refine`)
    refined: bool = False
    #: dynamic precision: the ROI source's mask at luma resolution (bool [height, width], cropped to the frame) and
    #: the latent mask coded in the stream (bool [padded height / 16, padded width / 16]); None otherwise
    roi_mask: np.ndarray | None = field(default=None, repr=False)
    latent_mask: np.ndarray | None = field(default=None, repr=False)
    #: dynamic precision: the selector's 8 features of the frame (:func:`bitalloc.codec.selector.frame_features`)
    features: np.ndarray | None = field(default=None, repr=False)
    #: with the encoder's width search (``compress(search_gamma=...)``): per (ROI, non-ROI) pair tried, the least
    #: bits per pixel + lambda * MSE_YUV of its trials and its Bit-FLOPs relative to 8 bits everywhere
    pair_costs: dict[tuple[int, int], tuple[float, float]] | None = field(default=None, repr=False)
    #: with the search's lookahead (``search_lookahead=N``): per pair, the next N frames coded at it: their summed
    #: bits per pixel + lambda * MSE_YUV and summed relative Bit-FLOPs (score at gamma G: the first + G * the second)
    pair_lookahead: dict[tuple[int, int], tuple[float, float]] | None = field(default=None, repr=False)


class _LatentSet:
    """The entropy coders of the three coders of one (branch of a) codec."""

    def __init__(self, model: VideoCodec):
        self.intra = _Latents(model.intra.coder)
        self.motion = _Latents(model.inter.motion)
        self.residual = _Latents(model.inter.residual)


@dataclass
class CompressResult:
    """What :meth:`VideoCoder.compress` returns: the stream, the reconstruction (= the decoder's), per-frame info."""

    stream: bytes
    reconstruction: YUVFrames
    frames: list[FrameInfo] = field(default_factory=list)
    encode_seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return len(self.stream)


class VideoCoder:
    """Codes video with a quantized, frozen :class:`VideoCodec` (see the module docstring).

    Every frame's side information carries two widths (ROI, non-ROI): the codec's fixed precision, or with dynamic
    precision the selector's choice (or the ``widths`` given to :meth:`compress`). ``motion_preset``: DIS preset of
    the encoder's motion estimation; ``roi``: the ROI source of a dynamic-precision codec (default: the codec's).

    **Encoder-side rate-distortion choice of the analysis.** The analysis transforms run only at the sender, so the
    encoder may code a frame with any latents it likes: for every frame it tries y = L(x) + a N(x) (linear block
    transform plus ``a`` times the nonlinear branch, :class:`~bitalloc.codec.networks.Analysis`) for each ``a`` in
    ``analysis_scales``, in every coder of the frame, and keeps the payload of least bits per pixel + lambda *
    MSE_YUV, the objective the codec was trained on (lambda: the quality level's). The stream and the decoder do not
    change. Measured (BENCHMARKS.md, "Learned video codec"): the trained branch at full weight is far from the best
    choice on held-out content (the intra codec alone: -44% BD-rate on held-out images with these five scales); the
    cost is one encode per scale (``analysis_scales=(1.0,)``: the trained analysis only, fastest). Like the choice
    of motion vectors in any encoder, this is search at the sender, in the spirit of the encoder-side latent
    refinement of Yang et al. 2020 ("Improving inference for neural image compression").

    **Latent refinement** (``refine_steps`` N > 0, :mod:`bitalloc.codec.refine`): the latents of the intra coder
    (I frames) and of the residual (P frames) of the best trial are refined by N iterations of gradient descent on
    the same objective (in a float copy of the decoder), the frame is coded again with them, and the cheaper payload
    is kept (``FrameInfo.refined`` says which). Nothing is signalled; decoding is unchanged and exact. Measured
    (BENCHMARKS.md, N = 30): 1% fewer bits at equal PSNR on carphone, 9% on tree, 0.2% on held-out images; each
    refined frame costs N forward and backward passes of the decoder, 7-13x the default encoder's time.
    Dynamic-precision codecs refine at the frame's widths, split by its ROI mask, as it is coded.

    **Quality level of P frames** (``p_level_offsets``, default ``(0,)``): the levels a P frame may be coded at,
    relative to the stream's quality level ``q`` (clamped to the codec's levels). With one offset every P frame is
    coded at ``q + offset`` (like x265's ratio of I- to P-frame quantizers); with several, each P frame is coded at
    each of them and the payload of least bits per pixel + lambda_q * MSE_YUV is kept, lambda_q the stream's level's,
    so that every trial of every frame is scored by one trade-off. I frames are at ``q``. Each frame record carries
    its level (bitstream version 3), so decoding needs nothing more. Several offsets multiply the encoding work of
    P frames by their number. Measured (BENCHMARKS.md, "Quality level of P frames").

    ``adaptive_intra``: also code every P frame as an I frame and keep whichever costs less (the same objective;
    the frame record says its type, so the decoder needs nothing more; like x265's scene-cut decision, the intra
    period stays the longest distance between I frames). Twice the encoding work for P frames; off by default.

    ``exact=False`` also accepts a codec whose decoder networks are *not* quantized (the FP32 codec, e.g. a training
    checkpoint loaded with :func:`bitalloc.train.checkpoint.load_model_checkpoint`, after ``coder.update()`` on each
    of :func:`bitalloc.codec.precision.coders`): its networks then run in float32 PyTorch in this process (no
    integer mode), and the widths fields say 32. Such a stream is **only guaranteed to decode in the same process
    with the same thread count** (float sums depend on the summation order, and one ulp of difference in an entropy
    parameter breaks the range decoder); it is a reference for evaluation, not a format to store or send. Quantized
    codecs run exactly whatever ``exact`` says.
    """

    def __init__(self, model: VideoCodec, *, motion_preset: str = "medium", roi: str | None = None,
                 exact: bool = True, analysis_scales: Sequence[float] | str = ANALYSIS_SCALES,
                 adaptive_intra: bool = False, refine_steps: int = 0, refine_lr: float = DEFAULT_LR,
                 p_level_offsets: Sequence[int] | int | str = (0,)):
        self.analysis_scales = check_analysis_scales(analysis_scales)
        self.p_level_offsets = check_level_offsets(p_level_offsets)
        self.adaptive_intra = bool(adaptive_intra)
        quantized = is_quantized(model)
        if exact and not quantized:
            raise ConfigError("the codec's decoder networks are not quantized: its stream would not decode exactly "
                              "elsewhere; load shipped weights (bitalloc.codec.load_codec) or quantize and freeze "
                              "them (bitalloc.codec.precision), or pass exact=False for an in-process float reference")
        if not quantized and model.cfg.candidates:
            raise ConfigError("a dynamic-precision codec needs region-quantized networks (bitalloc.codec.dynamic."
                              "prepare_dynamic, or weights written by `bitalloc codec train --stage dynamic`)")
        self.exact = quantized  # whether streams decode bit for bit anywhere (else: float networks, this process)
        self.model = model.eval()
        self.motion_preset = motion_preset
        self._int_cache: dict = {}  # weight codes and accumulator analyses of the frozen decoder networks
        self._bit_flops: Any = None  # the width search's cost table (bitalloc.codec.dynamic.BitFlopsTable), when used
        self.id = model_id(model)
        for c in (model.intra.coder, model.inter.motion, model.inter.residual):
            if not c.entropy_bottleneck.ready or not bool((c.gain_table != 0).all()):
                raise ConfigError("the codec's coding tables (gains, hyper-latent probabilities) were never stored: "
                                  "save it with bitalloc.codec.save_codec, or call coder.update() on each coder")
        self.dynamic = bool(model.cfg.candidates)
        if self.dynamic:  # one frozen copy per candidate width, run split by the frame's ROI mask
            from bitalloc.codec.roi import parse_roi_spec
            from bitalloc.model.region import frozen_branches

            self.branches = frozen_branches(model, model.cfg.candidates)
            self._branch_cache: dict[int, dict] = {b: {} for b in self.branches}
            self.roi = parse_roi_spec(roi or model.cfg.roi)
            self.bits = max(model.cfg.candidates)
        else:
            if roi is not None:
                raise ConfigError("--roi needs a dynamic-precision codec (one trained with `bitalloc codec train "
                                  "--stage dynamic`); these weights have one fixed precision")
            self.bits = _decoder_bits(model) if quantized else 32
            self.latents = _LatentSet(model)
        self.refiner = LatentRefiner(model, refine_steps, refine_lr, branches=self.branches if self.dynamic else None)

    @contextlib.contextmanager
    def _frame_latents(self, mask16: np.ndarray | None, roi_bits: int, non_roi_bits: int) -> Iterator[_LatentSet]:
        """The entropy coders to use for one frame: the model's (fixed precision; integer mode is entered by the
        caller once per video), or the ROI-width branch split by the mask at the two widths, in integer mode."""
        if not self.dynamic:
            yield self.latents
            return
        from bitalloc.model.region import split_execution
        from bitalloc.runtime.integer import integer_mode

        from bitalloc.codec.dynamic import mask_function

        # equal widths run one branch everywhere and need no mask (the decoder may have none: mask_in_stream)
        mask = (None if int(roi_bits) == int(non_roi_bits)
                else mask_function(torch.from_numpy(np.ascontiguousarray(mask16))[None, None]))
        with contextlib.ExitStack() as stack:
            for b in sorted({int(roi_bits), int(non_roi_bits)}):
                stack.enter_context(integer_mode(self.branches[b], kernel="float", strict=True,
                                                 cache=self._branch_cache[b]))
            driver = stack.enter_context(split_execution(self.branches, mask, int(roi_bits), int(non_roi_bits)))
            yield _LatentSet(driver)

    def _whole(self) -> Any:
        """The context of a whole video: integer mode for a fixed-precision quantized codec (entered once); dynamic
        codecs enter it per frame (:meth:`_frame_latents`), float references not at all."""
        from bitalloc.runtime.integer import integer_mode

        if self.dynamic or not self.exact:
            return contextlib.nullcontext()
        return integer_mode(self.model, kernel="float", strict=True, cache=self._int_cache)

    def check_widths(self, widths: tuple[int, int] | Any) -> tuple[int, int]:
        """``widths`` as a (ROI, non-ROI) pair of ints this codec can code at (ConfigError naming the allowed
        widths otherwise): candidates of a dynamic codec, or the fixed codec's own precision."""
        allowed = sorted(self.model.cfg.candidates) if self.dynamic else [self.bits]
        what = (f"this codec's candidate widths are {allowed}" if self.dynamic
                else f"this codec has one fixed precision, {self.bits} bits")
        try:
            pair = tuple(int(w) for w in widths)
        except (TypeError, ValueError):
            pair = ()
        if len(pair) != 2 or any(w not in allowed for w in pair):
            raise ConfigError(f"widths {widths!r}: give a (ROI, non-ROI) pair of widths; {what}")
        return int(pair[0]), int(pair[1])

    def _choose(self, x: Tensor, prev: Tensor | None, flow: Tensor | None, info: FrameInfo,
                widths: tuple[int, int] | None = None, level: int = 0) -> tuple[np.ndarray, int, int]:
        """Dynamic precision at the encoder: the frame's ROI (the ROI source on its luma), latent mask, the
        selector's features and widths (``widths``: forced, the selector is bypassed; ``level``: the stream's
        quality level, which a per-level selector reads)."""
        from bitalloc.codec.dynamic import latent_mask
        from bitalloc.codec.selector import frame_features

        luma = unpack_yuv(x)[0].to(torch.uint8).numpy()  # [1, H, W], padded
        t0 = time.perf_counter()
        if prev is not None:  # sources that compare frames (motion) see the previous decoded frame
            both = np.concatenate([unpack_yuv(prev)[0].to(torch.uint8).numpy(), luma])
            mask = self.roi(both, None if flow is None else np.concatenate([np.zeros_like(flow.numpy()),
                                                                           flow.numpy()])).masks[-1]
        else:
            mask = self.roi(luma).masks[0]
        info.roi_seconds = time.perf_counter() - t0
        h, w = luma.shape[1:]
        m16 = latent_mask(mask, h, w)
        info.features = frame_features(luma, mask[None], None if flow is None else flow.numpy())[0]
        if widths is None:
            bits = self.model.selector.select(info.features[None], roi_fraction=[float(m16.mean())],
                                              level=level)[0]
        else:
            bits = widths
        info.roi_fraction = float(m16.mean())
        info.latent_mask = m16
        info.roi_mask = np.asarray(mask, dtype=bool)  # padded luma size; compress crops it to the frame
        return m16, int(bits[0]), int(bits[1])

    def search_pairs(self, roi_fraction: float) -> list[tuple[int, int]]:
        """The (ROI, non-ROI) pairs the width search tries on a frame: all K^2 candidate pairs, or the K equal pairs
        when the frame is all ROI or has none (the other width would have no position to run on)."""
        cands = self.model.cfg.candidates
        if 0.0 < roi_fraction < 1.0:
            return [(r, n) for r in cands for n in cands]
        return [(b, b) for b in cands]

    def relative_bit_flops(self, kind: str, mask16: np.ndarray, roi_bits: int, non_roi_bits: int) -> float:
        """The frame's Bit-FLOPs at widths (``roi_bits``, ``non_roi_bits``) relative to the same codec at 8 bits
        everywhere: the C of the training objective R + lambda D + gamma C
        (:meth:`bitalloc.codec.dynamic.BitFlopsTable.relative`, hard widths), ``kind`` "I" or "P"."""
        from bitalloc.codec.dynamic import BitFlopsTable

        if self._bit_flops is None:
            self._bit_flops = BitFlopsTable.build(self.model)
        m = torch.from_numpy(np.ascontiguousarray(mask16))[None, None]
        e_roi, e_non = (torch.tensor([float(b) ** 2], dtype=torch.float64) for b in (roi_bits, non_roi_bits))
        return float(self._bit_flops.relative(kind, m, e_roi, e_non)[0])

    def _check_level(self, quality: int) -> None:
        if not 0 <= quality < self.model.cfg.levels:
            raise ConfigError(f"quality {quality} is out of range; this codec has levels 0..{self.model.cfg.levels - 1} "
                              "(0 = lowest rate)")

    # -- one frame ------------------------------------------------------------------------------------------
    def p_levels(self, quality: int) -> list[int]:
        """The levels a P frame of a stream at ``quality`` is tried at: ``quality`` + each of ``p_level_offsets``,
        clamped to the codec's levels, without repeats, in the order of the offsets."""
        top = self.model.cfg.levels - 1
        return list(dict.fromkeys(min(max(quality + o, 0), top) for o in self.p_level_offsets))

    def _refine(self, which: str, level: int, target: Tensor, refine: float | None, region: tuple | None,
                context: Tensor | None = None) -> Any:
        """The latent refinement of coder ``which`` at ``level`` towards ``target`` for :meth:`_Latents.encode`, with
        lambda ``refine`` in its objective, or None (``refine`` None); ``region``: a dynamic codec's (mask, ROI width,
        non-ROI width) of the frame; ``context``: what the coder's conditional synthesis reads."""
        if refine is None:
            return None
        return lambda yg, zg: self.refiner.refine(which, yg, zg, level, target, region, lam=refine,
                                                  context=context)[:2]

    def _intra(self, lat: _LatentSet, x: Tensor, level: int, enc: Any, stats: LatentStats, a: float = 1.0,
               refine: float | None = None, region: tuple | None = None) -> Tensor:
        off = self.model.intra.OFFSET
        xin = x.float() / 255.0 - off
        return to_pixels(lat.intra.encode(xin, level, enc, stats, a,
                                          self._refine("intra", level, xin, refine, region)) + off)

    def _inter(self, lat: _LatentSet, x: Tensor, ref: Tensor, flow: Tensor, level: int, enc: Any,
               stats: LatentStats, a: float = 1.0, refine: float | None = None, region: tuple | None = None) -> Tensor:
        """A P frame; ``refine`` (the objective's lambda): refine the residual's latents (the motion's come from the
        analysis: the prediction they give is the decoder's integer one, which the refinement's target then holds
        fixed)."""
        xf, rf = x.float() / 255.0, ref.float() / 255.0
        flow_hat = lat.motion.encode(torch.cat([flow / FLOW_SCALE, xf, rf], 1), level, enc, stats, a) * FLOW_SCALE
        pred = warp_int(ref, quantize_flow(flow_hat))
        pf = pred.float() / 255.0
        r = xf - pf
        context = self.model.inter.residual_context(pf)
        res = lat.residual.encode(torch.cat([r, pf], 1), level, enc, stats, a,
                                  self._refine("residual", level, r, refine, region, context), context)
        return torch.round(pred.float() + res * 255.0).clamp_(0, 255).to(torch.int64)

    def _decode_intra(self, lat: _LatentSet, dec: Any, level: int, shape: tuple[int, int, int, int]) -> Tensor:
        return to_pixels(lat.intra.decode(dec, level, shape) + self.model.intra.OFFSET)

    def _decode_inter(self, lat: _LatentSet, dec: Any, ref: Tensor, level: int, mshape: tuple, rshape: tuple) -> Tensor:
        flow_hat = lat.motion.decode(dec, level, mshape) * FLOW_SCALE
        pred = warp_int(ref, quantize_flow(flow_hat))
        res = lat.residual.decode(dec, level, rshape, self.model.inter.residual_context(pred.float() / 255.0))
        return torch.round(pred.float() + res * 255.0).clamp_(0, 255).to(torch.int64)

    def _check_widths(self, rec: FrameRecord, i: int, source: str) -> None:
        """The widths a frame signals must be ones this codec decodes at."""
        allowed = set(self.model.cfg.candidates) if self.dynamic else {self.bits}
        if rec.roi_bits not in allowed or rec.non_roi_bits not in allowed:
            what = (f"this codec's candidate widths are {sorted(allowed)}" if self.dynamic
                    else f"this codec decodes at {self.bits} bits only")
            raise BitstreamError(f"{source}: frame {i} signals bit widths {rec.roi_bits}/{rec.non_roi_bits} (ROI / "
                                 f"non-ROI) but {what}; decode it with the codec that wrote it")

    def _shapes(self, size: tuple[int, int]) -> tuple[tuple, tuple]:
        hp, wp = size
        cfg = self.model.cfg
        return (1, cfg.motion_m, hp // 16, wp // 16), (1, cfg.m, hp // 16, wp // 16)

    def _code_frame(self, x: Tensor, ref: Tensor | None, flow: Tensor | None, level: int, a: float,
                    mask16: np.ndarray | None, rb: int, nb: int, size: tuple[int, int],
                    prev_mask: np.ndarray | None = None, refine: bool = False, lam: float | None = None) -> tuple:
        """Code one frame (an I frame when ``ref`` is None) at quality ``level`` with analysis scale ``a`` into a fresh
        payload: (RD cost, payload, reconstruction, stats, mask bits, a, level). The cost is the training objective,
        bits per pixel + lambda * MSE_YUV (pixel units, the frame's own area; ``lam``, default lambda_level). A P
        frame's ROI mask, when the stream carries it (:func:`bitalloc.codec.dynamic.mask_in_stream`), is coded in the
        context of ``prev_mask``, the last one carried (:func:`bitalloc.codec.dynamic.carried_mask`). ``refine``: with
        the latent refinement (:mod:`bitalloc.codec.refine`) of the intra coder or of the residual, on the same
        objective."""
        from bitalloc.codec.networks import weighted_mse

        enc = _constriction().stream.queue.RangeEncoder()
        stats = LatentStats()
        mask_bits = 0
        if _carries_mask(mask16, rb, nb):
            from bitalloc.codec.dynamic import encode_mask, mask_context

            mask_bits = encode_mask(enc, mask16, mask_context(prev_mask, intra=ref is None, version=VERSION))
        lam = float(self.model.lambdas[level]) if lam is None else float(lam)
        region = None
        if refine and mask16 is not None:
            from bitalloc.codec.dynamic import mask_function

            region = (mask_function(torch.from_numpy(np.ascontiguousarray(mask16))[None, None]), rb, nb)
        with self._frame_latents(mask16, rb, nb) as lat:
            how = lam if refine else None
            rec = (self._intra(lat, x, level, enc, stats, a, how, region) if ref is None
                   else self._inter(lat, x, ref, flow, level, enc, stats, a, how, region))
        payload = enc.get_compressed().tobytes()
        h2, w2 = (size[0] + 1) // 2, (size[1] + 1) // 2
        mse = float(weighted_mse(rec[..., :h2, :w2].double(), x[..., :h2, :w2].double()))
        cost = 8.0 * len(payload) / (size[0] * size[1]) + lam * mse
        return cost, payload, rec, stats, mask_bits, a, level

    def _trials(self, x: Tensor, ref: Tensor | None, flow: Tensor | None, level: int, mask16: np.ndarray | None,
                pairs: Sequence[tuple[int, int]], intra: bool, gamma: float | None, size: tuple[int, int],
                prev_mask: np.ndarray | None) -> dict[tuple[int, int], tuple]:
        """Code one frame at each pair of ``pairs`` with every analysis scale (a P frame also at each of
        :meth:`p_levels` of ``level``, and with ``adaptive_intra`` also as an I frame); per pair the trial of least
        bpp + lambda_level * MSE_YUV + ``gamma`` * C (C: :meth:`relative_bit_flops`; no C term when ``gamma`` is
        None): pair -> (that objective, the trial of :meth:`_code_frame`, whether it is an I frame, C, whether its
        latents were refined). With the latent refinement (``refine_steps``), the best trial of each pair is coded
        again from its analysis scale and level with refined latents, and kept if it costs less."""
        best: dict[tuple[int, int], tuple] = {}
        lam = float(self.model.lambdas[level])
        for as_intra in (True,) if intra else (False, True) if self.adaptive_intra else (False,):
            for pair in pairs:
                rel = 0.0 if gamma is None else self.relative_bit_flops("I" if as_intra else "P", mask16, *pair)
                for lv in [level] if as_intra else self.p_levels(level):
                    for a in self.analysis_scales:
                        trial = self._code_frame(x, None if as_intra else ref, flow, lv, a, mask16, *pair, size,
                                                 prev_mask, lam=lam)
                        j = trial[0] + (0.0 if gamma is None else float(gamma) * rel)
                        if pair not in best or j < best[pair][0]:
                            best[pair] = (j, trial, as_intra, rel, False)
        if self.refiner.steps:
            for pair, (j0, trial0, as_intra, rel, _) in list(best.items()):
                trial = self._code_frame(x, None if as_intra else ref, flow, trial0[6], trial0[5], mask16, *pair, size,
                                         prev_mask, refine=True, lam=lam)
                j = trial[0] + (0.0 if gamma is None else float(gamma) * rel)
                if j < j0:
                    best[pair] = (j, trial, as_intra, rel, True)
        return best

    def _lookahead(self, frames: YUVFrames, i: int, rec: Tensor, context: np.ndarray | None, pair: tuple[int, int],
                   level: int, intra_period: int, gamma: float, depth: int,
                   size: tuple[int, int]) -> tuple[float, float]:
        """The width search's lookahead: the next ``depth`` frames coded at the same ``pair`` in turn from ``rec``,
        frame ``i``'s reconstruction at that pair, after which the ROI mask context is ``context`` (motion, ROI and
        mask re-estimated on each, as the encoder would; each frame's trial of least bpp + lambda * MSE_YUV + gamma *
        C): (their summed bpp + lambda * MSE_YUV, their summed C). It stops before the next I frame of the intra
        period (its cost does not depend on frame ``i``) and at the end."""
        rd, rel, ref, prev_mask = 0.0, 0.0, rec, context
        for j in range(i + 1, min(i + 1 + depth, len(frames))):
            if intra_period > 0 and j % intra_period == 0:
                break
            x = frame_tensor(frames, j, size)
            info = FrameInfo(j, "P", 0)
            flow = estimate_flow_packed(x.float() / 255.0, ref.float() / 255.0, self.motion_preset)
            m16, _, _ = self._choose(x, ref, flow, info, pair)
            _, trial, _, c, _ = self._trials(x, ref, flow, level, m16, [pair], False, gamma,
                                             (frames.height, frames.width), prev_mask)[pair]
            rd, rel, ref = rd + trial[0], rel + c, trial[2]
            prev_mask = _next_context(prev_mask, m16, pair, intra=False)
        return rd, rel

    def fixed_pair_costs(self, frames: YUVFrames, *, quality: int, intra_period: int = 32,
                         progress: Callable[[int], None] | None = None) -> list[FrameInfo]:
        """The fitting data of *fixed assignments* (dynamic codecs): ``frames`` coded at every candidate pair in turn
        (``compress(widths=pair)``: K^2 encodes), and per frame the cost it had in the encode at each pair, bits per
        pixel of its record's payload + lambda * MSE_YUV (lambda of the level it was coded at: the width search's
        measure) and its Bit-FLOPs relative to 8 bits everywhere, as ``pair_costs`` of the frame infos of the encode
        at the first pair (whose features, latent mask and ROI share they keep). Unlike the width search, which
        tries every pair on a frame from one reference, a frame's cost here includes what its pair did to the
        references it is predicted from: the effect a fixed assignment has on a whole clip. The selector fitted to
        it (:func:`bitalloc.codec.selector.fit_selector`) then chooses per level exactly as the fixed pairs' summed
        costs rank there (a per-level selector's bias)."""
        if not self.dynamic:
            raise ConfigError("fixed-pair costs need a dynamic-precision codec (trained with --stage dynamic)")
        from bitalloc.codec.metrics import mse_yuv_per_frame

        cands = self.model.cfg.candidates
        pairs = [(r, n) for r in cands for n in cands]
        area = float(frames.height * frames.width)
        infos: list[FrameInfo] = []
        for pair in pairs:
            res = self.compress(frames, quality=quality, intra_period=intra_period, progress=progress, widths=pair)
            records = read_stream(res.stream)[1]
            if not infos:
                infos = res.frames
                for info in infos:
                    info.pair_costs = {}
            mse = mse_yuv_per_frame(frames, res.reconstruction)
            for info, own, record, d in zip(infos, res.frames, records, mse):
                rd = 8.0 * len(record.payload) / area + float(self.model.lambdas[own.level]) * float(d)
                info.pair_costs[pair] = (rd, self.relative_bit_flops(own.kind, own.latent_mask, *pair))
        return infos

    # -- whole videos ---------------------------------------------------------------------------------------
    def compress(self, frames: YUVFrames, *, quality: int, intra_period: int = 32,
                 progress: Callable[[int], None] | None = None,
                 widths: tuple[int, int] | None = None, search_gamma: float | None = None,
                 search_lookahead: int = 0, search_shortlist: int | None = None) -> CompressResult:
        """Code ``frames`` at quality level ``quality`` (0 = lowest rate) with an I frame every
        ``intra_period`` frames (-1: only the first). Returns the stream and the reconstruction.

        ``widths`` (ROI, non-ROI): a *fixed assignment* for every frame of a dynamic codec: the ROI and its latent
        mask are still computed (and coded where the two widths differ), the selector is bypassed; both must be
        candidates of the codec (ConfigError naming them otherwise). A fixed-precision codec accepts only its own
        precision. The stream decodes with the ordinary :meth:`decompress` (the widths are in the frame records).

        ``search_gamma`` G (dynamic codecs): the encoder's *width search* instead of the selector: every frame is
        coded at every candidate pair (:meth:`search_pairs`; with each analysis scale) and the payload of least
        bits per pixel + lambda * MSE_YUV + G * C is kept, C = the frame's Bit-FLOPs relative to 8 bits everywhere
        (:meth:`relative_bit_flops`): per frame, the training objective of ``--stage dynamic --gamma G`` minimised
        by trial instead of predicted, at K^2 times the encoding work. Each frame's info keeps every pair's cost
        (``pair_costs``) and the selector's features, the data :func:`bitalloc.codec.selector.fit_selector` fits a
        selector to.

        ``search_lookahead`` N (with ``search_gamma``): each pair is scored by the frame's objective at it plus that
        of the next N frames coded at the same pair in turn from its reconstruction (:meth:`_lookahead`; up to the
        next I frame), so that a pair whose cheaper reconstruction makes the following P frames dearer is not kept
        for its own frame's sake; the frame is still coded once, at the pair of least score, and the next frame
        chooses again (receding horizon). (1 + N) times the search's work; the pair's lookahead part is kept in
        ``pair_lookahead``.

        ``search_shortlist`` M (with a lookahead): only the M pairs of least objective on the frame itself are
        looked ahead from, and the frame's pair is the best of those (ties by pair): K^2 + M N trials instead of
        K^2 (1 + N). ``pair_lookahead`` then holds the shortlisted pairs only. M = K^2 is the full search."""
        from bitalloc.codec.metrics import psnr_yuv

        if search_gamma is not None:
            if widths is not None:
                raise ConfigError("give fixed widths or a width search (search_gamma), not both")
            if not self.dynamic:
                raise ConfigError("the width search needs a dynamic-precision codec (trained with --stage dynamic)")
            if not math.isfinite(float(search_gamma)) or float(search_gamma) < 0:
                raise ConfigError(f"search gamma {search_gamma}: give a weight >= 0 of the relative Bit-FLOPs")
        if not _is_count(search_lookahead, 0):
            raise ConfigError(f"search lookahead {search_lookahead!r}: give a number of frames >= 0")
        if search_lookahead and search_gamma is None:
            raise ConfigError("a lookahead goes with the width search: give search_gamma too")
        lookahead = int(search_lookahead)
        if search_shortlist is not None:
            if not _is_count(search_shortlist, 1):
                raise ConfigError(f"search shortlist {search_shortlist!r}: give a number of pairs >= 1")
            if not lookahead:
                raise ConfigError("a shortlist chooses which pairs the lookahead scores: give search_lookahead too")
        forced = None if widths is None else self.check_widths(widths)
        self._check_level(quality)
        if intra_period == 0 or intra_period < -1:
            raise ConfigError(f"intra period {intra_period}: give a positive period, or -1 for one intra frame")
        if len(frames) == 0:
            raise ConfigError("no frames to encode")
        _constriction()  # fails here, naming the extra, when constriction is missing
        h, w = frames.height, frames.width
        size = padded_size(h, w)
        records: list[FrameRecord] = []
        infos: list[FrameInfo] = []
        ys, us, vs = [], [], []
        ref = prev_mask = None
        t_all = time.perf_counter()
        with torch.no_grad(), self._whole():
            for i in range(len(frames)):
                t0 = time.perf_counter()
                x = frame_tensor(frames, i, size)
                intra = ref is None or (intra_period > 0 and i % intra_period == 0)
                info = FrameInfo(i, "I" if intra else "P", 0)
                flow = None if intra else estimate_flow_packed(x.float() / 255.0, ref.float() / 255.0, self.motion_preset)
                mask16, rb, nb = (self._choose(x, None if intra else ref, flow, info, forced, quality) if self.dynamic
                                  else (None, self.bits, self.bits))
                # encoder-side RD choices the decoder needs nothing more for: analysis scale, frame type, and with
                # the width search the widths (they are in the frame record)
                pairs = [(rb, nb)] if search_gamma is None else self.search_pairs(info.roi_fraction)
                tried = self._trials(x, ref, flow, quality, mask16, pairs, intra, search_gamma, (h, w), prev_mask)
                score = {p: t[0] for p, t in tried.items()}
                if search_gamma is not None:
                    info.pair_costs = {p: (t[1][0], t[3]) for p, t in tried.items()}
                    if lookahead:
                        kept = sorted(score, key=lambda p: (score[p], p))[:search_shortlist or len(score)]
                        info.pair_lookahead = {
                            p: self._lookahead(frames, i, tried[p][1][2],
                                               _next_context(prev_mask, mask16, p, intra=tried[p][2]), p, quality,
                                               intra_period, search_gamma, lookahead, size)
                            for p in kept}
                        ahead = info.pair_lookahead
                        score = {p: score[p] + ahead[p][0] + float(search_gamma) * ahead[p][1] for p in kept}
                rb, nb = min(score, key=score.__getitem__)
                _, best, intra, _, info.refined = tried[(rb, nb)]
                _, payload, rec, stats, info.mask_bits, info.analysis_scale, info.level = best
                info.kind = "I" if intra else "P"
                fr = FrameRecord(FRAME_I if intra else FRAME_P, rb, nb, payload, level=info.level)
                records.append(fr)
                ref, prev_mask = rec, _next_context(prev_mask, mask16, (rb, nb), intra=intra)
                y, u, v = crop_frame(rec, h, w)
                ys.append(y), us.append(u), vs.append(v)
                info.bytes, info.encode_s = len(fr.pack()), time.perf_counter() - t0
                info.symbols, info.clamped = stats.y_symbols + stats.z_symbols, stats.clamped
                info.roi_bits, info.non_roi_bits = rb, nb
                if info.roi_mask is not None:
                    info.roi_mask = info.roi_mask[:h, :w]
                infos.append(info)
                if progress:
                    progress(1)
        recon = YUVFrames(np.stack(ys), np.stack(us), np.stack(vs), fps=frames.fps)
        header = StreamHeader(self.id, quality, w, h, len(frames), Fraction(frames.fps).limit_denominator(1001),
                              intra_period)
        stream = write_stream(header, records)
        for info, p in zip(infos, psnr_yuv(frames, recon)["per_frame"]["psnr_yuv"]):
            info.psnr = float(p)
        return CompressResult(stream, recon, infos, time.perf_counter() - t_all)

    def decompress(self, stream: bytes, *, frames: int | None = None, source: str = "stream",
                   progress: Callable[[int], None] | None = None) -> YUVFrames:
        """Decode a stream written by :meth:`compress` (by this model; checked) into frames; ``frames``: only
        the first N."""
        header, records = read_stream(stream, source=source, limit=frames)
        if header.model_id != self.id:
            raise BitstreamError(f"{source} was made by another codec model (id {header.model_id.hex()}, this one is "
                                 f"{self.id.hex()}); decode it with the weights that encoded it (--weights)")
        self._check_level(header.quality)
        c = _constriction()
        size = padded_size(header.height, header.width)
        mshape, rshape = self._shapes(size)
        ys, us, vs = [], [], []
        from bitalloc.codec.dynamic import carried_mask, decode_mask, mask_context, mask_in_stream

        ref = carried = None
        with torch.no_grad(), self._whole():
            for i, rec in enumerate(records):
                self._check_widths(rec, i, source)
                if not 0 <= rec.level < self.model.cfg.levels:
                    raise BitstreamError(f"{source}: frame {i} signals quality level {rec.level}, but this codec has "
                                         f"levels 0..{self.model.cfg.levels - 1}; the stream is corrupted")
                words = np.frombuffer(rec.payload, dtype=np.uint32) if len(rec.payload) % 4 == 0 else None
                if words is None:
                    raise BitstreamError(f"{source}: frame {i} has a payload of {len(rec.payload)} bytes, not whole "
                                         "32-bit words; the stream is corrupted")
                dec = c.stream.queue.RangeDecoder(words.copy())
                try:
                    mask16 = None
                    if self.dynamic and mask_in_stream(rec.roi_bits, rec.non_roi_bits, header.version):
                        prev = mask_context(carried, intra=rec.kind == FRAME_I, version=header.version)
                        mask16 = decode_mask(dec, (size[0] // 16, size[1] // 16), prev)
                    carried = carried_mask(carried, mask16, intra=rec.kind == FRAME_I)
                    with self._frame_latents(mask16, rec.roi_bits, rec.non_roi_bits) as lat:
                        if rec.kind == FRAME_I:
                            out = self._decode_intra(lat, dec, rec.level, rshape)
                        else:
                            out = self._decode_inter(lat, dec, ref, rec.level, mshape, rshape)
                except (ValueError, RuntimeError, AssertionError) as exc:
                    raise BitstreamError(f"{source}: frame {i} cannot be decoded ({exc}); the stream does not fit this "
                                         "model") from None
                ref = out
                y, u, v = crop_frame(out, header.height, header.width)
                ys.append(y), us.append(u), vs.append(v)
                if progress:
                    progress(1)
        return YUVFrames(np.stack(ys), np.stack(us), np.stack(vs), fps=float(header.fps))


def _carries_mask(mask16: np.ndarray | None, rb: int, nb: int) -> bool:
    """Whether this bitalloc's streams carry a frame's ROI mask (a dynamic codec's frame at widths ``rb`` / ``nb``)."""
    from bitalloc.codec.dynamic import mask_in_stream

    return mask16 is not None and mask_in_stream(rb, nb, VERSION)


def _next_context(prev: np.ndarray | None, mask16: np.ndarray | None, pair: tuple[int, int], *,
                  intra: bool) -> np.ndarray | None:
    """The encoder's mask context after a frame with latent mask ``mask16`` coded at ``pair`` (the decoder's
    :func:`bitalloc.codec.dynamic.carried_mask`)."""
    from bitalloc.codec.dynamic import carried_mask

    return carried_mask(prev, mask16 if _carries_mask(mask16, *pair) else None, intra=intra)


def _decoder_bits(model: VideoCodec) -> int:
    """The precision of the decoder networks: the activation width of most of their layers (the few layers that
    read decoded latents run at 16 bits, :data:`bitalloc.codec.precision.WIDE_LAYERS`)."""
    from collections import Counter

    from bitalloc.codec.precision import decoder_networks
    from bitalloc.model.layers import quant_layers

    bits = Counter(int(layer.input_quantizer.qparams().bits.max()) for _, net in decoder_networks(model)
                   for _, layer in quant_layers(net) if layer.input_quantizer is not None)
    return bits.most_common(1)[0][0]
