"""The packed model file (``.bapk``): a quantized model as integer codes, Huffman-coded, in one checked file.

A packed file holds everything needed to rebuild a quantized model whose outputs are bit-identical to the
model it came from: the QuantConfig, how to rebuild the float model, the example input shape, every
quantized weight as its integer codes (Huffman-coded, or bit-packed at its per-channel widths when that is
smaller) with the grid (bits, scale, zero point, code range, axis, signedness), the bias-correction terms
and kept-channel mask, and every other ``state_dict`` tensor (biases, float layers, quantizer buffers)
stored raw (losslessly DEFLATE-compressed when that is smaller). The exact byte layout is in
``docs/packfile.md``::

    header   32 bytes: magic b"\\x89BAPK\\r\\n\\x1a", u32 format version, u32 flags (0), u64 manifest length,
             u64 data length (little-endian)
    manifest UTF-8 JSON (format, versions, model, config, example shape, blobs, state, layers, sizes)
    data     the blobs the manifest points to (offset, length relative to the start of the data section)
    trailer  SHA-256 of every byte before it (32 bytes)

**Exactness.** A quantized layer computes with Q(W) = corr_scale * s * (clamp(round(W / s) + z) - z) +
corr_shift. The file stores the codes q = clamp(round(W / s) + z) and the layer's float weight is restored
as W' = s * (q - z) (float32, no correction). Re-quantizing W' gives q back exactly: W' / s = (q - z)(1 + e)
with |e| <= 3 * 2^-24 (three float32 roundings), so the rounding error |q - z| * 3 * 2^-24 < 1/2 for codes
of up to 20 bits, and Q(W') = Q(W) bitwise since both are computed from the same codes, scales and
corrections. :func:`pack_bytes` checks this per layer (codes and the quantizer's output); a layer where it
fails (grids wider than ~20 bits), and a weight tensor shared with another entry of the ``state_dict`` (tied
weights: restoring s * (q - z) would change what the other users read), keeps its float weight raw. Then the
whole model is checked: the file is decoded, loaded into a copy of the model, and every tensor, every quantized
weight and the outputs on example inputs must equal the original's exactly; a model that fails is refused
(:class:`~bitalloc.errors.ConfigError`), never written as a file that unpacks to a different model. The
input's dtype is recorded (``example_dtype``: "int64" for a model that starts with an ``nn.Embedding``), so
unpacking rebuilds a valid example input.

**Writing.** :func:`pack_model` writes a temporary file, verifies it (read back byte for byte; with
``check_inputs``, unpacked and run), and only then renames it over the target (:func:`bitalloc.io.atomic_path`):
a failed verification leaves the previous file untouched.

**Safety.** :func:`read_packfile` verifies magic, version, lengths and the checksum before parsing, then
decodes and checks every tensor (counts, shapes, codes inside their range) before any model is built; any
problem is a :class:`~bitalloc.errors.CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import struct
import sys
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bitalloc.coding import bitpack, huffman
from bitalloc.errors import BitallocError, CheckpointError, ConfigError
from bitalloc.quant.grid import dequantize, reshape_for_axis
from bitalloc.quantizers.base import QuantParams

MAGIC = b"\x89BAPK\r\n\x1a"
FORMAT = "bitalloc-packed-model"
FORMAT_VERSION = 1
SUFFIX = ".bapk"
_HEADER = struct.Struct("<8sIIQQ")
CHECKSUM_BYTES = 32  # SHA-256
CODECS = ("auto", "huffman", "zlib", "canonical", "bitpack")

_DTYPES = {name: getattr(torch, name) for name in
           ("float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool")}
_QPARAM_FIELDS = ("bits", "scale", "zero_point", "qmin", "qmax", "corr_scale", "corr_shift", "kept")


# ---- report --------------------------------------------------------------------------------------------------

@dataclass
class LayerPackStats:
    """Sizes of one quantized weight in the packed file.

    values: number of weights; bits: mean bits/value before coding (per-channel widths averaged);
    entropy: Shannon entropy of the codes (bits/value); huffman_bits: average optimal Huffman codeword length
    (payload only); stored_bits: bits/value actually stored (header and code table included);
    encoding: "huffman", "bitpack" or "float" (exactness fallback); coder: the Huffman coder used.
    """

    name: str
    shape: list[int]
    values: int
    bits: float
    per_channel_bits: bool
    entropy: float
    huffman_bits: float
    stored_bits: float
    stored_bytes: int
    bitpack_bytes: int
    huffman_bytes: int | None
    encoding: str
    coder: str | None
    note: str = ""

    @property
    def entropy_bytes(self) -> float:
        return self.values * self.entropy / 8


@dataclass
class PackReport:
    """Sizes of a packed model (bytes): the file, and what it would be with plain bit-packing / in FP32.

    ``fp32_state_dict_bytes`` is ``torch.save`` of the float model's ``state_dict`` (``fp32_reference`` says
    which model); ``bitpack_file_bytes`` the same packed file with every weight bit-packed instead of
    Huffman-coded; ``metadata_bytes`` everything in the file that is not weight codes (header, manifest,
    scales and other raw tensors, checksum).
    """

    path: str | None
    file_bytes: int
    bitpack_file_bytes: int | None
    fp32_state_dict_bytes: int | None
    fp32_reference: str | None
    codec: str
    layers: list[LayerPackStats] = field(default_factory=list)

    @property
    def weight_values(self) -> int:
        return sum(l.values for l in self.layers)

    @property
    def weight_stored_bytes(self) -> int:
        return sum(l.stored_bytes for l in self.layers)

    @property
    def weight_bitpack_bytes(self) -> int:
        return sum(l.bitpack_bytes for l in self.layers)

    @property
    def metadata_bytes(self) -> int:
        return self.file_bytes - self.weight_stored_bytes

    def totals(self) -> dict[str, Any]:
        n = max(self.weight_values, 1)
        coded = [l for l in self.layers if l.encoding != "float"]
        nq = max(sum(l.values for l in coded), 1)
        return {
            "weight_values": self.weight_values,
            "weight_bits_before": sum(l.bits * l.values for l in coded) / nq,
            "weight_entropy_bits": sum(l.entropy * l.values for l in coded) / nq,
            "weight_huffman_bits": sum(l.huffman_bits * l.values for l in coded) / nq,
            "weight_stored_bits": 8.0 * self.weight_stored_bytes / n,
            "weight_entropy_bytes": sum(l.entropy_bytes for l in coded),
            "weight_bitpack_bytes": self.weight_bitpack_bytes,
            "weight_stored_bytes": self.weight_stored_bytes,
            "metadata_bytes": self.metadata_bytes,
            "file_bytes": self.file_bytes,
            "bitpack_file_bytes": self.bitpack_file_bytes,
            "fp32_state_dict_bytes": self.fp32_state_dict_bytes,
            "ratio_vs_fp32": (self.fp32_state_dict_bytes / self.file_bytes) if self.fp32_state_dict_bytes else None,
            "ratio_vs_bitpack": (self.bitpack_file_bytes / self.file_bytes) if self.bitpack_file_bytes else None,
        }

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "codec": self.codec, "fp32_reference": self.fp32_reference,
                "totals": self.totals(),
                "layers": [{**asdict(l), "entropy_bytes": l.entropy_bytes} for l in self.layers]}


# ---- tensors <-> blobs ---------------------------------------------------------------------------------------

def _check_host() -> None:
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise CheckpointError("packed model files are little-endian; this big-endian host is not supported")


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ConfigError(f"cannot pack tensors of dtype {dtype}; supported: {sorted(_DTYPES)}")
    return name


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _deflate(data: bytes) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    return comp.compress(data) + comp.flush()


def _inflate(data: bytes, size: int) -> bytes:
    d = zlib.decompressobj(-15)
    out = d.decompress(data, size + 1)
    if len(out) != size or not d.eof or d.unused_data:
        raise ValueError(f"compressed tensor inflates to {len(out)} bytes, expected {size}")
    return out


class _Blobs:
    """The data section: byte strings stored once each (identical content shares one blob)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.entries: list[list[int]] = []
        self.index: dict[bytes, int] = {}
        self.size = 0

    def add(self, data: bytes) -> int:
        key = hashlib.sha256(data).digest()
        if key not in self.index:
            self.index[key] = len(self.entries)
            self.entries.append([self.size, len(data)])
            self.chunks.append(data)
            self.size += len(data)
        return self.index[key]

    def put_tensor(self, t: Tensor) -> dict[str, Any]:
        raw = _tensor_bytes(t)
        entry: dict[str, Any] = {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
        if len(raw) > 64:
            packed = _deflate(raw)
            if len(packed) < len(raw):
                entry["compression"] = "deflate"
                raw = packed
        entry["blob"] = self.add(raw)
        return entry


class _Reader:
    """Blob access on a verified file, every failure a ValueError with a precise message."""

    def __init__(self, data: memoryview, entries: list) -> None:
        self.data = data
        if not isinstance(entries, list):
            raise ValueError("manifest 'blobs' is not a list")
        for i, e in enumerate(entries):
            if (not isinstance(e, list) or len(e) != 2 or not all(isinstance(v, int) and v >= 0 for v in e)
                    or e[0] + e[1] > len(data)):
                raise ValueError(f"blob {i} {e!r} lies outside the data section ({len(data)} bytes)")
        self.entries = entries

    def blob(self, i: Any) -> bytes:
        if not isinstance(i, int) or not 0 <= i < len(self.entries):
            raise ValueError(f"blob reference {i!r} does not exist")
        off, n = self.entries[i]
        return bytes(self.data[off:off + n])

    def tensor(self, entry: Any) -> Tensor:
        if not isinstance(entry, dict) or "dtype" not in entry or "shape" not in entry or "blob" not in entry:
            raise ValueError(f"malformed tensor entry {str(entry)[:80]}")
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"unknown dtype {entry['dtype']!r}")
        shape = _shape(entry["shape"])
        numel = int(np.prod(shape)) if shape else 1
        size = numel * torch.empty((), dtype=dtype).element_size()
        raw = self.blob(entry["blob"])
        comp = entry.get("compression")
        if comp == "deflate":
            raw = _inflate(raw, size)
        elif comp is not None:
            raise ValueError(f"unknown compression {comp!r}")
        if len(raw) != size:
            raise ValueError(f"tensor of shape {shape} and dtype {entry['dtype']} needs {size} bytes, blob has {len(raw)}")
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape).clone()


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise ValueError(f"malformed shape {value!r}")
    return tuple(value)


