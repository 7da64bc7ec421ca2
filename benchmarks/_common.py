"""Shared helpers of the benchmark scripts: machine description and BENCHMARKS.md section updates."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def repo_path(path: str | Path) -> str:
    """``path`` relative to the repository root when it lies inside it (resolved: a relative path counts from the
    working directory), else as given; for paths written into results and BENCHMARKS.md."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def machine() -> str:
    """One line describing the machine the numbers come from (:func:`bitalloc.report.machine.machine_description`)."""
    from bitalloc.report.machine import machine_description

    return machine_description()


def model_data_parser(description: str | None, *, batch_size: int) -> argparse.ArgumentParser:
    """The options every model benchmark takes: --model, --checkpoint, --dataset, --data, --calib, --batch-size."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--checkpoint")
    ap.add_argument("--dataset")
    ap.add_argument("--data", required=True)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    return ap


def command_line() -> str:
    """The command that ran, with the benchmark data folder written as ``$DATA`` when the environment variable
    ``DATA`` names it (so recorded commands never carry a machine's path)."""
    data = os.environ.get("DATA", "").rstrip("/")

    def show(a: str) -> str:
        if data and (a == data or a.startswith(data + "/")):
            return '"$DATA' + a[len(data):] + '"'
        return shlex.quote(a)

    return " ".join(show(a) for a in ["python"] + sys.argv)


def git_revision() -> str:
    """HEAD's short hash, with " + uncommitted changes" when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def update_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` (appending if absent)."""
    from bitalloc.io import write_text

    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    write_text(path, text)


def md_table(columns: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.2f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def finish_results(out: Path, partial: Path | None, result: dict, section: str, text: str | None) -> None:
    """Write a benchmark's final JSON, drop its partial (resumable) file if it has one, and replace BENCHMARKS.md's
    ``section`` with ``text`` (None: leave BENCHMARKS.md alone, e.g. --no-md)."""
    from bitalloc.io import write_json

    write_json(out, result)
    if partial is not None:
        partial.unlink(missing_ok=True)
    print(f"results: {out}")
    if text is not None:
        update_section(section, text)
