"""Quantization-aware training methods for ``bitalloc train --method {lsq,pact,bb}``.

Each method is a :class:`~bitalloc.train.presets.Method`: ``prepare`` runs :func:`bitalloc.prepare` with a
:class:`~bitalloc.config.QuantConfig` whose ``TensorConfig.quantizer`` is "lsq", "pact" or "bb" (the same model
transformation, cost model and export path as PTQ), the objective hook (:class:`QATObjective`) adds the
method's parameter groups, loss terms and logs, and ``config_overrides`` sets the papers' schedule.

**Recipes** (overridable on the command line):

* All three: Adam, lr 1e-3 for every group, no weight decay, the weight learning rate constant for the first
  2/3 of training then linearly decayed to 0 (``schedule="constant_then_linear"``) -- the Bayesian Bits recipe
  (van Baalen et al. 2020, appendix; reference code ``make_lr_scheduler`` and the README's MNIST / CIFAR-10
  commands), used for the LSQ and PACT baselines too so the comparison differs only in the quantizer.
* ``lsq`` (Esser et al. 2020): W``--w-bits``/A``--a-bits`` (default 4/4), first and last layer 8/8
  (``--first-last-bits``), per-tensor steps (``--q-granularity channel`` for per-channel weight steps). Step
  sizes are in the group "quant" (no weight decay, the weights' schedule).
* ``pact`` (Choi et al. 2018): same bit widths; clip levels in group "quant"; L2 decay ``--pact-decay`` on
  alpha (added to the loss as ``decay / 2 * sum alpha^2``).
* ``bb`` (Bayesian Bits): weights and activations decomposed up to 32 bits (``--bb-max-bits``), z2 pruning
  gates per output channel of every layer but the last (whose outputs are the logits), the network input
  quantized at a fixed ``--first-last-bits`` (8: the reference code counts the input at 8 bits). Initial
  log-alpha of the z4/z8/z16/z32 gates ``--gate-init`` (default: 6,6,-6,-6 on MNIST-like data, i.e. start at 8
  bits, as the reference MNIST command; 6,6,6,6 otherwise, as its CIFAR-10 command), z2 ``--prune-init 6``.
  Loss = cross-entropy + ``mu`` * sum of the quantizers' regularisers (``--mu``, default 0.1 on MNIST-like data
  and 0.01 otherwise, the reference commands' values). Gates in group "gates" (Adam lr ``--gate-lr`` 1e-3,
  constant), ranges in group "ranges" (``--range-lr``, constant; default: the weights' ``--lr``, 1e-3 unless
  changed), as the reference code's ``--learning-rate-q`` / ``--learning-rate-s`` (all 1e-3 there). Following
  the weights' lr matters when fine-tuning with a lower one: ResNet-20 at ``--lr 1e-4``, started at 4 bits, ended
  0.56 points below LSQ 4/4 with the ranges at 1e-3 (6 epochs) and 0.30 points above it with the ranges at 1e-4
  (3 epochs; BENCHMARKS.md). MAC weight of each regulariser ``r = MACs of the layer / MACs of the largest
  layer`` (reference code ``get_bops``; ``--mac-weighting total`` uses the share of the total).
  ``--bb-fix-gates-epochs N`` (N >= 1 epochs, or a fraction in (0, 1) of the epochs; default 0) ends training
  with N epochs of fixed-gate fine-tuning: the gates are the deterministic test-time gates, the regulariser is
  dropped and the gate parameters stay exactly where they were, while weights and ranges keep learning (paper
  section 4 on ImageNet: "fine-tune with fixed gates"; reference code ``--fixed-gate-finetune-epochs 10`` for
  ImageNet, none in its MNIST / CIFAR-10 commands). Difference: the reference code runs those epochs *after* the
  main ones with a fresh optimizer (SGD 1e-4 for weights, Adam 1e-4 for ranges, cosine to 0); bitalloc runs them
  as the last N epochs of the one schedule.

**Epochs and batch size** (``--qat-recipe``; explicit ``--epochs`` / ``--batch-size`` win). The paper's
numbers come from the Bayesian Bits reference code's README commands (which reproduce the paper's MNIST and
CIFAR-10 results); the appendix states the same optimizer, learning rates and 2/3 schedule, but we have not
re-checked its every number against those commands. The paper does not give separate LSQ / PACT recipes for
these data sets; bitalloc trains them with the same recipe.

* mnist, fashion-mnist (LeNet-5): ``paper`` 100 epochs, batch 128; ``cpu`` (default) 10 epochs, batch 128;
  bb mu 0.1, gate init 6,6,-6,-6.
* cifar10 (VGG-7 in the paper; ResNet-20 by analogy, not in the paper): ``paper`` 300 epochs, batch 128; ``cpu``
  30 epochs, batch 128; bb mu 0.01, gate init 6,6,6,6.
* other data sets (imagenet, imagefolder...): the FP32 preset's epochs and batch size for both; bb mu 0.01, gate
  init 6,6,6,6.

CPU cost (2 cores, the project's reference machine, measured under load): LeNet-5 Bayesian Bits at batch 128
is about 0.65 s per step, i.e. ~5 minutes per MNIST epoch: the ``cpu`` recipe's 10 epochs take about an hour,
the paper's 100 about 8-9 hours. Starting from an FP32 checkpoint (``--init``) needs fewer epochs. The paper's
ImageNet recipe (ResNet-18 from pretrained weights: SGD with Nesterov momentum, lr 3e-3, for the weights but
Adam 1e-3 for gates and ranges, steps at epochs 10 and 20, 30 epochs, batch 384, then 10 fixed-gate epochs) is
not reproduced: the training loop uses one optimizer type for all groups.

**BatchNorm** (``--fold-bn`` / ``--no-fold-bn``, default fold): ``prepare`` folds every BatchNorm into the
preceding layer before training (the weights are quantized as they will be deployed; the BatchNorm's affine
parameters are then trained as the layer's weights and bias). Bayesian Bits requires it when the model has
BatchNorms: a pruned channel followed by an unfolded BatchNorm would output ``beta - gamma * mean / sigma``, a
constant, not 0, while the cost model counts the channel as removed. LSQ and PACT may train with unfolded
BatchNorms (``--no-fold-bn``, batch statistics in training); :func:`bitalloc.model.freeze.freeze` then folds
each BatchNorm into its quantized layer exactly on the learned grid (per-channel steps).

The objective logs, every epoch (``record["state"]`` in the JSON-lines log): per layer the weight and input
bit widths (Bayesian Bits: expected and test-time bits, gate probabilities, kept channels, mean P(z2 on);
LSQ/PACT: bits and step / clip level), and the model's relative BOPs (test-time; Bayesian Bits also expected).
"""

