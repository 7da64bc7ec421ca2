"""The packed model file: exact restoration, sizes, verification of truncated / corrupt files, CLI.

References: the quantized model itself (outputs and quantized weights compared with torch.equal), the
float32 arithmetic of the grid (re-quantizing s * (q - z) gives q back), bit-flipped and truncated copies
of real files, and direct recomputation of activation codes with hooks.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch

import bitalloc
from bitalloc.coding import huffman, packfile
from bitalloc.coding.activations import activation_code_stats
from bitalloc.coding.packfile import pack_model, read_packfile, unpack_model
from bitalloc.errors import CheckpointError
from bitalloc.model.layers import quant_layers
from bitalloc.quant.grid import dequantize, fake_quantize, integer_range, quantize
from tests.nets import make_net

SHAPE = (3, 16, 16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is much faster than several on a loaded machine (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, *SHAPE, generator=g),) for _ in range(n // 8)]


def _quantized(preset, w, a, **kw):
    net = make_net()
    cfg = bitalloc.preset(preset, w_bits=w, a_bits=a, **kw)
    data = _data()
    return net, bitalloc.quantize(net, cfg, data), data


CASES = [("minmax", 8, 8, {}), ("minmax", 4, 4, {}), ("aciq", 4, 4, {}), ("aciq", 3.5, 4, {}),
         ("aciq", 3.5, 3.5, {"act_granularity": "channel"}), ("kld", 4, 8, {})]


@pytest.mark.parametrize("preset,w,a,kw", CASES, ids=[f"{p}-W{w}A{a}{'-ch' if kw else ''}" for p, w, a, kw in CASES])
def test_pack_unpack_is_bit_identical(tmp_path, preset, w, a, kw):
    net, q, data = _quantized(preset, w, a, **kw)
    path = tmp_path / "m.bapk"
    rep = pack_model(q, path, example_shape=SHAPE, float_model=net)
    restored = unpack_model(path, model=net)
    x_new = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(9)) * 3
    with torch.no_grad():
        for x in (data[0][0], data[1][0], x_new):
            assert torch.equal(restored(x), q(x))
    for (name, a_layer), (_, b_layer) in zip(quant_layers(q), quant_layers(restored)):
        with torch.no_grad():
            assert torch.equal(a_layer.quantized_weight(), b_layer.quantized_weight()), name
    ref, got = q.state_dict(), restored.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        if not k.endswith(".layer.weight") or k.split(".layer.")[0] not in dict(quant_layers(q)):
            assert torch.equal(ref[k], got[k]), k
    if preset == "aciq":  # bias correction really is in play
        assert any(not torch.all(l.weight_quantizer.corr_shift == 0) for _, l in quant_layers(q))
    if w == 3.5:  # mixed per-channel widths really are in play
        assert any(l.weight_quantizer.bits.unique().numel() > 1 for _, l in quant_layers(q))
    assert rep.file_bytes == path.stat().st_size
    assert rep.metadata_bytes == rep.file_bytes - sum(l.stored_bytes for l in rep.layers)
    for l in rep.layers:
        assert l.encoding in ("huffman", "bitpack")
        assert l.stored_bytes <= l.bitpack_bytes  # "auto" keeps the smaller
        assert l.entropy <= l.huffman_bits < l.entropy + 1 or l.entropy == 0


@pytest.mark.parametrize("codec", ["huffman", "zlib", "canonical", "bitpack"])
def test_every_codec_is_exact_and_codes_match(tmp_path, codec):
    net, q, data = _quantized("aciq", 3.5, 4)
    path = tmp_path / f"{codec}.bapk"
    rep = pack_model(q, path, example_shape=SHAPE, codec=codec, compare_bitpack=False)
    packed = read_packfile(path)
    for name, layer in quant_layers(q):
        p = layer.weight_quantizer.qparams()
        assert torch.equal(packed.codes[name], p.quantize(layer.layer.weight))
        for f in ("bits", "scale", "zero_point", "qmin", "qmax", "corr_scale", "corr_shift"):
            assert torch.equal(getattr(packed.qparams[name], f), getattr(p, f)), (name, f)
    encodings = {l.encoding for l in rep.layers}
    assert encodings == ({"bitpack"} if codec == "bitpack" else {"huffman"})
    if codec in ("zlib", "canonical"):
        assert {l.coder for l in rep.layers} == {codec}
    restored = unpack_model(path, model=net)
    with torch.no_grad():
        assert torch.equal(restored(data[0][0]), q(data[0][0]))


def test_dequantized_codes_requantize_exactly():
    """s * (q - z) re-quantizes to q for random scales over many magnitudes, signed and affine grids up to
    16 bits, per tensor and per channel with mixed widths; the fake-quantized weights agree bitwise."""
    g = torch.Generator().manual_seed(1)
    for bits_list, signed in (([2, 3, 4, 8], True), ([8, 12, 16, 16], True), ([1, 4, 8, 16], False)):
        bits = torch.tensor(bits_list)
        qmin, qmax = integer_range(bits, signed)
        scale = torch.exp(torch.empty(4).uniform_(-25, 8, generator=g)).float()
        zp = torch.zeros(4, dtype=torch.int64) if signed else (torch.rand(4, generator=g) * (qmax + 1)).long()
        span = (qmax - qmin + 1).reshape(4, 1)
        codes = qmin.reshape(4, 1) + (torch.rand(4, 5000, generator=g) * span).long().clamp(max=span - 1)
        codes[:, 0], codes[:, 1] = qmin, qmax  # the extremes
        w = dequantize(codes, scale, zp, 0)
        assert torch.equal(quantize(w, scale, zp, qmin, qmax, 0), codes)
        assert torch.equal(fake_quantize(w, scale, zp, qmin, qmax, 0), w)
        for i in range(4):  # per tensor, and through torch's fused kernel
            wi = dequantize(codes[i], scale[i], zp[i])
            assert torch.equal(quantize(wi, scale[i], zp[i], qmin[i], qmax[i]), codes[i])
            assert torch.equal(fake_quantize(wi, scale[i], zp[i], qmin[i], qmax[i]), wi)


def test_per_tensor_weights_and_float_activations(tmp_path):
    net = make_net()
    cfg = bitalloc.preset("minmax", w_bits=4, a_bits=None)
    cfg.default.weight.granularity = "tensor"
    data = _data()
    q = bitalloc.quantize(net, cfg, data)
    assert all(l.weight_quantizer.scale.ndim == 0 for _, l in quant_layers(q))
    for codec in ("auto", "bitpack"):
        pack_model(q, tmp_path / f"{codec}.bapk", example_shape=SHAPE, codec=codec, compare_bitpack=False)
        restored = unpack_model(tmp_path / f"{codec}.bapk", model=net)
        with torch.no_grad():
            assert torch.equal(restored(data[0][0]), q(data[0][0]))


@pytest.mark.parametrize("bits", [16, 24, 32])
def test_wide_grids_stay_exact(tmp_path, bits):
    """16-bit codes are coded; 24/32-bit grids cannot be restored from codes in float32 (see the module
    docstring), so those layers keep their float weights, and the model still unpacks exactly."""
    net, q, data = _quantized("minmax", bits, bits, first_last_bits=None)
    rep = pack_model(q, tmp_path / "w.bapk", example_shape=SHAPE, compare_bitpack=False, float_model=net,
                     check_inputs=data[0][0])
    assert all(l.encoding in (("huffman", "bitpack") if bits == 16 else ("float", "bitpack")) for l in rep.layers)
    if bits == 32:
        assert all(l.encoding == "float" for l in rep.layers)
    restored = unpack_model(tmp_path / "w.bapk", model=net)
    with torch.no_grad():
        assert torch.equal(restored(data[1][0]), q(data[1][0]))


def test_zoo_model_rebuilds_from_its_name_and_sizes(tmp_path):
    from bitalloc import models

    torch.manual_seed(0)
    net = models.create("lenet5").eval()
    with torch.no_grad():  # bell-shaped weights, as after training (the default init is uniform)
        for p in net.parameters():
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 1, 28, 28, generator=g).clamp(min=0),)]
    q = bitalloc.quantize(net, bitalloc.preset("aciq", w_bits=4, a_bits=4), data, num_samples=8)
    rep = pack_model(q, tmp_path / "lenet.bapk", model_name="lenet5", example_shape=(1, 28, 28),
                     check_inputs=data[0][0])
    restored = unpack_model(tmp_path / "lenet.bapk")  # no model passed: rebuilt from the zoo name
    with torch.no_grad():
        assert torch.equal(restored(data[0][0]), q(data[0][0]))
    t = rep.totals()
    assert rep.fp32_state_dict_bytes > 7 * rep.file_bytes  # 32-bit floats -> ~4-bit codes, entropy-coded
    assert rep.file_bytes < rep.bitpack_file_bytes
    assert t["weight_entropy_bytes"] <= t["weight_stored_bytes"] < t["weight_bitpack_bytes"]
    big = max(rep.layers, key=lambda l: l.values)
    assert big.encoding == "huffman" and big.stored_bits < 4
    summary = packfile.packfile_summary(tmp_path / "lenet.bapk")
    assert summary["model"]["name"] == "lenet5" and [l["name"] for l in summary["layers"]] == [l.name for l in rep.layers]


# ---- corrupt files ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packed_file(tmp_path_factory):
    net, q, data = _quantized("aciq", 4, 4)
    path = tmp_path_factory.mktemp("pack") / "m.bapk"
    pack_model(q, path, example_shape=SHAPE, compare_bitpack=False)
    return net, path, path.read_bytes()


def _rewrite(raw: bytes, manifest_edit) -> bytes:
    """A copy with an edited manifest and a recomputed, valid checksum (tests checks after the checksum)."""
    magic, version, flags, mlen, dlen = struct.unpack_from("<8sIIQQ", raw)
    manifest = json.loads(raw[32:32 + mlen])
    manifest_edit(manifest)
    text = json.dumps(manifest).encode()
    body = struct.pack("<8sIIQQ", magic, version, flags, len(text), dlen) + text + raw[32 + mlen:32 + mlen + dlen]
    return body + hashlib.sha256(body).digest()


def test_truncated_and_corrupt_files_are_clear_errors(tmp_path, packed_file):
    net, path, raw = packed_file
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bad = tmp_path / "bad.bapk"
    for cut in (0, 10, 31, 32, 100, len(raw) // 2, len(raw) - 33, len(raw) - 1):
        bad.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match=r"bad\.bapk.*truncated"):
            unpack_model(bad, model=net)
    for pos in (40, len(raw) // 2, len(raw) - 40, len(raw) - 1):
        flipped = bytearray(raw)
        flipped[pos] ^= 0x10
        bad.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match="checksum"):
            unpack_model(bad, model=net)
    bad.write_bytes(raw + b"junk")
    with pytest.raises(CheckpointError, match="unexpected bytes"):
        unpack_model(bad, model=net)
    bad.write_bytes(b"PK\x03\x04" + raw[4:])
    with pytest.raises(CheckpointError, match="not a bitalloc packed model"):
        unpack_model(bad, model=net)
    future = bytearray(raw)
    future[8:12] = struct.pack("<I", packfile.FORMAT_VERSION + 1)
    bad.write_bytes(bytes(future))
    with pytest.raises(CheckpointError, match="upgrade"):
        unpack_model(bad, model=net)
    with pytest.raises(CheckpointError, match="no such"):
        unpack_model(tmp_path / "missing.bapk", model=net)
    # the caller's float model is never touched
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_inconsistent_manifest_is_caught_after_a_valid_checksum(tmp_path, packed_file):
    net, path, raw = packed_file
    bad = tmp_path / "bad.bapk"

    def blob_out_of_range(m):
        m["blobs"][0][1] += 10 ** 6

    def wrong_count(m):
        m["layers"][1]["codes"]["count"] += 1

    def wrong_shape(m):
        m["layers"][1]["shape"][0] += 1

    def swapped_codes(m):  # another layer's (valid) code stream: wrong count
        m["layers"][1]["codes"]["blob"] = m["layers"][2]["codes"]["blob"]

    def codes_out_of_range(m):  # qmax of the layer lowered below its codes
        m["layers"][2]["qparams"]["qmax"] = m["layers"][2]["qparams"]["qmin"]

    def missing_state(m):
        m["state"].pop()

    def other_config(m):
        m["config"]["fold_bn"] = False

    cases = [(blob_out_of_range, "outside the data section"), (wrong_count, "holds"), (wrong_shape, "shape|holds"),
             (swapped_codes, "symbols|holds|expected"), (codes_out_of_range, "outside their channel"),
             (missing_state, "missing"), (other_config, "differ from the packed")]
    for edit, message in cases:
        bad.write_bytes(_rewrite(raw, edit))
        with pytest.raises(CheckpointError, match=message):
            unpack_model(bad, model=net)


def test_never_overwrites_silently_and_writes_atomically(tmp_path, packed_file):
    net, path, raw = packed_file
    _, q, _ = _quantized("minmax", 8, 8)
    target = tmp_path / "m.bapk"
    target.write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="already exists"):
        pack_model(q, target, example_shape=SHAPE, compare_bitpack=False)
    assert target.read_bytes() == b"precious"
    q.__dict__.pop("bitalloc_example_shape", None)  # a model that does not record its input shape
    with pytest.raises(bitalloc.ConfigError, match="example_shape"):
        pack_model(q, tmp_path / "n.bapk", compare_bitpack=False)
    assert not (tmp_path / "n.bapk").exists() and not list(tmp_path.glob(".n.bapk*"))
    pack_model(q, target, example_shape=SHAPE, overwrite=True, compare_bitpack=False)
    assert read_packfile(target).manifest["format_version"] == packfile.FORMAT_VERSION
    with pytest.raises(CheckpointError, match="pass it"):
        unpack_model(target)  # no model name stored and no model given


# ---- activations -------------------------------------------------------------------------------------------------

def _captured_codes(q, data):
    """Reference: codes of each quantized layer's input, captured with forward pre-hooks on the layers."""
    got = {}

    def hook_for(name, layer):
        def hook(module, inputs):
            p = layer.input_quantizer.qparams()
            axis = p.axis if p.scale.ndim else None
            got.setdefault(name, []).append(p.quantize(inputs[0]).reshape(-1) if axis is None else
                                           quantize(inputs[0], p.scale, p.zero_point, p.qmin, p.qmax, axis).reshape(-1))
        return hook

    hs = [l.register_forward_pre_hook(hook_for(n, l)) for n, l in quant_layers(q) if l.input_quantizer is not None]
    with torch.no_grad():
        for (x,) in data:
            q(x)
    for h in hs:
        h.remove()
    return {k: torch.cat(v).numpy() for k, v in got.items()}


