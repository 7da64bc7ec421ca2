"""Per-layer sensitivity: the damage of quantizing one layer alone at each candidate width, on calibration data.

For a model, a post-training :class:`~bitalloc.config.QuantConfig` and calibration data,
:func:`layer_sensitivity` quantizes each searched layer (:mod:`bitalloc.search.space`) alone, at each candidate
(weight bits, activation bits), with everything else in float, and measures on the calibration samples

* ``metric="kl"`` (default): the mean over samples of KL(p_float || p_quantized) of the output distributions
  (softmax of the last dimension): no labels needed, and what post-training quantization tries to preserve;
* ``metric="loss"``: the increase of the mean cross-entropy against the labels (may be negative);
* ``metric="mse"``: the mean squared output error (outputs that are not class scores).

The layer is quantized exactly as post-training quantization with that configuration would quantize it
(per-channel allocation around its width, clipping from the same activation statistics, with
``clip_check="network"`` the activation step chosen as calibration chooses it (the layer's input quantizer alone
in the float network, once per layer and activation width), bias correction, GPTQ rounding from the Hessian of
its own, float, inputs), so the damage is that of the real quantizer.

Cost: one float pass over the calibration samples observes every activation (the statistics
:func:`bitalloc.calibration` would collect) and keeps what is needed to restart the network at each layer
(:class:`~bitalloc.model.suffix.SuffixRunner`); each (layer, candidate) then reruns only the network from that
layer on. Activation grids come from the one set of statistics, weight grids and GPTQ Hessians are computed
once per layer and candidate (Hessians once per activation width), and at W32A32 (float) the layer is its own
float self, so its sensitivity is exactly 0.

``hessian=True`` adds the second-order estimate of HAWQ-v2 (Dong et al. 2020): per layer the Hutchinson
estimates (Avron & Toledo 2011) of the traces of the Hessian of the same objective with respect to the weight
and to the layer's input, tr(H) ~ mean over Rademacher v of v^T H v, and per candidate

    damage ~ 1/2 (tr(H_W) / n_W) ||Q(W) - W||^2 + 1/2 (tr(H_X) / n_X) ||Q(X) - X||^2

(HAWQ-v2's Omega = tr(H) / n * ||Q(W) - W||^2, here with the activations' term, and the 1/2 of the Taylor
expansion so that it predicts the measured metric). For ``kl`` the Hessian at the float model is the Fisher
information of the outputs (the KL's gradient there is 0), for ``loss`` that of the cross-entropy.

Every (layer, candidate) also gets the costs the cost report counts (:func:`bitalloc.cost_report`: BOPs and
memory with metadata), so that a search needs nothing else (:mod:`bitalloc.search.budget`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitalloc.batches import batch_inputs, batch_size, cut_inputs
from bitalloc.calibration.calibrate import calibration
from bitalloc.calibration.gptq import Moments, batches_moments, gptq_settings, hessian_folds, round_layer
from bitalloc.calibration.network_clip import MAX_SAMPLES, choose_step, wants_network_check
from bitalloc.config import QuantConfig
from bitalloc.cost import cost_report
from bitalloc.errors import ConfigError, DataError
from bitalloc.model.fold_bn import set_submodule
from bitalloc.model.layers import QuantLayer, activation_axis, float_mode, input_channels, quant_layers
from bitalloc.model.prepare import _type_names, prepare, prepare_info
from bitalloc.model.suffix import SuffixRunner
from bitalloc.ptq import replayable
from bitalloc.quantizers import make_quantizer
from bitalloc.search.space import Candidate, bits_patch, parse_candidates, searched_config, user_fixed

METRICS = ("kl", "loss", "mse")
COSTS = ("bops", "memory_bits")


@dataclass
class Sensitivity:
    """Result of :func:`layer_sensitivity`; ``values[i, j]``: damage of layer ``layers[i]`` alone at
    ``candidates[j]`` (``metric``), ``hessian[i, j]`` the second-order estimate (or None).

    ``costs[kind][i, j]`` (kind "bops" or "memory_bits"): the layer's cost at ``cost_candidates[j]`` (the
    candidates plus any reference widths); ``fixed[kind]``: the cost of everything not searched (other layers,
    other parameters), so a choice costs ``fixed + sum_i costs[i, j_i]``; ``total_macs``: the network's MACs.
    ``patches[i][j]``: the override giving layer i candidate ``cost_candidates[j]``. ``reference``: the float
    outputs of the calibration samples; ``deltas[i, j]`` the change of those outputs when layer i alone is at
    candidate j (for additivity checks; None unless kept)."""

    layers: list[str]
    types: list[str]
    candidates: list[Candidate]
    metric: str
    values: np.ndarray
    cost_candidates: list[Candidate]
    costs: dict[str, np.ndarray]
    fixed: dict[str, float]
    total_macs: float
    fp32_memory_bits: float
    patches: list[list[dict[str, Any]]]
    config: dict[str, Any]
    samples: int
    macs: list[float] = field(default_factory=list)
    params: list[int] = field(default_factory=list)
    excluded: list[dict[str, str]] = field(default_factory=list)
    hessian: np.ndarray | None = None
    traces: dict[str, dict[str, float]] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    engine: str = ""
    reference: Tensor | None = None
    labels: Tensor | None = None
    deltas: Tensor | None = None
    #: the per-layer onnxruntime measurement behind ``costs["latency_ms"]``
    #: (:func:`bitalloc.search.latency.add_latency`)
    latency: dict[str, Any] | None = None

    def cost_index(self, cand: Candidate) -> int:
        try:
            return self.cost_candidates.index(cand)
        except ValueError:
            raise ConfigError(f"width {cand.label} has no cost table in this sensitivity (have: "
                              f"{', '.join(c.label for c in self.cost_candidates)}); measure it with {cand.label} among "
                              "the candidates or reference widths (bitalloc sensitivity --candidates)") from None

    def column(self, cand: Candidate) -> int:
        return self.candidates.index(cand)

    def total_cost(self, kind: str, choice: dict[str, Candidate]) -> float:
        """What a choice (layer -> candidate, every searched layer) costs in all: BOPs, memory bits, or the
        predicted latency in ms (with the conversions at the borders of int8 runs,
        :func:`bitalloc.search.latency.chain_latency`)."""
        if kind == "latency_ms" and self.latency is not None:
            from bitalloc.search.latency import chain_latency

            return chain_latency(self, choice)
        return self.fixed[kind] + sum(float(self.costs[kind][i, self.cost_index(choice[n])])
                                      for i, n in enumerate(self.layers))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors)."""
        rows = []
        for i, name in enumerate(self.layers):
            row = {"name": name, "type": self.types[i], "macs": self.macs[i] if self.macs else None,
                   "params": self.params[i] if self.params else None,
                   "damage": {c.label: float(self.values[i, j]) for j, c in enumerate(self.candidates)},
                   "bops": {c.label: float(self.costs["bops"][i, j]) for j, c in enumerate(self.cost_candidates)},
                   "memory_bits": {c.label: float(self.costs["memory_bits"][i, j])
                                   for j, c in enumerate(self.cost_candidates)}}
            if "latency_ms" in self.costs:
                row["latency_ms"] = {c.label: float(self.costs["latency_ms"][i, j])
                                     for j, c in enumerate(self.cost_candidates)}
            if self.hessian is not None:
                row["hessian_estimate"] = {c.label: float(self.hessian[i, j]) for j, c in enumerate(self.candidates)}
            if self.traces is not None:
                row["hessian_trace"] = self.traces.get(name)
            rows.append(row)
        return {"metric": self.metric, "samples": self.samples, "candidates": [c.label for c in self.candidates],
                "engine": self.engine, "seconds": self.seconds, "total_macs": self.total_macs,
                "fp32_memory_bits": self.fp32_memory_bits, "fixed": self.fixed,
                "excluded": self.excluded, "layers": rows, "config": self.config,
                **({"latency": self.latency} if self.latency is not None else {})}

    def state(self) -> dict[str, Any]:
        """Everything, as plain tensors / lists (``torch.save``-able with weights_only; :meth:`from_state`)."""
        return {"format": "bitalloc-sensitivity-1", "layers": self.layers, "types": self.types,
                "candidates": [[c.w_bits, c.a_bits] for c in self.candidates], "metric": self.metric,
                "values": torch.from_numpy(self.values), "cost_candidates": [[c.w_bits, c.a_bits]
                                                                             for c in self.cost_candidates],
                "costs": {k: torch.from_numpy(v) for k, v in self.costs.items()}, "fixed": dict(self.fixed),
                "total_macs": self.total_macs, "fp32_memory_bits": self.fp32_memory_bits,
                "patches": self.patches, "config": self.config,
                "samples": self.samples, "macs": self.macs, "params": self.params, "excluded": self.excluded,
                "hessian": None if self.hessian is None else torch.from_numpy(self.hessian), "traces": self.traces,
                "seconds": self.seconds, "engine": self.engine, "reference": self.reference, "labels": self.labels,
                "deltas": self.deltas, "latency": self.latency}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "Sensitivity":
        if not isinstance(s, dict) or s.get("format") != "bitalloc-sensitivity-1":
            raise ConfigError("not a sensitivity file written by bitalloc (format bitalloc-sensitivity-1); compute "
                              "it with `bitalloc sensitivity`")
        return cls(layers=list(s["layers"]), types=list(s["types"]),
                   candidates=[Candidate(int(w), int(a)) for w, a in s["candidates"]], metric=s["metric"],
                   values=s["values"].numpy(), cost_candidates=[Candidate(int(w), int(a))
                                                                for w, a in s["cost_candidates"]],
                   costs={k: v.numpy() for k, v in s["costs"].items()}, fixed=dict(s["fixed"]),
                   total_macs=float(s["total_macs"]), fp32_memory_bits=float(s["fp32_memory_bits"]),
                   patches=s["patches"], config=s["config"],
                   samples=int(s["samples"]), macs=list(s["macs"]), params=list(s["params"]),
                   excluded=list(s["excluded"]), hessian=None if s["hessian"] is None else s["hessian"].numpy(),
                   traces=s["traces"], seconds=dict(s["seconds"]), engine=s["engine"], reference=s["reference"],
                   labels=s["labels"], deltas=s["deltas"], latency=s.get("latency"))