# ---- packing ---------------------------------------------------------------------------------------------------

def _axis_of(p: QuantParams) -> int | None:
    return p.axis if (p.axis is not None and p.scale.ndim in (1, 2)) else None  # per channel, or group-wise rows


def _channel_major(codes: Tensor, axis: int | None) -> Tensor:
    return codes.reshape(-1) if axis is None else codes.movedim(axis % codes.ndim, 0).reshape(-1)


def _from_channel_major(flat: Tensor, shape: tuple[int, ...], axis: int | None) -> Tensor:
    if axis is None:
        return flat.reshape(shape)
    a = axis % len(shape)
    moved = [shape[a]] + [s for i, s in enumerate(shape) if i != a]
    return flat.reshape(moved).movedim(0, a)


def _clear_cache(q: nn.Module) -> None:
    if hasattr(q, "_cache"):
        q._cache = None


@torch.no_grad()
def _quantized_weight(layer: nn.Module, w: Tensor | None = None) -> Tensor:
    """The layer's weight quantizer applied to ``w`` (default: the layer's weight), enabled, without its cache."""
    q = layer.weight_quantizer
    enabled = q.enabled
    q.enabled = True
    try:
        _clear_cache(q)
        return q(layer.layer.weight if w is None else w)
    finally:
        _clear_cache(q)
        q.enabled = enabled


