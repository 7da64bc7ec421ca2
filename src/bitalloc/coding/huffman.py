"""Huffman coding of integer codes: optimal code lengths, canonical codes, two real coders, and statistics.

Everything here works on one stream of integer symbols (the codes of one quantized tensor, flattened), with
one code per stream (SPEC section 1: "frequent values get short codes, so channels of different precision
can share a layer"). Symbols are shifted by the stream's minimum, so the alphabet is {0, ..., A-1} with
A = max - min + 1 <= 2^16 (codes of up to 16 bits, mixed per-channel widths included).

**Statistics.** For symbol counts c_i, n = sum c_i, p_i = c_i / n:

* Shannon entropy H = -sum p_i log2 p_i bits per symbol (Shannon 1948): the lower bound of every lossless
  symbol code's average length (the ACIQ reference code reports this number, not a real code length).
* Huffman code lengths l_i (Huffman 1952) minimise sum c_i l_i among prefix codes; the average
  L = sum p_i l_i satisfies H <= L < H + 1 (Cover & Thomas, Elements of Information Theory, thm. 5.4.1 and
  5.8.1), and a Huffman code with >= 2 symbols is complete: sum 2^-l_i = 1 (Kraft equality).
* The *stored* bits per value count everything a decoder needs: header, code table, sync index and the
  padded payload: 8 * len(stream) / n. This is the number to compare with the bits before coding.

**Coders** (``encode(symbols, coder=...)``; ``decode`` reads any of them, the first byte says which):

* ``"zlib"``: DEFLATE (RFC 1951) with zlib's Huffman-only strategy
  (``zlib.compressobj(9, DEFLATED, -15, 9, Z_HUFFMAN_ONLY)``): every symbol is one byte coded as a literal
  with a dynamic Huffman code; no LZ77 matching. zlib is a well-kept C library with a frozen, standard bit
  format, so it is our first choice for alphabets of at most 256 symbols (codes of at most 8 bits). zlib
  splits the stream into blocks of about 32k symbols, each with its own (length-limited to 15 bits) code
  and a compressed code table in its header; both are counted.
* ``"canonical"``: our own canonical Huffman coder for alphabets up to 2^16 (codes of 9-16 bits, which zlib
  cannot take as symbols): optimal lengths from :func:`code_lengths`, codewords assigned canonically as in
  RFC 1951 section 3.2.2, written MSB-first; the table is the list of code lengths (raw-DEFLATE compressed);
  a small index of bit offsets every ``sync_interval`` symbols lets numpy decode all segments in parallel.
  Encoding and decoding are vectorised (decoding: see :func:`_decode_group`).
* ``"auto"`` (default): for byte alphabets zlib, unless the canonical stream is at least 1 % smaller (one
  table for a whole tensor can beat zlib's table per 32k-symbol block; zlib decodes ~20x faster, so near
  ties go to zlib). The canonical stream's size follows from the histogram, so this costs one extra
  encode only when canonical wins. Canonical above 256 symbols.

The ``constriction`` library (``constriction.symbol.huffman``) also builds Huffman trees, but it encodes one
symbol per Python call and its codewords follow its own tree construction from float probabilities, which a
file format would have to freeze; we use it in the tests as an independent reference for optimal lengths
and in the benchmark for comparison.

Stream layouts (little-endian) are documented in ``docs/packfile.md``.
"""

from __future__ import annotations

import heapq
import struct
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bitalloc.errors import BitallocError

#: longest codeword the canonical coder accepts (a 64-bit window read at any bit offset holds 57 bits)
MAX_CODE_LENGTH = 57
#: largest alphabet (symbols 0 .. 2^16 - 1 after the shift)
MAX_ALPHABET = 1 << 16
#: symbols per segment of the canonical coder's sync index (default)
SYNC_INTERVAL = 4096
#: "auto" prefers the canonical stream over zlib's only when it is smaller than this fraction of zlib's
AUTO_MARGIN = 0.99
#: largest sync interval (keeps sync-index entries within 32 bits)
MAX_SYNC_INTERVAL = 1 << 24
#: largest number of symbols in one stream (the header stores n as u32)
MAX_SYMBOLS = (1 << 32) - 1