@pytest.mark.parametrize("preset,w,a,kw", [("aciq", 4, 4, {}), ("aciq", 4, 3.5, {"act_granularity": "channel"})])
def test_activation_code_stats_against_direct_capture(preset, w, a, kw):
    _, q, data = _quantized(preset, w, a, **kw)
    rep = activation_code_stats(q, data, num_samples=16)
    ref = _captured_codes(q, data)
    assert rep.samples == 16 and [l.name for l in rep.layers] == list(ref)
    total_bits = total_n = 0
    for l in rep.layers:
        codes = ref[l.name]
        counts = np.bincount(codes - codes.min())
        assert l.values == codes.size
        assert l.entropy == pytest.approx(huffman.entropy(counts), abs=1e-12)
        real = huffman.encode(codes, coder="canonical")
        assert l.huffman_bits == pytest.approx(8 * len(real) / codes.size, abs=1e-12)
        assert l.entropy <= l.stored_bits <= l.huffman_bits
        if l.zlib_bits is not None:
            assert l.zlib_bits == pytest.approx(8 * len(huffman.encode(codes, coder="zlib")) / codes.size, rel=1e-9)
        total_bits += l.stored_bits * l.values
        total_n += l.values
    assert rep.totals()["stored_bits"] == pytest.approx(total_bits / total_n)
    assert rep.totals()["bits_before"] <= 8


