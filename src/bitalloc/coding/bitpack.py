"""Plain bit-packing: each integer stored in exactly b bits, b fixed per row (per channel), no entropy coding.

This is the size a quantized tensor has "before coding": sum over channels of b_c * (values in channel c)
bits, rounded up to whole bytes once per tensor. Rows (channels) are concatenated in order, each value
least-significant bit first, bytes filled from their least-significant bit (``np.packbits(bitorder=
"little")``): value v_j of width b occupies stream bits [o_j, o_j + b) with bit k of v_j at o_j + k.

Codes of a quantized tensor are stored as offsets q - qmin_c >= 0 of their channel's code range (so signed
and unsigned grids pack the same way); the channel axis is moved first (weights: axis 0, already first).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from bitalloc.errors import ShapeError

#: values per chunk when expanding to bits (bounds temporary memory to ~ chunk * width * 9 bytes)
_CHUNK = 1 << 20


def _runs(widths: np.ndarray) -> list[tuple[int, int, int]]:
    """(first row, end row, width) of maximal runs of equal widths."""
    if widths.size == 0:
        return []
    cut = np.flatnonzero(np.diff(widths)) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [widths.size]])
    return [(int(a), int(b), int(widths[a])) for a, b in zip(starts, ends)]


def packed_bits(row_widths: Any, row_length: int) -> int:
    """Total bits of rows of ``row_length`` values packed at ``row_widths`` bits each."""
    w = np.asarray(row_widths, dtype=np.int64).reshape(-1)
    return int(w.sum()) * int(row_length)


def pack_rows(values: np.ndarray, row_widths: Any) -> bytes:
    """Pack a [R, M] array of non-negative integers, row r at ``row_widths[r]`` bits per value (0..64)."""
    v = np.asarray(values)
    if v.ndim != 2:
        raise ShapeError(f"pack_rows needs a 2-d array of rows, got shape {v.shape}")
    w = np.asarray(row_widths, dtype=np.int64).reshape(-1)
    if w.size == 1 and v.shape[0] != 1:
        w = np.full(v.shape[0], int(w[0]), dtype=np.int64)
    if w.size != v.shape[0]:
        raise ShapeError(f"{w.size} bit widths for {v.shape[0]} rows")
    if w.size and (int(w.min()) < 0 or int(w.max()) > 64):
        raise ValueError("bit widths must lie in 0..64")
    v = v.astype(np.uint64, copy=False) if v.dtype.kind == "u" else v.astype(np.int64, copy=False)
    if v.size and v.dtype.kind == "i" and int(v.min()) < 0:
        raise ValueError("bit-packing needs non-negative values (shift codes by qmin first)")
    v = v.astype(np.uint64, copy=False)
    pieces: list[np.ndarray] = []
    for a, b, width in _runs(np.ascontiguousarray(w)):
        if width == 0:
            if v[a:b].size and int(v[a:b].max()) != 0:
                raise ValueError("non-zero value in a 0-bit row")
            continue
        flat = v[a:b].reshape(-1)
        if width < 64 and flat.size and int(flat.max()) >> width:
            raise ValueError(f"value {int(flat.max())} does not fit in {width} bits")
        shifts = np.arange(width, dtype=np.uint64)
        for c in range(0, flat.size, _CHUNK):
            part = flat[c:c + _CHUNK]
            pieces.append(((part[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(-1))
    if not pieces:
        return b""
    return np.packbits(np.concatenate(pieces), bitorder="little").tobytes()


def unpack_rows(data: bytes | bytearray | memoryview, row_widths: Any, row_length: int) -> np.ndarray:
    """Inverse of :func:`pack_rows`: a [R, row_length] int64 array (R = len(row_widths))."""
    w = np.asarray(row_widths, dtype=np.int64).reshape(-1)
    total = packed_bits(w, row_length)
    raw = np.frombuffer(bytes(data), dtype=np.uint8)
    if raw.size != (total + 7) // 8:
        raise ValueError(f"bit-packed data has {raw.size} bytes, expected {(total + 7) // 8}")
    bits = np.unpackbits(raw, bitorder="little")
    out = np.zeros((w.size, row_length), dtype=np.int64)
    pos = 0
    for a, b, width in _runs(w):
        if width == 0:
            continue
        count = (b - a) * row_length
        weights = (np.uint64(1) << np.arange(width, dtype=np.uint64))
        vals = np.empty(count, dtype=np.uint64)
        for c in range(0, count, _CHUNK):
            m = min(_CHUNK, count - c)
            seg = bits[pos + c * width: pos + (c + m) * width].reshape(m, width).astype(np.uint64)
            vals[c:c + m] = (seg * weights).sum(axis=1, dtype=np.uint64)
        out[a:b] = vals.reshape(b - a, row_length).astype(np.int64)
        pos += count * width
    return out


def pack_bits(values: Any, width: int) -> bytes:
    """Pack a flat array of non-negative integers at ``width`` bits each."""
    v = np.asarray(values).reshape(1, -1)
    return pack_rows(v, [width])


def unpack_bits(data: bytes | bytearray | memoryview, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` int64 values."""
    return unpack_rows(data, [width], count).reshape(-1)