# ---- damage metrics ------------------------------------------------------------------------------------------

def damage(metric: str, out: Tensor, ref: Tensor, labels: Tensor | None) -> Tensor:
    """Per-sample damage of outputs ``out`` against the float outputs ``ref`` (module docstring), float64."""
    out, ref = out.to(torch.float64), ref.to(torch.float64)
    if metric == "mse":
        return (out - ref).pow(2).reshape(out.shape[0], -1).mean(1)
    if out.ndim != 2:
        raise ConfigError(f"metric {metric!r} needs class scores of shape (batch, classes), but the model returns "
                          f"shape {tuple(out.shape)}; use metric 'mse' (--metric mse)")
    if metric == "kl":
        lp, lq = F.log_softmax(ref, dim=1), F.log_softmax(out, dim=1)
        return (lp.exp() * (lp - lq)).sum(1)
    if labels is None:
        raise ConfigError("metric 'loss' needs labelled calibration data ((inputs, labels) batches); use metric 'kl'")
    y = labels.to(torch.int64)
    return F.cross_entropy(out, y, reduction="none") - F.cross_entropy(ref, y, reduction="none")


# ---- data -----------------------------------------------------------------------------------------------------

def calibration_batches(data: Iterable, num_samples: int) -> tuple[list[Any], list[Tensor | None]]:
    """(inputs, labels) of the first ``num_samples`` samples of ``data``, batch by batch (labels None when the
    batches carry none)."""
    inputs, labels, seen = [], [], 0
    for batch in data:
        if seen >= num_samples:
            break
        x = batch_inputs(batch)
        n = min(batch_size(x), num_samples - seen)
        x = cut_inputs(x, n)
        y = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], Tensor) else None
        inputs.append(x)
        labels.append(y[:n] if y is not None else None)
        seen += n
    if not inputs:
        raise DataError("the calibration set is empty: give at least one calibration sample")
    return inputs, labels


