"""Error types. Every error names the problem and the fix, so the CLI can print it without a traceback."""

from __future__ import annotations


class BitallocError(Exception):
    """Base class of every error bitalloc raises on purpose (bad input, bad configuration, bad files)."""


class ConfigError(BitallocError, ValueError):
    """An option or configuration value is invalid (bit widths out of range, unknown method, ...)."""


class UnsupportedLayerError(BitallocError, TypeError):
    """A layer was asked to be quantized but bitalloc cannot quantize that layer type."""


class DataError(BitallocError, ValueError):
    """A data path is missing, empty, truncated or in an unrecognised format."""


class CheckpointError(BitallocError, ValueError):
    """A checkpoint or packed model file is missing, corrupt, truncated or does not fit the model."""


class ShapeError(BitallocError, ValueError):
    """A tensor has the wrong shape for the operation."""


def check_bits(bits: int | float, *, name: str = "bits", lo: int = 1, hi: int = 32, integer: bool = True) -> None:
    """Raise ConfigError unless ``lo <= bits <= hi`` (and integral when ``integer``)."""
    try:
        value = float(bits)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={bits!r} is not a number; give an integer between {lo} and {hi}.") from None
    if integer and value != int(value):
        raise ConfigError(f"{name}={bits!r} must be an integer between {lo} and {hi} "
                          f"(fractional averages are only accepted by per-channel bit allocation).")
    if not lo <= value <= hi:
        why = " (a symmetric grid, as weights use, needs at least 2 bits)" if lo == 2 and value < 2 else ""
        raise ConfigError(f"{name}={bits!r} is out of range; give a value between {lo} and {hi}{why}.")
