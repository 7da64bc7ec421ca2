"""Launch a worker script through the real torchrun entry point (``python -m torch.distributed.run --standalone
--nproc_per_node 2``), as the data-parallel tests of training and quantization-aware training do.

The tests that use it carry ``pytest.mark.xdist_group("torchrun")`` (``make test`` runs ``--dist loadgroup``), so
that two 2-process launches never run at the same time on the 2 CI cores. Once in many runs of the full suite a
gloo worker aborted (exit -6) while both launches ran at once; running them apart is the suspected fix (the
cause was not pinned down: the test passed 11 times alone).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

TIMEOUT_S = 180


def load_worker(source: str, path: Path) -> ModuleType:
    """Write the worker's source to ``path`` and import it (the tests run its cases in-process too)."""
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def run_torchrun(script: Path, *args: str, nproc: int = 2) -> None:
    """Run ``script args`` in ``nproc`` processes with one thread each; fail the test with the launcher's output
    if it fails or hangs (the launcher gets a session of its own, so a hang kills its workers too)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    root = Path(__file__).resolve().parents[1]  # src for bitalloc, the root for the shared test helpers
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["BITALLOC_PROGRESS"] = "off"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(nproc), str(script), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun hung for {TIMEOUT_S} s:\n{stdout[-3000:]}\n{stderr[-5000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}"