# ---- the layers searched -----------------------------------------------------------------------------------

@dataclass
class _Layer:
    name: str
    module: QuantLayer
    types: list[str]
    boundary: bool


def searchable_layers(qmodel: nn.Module, config: QuantConfig, layers: Iterable[str] | None = None
                      ) -> tuple[list[_Layer], list[dict[str, str]]]:
    """The layers to search in a prepared model and, for the others, why not (``{"name", "reason"}``)."""
    info = prepare_info(qmodel)
    records = {r.name: r for r in info.layers}
    wanted = None if layers is None else list(layers)
    found, excluded = [], []
    qlayers = dict(quant_layers(qmodel))
    for name in [n for n in info.order if n in records]:
        rec = records[name]
        types = _type_names(qlayers[name].layer) if name in qlayers else [rec.type]
        boundary = any(r.startswith(("first layer", "last layer")) for r in rec.rules)
        if wanted is not None and name not in wanted:
            continue
        reason = ""
        if name not in qlayers:
            reason = f"left in float ({rec.reason or 'by the configuration'})"
        elif user_fixed(config, name, types):
            reason = f"bit widths set by the override {user_fixed(config, name, types)!r}"
        elif boundary and config.first_last_bits is not None and wanted is None:
            reason = (f"first / last layer, kept at {config.first_last_bits} bits (first_last_bits; CLI "
                      "--first-last-bits none searches it too)")
        if reason:
            excluded.append({"name": name, "reason": reason})
            if wanted is not None:
                raise ConfigError(f"layer {name!r} cannot be searched: {reason}")
            continue
        kinds = {getattr(q, "kind", type(q).__name__) for q in qlayers[name].quantizers()}
        if kinds - {"fixed"}:
            raise ConfigError(f"sensitivity and search need post-training quantizers (quantizer 'fixed'), but layer "
                              f"{name!r} uses {', '.join(sorted(kinds - {'fixed'}))}; give a PTQ preset or configuration")
        found.append(_Layer(name, qlayers[name], types, boundary))
    if wanted is not None:
        unknown = sorted(set(wanted) - {l.name for l in found})
        if unknown:
            raise ConfigError(f"layers {unknown} are not quantized layers of this model; names: "
                              f"{', '.join(info.order[:8])}{', ...' if len(info.order) > 8 else ''}")
    if not found:
        raise ConfigError("no layer to search: every quantized layer is fixed (first / last layer, or bits set by "
                          "an override); pass --first-last-bits none, or drop the overrides that set bits")
    return found, excluded