from __future__ import annotations

import argparse
import re
from typing import Any, Mapping

import torch
from torch import nn

from bitalloc.config import LayerConfig, QuantConfig, TensorConfig, read_config_file
from bitalloc.errors import ConfigError
from bitalloc.train.loop import Objective
from bitalloc.train.presets import Method, Preset, register_method

QAT_METHODS = ("lsq", "pact", "bb")
MNIST_LIKE = ("mnist", "fashion-mnist")
#: input shapes of the hidden test models of ``bitalloc train`` (zoo models use bitalloc.models.model_info)
HOOK_INPUT_SHAPES: dict[str, tuple[int, ...]] = {"synthetic-mlp": (1, 8, 8)}

RECIPE = dict(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant_then_linear", warmup_epochs=0.0)

DEFAULTS: dict[str, Any] = dict(w_bits=4, a_bits=4, first_last_bits=8, granularity="tensor", q_lr=None, mu=None,
                                gates="hard_concrete", gate_init=None, prune=True, prune_init=6.0, gate_lr=1e-3,
                                range_lr=None, threshold=None, max_bits=32, mac_weighting="max", skip_below=-2.0,
                                pact_decay=2e-4, pact_init="max", input_shape=None, dataset=None, seed=0,
                                fold_bn=True, fix_gates_epochs=0.0, recipe="cpu", config=None)

#: epochs and batch size per dataset family and ``recipe`` (see the module docstring's table)
QAT_RECIPES: dict[str, dict[str, Any]] = {
    "mnist": {"datasets": MNIST_LIKE, "paper": dict(epochs=100, batch_size=128),
              "cpu": dict(epochs=10, batch_size=128)},
    "cifar10": {"datasets": ("cifar10",), "paper": dict(epochs=300, batch_size=128),
                "cpu": dict(epochs=30, batch_size=128)},
}
RECIPE_NAMES = ("cpu", "paper")

_QAT_COMMON = ("first_last_bits", "q_granularity", "input_shape", "fold_bn", "qat_recipe")
#: the ``bitalloc train`` options (argparse dests) each method reads: one given on the command line for another
#: method (or for ``--method fp32``) would be ignored, so ``bitalloc train`` refuses it
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "fp32": (),
    "lsq": _QAT_COMMON + ("w_bits", "a_bits", "q_lr", "config"),
    "pact": _QAT_COMMON + ("w_bits", "a_bits", "q_lr", "pact_decay", "pact_init", "config"),
    "bb": _QAT_COMMON + ("mu", "gates", "gate_init", "prune", "prune_init", "gate_lr", "range_lr", "bb_threshold",
                         "bb_max_bits", "mac_weighting", "bb_fix_gates_epochs", "skip_below"),
}


