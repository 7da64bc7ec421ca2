"""Entropy models as modules (CompressAI's design, written anew): training likelihoods and exact coding.

Two models, as in Balle et al. 2018 ("Variational image compression with a scale hyperprior", ICLR) and Minnen
et al. 2018 ("Joint autoregressive and hierarchical priors", NeurIPS; mean-scale hyperprior without context):

* :class:`EntropyBottleneck`: a learned factorized density per channel for the hyper-latents z (Balle et al.
  2018, appendix 6.1: the cumulative c(x) = f_K o ... o f_1, f_k(x) = g_k(H_k x + b_k) with H_k = softplus(.) >= 0
  and g_k(x) = x + tanh(a_k) * tanh(x), so that c is monotone; the probability of an integer bin is
  p(z) = c(z + 1/2) - c(z - 1/2), computed in the sigmoid domain as there).
* :class:`GaussianConditional`: y_hat - mu ~ N(0, sigma^2) convolved with U(-1/2, 1/2):
  p(v) = Phi((1/2 - |v|) / sigma) - Phi((-1/2 - |v|) / sigma)  (Balle et al. 2018 eq. 11, Minnen et al. eq. 3).

**Training** uses additive uniform noise for the likelihoods (Balle et al. 2017) and rounding with a straight-through
gradient for the decoder's input (Minnen & Singh 2020, "Channel-wise autoregressive entropy models", sec. 3.3).

**Coding** (range coding with ``constriction``) is exact across processes and machines because every number that
shapes a probability is either stored in the model file or computed by integer-exact networks:

* the factorized density is tabulated once (:meth:`EntropyBottleneck.update`) into a per-channel probability table
  kept as a buffer (saved with the weights); coder and decoder read the same float64 table;
* scales are snapped to a fixed table of 64 log-spaced values (0.11 .. 256, CompressAI's default range) by
  comparing the network's log-scale output with stored boundaries (comparisons are exact), and coded with
  ``constriction``'s ``QuantizedGaussian`` (deterministic Rust code) at the table's standard deviation.

Symbols outside the coder's support are clamped by the encoder, which then reconstructs from the clamped symbols,
so encoder and decoder stay identical.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: smallest likelihood used in training (Balle et al. 2018 code: likelihood_bound)
LIKELIHOOD_BOUND = 1e-9
#: coded symbols of y lie in [-Y_RANGE, Y_RANGE]; of z in [-Z_RANGE, Z_RANGE]
Y_RANGE = 4095
Z_RANGE = 255
SCALE_MIN, SCALE_MAX, SCALE_LEVELS = 0.11, 256.0, 64


def _lower_bound(x: Tensor, bound: float) -> Tensor:
    """max(x, bound) whose gradient passes where x < bound if it pushes x up (Balle et al. 2018 code)."""
    return LowerBound.apply(x, bound)


class LowerBound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bound: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.bound = bound
        return x.clamp_min(bound)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        pass_through = (x >= ctx.bound) | (g < 0)
        return g * pass_through.to(g.dtype), None


def ste_round(x: Tensor) -> Tensor:
    """round(x) with the identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def noisy(x: Tensor) -> Tensor:
    """x + U(-1/2, 1/2): the training proxy of rounding for the likelihoods (Balle et al. 2017)."""
    return x + torch.empty_like(x).uniform_(-0.5, 0.5)


#: training proxies of rounding: additive uniform noise (Balle et al. 2017), or rounding with the straight-through
#: gradient (what coding does, e.g. for fine-tuning an encoder against a fixed decoder)
PROXIES = ("noise", "ste")


def rounding_proxy(x: Tensor, proxy: str, training: bool) -> Tensor:
    """round(x) outside training; in training ``noisy(x)`` (proxy "noise") or ``ste_round(x)`` (proxy "ste")."""
    if not training:
        return torch.round(x)
    if proxy == "noise":
        return noisy(x)
    if proxy == "ste":
        return ste_round(x)
    raise ValueError(f"proxy={proxy!r}: choose one of {PROXIES}")


