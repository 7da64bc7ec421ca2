"""The .bav bitstream rejects every corruption and truncation with an error naming the frame."""

from __future__ import annotations

import struct
from fractions import Fraction

import pytest

from bitalloc.codec.bitstream import (FRAME_I, FRAME_P, HEADER_SIZE, BitstreamError, FrameRecord, StreamHeader,
                                      read_stream, write_stream)


def _stream(payloads=(b"\x01\x02\x03\x04" * 5, b"\x09" * 8, b""), levels=None, version=None) -> bytes:
    header = StreamHeader(b"ABCDEFGH", 3, 176, 144, len(payloads), Fraction(30000, 1001), 32)
    if version is not None:
        header.version = version
    levels = levels or [None] * len(payloads)
    frames = [FrameRecord(FRAME_I if i == 0 else FRAME_P, 8, 4, p, level=lv)
              for i, (p, lv) in enumerate(zip(payloads, levels))]
    return write_stream(header, frames)


def test_header_and_records_round_trip():
    data = _stream()
    header, frames = read_stream(data)
    assert (header.model_id, header.quality, header.width, header.height, header.frame_count) == (b"ABCDEFGH", 3, 176,
                                                                                                     144, 3)
    assert header.fps == Fraction(30000, 1001) and header.intra_period == 32
    assert [f.kind for f in frames] == [FRAME_I, FRAME_P, FRAME_P]
    assert [(f.roi_bits, f.non_roi_bits) for f in frames] == [(8, 4)] * 3
    assert frames[0].payload == b"\x01\x02\x03\x04" * 5 and frames[2].payload == b""
    assert HEADER_SIZE + sum(f.size for f in frames) == len(data)
    assert header.version == 4 and [f.level for f in frames] == [3, 3, 3]  # no level given: the header's
    # record = 6 bytes type + level + widths, 1 byte length, payload, 4 bytes CRC
    assert frames[1].size == 6 + 1 + 8 + 4


def test_per_frame_levels_round_trip_and_older_versions_have_none():
    _, frames = read_stream(_stream(levels=[5, 2, 0]))
    assert [f.level for f in frames] == [5, 2, 0]
    header, frames = read_stream(_stream(version=2))  # version 2: no level byte, every frame at the header's
    assert header.version == 2 and [f.level for f in frames] == [3, 3, 3] and frames[1].size == 5 + 1 + 8 + 4
    assert len(_stream(version=2)) == len(_stream()) - 3
    with pytest.raises(ValueError, match="no per-frame quality levels"):
        _stream(levels=[3, 2, 2], version=2)
    with pytest.raises(ValueError, match="quality level 256"):
        FrameRecord(FRAME_P, 8, 8, b"", level=256).pack()


def test_varint_lengths_of_large_payloads():
    big = bytes(range(256)) * 700  # 179,200 bytes: a 3-byte length
    _, frames = read_stream(_stream((big,)))
    assert frames[0].payload == big and frames[0].size == 6 + 3 + len(big) + 4


@pytest.mark.parametrize("version", [2, 3, 4])
def test_every_single_byte_corruption_is_detected(version):
    data = _stream(version=version)
    for pos in range(len(data)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[pos] ^= flip
            with pytest.raises(BitstreamError):
                read_stream(bytes(bad))


@pytest.mark.parametrize("version", [2, 3, 4])
def test_every_truncation_is_detected_and_names_the_frame(version):
    data = _stream(version=version)
    for n in range(len(data)):
        with pytest.raises(BitstreamError) as exc:
            read_stream(data[:n])
        if n >= HEADER_SIZE:
            assert "frame" in str(exc.value)
    with pytest.raises(BitstreamError, match="unexpected bytes after its last frame"):
        read_stream(data + b"\x00")


def test_limit_reads_the_first_frames_of_a_damaged_stream():
    data = _stream()
    header, frames = read_stream(data[:-3], limit=2)
    assert len(frames) == 2


def test_other_version_and_magic():
    data = bytearray(_stream())
    with pytest.raises(BitstreamError, match="not a bitalloc video stream"):
        read_stream(b"RIFF" + bytes(data[4:]))
    body = bytearray(data[:HEADER_SIZE - 4])
    import zlib

    def with_version(v: int) -> bytes:
        body[4:6] = struct.pack("<H", v)
        return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))) + bytes(data[HEADER_SIZE:])

    with pytest.raises(BitstreamError, match="version 5; this bitalloc reads versions 1, 2, 3, 4"):
        read_stream(with_version(5))
    body[:] = bytearray(_stream(version=2)[:HEADER_SIZE - 4])
    data = bytearray(_stream(version=2))
    assert read_stream(with_version(1))[0].version == 1  # the previous versions are read


def test_header_fields_out_of_range_are_refused():
    with pytest.raises(ValueError, match="width"):
        StreamHeader(b"ABCDEFGH", 0, 70000, 10, 1, Fraction(25), 32).pack()
    with pytest.raises(ValueError, match="16 bits"):
        FrameRecord(FRAME_I, 1 << 16, 0, b"").pack()
