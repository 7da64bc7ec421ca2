"""Learning-rate schedules as pure functions ``(step, total_steps) -> multiplier``.

Every schedule maps the 0-based index of an optimizer step and the total number of steps of the run to a
multiplier of a parameter group's base learning rate. Being pure functions of the step (no hidden state),
they resume exactly from a checkpoint that records only the step, and each optimizer parameter group can
follow its own schedule (see :class:`ScheduleSpec` and :func:`bitalloc.train.loop.fit`).

Closed forms, with ``t = step / total_steps`` (0 at the first step):

* ``constant``: 1.
* ``cosine``: ``final + (1 - final) * (1 + cos(pi * t)) / 2`` (Loshchilov & Hutter, SGDR, ICLR 2017, without
  restarts); ``final`` defaults to 0.
* ``linear`` (alias ``linear-decay``): ``1 - (1 - final) * t``.
* ``constant_then_linear``: 1 while ``t < fraction``, then ``(1 - t) / (1 - fraction)``: linear to 0 at the end.
  ``fraction`` defaults to 2/3: the Bayesian Bits recipe keeps the *weight* learning rate constant for the
  first two thirds of training and then decays it linearly to zero (van Baalen et al., "Bayesian Bits:
  Unifying Quantization and Pruning", NeurIPS 2020, appendix on experimental details).
* ``step`` (alias ``multistep``): ``gamma ** (number of milestones <= t)``, milestones given as fractions
  of training (default ``(0.5, 0.75)``, gamma 0.1).
* ``one_cycle``: linear warm-up from ``1/div`` to 1 over the first ``pct`` of training, then cosine down to
  ``1/final_div`` (Smith & Topin, "Super-Convergence", 2018; the shape of ``torch.optim.lr_scheduler.OneCycleLR``
  with ``anneal_strategy="cos"`` and ``three_phase=False``).

**Warm-up** (any schedule): with ``warmup_steps = W > 0`` the multiplier is ``(step + 1) / W * f(W, T)`` for
``step < W`` (linear ramp that ends at the value the schedule has at step W) and ``f(step, T)`` afterwards,
where ``f`` is the schedule. ``warmup_fraction`` gives W as a fraction of the total steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

from bitalloc.errors import ConfigError

ScheduleFn = Callable[[int, int], float]


def _progress(step: int, total_steps: int) -> float:
    if total_steps <= 0:
        return 0.0
    return min(max(step / total_steps, 0.0), 1.0)


def constant(step: int, total_steps: int) -> float:
    """Multiplier 1 at every step."""
    return 1.0


def cosine(step: int, total_steps: int, *, final: float = 0.0) -> float:
    """Cosine annealing from 1 (step 0) to ``final`` (at ``step == total_steps``)."""
    t = _progress(step, total_steps)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def linear(step: int, total_steps: int, *, final: float = 0.0) -> float:
    """Linear decay from 1 (step 0) to ``final`` (at ``step == total_steps``)."""
    t = _progress(step, total_steps)
    return 1.0 - (1.0 - final) * t


def constant_then_linear(step: int, total_steps: int, *, fraction: float = 2.0 / 3.0) -> float:
    """1 for the first ``fraction`` of training, then linear to 0 at the end (Bayesian Bits weight schedule).

    Source: van Baalen et al., Bayesian Bits, NeurIPS 2020, appendix (experimental details): "the learning
    rate of the weights is kept constant for the first 2/3 of training and then decayed linearly to 0".
    """
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"constant_then_linear: fraction={fraction} must lie in [0, 1]")
    t = _progress(step, total_steps)
    if t < fraction or fraction >= 1.0:
        return 1.0
    return max(0.0, (1.0 - t) / (1.0 - fraction))


def multistep(step: int, total_steps: int, *, milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1) -> float:
    """Multiply by ``gamma`` at each milestone (fractions of training)."""
    t = _progress(step, total_steps)
    return float(gamma ** sum(1 for m in milestones if t >= m))


def one_cycle(step: int, total_steps: int, *, pct: float = 0.3, div: float = 25.0, final_div: float = 1e4) -> float:
    """One-cycle: linear ramp 1/div -> 1 over the first ``pct`` of training, then cosine to 1/final_div."""
    t = _progress(step, total_steps)
    start, end = 1.0 / div, 1.0 / final_div
    if pct > 0 and t < pct:
        return start + (1.0 - start) * t / pct
    u = (t - pct) / (1.0 - pct) if pct < 1 else 1.0
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * u))


SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant,
    "cosine": cosine,
    "linear": linear,
    "constant_then_linear": constant_then_linear,
    "step": multistep,
    "one_cycle": one_cycle,
}
ALIASES = {
    "linear-decay": "linear", "linear_decay": "linear", "constant-then-linear": "constant_then_linear",
    "bayesian_bits": "constant_then_linear", "multistep": "step", "one-cycle": "one_cycle", "onecycle": "one_cycle",
    "none": "constant",
}


def canonical_name(name: str) -> str:
    """The registry name of a schedule (resolves aliases); ConfigError for unknown names."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in SCHEDULES:
        raise ConfigError(f"unknown learning-rate schedule {name!r}; choose one of "
                          f"{sorted(SCHEDULES) + sorted(ALIASES)}")
    return key


