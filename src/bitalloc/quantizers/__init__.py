"""Quantizers: one interface (:class:`Quantizer`), one frozen description (:class:`QuantParams`).

``QUANTIZERS`` maps the ``TensorConfig.quantizer`` name to a class with the constructor
``(cfg: TensorConfig, role: str, axis: int, channels: int)``. A new method is a new entry here.
"""

from __future__ import annotations

from bitalloc.config import TensorConfig
from bitalloc.errors import ConfigError
from bitalloc.quantizers.base import QuantParams, Quantizer
from bitalloc.quantizers.bayesian_bits import BayesianBitsQuantizer
from bitalloc.quantizers.fixed import FixedQuantizer
from bitalloc.quantizers.frozen import FrozenQuantizer
from bitalloc.quantizers.lsq import LearnedQuantizer, LSQQuantizer
from bitalloc.quantizers.pact import PACTQuantizer
from bitalloc.quantizers.region import RegionLSQQuantizer

QUANTIZERS: dict[str, type[Quantizer]] = {"fixed": FixedQuantizer, "lsq": LSQQuantizer, "pact": PACTQuantizer,
                                          "bb": BayesianBitsQuantizer, "frozen": FrozenQuantizer,
                                          "lsq_region": RegionLSQQuantizer}


def register_quantizer(name: str, cls: type[Quantizer]) -> None:
    """Make ``TensorConfig(quantizer=name)`` build ``cls``."""
    QUANTIZERS[name] = cls


def make_quantizer(cfg: TensorConfig, role: str, axis: int, channels: int,
                   shape: tuple[int, ...] | None = None) -> Quantizer:
    """Build the quantizer named by ``cfg.quantizer`` for a tensor with ``channels`` channels along ``axis``
    (``shape``: the tensor's shape, which group-wise weight grids need)."""
    try:
        cls = QUANTIZERS[cfg.quantizer]
    except KeyError:
        raise ConfigError(f"unknown quantizer {cfg.quantizer!r}; choose one of {sorted(QUANTIZERS)}") from None
    if cfg.granularity == "group":  # TensorConfig.validate admits it for the fixed and frozen quantizers only
        return cls(cfg, role, axis, channels, shape=shape)
    return cls(cfg, role, axis, channels)


__all__ = ["QUANTIZERS", "BayesianBitsQuantizer", "FixedQuantizer", "FrozenQuantizer", "LearnedQuantizer", "LSQQuantizer",
           "PACTQuantizer", "QuantParams", "Quantizer", "RegionLSQQuantizer", "make_quantizer", "register_quantizer"]