def qat_recipe(dataset: str | None, recipe: str = "cpu") -> dict[str, Any]:
    """Epochs / batch size of the quantization-aware recipe for ``dataset`` ({} when there is none)."""
    if recipe not in RECIPE_NAMES:
        raise ConfigError(f"--qat-recipe {recipe!r}: choose one of {RECIPE_NAMES}")
    for entry in QAT_RECIPES.values():
        if dataset in entry["datasets"]:
            return dict(entry[recipe])
    return {}


# ---- options -------------------------------------------------------------------------------------------

def resolve_options(method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Fill in defaults (dataset-dependent ones included) and validate; the result is JSON-like."""
    if method not in QAT_METHODS:
        raise ConfigError(f"unknown quantization-aware method {method!r}; choose one of {QAT_METHODS}")
    opts = dict(DEFAULTS)
    unknown = set(options or {}) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown {method} options {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
    opts.update({k: v for k, v in (options or {}).items() if v is not None or k in ("first_last_bits", "skip_below")})
    mnist = opts.get("dataset") in MNIST_LIKE
    if opts["mu"] is None:
        opts["mu"] = 0.1 if mnist else 0.01
    if opts["gate_init"] is None:
        opts["gate_init"] = [6.0, 6.0, -6.0, -6.0] if mnist else [6.0, 6.0, 6.0, 6.0]
    if isinstance(opts["gate_init"], str):
        opts["gate_init"] = [float(v) for v in opts["gate_init"].split(",") if v.strip()]
    opts["gate_init"] = [float(v) for v in opts["gate_init"]]
    if opts["input_shape"] is not None:
        opts["input_shape"] = [int(v) for v in opts["input_shape"]]
    if opts["granularity"] not in ("tensor", "channel"):
        raise ConfigError(f"granularity={opts['granularity']!r} must be 'tensor' or 'channel'")
    if opts["mac_weighting"] not in ("max", "total"):
        raise ConfigError(f"mac_weighting={opts['mac_weighting']!r} must be 'max' or 'total'")
    if float(opts["mu"]) < 0:
        raise ConfigError(f"mu={opts['mu']} must be >= 0")
    if opts["first_last_bits"] in (0, "none", "None"):
        opts["first_last_bits"] = None
    opts["fold_bn"] = bool(opts["fold_bn"])
    fix = float(opts["fix_gates_epochs"] or 0.0)
    if fix < 0 or fix != fix:
        raise ConfigError(f"--bb-fix-gates-epochs {opts['fix_gates_epochs']}: give N >= 1 epochs or a fraction in (0, 1)")
    if fix >= 1 and fix != int(fix):
        raise ConfigError(f"--bb-fix-gates-epochs {fix}: a number of epochs must be an integer (or a fraction < 1)")
    if fix and method != "bb":
        raise ConfigError("--bb-fix-gates-epochs applies to Bayesian Bits (--method bb) only")
    opts["fix_gates_epochs"] = fix
    if opts["recipe"] not in RECIPE_NAMES:
        raise ConfigError(f"--qat-recipe {opts['recipe']!r}: choose one of {RECIPE_NAMES}")
    return opts


def fixed_gate_epochs(fix: float, n_epochs: int) -> int:
    """How many final epochs use fixed gates: ``fix`` epochs (>= 1) or ``round(fix * n_epochs)`` (at least 1)
    for a fraction in (0, 1); 0 when ``fix`` is 0. Must leave at least one epoch of stochastic gates."""
    if not fix:
        return 0
    k = int(fix) if fix >= 1 else max(1, int(round(fix * n_epochs)))
    if k >= n_epochs:
        raise ConfigError(f"--bb-fix-gates-epochs {fix:g} fixes the gates for {k} of {n_epochs} epochs: leave at least "
                          "one epoch to learn them (more epochs, or fewer fixed-gate epochs)")
    return k


def _input_shape(opts: Mapping[str, Any], model_name: str | None = None) -> tuple[int, ...]:
    if opts.get("input_shape"):
        return tuple(int(v) for v in opts["input_shape"])
    raise ConfigError("the quantization-aware methods need the model's input shape to prepare it: pass "
                      "--input-shape C,H,W (zoo models know theirs)")


def example_input(shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """A deterministic example batch of one input (values do not matter for tracing)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, *shape, generator=g)


