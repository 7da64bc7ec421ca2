"""One line describing the machine a measurement ran on, for benchmark results and ``bitalloc bench``."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["cpu_name", "memory_gib", "machine_description"]


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    """Total memory in GiB from ``/proc/meminfo``; None where it cannot be read."""
    try:
        line = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
        return int(line.split()[1]) / 2**20
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def machine_description(threads: int | None = None, *, onnxruntime: bool = False) -> str:
    """CPU model, core count, memory, torch version, intra-op threads (``threads``, else torch's current setting)
    and the vector instructions torch's CPU kernels use (``torch.backends.cpu.get_cpu_capability()``, e.g. AVX2 or
    AVX512: two machines of one model name can differ there), and with ``onnxruntime=True`` the onnxruntime version
    ("absent" when it is not installed)."""
    mem = memory_gib()
    parts = [f"{cpu_name()}, {os.cpu_count()} cores" + (f", {mem:.0f} GiB RAM" if mem is not None else "")]
    if onnxruntime:
        try:
            import onnxruntime as ort

            parts.append(f"onnxruntime {ort.__version__}")
        except ImportError:
            parts.append("onnxruntime absent")
    parts.append(f"torch {torch.__version__} ({threads or torch.get_num_threads()} threads, "
                 f"{torch.backends.cpu.get_cpu_capability()} kernels), Python {platform.python_version()}")
    return "; ".join(parts)
