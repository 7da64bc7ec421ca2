"""Files bitalloc writes: checksums that loading verifies, verification before replacing, modes, fsync,
stale temporary files, and packed files that round-trip exactly (tied weights, integer inputs).

References: every single-byte position of real files with one bit flipped (a SHA-256 trailer must reject
each), the umask arithmetic ``0o666 & ~umask``, the order of ``fsync`` / ``rename`` calls recorded from the
operating system's functions, a writer killed with SIGKILL, and the quantized model's own outputs.
"""

from __future__ import annotations

import copy
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import bitalloc
from bitalloc import io as bio
from bitalloc.coding import packfile
from bitalloc.coding.packfile import pack_model, read_packfile, unpack_model
from bitalloc.errors import BitallocError, CheckpointError, ConfigError
from tests.filecases import checkpoint_case, quantized_case, same

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- checksums --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [checkpoint_case, quantized_case], ids=["checkpoint", "quantized.pt"])
def test_every_single_bit_flip_is_rejected(tmp_path, make):
    case = make(tmp_path)
    bad = tmp_path / f"flipped{case.suffix}"
    bad.write_bytes(case.raw)
    step = max(1, len(case.raw) // 3000)  # >= 3000 positions spread over the file, and its last 64 bytes
    positions = list(range(0, len(case.raw), step)) + list(range(len(case.raw) - 64, len(case.raw)))
    fd = os.open(bad, os.O_WRONLY)
    try:
        for i in positions:  # one bit flipped in place (rewriting the file each time is slow on some disks)
            os.pwrite(fd, bytes([case.raw[i] ^ (1 << (i * 5 % 8))]), i)
            with pytest.raises(CheckpointError) as e:
                case.load(bad)
            msg = str(e.value)
            assert str(bad) in msg and "\n" not in msg, (i, msg)
            os.pwrite(fd, case.raw[i:i + 1], i)
    finally:
        os.close(fd)
    # truncated anywhere, or extended: rejected too
    for n in (0, 1, 100, len(case.raw) // 2, len(case.raw) - 48, len(case.raw) - 1):
        bad.write_bytes(case.raw[:n])
        with pytest.raises(CheckpointError):
            case.load(bad)
    bad.write_bytes(case.raw + b"\0")
    with pytest.raises(CheckpointError, match="truncated or extended"):
        case.load(bad)
    bad.write_bytes(case.raw)
    assert same(case.load(bad), case.expected)


def test_checksum_mismatch_message_and_plain_torch_load(tmp_path):
    from bitalloc.train.checkpoint import load_checkpoint

    case = checkpoint_case(tmp_path)
    path = tmp_path / "ck.pt"
    # PyTorch's zip reader ignores the trailer: the file still opens with torch.load (without the check)
    assert same(torch.load(path, weights_only=True), case.expected)
    data = bytearray(case.raw)
    data[len(data) // 2] ^= 4
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint .*ck\.pt is corrupt: its SHA-256 checksum does not match"
                                              r".*--overwrite"):
        load_checkpoint(path)


def test_files_without_checksum_are_refused_until_adopted(tmp_path):
    from bitalloc.model.serialize import load_quantized
    from bitalloc.train.checkpoint import load_checkpoint

    case = checkpoint_case(tmp_path)
    legacy = tmp_path / "legacy.pt"
    torch.save(case.expected, legacy)  # what bitalloc wrote before checksums
    with pytest.raises(CheckpointError, match=r"legacy\.pt carries no bitalloc checksum .*add_checksum\('.*legacy.pt'\)"):
        load_checkpoint(legacy)
    q_legacy = tmp_path / "legacy-quantized.pt"
    q_case = quantized_case(tmp_path)
    torch.save(torch.load(tmp_path / "quantized.pt", weights_only=True), q_legacy)
    with pytest.raises(CheckpointError, match="quantized model .* carries no bitalloc checksum"):
        load_quantized(q_legacy)
    # the stated way in: add_checksum (for files the user trusts), after which they load as before
    mode = 0o640
    os.chmod(legacy, mode)
    bio.add_checksum(legacy)
    assert same(load_checkpoint(legacy), case.expected) and stat.S_IMODE(legacy.stat().st_mode) == mode
    assert bio.add_checksum(legacy).read_bytes() == legacy.read_bytes()  # idempotent
    bio.add_checksum(q_legacy)
    assert same(q_case.load(q_legacy), q_case.expected)
    data = bytearray(legacy.read_bytes())
    data[10] ^= 1
    legacy.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match: the file is corrupt"):
        bio.add_checksum(legacy)  # never re-seals a damaged file
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file" * 10)
    with pytest.raises(CheckpointError, match="not a readable torch.save file"):
        bio.add_checksum(junk)


class _Custom:
    """An object torch.save pickles but torch.load(weights_only=True) refuses."""


def test_torch_save_refuses_what_it_could_not_load_back(tmp_path):
    path = tmp_path / "x.pt"
    bio.torch_save({"ok": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="would not load back"):
        bio.torch_save({"obj": _Custom()}, path)
    assert path.read_bytes() == before and not list(tmp_path.glob(".x.pt.*"))


# ---- atomic writes: modes, fsync, stale temporary files -------------------------------------------------

@pytest.fixture
def umask():
    """Set the process umask for a test (restored afterwards)."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_new_files_get_the_umask_default_and_replaced_files_keep_their_mode(tmp_path, umask):
    _, q, _ = _tiny_quantized()
    writers = {"json": lambda p: bio.write_json(p, {"a": 1}), "bytes": lambda p: bio.write_bytes(p, b"x"),
               "torch": lambda p: bio.torch_save({"w": torch.zeros(3)}, p),
               "packed": lambda p: pack_model(q, p, example_shape=(6,), overwrite=True, compare_bitpack=False)}
    for mask in (0o022, 0o077, 0o002, 0o027):
        umask(mask)
        for kind, write in writers.items():
            path = tmp_path / f"{kind}-{mask:o}.out"
            write(path)
            assert _mode(path) == 0o666 & ~mask, (kind, oct(mask), oct(_mode(path)))
    umask(0o077)
    for kind, write in writers.items():
        for mode in (0o644, 0o640, 0o604, 0o444):
            path = tmp_path / f"{kind}-keep.out"
            if path.exists():
                os.chmod(path, 0o600)
            path.write_bytes(b"old")
            os.chmod(path, mode)
            write(path)
            assert _mode(path) == mode and path.read_bytes() != b"old", (kind, oct(mode))


def test_fsync_of_the_file_before_the_rename_and_of_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", "folder" if stat.S_ISDIR(st.st_mode) else st.st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = bio.write_json(tmp_path / "r.json", {"a": 1})
    ino = path.stat().st_ino
    expected = [("fsync", ino), ("rename", ino)] + ([("fsync", "folder")] if hasattr(os, "O_DIRECTORY") else [])
    assert events == expected


@pytest.mark.skipif(os.name != "posix", reason="process ids are checked with POSIX kill(pid, 0)")
def test_stale_temporary_files_of_the_same_target_are_removed(tmp_path):
    dead = 2 ** 22 + 12345  # above Linux's largest pid_max: no such process
    old = time.time() - 2 * bio.STALE_SECONDS
    names = {
        f".r.json.{dead}.0badc0de.tmp": (old, True),                # interrupted writer, gone: removed
        ".r.json.ab_x9k2q.tmp": (old, True),                        # mkstemp name of earlier versions: removed
        f".r.json.{dead}.12345678.tmp": (time.time(), False),       # too recent: maybe still being written
        f".r.json.{os.getppid()}.abcdef01.tmp": (old, False),       # its writer still runs
        f".r.json.{os.getpid()}.abcdef02.tmp": (old, False),        # this process's own
        f".other.json.{dead}.0badc0de.tmp": (old, False),           # another target
        ".r.json.backup": (old, False),                             # not a temporary file
    }
    for name, (mtime, _) in names.items():
        (tmp_path / name).write_bytes(b"partial")
        os.utime(tmp_path / name, (mtime, mtime))
    assert bio.stale_temp_files(tmp_path / "r.json") == sorted(tmp_path / n for n, (_, gone) in names.items() if gone)
    bio.write_json(tmp_path / "r.json", {"a": 1})
    for name, (_, gone) in names.items():
        assert (tmp_path / name).exists() != gone, name


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_killed_writer_leaves_the_old_file_and_its_temp_is_cleaned_later(tmp_path):
    target = tmp_path / "model.pt"
    bio.torch_save({"v": torch.tensor(1)}, target)
    before = target.read_bytes()
    script = ("import os, signal, sys\nfrom bitalloc.io import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half' * 1000)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -9, err.decode()[-2000:]
    temps = list(tmp_path.glob(".model.pt.*.tmp"))
    assert len(temps) == 1 and temps[0].name.startswith(f".model.pt.{proc.pid}.")
    assert target.read_bytes() == before
    old = time.time() - 2 * bio.STALE_SECONDS
    os.utime(temps[0], (old, old))
    bio.torch_save({"v": torch.tensor(2)}, target)
    assert not temps[0].exists() and not list(tmp_path.glob(".model.pt.*"))


def test_a_failing_check_leaves_the_previous_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("previous")

    def refuse(tmp):
        assert tmp.read_text().startswith("{")
        raise BitallocError("refused")

    with pytest.raises(BitallocError, match="refused"):
        bio.write_bytes(path, b'{"a": 1}', verify=refuse)
    assert path.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


# ---- packed files: verified before replacing, exact or refused ------------------------------------------

class _Tied(nn.Module):
    """Two Linear layers sharing one weight (quantized at different widths below) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def _tiny_quantized(seed=0):
    torch.manual_seed(seed)
    net = _Tied().eval()
    cfg = bitalloc.preset("minmax", w_bits=8, a_bits=8)
    cfg.first_last_bits = None
    cfg.overrides.append(("b", {"weight.bits": 3}))
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(seed))
    return net, bitalloc.quantize(net, cfg, [(x,)], num_samples=16), x


def test_pack_verifies_the_new_file_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    net, q, x = _tiny_quantized()
    path = tmp_path / "m.bapk"
    pack_model(q, path, example_shape=(6,), float_model=net, compare_bitpack=False)
    previous = path.read_bytes()
    _, q2, _ = _tiny_quantized(seed=1)

    def wrong_unpack(p, model=None, **kw):  # a verification that fails: the restored model differs
        restored = copy.deepcopy(q2)
        with torch.no_grad():
            restored.head.layer.bias.add_(1.0)
        return restored

    monkeypatch.setattr(packfile, "unpack_model", wrong_unpack)
    with pytest.raises(BitallocError, match=r"m\.bapk was left as it was"):
        pack_model(q2, path, example_shape=(6,), float_model=net, overwrite=True, check_inputs=x,
                   compare_bitpack=False)
    assert path.read_bytes() == previous and sorted(p.name for p in tmp_path.iterdir()) == ["m.bapk"]
    monkeypatch.undo()
    pack_model(q2, path, example_shape=(6,), float_model=net, overwrite=True, check_inputs=x, compare_bitpack=False)
    with torch.no_grad():
        assert torch.equal(unpack_model(path, model=net)(x), q2(x))


def test_tied_weights_at_different_widths_round_trip_exactly_or_are_refused(tmp_path, monkeypatch):
    net, q, x = _tiny_quantized()
    assert q.a.layer.weight is q.b.layer.weight  # really one tensor, quantized at 8 and 3 bits
    path = tmp_path / "tied.bapk"
    rep = pack_model(q, path, example_shape=(6,), float_model=net, check_inputs=x, compare_bitpack=False)
    by_name = {l.name: l for l in rep.layers}
    assert by_name["a"].encoding == by_name["b"].encoding == "float" and "shared with" in by_name["b"].note
    assert by_name["head"].encoding in ("huffman", "bitpack")
    restored = unpack_model(path, model=net)
    with torch.no_grad():
        assert torch.equal(restored(x), q(x))
        assert torch.equal(restored.b.quantized_weight(), q.b.quantized_weight())
    # without the shared-weight rule the whole-model check refuses the model instead of writing a wrong file
    monkeypatch.setattr(packfile, "_shared_keys", lambda state: {})
    with pytest.raises(ConfigError, match=r"cannot be packed exactly: .*\ba \(quantized weight\)|cannot be packed "
                                          r"exactly: .*\bb \(quantized weight\)"):
        pack_model(q, tmp_path / "wrong.bapk", example_shape=(6,), compare_bitpack=False)
    assert not (tmp_path / "wrong.bapk").exists() and not list(tmp_path.glob(".wrong*"))


class _Tokens(nn.Module):
    """A model whose input is token ids: an Embedding first, a Linear head tied to it (as language models)."""

    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20, bias=False)
        if tie:
            self.out.weight = self.emb.weight

    def forward(self, t):
        return self.out(torch.relu(self.mix(self.emb(t)))).mean(dim=1)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied-embedding"])
def test_integer_input_models_record_their_dtype_and_unpack(tmp_path, tie):
    from bitalloc.model.serialize import load_quantized, save_quantized

    torch.manual_seed(0)
    net = _Tokens(tie).eval()
    tokens = torch.randint(0, 20, (8, 5), generator=torch.Generator().manual_seed(0))
    q = bitalloc.quantize(net, bitalloc.preset("minmax", w_bits=4, a_bits=8), [(tokens,)], num_samples=8)
    path = tmp_path / "tok.bapk"
    pack_model(q, path, example_shape=(5,), float_model=net, check_inputs=tokens, compare_bitpack=False)
    assert read_packfile(path).manifest["example_dtype"] == "int64"
    restored = unpack_model(path, model=net)
    assert restored.bitalloc_example_dtype == "int64"
    with torch.no_grad():
        assert torch.equal(restored(tokens), q(tokens))
    # the restored model carries its input dtype on: quantized.pt and a second packed file
    save_quantized(restored, tmp_path / "tok.pt", example_shape=(5,))
    again = load_quantized(tmp_path / "tok.pt", net)
    pack_model(again, tmp_path / "tok2.bapk", example_shape=(5,), compare_bitpack=False)
    with torch.no_grad():
        assert torch.equal(again(tokens), q(tokens))
        assert torch.equal(unpack_model(tmp_path / "tok2.bapk", model=net)(tokens), q(tokens))
    _, q6, _ = _tiny_quantized()  # takes 6 floats: a recorded float32 input of the wrong shape is named
    with pytest.raises(ConfigError, match=r"does not run on an input of shape \[2, 5\] and dtype torch.float32"):
        pack_model(q6, tmp_path / "bad.bapk", example_shape=(5,), compare_bitpack=False)
    del q6.bitalloc_example_dtype  # nothing recorded: neither zeros(1, 5) nor integer zeros(1, 5) fit
    with pytest.raises(ConfigError, match="float32 nor int64.*example_dtype"):
        pack_model(q6, tmp_path / "bad.bapk", example_shape=(5,), compare_bitpack=False)


def test_pack_refuses_an_existing_file_before_doing_any_work(tmp_path, monkeypatch):
    _, q, _ = _tiny_quantized()
    target = tmp_path / "m.bapk"
    target.write_bytes(b"precious")
    monkeypatch.setattr(packfile, "pack_bytes", lambda *a, **k: pytest.fail("packed although it must refuse"))
    with pytest.raises(CheckpointError, match="already exists"):
        pack_model(q, target, example_shape=(6,))
    assert target.read_bytes() == b"precious"


def test_hand_edited_checkpoint_fields_are_one_line_errors(tmp_path):
    """Fields a user edited (and re-checksummed) are CheckpointErrors, not AttributeError / ValueError."""
    from torch import nn

    from bitalloc.errors import CheckpointError
    from bitalloc.train.checkpoint import load_model_checkpoint, save_checkpoint

    base = {"format": "bitalloc.train.checkpoint", "version": 1, "model": {"name": "lenet5", "kwargs": {}},
            "model_state": nn.Linear(2, 2).state_dict(), "method": "fp32"}
    for key, value, match in (("model", "x", "model entry"), ("version", "x", "version field"),
                              ("version", 0, "version field"), ("method", 7, "method entry"),
                              ("method", "nope", "does not know")):
        path = tmp_path / f"{key}-{value}.pt"
        save_checkpoint(path, dict(base, **{key: value}))
        with pytest.raises(CheckpointError, match=match):
            load_model_checkpoint(path)