def _restores_exactly(layer: nn.Module, w: Tensor, w_restored: Tensor, codes: Tensor, p: QuantParams) -> bool:
    """Whether the restored float weight re-quantizes to the same codes and the same quantized weight."""
    if not torch.equal(p.quantize(w_restored), codes):
        return False
    a, b = _quantized_weight(layer, w), _quantized_weight(layer, w_restored)
    return bool(a.dtype == b.dtype and torch.equal(a, b))


def _code_entropy(codes: Tensor) -> tuple[float, float]:
    """(entropy, optimal Huffman bits per value) of a tensor's codes; Huffman NaN above 2^16 distinct codes."""
    if codes.numel() == 0:
        return 0.0, 0.0
    flat = codes.reshape(-1)
    lo, hi = int(flat.min()), int(flat.max())
    if hi - lo < huffman.MAX_ALPHABET:
        counts = np.bincount((flat - lo).numpy())
    else:  # wide grids (> 16 bits): histogram by sorting, not by a 2^b-entry table
        counts = torch.unique(flat, return_counts=True)[1].numpy()
    hl = huffman.huffman_average_length(counts) if (counts > 0).sum() <= huffman.MAX_ALPHABET else float("nan")
    return huffman.entropy(counts), hl


def _prepare_record(model: nn.Module) -> dict[str, Any]:
    from bitalloc.model.prepare import prepare_info

    info = prepare_info(model)
    return {"quantized": [r.name for r in info.layers if r.status == "quantized"],
            "float": [r.name for r in info.layers if r.status == "float"],
            "folded": [[d.layer, d.batchnorm] for d in info.folds if d.folded]}


def _model_entry(model_name: str | None, model_spec: dict[str, Any] | None) -> dict[str, Any] | None:
    if model_spec:
        spec = dict(model_spec)
        return {"name": spec.get("name") or model_name, "kwargs": dict(spec.get("kwargs") or {}),
                "factory": spec.get("factory"), "class": spec.get("class")}
    if model_name:
        return {"name": model_name, "kwargs": {}, "factory": None, "class": None}
    return None


def _fp32_bytes(float_model: nn.Module | None, model_entry: dict[str, Any] | None) -> tuple[int | None, str | None]:
    """Size of torch.save(float_model.state_dict()); rebuilt from the model entry (same shapes) if needed."""
    ref = "float model state_dict"
    if float_model is None and model_entry is not None:
        try:
            from bitalloc.train.checkpoint import build_model

            float_model = build_model(model_entry)
            ref = f"state_dict of a freshly built {model_entry.get('name') or model_entry.get('factory')} (same shapes)"
        except Exception:  # noqa: BLE001 - only a size reference; report it as unknown
            return None, None
    if float_model is None:
        return None, None
    buf = io.BytesIO()
    torch.save(float_model.state_dict(), buf)
    return buf.tell(), ref


def _example_shape(qmodel: nn.Module, example_shape: Any) -> list[int]:
    shape = example_shape if example_shape is not None else getattr(qmodel, "bitalloc_example_shape", None)
    if shape is None:
        raise ConfigError("pack_model needs example_shape: the shape of one input without the batch dimension, "
                          "e.g. (3, 224, 224)")
    return [int(s) for s in shape]


def _run(model: nn.Module, x: Tensor) -> Any:
    with torch.no_grad():
        return model(x)


def _device_of(model: nn.Module) -> torch.device:
    t = next(iter(model.parameters()), None)
    return t.device if t is not None else torch.device("cpu")


