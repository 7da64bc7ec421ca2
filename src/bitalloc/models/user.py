"""The user's own models: a factory named as text, imported only when trusted, and a weights file.

A *factory spec* names a callable that returns an ``nn.Module``:

* ``package.module:function`` (an importable module; ``function`` may be dotted: ``module:Class.build``), or
* ``path/to/file.py:function`` (a Python file, imported under a private module name).

Importing runs the module's code, so :func:`import_factory` refuses anything outside bitalloc unless
``trust_code=True`` (the CLI's ``--trust-code``). ``kwargs`` are passed to the factory.

A weights file (:func:`load_weights`) is a ``state_dict`` saved with ``torch.save`` (``.pt`` / ``.pth`` /
``.bin``; also a dict holding it under ``state_dict`` / ``model_state_dict`` / ``model`` / ``model_state``; keys
with DistributedDataParallel's ``module.`` prefix are accepted), read with ``torch.load(weights_only=True)``
(opening it runs no code), or a ``.safetensors`` file (the ``safetensors`` package), or a bitalloc training
checkpoint (its checksum verified, :func:`bitalloc.train.checkpoint.load_model_checkpoint`). Every key and
shape must fit the model: what does not is a :class:`CheckpointError` listing it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from bitalloc.errors import CheckpointError, ConfigError

__all__ = ["is_factory_spec", "import_factory", "build_user_model", "read_state_dict", "load_weights",
           "TRUST_HINT"]

#: how the command line says "trust this code"
TRUST_HINT = "--trust-code"
_SPEC = re.compile(r"^(?P<module>[^:]+):(?P<attr>[A-Za-z_][A-Za-z0-9_.]*)$")


def is_factory_spec(text: Any) -> bool:
    """Whether ``text`` names a factory (``module:function`` or ``file.py:function``), not a zoo model name."""
    return isinstance(text, str) and _SPEC.match(text.strip()) is not None and not re.match(r"^[A-Za-z]:[\\/]", text)


def _is_bitalloc(module: str) -> bool:
    return module == "bitalloc" or module.startswith("bitalloc.")


def _import_file(path: Path) -> Any:
    """Import the Python file ``path`` under a private module name (one per file content: re-importing the same
    file gives the same module, so classes defined there stay the same objects)."""
    if not path.is_file():
        raise ConfigError(f"model factory file {path} does not exist; give an existing .py file (path:function)")
    digest = hashlib.sha256(str(path.resolve()).encode() + path.read_bytes()).hexdigest()[:16]
    name = f"bitalloc_user_model_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {path} as a Python module; give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code failed while importing: say where, no traceback
        del sys.modules[name]
        raise ConfigError(f"importing the model factory file {path} failed: {type(exc).__name__}: {exc}") from None
    return module


def import_factory(spec: str, *, trust_code: bool = False, hint: str = TRUST_HINT) -> Callable[..., Any]:
    """The callable named by a factory ``spec`` (module docstring). Modules outside bitalloc (and every file) are
    imported only with ``trust_code=True``; otherwise a :class:`ConfigError` says which option allows it
    (``hint``: "--trust-code" on the command line, "trust_code=True" in Python)."""
    m = _SPEC.match(spec.strip()) if isinstance(spec, str) else None
    if m is None:
        raise ConfigError(f"model factory {spec!r}: give MODULE:FUNCTION (e.g. mypkg.models:build) or "
                          "path/to/file.py:FUNCTION")
    module_name, attr = m.group("module"), m.group("attr")
    is_file = module_name.endswith(".py") or "/" in module_name or os.sep in module_name
    if not trust_code and (is_file or not _is_bitalloc(module_name)):
        raise ConfigError(f"model factory {spec!r} runs code from {module_name} when imported; pass {hint} to "
                          "allow it (only for code you trust)")
    if is_file:
        obj: Any = _import_file(Path(module_name))
    else:
        try:
            obj = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"cannot import module {module_name!r} of model factory {spec!r} ({exc}); install "
                              "it, or name a file: path/to/file.py:FUNCTION") from None
        except Exception as exc:  # the module's own code failed
            raise ConfigError(f"importing module {module_name!r} of model factory {spec!r} failed: "
                              f"{type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model factory {spec!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model factory {spec!r}: {attr} is not callable; name a function or class that returns "
                          "an nn.Module")
    return obj


def build_user_model(spec: str, *, trust_code: bool = False, kwargs: Mapping[str, Any] | None = None,
                     weights: str | os.PathLike | None = None, hint: str = TRUST_HINT) -> nn.Module:
    """Call the factory ``spec`` with ``kwargs``, load ``weights`` (if given) into the result, and return it in
    eval mode. A factory that fails or does not return an ``nn.Module`` is a :class:`ConfigError`."""
    factory = import_factory(spec, trust_code=trust_code, hint=hint)
    try:
        model = factory(**dict(kwargs or {}))
    except Exception as exc:  # the user's factory failed
        raise ConfigError(f"model factory {spec!r} failed with arguments {dict(kwargs or {})}: "
                          f"{type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


_NESTED = ("state_dict", "model_state_dict", "model", "model_state")


def _tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``state_dict`` in a plain ``torch.save`` file (module docstring), read with ``weights_only=True``."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weights file {p} does not exist; check the path")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's many unpickling errors: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"weights file {p} cannot be read as a torch state_dict ({first[:300]}); save it with "
                              "torch.save(model.state_dict(), PATH)") from None
    if not _tensor_dict(obj) and isinstance(obj, Mapping):
        for key in _NESTED:
            if _tensor_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _tensor_dict(obj):
        raise CheckpointError(f"weights file {p} holds {type(obj).__name__}, not a state_dict (a dict of tensors, "
                              f"possibly under one of the keys {', '.join(_NESTED)}); save it with "
                              "torch.save(model.state_dict(), PATH)")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _is_bitalloc_file(path: Path) -> bool:
    """Whether ``path`` ends with bitalloc's checksum trailer (intact or damaged: :mod:`bitalloc.io`)."""
    from bitalloc.io import CHECKSUM_MAGIC, TRAILER_BYTES

    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4 * TRAILER_BYTES))
        return CHECKSUM_MAGIC in f.read()


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the weights file ``path`` (module docstring) into ``model``; returns it in eval mode."""
    from bitalloc.train.checkpoint import load_model_checkpoint, load_state_into

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"weights file {p} does not exist; check the path")
    if p.is_dir():
        raise CheckpointError(f"weights file {p} is a folder; give the file inside it")
    if p.suffix == ".safetensors":
        from bitalloc.models.bert import _read_tensors

        load_state_into(model, _read_tensors(p), path=p)
    elif _is_bitalloc_file(p):
        load_model_checkpoint(p, model=model)
    else:
        load_state_into(model, read_state_dict(p), path=p)
    return model.eval()
