"""Quantization configuration: how each tensor of each layer is quantized.

A :class:`QuantConfig` holds one default :class:`LayerConfig` (a weight and an input-activation
:class:`TensorConfig`) plus ordered overrides keyed by module-name patterns. Patterns are shell globs on the
module's qualified name (``features.*``, ``*_fc``), or regular expressions with a ``re:`` prefix, or a layer
type with a ``type:`` prefix (``type:Linear``); later overrides win. The first and last layers get
``first_last_bits`` (default 8) unless that is None; they are found by dataflow in ``prepare``
(:meth:`bitalloc.model.trace.Trace.boundary_layers`): the first read the model's inputs with no quantizable
layer before them (all of a transformer's first query / key / value projections), the last have no quantizable
layer after them (the layer that produces the output, not an unused pooler).

Everything is plain data: ``to_dict`` / ``from_dict`` round-trip through JSON, so a configuration can be
saved next to a quantized model and reproduced exactly.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from bitalloc.errors import ConfigError, check_bits

GRANULARITIES = ("tensor", "channel", "token", "group")
BIAS_CORRECTIONS = ("none", "mean", "mean+norm")
CLIP_CHECKS = ("none", "output", "network")


@dataclass
class TensorConfig:
    """How one tensor (a layer's weight, or its input activation) is quantized.

    bits: bit width, 2..32 (1 for asymmetric grids). A fractional value (e.g. 3.5) is an *average* budget
        and requires ``allocate=True`` (per-channel bit allocation, ACIQ eq. 10-11).
    granularity: "tensor" (one range), "token" (activations, online only: one range per position, i.e. per
        token of a Linear layer's (..., C) input, computed on every input: per-token dynamic scales, as
        LLM.int8() and ZeroQuant quantize transformer activations), "channel" (one range per channel: output
        channels of a weight, channels of an activation) or "group" (2-d weights, i.e. Linear layers: one range
        per block of ``group_size`` consecutive input features of each output channel, the group-wise grids of
        GPTQ's 4-bit results (Frantar et al. 2023, section 5) and ONNX's blocked quantization; one bit width per
        output channel; scales and zero points count as metadata in the cost report).
    method: how the range is found: a name in :data:`bitalloc.quant.ranges.RANGE_ESTIMATORS` ("minmax",
        "aciq", "kld", "ksigma", "percentile", "mse"), for PTQ quantizers.
    options: extra arguments of the range method (e.g. ``{"prior": "auto"}`` for aciq, ``{"k": 2}`` for
        ksigma, ``{"percentile": 99.99}``).
    symmetric: signed grid with zero point 0 (weights) or affine grid with a zero point (activations).
    one_sided: "auto" (rows whose calibration minimum is >= 0, e.g. after a ReLU, are one-sided), or
        True / False to force it.
    online: recompute the statistics and the range on every input at run time (per sample) instead of
        fixing them from calibration data.
        Statistics are taken over the values of one sample (per channel: of one channel of one sample), so an
        input with fewer than 2 such values, e.g. the (N, C) input of a Linear layer quantized per channel, is
        rejected by ``prepare`` with a ConfigError (its range [x, x] would represent x exactly: no quantization).
    allocate: per-channel bit allocation under the average budget ``bits`` (needs granularity "channel").
    allocation: "aciq" (default: ACIQ eq. 10-11, bins proportional to a_i^(2/3), rounded to meet the budget) or
        "optimal" (the exact integer optimum of the eq. 10 error model; more accurate on that model, less
        accurate on the network: BENCHMARKS.md).
    min_bits, max_bits: bounds of allocated per-channel bit widths (``min_bits <= bits <= max_bits``; at least
        2 for symmetric grids). The presets widen the defaults 2..8 to cover the budget (see :func:`preset`).
    quantizer: the quantizer class name in :data:`bitalloc.quantizers.QUANTIZERS` ("fixed" for PTQ; "lsq",
        "pact", "bb" for training).
    rounding: "nearest" (round to nearest) or "gptq" (weights only: error-compensating rounding on the same
        grid, Frantar et al. 2023, using the calibration data; see :mod:`bitalloc.calibration.gptq`).
    clip_check: "none", "output" or "network" (activations calibrated offline): "output" compares the range of
        ``method`` with min-max by the error each causes at the layer's output on the calibration data, and uses
        the better (:mod:`bitalloc.calibration.clip_check`; the ACIQ presets set it); "network" scales the
        calibrated step by the multiplier that least changes the network's outputs with this quantizer alone
        enabled (:mod:`bitalloc.calibration.network_clip`; :func:`bitalloc.calibration.calibrate` runs it).
    group_size: input features per range with granularity "group" (at least 2; it must divide the layer's
        input features); ignored otherwise.
    gptq_damp, gptq_act_order: with rounding "gptq": the damping lambda of H + lambda mean(diag H) I (a number
        > 0; GPTQ's 0.01 by default) or "cv" (chosen per layer by cross-validation on the calibration samples),
        and whether the columns are rounded in decreasing order of diag(H) (act-order); see
        :mod:`bitalloc.quant.gptq`.
    gptq_asymmetric: with rounding "gptq": fit each layer to the float network's output on its float inputs
        (asymmetric calibration, GPTAQ) instead of to its own float weights on the quantized inputs; see
        :mod:`bitalloc.quant.gptq`.
    """

    bits: float = 8
    granularity: str = "tensor"
    method: str = "minmax"
    options: dict[str, Any] = field(default_factory=dict)
    symmetric: bool = False
    one_sided: Any = "auto"
    online: bool = False
    allocate: bool = False
    allocation: str = "aciq"
    min_bits: int = 2
    max_bits: int = 8
    quantizer: str = "fixed"
    rounding: str = "nearest"
    clip_check: str = "none"
    group_size: int = 128
    gptq_damp: Any = 0.01
    gptq_act_order: bool = False
    gptq_asymmetric: bool = False

    def validate(self, where: str = "") -> "TensorConfig":
        loc = f" ({where})" if where else ""
        _check_types(self, {"method": str, "options": dict, "symmetric": bool, "online": bool, "allocate": bool,
                            "quantizer": str, "granularity": str, "allocation": str, "rounding": str}, loc)
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity={self.granularity!r}{loc} is not one of {GRANULARITIES}")
        if self.granularity == "token" and not self.online:
            raise ConfigError(f"granularity='token'{loc} computes a range per token on every input: it needs "
                              "online=True (CLI --online)")
        if self.granularity == "group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
                raise ConfigError(f"group_size={self.group_size!r}{loc} must be an integer >= 2 (input features per "
                                  "range), e.g. 128")
            if self.online or self.quantizer not in ("fixed", "frozen"):
                raise ConfigError(f"granularity='group'{loc} is for post-training weight grids (quantizer 'fixed', "
                                  "offline); use granularity 'channel' for online or trained quantizers")
        lowest = 2 if self.symmetric else 1  # a symmetric grid needs 2 bits (codes -1, 0, 1 at least)
        if self.allocate:
            if self.granularity != "channel":
                raise ConfigError(f"bit allocation{loc} needs granularity='channel' (one bit width per channel)")
            # the budget first: its own range is what the user set (the bounds are derived from it)
            check_bits(self.bits, name=f"bits{loc}", lo=lowest, hi=32, integer=False)
            check_bits(self.min_bits, name=f"min_bits{loc}", lo=lowest, hi=32)
            check_bits(self.max_bits, name=f"max_bits{loc}", lo=1, hi=32)
            if self.min_bits > self.max_bits:
                raise ConfigError(f"min_bits={self.min_bits} > max_bits={self.max_bits}{loc}; "
                                  "give min_bits <= max_bits")
            avg = float(self.bits)
            if not self.min_bits <= avg <= self.max_bits:
                raise ConfigError(f"average bits={self.bits}{loc} must lie in [min_bits, max_bits] = "
                                  f"[{self.min_bits}, {self.max_bits}]; widen the bounds (min_bits / max_bits, "
                                  "CLI --min-bits / --max-bits) or change the budget")
        else:
            check_bits(self.bits, name=f"bits{loc}", lo=lowest, hi=32)
        if self.one_sided not in ("auto", True, False):
            raise ConfigError(f"one_sided={self.one_sided!r}{loc} must be 'auto', True or False")
        if self.clip_check not in CLIP_CHECKS:
            raise ConfigError(f"clip_check={self.clip_check!r}{loc} must be one of {', '.join(CLIP_CHECKS)}")
        if self.clip_check == "network" and self.online:
            raise ConfigError(f"clip_check='network'{loc} (CLI --clip-check network) chooses a calibrated step, but "
                              "the ranges are online (computed on every input): drop one of them")
        if self.rounding not in ("nearest", "gptq"):
            raise ConfigError(f"rounding={self.rounding!r}{loc} must be 'nearest' or 'gptq'")
        check_gptq_damp(self.gptq_damp, f"gptq_damp{loc}")
        for key in ("gptq_act_order", "gptq_asymmetric"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key}={getattr(self, key)!r}{loc} must be true or false")
        if self.allocation not in ("optimal", "aciq"):
            raise ConfigError(f"allocation={self.allocation!r}{loc} must be 'optimal' or 'aciq'")
        return self

    @property
    def int_bits(self) -> int:
        """Bits as an integer (for non-allocated tensors); allocated tensors start from this before allocation."""
        return int(round(float(self.bits)))


@dataclass
class LayerConfig:
    """Quantization of one layer: its weight, its input activation (None = left in float) and bias correction.

    ``bias_correction`` (ACIQ eq. 12-13, weights only): "none" (the default of this field); "mean" (shift each
    output channel so its mean equals the float mean: the reference code's default, and what the ``aciq``
    preset sets); or "mean+norm" (also restore each channel's centred L2 norm).
    ``quantize=False`` leaves the layer in float (it is still listed in reports, with the reason).
    ``smooth``: SmoothQuant migration strength alpha in [0, 1] (Xiao et al. 2023), or None (off): per input
    channel j, s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha) from the calibration data; the layer computes
    (W diag(s)) Q(x / s), the same function in float, with the channels' outliers moved into the weights
    (:mod:`bitalloc.calibration.smooth`). As in the paper, it applies to the layers that read a normalization
    layer's output (a transformer's q / k / v and first feed-forward Linear), not to the others.
    """

    weight: TensorConfig | None = field(default_factory=lambda: TensorConfig(granularity="channel", symmetric=True))
    act: TensorConfig | None = field(default_factory=TensorConfig)
    bias_correction: str = "none"
    quantize: bool = True
    smooth: float | None = None

    def validate(self, where: str = "") -> "LayerConfig":
        _check_types(self, {"bias_correction": str, "quantize": bool}, f" ({where})" if where else "")
        if self.smooth is not None and (isinstance(self.smooth, bool) or not isinstance(self.smooth, (int, float))
                                        or not 0.0 <= float(self.smooth) <= 1.0):
            raise ConfigError(f"smooth={self.smooth!r}{f' ({where})' if where else ''} must be a migration strength "
                              "alpha in [0, 1] (SmoothQuant; 0.5 is the usual value) or null (off)")
        for key in ("weight", "act"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, TensorConfig):
                raise ConfigError(f"{key}{f' ({where})' if where else ''} must be a dict of tensor settings or null, "
                                  f"got {value!r}")
        if self.bias_correction not in BIAS_CORRECTIONS:
            raise ConfigError(f"bias_correction={self.bias_correction!r} ({where}) is not one of {BIAS_CORRECTIONS}")
        if self.weight is not None:
            self.weight.validate(f"{where} weight".strip())
        if self.act is not None:
            self.act.validate(f"{where} input activation".strip())
        return self


@dataclass
class QuantConfig:
    """A whole model's quantization: defaults, per-layer overrides, first/last layer bits, BN folding.

    ``act_outliers``: "refuse" (default) makes :func:`bitalloc.quantize` refuse static per-tensor activation grids
    on token sequences whose input channels have outliers too large for them (one line naming the layer and the
    fix; :mod:`bitalloc.calibration.outliers`); "allow" quantizes anyway (CLI ``--allow-act-outliers``).
    ``product_bits``: bits of both operands of every activation x activation product (attention's q k^T and
    weights x v), quantized per sample on every input (:mod:`bitalloc.model.products`; CLI ``--product-bits``);
    None (default): those products stay in float."""

    default: LayerConfig = field(default_factory=LayerConfig)
    overrides: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    first_last_bits: int | None = 8
    fold_bn: bool = True
    calibration_samples: int = 32
    seed: int = 0
    act_outliers: str = "refuse"
    product_bits: int | None = None

    # ---- resolution -------------------------------------------------------------------------------
    def for_layer(self, name: str, type_names: str | list[str], *, is_first: bool = False,
                  is_last: bool = False) -> tuple[LayerConfig, list[str]]:
        """The resolved configuration of one layer and the list of rules that shaped it (for reports).

        ``type_names``: the layer's class name, or the names of all classes in its MRO (so that
        ``type:Conv2d`` also selects subclasses of Conv2d)."""
        cfg = copy.deepcopy(self.default)
        applied: list[str] = []
        if self.first_last_bits is not None and (is_first or is_last):
            fb = int(self.first_last_bits)
            for t in (cfg.weight, cfg.act):
                if t is not None:
                    t.bits, t.allocate = fb, False
            applied.append(f"{'first' if is_first else 'last'} layer at {fb} bits")
        for pattern, patch in self.overrides:
            if match_pattern(pattern, name, type_names):
                cfg = apply_patch(cfg, patch)
                applied.append(f"override {pattern!r}")
        return cfg.validate(name), applied

    def validate(self) -> "QuantConfig":
        _check_types(self, {"fold_bn": bool, "calibration_samples": int, "seed": int, "default": LayerConfig,
                            "overrides": list}, "")
        self.default.validate("default")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, name="first_last_bits", lo=2, hi=32)
        if self.calibration_samples < 1:
            raise ConfigError(f"calibration_samples={self.calibration_samples} must be at least 1")
        if self.act_outliers not in ("refuse", "allow"):
            raise ConfigError(f"act_outliers={self.act_outliers!r} is not 'refuse' or 'allow'")
        if self.product_bits is not None:
            check_bits(self.product_bits, name="product_bits", lo=2, hi=16)
        for item in self.overrides:
            if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str):
                raise ConfigError(f"override {item!r} must be a pair [PATTERN, {{settings}}], e.g. "
                                  '["features.0", {"weight.bits": 8}]')
            pattern, patch = item
            if not isinstance(patch, dict):
                raise ConfigError(f"override for {pattern!r} must be a dict of settings, got {type(patch).__name__}")
            apply_patch(copy.deepcopy(self.default), patch).validate(f"override {pattern!r}")
        return self

    # ---- (de)serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overrides"] = [[p, v] for p, v in self.overrides]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        """The configuration of a ``to_dict`` dict (e.g. read from JSON); anything malformed is a ConfigError."""
        _check_dict(d, "a quantization configuration")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown configuration keys {sorted(unknown)}; valid: {[f.name for f in fields(cls)]}")
        d = dict(d)
        if "default" in d:
            d["default"] = layer_config_from_dict(d["default"])
        if "overrides" in d:
            if not isinstance(d["overrides"], list):
                raise ConfigError(f"overrides must be a list of [PATTERN, {{settings}}] pairs, got {d['overrides']!r}")
            cfg = cls(**{**d, "overrides": list(d["overrides"])})
            cfg.validate()  # checks each pair before it is unpacked
            cfg.overrides = [(p, dict(v)) for p, v in cfg.overrides]
            return cfg.validate()
        return cls(**d).validate()


def read_config_file(path: Any) -> QuantConfig:
    """The QuantConfig of a JSON file (``--config``: e.g. one ``bitalloc ptq --budget`` wrote as searched.json); a
    missing, non-JSON or malformed file is a one-line ConfigError naming it."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {p}: no such file")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {p} is not valid JSON: {exc}") from None
    try:
        return QuantConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"--config {p}: {exc}") from None