def with_warmup(fn: ScheduleFn, warmup_steps: int) -> ScheduleFn:
    """Wrap ``fn`` with a linear warm-up over the first ``warmup_steps`` steps (see module docstring)."""
    if warmup_steps <= 0:
        return fn

    def wrapped(step: int, total_steps: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps * fn(warmup_steps, total_steps)
        return fn(step, total_steps)

    return wrapped


@dataclass
class ScheduleSpec:
    """A named schedule with its arguments and optional warm-up: plain data, stored in checkpoints.

    ``warmup_steps`` (absolute) wins over ``warmup_fraction`` (of the total number of steps).
    """

    name: str = "constant"
    args: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 0
    warmup_fraction: float = 0.0

    def __post_init__(self) -> None:
        self.name = canonical_name(self.name)
        self.args = dict(self.args or {})
        fn = SCHEDULES[self.name]
        try:  # validate the arguments now rather than at the first step
            fn(0, 10, **self.args)
        except TypeError as exc:
            raise ConfigError(f"schedule {self.name!r}: bad arguments {self.args}: {exc}") from None
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"schedule {self.name!r}: warm-up must be >= 0 steps and a fraction in [0, 1)")

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_steps:
            return int(self.warmup_steps)
        return int(round(self.warmup_fraction * total_steps))

    def build(self, total_steps: int) -> Callable[[int], float]:
        """The multiplier as a function of the step alone, for a run of ``total_steps`` steps."""
        base = SCHEDULES[self.name]
        args = dict(self.args)

        def fn(step: int, total: int) -> float:
            return base(step, total, **args)

        full = with_warmup(fn, self.warmup_for(total_steps))
        return lambda step: float(full(step, total_steps))

    def __call__(self, step: int, total_steps: int) -> float:
        return self.build(total_steps)(step)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_spec(value: "ScheduleSpec | str | Mapping[str, Any] | None", *, args: Mapping[str, Any] | None = None,
            default: "ScheduleSpec | None" = None) -> ScheduleSpec:
    """Normalise a schedule given as a spec, a name (with ``args``), a dict (``{"name": ..., "args": ...}``) or None."""
    if value is None:
        return default if default is not None else ScheduleSpec()
    if isinstance(value, ScheduleSpec):
        return value
    if isinstance(value, str):
        return ScheduleSpec(value, dict(args or {}))
    if isinstance(value, Mapping):
        d = dict(value)
        unknown = set(d) - {"name", "args", "warmup_steps", "warmup_fraction"}
        if unknown:
            raise ConfigError(f"unknown schedule keys {sorted(unknown)}; use name, args, warmup_steps, warmup_fraction")
        return ScheduleSpec(**d)
    raise ConfigError(f"cannot use {value!r} as a learning-rate schedule; give a name such as 'cosine'")
