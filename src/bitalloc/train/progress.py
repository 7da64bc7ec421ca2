"""Progress display: tqdm bars on a terminal, plain periodic log lines otherwise; rank 0 only.

``mode`` is "auto" (bars when tqdm is installed and stderr is a TTY, log lines otherwise), "bar" (force
tqdm bars, falls back to lines without tqdm), "log" (lines only) or "off". The environment variable
``BITALLOC_PROGRESS`` (auto/bar/log/off, or 1/0) sets the default mode. On ranks other than 0 of a
distributed run every method is a no-op.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

MODES = ("auto", "bar", "log", "off")


def _is_main() -> bool:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except Exception:  # pragma: no cover - defensive
        pass
    return int(os.environ.get("RANK", "0") or 0) == 0


def resolve_mode(mode: str | bool | None = None, stream: TextIO | None = None) -> str:
    """The effective mode ("bar", "log" or "off") for this process."""
    if mode is None:
        env = os.environ.get("BITALLOC_PROGRESS", "auto").strip().lower()
        mode = {"1": "bar", "true": "bar", "yes": "bar", "0": "off", "false": "off", "no": "off"}.get(env, env)
    if mode is True:
        mode = "bar"
    elif mode is False:
        mode = "off"
    if mode not in MODES:
        mode = "auto"
    if mode == "off" or not _is_main():
        return "off"
    stream = stream if stream is not None else sys.stderr
    try:
        import tqdm  # noqa: F401

        has_tqdm = True
    except ImportError:
        has_tqdm = False
    if mode == "auto":
        tty = bool(getattr(stream, "isatty", lambda: False)())
        return "bar" if (has_tqdm and tty) else "log"
    if mode == "bar" and not has_tqdm:
        return "log"
    return mode


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """A progress counter over ``total`` units with a description and key=value postfix.

    Use as a context manager; call :meth:`update` after each unit (a batch) and :meth:`set` to change
    the displayed values. In "log" mode a line is printed at most every ``every_s`` seconds (and at the end).
    """

    def __init__(self, total: int | None, desc: str = "", *, mode: str | bool | None = None,
                 stream: TextIO | None = None, every_s: float = 10.0, unit: str = "batch", leave: bool = True):
        self.total = total
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.mode = resolve_mode(mode, self.stream)
        self.every_s = every_s
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self._t0 = time.perf_counter()
        self._last = self._t0
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=leave,
                             dynamic_ncols=True, mininterval=0.2)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set(self, **values: Any) -> None:
        """Replace the displayed key=value pairs (floats shown with 4 significant digits)."""
        self.postfix = dict(values)
        if self._bar is not None:
            self._bar.set_postfix({k: _fmt(v) for k, v in values.items()}, refresh=False)

    def update(self, n: int = 1, **values: Any) -> None:
        self.n += n
        if values:
            self.set(**values)
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "log":
            now = time.perf_counter()
            if now - self._last >= self.every_s:
                self._last = now
                self._line()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self._t0
        total = f"/{self.total}" if self.total else ""
        rate = self.n / elapsed if elapsed > 0 else 0.0
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n}{total} [{elapsed:.1f}s, {rate:.2f}/s] {extra}".rstrip(),
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "log" and self.n and time.perf_counter() - self._t0 >= self.every_s:
            self._line()  # a closing line only for long tasks (short ones are summarised by the caller)
            self.mode = "closed"


def message(text: str, *, stream: TextIO | None = None, mode: str | bool | None = None) -> None:
    """Print one line on rank 0 (through tqdm.write when bars are active, so bars are not broken)."""
    stream = stream if stream is not None else sys.stderr
    m = resolve_mode(mode, stream)
    if m == "off":
        return
    if m == "bar":
        from tqdm.auto import tqdm

        tqdm.write(text, file=stream)
    else:
        print(text, file=stream, flush=True)