def _check_dict(d: Any, what: str) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be a JSON object (a dict of settings), got {d!r}")


_TYPE_WORDS = {str: "a string", dict: "a dict", bool: "true or false", int: "an integer", list: "a list"}


def _check_types(obj: Any, types: dict[str, type], loc: str) -> None:
    """ConfigError unless each named field of ``obj`` has its type (a bool is not accepted as a number)."""
    for name, want in types.items():
        value = getattr(obj, name)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(f"{name}={value!r}{loc} must be {_TYPE_WORDS.get(want, want.__name__)}")


def tensor_config_from_dict(d: dict[str, Any] | None) -> TensorConfig | None:
    if d is None:
        return None
    _check_dict(d, "tensor settings (\"weight\" / \"act\")")
    unknown = set(d) - {f.name for f in fields(TensorConfig)}
    if unknown:
        raise ConfigError(f"unknown tensor settings {sorted(unknown)}; valid: {[f.name for f in fields(TensorConfig)]}")
    return TensorConfig(**d)


def layer_config_from_dict(d: dict[str, Any]) -> LayerConfig:
    _check_dict(d, "layer settings (\"default\")")
    unknown = set(d) - {f.name for f in fields(LayerConfig)}
    if unknown:
        raise ConfigError(f"unknown layer settings {sorted(unknown)}; valid: {[f.name for f in fields(LayerConfig)]}")
    d = dict(d)
    for key in ("weight", "act"):
        if key in d:
            d[key] = tensor_config_from_dict(d[key])
    return LayerConfig(**d)


