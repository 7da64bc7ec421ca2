"""The ``.bav`` bitstream: a versioned container of entropy-coded frames (documented in docs/bitstream.md).

Layout (all integers little-endian)::

    header   magic "BAVC" | version u16 | flags u16 | model id 8 bytes | quality u8 | reserved u8 |
             width u16 | height u16 | frame count u32 | fps numerator u32 | fps denominator u32 |
             intra period i32 | CRC-32 of the preceding 38 bytes u32                       (42 bytes)
    frame    type u8 (0 = I, 1 = P) | quality level u8 | ROI bits u16 | non-ROI bits u16 |
             payload length (LEB128 varint) | payload | CRC-32 of the record's preceding bytes u32
                                                                                      (10 + varint + payload)

(Versions 1 and 2 had no level byte in the frame record: every frame was at the header's quality level.)

The payload is one range-coded stream (``constriction``'s queue coder, 32-bit words) holding, in decoding order,
every latent of the frame (I: hyper-latent z then latent y; P: motion z, motion y, residual z, residual y). The
frame's quality level selects the gains of its coders (the encoder may code a frame at another level than the
header's, e.g. P frames below their I frames: :class:`bitalloc.codec.VideoCoder`'s ``p_level_offsets``); the
two 16-bit side-information fields carry the frame's bit widths for its region of interest and for the rest
(the SPEC's "two 16-bit integers, bypass-coded"); a codec of fixed precision writes its precision in both.

Every record is checked before anything is decoded from it: a truncated file or a corrupted byte is a
:class:`BitstreamError` naming the frame and the problem, never garbage frames. The model id (first 8 bytes of the
SHA-256 of the decoder's parameters) makes a stream from another model an error too. The rate of a stream is
its file size: headers, side information and checksums included.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from dataclasses import dataclass, field
from fractions import Fraction

from bitalloc.errors import DataError

MAGIC = b"BAVC"
VERSION = 4
#: versions this bitalloc reads: 1 coded the ROI mask of every frame of a dynamic-precision stream on its own, 2
#: codes a P frame's in the context of the previous frame's mask (bitalloc.codec.dynamic.encode_mask), 3 adds each
#: frame's quality level to its record, 4 codes a frame's ROI mask only when its two widths differ
#: (bitalloc.codec.dynamic.mask_in_stream)
READABLE_VERSIONS = (1, 2, 3, 4)
#: the first version whose frame records carry the frame's quality level
LEVEL_VERSION = 3
#: the first version whose frames carry their ROI mask only when their ROI and non-ROI widths differ
SPLIT_MASK_VERSION = 4
FRAME_I, FRAME_P = 0, 1
FRAME_TYPES = {FRAME_I: "I", FRAME_P: "P"}
_HEADER = struct.Struct("<4sHH8sBBHHIIIi")
_FRAME_HEAD = struct.Struct("<BHH")
_FRAME_HEAD_LEVEL = struct.Struct("<BBHH")
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size + _CRC.size


def _frame_head(version: int) -> struct.Struct:
    """The fixed part of a frame record in stream ``version``: with the level byte from :data:`LEVEL_VERSION` on."""
    return _FRAME_HEAD_LEVEL if version >= LEVEL_VERSION else _FRAME_HEAD


class BitstreamError(DataError):
    """A .bav stream is truncated, corrupted, of another version, or made by another model."""


@dataclass
class StreamHeader:
    """What a stream says about itself (see the module docstring)."""

    model_id: bytes
    quality: int
    width: int
    height: int
    frame_count: int
    fps: Fraction
    intra_period: int
    version: int = VERSION
    flags: int = 0

    def pack(self) -> bytes:
        if len(self.model_id) != 8:
            raise ValueError("model_id must be 8 bytes")
        for name, v, hi in (("width", self.width, 0xFFFF), ("height", self.height, 0xFFFF),
                            ("quality", self.quality, 0xFF), ("frame count", self.frame_count, 0xFFFFFFFF)):
            if not 0 <= v <= hi:
                raise ValueError(f"{name} {v} does not fit the .bav header (0..{hi})")
        fps = Fraction(self.fps).limit_denominator(0xFFFF)
        body = _HEADER.pack(MAGIC, self.version, self.flags, self.model_id, self.quality, 0, self.width, self.height,
                            self.frame_count, fps.numerator, fps.denominator, self.intra_period)
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def unpack(cls, data: bytes | memoryview, *, source: str = "stream") -> "StreamHeader":
        if len(data) < HEADER_SIZE:
            if bytes(data[:4]) != MAGIC[: len(data[:4])]:
                raise BitstreamError(f"{source} is not a bitalloc video stream (no 'BAVC' magic); pass a file "
                                     "written by `bitalloc codec encode`")
            raise BitstreamError(f"{source} is truncated: {len(data)} bytes, shorter than the {HEADER_SIZE}-byte "
                                 "header; re-encode it")
        body = bytes(data[: _HEADER.size])
        magic, version, flags, model_id, quality, _, width, height, count, num, den, period = _HEADER.unpack(body)
        if magic != MAGIC:
            raise BitstreamError(f"{source} is not a bitalloc video stream (magic {magic!r}, expected 'BAVC'); pass a "
                                 "file written by `bitalloc codec encode`")
        (crc,) = _CRC.unpack(bytes(data[_HEADER.size:HEADER_SIZE]))
        if crc != zlib.crc32(body):
            raise BitstreamError(f"{source}: the stream header is corrupted (checksum mismatch); the file cannot be "
                                 "decoded, re-encode it")
        if version not in READABLE_VERSIONS:
            readable = ", ".join(map(str, READABLE_VERSIONS))
            raise BitstreamError(f"{source} has bitstream version {version}; this bitalloc reads versions {readable}: "
                                 "decode it with the bitalloc that wrote it, or re-encode it")
        if den == 0 or width == 0 or height == 0:
            raise BitstreamError(f"{source}: invalid header (frame size {width}x{height}, fps {num}/{den}); re-encode it")
        return cls(model_id=model_id, quality=quality, width=width, height=height, frame_count=count,
                   fps=Fraction(num, den), intra_period=period, version=version, flags=flags)


@dataclass
class FrameRecord:
    """One coded frame: type, quality level, the two side-information widths, the range-coded payload. ``level``
    None: the stream header's (what versions 1 and 2, which have no level field, mean; :func:`write_stream` fills
    it in for version 3)."""

    kind: int
    roi_bits: int
    non_roi_bits: int
    payload: bytes
    size: int = field(default=0, compare=False)  # bytes of the whole record in the file
    level: int | None = None

    def pack(self, version: int = VERSION) -> bytes:
        if self.kind not in FRAME_TYPES:
            raise ValueError(f"frame type {self.kind} is not I (0) or P (1)")
        for v in (self.roi_bits, self.non_roi_bits):
            if not 0 <= v <= 0xFFFF:
                raise ValueError(f"bit width {v} does not fit 16 bits")
        fields: tuple[int, ...] = (self.kind, self.roi_bits, self.non_roi_bits)
        if version >= LEVEL_VERSION:
            if self.level is None or not 0 <= self.level <= 0xFF:
                raise ValueError(f"quality level {self.level} does not fit the frame record (0..255)")
            fields = (self.kind, self.level, self.roi_bits, self.non_roi_bits)
        rec = _frame_head(version).pack(*fields) + _varint(len(self.payload)) + self.payload
        return rec + _CRC.pack(zlib.crc32(rec))


def _varint(n: int) -> bytes:
    """Unsigned LEB128."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(data: memoryview, pos: int, end: int) -> tuple[int, int] | None:
    n, shift = 0, 0
    while pos < end:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, pos
        shift += 7
        if shift > 35:
            return None
    return None


