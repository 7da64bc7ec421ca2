"""Lossless coding of quantized models: Huffman coding of integer codes, plain bit-packing, the packed model
file (``.bapk``) and activation-code statistics.

* :mod:`bitalloc.coding.huffman`: entropy, optimal (Huffman) code lengths, canonical codes, real coded
  streams (zlib Huffman-only for byte alphabets, a canonical numpy coder up to 2^16 symbols) and their sizes.
* :mod:`bitalloc.coding.bitpack`: codes stored at exactly b bits each (per-channel widths).
* :mod:`bitalloc.coding.packfile`: ``pack_model`` / ``unpack_model`` (bit-identical outputs), ``read_packfile``.
* :mod:`bitalloc.coding.activations`: ``activation_code_stats`` ("average bits per activation").
"""

from bitalloc.coding.activations import ActivationReport, activation_code_stats
from bitalloc.coding.bitpack import pack_bits, pack_codes, packed_size, unpack_bits, unpack_codes
from bitalloc.coding.huffman import (CodeStats, CodingError, canonical_codes, code_lengths, code_stats, decode,
                                     encode, entropy, huffman_average_length, kraft_sum)
from bitalloc.coding.packfile import (PackedModel, PackReport, pack_bytes, pack_model, packfile_summary,
                                      read_packfile, unpack_model)

__all__ = [
    "ActivationReport", "CodeStats", "CodingError", "PackReport", "PackedModel", "activation_code_stats",
    "canonical_codes", "code_lengths", "code_stats", "decode", "encode", "entropy", "huffman_average_length",
    "kraft_sum", "pack_bits", "pack_bytes", "pack_codes", "pack_model", "packed_size", "packfile_summary",
    "read_packfile", "unpack_bits", "unpack_codes", "unpack_model",
]