def apply_patch(cfg: LayerConfig, patch: dict[str, Any]) -> LayerConfig:
    """Apply an override patch: ``{"weight": {"bits": 8}, "act": None, "bias_correction": "none"}``.

    Dotted keys work too: ``{"weight.bits": 8, "act.method": "kld"}``. ``"act": None`` leaves activations in
    float; ``"quantize": False`` leaves the whole layer in float.
    """
    cfg = copy.deepcopy(cfg)
    for key, value in patch.items():
        head, _, tail = key.partition(".")
        if head in ("weight", "act"):
            current = getattr(cfg, head)
            if tail:
                if current is None:
                    current = TensorConfig(granularity="channel", symmetric=True) if head == "weight" else TensorConfig()
                if tail not in {f.name for f in fields(TensorConfig)}:
                    raise ConfigError(f"unknown tensor setting {tail!r} in override key {key!r}")
                setattr(cfg, head, replace(current, **{tail: value}))
            elif value is None:
                setattr(cfg, head, None)
            elif isinstance(value, dict):
                base = current if current is not None else TensorConfig()
                unknown = set(value) - {f.name for f in fields(TensorConfig)}
                if unknown:
                    raise ConfigError(f"unknown tensor settings {sorted(unknown)} in override {key!r}")
                setattr(cfg, head, replace(base, **value))
            else:
                raise ConfigError(f"override {key!r} must be a dict of tensor settings or None, got {value!r}")
        elif head in ("bias_correction", "quantize", "smooth") and not tail:
            setattr(cfg, head, value)
        else:
            raise ConfigError(f"unknown override key {key!r}; use weight.*, act.*, bias_correction, quantize or "
                              "smooth")
    return cfg