class EntropyBottleneck(nn.Module):
    """Learned factorized prior for ``channels`` hyper-latent channels (Balle et al. 2018, appendix 6.1).

    ``filters``: hidden widths of the per-channel monotone MLP (3, 3, 3 as in the paper); ``init_scale``: the
    initial spread of the density. After training call :meth:`update` to tabulate the coding distribution.
    """

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3), init_scale: float = 10.0):
        super().__init__()
        self.channels = channels
        dims = (1, *filters, 1)
        scale = init_scale ** (1.0 / (len(filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(filters) + 1):
            init = math.log(math.expm1(1.0 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.empty(channels, dims[i + 1], 1).uniform_(-0.5, 0.5)))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))
        # coding table: probabilities of z in [-Z_RANGE, Z_RANGE] per channel (float64), filled by update()
        self.register_buffer("pmf", torch.zeros(channels, 2 * Z_RANGE + 1, dtype=torch.float64))
        #: the rounding proxy in training (:data:`PROXIES`)
        self.proxy = "noise"

    def _logits_cdf(self, x: Tensor) -> Tensor:
        """x: [C, 1, N] -> the logit of the cumulative c(x), [C, 1, N]."""
        h = x
        for i, (mat, bias) in enumerate(zip(self.matrices, self.biases)):
            h = torch.matmul(F.softplus(mat), h) + bias
            if i < len(self.factors):
                h = h + torch.tanh(self.factors[i]) * torch.tanh(h)
        return h

    def likelihood(self, z: Tensor) -> Tensor:
        """p(bin of z) for z [B, C, H, W] (values on or off the integers)."""
        c = z.shape[1]
        v = z.transpose(0, 1).reshape(c, 1, -1)
        lower = self._logits_cdf(v - 0.5)
        upper = self._logits_cdf(v + 0.5)
        sign = -torch.sign(lower + upper).detach()  # evaluate in the flatter tail (Balle et al. 2018 code)
        p = (torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).abs()
        p = _lower_bound(p, LIKELIHOOD_BOUND)
        return p.reshape(c, z.shape[0], *z.shape[2:]).transpose(0, 1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(z_hat, likelihoods): z + noise (or round(z) straight-through, :attr:`proxy`) in training, round(z)
        otherwise."""
        z_hat = rounding_proxy(z, self.proxy, self.training)
        return z_hat, self.likelihood(z_hat)

    @torch.no_grad()
    def update(self) -> None:
        """Tabulate p(z = k), k in [-Z_RANGE, Z_RANGE], per channel into the ``pmf`` buffer (float64)."""
        k = torch.arange(-Z_RANGE, Z_RANGE + 1, dtype=torch.float32)
        p = self.likelihood(k.reshape(1, 1, -1, 1).expand(1, self.channels, -1, 1)).reshape(self.channels, -1)
        self.pmf.copy_(p.to(torch.float64))

    @property
    def ready(self) -> bool:
        return bool(self.pmf.sum() > 0)

    def symbol_probabilities(self, channel_index: np.ndarray) -> np.ndarray:
        """[n, 2 Z_RANGE + 1] float64 probability rows for symbols of the given channels."""
        return self.pmf.numpy()[channel_index]


class GaussianConditional(nn.Module):
    """Mean-scale Gaussian conditional with a fixed scale table (see the module docstring).

    The networks output mu and the *log* scale; :meth:`scale_index` snaps log-scales to the table by comparison
    with stored boundaries (geometric midpoints), :meth:`likelihood` is the training likelihood of y - mu.
    """

    def __init__(self):
        super().__init__()
        table = np.exp(np.linspace(math.log(SCALE_MIN), math.log(SCALE_MAX), SCALE_LEVELS))
        self.register_buffer("scale_table", torch.tensor(table, dtype=torch.float64))
        bounds = (np.log(table[1:]) + np.log(table[:-1])) / 2  # log of the geometric midpoints
        self.register_buffer("log_bounds", torch.tensor(bounds, dtype=torch.float32))

    @staticmethod
    def scales(log_scale: Tensor) -> Tensor:
        """sigma = exp(log_scale), bounded below by the table's smallest scale (training)."""
        return _lower_bound(torch.exp(log_scale.clamp(max=math.log(SCALE_MAX))), SCALE_MIN)

    def likelihood(self, v: Tensor, log_scale: Tensor) -> Tensor:
        """p(v) = Phi((1/2 - |v|)/sigma) - Phi((-1/2 - |v|)/sigma) for v = y_hat - mu."""
        s = self.scales(log_scale)
        a = v.abs()
        upper = torch.special.ndtr((0.5 - a) / s)
        lower = torch.special.ndtr((-0.5 - a) / s)
        return _lower_bound(upper - lower, LIKELIHOOD_BOUND)

    def scale_index(self, log_scale: Tensor) -> Tensor:
        """Index into the scale table of each element (int64), by comparisons with the stored boundaries."""
        return torch.bucketize(log_scale.to(torch.float32).contiguous(), self.log_bounds)

    def table_scales(self, index: Tensor) -> np.ndarray:
        return self.scale_table.numpy()[index.reshape(-1).numpy()]
