"""Huffman coding and bit-packing against independent references.

References: closed-form entropies; the Shannon bound H <= L < H + 1; brute-force enumeration of all prefix
codes on small alphabets (optimality); the constriction library's Huffman coder (optimal total length of an
independent implementation); RFC 1951's worked example of canonical codes; a bit-by-bit pure-Python writer
for bit-packing; exact round trips on random, skewed and edge-case data; truncated streams.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from bitalloc.coding import bitpack, huffman
from bitalloc.coding.huffman import CodingError


def _cost(counts, lengths):
    return int((np.asarray(counts) * np.asarray(lengths)).sum())


# ---- entropy ----------------------------------------------------------------------------------------------------

def test_entropy_closed_forms():
    assert huffman.entropy(np.ones(16, dtype=np.int64)) == pytest.approx(4.0, abs=1e-12)
    assert huffman.entropy(np.array([5, 0, 0])) == 0.0
    assert huffman.entropy(np.array([])) == 0.0
    assert huffman.entropy(np.array([1, 1, 2])) == pytest.approx(1.5, abs=1e-12)
    for p in (0.1, 0.25, 0.5, 0.9):
        n = 1000
        k = int(p * n)
        h = -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
        assert huffman.entropy(np.array([k, n - k])) == pytest.approx(h, abs=1e-9)
    # dyadic distribution: H = sum p_i * (-log2 p_i) and Huffman reaches it exactly
    counts = np.array([8, 4, 2, 1, 1])
    assert huffman.entropy(counts) == pytest.approx(15 / 8, abs=1e-12)
    assert huffman.huffman_average_length(counts) == pytest.approx(15 / 8, abs=1e-12)


# ---- code construction ------------------------------------------------------------------------------------------

def _brute_force_optimum(counts):
    """Minimum of sum c_i l_i over all length vectors of a prefix code (Kraft sum <= 1), lengths 1..k-1."""
    k = len(counts)
    best = None
    for ls in itertools.product(range(1, k), repeat=k):
        if sum(2.0 ** -l for l in ls) <= 1.0 + 1e-12:
            c = _cost(counts, ls)
            best = c if best is None else min(best, c)
    return best


def test_optimal_against_brute_force_on_small_alphabets():
    rng = np.random.default_rng(0)
    for k in (2, 3, 4, 5, 6):
        for _ in range(6 if k < 6 else 2):
            counts = rng.integers(1, 50, size=k)
            lengths = huffman.code_lengths(counts)
            assert _cost(counts, lengths) == _brute_force_optimum(counts), counts
    # ties and extreme skew
    for counts in ([1, 1, 1, 1], [1, 1, 2, 4, 8], [1000, 1, 1], [3, 3, 3, 3, 3]):
        assert _cost(counts, huffman.code_lengths(np.array(counts))) == _brute_force_optimum(counts)


def test_optimal_total_length_matches_constriction():
    constriction = pytest.importorskip("constriction")
    rng = np.random.default_rng(1)
    for k, n in ((7, 500), (40, 3000), (256, 5000)):
        p = rng.dirichlet(np.full(k, 0.3))
        symbols = rng.choice(k, size=n, p=p)
        counts = np.bincount(symbols, minlength=k)
        used = np.flatnonzero(counts)
        tree = constriction.symbol.huffman.EncoderHuffmanTree(counts[used].astype(np.float64))
        index = np.zeros(k, dtype=np.int64)
        index[used] = np.arange(used.size)
        enc = constriction.symbol.QueueEncoder()
        for s in index[symbols].tolist():
            enc.encode_symbol(s, tree)
        _, bitrate = enc.get_compressed_and_bitrate()
        assert _cost(counts, huffman.code_lengths(counts)) == bitrate


def test_shannon_bound_and_kraft_equality():
    rng = np.random.default_rng(2)
    for k in (2, 3, 10, 100, 256, 1000):
        for alpha in (0.05, 1.0, 20.0):
            counts = rng.multinomial(20000, rng.dirichlet(np.full(k, alpha)))
            if (counts > 0).sum() < 2:
                continue
            h = huffman.entropy(counts)
            length = huffman.huffman_average_length(counts)
            assert h - 1e-12 <= length < h + 1, (k, alpha, h, length)
            lengths = huffman.code_lengths(counts)
            assert huffman.kraft_sum(lengths) == 1.0  # complete code
            assert (lengths[counts == 0] == 0).all() and (lengths[counts > 0] > 0).all()


def test_canonical_codes_rfc1951_example_and_prefix_freedom():
    # RFC 1951 section 3.2.2: lengths (3, 3, 3, 3, 3, 2, 4, 4) for A..H
    codes = huffman.canonical_codes(np.array([3, 3, 3, 3, 3, 2, 4, 4]))
    assert [int(c) for c in codes] == [0b010, 0b011, 0b100, 0b101, 0b110, 0b00, 0b1110, 0b1111]
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 30, size=40)
    lengths = huffman.code_lengths(counts)
    words = [format(int(c), f"0{int(l)}b") for c, l in zip(huffman.canonical_codes(lengths), lengths) if l > 0]
    for a, b in itertools.permutations(words, 2):
        assert not b.startswith(a)


def _brute_force_limited(counts, limit):
    k = len(counts)
    best = None
    for ls in itertools.product(range(1, limit + 1), repeat=k):
        if sum(2.0 ** -l for l in ls) <= 1.0 + 1e-12:
            c = _cost(counts, ls)
            best = c if best is None else min(best, c)
    return best


def test_length_limited_codes_are_optimal_package_merge():
    fib = np.array([1, 1, 2, 3, 5, 8, 13])  # unlimited Huffman: lengths 6, 6, 5, 4, 3, 2, 1
    assert huffman.code_lengths(fib).max() == 6
    for limit in (3, 4, 5):
        lengths = huffman.code_lengths(fib, max_length=limit)
        assert lengths.max() <= limit and (lengths > 0).all() and huffman.kraft_sum(lengths) <= 1.0
        assert _cost(fib, lengths) == _brute_force_limited(fib, limit)
    rng = np.random.default_rng(8)
    for _ in range(4):
        counts = rng.integers(1, 1000, 6) ** 2
        assert _cost(counts, huffman.limit_lengths(counts, 3)) == _brute_force_limited(counts, 3)
        # with a loose limit package-merge agrees with Huffman
        assert _cost(counts, huffman.limit_lengths(counts, 20)) == _cost(counts, huffman.code_lengths(counts))
    big = np.array([1, 1] + [2 ** i for i in range(1, 40)])  # Huffman depth 40: limited to 20 bits
    lengths = huffman.code_lengths(big, max_length=20)
    assert lengths.max() == 20 and huffman.kraft_sum(lengths) <= 1.0
    with pytest.raises(CodingError):
        huffman.limit_lengths(np.ones(9), 3)


# ---- streams ----------------------------------------------------------------------------------------------------

def _skewed(rng, n, bits, signed=True):
    """Laplace-like integer codes on a b-bit grid (what quantized weights look like)."""
    half = 1 << (bits - 1)
    q = np.clip(np.round(rng.laplace(0, half / 6, n)), -half, half - 1).astype(np.int64)
    return q if signed else q + half


@pytest.mark.parametrize("coder", ["auto", "zlib", "canonical"])
def test_round_trip_random_skewed_and_edge_cases(coder):
    rng = np.random.default_rng(4)
    cases = [
        np.zeros(0, dtype=np.int64),  # empty
        np.full(1, 7), np.full(1000, -3),  # one symbol
        np.array([0, 1]), np.array([5, -5, 5]),  # two symbols
        rng.integers(0, 16, 10000),  # uniform 4-bit
        _skewed(rng, 20000, 4), _skewed(rng, 50000, 8), _skewed(rng, 30000, 8, signed=False),
        _skewed(rng, 20000, 12),  # 12-bit codes: beyond zlib's byte alphabet
        np.arange(256).repeat(3),  # whole byte alphabet used
        rng.permutation(np.arange(-(1 << 15), 1 << 15)),  # whole 16-bit alphabet used, each once
        np.concatenate([np.zeros(5000, np.int64), [65535]]),  # very skewed, widest alphabet
    ]
    for x in cases:
        stream = huffman.encode(x, coder=coder)
        y = huffman.decode(stream)
        assert y.dtype == np.int64 and np.array_equal(y, x.reshape(-1)), (coder, x[:5], x.size)
    t = torch.from_numpy(_skewed(rng, 999, 4)).reshape(3, 333)
    assert np.array_equal(huffman.decode(huffman.encode(t, coder=coder)), t.reshape(-1).numpy())


def test_canonical_stream_size_is_exact_and_payload_is_the_huffman_length():
    rng = np.random.default_rng(5)
    for n, bits, interval in ((1, 4, 4096), (3000, 4, 7), (40000, 8, 4096), (20000, 10, 512), (5000, 16, 100)):
        x = _skewed(rng, n, bits)
        if np.unique(x).size < 2:
            x = np.concatenate([x, x[:1] + 1])
        stream = huffman.encode(x, coder="canonical", sync_interval=interval)
        counts = np.bincount(x - x.min())
        assert len(stream) == huffman.canonical_stream_size(counts, sync_interval=interval)
        assert np.array_equal(huffman.decode(stream), x)
        payload_bits = _cost(counts, huffman.code_lengths(counts))
        assert 8 * len(stream) >= payload_bits
    # stats: entropy <= Huffman <= stored (tables and headers included)
    x = _skewed(rng, 50000, 6)
    for coder in ("zlib", "canonical"):
        s = huffman.code_stats(x, coder=coder, bits_before=6)
        assert s.coder == coder and s.count == x.size and s.stored_bytes == len(huffman.encode(x, coder=coder))
        assert s.entropy <= s.huffman_bits < s.entropy + 1
        assert s.stored_bits > s.entropy and s.stored_bits < 6
    auto = huffman.code_stats(x)
    z, c = (huffman.code_stats(x, coder=k).stored_bytes for k in ("zlib", "canonical"))
    assert auto.stored_bytes == (c if c < huffman.AUTO_MARGIN * z else z)


def test_corrupt_and_truncated_streams_raise():
    rng = np.random.default_rng(6)
    for coder in ("zlib", "canonical"):
        x = _skewed(rng, 3000, 8)
        stream = huffman.encode(x, coder=coder, sync_interval=256)
        for cut in sorted(set(range(0, len(stream), max(1, len(stream) // 60))) | {len(stream) - 1}):
            with pytest.raises(CodingError):
                huffman.decode(stream[:cut])
        with pytest.raises(CodingError):
            huffman.decode(stream + b"\x00")
        with pytest.raises(CodingError, match="expected"):
            huffman.decode(stream, expected_count=x.size + 1)
    with pytest.raises(CodingError, match="unknown stream kind"):
        huffman.decode(b"\x09" + huffman.encode(np.arange(4))[1:])
    with pytest.raises(CodingError, match="integer"):
        huffman.encode(np.array([0.5, 1.5]))
    with pytest.raises(CodingError, match="bit-packed"):
        huffman.encode(np.array([0, 1 << 20]))


# ---- bit-packing -------------------------------------------------------------------------------------------------

def _reference_pack(rows, widths):
    bits = []
    for row, w in zip(rows, widths):
        for v in row:
            bits += [(int(v) >> k) & 1 for k in range(int(w))]
    out = bytearray((len(bits) + 7) // 8)
    for i, b in enumerate(bits):
        out[i // 8] |= b << (i % 8)
    return bytes(out)


def test_bitpack_matches_bitwise_reference_with_mixed_widths():
    rng = np.random.default_rng(7)
    widths = np.array([3, 3, 5, 8, 1, 2, 2, 7, 16, 4])
    rows = np.stack([rng.integers(0, 1 << int(w), 13) for w in widths])
    data = bitpack.pack_rows(rows, widths)
    assert data == _reference_pack(rows, widths)
    assert len(data) == (int(widths.sum()) * 13 + 7) // 8
    assert np.array_equal(bitpack.unpack_rows(data, widths, 13), rows)
    v = rng.integers(0, 1 << 32, 100)
    assert np.array_equal(bitpack.unpack_bits(bitpack.pack_bits(v, 32), 32, 100), v)
    with pytest.raises(ValueError, match="does not fit"):
        bitpack.pack_bits([8], 3)
    with pytest.raises(ValueError, match="expected"):
        bitpack.unpack_rows(data[:-1], widths, 13)


@pytest.mark.parametrize("axis", [0, 1])
def test_pack_codes_signed_per_channel_round_trip(axis):
    g = torch.Generator().manual_seed(0)
    shape = (6, 5, 3) if axis == 0 else (4, 6, 3)
    bits = torch.tensor([2, 3, 4, 4, 8, 5])
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    u = torch.rand(shape, generator=g)
    view = [1] * 3
    view[axis] = 6
    codes = (qmin.reshape(view) + (u * (qmax - qmin + 1).reshape(view)).floor().long()).clamp(qmin.reshape(view), qmax.reshape(view))
    data = bitpack.pack_codes(codes, qmin, bits, axis)
    assert len(data) == bitpack.packed_size(shape, bits, axis)
    assert torch.equal(bitpack.unpack_codes(data, shape, qmin, bits, axis), codes)
    # per tensor
    t = torch.randint(0, 16, (7, 9), generator=g)
    d = bitpack.pack_codes(t, torch.tensor(0), torch.tensor(4), None)
    assert len(d) == (7 * 9 * 4 + 7) // 8
    assert torch.equal(bitpack.unpack_codes(d, (7, 9), torch.tensor(0), torch.tensor(4), None), t)
