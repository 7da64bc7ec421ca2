"""The codec's models: a mean-scale hyperprior coder, the intra (I) and inter (P) codecs, and the video codec.

:class:`HyperpriorCoder` is one latent with its hyperprior (Minnen et al. 2018, mean-scale, without context model)
and *gain units* for variable rate (Cui et al., "Asymmetric gained deep image compression with continuous rate
adaptation", CVPR 2021): for quality level l, y_g = y * g_l (per channel), z_g = z * h_l, and the decoder
multiplies by the learned inverse gains g'_l, h'_l. One model covers every rate point; level l is trained with
its own lambda_l.

* intra: x (packed YUV 4:2:0) -> y -> x_hat;
* inter (low-delay P, DVC-style with an encoder-side motion estimate, Lu et al. 2019): the flow estimate f (DIS,
  :mod:`bitalloc.codec.motion`) with the current frame and the reference goes through a motion coder whose decoder
  outputs the flow f_hat; the reference warped by f_hat predicts the frame; the residual (with the prediction, at
  the encoder only) goes through a residual coder; x_hat = prediction + residual_hat.

``forward`` returns reconstructions and likelihoods (CompressAI's convention) for training; coding to bytes is in
:mod:`bitalloc.codec.codec`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bitalloc.codec.entropy import PROXIES, EntropyBottleneck, GaussianConditional, rounding_proxy, ste_round
from bitalloc.codec.motion import estimate_flow_packed, warp
from bitalloc.codec.networks import (Analysis, ConditionalHyperSynthesis, HyperAnalysis, HyperSynthesis, Synthesis,
                                     weighted_mse)

#: lambda of each quality level (loss = bits per pixel + lambda * 255^2 * MSE_YUV, CompressAI's MSE lambdas)
DEFAULT_LAMBDAS = (0.0009, 0.0018, 0.0035, 0.0067, 0.013, 0.025, 0.0483, 0.0932)
#: the flow enters the motion encoder divided by this (pixels)
FLOW_SCALE = 8.0
#: a conditional residual synthesis or hyper synthesis reads the prediction centred: pred - CONTEXT_OFFSET (pixels
#: in [0, 1]), packed YUV 4:2:0 (CONTEXT_CHANNELS channels at 1/2 luma resolution)
CONTEXT_OFFSET = 0.5
CONTEXT_CHANNELS = 6


#: configuration fields added after codec weights had shipped: stored only where set (:meth:`CodecConfig.to_dict`)
LATER_FIELDS = ("prior_context", "selector_per_level")


@dataclass
class CodecConfig:
    """Sizes of the video codec (plain data, stored with the weights)."""

    n: int = 64  # channels of the nonlinear branches of the intra / residual transforms
    m: int = 384  # latent channels (intra / residual): the 384 coefficients of the YUV block transform
    nz: int = 64  # hyper-latent channels
    motion_n: int = 48
    motion_m: int = 128  # motion latent channels: the 128 coefficients of the flow's 8x8 block transforms
    motion_nz: int = 32
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    #: dynamic precision (bitalloc.codec.dynamic): the candidate widths of the ROI and non-ROI selector, or None
    candidates: tuple[int, ...] | None = None
    #: dynamic precision: the ROI source (bitalloc.codec.roi.parse_roi_spec)
    roi: str = "spectral"
    #: conditional reconstruction of P frames: the residual synthesis reads the motion-compensated prediction
    #: (:class:`bitalloc.codec.networks.Synthesis` ``context``); False in weights made before it existed
    residual_context: bool = False
    #: conditional entropy model of P frames: the residual's hyper synthesis reads the motion-compensated prediction
    #: too (:class:`bitalloc.codec.networks.ConditionalHyperSynthesis`); False in weights made before it existed
    prior_context: bool = False
    #: dynamic precision: the width selector has a learned bias per quality level
    #: (:class:`bitalloc.codec.selector.WidthSelector` ``levels``); False in weights made before it existed
    selector_per_level: bool = False

    @property
    def levels(self) -> int:
        return len(self.lambdas)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data; those of :data:`LATER_FIELDS` only where set, so that the configuration of weights
        made before they existed, and the identity computed from it (:func:`bitalloc.codec.precision.model_id`, which
        streams carry), stay as they were."""
        d = asdict(self)
        d["lambdas"] = list(self.lambdas)
        d["candidates"] = list(self.candidates) if self.candidates else None
        return {k: v for k, v in d.items() if v or k not in LATER_FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CodecConfig":
        d = dict(d)
        d["lambdas"] = tuple(float(v) for v in d.get("lambdas", DEFAULT_LAMBDAS))
        if d.get("candidates"):
            d["candidates"] = tuple(sorted(int(b) for b in d["candidates"]))
        return cls(**d)


def _gains(levels: int, channels: int, lo: float, hi: float) -> Tensor:
    g = torch.exp(torch.linspace(math.log(lo), math.log(hi), levels)).reshape(levels, 1)
    return g.expand(levels, channels).clone()


class HyperpriorCoder(nn.Module):
    """One latent y = g_a(x) with a mean-scale hyperprior and per-level gains; x_hat = g_s(y_hat)."""

    def __init__(self, cin: int, cout: int, n: int, m: int, nz: int, levels: int, linear: str = "yuv",
                 context: int = 0, prior_context: int = 0):
        super().__init__()
        self.analysis = Analysis(cin, n, m, linear)
        self.synthesis = Synthesis(m, n, cout, linear, context)
        self.analysis_channels = cin
        self.hyper_analysis = HyperAnalysis(m, n, nz)
        self.hyper_synthesis = (ConditionalHyperSynthesis(nz, n, m, prior_context) if prior_context
                                else HyperSynthesis(nz, n, m))
        #: the networks that read a context besides their input (fixed at construction: whatever replaces a network
        #: later, a quantized or compiled version of it, is called as the original is)
        self.conditional_parts = frozenset(p for p, c in (("synthesis", context), ("hyper_synthesis", prior_context))
                                           if c)
        self.entropy_bottleneck = EntropyBottleneck(nz)
        self.gaussian_conditional = GaussianConditional()
        # gains: higher levels (higher quality) quantize finer. Learned in the log domain (a multiplicative
        # change per step, whatever the gain's size; CodecObjective gives them their own learning rate),
        # initialised geometrically so that the DCT coefficients (pixels in [0, 1]) start with steps 1/6 .. 1/48.
        # Rows: gain, inverse gain.
        g = _gains(levels, m, 6.0, 48.0).log()
        self.log_gain = nn.Parameter(torch.stack([g, -g]))
        self.log_hyper_gain = nn.Parameter(torch.zeros(2, levels, nz))
        # the gains as coding reads them: exp() evaluated once by update() and stored with the weights, so that
        # encoder and decoder multiply by the same float32 numbers on any machine (no exp in the decoder)
        self.register_buffer("gain_table", torch.zeros(2, levels, m))
        self.register_buffer("hyper_gain_table", torch.zeros(2, levels, nz))
        with torch.no_grad():  # initial scales e^1: untrained entropy parameters should not be overconfident
            hyper = self.hyper_synthesis
            (hyper.nonlinear if prior_context else hyper)[-1].bias[m:] = 1.0

    @property
    def proxy(self) -> str:
        """The training proxy of rounding for both latents (``bitalloc.codec.entropy.PROXIES``): "noise" (training
        from scratch) or "ste" (rounding as coding does it, straight-through: fine-tuning an encoder)."""
        return self.entropy_bottleneck.proxy

    @proxy.setter
    def proxy(self, value: str) -> None:
        if value not in PROXIES:
            raise ValueError(f"proxy={value!r}: choose one of {PROXIES}")
        self.entropy_bottleneck.proxy = value

    def gain(self, which: str, level: Tensor, *, coding: bool = False) -> Tensor:
        """The per-sample gains [B, C, 1, 1] of ``which`` ("y", "y_inv", "z", "z_inv") at ``level`` [B]:
        exp of the parameters (training), or the stored tables (``coding``; filled by :meth:`update`)."""
        table = {"y": 0, "y_inv": 1, "z": 0, "z_inv": 1}[which]
        if coding:
            t = (self.gain_table if which[0] == "y" else self.hyper_gain_table)[table]
            if not bool((t != 0).all()):
                raise RuntimeError("the coding gain tables are empty: call update() after training")
        else:
            t = (self.log_gain if which[0] == "y" else self.log_hyper_gain)[table].exp()
        return t[level].unsqueeze(-1).unsqueeze(-1)

    @torch.no_grad()
    def update(self) -> None:
        """Store what coding reads: the gain tables (exp of the log gains) and the hyper-latent pmf tables."""
        self.gain_table.copy_(self.log_gain.exp())
        self.hyper_gain_table.copy_(self.log_hyper_gain.exp())
        self.entropy_bottleneck.update()

    def reads_context(self, part: str) -> bool:
        """Whether network ``part`` (e.g. "synthesis", "hyper_synthesis") is conditional: it was built with a
        ``context`` branch and reads the context besides its input."""
        return part in self.conditional_parts

    def context_of(self, part: str, context: Tensor | None) -> Tensor | None:
        """What network ``part`` reads besides its input: ``context`` where it is conditional, None otherwise."""
        return context if self.reads_context(part) else None

    def entropy_parameters(self, z_hat: Tensor, level: Tensor, size: tuple[int, int], *, coding: bool = False,
                           context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(mu, log_scale) of y_g from the decoded hyper-latent z_hat (gained domain); ``context``: what a
        conditional hyper synthesis reads (ignored by a plain one)."""
        zs = z_hat * self.gain("z_inv", level, coding=coding)
        c = self.context_of("hyper_synthesis", context)
        params = self.hyper_synthesis(zs) if c is None else self.hyper_synthesis(zs, c)
        params = params[..., : size[0], : size[1]]
        mu, log_scale = params.chunk(2, dim=1)
        return mu, log_scale

    def synthesize(self, y_hat: Tensor, level: Tensor, context: Tensor | None = None, *,
                   coding: bool = False) -> Tensor:
        """x_hat = g_s(y_hat * g'_level) from the decoded latents y_hat (gained domain); ``context``: what a
        conditional synthesis reads (ignored by a plain one)."""
        return self.synthesis(y_hat * self.gain("y_inv", level, coding=coding), self.context_of("synthesis", context))

    def forward(self, x: Tensor, level: Tensor, context: Tensor | None = None) -> dict[str, Any]:
        """Reconstruction and likelihoods of x at ``level``; ``context``: what a conditional synthesis or hyper
        synthesis reads."""
        y = self.analysis(x)
        yg = y * self.gain("y", level)
        z = self.hyper_analysis(yg)
        zg = z * self.gain("z", level)
        z_hat, z_lik = self.entropy_bottleneck(zg)
        mu, log_scale = self.entropy_parameters(z_hat, level, yg.shape[-2:], context=context)
        v = rounding_proxy(yg - mu, self.proxy, self.training)
        y_lik = self.gaussian_conditional.likelihood(v, log_scale)
        y_hat = ste_round(yg - mu) + mu
        x_hat = self.synthesize(y_hat, level, context)
        return {"x_hat": x_hat, "likelihoods": {"y": y_lik, "z": z_lik}}


def bits_of(likelihoods: dict[str, Tensor]) -> Tensor:
    """Per-sample bits, -sum log2 p, over every likelihood tensor [B, ...] -> [B]."""
    total = None
    for lik in likelihoods.values():
        b = -torch.log2(lik).flatten(1).sum(1)
        total = b if total is None else total + b
    assert total is not None
    return total


class IntraCodec(nn.Module):
    """I-frame / image codec: one :class:`HyperpriorCoder` on packed YUV 4:2:0 (6 channels at 1/2 resolution),
    centred: it codes x - 1/2 and returns x_hat + 1/2 (``OFFSET``), so the block transform's DC starts near 0."""

    OFFSET = 0.5

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.coder = HyperpriorCoder(6, 6, cfg.n, cfg.m, cfg.nz, cfg.levels, "yuv")

    def forward(self, x: Tensor, level: Tensor) -> dict[str, Any]:
        out = self.coder(x - self.OFFSET, level)
        out["x_hat"] = out["x_hat"] + self.OFFSET
        return out


class InterCodec(nn.Module):
    """P-frame codec: motion coder (flow estimate, frame, reference -> flow_hat), warp, residual coder; with
    ``cfg.residual_context`` the residual synthesis also reads the prediction (conditional reconstruction, as the
    conditional coding of Li, Li, Lu, "Deep contextual video compression", NeurIPS 2021, at the decoder's last layer:
    x_hat = pred + g_s(y_hat, pred)); with ``cfg.prior_context`` the residual's hyper synthesis reads it too (a
    conditional entropy model: DCVC's temporal prior, (mu, sigma) = h_s(z_hat, pred))."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.motion = HyperpriorCoder(2 + 6 + 6, 2, cfg.motion_n, cfg.motion_m, cfg.motion_nz, cfg.levels, "planes:2")
        #: whether a residual network reads the prediction (``cfg.residual_context`` or ``cfg.prior_context``)
        self.conditional = bool(cfg.residual_context or cfg.prior_context)
        self.residual = HyperpriorCoder(6 + 6, 6, cfg.n, cfg.m, cfg.nz, cfg.levels, "yuv",
                                        context=CONTEXT_CHANNELS if cfg.residual_context else 0,
                                        prior_context=CONTEXT_CHANNELS if cfg.prior_context else 0)

    def residual_context(self, pred: Tensor) -> Tensor | None:
        """What the residual's decoder networks read besides their inputs: the prediction (packed, in [0, 1])
        centred, pred - 1/2, for a conditional synthesis or hyper synthesis (``CodecConfig.residual_context``,
        ``CodecConfig.prior_context``); None otherwise."""
        return pred - CONTEXT_OFFSET if self.conditional else None

    def forward(self, x: Tensor, ref: Tensor, flow_est: Tensor, level: Tensor) -> dict[str, Any]:
        mo = self.motion(torch.cat([flow_est / FLOW_SCALE, x, ref], dim=1), level)
        flow_hat = mo["x_hat"] * FLOW_SCALE
        pred = warp(ref, flow_hat)
        res = self.residual(torch.cat([x - pred, pred], dim=1), level, self.residual_context(pred))
        x_hat = pred + res["x_hat"]
        return {"x_hat": x_hat, "prediction": pred, "flow_hat": flow_hat,
                "likelihoods": {"motion_" + k: v for k, v in mo["likelihoods"].items()}
                | {"residual_" + k: v for k, v in res["likelihoods"].items()}}


class VideoCodec(nn.Module):
    """The learned video codec: intra codec for I frames, inter codec for P frames (low delay), one set of
    quality levels (``cfg.lambdas``) shared by both.

    ``forward(clip, level)`` codes a clip [B, T, 6, h, w] (packed YUV in [0, 1], h and w multiples of 8) as one
    I frame followed by T - 1 P frames, each referencing the previous reconstruction, and returns per frame the
    reconstruction and likelihoods, and per sample the rate-distortion loss terms."""

    def __init__(self, cfg: CodecConfig | None = None, **kwargs: Any):
        super().__init__()
        self.cfg = cfg or CodecConfig(**kwargs)
        self.intra = IntraCodec(self.cfg)
        self.inter = InterCodec(self.cfg)
        self.register_buffer("lambdas", torch.tensor(self.cfg.lambdas, dtype=torch.float32))
        if self.cfg.candidates:  # dynamic precision: the per-frame width selector (bitalloc.codec.dynamic)
            from bitalloc.codec.selector import WidthSelector

            self.selector = WidthSelector(self.cfg.candidates,
                                          levels=self.cfg.levels if self.cfg.selector_per_level else 0)

    def forward(self, clip: Tensor, level: Tensor, *, flows: list[Tensor] | None = None,
                detach_reference: bool = True, first: str = "intra", frame_hook: Any = None) -> dict[str, Any]:
        """``first``: "intra" (frame 0 is coded as an I frame) or "reference" (frame 0 is the first P frame's
        reference as it is, uncoded, and is not part of the output: pre-training of the inter codec).
        ``frame_hook(t, x, reference or None, flow or None)``: a context manager entered around each frame's
        coding (dynamic precision: :class:`bitalloc.codec.dynamic.DynamicFrames`)."""
        import contextlib
        if clip.ndim == 4:
            clip = clip.unsqueeze(1)
        frames: list[dict[str, Any]] = []
        ref = None
        start = 0
        if first == "reference":
            ref, start = clip[:, 0], 1
        elif first != "intra":
            raise ValueError(f"first={first!r}: use 'intra' or 'reference'")
        for t in range(start, clip.shape[1]):
            x = clip[:, t]
            r = f = None
            if ref is not None:
                r = ref.detach() if detach_reference else ref
                f = flows[t - 1] if flows is not None else estimate_flow_packed(x, r)
            with frame_hook(t, x, r, f) if frame_hook is not None else contextlib.nullcontext():
                out = self.intra(x, level) if r is None else self.inter(x, r, f, level)
            frames.append(out)
            ref = out["x_hat"].clamp(0, 1)
        return {"frames": frames, "offset": start}

    def rd_terms(self, clip: Tensor, out: dict[str, Any]) -> dict[str, Tensor]:
        """Per sample: bits per luma pixel and MSE_YUV of every frame, summed over frames ([B] each)."""
        if clip.ndim == 4:
            clip = clip.unsqueeze(1)
        pixels = clip.shape[-2] * clip.shape[-1] * 4
        off = out.get("offset", 0)
        bpp = sum(bits_of(f["likelihoods"]) for f in out["frames"]) / pixels
        mse = sum(weighted_mse(f["x_hat"], clip[:, off + t]) for t, f in enumerate(out["frames"]))
        return {"bpp": bpp, "mse": mse}

    def loss(self, clip: Tensor, level: Tensor, out: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-sample loss bpp + lambda_level * 255^2 * MSE_YUV, averaged over frames ([B])."""
        terms = self.rd_terms(clip, out)
        t = len(out["frames"])
        loss = (terms["bpp"] + self.lambdas[level] * 255.0**2 * terms["mse"]) / t
        return loss, {k: v / t for k, v in terms.items()}


def with_context(model: VideoCodec, *, residual: bool = False, prior: bool = False) -> VideoCodec:
    """``model`` with a conditional residual synthesis (``residual``: ``CodecConfig.residual_context``) and / or a
    conditional residual hyper synthesis (``prior``: ``CodecConfig.prior_context``) besides what it has: a new float
    codec with every weight of ``model`` and each new context branch at its initialisation (its last layer zero: it
    codes as ``model`` does until trained); ``model`` itself if it has them already. For float codecs (a training
    start)."""
    import dataclasses

    cfg = dataclasses.replace(model.cfg, residual_context=model.cfg.residual_context or residual,
                              prior_context=model.cfg.prior_context or prior)
    if cfg == model.cfg:
        return model
    out = VideoCodec(cfg)
    state = model.state_dict()
    if cfg.prior_context and not model.cfg.prior_context:  # the plain hyper synthesis becomes the conditional one's
        key = "inter.residual.hyper_synthesis."
        state = {(key + "nonlinear." + k[len(key):] if k.startswith(key) else k): v for k, v in state.items()}
    missing, unexpected = out.load_state_dict(state, strict=False)
    if unexpected or any(".synthesis.context." not in k and ".hyper_synthesis.context." not in k for k in missing):
        raise ValueError(f"cannot carry the codec's weights over ({unexpected[:3]}, {missing[:3]}): a float codec "
                         "of the same sizes is needed")
    return out.train(model.training)


def build_codec(**kwargs: Any) -> VideoCodec:
    """Factory used by checkpoints: ``VideoCodec(CodecConfig(**kwargs))``."""
    return VideoCodec(CodecConfig.from_dict(kwargs) if kwargs else CodecConfig())
