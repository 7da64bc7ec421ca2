"""The codec's transforms: ordinary ``nn.Module``s made of Conv2d, ReLU, PixelShuffle (and GDN in encoders).

Every network the *decoder* runs (synthesis, hyper synthesis, motion synthesis) is built only from ``nn.Conv2d``,
``nn.ReLU`` and ``nn.PixelShuffle``: layers that :func:`bitalloc.prepare` quantizes, that the cost model counts,
and that :mod:`bitalloc.runtime.integer` executes exactly in integers, so that decoding is bit-exact across
processes and thread counts (Balle, Johnston, Minnen, "Integer networks for data compression with latent-variable
models", ICLR 2019: the decoder-side networks, entropy parameters included, must be deterministic). ReLU and
PixelShuffle are exact in floating point (a comparison and a copy); no transcendental function runs in a decoder.

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


class Analysis(nn.Sequential):
    """x (C_in channels at 1/2 luma resolution) -> y (M channels at 1/16): 3x3 conv, then three 5x5 stride-2
    convolutions with simplified GDN between them (Balle et al. 2018's analysis transform, one scale lower)."""

    def __init__(self, cin: int, n: int, m: int):
        super().__init__(nn.Conv2d(cin, n // 2, 3, padding=1), SimplifiedGDN(n // 2),
                         conv(n // 2, n), SimplifiedGDN(n),
                         conv(n, n), SimplifiedGDN(n),
                         conv(n, m))


class Synthesis(nn.Sequential):
    """y_hat (M channels at 1/16) -> C_out channels at 1/2 luma resolution: three sub-pixel upsamplings with
    ReLU, then a 3x3 convolution. Decoder side: Conv2d / ReLU / PixelShuffle only (integer-executable)."""

    def __init__(self, m: int, n: int, cout: int):
        super().__init__(SubpixelUp(m, n), nn.ReLU(),
                         SubpixelUp(n, n), nn.ReLU(),
                         SubpixelUp(n, n // 2), nn.ReLU(),
                         nn.Conv2d(n // 2, cout, 3, padding=1))


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