def layer_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Supported layers (Conv/Linear) in execution order (the order ``prepare`` uses for first/last)."""
    from bitalloc.model.layers import is_supported
    from bitalloc.model.trace import trace_model

    was = model.training
    model.eval()
    try:
        trace = trace_model(model, example, atomic=lambda n, m: is_supported(m))
    finally:
        model.train(was)
    names = [n for n, m in model.named_modules() if n and is_supported(m) and trace.called(n)]
    return trace.order(names)


def _exact(name: str) -> str:
    return "re:" + re.escape(name)


def qat_config(method: str, options: Mapping[str, Any], order: list[str]) -> QuantConfig:
    """The QuantConfig of a quantization-aware method (see the module docstring)."""
    opts = resolve_options(method, options)
    if method in ("lsq", "pact"):
        extra = {"init": opts["pact_init"]} if method == "pact" else {}
        w = TensorConfig(bits=int(opts["w_bits"]), granularity=opts["granularity"], symmetric=True, quantizer=method,
                         options=dict(extra) if method == "pact" else {})
        a = TensorConfig(bits=int(opts["a_bits"]), granularity="tensor", quantizer=method, options=dict(extra))
        flb = opts["first_last_bits"]
        return QuantConfig(default=LayerConfig(weight=w, act=a), first_last_bits=None if flb is None else int(flb),
                           fold_bn=bool(opts["fold_bn"])).validate()
    common = {"gates": opts["gates"], "skip_below": opts["skip_below"]}
    if opts["threshold"] is not None:
        common["threshold"] = float(opts["threshold"])
    gate_opts = dict(common, gate_init=list(opts["gate_init"]))
    w = TensorConfig(bits=int(opts["max_bits"]), granularity=opts["granularity"], symmetric=True, quantizer="bb",
                     options=dict(gate_opts, prune=bool(opts["prune"]), prune_init=float(opts["prune_init"])))
    a = TensorConfig(bits=int(opts["max_bits"]), quantizer="bb", options=dict(gate_opts))
    overrides: list[tuple[str, dict[str, Any]]] = []
    if order:
        if opts["first_last_bits"] is not None:  # the network input: a fixed grid, not learned bits
            overrides.append((_exact(order[0]), {"act": dict(bits=int(opts["first_last_bits"]), options={"fixed": True})}))
        overrides.append((_exact(order[-1]), {"weight.options": dict(w.options, prune=False)}))
    return QuantConfig(default=LayerConfig(weight=w, act=a), overrides=overrides, first_last_bits=None,
                       fold_bn=bool(opts["fold_bn"])).validate()


def qat_config_from(method: str, options: Mapping[str, Any], model: nn.Module, example: torch.Tensor) -> QuantConfig:
    """The lsq / pact configuration that starts from the per-layer widths of a post-training QuantConfig
    (``options["config"]``, a ``to_dict`` dict, e.g. the ``searched.json`` of ``bitalloc ptq --budget``).

    The PTQ configuration is resolved exactly as ``prepare`` resolves it for this model (first / last layers,
    overrides, layers left in float); each layer then gets one override with its weight and input widths (an
    allocated per-channel budget becomes its average, rounded: learned quantizers have one width per tensor;
    a tensor the configuration leaves in float stays in float). Ranges are learned afresh as usual."""
    if method not in ("lsq", "pact"):
        raise ConfigError(f"a starting configuration (--config) applies to lsq and pact, not {method!r}")
    import bitalloc

    ptq = QuantConfig.from_dict(dict(options["config"]))
    info = bitalloc.prepare(model, ptq, example).bitalloc_info
    base = qat_config(method, {**options, "config": None, "first_last_bits": None}, [])
    overrides: list[tuple[str, dict[str, Any]]] = []
    for rec in info.layers:
        if rec.status == "quantized":
            patch: dict[str, Any] = {}
            for key, summary in (("weight", rec.weight), ("act", rec.act)):
                patch.update({f"{key}.bits": int(round(float(summary["bits"])))} if summary else {key: None})
            overrides.append((_exact(rec.name), patch))
        elif rec.status == "float" and rec.reason == "left in float by configuration":
            overrides.append((_exact(rec.name), {"quantize": False}))
    return QuantConfig(default=base.default, overrides=overrides, first_last_bits=None,
                       fold_bn=bool(options["fold_bn"])).validate()


def prepare_qat(model: nn.Module, method: str, options: Mapping[str, Any] | None = None) -> nn.Module:
    """``bitalloc.prepare`` the model for ``method`` ("lsq", "pact" or "bb") with ``options`` (see DEFAULTS)."""
    import bitalloc
    from bitalloc.quantizers.bayesian_bits import assign_noise_keys

    from bitalloc.model.fold_bn import BATCHNORMS

    opts = resolve_options(method, options)
    example = example_input(_input_shape(opts))
    if method == "bb" and not opts["fold_bn"] and opts["prune"] and any(isinstance(m, BATCHNORMS) for m in model.modules()):
        raise ConfigError("Bayesian Bits with pruning needs --fold-bn: a pruned channel followed by an unfolded "
                          "BatchNorm would output a constant (beta - gamma * mean / sigma), not 0; drop --no-fold-bn "
                          "(or pass --no-prune)")
    if opts.get("config") is not None:
        cfg = qat_config_from(method, opts, model, example)
    else:
        cfg = qat_config(method, opts, layer_order(model, example))
    q = bitalloc.prepare(model, cfg, example)
    if method == "bb":
        assign_noise_keys(q, seed=int(opts.get("seed") or 0))
    q.bitalloc_example_shape = tuple(example.shape[1:])  # freeze folds remaining BatchNorms with it
    return q


# ---- the objective ----------------------------------------------------------------------------------------

def _learned(model: nn.Module):
    from bitalloc.model.layers import quant_layers
    from bitalloc.quantizers.lsq import LearnedQuantizer

    for name, layer in quant_layers(model):
        for role, q in (("weight", layer.weight_quantizer), ("act", layer.input_quantizer)):
            if isinstance(q, LearnedQuantizer):
                yield name, role, q


def mac_weights(model: nn.Module, example: torch.Tensor, mode: str = "max") -> dict[str, float]:
    """``r`` per quantized layer: MACs / MACs of the largest layer ("max", reference code) or / total MACs."""
    from bitalloc.cost import cost_report

    rep = cost_report(model, example)
    macs = {l.name: l.macs for l in rep.layers if l.quantized}
    denom = (max(macs.values()) if mode == "max" else sum(macs.values())) if macs else 1.0
    return {k: v / denom if denom else 0.0 for k, v in macs.items()}


class QATObjective(Objective):
    """Objective hook of the lsq / pact / bb methods (see the module docstring)."""

    def __init__(self, model: nn.Module, method: str, options: Mapping[str, Any] | None = None):
        self.method = method
        self.opts = resolve_options(method, options)
        self.example = example_input(_input_shape(self.opts))
        self.mu = float(self.opts["mu"])
        self.r = mac_weights(model, self.example, self.opts["mac_weighting"])
        if method == "bb":
            for name, _, q in _learned(model):
                q.mac_weight = float(self.r.get(name, 0.0))
        #: first epoch (0-based) of fixed-gate fine-tuning, or None (set by on_train_start)
        self.fix_from: int | None = None
        self.gates_fixed = False
        self._gate_snapshot: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # -- fixed-gate fine-tuning (Bayesian Bits) ---------------------------------------------------------
    def _bb_quantizers(self, model: nn.Module) -> list[Any]:
        from bitalloc.quantizers.bayesian_bits import BayesianBitsQuantizer

        return [q for _, _, q in _learned(model) if isinstance(q, BayesianBitsQuantizer)]

    def on_train_start(self, model: nn.Module, info: Mapping[str, Any]) -> None:
        """Learn the number of epochs (for ``--bb-fix-gates-epochs``); called by ``fit`` before the first epoch."""
        if self.method == "bb":
            k = fixed_gate_epochs(float(self.opts["fix_gates_epochs"]), int(info["epochs"]))
            self.fix_from = int(info["epochs"]) - k if k else None

    def set_gates_fixed(self, model: nn.Module, fixed: bool) -> None:
        """Switch fixed-gate fine-tuning on or off for every Bayesian Bits quantizer of ``model``."""
        qs = self._bb_quantizers(model)
        for q in qs:
            q.fix_gates(fixed)
        self.gates_fixed = bool(fixed)
        if fixed and self._gate_snapshot is None:  # the gate parameters stay exactly here from now on
            self._gate_snapshot = [(p, p.detach().clone()) for q in qs for n, p in q.quant_parameters().items()
                                   if n.startswith("log_alpha")]
        elif not fixed:
            self._gate_snapshot = None

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        if self.method == "bb":
            self.set_gates_fixed(model, self.fix_from is not None and epoch >= self.fix_from)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        if self.method == "bb":
            gates = [p for _, _, q in _learned(model) for n, p in q.quant_parameters().items() if n.startswith("log_alpha")]
            ranges = [p for _, _, q in _learned(model) for n, p in q.quant_parameters().items() if n == "clip_max"]
            groups = [{"name": "gates", "params": gates, "lr": float(self.opts["gate_lr"]), "weight_decay": 0.0,
                       "schedule": "constant"},
                      {"name": "ranges", "params": ranges, "weight_decay": 0.0, "schedule": "constant"}]
            if self.opts["range_lr"] is not None:  # default: the weights' lr
                groups[1]["lr"] = float(self.opts["range_lr"])
            return [g for g in groups if g["params"]]
        params = [p for _, _, q in _learned(model) for p in q.quant_parameters().values()]
        group: dict[str, Any] = {"name": "quant", "params": params, "weight_decay": 0.0}
        if self.opts["q_lr"] is not None:
            group["lr"] = float(self.opts["q_lr"])
        return [group] if params else []

    def regularizer(self, model: nn.Module) -> torch.Tensor:
        """Sum of the Bayesian Bits regularisers of every quantizer (0 for other methods)."""
        from bitalloc.quantizers.bayesian_bits import BayesianBitsQuantizer

        regs = [q.regularizer() for _, _, q in _learned(model) if isinstance(q, BayesianBitsQuantizer)]
        return torch.stack(regs).sum() if regs else torch.zeros(())

    def extra_loss(self, model: nn.Module) -> tuple[torch.Tensor | float, dict[str, float]]:
        if self.method == "bb":
            reg = self.regularizer(model)
            if self.gates_fixed:  # no regulariser; 0 * reg keeps a (zero) gradient path to every gate for DDP
                return 0.0 * reg, {"bb_reg": float(reg.detach())}
            return self.mu * reg, {"bb_reg": float(reg.detach())}
        if self.method == "pact":
            from bitalloc.quant.pact import pact_l2

            alphas = [q.alpha for _, _, q in _learned(model) if hasattr(q, "alpha")]
            pen = pact_l2(alphas, float(self.opts["pact_decay"]))
            return pen, {"pact_l2": float(pen.detach())}
        return 0.0, {}

    def on_step_end(self, model: nn.Module, step: int) -> None:
        for _, _, q in _learned(model):
            q.clamp_parameters()
        if self._gate_snapshot is not None:  # undo the optimizer's momentum on the (zero-gradient) fixed gates
            with torch.no_grad():
                for p, v in self._gate_snapshot:
                    p.copy_(v)

    def layer_state(self, model: nn.Module) -> dict[str, Any]:
        from bitalloc.quantizers.bayesian_bits import BayesianBitsQuantizer

        out: dict[str, Any] = {}
        for name, role, q in _learned(model):
            if isinstance(q, BayesianBitsQuantizer):
                d = q.state_summary()
            else:
                p = q.qparams()
                d = {"bits": float(p.bits.float().mean()), "scale": float(p.scale.float().mean()), "signed": p.signed}
            out.setdefault(name, {})["w" if role == "weight" else "a"] = d
        return out

    def log_state(self, model: nn.Module) -> dict[str, Any]:
        from bitalloc.cost import cost_report

        state: dict[str, Any] = {"layers": self.layer_state(model)}
        first = next(iter(model.parameters()), None)
        example = self.example.to(first.device) if first is not None else self.example
        was = model.training
        try:
            model.eval()
            state["relative_bops"] = cost_report(model, example).relative_bops
            if self.method == "bb":
                model.train()
                state["relative_bops_expected"] = cost_report(model, example).relative_bops
                state["regularizer"] = float(self.regularizer(model).detach())
                state["gates_fixed"] = self.gates_fixed
        finally:
            model.train(was)
        return state

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "options": dict(self.opts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


# ---- registration --------------------------------------------------------------------------------------

def _has(parser: argparse.ArgumentParser, flag: str) -> bool:
    return flag in parser._option_string_actions


def _shape(text: str) -> list[int]:
    try:
        return [int(v) for v in str(text).replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape {text!r}: give C,H,W such as 1,28,28") from None


def _add_common(p: argparse.ArgumentParser) -> None:
    if _has(p, "--w-bits"):
        return
    g = p.add_argument_group("quantization-aware training (lsq, pact, bb)")
    g.add_argument("--w-bits", type=int, default=4, help="lsq/pact: weight bits")
    g.add_argument("--a-bits", type=int, default=4, help="lsq/pact: activation bits")
    g.add_argument("--first-last-bits", type=int, default=8,
                   help="lsq/pact: bits of the first and last layers; bb: bits of the network input (0: off)")
    g.add_argument("--q-granularity", choices=["tensor", "channel"], default="tensor",
                   help="one weight step (lsq/pact) or learned weight range (bb) per tensor (the papers) or per "
                        "output channel (advisable with BatchNorm folded into the weights)")
    g.add_argument("--q-lr", type=float, default=None, help="lsq/pact: lr of step sizes / clip levels (default --lr)")
    g.add_argument("--input-shape", type=_shape, default=None, help="C,H,W of one input (default: the zoo model's)")
    g.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="fold BatchNorm into the preceding layer before training (required by bb with pruning); "
                        "--no-fold-bn (lsq/pact): train with BatchNorm, folded exactly at freeze time")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="lsq/pact: start from the per-layer widths of a QuantConfig JSON (e.g. the searched.json of "
                        "`bitalloc ptq --budget`) instead of --w-bits / --a-bits / --first-last-bits")
    g.add_argument("--qat-recipe", choices=list(RECIPE_NAMES), default="cpu",
                   help="epochs / batch size of the quantization-aware recipe: 'cpu' (CPU-feasible) or 'paper' "
                        "(the Bayesian Bits reference commands: MNIST 100 epochs, CIFAR-10 300); --epochs wins")


def _add_pact(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    if _has(p, "--pact-decay"):
        return
    p.add_argument("--pact-decay", type=float, default=2e-4, help="pact: L2 decay on the clip levels alpha")
    p.add_argument("--pact-init", default="max", help="pact: initial alpha: 'max' (from data) or a number")


def _add_bb(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    if _has(p, "--mu"):
        return
    g = p.add_argument_group("Bayesian Bits (bb)")
    g.add_argument("--mu", type=float, default=None, help="regulariser strength (default 0.1 MNIST, 0.01 otherwise)")
    g.add_argument("--gates", choices=["hard_concrete", "gumbel"], default="hard_concrete", help="gate distribution")
    g.add_argument("--gate-init", default=None,
                   help="initial log-alpha of z4,z8,z16,z32 (default 6,6,-6,-6 on MNIST, 6,6,6,6 otherwise)")
    g.add_argument("--prune", action=argparse.BooleanOptionalAction, default=True, help="learn z2 pruning gates")
    g.add_argument("--prune-init", type=float, default=6.0, help="initial log-alpha of the z2 gates")
    g.add_argument("--gate-lr", type=float, default=1e-3, help="Adam lr of the gates (constant)")
    g.add_argument("--range-lr", type=float, default=None,
                   help="Adam lr of the learned ranges (constant; default: the weights' --lr)")
    g.add_argument("--bb-threshold", type=float, default=None, help="test-time P(off) threshold (0.34 / 0.5)")
    g.add_argument("--bb-max-bits", type=int, default=32, choices=[2, 4, 8, 16, 32], help="largest bit width")
    g.add_argument("--mac-weighting", choices=["max", "total"], default="max",
                   help="regulariser weight r: MACs / largest layer (reference code) or / total")
    g.add_argument("--bb-fix-gates-epochs", type=float, default=0.0, metavar="N",
                   help="fixed-gate fine-tuning for the last N epochs (or fraction N < 1 of them): test-time gates, "
                        "no regulariser, gates frozen; weights and ranges keep learning")
    g.add_argument("--skip-below", type=float, default=-2.0,
                   help="training shortcut of the reference code: bit gates with log-alpha <= this are off "
                        "(nan: always sample, as in the paper's text)")


def _model_shape(args: argparse.Namespace) -> list[int] | None:
    if getattr(args, "input_shape", None):
        return list(args.input_shape)
    name = getattr(args, "model", None)
    if name in HOOK_INPUT_SHAPES:
        return list(HOOK_INPUT_SHAPES[name])
    try:
        from bitalloc.models import model_info

        return list(model_info(name).input_shape)
    except Exception:  # unknown model: prepare reports the missing shape
        return None


def _dataset(args: argparse.Namespace) -> str | None:
    name = getattr(args, "dataset", None)
    if name is None:
        try:
            from bitalloc.models import model_info

            name = model_info(getattr(args, "model", "")).default_dataset
        except Exception:
            return None
    try:
        from bitalloc.data import dataset_info

        return dataset_info(name).name
    except Exception:
        return name


def options_from_args(method: str, args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "w_bits": args.w_bits, "a_bits": args.a_bits,
        "first_last_bits": args.first_last_bits if args.first_last_bits else None,
        "granularity": args.q_granularity, "q_lr": args.q_lr, "input_shape": _model_shape(args),
        "dataset": _dataset(args), "seed": getattr(args, "seed", 0),
        "fold_bn": getattr(args, "fold_bn", True), "recipe": getattr(args, "qat_recipe", "cpu"),
    }
    if getattr(args, "config", None) and method in ("lsq", "pact"):
        opts["config"] = read_config_file(args.config).to_dict()
    if method == "pact":
        init = args.pact_init
        try:
            init = float(init)
        except (TypeError, ValueError):
            pass
        opts.update(pact_decay=args.pact_decay, pact_init=init)
    if method == "bb":
        skip = args.skip_below
        opts.update(mu=args.mu, gates=args.gates, gate_init=args.gate_init, prune=args.prune, prune_init=args.prune_init,
                    gate_lr=args.gate_lr, range_lr=args.range_lr, threshold=args.bb_threshold, max_bits=args.bb_max_bits,
                    mac_weighting=args.mac_weighting, skip_below=None if skip != skip else skip,
                    fix_gates_epochs=args.bb_fix_gates_epochs)
    return resolve_options(method, opts)


def _overrides(preset: Preset, options: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer / schedule recipe, plus the dataset's epochs and batch size (``options["recipe"]``)."""
    out = dict(RECIPE)
    out.update(qat_recipe(options.get("dataset"), options.get("recipe") or "cpu"))
    return out