def write_stream(header: StreamHeader, frames: list[FrameRecord]) -> bytes:
    """The bytes of a whole stream, in ``header.version``'s layout (records without a level are at the header's
    quality; a version 1 or 2 stream holds only such records)."""
    if header.frame_count != len(frames):
        raise ValueError(f"header says {header.frame_count} frames, {len(frames)} given")
    if header.version < LEVEL_VERSION and any(f.level not in (None, header.quality) for f in frames):
        raise ValueError(f"version {header.version} streams have no per-frame quality levels; write version "
                         f"{LEVEL_VERSION}")
    return header.pack() + b"".join(dataclasses.replace(f, level=header.quality if f.level is None else f.level)
                                    .pack(header.version) for f in frames)


def read_stream(data: bytes, *, source: str = "stream", limit: int | None = None) -> tuple[StreamHeader, list[FrameRecord]]:
    """Parse and check a stream: header, then every frame record (checksums verified); trailing bytes after the
    last frame are an error. ``limit``: read only the first ``limit`` frames (what follows is not checked)."""
    view = memoryview(data)
    header = StreamHeader.unpack(view, source=source)
    frames: list[FrameRecord] = []
    pos = HEADER_SIZE
    end = len(view)
    count = header.frame_count if limit is None else min(limit, header.frame_count)
    head = _frame_head(header.version)
    for i in range(count):
        start = pos
        if end - pos < head.size + 1:
            raise BitstreamError(f"{source} is truncated in frame {i} of {header.frame_count}: the frame header is "
                                 f"incomplete ({end - pos} bytes left); re-encode it"
                                 + (f", or decode the first {i} frames with --frames {i}" if i else ""))
        fields = head.unpack(bytes(view[pos:pos + head.size]))
        kind, level, roi, non_roi = fields if len(fields) == 4 else (fields[0], header.quality, *fields[1:])
        got = _read_varint(view, pos + head.size, end)
        if got is None:
            raise BitstreamError(f"{source}: frame {i} has an unreadable payload length (truncated or corrupted); "
                                 "re-encode it")
        length, pos = got
        if end - pos < length + _CRC.size:
            raise BitstreamError(f"{source} is truncated in frame {i} of {header.frame_count}: the frame needs "
                                 f"{length + _CRC.size} more bytes, {end - pos} are left (or its length field is "
                                 f"corrupted); re-encode it" + (f", or decode the first {i} frames with --frames {i}"
                                                                if i else ""))
        payload = bytes(view[pos:pos + length])
        pos += length
        (crc,) = _CRC.unpack(bytes(view[pos:pos + _CRC.size]))
        pos += _CRC.size
        if crc != zlib.crc32(bytes(view[start:pos - _CRC.size])):
            raise BitstreamError(f"{source}: frame {i} is corrupted (checksum mismatch); nothing from it or after it "
                                 f"can be decoded exactly" + (f"; decode the first {i} frames with --frames {i}"
                                                              if i else ""))
        if kind not in FRAME_TYPES:
            raise BitstreamError(f"{source}: frame {i} has unknown type {kind} (a newer bitalloc?); re-encode it")
        if i == 0 and kind != FRAME_I:
            raise BitstreamError(f"{source}: frame 0 is not an intra frame; the stream cannot be decoded")
        frames.append(FrameRecord(kind, roi, non_roi, payload, size=pos - start, level=level))
    if pos != end and count == header.frame_count:
        raise BitstreamError(f"{source} has {end - pos} unexpected bytes after its last frame ({header.frame_count} "
                             "frames); the file is corrupted or two streams were concatenated")
    return header, frames
