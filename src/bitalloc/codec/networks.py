"""The codec's transforms: ordinary ``nn.Module``s made of Conv2d, ReLU, PixelShuffle (and GDN in encoders).

Every network the *decoder* runs (synthesis, hyper synthesis, motion synthesis) is built only from ``nn.Conv2d``,
``nn.ReLU`` and ``nn.PixelShuffle`` (reading a context also ``nn.PixelUnshuffle`` and zero padding): layers that
:func:`bitalloc.prepare` quantizes, that the cost model counts, and that :mod:`bitalloc.runtime.integer` executes
exactly in integers, so that decoding is bit-exact across processes and thread counts (Balle, Johnston, Minnen,
"Integer networks for data compression with latent-variable models", ICLR 2019: the decoder-side networks, entropy
parameters included, must be deterministic). ReLU, the pixel shuffles and padding are exact in floating point (a
comparison and copies); no transcendental function runs in a decoder.

Encoders (analysis transforms) run only at the sender; they use the simplified GDN of Johnston et al. 2019
("Computationally efficient neural image compression", eq. 2): y_i = x_i / (beta_i + sum_j gamma_ij |x_j|), a
cheap form of Balle's GDN (Balle, Laparra, Simoncelli, ICLR 2017, eq. 6).

**Frames.** The codec codes YUV 4:2:0 (as HEVC Main does). A frame enters the networks as one tensor of 6
channels at half resolution: the four luma phases (pixel-unshuffled Y, 2x2) then U and V; see
:func:`pack_yuv` / :func:`unpack_yuv`. Latents are at 1/16 of the luma resolution, hyper-latents at 1/64.

**Upsampling.** Decoders upsample by sub-pixel convolution (Shi et al., CVPR 2016): a 3x3 convolution to 4C
channels followed by ``PixelShuffle(2)``, which costs C_in * 4 C_out * 9 MACs per input position.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SimplifiedGDN(nn.Module):
    """y_i = x_i / (beta_i + sum_j gamma_ij |x_j|) (Johnston et al. 2019, eq. 2), beta, gamma >= 0.

    Non-negativity by reparametrisation: beta = |b| + 1e-6 ... kept simple as b^2 + eps and G^2 (Balle et al. 2017,
    appendix 6.1 uses a similar squared parametrisation). Initialised to the identity (beta = 1, gamma = 0.1 I).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.beta_sqrt = nn.Parameter(torch.ones(channels))
        self.gamma_sqrt = nn.Parameter(torch.eye(channels).mul(0.1).sqrt().reshape(channels, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        beta = self.beta_sqrt.square() + 1e-6
        gamma = self.gamma_sqrt.square()
        return x / F.conv2d(x.abs(), gamma, beta)


def conv(cin: int, cout: int, k: int = 5, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


class SubpixelUp(nn.Sequential):
    """3x3 convolution to 4 * C_out channels, then PixelShuffle(2): a learned 2x upsampling (Shi et al. 2016)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, 4 * cout, 3, padding=1), nn.PixelShuffle(2))


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix (rows = basis vectors): C[k, i] = a_k cos(pi (2i + 1) k / 2n), a_0 = sqrt(1/n),
    a_k = sqrt(2/n) (Ahmed, Natarajan, Rao 1974)."""
    i = np.arange(n)
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n))
    c[0] /= np.sqrt(2.0)
    return c


def _zigzag(n: int) -> list[tuple[int, int]]:
    return sorted(((a, b) for a in range(n) for b in range(n)), key=lambda t: (t[0] + t[1], t[0]))


def block_basis(kind: str) -> torch.Tensor:
    """Orthonormal block transform over the ``pixel_unshuffle(8)`` channels of a packed tensor, rows = basis
    functions in order of increasing frequency (float64).

    * ``"yuv"``: 6 packed YUV 4:2:0 channels (4 luma phases, U, V): the 2-D DCT of the 16x16 luma block (256
      coefficients; luma sample (Y, X) of the block is phase (Y % 2) * 2 + X % 2 at (Y // 2, X // 2)), then the
      8x8 DCTs of U and V (64 each): 384 x 384;
    * ``"planes:C"``: C plain channels, an 8x8 DCT each: 64C x 64C.
    """
    if kind == "yuv":
        c16, c8 = dct_matrix(16), dct_matrix(8)
        rows = []
        for ky, kx in _zigzag(16):
            r = np.zeros((6, 8, 8))
            for y in range(16):
                for x in range(16):
                    r[(y % 2) * 2 + x % 2, y // 2, x // 2] = c16[ky, y] * c16[kx, x]
            rows.append(r.reshape(-1))
        for plane in (4, 5):
            for ky, kx in _zigzag(8):
                r = np.zeros((6, 8, 8))
                r[plane] = np.outer(c8[ky], c8[kx])
                rows.append(r.reshape(-1))
        return torch.tensor(np.stack(rows))
    if kind.startswith("planes:"):
        channels = int(kind.split(":", 1)[1])
        c8 = dct_matrix(8)
        rows = []
        for ch in range(channels):
            for ky, kx in _zigzag(8):
                r = np.zeros((channels, 8, 8))
                r[ch] = np.outer(c8[ky], c8[kx])
                rows.append(r.reshape(-1))
        return torch.tensor(np.stack(rows))
    raise ValueError(f"unknown block transform {kind!r}: use 'yuv' or 'planes:C'")


def basis_channels(kind: str) -> int:
    """Input channels the block transform ``kind`` reads (6 for "yuv", C for "planes:C")."""
    return 6 if kind == "yuv" else int(kind.split(":", 1)[1])


def _zero(layer: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class Analysis(nn.Module):
    """x (C_in channels at 1/2 luma resolution) -> y (M channels at 1/16): a linear block transform of the first
    channels plus a nonlinear branch.

    * ``linear``: ``PixelUnshuffle(8)`` and a 1x1 convolution initialised to the orthonormal DCT basis of
      :func:`block_basis` (so M = 64 x the channels it reads): at initialisation the codec is transform coding
      with a 16x16 luma / 8x8 chroma DCT, like JPEG's 8x8 DCT but with a learned hyperprior entropy model;
    * ``nonlinear``: a 3x3 conv, three 5x5 stride-2 convs with simplified GDN between them (Balle et al. 2018's
      analysis transform one scale lower) and a 1x1 conv to M channels initialised to zero.

    y = linear(x) + nonlinear(x): training starts from the DCT codec and learns the nonlinear correction (a
    residual branch initialised at zero, Goyal et al. 2017's zero-init trick), which converges in the few
    thousand steps a 2-core CPU affords far better than a transform learned from scratch.
    """

    def __init__(self, cin: int, n: int, m: int, linear: str = "yuv"):
        super().__init__()
        self.linear_channels = basis_channels(linear)
        basis = block_basis(linear)
        if basis.shape[0] != m:
            raise ValueError(f"the {linear!r} block transform has {basis.shape[0]} coefficients; m={m} must match")
        self.linear = nn.Sequential(nn.PixelUnshuffle(8), nn.Conv2d(basis.shape[1], m, 1, bias=False))
        self.linear[1].weight.data.copy_(basis.float().reshape(m, -1, 1, 1))
        self.nonlinear = nn.Sequential(nn.Conv2d(cin, n // 2, 3, padding=1), SimplifiedGDN(n // 2),
                                       conv(n // 2, n), SimplifiedGDN(n),
                                       conv(n, n), SimplifiedGDN(n),
                                       conv(n, n), _zero(nn.Conv2d(n, m, 1)))

    def forward(self, x: Tensor, nonlinear_scale: float = 1.0) -> Tensor:
        """y = linear(x) + ``nonlinear_scale`` * nonlinear(x). The scale is the encoder's choice (the analysis runs
        only at the sender, so the decoder never needs it): 1 in training, searched per frame by
        :class:`bitalloc.codec.codec.VideoCoder` (``analysis_scales``)."""
        y = self.linear(x[:, : self.linear_channels])
        return y if nonlinear_scale == 0 else y + nonlinear_scale * self.nonlinear(x)


class Synthesis(nn.Module):
    """y_hat (M channels at 1/16) -> C_out channels at 1/2 luma resolution: the inverse block transform (a 1x1
    conv initialised to the DCT basis' transpose, then ``PixelShuffle(8)``) plus a nonlinear branch (1x1 conv,
    three sub-pixel upsamplings with ReLU, a 3x3 conv initialised to zero). Decoder side: Conv2d / ReLU /
    PixelShuffle only (integer-executable).

    ``context`` > 0 (the P-frame residual coder of a codec with ``CodecConfig.residual_context``): a second input of
    that many channels at the output's resolution (the motion-compensated prediction, centred) enters through a
    3x3 conv + ReLU and a 3x3 conv initialised to zero, added to the nonlinear branch's last hidden layer: the
    reconstruction depends on the prediction as well as on the latents (conditional coding, Li, Li, Lu, "Deep
    contextual video compression", NeurIPS 2021, here at the decoder's last layer). It starts as the plain synthesis."""

    def __init__(self, m: int, n: int, cout: int, linear: str = "yuv", context: int = 0):
        super().__init__()
        basis = block_basis(linear)
        if basis.shape != (m, cout * 64):
            raise ValueError(f"the {linear!r} block transform maps {basis.shape[1]} values to {basis.shape[0]}; "
                             f"m={m} and cout={cout} must match")
        self.linear = nn.Sequential(nn.Conv2d(m, cout * 64, 1, bias=False), nn.PixelShuffle(8))
        self.linear[0].weight.data.copy_(basis.t().float().reshape(cout * 64, m, 1, 1))
        self.nonlinear = nn.Sequential(nn.Conv2d(m, n, 1), nn.ReLU(),
                                       SubpixelUp(n, n), nn.ReLU(),
                                       SubpixelUp(n, n), nn.ReLU(),
                                       SubpixelUp(n, n // 2), nn.ReLU(),
                                       _zero(nn.Conv2d(n // 2, cout, 3, padding=1)))
        #: conditional reconstruction (``context`` channels, e.g. the P frame's motion-compensated prediction at the
        #: output's resolution): a 3x3 conv with ReLU and a 3x3 conv initialised to zero, added to the nonlinear
        #: branch's last hidden layer; None without context
        self.context = (nn.Sequential(nn.Conv2d(context, n // 2, 3, padding=1), nn.ReLU(),
                                      _zero(nn.Conv2d(n // 2, n // 2, 3, padding=1))) if context else None)

    def forward(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        """x_hat = L^T(y) + S(y), or with context c: L^T(y) + S_out(S_hidden(y) + C(c)) (S_out the last conv)."""
        if self.context is None:
            if context is not None:
                raise ValueError("this synthesis takes no context: build it with context channels")
            return self.linear(y) + self.nonlinear(y)
        if context is None:
            raise ValueError("this synthesis reads a context (the prediction): pass it")
        hidden = self.nonlinear[:-1](y)
        return self.linear(y) + self.nonlinear[-1](hidden + self.context(context))


class HyperAnalysis(nn.Sequential):
    """y (M at 1/16) -> z (Nz at 1/64): 3x3 conv, two 5x5 stride-2 convs, ReLU between (Minnen et al. 2018)."""

    def __init__(self, m: int, n: int, nz: int):
        super().__init__(nn.Conv2d(m, n, 3, padding=1), nn.ReLU(),
                         conv(n, n), nn.ReLU(),
                         conv(n, nz))


class HyperSynthesis(nn.Sequential):
    """z_hat (Nz at 1/64) -> 2M entropy parameters at 1/16 (means, then log-scales): two sub-pixel upsamplings
    with ReLU and a 3x3 conv. Decoder side: integer-executable, so the entropy parameters are exact."""

    def __init__(self, nz: int, n: int, m: int):
        super().__init__(SubpixelUp(nz, n), nn.ReLU(),
                         SubpixelUp(n, n), nn.ReLU(),
                         nn.Conv2d(n, 2 * m, 3, padding=1))


class ConditionalHyperSynthesis(nn.Module):
    """A hyper synthesis that also reads a context at 1/2 luma resolution (the P-frame residual coder of a codec with
    ``CodecConfig.prior_context``: the motion-compensated prediction, centred): the entropy parameters of the
    residual's latents depend on the prediction as well as on the hyper-latent (the temporal prior of Li, Li, Lu,
    "Deep contextual video compression", NeurIPS 2021, section 3.3, here added to the hyper synthesis' last hidden
    layer).

    The context enters through ``PixelUnshuffle(8)`` (each 16x16 luma block's 384 packed values at the latents'
    resolution, a copy), a 1x1 conv + ReLU and a 3x3 conv initialised to zero; its output is padded with zeros to
    the hidden layer's size (the hidden layer covers the hyper-latent's grid, 4 ceil(h / 4) rows for h rows of
    latents) and added before the last conv: (mu, log_scale) = H_out(H_hidden(z) + pad(C(c))). Zero-initialised, it
    starts as the plain hyper synthesis (``nonlinear``, a :class:`HyperSynthesis` with the same weights)."""

    def __init__(self, nz: int, n: int, m: int, context: int):
        super().__init__()
        self.nonlinear = HyperSynthesis(nz, n, m)
        self.context = nn.Sequential(nn.PixelUnshuffle(8), nn.Conv2d(64 * context, n, 1), nn.ReLU(),
                                     _zero(nn.Conv2d(n, n, 3, padding=1)))

    def forward(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        if context is None:
            raise ValueError("this hyper synthesis reads a context (the prediction): pass it")
        *layers, out = self.nonlinear
        for layer in layers:
            z = layer(z)
        return out(z + pad_to(self.context(context), z))


def pad_to(x: Tensor, like: Tensor) -> Tensor:
    """``x`` padded with zeros at the bottom and right to the spatial size of ``like`` (a copy: exact in integers)."""
    dh, dw = like.shape[-2] - x.shape[-2], like.shape[-1] - x.shape[-1]
    if dh < 0 or dw < 0:
        raise ValueError(f"a context of {tuple(x.shape[-2:])} does not fit a hidden layer of {tuple(like.shape[-2:])}")
    return F.pad(x, (0, dw, 0, dh)) if dh or dw else x


# ---- frames as tensors ------------------------------------------------------------------------------------------

def pack_yuv(y: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Planes (Y [B, H, W], U / V [B, H/2, W/2], any float scale) -> [B, 6, H/2, W/2]: the 4 luma phases, U, V.

    H and W must be even (the codec pads frames first)."""
    yy = F.pixel_unshuffle(y.unsqueeze(1), 2)
    return torch.cat([yy, u.unsqueeze(1), v.unsqueeze(1)], dim=1)


def unpack_yuv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`pack_yuv`."""
    y = F.pixel_shuffle(x[:, :4], 2).squeeze(1)
    return y, x[:, 4], x[:, 5]


#: weights of the 6 packed channels in the distortion: PSNR_YUV = (6 PSNR_Y + PSNR_U + PSNR_V) / 8 (SPEC section 3);
#: the MSE of the 4 luma phases is Y's MSE, so each luma phase gets 6/4 and each chroma plane 1 (then / 8).
YUV_WEIGHTS = (1.5, 1.5, 1.5, 1.5, 1.0, 1.0)


def weighted_mse(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample (6 MSE_Y + MSE_U + MSE_V) / 8 of packed frames [B, 6, h, w] -> [B]."""
    w = a.new_tensor(YUV_WEIGHTS).reshape(1, 6, 1, 1)
    return ((a - b).square() * w).mean(dim=(2, 3)).sum(1) / 8.0