KIND_CONSTANT = 0
KIND_ZLIB = 1
KIND_CANONICAL = 2
KIND_NAMES = {KIND_CONSTANT: "constant", KIND_ZLIB: "zlib", KIND_CANONICAL: "canonical"}
CODERS = ("auto", "zlib", "canonical")

_HEAD = struct.Struct("<BIi")  # kind, n, symbol_min
_CANON = struct.Struct("<IBBII")  # alphabet, max length W, index width d, sync interval K, table bytes


class CodingError(BitallocError, ValueError):
    """A coded stream is corrupt or truncated, or symbols cannot be coded (alphabet too large)."""


# ---- statistics ---------------------------------------------------------------------------------------------

def histogram(symbols: np.ndarray, alphabet_size: int | None = None) -> np.ndarray:
    """Counts of the non-negative integer ``symbols`` (int64 array of length ``alphabet_size`` or max + 1)."""
    s = np.asarray(symbols).reshape(-1)
    if s.size and int(s.min()) < 0:
        raise CodingError("histogram needs non-negative symbols; shift them by their minimum first")
    return np.bincount(s.astype(np.int64, copy=False), minlength=alphabet_size or 0).astype(np.int64)


def entropy(counts: np.ndarray) -> float:
    """Shannon entropy H = -sum_i p_i log2 p_i (bits per symbol) of a histogram; 0 for 0 or 1 used symbols."""
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    c = c[c > 0]
    n = c.sum()
    if c.size <= 1:
        return 0.0
    p = c / n
    return float(-(p * np.log2(p)).sum())