# ---- candidate layers -----------------------------------------------------------------------------------------

class _Candidates:
    """Builds the quantized version of one layer at one candidate width, as PTQ would (module docstring).

    Weight grids (allocation, range search, bias correction) depend only on the weight width and are computed
    once per (layer, weight bits); activation grids come from the one set of statistics; GPTQ Hessians are
    computed once per (layer, activation bits)."""

    def __init__(self, config: QuantConfig, stats: dict[str, Any], inputs: dict[str, list[Tensor]],
                 network: Callable[[str, QuantLayer], Any] | None = None):
        self.config, self.stats, self.inputs = config, stats, inputs
        #: chooses an activation step with clip_check="network" (the quantizer alone in the float network)
        self.network = network
        self._steps: dict[tuple[str, int], Tensor] = {}
        self._hessians: dict[tuple[str, int], Moments] = {}
        self._weights: dict[tuple[str, int], Any] = {}
        self._built: dict[tuple[str, Candidate], nn.Module] = {}

    def patch(self, layer: _Layer, cand: Candidate) -> dict[str, Any]:
        base, _ = self.config.for_layer(layer.name, layer.types, is_first=layer.boundary)
        return bits_patch(base, cand, layer.name)

    def build(self, layer: _Layer, cand: Candidate, *, gptq: bool = True) -> nn.Module:
        """The layer at ``cand`` (``gptq=False``: skip GPTQ rounding, for costs, which it does not change)."""
        key = (layer.name, cand)
        if key not in self._built:
            self._built[key] = self._grids(layer, cand)
        q = self._built[key]
        wq = getattr(q, "weight_quantizer", None)
        if not gptq or wq is None or wq.cfg.rounding != "gptq":
            return q
        hkey = (layer.name, cand.a_bits)
        if hkey not in self._hessians:
            self._hessians[hkey] = batches_moments(q.layer, self.inputs[layer.name], q.input_quantizer,
                                                   folds=hessian_folds(q), asymmetric=gptq_settings(q).asymmetric)
        rounded = QuantLayer(copy.deepcopy(q.layer), copy.deepcopy(wq), q.input_quantizer, name=layer.name,
                             bias_correction=q.bias_correction)
        round_layer(rounded, self._hessians[hkey])
        return rounded

    def _grids(self, layer: _Layer, cand: Candidate) -> nn.Module:
        float_layer = layer.module.layer
        patch = self.patch(layer, cand)
        if patch.get("quantize") is False:
            return float_layer
        cfg = searched_config(self.config, {layer.name: patch})
        lcfg, _ = cfg.for_layer(layer.name, layer.types, is_first=layer.boundary)
        for t in (lcfg.weight, lcfg.act):
            if t is not None and t.quantizer != "fixed":
                raise ConfigError(f"sensitivity and search need post-training quantizers (quantizer 'fixed'), but "
                                  f"layer {layer.name!r} uses {t.quantizer!r}; give a PTQ preset or configuration")
        wkey = (layer.name, cand.w_bits)
        wq = None
        if lcfg.weight is not None:
            if wkey not in self._weights:
                fresh = make_quantizer(lcfg.weight, "weight", 0, float_layer.weight.shape[0],
                                       tuple(float_layer.weight.shape))
                QuantLayer(float_layer, fresh, None, name=layer.name, bias_correction=lcfg.bias_correction
                           ).calibrate_weight()
                self._weights[wkey] = fresh
            wq = copy.deepcopy(self._weights[wkey])
        aq = (make_quantizer(lcfg.act, "act", activation_axis(float_layer), input_channels(float_layer))
              if lcfg.act else None)
        q = QuantLayer(float_layer, wq, aq, name=layer.name,
                       bias_correction=lcfg.bias_correction if wq is not None else "none")
        if aq is not None and not aq.online:
            if layer.name not in self.stats:
                raise ConfigError(f"layer {layer.name!r}: no calibration statistics of its input; the configuration "
                                  "must quantize its input activation (or use candidates with f activations)")
            aq.set_from_stats(self.stats[layer.name])
            if wants_network_check(aq) and self.network is not None:  # as calibrate() chooses it for this layer
                skey = (layer.name, cand.a_bits)
                if skey not in self._steps:
                    self.network(layer.name, QuantLayer(float_layer, None, aq, name=layer.name))
                    self._steps[skey] = aq.scale.detach().clone()
                aq.scale.copy_(self._steps[skey])
        return q

    def forget(self, name: str) -> None:
        """Drop what was kept for layer ``name`` (its inputs, Hessians and grids)."""
        self._hessians = {k: v for k, v in self._hessians.items() if k[0] != name}
        self._weights = {k: v for k, v in self._weights.items() if k[0] != name}
        self._built = {k: v for k, v in self._built.items() if k[0] != name}
        self._steps = {k: v for k, v in self._steps.items() if k[0] != name}
        self.inputs.pop(name, None)