def _example_dtype(qmodel: nn.Module, example_dtype: Any, shape: list[int]) -> str:
    """The input dtype to record: ``example_dtype``, the model's ``bitalloc_example_dtype``, else whichever of
    float32 and int64 (token ids: a model that starts with an ``nn.Embedding``) the float model runs on (the
    quantizers disabled, as unpacking's ``prepare`` runs it)."""
    from bitalloc.model.layers import float_mode
    from bitalloc.model.serialize import example_dtype_name, example_input

    if example_dtype is not None or getattr(qmodel, "bitalloc_example_dtype", None) is not None:
        return example_dtype_name(qmodel, example_dtype)
    failures = []
    for name in ("float32", "int64"):
        try:
            with float_mode(qmodel):
                _run(qmodel, example_input(shape, name).to(_device_of(qmodel)))
            return name
        except Exception as exc:  # noqa: BLE001 - the model's own error, reported below
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
    raise ConfigError(f"the model runs on neither float32 nor int64 zeros of shape {[1, *shape]} "
                      f"({'; '.join(failures)}); pass example_shape=... (one input without the batch dimension) "
                      "and example_dtype=...")


def _shared_keys(state: dict[str, Tensor]) -> dict[str, list[str]]:
    """For each ``state_dict`` key whose tensor overlaps another key's memory (tied weights), the other keys."""
    spans: dict[int, list[tuple[int, int, str]]] = {}
    for k, t in state.items():
        if not isinstance(t, Tensor) or t.numel() == 0:
            continue
        size = t.element_size()
        start = t.storage_offset() * size
        end = start + (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * size
        spans.setdefault(t.untyped_storage().data_ptr(), []).append((start, end, k))
    out: dict[str, list[str]] = {}
    for group in spans.values():
        for a0, a1, ka in group:
            others = [kb for b0, b1, kb in group if kb != ka and a0 < b1 and b0 < a1]
            if others:
                out[ka] = others
    return out


def _same_output(a: Any, b: Any) -> bool:
    """Whether two model outputs (tensors, or tuples / lists / dicts of them) are equal bit for bit."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_output(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_output(a[k], b[k]) for k in a)
    return bool(a == b)


def _round_trip_inputs(qmodel: nn.Module, shape: list[int], dtype_name: str) -> Tensor:
    """Two example inputs for the round-trip check: seeded normal values (zeros for integer inputs)."""
    from bitalloc.model.serialize import example_input

    x = example_input(shape, dtype_name).expand(2, *shape).clone()
    if x.is_floating_point():
        x = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    return x.to(_device_of(qmodel))


@torch.no_grad()
def _check_round_trip(qmodel: nn.Module, raw: bytes, dtype_name: str) -> None:
    """Decode ``raw`` (packed bytes of ``qmodel``), load it into a copy of ``qmodel`` and require every tensor,
    every quantized weight and the outputs on example inputs to equal the original's exactly."""
    from bitalloc.model.layers import quant_layers

    where = Path("<packed bytes>")
    packed = _decode(*_verified(where, raw))
    coded = {e["weight_key"] for e in packed.manifest["layers"] if e["encoding"] != "float"}
    twin = copy.deepcopy(qmodel)
    twin.load_state_dict(packed.state_dict, strict=True)
    ref, got = qmodel.state_dict(), twin.state_dict()
    bad = [k for k in ref if k not in coded and not (ref[k].dtype == got[k].dtype and torch.equal(ref[k], got[k]))]
    for (name, a), (_, b) in zip(quant_layers(qmodel), quant_layers(twin)):
        if a.weight_quantizer is not None and not torch.equal(_quantized_weight(a), _quantized_weight(b)):
            bad.append(f"{name} (quantized weight)")
    if not bad:
        x = _round_trip_inputs(qmodel, packed.manifest["example_shape"], dtype_name)
        try:
            same = _same_output(_run(qmodel, x), _run(twin, x))
        except Exception as exc:  # noqa: BLE001 - the model does not run on its own example input
            raise ConfigError(f"the model does not run on an input of shape {list(x.shape)} and dtype {x.dtype} "
                              f"({type(exc).__name__}: {exc}); pass the right example_shape / example_dtype") from None
        if not same:
            bad.append("the model's outputs")
    if bad:
        raise ConfigError(f"this model cannot be packed exactly: after unpacking, {', '.join(bad[:4])}"
                          f"{' and others' if len(bad) > 4 else ''} would differ from the quantized model's (a "
                          "tensor the packed state does not restore, or a layer that reads its float weight "
                          "directly); save it with bitalloc.model.serialize.save_quantized (quantized.pt) instead")


def pack_bytes(qmodel: nn.Module, *, model_name: str | None = None, model_spec: dict[str, Any] | None = None,
               example_shape: Any = None, codec: str = "auto", extra: dict[str, Any] | None = None,
               example_dtype: Any = None, check: bool = True) -> tuple[bytes, list[LayerPackStats]]:
    """Serialize a prepared, calibrated model into packed-file bytes (see the module docstring).

    ``codec``: "auto" (per tensor, the smaller of the Huffman stream (:func:`huffman.encode`, coder "auto")
    and plain bit-packing), "huffman" (always Huffman, coder "auto"), "zlib", "canonical" (Huffman with that
    coder) or "bitpack" (plain bit-packing only). Codes wider than 16 bits are always bit-packed.
    ``example_dtype``: the input's dtype (default: ``qmodel.bitalloc_example_dtype``, else float32 or int64,
    whichever the model runs on). ``check``: decode the bytes and require the exact round trip (module
    docstring; :class:`ConfigError` if it fails).
    Returns (bytes, per-layer statistics).
    """
    from bitalloc import __version__
    from bitalloc.model.layers import quant_layers
    from bitalloc.model.prepare import prepare_info

    _check_host()
    if codec not in CODECS:
        raise ConfigError(f"unknown codec {codec!r}; choose one of {CODECS}")
    info = prepare_info(qmodel)
    shape = _example_shape(qmodel, example_shape)
    dtype_name = _example_dtype(qmodel, example_dtype, shape)
    state_dict = qmodel.state_dict()
    shared = _shared_keys(state_dict)
    blobs = _Blobs()
    layers: list[dict[str, Any]] = []
    stats: list[LayerPackStats] = []
    weight_layer: dict[str, int] = {}
    for name, layer in quant_layers(qmodel):
        wq = layer.weight_quantizer
        if wq is None:
            continue
        if not wq.is_ready:
            raise ConfigError(f"layer {name}: the weight quantizer is not calibrated; calibrate the model first")
        w = layer.layer.weight.detach()
        p = wq.qparams().detach()
        axis = _axis_of(p)
        codes = p.quantize(w)
        restored = dequantize(codes, p.scale, p.zero_point, axis).to(w.dtype)
        key = f"{name}.layer.weight"
        per_channel = p.bits.ndim == 1 and axis is not None
        bits_mean = float(p.bits.to(torch.float64).mean())
        entry: dict[str, Any] = {"name": name, "weight_key": key, "type": type(layer.layer).__name__,
                                 "shape": list(w.shape), "dtype": _dtype_name(w.dtype), "axis": axis,
                                 "signed": bool(p.signed), "online": bool(p.online),
                                 "qparams": {f: (None if getattr(p, f) is None else blobs.put_tensor(getattr(p, f)))
                                             for f in _QPARAM_FIELDS}}
        ent, hl = _code_entropy(codes)
        keep_float = None
        if key in shared:
            keep_float = f"weight shared with {', '.join(shared[key])}: float weight kept (exact for every user)"
        elif not _restores_exactly(layer, w, restored, codes, p):
            keep_float = "grid too wide to restore exactly from codes: float weight kept"
        if keep_float:
            entry["encoding"] = "float"
            entry["weight"] = blobs.put_tensor(w)
            raw = blobs.entries[entry["weight"]["blob"]][1]
            stats.append(LayerPackStats(name, list(w.shape), w.numel(), bits_mean, per_channel, ent, hl,
                                        8.0 * raw / max(w.numel(), 1), raw, bitpack.packed_size(tuple(w.shape), p.bits, axis),
                                        None, "float", None, keep_float))
        else:
            packed = bitpack.pack_codes(codes, p.qmin, p.bits, axis)
            stream = None
            alphabet = int(codes.max() - codes.min()) + 1 if codes.numel() else 1
            if codec != "bitpack" and alphabet <= huffman.MAX_ALPHABET:
                coder = "auto" if codec in ("auto", "huffman") else codec
                stream = huffman.encode(_channel_major(codes, axis).numpy(), coder=coder)
            use_huffman = stream is not None and (codec != "auto" or len(stream) < len(packed))
            data = stream if use_huffman else packed
            entry["encoding"] = "huffman" if use_huffman else "bitpack"
            entry["codes"] = {"blob": blobs.add(data), "count": int(codes.numel()), "order": "channel-major"}
            note = "" if use_huffman or stream is None else "bit-packing is smaller"
            if stream is None and codec != "bitpack":
                note = "codes wider than 16 bits: bit-packed"
            stats.append(LayerPackStats(name, list(w.shape), w.numel(), bits_mean, per_channel, ent, hl,
                                        8.0 * len(data) / max(w.numel(), 1), len(data), len(packed),
                                        None if stream is None else len(stream), entry["encoding"],
                                        huffman.KIND_NAMES[stream[0]] if use_huffman else None, note))
            weight_layer[key] = len(layers)
        entry["stats"] = {k: v for k, v in asdict(stats[-1]).items() if k not in ("name", "shape")}
        layers.append(entry)
    state = []
    for key, t in state_dict.items():
        if key in weight_layer:
            state.append({"key": key, "layer": weight_layer[key]})
        else:
            state.append({"key": key, **blobs.put_tensor(t)})
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "bitalloc_version": __version__,
        "torch_version": str(torch.__version__), "byteorder": "little",
        "model": _model_entry(model_name, model_spec), "example_shape": shape, "example_dtype": dtype_name,
        "config": info.config.to_dict(), "prepare": _prepare_record(qmodel), "codec": codec,
        "layers": layers, "state": state, "blobs": blobs.entries, "extra": extra or {},
    }
    from bitalloc.io import to_jsonable

    text = json.dumps(to_jsonable(manifest), separators=(",", ":"), allow_nan=False).encode("utf-8")
    body = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(text), blobs.size) + text + b"".join(blobs.chunks)
    raw = body + hashlib.sha256(body).digest()
    if check:
        _check_round_trip(qmodel, raw, dtype_name)
    return raw, stats