def _make_method(name: str, description: str, add_arguments) -> Method:
    return Method(
        name=name, description=description,
        prepare=lambda model, opts, _m=name: prepare_qat(model, _m, opts),
        objective=lambda model, opts, _m=name: QATObjective(model, _m, opts),
        config_overrides=_overrides,
        add_arguments=add_arguments,
        options_from_args=lambda args, _m=name: options_from_args(_m, args),
    )


def register_all(replace: bool = True) -> None:
    """Register lsq, pact and bb (idempotent)."""
    register_method(_make_method("lsq", "LSQ: learned step size quantization (Esser et al. 2020)", _add_common),
                    replace=replace)
    register_method(_make_method("pact", "PACT: learned clipping (Choi et al. 2018)", _add_pact), replace=replace)
    register_method(_make_method("bb", "Bayesian Bits: learned mixed precision + pruning (van Baalen et al. 2020)",
                                 _add_bb), replace=replace)


register_all()

__all__ = ["QAT_METHODS", "METHOD_OPTIONS", "DEFAULTS", "RECIPE", "QAT_RECIPES", "QATObjective", "prepare_qat",
           "qat_config", "qat_config_from", "qat_recipe",
           "resolve_options", "fixed_gate_epochs", "mac_weights", "layer_order", "example_input", "register_all"]
