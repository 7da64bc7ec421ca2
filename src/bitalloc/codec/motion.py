"""Motion: estimation at the encoder (DIS optical flow), and motion compensation by bilinear warping.

**Estimation** (sender only, so it need not be exact): OpenCV's dense inverse search optical flow (Kroeger et al.,
"Fast optical flow using dense inverse search", ECCV 2016) from the current frame to the *decoded* reference, on
luma: cur(p) ~ ref(p + f(p)). The estimate is only the motion encoder's input: the motion autoencoder learns to
code it rate-distortion-optimally (its distortion is the warping error), DVC-style (Lu et al., CVPR 2019) but
without a flow network to train.

**Compensation.** The decoded flow lives at half luma resolution, in luma pixels, one vector per 2x2 luma block and
per chroma sample. Luma is warped at full resolution with the nearest-upsampled flow, chroma at half resolution
with half the flow; bilinear interpolation, coordinates clamped to the frame (border replication):

* training: ``grid_sample`` (differentiable, float);
* coding: :func:`warp_int`, the same interpolation in integers: the flow rounded to 1/4 luma pel (1/8 chroma pel,
  as in H.264 / HEVC), integer bilinear weights, rounding to nearest with one shift. Integer arithmetic makes the
  prediction identical at encoder and decoder whatever the machine or thread count.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bitalloc.codec.networks import pack_yuv, unpack_yuv

#: flow precision of coded motion: 1/4 luma pel
MV_FRACTION = 4


def _grid(flow: Tensor, h: int, w: int) -> Tensor:
    """Sampling grid for grid_sample(align_corners=True) from a flow [B, 2, h, w] in pixels (x, y)."""
    ys = torch.arange(h, dtype=flow.dtype, device=flow.device).reshape(1, h, 1)
    xs = torch.arange(w, dtype=flow.dtype, device=flow.device).reshape(1, 1, w)
    gx = (xs + flow[:, 0]) * (2.0 / max(w - 1, 1)) - 1.0
    gy = (ys + flow[:, 1]) * (2.0 / max(h - 1, 1)) - 1.0
    return torch.stack([gx, gy], dim=-1)


def _warp_plane(plane: Tensor, flow: Tensor) -> Tensor:
    h, w = plane.shape[-2:]
    return F.grid_sample(plane.unsqueeze(1), _grid(flow, h, w), mode="bilinear", padding_mode="border",
                         align_corners=True).squeeze(1)


def warp(ref: Tensor, flow: Tensor) -> Tensor:
    """Motion-compensate packed frames ``ref`` [B, 6, h, w] with ``flow`` [B, 2, h, w] (luma pixels): float,
    differentiable (training)."""
    y, u, v = unpack_yuv(ref)
    fy = F.interpolate(flow, scale_factor=2, mode="nearest")
    return pack_yuv(_warp_plane(y, fy), _warp_plane(u, flow * 0.5), _warp_plane(v, flow * 0.5))


def quantize_flow(flow: Tensor) -> Tensor:
    """Flow in luma pixels -> integer units of 1/4 luma pel (int64), round half to even."""
    return torch.round(flow * MV_FRACTION).to(torch.int64)


def _warp_plane_int(plane: Tensor, q: Tensor, frac_bits: int) -> Tensor:
    """Bilinear warp of an integer plane [B, H, W] by integer displacements q [B, 2, H, W] in units of
    1 / 2^frac_bits pixel; result rounded to nearest (ties up), int64."""
    b, h, w = plane.shape
    one = 1 << frac_bits
    ys = torch.arange(h).reshape(1, h, 1) << frac_bits
    xs = torch.arange(w).reshape(1, 1, w) << frac_bits
    px, py = xs + q[:, 0], ys + q[:, 1]
    x0, y0 = px >> frac_bits, py >> frac_bits
    fx, fy = px & (one - 1), py & (one - 1)
    x0c, x1c = x0.clamp(0, w - 1), (x0 + 1).clamp(0, w - 1)
    y0c, y1c = y0.clamp(0, h - 1), (y0 + 1).clamp(0, h - 1)
    flat = plane.reshape(b, -1).to(torch.int64)

    def tap(yy: Tensor, xx: Tensor) -> Tensor:
        return torch.gather(flat, 1, (yy * w + xx).reshape(b, -1)).reshape(b, h, w)

    acc = ((one - fx) * (one - fy) * tap(y0c, x0c) + fx * (one - fy) * tap(y0c, x1c)
           + (one - fx) * fy * tap(y1c, x0c) + fx * fy * tap(y1c, x1c))
    shift = 2 * frac_bits
    return (acc + (1 << (shift - 1))) >> shift


def warp_int(ref: Tensor, q: Tensor) -> Tensor:
    """Integer motion compensation of packed 8-bit frames ``ref`` [B, 6, h, w] (int64 codes 0..255) by the
    quantized flow ``q`` [B, 2, h, w] (1/4 luma pel): luma at 1/4 pel, chroma at 1/8 pel. Exact."""
    y, u, v = unpack_yuv(ref)
    qy = q.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    frac = MV_FRACTION.bit_length() - 1  # 2
    return pack_yuv(_warp_plane_int(y, qy, frac), _warp_plane_int(u, q, frac + 1), _warp_plane_int(v, q, frac + 1))


def estimate_flow(cur_y: np.ndarray, ref_y: np.ndarray, preset: str = "medium") -> np.ndarray:
    """DIS optical flow from ``cur_y`` to ``ref_y`` (uint8 luma [H, W]): [2, H, W] float32 (x, y) in pixels
    with cur(p) ~ ref(p + f(p))."""
    import cv2

    presets = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
               "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
    dis = cv2.DISOpticalFlow_create(presets[preset])
    flow = dis.calc(np.ascontiguousarray(cur_y), np.ascontiguousarray(ref_y), None)
    return np.ascontiguousarray(flow.transpose(2, 0, 1))


def estimate_flow_packed(cur: Tensor, ref: Tensor, preset: str = "medium") -> Tensor:
    """Flow between packed frames in [0, 1] ([B, 6, h, w]): DIS on luma at full resolution, then averaged over
    2x2 blocks -> [B, 2, h, w] in luma pixels (the motion encoder's input)."""
    cy, _, _ = unpack_yuv(cur.detach())
    ry, _, _ = unpack_yuv(ref.detach())
    to8 = lambda t: (t.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()  # noqa: E731
    c8, r8 = to8(cy), to8(ry)
    flows = [torch.from_numpy(estimate_flow(c8[i], r8[i], preset)) for i in range(c8.shape[0])]
    return F.avg_pool2d(torch.stack(flows).to(cur.device), 2)