def test_activation_code_stats_online_quantizers():
    _, q, data = _quantized("aciq", 4, 4, online=True)
    rep = activation_code_stats(q, data, num_samples=8)
    assert rep.samples == 8 and all(l.online for l in rep.layers)
    for l in rep.layers:  # per-sample grids: the pooled histogram may mix widths, so bound by the alphabet
        assert 0 <= l.entropy <= np.log2(l.alphabet) + 1e-9 and l.entropy <= l.stored_bits
        assert l.bits_before == pytest.approx(8 if l.name in ("stem", "fc") else 4)


# ---- command line ------------------------------------------------------------------------------------------------

def test_cli_pack_and_unpack(tmp_path, capsys):
    from bitalloc import models
    from bitalloc.cli import main
    from bitalloc.model.serialize import load_quantized, save_quantized

    torch.manual_seed(0)
    net = models.create("lenet5").eval()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    q = bitalloc.quantize(net, bitalloc.preset("aciq", w_bits=4, a_bits=8), [(x,)], num_samples=4)
    save_quantized(q, tmp_path / "quantized.pt", model_name="lenet5", example_shape=(1, 28, 28))
    out = tmp_path / "m.bapk"
    assert main(["pack", "--quantized", str(tmp_path / "quantized.pt"), "--out", str(out)]) == 0
    report = json.loads((tmp_path / "m.bapk.json").read_text())
    assert report["pack"]["totals"]["file_bytes"] == out.stat().st_size and report["verified_inputs"] > 0
    assert main(["pack", "--quantized", str(tmp_path / "quantized.pt"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["unpack", str(out), "--out", str(tmp_path / "restored.pt"), "--json", str(tmp_path / "u.json")]) == 0
    restored = load_quantized(tmp_path / "restored.pt")
    with torch.no_grad():
        assert torch.equal(restored(x), q(x))
    assert json.loads((tmp_path / "u.json").read_text())["summary"]["model"]["name"] == "lenet5"
    (tmp_path / "cut.bapk").write_bytes(out.read_bytes()[:1000])
    assert main(["unpack", str(tmp_path / "cut.bapk")]) == 2
    assert "truncated" in capsys.readouterr().err
