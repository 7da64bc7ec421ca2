"""Calibration: observers that stream statistics, and the calibration context."""

from bitalloc.calibration.calibrate import calibrate, calibration
from bitalloc.calibration.observer import Observer

__all__ = ["Observer", "calibrate", "calibration"]