def pack_model(qmodel: nn.Module, path: str | os.PathLike, *, model_name: str | None = None,
               model_spec: dict[str, Any] | None = None, example_shape: Any = None, codec: str = "auto",
               float_model: nn.Module | None = None, overwrite: bool = False, compare_bitpack: bool = True,
               check_inputs: Tensor | None = None, extra: dict[str, Any] | None = None,
               example_dtype: Any = None) -> PackReport:
    """Write a prepared, calibrated model to a packed file (atomically, verified first) and report its sizes.

    Args:
        qmodel: the quantized model (``bitalloc.quantize`` / ``prepare`` + calibration, or ``load_quantized``).
        path: output file (``.bapk`` by convention); an existing file is an error unless ``overwrite``.
        model_name / model_spec: how to rebuild the float model at unpack time: a zoo name, or a training
            checkpoint's ``model`` entry (``{"name", "kwargs", "factory"}``). Without either, the caller of
            :func:`unpack_model` must pass the float model.
        example_shape: shape of one input without the batch dimension (default: ``qmodel.bitalloc_example_shape``).
        example_dtype: the input's dtype (see :func:`pack_bytes`; ``torch.int64`` for token ids).
        codec: see :func:`pack_bytes`.
        float_model: the float model, for the FP32 ``state_dict`` size (default: rebuilt from the model entry).
        compare_bitpack: also build the bit-packed variant in memory, for ``bitpack_file_bytes``.
        check_inputs: if given, the new file is also unpacked and run on these inputs, and its outputs must be
            bit-identical to ``qmodel``'s.

    A model that cannot round-trip exactly is refused before anything is written (:class:`ConfigError`, see
    :func:`pack_bytes`). The bytes go to a temporary file that is read back and (with ``check_inputs``)
    unpacked and compared *before* it is renamed over ``path``: when a check fails, ``path`` keeps its
    previous content (or stays absent) and a :class:`BitallocError` says so.
    """
    from bitalloc.io import write_bytes

    if check_inputs is not None and float_model is None and _model_entry(model_name, model_spec) is None:
        raise ConfigError("check_inputs needs the float model to rebuild from: pass float_model=..., model_name=... "
                          "or model_spec=...")
    if not overwrite and Path(path).exists():
        raise CheckpointError(f"{path} already exists; remove it or choose another output path (pass "
                              "overwrite=True / --overwrite to replace it)")
    shape = _example_shape(qmodel, example_shape)
    dtype_name = _example_dtype(qmodel, example_dtype, shape)
    args = dict(model_name=model_name, model_spec=model_spec, example_shape=shape, example_dtype=dtype_name,
                extra=extra)
    data, stats = pack_bytes(qmodel, codec=codec, **args)
    bp_size = None
    if compare_bitpack:
        bp_size = len(data) if codec == "bitpack" else len(pack_bytes(qmodel, codec="bitpack", check=False, **args)[0])

    def verify(tmp: Path) -> None:
        if check_inputs is None:
            return
        try:
            restored = unpack_model(tmp, model=float_model)
            with torch.no_grad():
                same = _same_output(qmodel(check_inputs), restored(check_inputs))
        except BitallocError as exc:
            raise BitallocError(f"the new packed file for {path} does not unpack ({exc}); {path} was left as it "
                                "was") from None
        if not same:
            raise BitallocError(f"internal error: the model unpacked from the new file for {path} does not "
                                f"reproduce the quantized model's outputs bit for bit; {path} was left as it was; "
                                "please report this")

    try:
        write_bytes(path, data, overwrite=overwrite, verify=verify)
    except FileExistsError as exc:
        raise CheckpointError(f"{exc} (pass overwrite=True / --overwrite to replace it)") from None
    fp32, ref = _fp32_bytes(float_model, _model_entry(model_name, model_spec))
    return PackReport(str(path), len(data), bp_size, fp32, ref, codec, stats)