@torch.no_grad()
def _perturbation(module: nn.Module, float_layer: nn.Module, inputs: list[Tensor]) -> tuple[float, float]:
    """(||Q(W) - W||^2, sum over the inputs of ||Q(X) - X||^2) of one layer at one candidate."""
    if not isinstance(module, QuantLayer):
        return 0.0, 0.0
    w = float_layer.weight.to(torch.float64)
    dw2 = float((module.quantized_weight().to(torch.float64) - w).pow(2).sum())
    aq = module.input_quantizer
    dx2 = 0.0 if aq is None else sum(float((aq(x).to(torch.float64) - x.to(torch.float64)).pow(2).sum())
                                     for x in inputs)
    return dw2, dx2


def _capture_inputs(qmodel: nn.Module, names: list[str]) -> tuple[dict[str, list[Tensor]], list[Any]]:
    store: dict[str, list[Tensor]] = {n: [] for n in names}
    handles = []
    for n in names:
        def hook(mod: nn.Module, args: tuple, _n: str = n) -> None:
            store[_n].append(args[0])
        handles.append(qmodel.get_submodule(n).register_forward_pre_hook(hook))
    return store, handles


def _layer_costs(qmodel: nn.Module, example: Any, layers: list[_Layer], modules: list[nn.Module]) -> dict[str, Any]:
    """Per-layer BOPs / memory with ``modules[i]`` in place of ``layers[i]``, and the totals."""
    originals = [qmodel.get_submodule(l.name) for l in layers]
    for l, m in zip(layers, modules):
        set_submodule(qmodel, l.name, m)
    try:
        rep = cost_report(qmodel, example)
    finally:
        for l, m in zip(layers, originals):
            set_submodule(qmodel, l.name, m)
    by_name = {lc.name: lc for lc in rep.layers}
    return {"bops": [by_name[l.name].bops for l in layers], "memory_bits": [by_name[l.name].memory_bits for l in layers],
            "macs": [by_name[l.name].macs for l in layers], "params": [by_name[l.name].params for l in layers],
            "total": {"bops": rep.bops, "memory_bits": rep.memory_bits}, "total_macs": rep.macs,
            "fp32_memory_bits": rep.fp32_memory_bits}