def code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Optimal (Huffman) codeword lengths for a histogram; 0 for unused symbols.

    Huffman's algorithm (1952) with a binary heap: repeatedly merge the two lightest subtrees; a symbol's
    length is its leaf depth. Ties break by insertion order, so the result is deterministic (every tie-break
    gives the same optimal total sum c_i l_i). One used symbol gets length 1. If the longest codeword would
    exceed ``max_length`` (only for extremely skewed histograms: it needs n >= Fibonacci(max_length + 2)),
    the optimal length-limited code is computed instead (:func:`limit_lengths`, package-merge).
    """
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    if c.size and int(c.min()) < 0:
        raise CodingError("symbol counts must be non-negative")
    lengths = np.zeros(c.size, dtype=np.int64)
    used = np.flatnonzero(c)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used[0]] = 1
        return lengths
    # heap items: (weight, tie-break id, node); leaves are 0..k-1, internal nodes k..2k-2
    k = used.size
    parent = np.zeros(2 * k - 1, dtype=np.int64)
    heap = [(int(c[s]), i, i) for i, s in enumerate(used)]
    heapq.heapify(heap)
    nxt = k
    while len(heap) > 1:
        w1, _, a = heapq.heappop(heap)
        w2, _, b = heapq.heappop(heap)
        parent[a] = parent[b] = nxt
        heapq.heappush(heap, (w1 + w2, nxt, nxt))
        nxt += 1
    depth = np.zeros(2 * k - 1, dtype=np.int64)
    for node in range(2 * k - 3, -1, -1):  # parents have larger ids: walk from the root down
        depth[node] = depth[parent[node]] + 1
    lengths[used] = depth[:k]
    if int(lengths.max()) > max_length:
        lengths = limit_lengths(c, max_length)
    return lengths


def limit_lengths(counts: np.ndarray, max_length: int) -> np.ndarray:
    """Optimal prefix-code lengths of at most ``max_length`` bits: package-merge (Larmore & Hirschberg 1990).

    The coin-collector formulation: each used symbol is a coin of weight c_i at each of the levels
    1..max_length; starting from the deepest level, the sorted items are paired into packages that join the
    next level's coins; the 2k - 2 lightest items of level 1 are selected, and a symbol's length is the
    number of selected items that contain its coin. Minimises sum c_i l_i subject to l_i <= max_length.
    """
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    used = np.flatnonzero(c)
    k = used.size
    lengths = np.zeros(c.size, dtype=np.int64)
    if k == 0:
        return lengths
    if k == 1:
        lengths[used[0]] = 1
        return lengths
    if k > (1 << max_length):
        raise CodingError(f"{k} symbols cannot have codewords of at most {max_length} bits")
    order = used[np.lexsort((used, c[used]))]  # coins by weight (then symbol)
    weight: list[int] = [int(c[s]) for s in order]
    left: list[int] = [-1] * k  # nodes 0..k-1 are the coins (leaves)
    right: list[int] = [-1] * k
    items = list(range(k))
    for _ in range(max_length - 1):
        packages = []
        for j in range(0, len(items) - 1, 2):
            a, b = items[j], items[j + 1]
            weight.append(weight[a] + weight[b])
            left.append(a)
            right.append(b)
            packages.append(len(weight) - 1)
        items = list(heapq.merge(range(k), packages, key=lambda node: weight[node]))  # coins first on ties
    depth = np.zeros(k, dtype=np.int64)
    stack = list(items[:2 * k - 2])
    while stack:
        node = stack.pop()
        if node < k:
            depth[node] += 1
        else:
            stack.append(left[node])
            stack.append(right[node])
    lengths[order] = depth
    return lengths


def kraft_sum(lengths: np.ndarray) -> float:
    """sum_i 2^-l_i over used symbols (1 for a complete prefix code, <= 1 for every prefix code)."""
    l = np.asarray(lengths, dtype=np.int64)
    l = l[l > 0]
    if l.size == 0:
        return 0.0
    top = int(l.max())
    return float(sum(1 << (top - int(v)) for v in l)) / float(1 << top)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codewords (RFC 1951 section 3.2.2) for code lengths: uint64, MSB-first, 0 for unused.

    Symbols are ordered by (length, symbol value); codes of one length are consecutive integers and
    next_code[l] = (next_code[l-1] + count[l-1]) << 1.
    """
    l = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(l.size, dtype=np.uint64)
    if not (l > 0).any():
        return codes
    first, _, order = _canonical_layout(l)
    sorted_l = l[order]
    # position of each symbol within its length class
    start_of_class = np.searchsorted(sorted_l, sorted_l, side="left")
    codes[order] = first[sorted_l].astype(np.uint64) + (np.arange(order.size) - start_of_class).astype(np.uint64)
    return codes


