"""The Bayesian Bits quantizer (van Baalen et al., NeurIPS 2020): gated residual quantization + pruning.

One tensor (a layer's weight or its input activation) is clipped to a learned range and decomposed into a
2-bit term and residuals at 4, 8, 16 and 32 bits (:mod:`bitalloc.quant.bayesian_bits`); stochastic gates
``z4, z8, z16, z32`` (one per tensor) decide how many residuals are added, and for weights a gate ``z2`` per
output channel prunes the channel. The math, its sources and the choices made are in
:mod:`bitalloc.quant.bayesian_bits` and :mod:`bitalloc.quant.gates`.

Parameters (all in ``quant_parameters()``): ``clip_max`` (the range ``a``: ``[-a, a]`` signed, ``[0, a]``
unsigned; initialised to the largest |value| of the weight or of the first batch), ``log_alpha``
(``[n]``: z4.. up to ``TensorConfig.bits``) and, for weights with pruning, ``log_alpha_prune`` (``[C]``).

Modes:

* training (``module.train()``): gates sampled (hard-concrete, or Gumbel-softmax with ``gates="gumbel"``);
  residual levels above a gate sampled exactly 0 are not computed (their contribution and gradients are 0),
  and the levels up to the last of the leading gates sampled exactly 1 are computed as one direct
  quantization on that level's grid (``residual_terms(..., collapsed=j)``: the same values and straight-through
  gradients; a hard-concrete gate clamped at 1 passes no gradient to its log-alpha, so nothing is lost, save
  for a stretched sample of exactly 1, an event of probability 0). With the usual initial log-alpha of 6 about
  99% of the gate samples are exactly 1, so most steps round once per tensor instead of once per level
  (ResNet-20 training step 2.0x FP32's instead of 5.0x, LSQ 1.5x; BENCHMARKS.md).
  As in the reference code, a hard-concrete bit gate whose ``log_alpha <= skip_below`` (-2) is treated as
  off during training without sampling, and so are all gates above it (``options["skip_below"] = None``
  samples every gate, as the paper's text describes).
* evaluation (``module.eval()``): deterministic test-time gates (on iff P(z = 0) < 0.34), i.e. a fixed
  grid of ``test_bits()`` bits and a fixed mask of kept channels; the forward then computes exactly what the
  FrozenQuantizer of :meth:`qparams` computes (:func:`bitalloc.model.freeze.freeze`).
* fixed-gate fine-tuning (``fix_gates(True)`` in training mode): the gates are the deterministic test-time
  gates (no noise drawn), so the training forward is the nested decomposition with those 0/1 gates, i.e. the
  test-time grid of ``test_bits()`` bits on the learned range, with pruned channels zeroed; the range and the
  input still get gradients, the gates none. This is the Bayesian Bits recipe's last phase (paper section 4,
  ImageNet; reference code ``--fixed-gate-finetune-epochs``, which swaps each quantizer for a PACT quantizer of
  the test-time width, learned range and prune mask); :class:`bitalloc.train.methods.QATObjective` switches it
  on for the last ``--bb-fix-gates-epochs`` epochs and drops the regulariser there.

Pruning gates apply to the whole output channel: :meth:`output_gate` returns the z2 of the last forward (the
sample in training, the kept mask at test time), and :class:`~bitalloc.model.layers.QuantLayer` multiplies
the layer's bias by it, so a pruned channel outputs exactly 0 (not its bias), as the cost model assumes.

Noise: the uniform noise of the gates comes from a generator seeded by ``(noise_key, noise_step)`` (buffers;
``noise_step`` counts training forwards), not from the global RNG, so that every data-parallel rank draws
the same gates as a single process would with the same global batch, and a resumed run draws the same gates
as an uninterrupted one. :func:`assign_noise_keys` gives each quantizer of a model a distinct key.

Options (``TensorConfig.options``): ``gates`` ("hard_concrete" | "gumbel"), ``gate_init`` (initial log-alpha
of z4, z8, z16, z32; default 6 each), ``prune`` (weights: learn z2 per output channel; default True for
weights), ``prune_init`` (6), ``threshold`` (test-time P(off) threshold: 0.34 hard-concrete, 0.5 Gumbel),
``temperature`` (Gumbel, 2/3), ``gumbel_hard`` (True: straight-through 0/1 samples), ``skip_below`` (-2.0),
``fixed`` (True: no gates, a fixed ``bits``-bit grid with a learned range; no regulariser, e.g. the network's
input at 8 bits). ``TensorConfig.bits`` is the largest bit width of the decomposition (2, 4, 8, 16 or 32).
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import Tensor, nn

from bitalloc.config import TensorConfig
from bitalloc.errors import ConfigError
from bitalloc.quant import bayesian_bits as BB
from bitalloc.quant import gates as G
from bitalloc.quant.grid import MIN_SCALE, reshape_for_axis, round_ste
from bitalloc.quantizers.base import QuantParams
from bitalloc.quantizers.lsq import DataStats, LearnedQuantizer

_KNOWN_OPTIONS = {"gates", "gate_init", "prune", "prune_init", "threshold", "temperature", "gumbel_hard", "skip_below",
                  "fixed"}


def _mix(*parts: int) -> int:
    from bitalloc.train.distributed import _mix as mix

    return mix(*parts)


class BayesianBitsQuantizer(LearnedQuantizer):
    """Bayesian Bits quantizer of one tensor (see the module docstring)."""

    kind = "bb"

    def __init__(self, cfg: TensorConfig, role: str, axis: int | None, channels: int | None):
        if cfg.allocate:
            raise ConfigError("Bayesian Bits learns bit widths itself; do not combine it with allocate=True")
        super().__init__(cfg, role, axis, channels)
        if self.per_channel and role != "weight":
            raise ConfigError("Bayesian Bits quantizes activations per tensor (one range and one set of bit gates "
                              "per tensor); use granularity='tensor' for activations")
        opts = dict(cfg.options)
        unknown = set(opts) - _KNOWN_OPTIONS
        if unknown:
            raise ConfigError(f"unknown Bayesian Bits options {sorted(unknown)}; valid: {sorted(_KNOWN_OPTIONS)}")
        self.max_bits = BB.check_level(int(float(cfg.bits)))
        self.n_gates = BB.LEVELS.index(self.max_bits)  # bit gates z4 .. z_max
        self.gate_type = G.canonical_gate_type(opts.get("gates", "hard_concrete"))
        self.fixed = bool(opts.get("fixed", False))
        default_thr = G.HC_THRESHOLD if self.gate_type == "hard_concrete" else G.GUMBEL_THRESHOLD
        self.threshold = float(opts.get("threshold", default_thr))
        self.temperature = float(opts.get("temperature", G.GUMBEL_TAU))
        self.gumbel_hard = bool(opts.get("gumbel_hard", True))
        skip = opts.get("skip_below", -2.0)
        self.skip_below = None if skip is None or self.gate_type != "hard_concrete" else float(skip)
        init = opts.get("gate_init", 6.0)
        init = [float(init)] * 4 if isinstance(init, (int, float)) else [float(v) for v in init]
        if len(init) < self.n_gates:
            raise ConfigError(f"gate_init needs {self.n_gates} values (z4..z{self.max_bits}), got {init}")
        self.prune = bool(opts.get("prune", role == "weight")) and role == "weight" and not self.fixed
        if opts.get("prune") and role != "weight":
            raise ConfigError("Bayesian Bits prunes output channels of weights only (prune=True on an activation)")
        # the learned range: one per tensor (the paper), or one per output channel of a weight (granularity
        # "channel": BatchNorm-folded weights differ in scale per channel); the bit gates stay per tensor
        self.clip_max = nn.Parameter(torch.ones((channels,) if self.per_channel else ()))
        la = torch.tensor(init[: self.n_gates], dtype=torch.float32)
        self.log_alpha: nn.Parameter | None = None if self.fixed else nn.Parameter(la)
        if self.prune:
            self.log_alpha_prune = nn.Parameter(torch.full((channels,), float(opts.get("prune_init", 6.0))))
        else:
            self.log_alpha_prune = None
        self.register_buffer("noise_key", torch.tensor(zlib.crc32(f"{role}:{channels}".encode()), dtype=torch.int64))
        self.register_buffer("noise_step", torch.tensor(0, dtype=torch.int64))
        #: the layer's MAC weight r of the BOP-aware regulariser (set by the training objective)
        self.mac_weight = 1.0
        #: the last training sample of the gates (for logging)
        self.last_gates: list[float] | None = None
        #: fixed-gate fine-tuning: deterministic test-time gates in training too (see the module docstring)
        self.gates_fixed = False
        self._last_z2: Tensor | None = None

    # -- initialisation ---------------------------------------------------------------------------------
    def _init_from_stats(self, stats: DataStats) -> None:
        a = stats.abs_max() if self.is_signed else stats.max.clamp_min(0.0)
        a = a.reshape(self.clip_max.shape) if self.per_channel else a.max()
        self.clip_max.copy_(torch.clamp(a, min=MIN_SCALE).to(torch.float32))

    def clamp_parameters(self) -> None:
        with torch.no_grad():
            self.clip_max.clamp_(min=MIN_SCALE)

    # -- gates ---------------------------------------------------------------------------------------
    def gate_probs(self) -> Tensor:
        """P(gate on) of the bit gates z4..z_max ([n]); 1 for a fixed quantizer."""
        if self.fixed:
            return torch.ones(self.n_gates, device=self.clip_max.device)
        return G.prob_on(self.log_alpha, self.gate_type)

    def prune_probs(self) -> Tensor | None:
        """P(z2 on) per output channel ([C]), or None without pruning."""
        return None if self.log_alpha_prune is None else G.prob_on(self.log_alpha_prune, self.gate_type)

    def test_gates(self) -> Tensor:
        """Deterministic 0/1 test-time bit gates z4..z_max."""
        if self.fixed:
            return torch.ones(self.n_gates)
        return G.test_gate(self.log_alpha, self.gate_type, self.threshold).cpu()

    def test_bits(self) -> int:
        """Bit width at test time (thresholded gates, autoregressive: the first off gate stops)."""
        return BB.bits_from_gates(list(self.test_gates())) if self.n_gates else 2

    def expected_bits(self) -> Tensor:
        """E[bits] under the gate posteriors: 2 + 2 p4 + 4 p4 p8 + ... (0-d; z2 excluded)."""
        if self.n_gates == 0:
            return torch.tensor(2.0)
        return BB.expected_bits(self.gate_probs().detach().double().cpu())

    def kept_mask(self) -> Tensor | None:
        if self.log_alpha_prune is None:
            return None
        return G.test_gate(self.log_alpha_prune, self.gate_type, self.threshold).cpu() > 0.5

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_last_z2"] = None  # a per-forward sample (possibly part of an autograd graph): never copied
        return state

    def fix_gates(self, fixed: bool = True) -> None:
        """Use the deterministic test-time gates in training as well (fixed-gate fine-tuning), or go back to
        sampled gates (``fixed=False``)."""
        self.gates_fixed = bool(fixed)

    def output_gate(self) -> Tensor | None:
        """The z2 gates of the output channels in the current forward ([C]; None without pruning): the sample
        of the last training forward, or the 0/1 kept mask at test time / with fixed gates."""
        if self.log_alpha_prune is None or not self.enabled or self._observing is not None:
            return None
        if self.training and self._last_z2 is not None:
            return self._last_z2
        return G.test_gate(self.log_alpha_prune, self.gate_type, self.threshold).to(self.log_alpha_prune.device)

    def bits_per_channel(self) -> Tensor:
        """Expected bits in training mode, test-time bits in eval mode or with fixed gates ([1], float64)."""
        if self.training and not self.fixed and not self.gates_fixed:
            return self.expected_bits().reshape(1).double()
        return torch.tensor([float(self.test_bits())], dtype=torch.float64)

    def regularizer(self) -> Tensor:
        """``r * mean_c sum_k bits_k prod_{j<=k} q_j`` (0 for a fixed quantizer); differentiable."""
        if self.fixed:
            return torch.zeros((), device=self.clip_max.device)
        return BB.regularizer(self.gate_probs(), self.mac_weight, self.prune_probs())

    def _noise(self, n: int, device: torch.device) -> Tensor:
        gen = torch.Generator().manual_seed(_mix(int(self.noise_key), int(self.noise_step)))
        self.noise_step += 1
        return G.uniform_noise((n,), gen, device=device)

    def sample_gates(self) -> tuple[list[Tensor], Tensor | None]:
        """Training-time gates: ``([z4, ..], z2 or None)``; gates above a skipped gate are 0."""
        if self.fixed:
            one = torch.ones((), device=self.clip_max.device)
            return [one] * self.n_gates, None
        if self.gates_fixed:  # fixed-gate fine-tuning: the test-time gates, no noise, no gradient to the gates
            dev = self.clip_max.device
            gates = [g.to(dev) for g in self.test_gates()]
            z2 = (None if self.log_alpha_prune is None
                  else G.test_gate(self.log_alpha_prune, self.gate_type, self.threshold).to(dev))
            self.last_gates = [float(g) for g in gates]
            return gates, z2
        n_prune = self.log_alpha_prune.numel() if self.log_alpha_prune is not None else 0
        u = self._noise(self.n_gates + n_prune, self.clip_max.device)
        kw: dict[str, Any] = {"tau": self.temperature, "hard": self.gumbel_hard}
        gates: list[Tensor] = []
        off = False
        for k in range(self.n_gates):
            la = self.log_alpha[k]
            if off or (self.skip_below is not None and float(la.detach()) <= self.skip_below):
                off = True
                gates.append(torch.zeros((), device=la.device))
            else:
                gates.append(G.sample_gate(la, u[k], self.gate_type, **kw))
        z2 = G.sample_gate(self.log_alpha_prune, u[self.n_gates:], self.gate_type, **kw) if n_prune else None
        self.last_gates = [float(g.detach()) for g in gates]
        return gates, z2

    # -- forward --------------------------------------------------------------------------------------
    def _range(self) -> Tensor:
        return torch.clamp(self.clip_max, min=MIN_SCALE)

    def _quantize(self, x: Tensor) -> Tensor:
        if not self.training:
            self._last_z2 = None
            return self._fake_quantize_frozen(x)
        a = self._range()
        if self.per_channel:
            a = reshape_for_axis(a, x.ndim, self.axis)
        signed = self.is_signed
        gates, z2 = self.sample_gates()
        self._last_z2 = z2
        exact_01 = self.gate_type == "hard_concrete" or self.gates_fixed or self.fixed
        active = BB.leading_on(gates) if exact_01 else self.n_gates
        ones = BB.leading_ones(gates[:active]) if exact_01 else 0
        xc = BB.clip_to_range(x, a, signed)
        scales = BB.nested_scales(BB.range_width(a, signed).to(x.dtype) / 3.0, active + 1)
        terms = BB.residual_terms(xc, scales, round_ste, collapsed=ones)
        out = BB.gated_sum(terms, [None] + gates[ones:active])
        if z2 is not None:
            out = out * reshape_for_axis(z2.to(out.dtype), out.ndim, self.axis)
        return out

    def qparams(self) -> QuantParams:
        b = self.test_bits()
        signed = self.is_signed
        dev = self.clip_max.device
        scale = BB.level_scale(self._range().detach(), b, signed).to(torch.float32)
        if signed:
            qmax = torch.tensor((1 << (b - 1)) - 1, dtype=torch.int64, device=dev)
            qmin = -qmax
        else:
            qmin = torch.tensor(0, dtype=torch.int64, device=dev)
            qmax = torch.tensor((1 << b) - 1, dtype=torch.int64, device=dev)
        kept = self.kept_mask()
        shape = scale.shape  # () per tensor, [C] with per-channel ranges
        return QuantParams(bits=torch.full(shape, b, dtype=torch.int64, device=dev), scale=scale,
                           zero_point=torch.zeros(shape, dtype=torch.int64, device=dev), qmin=qmin.expand(shape),
                           qmax=qmax.expand(shape), axis=self.axis, signed=signed,
                           kept=None if kept is None else kept.to(dev))

    def state_summary(self) -> dict[str, Any]:
        """Loggable state: expected and test bits, gate probabilities, kept channels."""
        d: dict[str, Any] = {"expected_bits": float(self.expected_bits()), "test_bits": self.test_bits(),
                             "p_on": [round(float(p), 5) for p in self.gate_probs().detach().cpu()],
                             "range": float(self._range().detach().mean())}
        pp = self.prune_probs()
        if pp is not None:
            kept = self.kept_mask()
            d.update(kept=int(kept.sum()), channels=int(kept.numel()), p_keep_mean=float(pp.detach().mean()))
        return d

    def extra_repr(self) -> str:
        extra = ", fixed" if self.fixed else f", {self.gate_type}, prune={self.prune}" + (
            ", gates fixed" if self.gates_fixed else "")
        return super().extra_repr() + extra


def assign_noise_keys(model: nn.Module, seed: int = 0) -> int:
    """Give every Bayesian Bits quantizer of ``model`` a distinct, name-derived noise key (returns how many)."""
    from bitalloc.model.layers import quant_layers

    n = 0
    for name, layer in quant_layers(model):
        for role, q in (("weight", layer.weight_quantizer), ("act", layer.input_quantizer)):
            if isinstance(q, BayesianBitsQuantizer):
                q.noise_key.fill_(_mix(int(seed), zlib.crc32(f"{name}:{role}".encode())) & ((1 << 62) - 1))
                n += 1
    return n


__all__ = ["BayesianBitsQuantizer", "assign_noise_keys"]