# ---- the pass ---------------------------------------------------------------------------------------------------

@dataclass
class _Pass:
    """What one float pass over the calibration samples gives: the prepared model, the layers, their inputs and
    activation statistics (in ``builder``), the float outputs, and the runner that reruns from a layer."""

    qmodel: nn.Module
    found: list[_Layer]
    excluded: list[dict[str, str]]
    runner: SuffixRunner
    builder: _Candidates
    inputs: list[Any]
    labels: list[Tensor | None]
    refs: list[Tensor]


def _float_pass(model: nn.Module, config: QuantConfig, data: Iterable, layers: Iterable[str] | None, n: int,
                use_fx: bool) -> _Pass:
    data = replayable(data, n)
    inputs, labels = calibration_batches(data, n)
    if config.act_outliers == "refuse":  # what quantize would refuse at the end, refused before the search's work
        from bitalloc.ptq import check_config

        check_config(model, config, inputs, num_samples=n)
    qmodel = prepare(model.eval(), config, cut_inputs(inputs[0], 2))
    found, excluded = searchable_layers(qmodel, config, layers)
    names = [l.name for l in found]
    runner = SuffixRunner(qmodel, names, inputs, use_fx=use_fx)
    with float_mode(qmodel):
        runner.check(cut_inputs(inputs[0], 2))
    stats: dict[str, Any] = {}
    captured, handles = _capture_inputs(qmodel, names)
    try:
        with calibration(qmodel, seed=config.seed, stats_out=stats):
            refs = runner.base()
    finally:
        for h in handles:
            h.remove()
    qlayers = dict(quant_layers(qmodel))
    found = [l for l in found if l.name in qlayers]  # calibration leaves layers that did not run in float
    builder = _Candidates(config, stats, captured, _network_check(qmodel, runner, refs))
    return _Pass(qmodel, found, excluded, runner, builder, inputs, labels, refs)


def _network_check(qmodel: nn.Module, runner: SuffixRunner, refs: list[Tensor]) -> Callable[[str, QuantLayer], Any]:
    """``clip_check="network"`` in the sensitivity pass: the step chosen with the layer's input quantizer alone in
    the float network, on the first MAX_SAMPLES calibration samples, as :func:`bitalloc.calibration.calibrate`
    chooses it (:mod:`bitalloc.calibration.network_clip`)."""
    sizes, seen = [], 0
    for r in refs:
        sizes.append(max(0, min(int(r.shape[0]), MAX_SAMPLES - seen)))
        seen += sizes[-1]
    used = [(b, k) for b, k in enumerate(sizes) if k > 0]

    def check(name: str, module: QuantLayer) -> Any:
        with float_mode(qmodel):
            return choose_step(module.input_quantizer, lambda: [runner.variant(name, module, b)[:k] for b, k in used],
                               [refs[b][:k] for b, k in used])
    return check