# ---- reading ---------------------------------------------------------------------------------------------------

@dataclass
class PackedModel:
    """A verified, fully decoded packed file: the manifest, the ``state_dict`` to load, and per quantized layer
    its integer codes and :class:`QuantParams` (for integer execution and export)."""

    path: Path
    manifest: dict[str, Any]
    state_dict: dict[str, Tensor]
    codes: dict[str, Tensor]
    qparams: dict[str, QuantParams]
    file_bytes: int


def _fail(p: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{p}: {problem}; the packed model file is unusable: re-create it with `bitalloc pack`")


def read_verified(path: str | os.PathLike) -> tuple[Path, dict[str, Any], memoryview, int]:
    """Read a packed file and check magic, version, lengths and checksum; parse the manifest.

    Returns (path, manifest, data section, file size). Raises :class:`CheckpointError` on any problem."""
    _check_host()
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such packed model file")
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory, not a packed model file")
    return _verified(p, p.read_bytes())


def _verified(p: Path, raw: bytes) -> tuple[Path, dict[str, Any], memoryview, int]:
    """:func:`read_verified` on the bytes ``raw`` of file ``p``."""
    minimum = _HEADER.size + CHECKSUM_BYTES
    if len(raw) < minimum:
        raise _fail(p, f"truncated ({len(raw)} bytes; even an empty packed model has at least {minimum})")
    magic, version, flags, mlen, dlen = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise CheckpointError(f"{p} is not a bitalloc packed model (bad magic bytes {magic!r}); give a file written "
                              "by `bitalloc pack`")
    if version < 1:  # versions start at 1: no bitalloc wrote this header
        raise _fail(p, f"packed-format version {version} does not exist (versions start at 1)")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{p} has packed-format version {version}; this bitalloc reads version "
                              f"{FORMAT_VERSION}: upgrade bitalloc")
    if flags != 0:
        raise _fail(p, f"unknown header flags {flags:#x}")
    expected = _HEADER.size + mlen + dlen + CHECKSUM_BYTES
    if len(raw) < expected:
        raise _fail(p, f"truncated: {len(raw)} bytes, the header announces {expected}")
    if len(raw) > expected:
        raise _fail(p, f"{len(raw) - expected} unexpected bytes after the end of the packed model")
    body = memoryview(raw)[:expected - CHECKSUM_BYTES]
    if hashlib.sha256(body).digest() != raw[expected - CHECKSUM_BYTES:]:
        raise _fail(p, "checksum mismatch (SHA-256): the file is corrupt")
    try:
        manifest = json.loads(bytes(body[_HEADER.size:_HEADER.size + mlen]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(p, f"manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(p, "manifest does not describe a bitalloc packed model")
    if manifest.get("format_version") != version:
        raise _fail(p, "manifest and header disagree on the format version")
    return p, manifest, body[_HEADER.size + mlen:], len(raw)


def _decode_layer(reader: _Reader, entry: dict[str, Any]) -> tuple[Tensor, Tensor | None, QuantParams]:
    """(restored float weight, codes or None, QuantParams) of one layer entry."""
    shape = _shape(entry.get("shape"))
    dtype = _DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise ValueError(f"unknown weight dtype {entry.get('dtype')!r}")
    qp = entry.get("qparams")
    if not isinstance(qp, dict) or any(qp.get(f) is None for f in ("bits", "scale", "zero_point", "qmin", "qmax")):
        raise ValueError("missing quantization parameters")
    t = {f: (None if qp.get(f) is None else reader.tensor(qp[f])) for f in _QPARAM_FIELDS}
    axis = entry.get("axis")
    if axis is not None and (not isinstance(axis, int) or not -len(shape) <= axis < len(shape)):
        raise ValueError(f"axis {axis!r} out of range for shape {shape}")
    channels = shape[axis] if axis is not None else None
    for f in ("bits", "scale", "zero_point", "qmin", "qmax"):
        grouped = (f in ("scale", "zero_point") and t[f].ndim == 2 and len(shape) == 2 and axis is not None
                   and axis % 2 == 0 and t[f].shape[0] == channels and t[f].shape[1] > 0
                   and shape[1] % t[f].shape[1] == 0)  # group-wise: [C, G] blocks of a [C, K] weight
        if not grouped and (t[f].ndim > 1 or (t[f].ndim == 1 and (channels is None or t[f].numel() != channels))):
            raise ValueError(f"{f} has shape {tuple(t[f].shape)}, which does not fit weight shape {shape}")
    if (t["scale"].ndim == 2) != (t["zero_point"].ndim == 2):
        raise ValueError("scale and zero point disagree on group-wise blocks")
    params = QuantParams(bits=t["bits"], scale=t["scale"], zero_point=t["zero_point"], qmin=t["qmin"],
                         qmax=t["qmax"], axis=axis, signed=bool(entry.get("signed")), corr_scale=t["corr_scale"],
                         corr_shift=t["corr_shift"], kept=t["kept"], online=bool(entry.get("online")))
    enc = entry.get("encoding")
    if enc == "float":
        w = reader.tensor(entry.get("weight"))
        if tuple(w.shape) != shape:
            raise ValueError(f"stored weight has shape {tuple(w.shape)}, expected {shape}")
        return w, None, params
    c = entry.get("codes")
    if not isinstance(c, dict):
        raise ValueError("missing codes entry")
    numel = int(np.prod(shape)) if shape else 1
    if c.get("count") != numel:
        raise ValueError(f"codes entry holds {c.get('count')} values, weight shape {shape} needs {numel}")
    data = reader.blob(c.get("blob"))
    if enc == "huffman":
        codes = _from_channel_major(torch.from_numpy(huffman.decode(data, expected_count=numel)), shape, axis)
    elif enc == "bitpack":
        codes = bitpack.unpack_codes(data, shape, params.qmin, params.bits, axis)
    else:
        raise ValueError(f"unknown weight encoding {enc!r}")
    lo = reshape_for_axis(params.qmin, codes.ndim, axis)
    hi = reshape_for_axis(params.qmax, codes.ndim, axis)
    if codes.numel() and not bool(((codes >= lo) & (codes <= hi)).all()):
        raise ValueError("decoded codes fall outside their channel's code range")
    w = dequantize(codes, params.scale, params.zero_point, axis).to(dtype)
    return w, codes, params


def read_packfile(path: str | os.PathLike) -> PackedModel:
    """Verify and decode a packed file completely (no model is built). Raises :class:`CheckpointError`."""
    return _decode(*read_verified(path))


def _decode(p: Path, manifest: dict[str, Any], data: memoryview, size: int) -> PackedModel:
    """Decode every tensor of a verified file (:func:`read_packfile`)."""
    try:
        reader = _Reader(data, manifest.get("blobs"))
        layers = manifest.get("layers")
        state_entries = manifest.get("state")
        if not isinstance(layers, list) or not isinstance(state_entries, list):
            raise ValueError("manifest lacks its 'layers' or 'state' list")
        decoded: list[tuple[Tensor, Tensor | None, QuantParams]] = []
        codes: dict[str, Tensor] = {}
        qparams: dict[str, QuantParams] = {}
        for entry in layers:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ValueError("malformed layer entry")
            try:
                decoded.append(_decode_layer(reader, entry))
            except (ValueError, huffman.CodingError, RuntimeError) as exc:
                raise ValueError(f"layer {entry['name']}: {exc}") from None
            if decoded[-1][1] is not None:
                codes[entry["name"]] = decoded[-1][1]
            qparams[entry["name"]] = decoded[-1][2]
        state: dict[str, Tensor] = {}
        for e in state_entries:
            if not isinstance(e, dict) or not isinstance(e.get("key"), str):
                raise ValueError("malformed state entry")
            if "layer" in e:
                i = e["layer"]
                if not isinstance(i, int) or not 0 <= i < len(decoded) or layers[i].get("weight_key") != e["key"]:
                    raise ValueError(f"state entry {e['key']} points to a missing layer")
                state[e["key"]] = decoded[i][0]
            else:
                state[e["key"]] = reader.tensor(e)
        for k in ("example_shape", "config"):
            if k not in manifest:
                raise ValueError(f"manifest lacks {k!r}")
        _shape(manifest["example_shape"])
        if manifest.get("example_dtype", "float32") not in _DTYPES:
            raise ValueError(f"unknown example_dtype {manifest.get('example_dtype')!r}")
    except (ValueError, huffman.CodingError, RuntimeError, TypeError, KeyError) as exc:
        raise _fail(p, str(exc)) from None
    return PackedModel(p, manifest, state, codes, qparams, size)


def _build_float_model(entry: Any, p: Path, trust_factory: bool) -> nn.Module:
    if not isinstance(entry, dict) or not (entry.get("name") or entry.get("factory")):
        raise CheckpointError(f"{p} does not say how to rebuild its float model; pass it: "
                              "unpack_model(path, model=...) (or pack with model_name=...)")
    from bitalloc.train.checkpoint import build_model

    try:
        return build_model(entry, path=p, trust_factory=trust_factory)
    except CheckpointError:
        raise
    except BitallocError as exc:
        raise CheckpointError(f"{p}: cannot rebuild the float model {entry.get('name')!r} ({exc}); pass "
                              "model=...") from None


def unpack_model(path: str | os.PathLike, model: nn.Module | None = None, *, trust_factory: bool = False) -> nn.Module:
    """Rebuild the quantized model stored in a packed file; its outputs equal the packed model's bit for bit.

    ``model``: the float model to prepare (not modified; default: rebuilt from the file's model entry with
    fresh weights, since every weight comes from the file). The file is verified and fully decoded before
    any model is built; on any error (:class:`CheckpointError`) nothing is returned.
    """
    from bitalloc.config import QuantConfig
    from bitalloc.model.prepare import prepare
    from bitalloc.model.serialize import example_input
    from bitalloc.train.checkpoint import load_state_into

    packed = read_packfile(path)
    p, m = packed.path, packed.manifest
    try:
        cfg = QuantConfig.from_dict(m["config"])
    except (BitallocError, TypeError, ValueError) as exc:
        raise _fail(p, f"stored configuration is invalid ({exc})") from None
    if model is None:
        model = _build_float_model(m.get("model"), p, trust_factory)
    dtype_name = m.get("example_dtype", "float32")  # files written before it was recorded: float inputs
    example = example_input(m["example_shape"], dtype_name)
    try:
        q = prepare(model, cfg, example)
    except BitallocError as exc:
        raise CheckpointError(f"{p}: the float model cannot be prepared with the stored configuration ({exc}); "
                              "pass the float model the file was packed from") from None
    record = _prepare_record(q)
    stored = m.get("prepare") or {}
    for k in ("quantized", "float", "folded"):
        if k in stored and record[k] != stored[k]:
            raise CheckpointError(f"{p}: the rebuilt model's {k} layers {record[k]} differ from the packed model's "
                                  f"{stored[k]}; pass the float model the file was packed from")
    load_state_into(q, packed.state_dict, path=p)
    q.eval()
    q.bitalloc_example_shape = tuple(m["example_shape"])
    q.bitalloc_example_dtype = dtype_name
    q.bitalloc_packfile = {"path": str(p), "format_version": m["format_version"], "file_bytes": packed.file_bytes,
                           "model": m.get("model"), "extra": m.get("extra", {})}
    return q


def packfile_summary(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a verified file, without tensors: model, config, versions, per-layer sizes."""
    packed = read_packfile(path)
    m = packed.manifest
    return {"path": str(packed.path), "file_bytes": packed.file_bytes, "format_version": m["format_version"],
            "bitalloc_version": m.get("bitalloc_version"), "torch_version": m.get("torch_version"),
            "model": m.get("model"), "example_shape": m["example_shape"],
            "example_dtype": m.get("example_dtype", "float32"), "codec": m.get("codec"),
            "config": m["config"], "prepare": m.get("prepare"), "extra": m.get("extra", {}),
            "layers": [{"name": l["name"], "type": l.get("type"), "shape": l.get("shape"),
                        "encoding": l.get("encoding"), **(l.get("stats") or {})} for l in m["layers"]]}


__all__ = ["CODECS", "FORMAT", "FORMAT_VERSION", "MAGIC", "SUFFIX", "LayerPackStats", "PackReport", "PackedModel",
           "pack_bytes", "pack_model", "packfile_summary", "read_packfile", "read_verified", "unpack_model"]