def _canonical_layout(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first code of each length [W+1], number of codes of each length [W+1], used symbols by (len, sym))."""
    l = np.asarray(lengths, dtype=np.int64)
    top = int(l.max())
    count = np.bincount(l[l > 0], minlength=top + 1).astype(np.int64)
    first = np.zeros(top + 1, dtype=np.int64)
    code = 0
    for bits in range(1, top + 1):  # RFC 1951 3.2.2 step 2 (count[0] = 0, so first[1] = 0)
        code = (code + int(count[bits - 1])) << 1
        first[bits] = code
    used = np.flatnonzero(l > 0)
    order = used[np.lexsort((used, l[used]))]
    return first, count, order


@dataclass
class CodeStats:
    """Coding statistics of one symbol stream (one tensor).

    count: symbols; alphabet: A = max - min + 1; distinct: symbols used; entropy: H (bits/value);
    huffman_bits: average length of the optimal (Huffman) code, payload only (bits/value);
    stored_bits: real bits/value of the coded stream, header and code table included; stored_bytes: its
    size; coder: what produced it ("zlib", "canonical", "constant"); bits_before: bits/value before coding
    (the grid widths; None if unknown); bitpack_bytes: size of plain bit-packing at those widths.
    """

    count: int
    alphabet: int
    distinct: int
    entropy: float
    huffman_bits: float
    stored_bits: float
    stored_bytes: int
    coder: str
    bits_before: float | None = None
    bitpack_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def huffman_average_length(counts: np.ndarray) -> float:
    """Average Huffman codeword length sum p_i l_i (bits/value, payload only; 0 for <= 1 used symbol)."""
    c = np.asarray(counts, dtype=np.int64)
    n = int(c.sum())
    if n == 0 or int((c > 0).sum()) <= 1:
        return 0.0
    return float((c * code_lengths(c)).sum()) / n


# ---- streams ------------------------------------------------------------------------------------------------

def _as_symbols(symbols: Any) -> np.ndarray:
    s = symbols.detach().cpu().numpy() if hasattr(symbols, "detach") else np.asarray(symbols)
    if s.dtype.kind not in "iub":
        raise CodingError(f"Huffman coding needs integer symbols, got dtype {s.dtype}")
    s = s.reshape(-1).astype(np.int64, copy=False)
    if s.size > MAX_SYMBOLS:
        raise CodingError(f"a stream holds at most {MAX_SYMBOLS} symbols, got {s.size}")
    return s


def choose_coder(alphabet: int, coder: str = "auto") -> str:
    """The coder ``encode`` uses for an alphabet of ``alphabet`` symbols."""
    if coder not in CODERS:
        raise CodingError(f"unknown coder {coder!r}; choose one of {CODERS}")
    if alphabet > MAX_ALPHABET:
        raise CodingError(f"alphabet of {alphabet} symbols is larger than {MAX_ALPHABET} (codes wider than 16 "
                          "bits): store these codes bit-packed")
    if coder == "auto":  # encode() then keeps the smaller of zlib and canonical for byte alphabets
        return "zlib" if alphabet <= 256 else "canonical"
    if coder == "zlib" and alphabet > 256:
        return "canonical"  # zlib codes bytes only
    return coder


def encode(symbols: Any, *, coder: str = "auto", sync_interval: int = SYNC_INTERVAL) -> bytes:
    """Huffman-code a stream of integers (any shape, flattened; numpy array, tensor or list) into bytes.

    ``coder``: "auto" (for alphabets of <= 256 symbols zlib unless the canonical stream, whose size is known
    from the histogram, is at least 1 % smaller; canonical above), "zlib" (falls back to canonical for larger
    alphabets) or "canonical". A stream with one distinct value (or none) is stored as
    that value and the count only. ``decode(encode(x))`` returns x flattened as int64.
    """
    s = _as_symbols(symbols)
    n = int(s.size)
    if n == 0:
        return _HEAD.pack(KIND_CONSTANT, 0, 0)
    lo, hi = int(s.min()), int(s.max())
    if lo < -(1 << 31) or hi >= (1 << 31):
        raise CodingError("symbols must fit in 32-bit signed integers")
    if lo == hi:
        return _HEAD.pack(KIND_CONSTANT, n, lo)
    alphabet = hi - lo + 1
    kind = choose_coder(alphabet, coder)
    shifted = s - lo
    if kind == "zlib":
        comp = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
        body = comp.compress(shifted.astype(np.uint8).tobytes()) + comp.flush()
        stream = _HEAD.pack(KIND_ZLIB, n, lo) + body
        if coder == "auto":  # byte alphabet: canonical only if it saves >= 1 % (zlib decodes ~20x faster)
            counts = np.bincount(shifted, minlength=alphabet)
            if canonical_stream_size(counts, sync_interval=sync_interval) < AUTO_MARGIN * len(stream):
                return _HEAD.pack(KIND_CANONICAL, n, lo) + _encode_canonical(shifted, alphabet, sync_interval)
        return stream
    return _HEAD.pack(KIND_CANONICAL, n, lo) + _encode_canonical(shifted, alphabet, sync_interval)


def _index_width(sync_interval: int, top: int) -> int:
    """Bits per sync-index entry: enough for the longest possible segment (interval * max length), so the
    stream size depends on the histogram only."""
    return int(sync_interval * top).bit_length()


def _code_table(lengths: np.ndarray) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    return comp.compress(lengths.astype(np.uint8).tobytes()) + comp.flush()


def _encode_canonical(sym: np.ndarray, alphabet: int, sync_interval: int) -> bytes:
    if not 1 <= sync_interval <= MAX_SYNC_INTERVAL:
        raise CodingError(f"sync_interval must lie in 1..{MAX_SYNC_INTERVAL}, got {sync_interval}")
    counts = np.bincount(sym, minlength=alphabet)
    lengths = code_lengths(counts)
    codes = canonical_codes(lengths)
    top = int(lengths.max())
    cl = lengths[sym]
    ends = np.cumsum(cl)
    total = int(ends[-1])
    starts = ends - cl
    payload = _write_codewords(codes[sym], cl, starts, total)
    lanes = starts[::sync_interval]
    deltas = np.diff(lanes)
    width = _index_width(sync_interval, top)
    from bitalloc.coding.bitpack import pack_bits

    index = pack_bits(deltas, width) if deltas.size else b""
    table = _code_table(lengths)
    return _CANON.pack(alphabet, top, width, sync_interval, len(table)) + table + index + payload


def _write_codewords(cw: np.ndarray, cl: np.ndarray, starts: np.ndarray, total_bits: int,
                     chunk: int = 1 << 20) -> bytes:
    """Concatenate codewords ``cw`` of lengths ``cl`` MSB-first starting at bit ``starts`` (vectorised).

    Each codeword, left-aligned at its bit offset inside a 64-bit big-endian window, spans at most
    ceil((7 + l) / 8) bytes; bits of different codewords never overlap, so each byte is the sum of the
    pieces that fall into it (one ``np.bincount`` per byte slot, exact in float64 since sums stay < 256).
    """
    nbytes = (total_bits + 7) // 8
    out = np.zeros(nbytes, dtype=np.float64)
    top = int(cl.max()) if cl.size else 0
    slots = (top + 7 + 7) // 8
    for a in range(0, cl.size, chunk):
        c = cl[a:a + chunk].astype(np.uint64)
        w = cw[a:a + chunk].astype(np.uint64)
        st = starts[a:a + chunk]
        shift = np.uint64(64) - c - (st & 7).astype(np.uint64)
        window = w << shift  # codeword at its bit position within 8 bytes starting at byte st >> 3
        base = st >> 3
        for k in range(slots):
            piece = ((window >> np.uint64(56 - 8 * k)) & np.uint64(0xFF)).astype(np.float64)
            pos = base + k
            keep = pos < nbytes
            out += np.bincount(pos[keep], weights=piece[keep], minlength=nbytes)
    return out.astype(np.uint8).tobytes()


def decode(stream: bytes | bytearray | memoryview, expected_count: int | None = None) -> np.ndarray:
    """Decode a stream written by :func:`encode` into an int64 array; :class:`CodingError` if it is corrupt.

    ``expected_count``: the number of symbols the caller expects (checked before anything is allocated).
    """
    data = bytes(stream)
    if len(data) < _HEAD.size:
        raise CodingError(f"coded stream truncated: {len(data)} bytes, the header alone is {_HEAD.size}")
    kind, n, lo = _HEAD.unpack_from(data)
    if expected_count is not None and n != expected_count:
        raise CodingError(f"coded stream holds {n} symbols, expected {expected_count}")
    body = data[_HEAD.size:]
    if kind == KIND_CONSTANT:
        if body:
            raise CodingError(f"constant stream has {len(body)} unexpected trailing bytes")
        return np.full(n, lo, dtype=np.int64)
    if n == 0:
        raise CodingError("coded stream declares 0 symbols but is not a constant stream")
    if kind == KIND_ZLIB:
        if n > 258 * 8 * len(body):  # DEFLATE expands at most 258 bytes per bit
            raise CodingError(f"DEFLATE stream of {len(body)} bytes cannot hold {n} symbols (truncated)")
        d = zlib.decompressobj(-15)
        try:
            raw = d.decompress(body, n + 1)
        except zlib.error as exc:
            raise CodingError(f"corrupt DEFLATE stream: {exc}") from None
        if len(raw) != n or not d.eof or d.unused_data or d.unconsumed_tail:
            raise CodingError(f"DEFLATE stream decodes to {len(raw)} symbols (expected {n}) or is truncated "
                              "or has trailing bytes")
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int64) + lo
    if kind == KIND_CANONICAL:
        return _decode_canonical(body, n) + lo
    raise CodingError(f"unknown stream kind {kind}")


def _read_table(body: bytes, alphabet: int, table_len: int) -> np.ndarray:
    d = zlib.decompressobj(-15)
    try:
        raw = d.decompress(body[:table_len], alphabet + 1)
    except zlib.error as exc:
        raise CodingError(f"corrupt code table: {exc}") from None
    if len(raw) != alphabet or not d.eof or d.unused_data:
        raise CodingError("corrupt code table (wrong length)")
    return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)


def _decode_canonical(body: bytes, n: int) -> np.ndarray:
    if len(body) < _CANON.size:
        raise CodingError("canonical Huffman header truncated")
    alphabet, top, width, interval, table_len = _CANON.unpack_from(body)
    if (not 1 <= alphabet <= MAX_ALPHABET or not 1 <= top <= MAX_CODE_LENGTH or not 1 <= interval <= MAX_SYNC_INTERVAL
            or width != _index_width(interval, top) or n > 8 * len(body)):
        raise CodingError("canonical Huffman header out of range (corrupt or truncated stream)")
    pos = _CANON.size
    if pos + table_len > len(body):
        raise CodingError("canonical Huffman code table truncated")
    lengths = _read_table(body[pos:], alphabet, table_len)
    pos += table_len
    if int(lengths.max()) != top or int(lengths.max()) > MAX_CODE_LENGTH:
        raise CodingError("code table does not match the header (corrupt stream)")
    used = lengths[lengths > 0]
    if int(sum(1 << (top - int(v)) for v in used)) > (1 << top):
        raise CodingError("code lengths violate the Kraft inequality (corrupt stream)")
    lanes = -(-n // interval)
    index_bytes = ((lanes - 1) * width + 7) // 8
    if pos + index_bytes > len(body):
        raise CodingError("sync index truncated")
    from bitalloc.coding.bitpack import unpack_bits

    deltas = unpack_bits(body[pos:pos + index_bytes], width, lanes - 1) if lanes > 1 else np.zeros(0, np.int64)
    pos += index_bytes
    payload = np.frombuffer(body[pos:], dtype=np.uint8)
    total_bits = payload.size * 8
    starts = np.concatenate([[0], np.cumsum(deltas)]).astype(np.int64)
    if starts.size and int(starts[-1]) > total_bits:
        raise CodingError("sync index points past the payload (truncated stream)")
    first, count, order = _canonical_layout(lengths)
    # left-justified limits: a W-bit window v starts with a codeword of length l iff lim[l-2] <= v < lim[l-1]
    lim = np.array([((int(first[l]) + int(count[l])) << (top - l)) for l in range(1, top + 1)], dtype=np.uint64)
    offset = np.concatenate([[0], np.cumsum(count)])[:top + 1]  # symbols with length < l (index l)
    base = (offset - first).astype(np.int64)  # sorted index = base[l] + codeword value
    padded = np.concatenate([payload, np.zeros(8, dtype=np.uint8)])
    windows = np.ndarray(shape=(payload.size + 1,), dtype=">u8", buffer=padded.data, strides=(1,))
    lane_len = np.full(lanes, interval, dtype=np.int64)
    lane_len[-1] = n - interval * (lanes - 1)
    out = np.empty(n, dtype=np.int64)
    ga = 0
    while ga < lanes:  # groups of whole segments spanning at most _GROUP_BITS payload bits
        gb = ga + 1
        while gb < lanes and int(starts[gb + 1] if gb + 1 < lanes else total_bits) - int(starts[ga]) <= _GROUP_BITS:
            gb += 1
        lo_bit = int(starts[ga])
        hi_bit = int(starts[gb]) if gb < lanes else total_bits
        last = gb == lanes
        syms = _decode_group(windows, lim, base, order, top, lo_bit, hi_bit, starts[ga:gb] - lo_bit,
                             lane_len[ga:gb], last)
        if last and (lo_bit + syms[1] + 7) // 8 != payload.size:
            raise CodingError("payload length does not match the decoded codewords (truncated or trailing bytes)")
        first_out = ga * interval
        out[first_out:first_out + syms[0].size] = syms[0]
        ga = gb
    return out


#: payload bits decoded at once by the canonical decoder (bounds its temporary memory to ~ 40 bytes per bit)
_GROUP_BITS = 1 << 22


def _decode_group(windows: np.ndarray, lim: np.ndarray, base: np.ndarray, order: np.ndarray, top: int,
                  lo_bit: int, hi_bit: int, lane_starts: np.ndarray, lane_len: np.ndarray,
                  last: bool) -> tuple[np.ndarray, int]:
    """Decode consecutive segments occupying payload bits [lo_bit, hi_bit), without a per-symbol loop.

    At every bit position p the codeword that would start there is decoded at once (length l(p), symbol);
    next(p) = p + l(p) links positions into chains, and the codeword starts are the positions reachable from
    the segment starts. Short segments: pointer doubling (next^(2^k)); the set closed under k rounds holds
    every position fewer than 2^k steps from a start, so ceil(log2(segment length)) rounds find them all.
    Long segments: all segments advance together, one vectorised gather per step.
    Returns (symbols, end bit of the last codeword relative to lo_bit).
    """
    size = hi_bit - lo_bit
    # the top-bit window at every bit position: one 64-bit word per byte, shifted by 0..7
    first_byte, last_byte = lo_bit >> 3, (hi_bit + 7) >> 3
    words = windows[first_byte:last_byte].astype(np.uint64)
    v = ((words[:, None] << np.arange(8, dtype=np.uint64)) >> np.uint64(64 - top)).reshape(-1)
    v = v[lo_bit - 8 * first_byte:lo_bit - 8 * first_byte + size]
    if top <= 16:  # lookup table of the length for every top-bit window value
        length = (np.searchsorted(lim, np.arange(1 << top, dtype=np.uint64), side="right") + 1).astype(np.int64)[v]
    else:
        length = (np.searchsorted(lim, v, side="right") + 1).astype(np.int64)  # top + 1: no codeword here
    jump = np.arange(size, dtype=np.int64) + length
    jump[(length > top) | (jump > size)] = size  # invalid or past the group: the sentinel
    jump = np.append(jump, size)
    length = np.append(length, top + 1)
    steps = int(lane_len.max())
    rounds = int(steps - 1).bit_length()
    if steps * 500 < rounds * size:
        # long segments: walk all segments in step, one gather per symbol and step (cheaper than doubling)
        p = lane_starts.astype(np.int64)
        cols = np.empty((steps, p.size), dtype=np.int64)
        for t in range(steps):
            cols[t] = p
            p = jump[p]
        starts = cols.T[np.arange(steps)[None, :] < lane_len[:, None]]
    else:
        mark = np.zeros(size + 1, dtype=bool)
        mark[lane_starts] = True
        for k in range(rounds):
            mark[jump[mark]] = True
            if k + 1 < rounds:
                jump = jump[jump]
        starts = np.flatnonzero(mark[:size])
    expected = int(lane_len.sum())
    if starts.size < expected or (not last and starts.size != expected):
        raise CodingError("segments do not decode to the number of symbols the header announces (corrupt stream)")
    starts = starts[:expected]
    ln = length[starts]
    if int(ln.max()) > top:
        raise CodingError("invalid codeword in the payload (corrupt stream)")
    ends = starts + ln
    if not np.array_equal(ends[:-1], starts[1:]):
        raise CodingError("codewords do not follow each other (corrupt stream)")
    seg_first = np.concatenate([[0], np.cumsum(lane_len)[:-1]])
    if not np.array_equal(starts[seg_first], lane_starts):
        raise CodingError("segments do not start where the sync index says (corrupt stream)")
    end = int(ends[-1])
    if end > size or (not last and end != size):
        raise CodingError("the last codeword runs past its segment (truncated stream)")
    code = (v[starts] >> (np.uint64(top) - ln.astype(np.uint64))).astype(np.int64)
    return order[base[ln] + code], end


# ---- sizes without encoding ----------------------------------------------------------------------------------

def canonical_stream_size(counts: np.ndarray, *, sync_interval: int = SYNC_INTERVAL) -> int:
    """Exact byte size of ``encode(symbols, coder="canonical")`` for symbols with histogram ``counts``
    (alphabet = len(counts), from the first to the last used symbol), computed without encoding.

    Used for large activation streams, which need not be materialised: the canonical stream's size depends
    only on the histogram (header, table of code lengths, sync index of fixed-width entries, payload of
    sum_i c_i l_i bits padded to a byte).
    """
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    nz = np.flatnonzero(c)
    n = int(c.sum())
    if nz.size <= 1:
        return _HEAD.size
    c = c[nz[0]:nz[-1] + 1]
    lengths = code_lengths(c)
    payload_bits = int((c * lengths).sum())
    lanes = -(-n // sync_interval)
    width = _index_width(sync_interval, int(lengths.max()))
    index = ((lanes - 1) * width + 7) // 8
    return _HEAD.size + _CANON.size + len(_code_table(lengths)) + index + (payload_bits + 7) // 8


def stream_stats(symbols: Any, *, coder: str = "auto", bits_before: float | None = None,
                 bitpack_bytes: int | None = None) -> tuple[CodeStats, bytes]:
    """Encode ``symbols`` for real and return (:class:`CodeStats`, the stream)."""
    s = _as_symbols(symbols)
    stream = encode(s, coder=coder)
    n = int(s.size)
    if n:
        lo, hi = int(s.min()), int(s.max())
        counts = np.bincount(s - lo, minlength=hi - lo + 1)
    else:
        lo = hi = 0
        counts = np.zeros(1, dtype=np.int64)
    stats = CodeStats(count=n, alphabet=(hi - lo + 1) if n else 0, distinct=int((counts > 0).sum()),
                      entropy=entropy(counts), huffman_bits=huffman_average_length(counts),
                      stored_bits=(8.0 * len(stream) / n) if n else 0.0, stored_bytes=len(stream),
                      coder=KIND_NAMES[stream[0]], bits_before=bits_before, bitpack_bytes=bitpack_bytes)
    return stats, stream


def code_stats(symbols: Any, *, coder: str = "auto", bits_before: float | None = None) -> CodeStats:
    """Entropy, optimal Huffman length and the real coded size (bits/value, table included) of ``symbols``."""
    return stream_stats(symbols, coder=coder, bits_before=bits_before)[0]


__all__ = [
    "CODERS", "CodeStats", "CodingError", "MAX_ALPHABET", "MAX_CODE_LENGTH", "SYNC_INTERVAL", "canonical_codes",
    "canonical_stream_size", "choose_coder", "code_lengths", "code_stats", "decode", "encode", "entropy",
    "histogram", "huffman_average_length", "kraft_sum", "limit_lengths", "stream_stats",
]