# ---- quantized tensors -----------------------------------------------------------------------------------------

def _channel_rows(codes: Tensor, axis: int | None, per_channel: bool) -> Tensor:
    if not per_channel:
        return codes.reshape(1, -1)
    a = axis % codes.ndim
    return codes.movedim(a, 0).reshape(codes.shape[a], -1)


def pack_codes(codes: Tensor, qmin: Tensor, bits: Tensor, axis: int | None) -> bytes:
    """Bit-pack integer codes of a tensor: channel c (along ``axis``) at ``bits[c]`` bits, as q - qmin[c].

    ``qmin`` / ``bits`` are 0-d (per tensor) or [C] (per channel)."""
    per_channel = bits.ndim == 1 and axis is not None
    rows = _channel_rows(codes.to(torch.int64), axis, per_channel)
    lo = qmin.reshape(-1, 1) if per_channel else qmin.reshape(1, 1)
    return pack_rows((rows - lo).cpu().numpy(), bits.reshape(-1).cpu().numpy())


def unpack_codes(data: bytes | bytearray | memoryview, shape: tuple[int, ...], qmin: Tensor, bits: Tensor,
                 axis: int | None) -> Tensor:
    """Inverse of :func:`pack_codes`: an int64 tensor of ``shape``."""
    per_channel = bits.ndim == 1 and axis is not None
    shape = tuple(int(s) for s in shape)
    numel = int(np.prod(shape)) if shape else 1
    if per_channel:
        a = axis % len(shape)
        rows, length = shape[a], numel // max(shape[a], 1)
    else:
        rows, length = 1, numel
    w = bits.reshape(-1).cpu().numpy()
    if w.size != rows:
        raise ShapeError(f"{w.size} bit widths for {rows} channels")
    vals = torch.from_numpy(unpack_rows(data, w, length))
    lo = qmin.reshape(-1, 1) if per_channel else qmin.reshape(1, 1)
    vals = vals + lo.to(torch.int64)
    if not per_channel:
        return vals.reshape(shape)
    moved = [shape[a]] + [s for i, s in enumerate(shape) if i != a]
    return vals.reshape(moved).movedim(0, a)


def packed_size(shape: tuple[int, ...], bits: Tensor, axis: int | None) -> int:
    """Bytes of :func:`pack_codes` output for a tensor of ``shape``."""
    numel = int(np.prod(shape)) if len(shape) else 1
    per_channel = bits.ndim == 1 and axis is not None
    if per_channel:
        c = int(shape[axis % len(shape)])
        return (int(bits.to(torch.int64).sum()) * (numel // max(c, 1)) + 7) // 8
    return (int(bits) * numel + 7) // 8


def code_offsets(codes: Tensor, qmin: Tensor, axis: int | None) -> Tensor:
    """q - qmin_c (the non-negative values bit-packing stores), same shape as ``codes``."""
    from bitalloc.quant.grid import reshape_for_axis

    return codes.to(torch.int64) - reshape_for_axis(qmin.to(torch.int64), codes.ndim, axis)


__all__ = ["pack_bits", "unpack_bits", "pack_rows", "unpack_rows", "packed_bits", "pack_codes", "unpack_codes",
           "packed_size", "code_offsets"]