def match_pattern(pattern: str, name: str, type_names: str | list[str]) -> bool:
    """Whether an override pattern (glob, ``re:`` regex or ``type:`` class name) selects a layer."""
    if isinstance(type_names, str):
        type_names = [type_names]
    if pattern.startswith("re:"):
        try:
            return re.fullmatch(pattern[3:], name) is not None
        except re.error as exc:
            raise ConfigError(f"invalid regular expression in override {pattern!r}: {exc}") from None
    if pattern.startswith("type:"):
        return any(fnmatch.fnmatchcase(t, pattern[5:]) for t in type_names)
    return fnmatch.fnmatchcase(name, pattern)


# ---- presets ------------------------------------------------------------------------------------------

PRESETS = ("minmax", "aciq", "aciq-clip", "aciq-alloc", "aciq-gptq", "kld", "ksigma", "percentile", "mse",
           "smoothquant", "smoothquant-gptq")
#: input features per range of the ``smoothquant-gptq`` preset's group-wise weights
GPTQ_GROUP_SIZE = 64


def _is_number(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def allocation_bounds(bits: float, *, symmetric: bool) -> tuple[int, int]:
    """Default per-channel bit bounds of an allocated tensor with average budget ``bits``.

    ``min_bits = min(2, floor(bits))`` (at least 2 for a symmetric grid, whose 1-bit grid is degenerate) and
    ``max_bits = max(8, ceil(bits))``: the usual 2..8 range of the ACIQ reference code, widened so that any
    budget in 1..32 (2..32 for symmetric grids) lies inside it (a 16-bit budget gives 2..16, so the full
    pipeline runs at 16 bits too)."""
    lo = min(2, math.floor(float(bits)))
    return (max(2, lo) if symmetric else max(1, lo)), max(8, math.ceil(float(bits)))


def check_gptq_damp(value: Any, name: str = "gptq_damp") -> float | str:
    """A GPTQ damping: a finite number > 0, or "cv" (chosen per layer by cross-validation)."""
    if value == "cv":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a number > 0 (GPTQ's default 0.01) or 'cv' (chosen per layer "
                          "by cross-validation on the calibration samples)")
    return float(value)


def preset(name: str, w_bits: float = 8, a_bits: float | None = 8, *, act_granularity: str | None = None,
           weight_granularity: str | None = None, online: bool = False, weight_method: str | None = None,
           weight_options: dict[str, Any] | None = None, rounding: str | None = None, min_bits: int | None = None,
           max_bits: int | None = None, allocation: str | None = None, smooth: float | None = None,
           group_size: int | None = None, gptq_damp: float | str | None = None, gptq_act_order: bool | None = None,
           gptq_asymmetric: bool | None = None, clip_check: str | None = None, **overrides: Any) -> QuantConfig:
    """Named PTQ configurations (the rows of the ACIQ comparison).

    * ``minmax``: the naive baseline: per-channel symmetric min-max weights, per-tensor min-max activations.
    * ``aciq-clip``: + ACIQ analytical clipping of activations (Laplace prior), checked per tensor: where the
      window gives a larger error at the layer's output than min-max on the calibration data (heavy-tailed
      transformer activations), min-max is used and reported (``TensorConfig.clip_check = "output"``,
      :mod:`bitalloc.calibration.clip_check`).
    * ``aciq-alloc``: + per-channel bit allocation at the average budgets: weights always; activations too
      when they are quantized per channel (``act_granularity="channel"``).
    * ``aciq``: + bias correction (mean shift) of the weights: the full ACIQ pipeline.
    * ``aciq-gptq``: the full pipeline with the weights rounded by GPTQ (Frantar et al. 2023, error-compensating
      rounding on calibration data) onto per-channel grids found by MSE search at each channel's allocated
      width, instead of round-to-nearest on min-max grids plus the mean shift (GPTQ's compensation supersedes
      it). bitalloc's most accurate post-training configuration at 4 bits (BENCHMARKS.md); calibration costs
      one extra pass per layer.

    Activations are quantized per tensor (layer-wise) by default in every preset: that is what integer
    kernels can execute (one activation scale per tensor), and with 32 calibration images per-channel
    activation ranges overfit rarely active channels (see BENCHMARKS.md, layer-wise against channel-wise).
    * ``kld`` / ``ksigma`` (k = 2) / ``percentile`` (99.99) / ``mse``: the baselines, applied to
      activations, with min-max per-channel weights.
    * ``smoothquant``: the W8A8 recipe for transformers: SmoothQuant (alpha 0.5, ``smooth``) on the layers that
      read a LayerNorm, and per-token dynamic activation scales (``act_granularity="token"``, online; min-max),
      min-max per-channel weights (Xiao et al. 2023; per-token scales as ZeroQuant / LLM.int8()). On
      all-MiniLM-L6-v2 it keeps the sentence embeddings at cosine 0.9995 to FP32, where static per-tensor
      activation scales reach 0.993-0.997 (BENCHMARKS.md). Online scales are not exportable to ONNX.
    * ``smoothquant-gptq``: the W4A8 recipe for transformers: ``smoothquant`` with the weights rounded by GPTQ onto
      group-wise MSE-searched grids (``weight_granularity="group"``, 64 input features per range: the group-wise
      4-bit weights of Frantar et al. 2023). On all-MiniLM-L6-v2 at W4A8: cosine 0.981 to FP32, against 0.951
      with per-channel GPTQ grids and 0.939 with ``smoothquant`` (BENCHMARKS.md). Group-wise layers run in
      bitalloc's fake quantization (save, pack, freeze, cost); the QDQ export and the integer runtime need
      per-channel weights and refuse them.

    Allocation rule (``allocation``): ``"aciq"`` (default), eq. 10-11 of the paper, B_i proportional to
    a_i^(2/3) bins, rounded so that the mean meets the budget; or ``"optimal"``, the exact integer minimiser of the
    eq. 10 error model. The exact optimum has the lower modelled error but the lower accuracy on EfficientNet-Lite0
    and ResNet-20 (W4A4 43.0% against 55.6%, 85.7% against 86.0%; a tie on LeNet-5; BENCHMARKS.md): the model
    counts each channel's absolute weight MSE, and its optimum spreads the bits more, giving small-range channels
    2-3 bits that the network needs more than the model says. Allocated tensors get per-channel bounds
    ``min_bits = min(2, floor(bits))`` (2 for symmetric weights) and ``max_bits = max(8, ceil(bits))``
    (:func:`allocation_bounds`), so every budget from 1 to 32 bits is valid; ``min_bits`` / ``max_bits`` set
    them explicitly (an error when nothing is allocated).

    ``act_granularity`` / ``weight_granularity`` override the granularities ("tensor" or "channel"; per-tensor
    tensors are not allocated, so they need integer bits; weights also "group", with ``group_size`` input
    features per range (default 128), not allocated either: e.g. ``preset("aciq-gptq", 4, 8,
    weight_granularity="group", group_size=64)`` is GPTQ with group-wise 4-bit weights); ``online`` recomputes
    activation statistics on every input; ``weight_method`` / ``weight_options``
    override the weights' range estimator (default per preset);
    ``rounding`` ("nearest" / "gptq", default per preset) how weights are rounded onto their grid;
    ``gptq_damp`` / ``gptq_act_order`` / ``gptq_asymmetric``: GPTQ's damping, column order and calibration target
    (:class:`TensorConfig`); ``clip_check``: how the activation ranges are checked ("none", "output", or
    "network": each step chosen by the network's output, :mod:`bitalloc.calibration.network_clip`; default per
    preset). ``smooth``:
    SmoothQuant migration strength alpha of every layer (:class:`LayerConfig`). Other keywords are QuantConfig
    fields.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {PRESETS}")
    unknown = set(overrides) - {f.name for f in fields(QuantConfig)}
    if unknown:
        raise ConfigError(f"unknown preset option(s) {sorted(unknown)}; valid: the QuantConfig fields "
                          f"{[f.name for f in fields(QuantConfig)]}")
    for label, value in (("w_bits", w_bits), ("a_bits", a_bits)):
        if value is not None and not _is_number(value):
            raise ConfigError(f"{label}={value!r} is not a number; give a bit width such as 4 (or 3.5 with allocation)")
    for label, value in (("act_granularity", act_granularity), ("weight_granularity", weight_granularity)):
        if value is not None and value not in GRANULARITIES:
            raise ConfigError(f"{label}={value!r} is not one of {GRANULARITIES}")
    weight = TensorConfig(bits=w_bits, granularity="channel", method="minmax", symmetric=True)
    act = TensorConfig(bits=a_bits if a_bits is not None else 8, granularity="tensor", method="minmax", online=online)
    bc = "none"
    if name.startswith("aciq"):
        # the ACIQ window, checked against min-max by the layer's output error (bitalloc.calibration.clip_check)
        act.method, act.options, act.clip_check = "aciq", {"prior": "laplace"}, "output"
        if name in ("aciq", "aciq-alloc", "aciq-gptq"):
            weight.allocate = act.allocate = True
        if name == "aciq-gptq":
            weight.method, weight.rounding = "mse", "gptq"
        if name == "aciq":
            bc = "mean"
    elif name == "kld":
        act.method = "kld"
    elif name == "ksigma":
        act.method, act.options = "ksigma", {"k": 2.0}
    elif name == "percentile":
        act.method, act.options = "percentile", {"percentile": 99.99}
    elif name == "mse":
        act.method = "mse"
    elif name in ("smoothquant", "smoothquant-gptq"):
        act.granularity, act.online = "token", True
        smooth = 0.5 if smooth is None else smooth
        if name == "smoothquant-gptq":
            weight.method, weight.rounding = "mse", "gptq"
            weight.granularity, weight.group_size = "group", GPTQ_GROUP_SIZE
    if rounding is not None:
        weight.rounding = rounding
    if (gptq_damp is not None or gptq_act_order or gptq_asymmetric) and weight.rounding != "gptq":
        raise ConfigError(f"gptq_damp / gptq_act_order / gptq_asymmetric (CLI --gptq-damp / --gptq-act-order / "
                          f"--gptq-asymmetric) set GPTQ rounding, but "
                          f"preset {name!r} rounds to nearest: add rounding='gptq' (CLI --rounding gptq) or use "
                          "preset 'aciq-gptq'")
    if gptq_damp is not None:
        weight.gptq_damp = check_gptq_damp(gptq_damp)
    if gptq_act_order is not None:
        weight.gptq_act_order = gptq_act_order
    if gptq_asymmetric is not None:
        weight.gptq_asymmetric = gptq_asymmetric
    if weight_method is not None:
        weight.method, weight.options = weight_method, dict(weight_options or {})
    if clip_check is not None:  # its value and online ranges are checked by TensorConfig.validate
        if a_bits is None:
            raise ConfigError(f"clip_check={clip_check!r} (CLI --clip-check) checks the ranges of activations "
                              "calibrated offline, and this configuration has no quantized activations: drop it")
        act.clip_check = clip_check
    if act_granularity is not None:
        act.granularity = act_granularity
    if weight_granularity is not None:
        weight.granularity = weight_granularity
    if group_size is not None:
        if weight.granularity != "group":
            raise ConfigError("group_size (CLI --group-size) sets the input features per range of group-wise weights: "
                              "add weight_granularity='group' (CLI --weight-granularity group) or drop it")
        weight.group_size = group_size
    if act.granularity == "group":
        raise ConfigError("act_granularity='group' is not an activation granularity: group-wise ranges are for "
                          "weights (weight_granularity='group'); activations take 'tensor', 'channel' or 'token'")
    tensors = [("weight", weight, w_bits, "weight_granularity", "--weight-granularity")]
    if a_bits is not None:
        tensors.append(("activation", act, a_bits, "act_granularity", "--act-granularity"))
    for what, t, bits, kwarg, flag in tensors:
        if t.granularity in ("tensor", "token", "group"):
            t.allocate = False
        if float(bits) != int(float(bits)) and not t.allocate:
            if t.granularity == "tensor":
                fix = (f"{what}s are quantized per tensor: pass {kwarg}='channel' (CLI: {flag} channel)"
                       + ("" if name in ("aciq", "aciq-alloc") else " with preset 'aciq' or 'aciq-alloc'"))
            else:
                fix = "use preset 'aciq' or 'aciq-alloc'"
            raise ConfigError(f"fractional {what} bits {bits:g} are an average budget and need per-channel bit "
                              f"allocation, but {fix}; or give an integer bit width")
        if allocation is not None:
            t.allocation = allocation
        if t.allocate:
            t.min_bits, t.max_bits = allocation_bounds(bits, symmetric=t.symmetric)
            if min_bits is not None:
                t.min_bits = min_bits
            if max_bits is not None:
                t.max_bits = max_bits
    if (min_bits is not None or max_bits is not None) and not any(t.allocate for _, t, *_ in tensors):
        raise ConfigError(f"min_bits / max_bits (CLI --min-bits / --max-bits) bound per-channel bit allocation, but "
                          f"preset {name!r} with these granularities allocates no bits: use preset 'aciq' or "
                          "'aciq-alloc' (per-channel tensors)")
    if smooth is not None and a_bits is None:
        raise ConfigError("smooth (SmoothQuant) moves activation outliers into the weights, but the activations "
                          "stay in float here (a_bits=None): drop smooth or quantize the activations")
    layer = LayerConfig(weight=weight, act=act if a_bits is not None else None, bias_correction=bc, smooth=smooth)
    return QuantConfig(default=layer, **overrides).validate()