def _hessian(p: _Pass, names: list[str], perturbation: np.ndarray, metric: str, samples: int, seed: int
             ) -> tuple[dict[str, dict[str, float]], np.ndarray]:
    from bitalloc.search.hessian import hutchinson_traces, second_order

    traces = hutchinson_traces(p.qmodel, names, p.inputs, p.labels, p.refs, metric, samples=samples, seed=seed)
    est = np.array([[second_order(traces[n], perturbation[0, i, j], perturbation[1, i, j])
                     for j in range(perturbation.shape[2])] for i, n in enumerate(names)])
    return traces, est


def _check_args(metric: str, config: QuantConfig, num_samples: int | None) -> int:
    if metric not in METRICS:
        raise ConfigError(f"metric {metric!r}: choose one of {METRICS}")
    config.validate()
    n = config.calibration_samples if num_samples is None else int(num_samples)
    if n < 1:
        raise ConfigError(f"num_samples={num_samples}: give at least 1 calibration sample")
    return n


def layer_sensitivity(model: nn.Module, config: QuantConfig, data: Iterable, bits: Iterable[Any] | str | None = None,
                      *, metric: str = "kl", layers: Iterable[str] | None = None, num_samples: int | None = None,
                      hessian: bool = False, hutchinson_samples: int = 16, reference_bits: Iterable[Any] = (),
                      keep_deltas: bool = True, use_fx: bool = True,
                      progress: Callable[[int, int], None] | None = None) -> Sensitivity:
    """Damage of quantizing each searched layer alone at each candidate of ``bits`` (module docstring).

    Args:
        model: the float model; ``config``: the post-training configuration the layers are quantized with
            (bits of searched layers replaced by each candidate); ``data``: calibration batches ((inputs,
            labels, ...) or inputs); the first ``num_samples`` (default ``config.calibration_samples``) are used.
        bits: candidates, ``"8x8,4x8,..."`` or pairs (default :data:`~bitalloc.search.space.DEFAULT_CANDIDATES`;
            32 = float). ``reference_bits``: more widths whose costs (not damages) are tabled, e.g. for budgets
            stated as a uniform width.
        layers: layer names to measure (default: every searchable layer, :func:`searchable_layers`).
        hessian: also the Hutchinson estimate (``hutchinson_samples`` Rademacher vectors); see also
            :func:`add_hessian`, which adds it to a sensitivity measured earlier.
        keep_deltas: keep every (layer, candidate) change of the calibration outputs (for additivity checks).
        use_fx: restart the network at each layer (``torch.fx``); False runs whole models (same numbers).
        progress: ``progress(1, total)`` after each of the ``total`` (layer, candidate) pairs measured.
    """
    n = _check_args(metric, config, num_samples)
    cands = parse_candidates(bits)
    reference_bits = list(reference_bits)
    cost_cands = cands + ([c for c in parse_candidates(reference_bits) if c not in cands] if reference_bits else [])
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    p = _float_pass(model, config, data, layers, n, use_fx)
    found, builder, runner, ref_batches, labels = p.found, p.builder, p.runner, p.refs, p.labels
    label_all = torch.cat(labels) if all(y is not None for y in labels) else None
    if metric == "loss" and label_all is None:
        raise ConfigError("metric 'loss' needs labelled calibration data ((inputs, labels) batches); use metric 'kl'")
    seconds["float_pass"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    example = cut_inputs(p.inputs[0], 1)
    base = _layer_costs(p.qmodel, example, found, [l.module for l in found])
    costs = {k: np.zeros((len(found), len(cost_cands))) for k in COSTS}
    patches: list[list[dict[str, Any]]] = [[builder.patch(l, c) for c in cost_cands] for l in found]
    for j, cand in enumerate(cost_cands):
        table = _layer_costs(p.qmodel, example, found, [builder.build(l, cand, gptq=False) for l in found])
        for k in COSTS:
            costs[k][:, j] = table[k]
    fixed = {k: float(base["total"][k]) - float(sum(base[k])) for k in COSTS}
    seconds["costs"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    reference = torch.cat(ref_batches)
    values = np.zeros((len(found), len(cands)))
    deltas = (torch.zeros(len(found), len(cands), *reference.shape, dtype=torch.float32)
              if keep_deltas else None)
    sizes = [int(r.shape[0]) for r in ref_batches]
    perturbation = np.zeros((2, len(found), len(cands)))  # ||Q(W) - W||^2, ||Q(X) - X||^2 (hessian=True)
    with float_mode(p.qmodel):
        for i, layer in enumerate(found):
            for j, cand in enumerate(cands):
                module = builder.build(layer, cand)
                if hessian:
                    perturbation[:, i, j] = _perturbation(module, layer.module.layer, builder.inputs[layer.name])
                total, start = 0.0, 0
                for b, ref in enumerate(ref_batches):
                    out = runner.variant(layer.name, module, b)
                    total += float(damage(metric, out, ref, labels[b]).sum())
                    if deltas is not None:
                        deltas[i, j, start:start + sizes[b]] = (out - ref).float()
                    start += sizes[b]
                values[i, j] = total / reference.shape[0]
                if progress is not None:
                    progress(1, len(found) * len(cands))
            builder.forget(layer.name)
    seconds["measure"] = time.perf_counter() - t2
    runner.release()
    result = Sensitivity(layers=[l.name for l in found], types=[type(l.module.layer).__name__ for l in found],
                         candidates=cands, metric=metric, values=values, cost_candidates=cost_cands, costs=costs,
                         fixed=fixed, total_macs=float(base["total_macs"]),
                         fp32_memory_bits=float(base["fp32_memory_bits"]), patches=patches,
                         config=config.to_dict(), samples=int(reference.shape[0]), macs=[float(m) for m in base["macs"]],
                         params=[int(p) for p in base["params"]], excluded=p.excluded, engine=runner.engine,
                         reference=reference.float(), labels=label_all, deltas=deltas)
    seconds["total"] = time.perf_counter() - t0  # the measured sensitivity; the Hessian estimate is extra
    if hessian:
        t3 = time.perf_counter()
        result.traces, result.hessian = _hessian(p, result.layers, perturbation, metric, hutchinson_samples,
                                                 config.seed)
        seconds["hessian"] = time.perf_counter() - t3
    result.seconds = seconds
    return result


def add_hessian(model: nn.Module, sens: Sensitivity, data: Iterable, *, hutchinson_samples: int = 16,
                progress: Callable[[int, int], None] | None = None) -> Sensitivity:
    """``sens`` with the Hutchinson estimate added (``hessian``, ``traces``; ``seconds["hessian"]``): the same as
    ``layer_sensitivity(..., hessian=True)`` would have given, from a new float pass over the same calibration
    samples (``data`` and ``model`` must be those ``sens`` was measured on; nothing is rerun per candidate)."""
    import dataclasses

    config = QuantConfig.from_dict(sens.config)
    _check_args(sens.metric, config, sens.samples)
    t0 = time.perf_counter()
    p = _float_pass(model, config, data, sens.layers, sens.samples, use_fx=False)
    if [l.name for l in p.found] != sens.layers:
        raise ConfigError("the model and configuration do not give the layers this sensitivity was measured on; "
                          "pass the same model, configuration and data")
    perturbation = np.zeros((2, len(p.found), len(sens.candidates)))
    for i, layer in enumerate(p.found):
        for j, cand in enumerate(sens.candidates):
            perturbation[:, i, j] = _perturbation(p.builder.build(layer, cand), layer.module.layer,
                                                  p.builder.inputs[layer.name])
            if progress is not None:
                progress(1, len(p.found) * len(sens.candidates))
        p.builder.forget(layer.name)
    traces, est = _hessian(p, sens.layers, perturbation, sens.metric, hutchinson_samples, config.seed)
    return dataclasses.replace(sens, hessian=est, traces=traces,
                               seconds={**sens.seconds, "hessian": time.perf_counter() - t0})


__all__ = ["METRICS", "Sensitivity", "add_hessian", "layer_sensitivity", "searchable_layers", "damage",
           "calibration_batches"]
