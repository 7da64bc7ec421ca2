"""Encoder-side latent refinement: the latents a frame is coded with, improved by gradient descent on the coding
objective.

The analysis transforms run only at the sender, so the encoder may send whatever latents it likes (Campos, Meierhans,
Djelouah, Schroers 2019, "Content adaptive optimization for neural image compression"; Yang, Bamler, Mandt 2020,
"Improving inference for neural image compression", sec. 3). For one :class:`~bitalloc.codec.model.HyperpriorCoder`
with gained latent y_g and hyper-latent z_g at quality level l, :class:`LatentRefiner` minimises the objective the
codec was trained with,

    J(y_g, z_g) = (R_z(z_hat) + R_y(v | sigma)) / P + lambda_l * 255^2 * D(g_s((v + mu) * g'_l), t),
    z_hat = round(z_g),  (mu, log sigma) = h_s(z_hat * h'_l),  v = round(y_g - mu),

where R = -log2 of the entropy models' likelihoods (:class:`~bitalloc.codec.entropy.EntropyBottleneck`,
:class:`~bitalloc.codec.entropy.GaussianConditional`), P the luma pixels of the (padded) frame, D the YUV-weighted
MSE (6 MSE_Y + MSE_U + MSE_V) / 8 and t the coder's target: x - 1/2 for an I frame, x - prediction for the residual
of a P frame (the prediction is the decoder's, integer, so the refinement changes nothing else of the frame).
Rounding passes gradients straight through (Bengio et al. 2013; Yang et al. 2020 sec. 3.2 use it as their baseline
of the stochastic annealing they propose). Adam with a cosine-decayed step size; the iterate of least J is kept,
the start included, so refinement cannot raise J as it measures it. :class:`~bitalloc.codec.codec.VideoCoder`
then codes the frame with those latents and keeps whichever payload costs less by the real objective (the payload's
bits + lambda * the integer reconstruction's MSE), so a refined stream is never worse than the unrefined one by
that measure. Nothing is signalled and the decoder does not change: decoding stays exact.

The decoder networks run in float (fake-quantized on the same grids as the integer decoder, gradients straight
through the roundings) in a private copy of the codec, since the coding copy runs in integer mode.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from bitalloc.codec.entropy import ste_round
from bitalloc.codec.model import HyperpriorCoder, VideoCodec
from bitalloc.codec.networks import weighted_mse
from bitalloc.errors import ConfigError

#: Adam's initial step size on the gained latents (whose rounding step is 1), for about 30 steps (measured on
#: held-out images and carphone: 0.2 diverges, 0.02 needs 100 steps for the same gain)
DEFAULT_LR = 0.05


def objective(coder: HyperpriorCoder, yg: Tensor, zg: Tensor, level: int, target: Tensor, lam: float,
              context: Tensor | None = None) -> Tensor:
    """J(y_g, z_g) of the module docstring for one sample ([1, C, h, w] latents; ``target`` [1, C_out, H, W]):
    bits per luma pixel + ``lam`` * 255^2 * D. Rounding is straight-through; the decoder networks run as they are
    (fake-quantized float for a quantized codec); ``context``: what a conditional synthesis or hyper synthesis
    reads."""
    lv = torch.tensor([level])
    z_hat = ste_round(zg)
    bits = -torch.log2(coder.entropy_bottleneck.likelihood(z_hat)).sum()
    mu, log_scale = coder.entropy_parameters(z_hat, lv, tuple(yg.shape[-2:]), coding=True, context=context)
    v = ste_round(yg - mu)
    bits = bits - torch.log2(coder.gaussian_conditional.likelihood(v, log_scale)).sum()
    x_hat = coder.synthesize(v + mu, lv, context, coding=True)
    x_hat = x_hat[..., : target.shape[-2], : target.shape[-1]]
    pixels = 4 * target.shape[-2] * target.shape[-1]  # packed YUV 4:2:0: four luma pixels per position
    return bits / pixels + lam * 255.0**2 * weighted_mse(x_hat, target).sum()


class LatentRefiner:
    """Refines one coder's latents for the encoder (module docstring): ``refine(which, yg, zg, level, target)``,
    ``which`` one of "intra", "motion", "residual". ``steps`` Adam iterations at step size ``lr``, cosine-decayed.

    ``branches`` (dynamic-precision codecs: ``{width: frozen network}``, :func:`bitalloc.model.region.
    frozen_branches`): the float copy is of those, and ``refine(..., region=(mask, roi_bits, non_roi_bits))`` runs
    them split by the frame's ROI mask at its two widths (:func:`bitalloc.model.region.split_execution`), as the
    frame is coded."""

    CODERS = ("intra", "motion", "residual")

    def __init__(self, model: VideoCodec, steps: int, lr: float = DEFAULT_LR,
                 branches: Mapping[int, VideoCodec] | None = None):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"refinement steps {steps!r}: give a number of iterations >= 0 (0: no refinement)")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ConfigError(f"refinement step size {lr!r}: give a number > 0 (default {DEFAULT_LR})")
        self.steps, self.lr = int(steps), float(lr)
        self._model = model
        self._branches = branches
        self._twin: Any = None

    def _copy(self) -> Any:
        """The float copy (made on first use; its parameters need no gradients): the codec, or its branches."""
        if self._twin is None:
            twin = copy.deepcopy(self._model if self._branches is None else dict(self._branches))
            for net in (twin.values() if isinstance(twin, dict) else [twin]):
                net.eval()
                for p in net.parameters():
                    p.requires_grad_(False)
            self._twin = twin
        return self._twin

    @contextlib.contextmanager
    def coder(self, which: str, region: tuple[Tensor, int, int] | None = None) -> Iterator[HyperpriorCoder]:
        """The float copy of coder ``which``; for a dynamic-precision codec split by ``region`` = (mask, ROI width,
        non-ROI width)."""
        if which not in self.CODERS:
            raise ValueError(f"which={which!r}: one of {self.CODERS}")
        twin = self._copy()
        with contextlib.ExitStack() as stack:
            if isinstance(twin, dict):
                if region is None:
                    raise ValueError("a dynamic-precision codec's refinement needs the frame's region")
                from bitalloc.model.region import split_execution

                twin = stack.enter_context(split_execution(twin, region[0], int(region[1]), int(region[2])))
            yield {"intra": twin.intra.coder, "motion": twin.inter.motion, "residual": twin.inter.residual}[which]

    def refine(self, which: str, yg: Tensor, zg: Tensor, level: int, target: Tensor,
               region: tuple[Tensor, int, int] | None = None, lam: float | None = None,
               context: Tensor | None = None) -> tuple[Tensor, Tensor, list[float]]:
        """(y_g, z_g, history of J): the latents of least J over the start and ``steps`` iterations; ``lam``: the
        objective's lambda (default lambda_level; the encoder passes its stream's when it codes a P frame at another
        level); ``context``: what the coder's conditional synthesis reads (the residual's prediction)."""
        lam = float(self._model.lambdas[level]) if lam is None else float(lam)
        y = yg.detach().clone().float().requires_grad_(True)
        z = zg.detach().clone().float().requires_grad_(True)
        target = target.detach().float()
        best = (math.inf, y.detach().clone(), z.detach().clone())
        history: list[float] = []
        with torch.enable_grad(), self.coder(which, region) as coder:
            opt = torch.optim.Adam([y, z], lr=self.lr)
            for it in range(self.steps + 1):
                j = objective(coder, y, z, level, target, lam, context)
                history.append(float(j.detach()))
                if history[-1] < best[0]:
                    best = (history[-1], y.detach().clone(), z.detach().clone())
                if it == self.steps:
                    break
                for group in opt.param_groups:  # cosine decay from lr to 0 over the steps
                    group["lr"] = 0.5 * self.lr * (1.0 + math.cos(math.pi * it / self.steps))
                opt.zero_grad()
                j.backward()
                opt.step()
        return best[1], best[2], history


def add_refine_args(p: Any) -> None:
    """The encoder's latent refinement options (``codec encode``, ``codec eval``)."""
    p.add_argument("--refine-steps", type=int, default=0, metavar="N",
                   help="refine the latents of every frame's best trial by N iterations of gradient descent on rate + "
                        "lambda * distortion and keep the cheaper payload (measured at N = 30: 1-9%% fewer bits on the "
                        "held-out clips, 0.2%% on held-out images, 7-13x the encoding time; default 0: off); the "
                        "decoder does not change")
    p.add_argument("--refine-lr", type=float, default=DEFAULT_LR,
                   help=f"Adam step size of the refinement, on latents whose rounding step is 1 (default {DEFAULT_LR})")
