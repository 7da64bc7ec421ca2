"""Quantizers: one interface (:class:`Quantizer`), one frozen description (:class:`QuantParams`).

``QUANTIZERS`` maps the ``TensorConfig.quantizer`` name to a class with the constructor
``(cfg: TensorConfig, role: str, axis: int, channels: int)``. A new method is a new entry here.
"""

from __future__ import annotations

from bitalloc.config import TensorConfig
from bitalloc.errors import ConfigError
from bitalloc.quantizers.base import QuantParams, Quantizer
from bitalloc.quantizers.fixed import FixedQuantizer

QUANTIZERS: dict[str, type[Quantizer]] = {"fixed": FixedQuantizer}


def register_quantizer(name: str, cls: type[Quantizer]) -> None:
    """Make ``TensorConfig(quantizer=name)`` build ``cls``."""
    QUANTIZERS[name] = cls


def make_quantizer(cfg: TensorConfig, role: str, axis: int, channels: int) -> Quantizer:
    """Build the quantizer named by ``cfg.quantizer`` for a tensor with ``channels`` channels along ``axis``."""
    try:
        cls = QUANTIZERS[cfg.quantizer]
    except KeyError:
        raise ConfigError(f"unknown quantizer {cfg.quantizer!r}; choose one of {sorted(QUANTIZERS)}") from None
    return cls(cfg, role, axis, channels)


__all__ = ["QUANTIZERS", "FixedQuantizer", "QuantParams", "Quantizer", "make_quantizer", "register_quantizer"]
