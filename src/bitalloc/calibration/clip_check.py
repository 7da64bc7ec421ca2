"""Is a clipping rule right for this tensor? Choose each activation grid by the layer's output error.

Analytic clipping (ACIQ) is optimal for the mean squared error of a tensor whose values follow its prior
(Laplace / Gauss). Transformer activations break that: a few channels carry values 10-30x larger than the rest
(Dettmers et al. 2022, LLM.int8(); Bondarenko et al. 2021), the prior fitted to all values clips them away, and
the layer's output, dominated by those channels, is destroyed even though the tensor's own MSE looks small
(BERT-style feed-forward input: observed [-7.8, 28.5] clipped to [-3.8, 3.9]; cosine to FP32 0.82 at W8A8).

With ``TensorConfig.clip_check = "output"`` (set by the ACIQ presets), calibration keeps a sample of the layer's
inputs (:class:`InputSample`) and, once the statistics are complete, compares the candidate ranges of the
input quantizer by the error they cause at the *layer's output* (Nagel et al. 2021, "A white paper on neural
network quantization", sec. 3.4: layer-wise output MSE as the range criterion): with the float weight W,

    E_c = sum || layer(Q_c(x)) - layer(x) ||^2   over the kept inputs x,

for the configured range and for min-max (and, for ``prior="auto"``, both ACIQ priors); the candidate of least
E_c is used (ties: the configured one). The decision and every E_c are recorded (``choice``) and reported:
nothing is replaced silently.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from bitalloc.quant.grid import fake_quantize

#: kept input rows of a Linear layer (tokens / samples), and kept input elements of a convolution
MAX_ROWS = 2048
MAX_ELEMENTS = 1 << 21


class InputSample:
    """The first inputs a layer sees during calibration: rows of the channel axis for linear layers (up to
    :data:`MAX_ROWS`), whole samples for convolutions (up to :data:`MAX_ELEMENTS` values, at least one)."""

    def __init__(self, linear: bool):
        self.linear = linear
        self.parts: list[Tensor] = []
        self.size = 0

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        if self.linear:
            rows = x.detach().reshape(-1, x.shape[-1])
            take = rows[: max(0, MAX_ROWS - self.size)]
            self.size += take.shape[0]
        else:
            per = max(1, x[0].numel())
            n = min(x.shape[0], max(0, MAX_ELEMENTS - self.size) // per) if self.size else max(1, min(
                x.shape[0], MAX_ELEMENTS // per))
            take = x.detach()[:n]
            self.size += take.numel()
        if take.shape[0]:
            self.parts.append(take.clone())

    def tensor(self) -> Tensor | None:
        return torch.cat(self.parts) if self.parts else None


def candidates(method: str, options: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, method, options) of the ranges compared: the configured one first, then min-max; for
    ``aciq`` with ``prior="auto"``, the Laplace and Gaussian windows instead of the configured one."""
    opts = {k: v for k, v in options.items() if k != "allocation_statistic"}
    if method == "aciq" and opts.get("prior") == "auto":
        out = [(f"aciq-{p}", "aciq", {**opts, "prior": p}) for p in ("laplace", "gauss")]
    else:
        label = f"aciq-{opts.get('prior', 'laplace')}" if method == "aciq" else method
        out = [(label, method, opts)]
    if method != "minmax":
        out.append(("minmax", "minmax", {}))
    return out


@torch.no_grad()
def output_errors(layer: nn.Module, x: Tensor, grids: list[tuple[Tensor, Tensor, Tensor, Tensor]],
                  axis: int | None) -> list[float]:
    """sum ||layer(Q(x)) - layer(x)||^2 (float64 sums) for each grid (scale, zero point, qmin, qmax) of the
    input ``x`` (``axis``: the channel axis of per-channel grids, None per tensor); ``layer`` runs in float."""
    ref = layer(x).double()
    errs = []
    for scale, zp, qmin, qmax in grids:
        y = layer(fake_quantize(x, scale, zp, qmin, qmax, axis)).double()
        errs.append(float(((y - ref) ** 2).sum()))
    return errs


def choose(labels: list[str], errors: list[float]) -> int:
    """Index of the least error (the first on ties: the configured range wins them); NaN never wins."""
    best = 0
    for i, e in enumerate(errors):
        if not math.isnan(e) and (math.isnan(errors[best]) or e < errors[best]):
            best = i
    return best
