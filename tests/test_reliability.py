"""Issue 18 (reliability), part B: no layer reported as quantized that runs in float (PyTorch's transformer
blocks and their fused fast paths, layers that do not run), models with tuple / dict inputs, calibration data
that cannot be represented, and clear errors. Each test failed before its fix."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitalloc
from bitalloc.errors import ConfigError, DataError
from bitalloc.model.attention import ExplicitMultiheadAttention, rewrite_attention
from bitalloc.model.layers import call_counts
from bitalloc.ptq import run_ptq

pytestmark = pytest.mark.usefixtures("one_thread")

W2 = dict(w_bits=2, a_bits=None, first_last_bits=None)  # every Linear at 2 bits, activations float


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights everywhere (MultiheadAttention starts with zero biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if p.ndim > 1 else 0.1))
    return model


def _run_no_grad(model: nn.Module, *args, **kwargs):
    with torch.no_grad():
        return model(*args, **kwargs)


def _quantized_names(q: nn.Module) -> set[str]:
    return {r.name for r in bitalloc.prepare_info(q).quantized()}


def _linear_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


# ---- the explicit attention forms compute exactly what PyTorch's blocks compute ---------------------------

@pytest.mark.parametrize("batch_first,bias,kv,zero,kdim", [
    (True, True, False, False, None), (False, True, False, False, None), (True, False, False, False, None),
    (True, True, True, True, None), (False, True, False, False, 6), (True, False, True, False, 6)])
def test_explicit_multihead_attention_equals_pytorch_in_float64(batch_first, bias, kv, zero, kdim):
    e, h, n, lq, s = 8, 2, 3, 4, 5
    mha = _randomize(nn.MultiheadAttention(e, h, bias=bias, add_bias_kv=kv, add_zero_attn=zero, kdim=kdim, vdim=kdim,
                                           batch_first=batch_first).double().eval())
    explicit = ExplicitMultiheadAttention.from_module(mha)
    assert {n for n, _ in explicit.named_modules() if n} >= {"q_proj", "k_proj", "v_proj", "out_proj"}
    g = torch.Generator().manual_seed(1)
    q = torch.randn(n, lq, e, generator=g, dtype=torch.float64)
    k = torch.randn(n, s, kdim or e, generator=g, dtype=torch.float64)
    v = torch.randn(n, s, kdim or e, generator=g, dtype=torch.float64)
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    kpm = torch.zeros(n, s, dtype=torch.bool)
    kpm[0, -2:] = True
    am = torch.rand(lq, s, generator=g) > 0.6
    am[:, 0] = False
    masks = [{}, {"key_padding_mask": kpm}, {"attn_mask": am}, {"key_padding_mask": kpm, "attn_mask": am},
             {"attn_mask": torch.randn(n * h, lq, s, generator=g, dtype=torch.float64)}]
    for extra, need, avg in itertools.product(masks, (True, False), (True, False)):
        a = _run_no_grad(mha, q, k, v, need_weights=need, average_attn_weights=avg, **extra)
        b = _run_no_grad(explicit, q, k, v, need_weights=need, average_attn_weights=avg, **extra)
        torch.testing.assert_close(b[0], a[0], rtol=0, atol=1e-12)
        assert (a[1] is None) == (b[1] is None)
        if need:
            torch.testing.assert_close(b[1], a[1], rtol=0, atol=1e-12)
    if kdim is None:  # unbatched self-attention
        x = torch.randn(lq, e, generator=g, dtype=torch.float64)
        torch.testing.assert_close(_run_no_grad(explicit, x, x, x)[0], _run_no_grad(mha, x, x, x)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch_first,norm_first", list(itertools.product((True, False), (True, False))))
def test_rewritten_transformer_encoder_equals_pytorch_in_float64(batch_first, norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    enc = _randomize(nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=not norm_first))
    enc = enc.double().eval()
    explicit = copy.deepcopy(enc)
    done = {r.type for r in rewrite_attention(explicit)}
    assert {"MultiheadAttention", "TransformerEncoderLayer"} <= done
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1)
    torch.testing.assert_close(_run_no_grad(explicit, x), _run_no_grad(enc, x), rtol=0, atol=1e-10)
    # with a key padding mask: the same at every unpadded position (the nested-tensor path zeroes padded ones)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    a = _run_no_grad(enc, x, src_key_padding_mask=pad)
    b = _run_no_grad(explicit, x, src_key_padding_mask=pad)
    keep = ~pad if batch_first else ~pad.T
    torch.testing.assert_close(b[keep], a[keep], rtol=0, atol=1e-10)
    # training mode (dropout 0): the regular path on both sides
    torch.testing.assert_close(explicit.train()(x), enc.train()(x), rtol=0, atol=1e-10)


# ---- transformer blocks are really quantized ----------------------------------------------------------------

class _Classifier(nn.Module):
    def __init__(self, body: nn.Module, dim: int = 16, batch_first: bool = True):
        super().__init__()
        self.body, self.head, self.batch_first = body, nn.Linear(dim, 3), batch_first

    def forward(self, x):
        h = self.body(x)
        return self.head(h.mean(dim=1 if self.batch_first else 0))


def _encoder_models(batch_first: bool, norm_first: bool) -> list[nn.Module]:
    torch.manual_seed(0)
    kw = dict(dim_feedforward=32, dropout=0.1, batch_first=batch_first, norm_first=norm_first)
    layer = nn.TransformerEncoderLayer(16, 2, **kw)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, **kw), 2, enable_nested_tensor=False)
    return [_Classifier(layer, batch_first=batch_first).eval(), _Classifier(enc, batch_first=batch_first).eval(),
            nn.TransformerEncoderLayer(16, 2, **kw).eval()]  # a block as the whole model


def _tokens(n: int, batch_first: bool, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, 6, 16, generator=torch.Generator().manual_seed(seed))
    return x if batch_first else x.transpose(0, 1)


@pytest.mark.parametrize("batch_first,norm_first", list(itertools.product((True, False), (True, False))))
def test_transformer_blocks_are_quantized_and_reports_agree(batch_first, norm_first):
    for model in _encoder_models(batch_first, norm_first):
        x = _tokens(4, batch_first)
        calib = [_tokens(8, batch_first, seed=s) for s in range(2)]
        q = bitalloc.quantize(model, bitalloc.preset("minmax", **W2), calib)
        # every Linear of the original, the attention projections included, is quantized and ran
        quantized = _quantized_names(q)
        mhas = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
        assert mhas and quantized == _linear_names(model) | {f"{n}.{p}_proj" for n in mhas for p in "qkv"}
        assert not [r for r in bitalloc.prepare_info(q).floating() if r.type.endswith("Linear")]
        before = call_counts(q)
        y_q, y_f = _run_no_grad(q, x), _run_no_grad(model, x)
        after = call_counts(q)
        assert all(after[n] > before[n] for n in after), "a quantized layer did not run under no_grad"
        # at 2 bits the output really changes (it was bit-identical to float before the fix)
        assert (y_q - y_f).abs().max() > 1e-2 * y_f.abs().max()
        with bitalloc.float_mode(q):
            torch.testing.assert_close(_run_no_grad(q, x), y_f, rtol=1e-4, atol=1e-5)
        # the cost report counts the same layers as quantized, at 2 bits
        cost = bitalloc.cost_report(q, x[:1] if batch_first else x[:, :1])
        assert {l.name for l in cost.layers if l.quantized} == quantized
        assert all(l.w_bits == 2 for l in cost.layers if l.quantized)


def test_transformer_calibration_with_quantized_activations(tmp_path):
    from bitalloc.model.serialize import load_quantized, save_quantized

    model = _encoder_models(True, False)[1]
    calib = [_tokens(8, True, seed=s) for s in range(2)]
    q = bitalloc.quantize(model, bitalloc.preset("aciq", w_bits=4, a_bits=4), calib)  # was: "is the data set empty?"
    layers = dict(bitalloc.quant_layers(q))
    assert all(bool(l.input_quantizer.calibrated) for l in layers.values())
    x = _tokens(4, True, seed=7)
    assert (_run_no_grad(q, x) - _run_no_grad(model, x)).abs().max() > 0
    # saved and loaded (prepared again, rewritten the same way), it computes exactly the same
    save_quantized(q, tmp_path / "q.pt", example_shape=(6, 16))
    assert torch.equal(_run_no_grad(load_quantized(tmp_path / "q.pt", model=model), x), _run_no_grad(q, x))


# ---- a Hugging-Face-style encoder: separate q/k/v/out Linear layers, LayerNorm, GELU, dict inputs ------------

class _HFSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.output = nn.Linear(dim, dim)

    def forward(self, h, mask):
        n, l, d = h.shape
        split = lambda t: t.view(n, l, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + (1.0 - mask[:, None, None, :]) * -1e4
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, l, d)
        return self.output(ctx)


class _HFLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention, self.norm1 = _HFSelfAttention(dim, heads), nn.LayerNorm(dim)
        self.intermediate, self.out, self.norm2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), nn.LayerNorm(dim)

    def forward(self, h, mask):
        h = self.norm1(h + self.attention(h, mask))
        return self.norm2(h + self.out(F.gelu(self.intermediate(h))))


class _HFEncoder(nn.Module):
    """BERT-like: token embeddings, two layers, mean pooling; forward(input_ids, attention_mask)."""

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 2):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([_HFLayer(dim, heads) for _ in range(2)])

    def forward(self, input_ids, attention_mask):
        h = self.embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, attention_mask.float())
        return (h * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True)


def _hf_batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, 7, dtype=torch.long)
    mask[0, 5:] = 0
    return {"input_ids": torch.randint(0, 50, (n, 7), generator=g), "attention_mask": mask}


def test_hugging_face_style_encoder_with_dict_inputs():
    torch.manual_seed(0)
    model = _HFEncoder().eval()
    calib = [_hf_batch(4, s) for s in range(3)] + [(_hf_batch(4, 9), torch.zeros(4))]  # inputs, or (inputs, y)
    for a_bits in (None, 8):  # was: TypeError: unhashable type: 'slice'
        q = bitalloc.quantize(model, bitalloc.preset("minmax", w_bits=2, a_bits=a_bits, first_last_bits=None), calib)
        assert _quantized_names(q) == _linear_names(model)
        x = _hf_batch(4, 5)
        y_q, y_f = _run_no_grad(q, **x), _run_no_grad(model, **x)
        assert (y_q - y_f).abs().max() > 1e-2 * y_f.abs().max()
        cost = bitalloc.cost_report(q, x)
        assert {l.name for l in cost.layers if l.quantized} == _linear_names(model)
        assert cost.layers[[l.name for l in cost.layers].index("layers.0.intermediate")].macs == 7 * 16 * 32
    assert q.bitalloc_calibration["calibration_samples"] == 16
    # integer execution and onnxruntime alignment read the same batches (as before: a tensor's .shape / model(x))
    from bitalloc.runtime import align_for_ort, integer_check

    check = integer_check(q, calib, samples=6)
    assert check.samples == 6 and len(check.layers) == len(_linear_names(model)) and not check.fake_quant_layers
    assert check.output_max_abs_diff <= 1e-3 * check.output_max_abs
    align_for_ort(q, calib)


class _TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x, z):
        return self.head(torch.relu(self.a(x) + self.b(z)))


class _DictArgModel(_TupleModel):
    def forward(self, batch):  # one dict argument, not keyword arguments
        return super().forward(batch["x"], batch["z"])


def test_tuple_and_single_dict_inputs_through_quantize_gptq_and_cost():
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)) for _ in range(3)]
    model = _TupleModel().eval()
    q = bitalloc.quantize(model, bitalloc.preset("aciq-gptq", w_bits=4, a_bits=8), [(xz, 0) for xz in data],
                          num_samples=10)
    assert q.bitalloc_calibration["calibration_samples"] == 10 and _quantized_names(q) == {"a", "b", "head"}
    assert bitalloc.cost_report(q, data[0]).macs == 4 * 8 + 3 * 8 + 8 * 2
    dmodel = _DictArgModel().eval()
    dmodel.load_state_dict(model.state_dict())
    qd = bitalloc.quantize(dmodel, bitalloc.preset("minmax", w_bits=4, a_bits=8), [{"x": x, "z": z} for x, z in data])
    torch.testing.assert_close(_run_no_grad(qd, {"x": data[0][0], "z": data[0][1]}),
                               _run_no_grad(bitalloc.quantize(model, bitalloc.preset("minmax", w_bits=4, a_bits=8),
                                                              [(xz,) for xz in data]), *data[0]))


# ---- a layer is reported as quantized only if its quantizers ran --------------------------------------------

class _FastPath(nn.Module):
    """Reads ``fc``'s weight directly in eval mode under no_grad when no hooks are attached (as PyTorch's fused
    transformer kernels do), calls it as a module otherwise (e.g. while bitalloc traces the model)."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        if not self.training and not torch.is_grad_enabled() and not self.fc._forward_pre_hooks:
            h = F.linear(x, self.fc.weight, self.fc.bias)
        else:
            h = self.fc(x)
        return self.head(torch.relu(h))


def test_a_layer_bypassed_by_a_fast_path_is_listed_in_float():
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="did not run.*fc"):
        q = bitalloc.prepare(_FastPath().eval(), bitalloc.preset("minmax", w_bits=2, a_bits=4), x[:2])
    rec = {r.name: r for r in bitalloc.prepare_info(q).layers}
    assert rec["fc"].status == "float" and "never ran" in rec["fc"].reason and "fast path" in rec["fc"].reason
    assert _quantized_names(q) == {"head"}
    with bitalloc.calibration(q):  # the activation quantizer of fc no longer waits for data it never gets
        q(x)
    assert {l.name for l in bitalloc.cost_report(q, x[:1]).layers if l.quantized} == {"head"}


class _Branchy(nn.Module):
    """``a`` runs only for inputs with a positive mean (data-dependent control flow)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.b(x)
        if float(x.mean()) > 0:
            h = h + self.a(x)
        return self.head(torch.relu(h))


def test_layers_that_do_not_run_in_calibration_or_evaluation_are_float():
    pos = torch.rand(8, 4) + 0.5
    # calibration never runs `a`: it is left in float (before: "no calibration data reached ... data set empty?")
    q = bitalloc.prepare(_Branchy().eval(), bitalloc.preset("minmax", w_bits=4, a_bits=4), pos[:2])
    assert _quantized_names(q) == {"a", "b", "head"}
    with pytest.warns(UserWarning, match="did not run during calibration.*: a"):
        with bitalloc.calibration(q):
            q(-pos)
    rec = {r.name: r for r in bitalloc.prepare_info(q).layers}
    assert rec["a"].status == "float" and "calibration" in rec["a"].reason and _quantized_names(q) == {"b", "head"}
    # the configuration keeps it in float when the model is prepared again (e.g. loading a saved model)
    again = bitalloc.prepare(_Branchy().eval(), bitalloc.prepare_info(q).config, pos[:2])
    assert _quantized_names(again) == {"b", "head"}

    # run_ptq: calibrated with `a`, evaluated without it: the report lists `a` as float
    def evaluate(model):
        with torch.no_grad():
            model(-pos)
        return 50.0, 0.1

    res = run_ptq(_Branchy().eval(), bitalloc.preset("minmax", w_bits=4, a_bits=4), [pos], evaluate)
    rows = {r["name"]: r for r in res.report["layers"]}
    assert rows["a"]["status"] == "float" and not rows["a"]["quantized"] and "evaluation" in rows["a"]["reason"]
    assert rows["b"]["quantized"] and {f["name"] for f in res.report["float_layers"]} == {"a"}


# ---- calibration data that cannot be represented, and clear errors -------------------------------------------

def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def test_calibration_warns_on_outliers_and_constant_data():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(64, 16, generator=g)
    test = torch.randn(256, 16, generator=g)
    cfg = bitalloc.preset("minmax", w_bits=8, a_bits=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ordinary data: no warning
        good = bitalloc.quantize(_mlp(), cfg, [normal])
    spiky = normal.clone()
    spiky[3, 5] = 1e4
    with pytest.warns(UserWarning, match=r"0\.input_quantizer.*dominated by outliers"):
        bad = bitalloc.quantize(_mlp(), cfg, [spiky])
    with pytest.warns(UserWarning, match=r"0\.input_quantizer.*constant"):
        blank = bitalloc.quantize(_mlp(), cfg, [torch.zeros(64, 16)])
    # the premise of the warnings: these grids destroy the output on ordinary data (relative error)
    ref = _run_no_grad(_mlp(), test)
    err = lambda q: float((_run_no_grad(q, test) - ref).norm() / ref.norm())  # noqa: E731
    assert err(good) < 0.05 and err(bad) > 0.5 and err(blank) > 0.5


def test_quantize_num_samples_zero_is_an_error():
    data = [torch.randn(8, 16)]
    with pytest.raises(ConfigError, match="num_samples=0"):  # was: silently 32
        bitalloc.quantize(_mlp(), bitalloc.preset("minmax"), data, num_samples=0)
    q = bitalloc.quantize(_mlp(), bitalloc.preset("minmax"), data * 4, num_samples=5)
    assert q.bitalloc_calibration["calibration_samples"] == 5


def test_inputs_without_tensors_are_a_data_error():
    with pytest.raises(DataError, match="no tensor"):
        bitalloc.quantize(_mlp(), bitalloc.preset("minmax"), [("text", 1)])


def test_a_nan_weight_error_names_the_layer():
    m = _mlp()
    with torch.no_grad():
        m[2].weight[1, 3] = float("nan")
    with pytest.raises(DataError, match=r"layer '2'.*1 NaN"):  # was: "quantization range is not finite"
        bitalloc.quantize(m, bitalloc.preset("minmax"), [torch.randn(4, 16)])


# ---- the command line: options applied or refused, one-line errors ----------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny MNIST folder (IDX files) and checkpoints: LeNet-5 with 10 and with 4 classes, ResNet-20 (3 channels)."""
    import numpy as np

    from bitalloc import models
    from bitalloc.data import write_idx
    from bitalloc.train.checkpoint import model_spec, save_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    (root / "mnist").mkdir()
    for prefix, n in (("train", 48), ("t10k", 24)):
        write_idx(root / "mnist" / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / "mnist" / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    for name, classes, dataset in (("lenet5", 10, "mnist"), ("lenet5", 4, "mnist"), ("resnet20", 10, "cifar10")):
        torch.manual_seed(0)
        m = models.create(name, num_classes=classes)
        save_checkpoint(root / f"{name}-{classes}.pt", {"model": model_spec(m, name, {"num_classes": classes}),
                                                         "model_state": m.state_dict(), "method": "fp32",
                                                         "dataset": dataset})
    return root


def _cli(argv, capsys):
    from bitalloc.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(code, err, *words):
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert all(w in err for w in words), err


def _ptq(tiny, *extra, calib=True):
    return ["ptq", "--data", tiny / "mnist", *(["--calib", 8] if calib else []), "--limit", 16, "--batch-size", 8,
            "--no-plot", *extra]


def test_config_file_with_command_line_options_on_top(tiny, tmp_path, capsys):
    import json

    cfg = {"default": {"weight": {"bits": 8, "granularity": "channel", "symmetric": True}, "act": {"bits": 8}},
           "first_last_bits": None, "calibration_samples": 6}
    (tmp_path / "w8a8.json").write_text(json.dumps(cfg))
    out = tmp_path / "o"
    code, _, err = _cli(_ptq(tiny, "--checkpoint", tiny / "lenet5-10.pt", "--config", tmp_path / "w8a8.json",
                             "--w-bits", 2, "--a-bits", 3, "--override", 'classifier.3={"weight.bits": 8}',
                             "--out", out, calib=False), capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    bits = {l["name"]: (l["w_bits"], l["a_bits"]) for l in report["layers"]}
    # was: W8A8 from the file everywhere, the command line silently dropped
    assert bits == {"features.0": (2, 3), "features.3": (2, 3), "classifier.1": (2, 3), "classifier.3": (8, 3)}
    src = report["config_sources"]
    assert src["config_file"] == str(tmp_path / "w8a8.json") and src["preset"] is None
    assert src["command_line"]["--w-bits"] == 2 and src["command_line"]["--a-bits"] == 3
    assert "--override" in src["command_line"] and "on top of --config" in err
    assert report["timing"]["calibration_samples"] == 6  # the file's calibration_samples (no --calib given)
    assert report["name"].startswith("w8a8 + ")
    # options that cannot apply on top of a file are errors
    code, _, err = _cli(_ptq(tiny, "--checkpoint", tiny / "lenet5-10.pt", "--config", tmp_path / "w8a8.json",
                             "--preset", "minmax", "--out", out), capsys)
    _one_line_error(code, err, "--preset", "--config")
    code, _, err = _cli(_ptq(tiny, "--checkpoint", tiny / "lenet5-10.pt", "--config", tmp_path / "w8a8.json",
                             "--k-sigma", 3, "--out", out), capsys)
    _one_line_error(code, err, "--k-sigma", '"method": "ksigma"', "w8a8.json")


@pytest.mark.parametrize("config,words", [
    ([1, 2], ["JSON object"]),
    ({"overrides": [["fc"]]}, ["pair [PATTERN, {settings}]"]),
    ({"overrides": [["fc", 5]]}, ["'fc'", "dict of settings"]),
    ({"overrides": "fc"}, ["overrides must be a list"]),
    ({"overrides": [[3, {}]]}, ["pair"]),
    ({"default": {"weight": 5}}, ["tensor settings"]),
    ({"default": {"act": {"method": ["x"]}}}, ["method=['x']", "string"]),
    ({"default": {"act": {"options": 3}}}, ["options=3", "dict"]),
    ({"calibration_samples": "many"}, ["calibration_samples", "integer"]),
    ({"overrides": [["features.*", {"act": {"bits": "lots"}}]]}, ["'lots' is not a number"]),
])
def test_malformed_config_files_are_one_line_errors(config, words, tmp_path, capsys):
    import json

    (tmp_path / "c.json").write_text(json.dumps(config))
    code, _, err = _cli(["cost", "--model", "lenet5", "--config", tmp_path / "c.json"], capsys)
    _one_line_error(code, err, "--config", *words)


def test_ignored_model_and_quantization_options_are_errors(tiny, tmp_path, capsys):
    code, _, err = _cli(_ptq(tiny, "--model", "vgg7", "--checkpoint", tiny / "lenet5-10.pt", "--out", tmp_path / "o"),
                        capsys)
    _one_line_error(code, err, "--model vgg7", "does not match", "(lenet5)")  # was: --model silently ignored
    code, _, err = _cli(["cost", "--model", "lenet5", "--fp32", "--w-bits", 2], capsys)
    _one_line_error(code, err, "--fp32", "--w-bits")
    code, _, err = _cli(["cost", "--quantized", tmp_path / "q.pt", "--a-bits", 2], capsys)
    _one_line_error(code, err, "--quantized", "--a-bits")
    code, _, err = _cli(["pack", "--quantized", tmp_path / "q.pt", "--preset", "minmax", "--out", tmp_path / "m.bapk"],
                        capsys)
    _one_line_error(code, err, "--quantized", "--preset")
    code, _, err = _cli(["pack", "--checkpoint", tiny / "lenet5-4.pt", "--data", tiny / "mnist", "--out",
                         tmp_path / "m.bapk"], capsys)
    _one_line_error(code, err, "4 outputs", "10 classes")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv,words", [
    (["--method", "bb", "--w-bits", 2], ["--w-bits", "--method bb", "lsq / pact"]),
    (["--method", "fp32", "--mu", 0.1], ["--mu", "--method fp32", "bb"]),
    (["--method", "lsq", "--pact-decay", 0.1, "--gates", "gumbel"], ["--gates, --pact-decay", "--method lsq"]),
    (["--resume", "--overwrite"], ["--resume", "--overwrite", "give one"]),
    (["--init", "x.pt", "--no-pretrained"], ["--init", "--pretrained"]),
    (["--val-fraction", 0.2], ["--val-fraction", "mnist has one"]),
])
def test_train_options_that_would_be_ignored_are_errors(argv, words, tiny, tmp_path, capsys):
    out = tmp_path / "run.pt"
    code, _, err = _cli(["train", "--model", "lenet5", "--dataset", "mnist", "--data", tiny / "mnist", "--steps", 1,
                         "--out", out, "--progress", "off", *argv], capsys)
    _one_line_error(code, err, *words)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_bit_width_messages_name_the_option_that_exists(capsys):
    code, _, err = _cli(["cost", "--model", "lenet5", "--w-bits", 1], capsys)
    _one_line_error(code, err, "--w-bits", "at least 2")
    assert "--min-bits" not in err  # was: "widen the bounds (--min-bits ...)", which refuses 1
    code, _, err = _cli(["cost", "--model", "lenet5", "--w-bits", 33], capsys)
    _one_line_error(code, err, "--w-bits", "<= 32")
    assert "max_bits" not in err  # was: "max_bits=33 (default weight) is out of range"
    with pytest.raises(ConfigError, match=r"^bits \(w\)=33 is out of range"):  # the API names the budget too
        bitalloc.config.TensorConfig(bits=33, granularity="channel", symmetric=True, allocate=True,
                                     max_bits=33).validate("w")


def test_ptq_checks_the_data_before_creating_the_output_folder(tiny, tmp_path, capsys):
    out = tmp_path / "never"
    code, _, err = _cli(["ptq", "--checkpoint", tiny / "lenet5-10.pt", "--data", tmp_path / "missing", "--out", out],
                        capsys)
    _one_line_error(code, err, "missing")
    assert not out.exists()  # was: created before the data were checked


@pytest.mark.parametrize("checkpoint,words", [
    ("resnet20-10.pt", ["resnet20 does not run on mnist inputs", "3 channels", "--dataset"]),
    ("lenet5-4.pt", ["4 outputs", "mnist has 10 classes"]),
])
def test_a_checkpoint_that_does_not_fit_the_data_set(checkpoint, words, tiny, tmp_path, capsys):
    code, _, err = _cli(_ptq(tiny, "--checkpoint", tiny / checkpoint, "--dataset", "mnist", "--out", tmp_path / "o"),
                        capsys)
    _one_line_error(code, err, *words)  # was: RuntimeError / IndexError tracebacks


@pytest.mark.parametrize("key,value,words", [
    ("model.kwargs", {"num_classes": 10, "width": 2}, ["unknown argument", "width"]),
    ("model.name", 5, ["model name 5"]),
    ("model.kwargs.num_classes", "ten", ["num_classes='ten'"]),
    ("model.kwargs.num_classes", 10**12, ["num_classes=", "from 1 to 100000"]),
    ("dataset", 5, ["records the data set 5"]),
])
def test_hand_edited_checkpoint_fields(key, value, words, tiny, tmp_path, capsys):
    from bitalloc.train.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(tiny / "lenet5-10.pt")
    *path, last = key.split(".")
    d = state
    for part in path:
        d = d[part]
    d[last] = value
    save_checkpoint(tmp_path / "edited.pt", state)  # a valid file (checksum included), with an edited field
    code, _, err = _cli(_ptq(tiny, "--checkpoint", tmp_path / "edited.pt", "--out", tmp_path / "o"), capsys)
    _one_line_error(code, err, *words)


# ---- data files: one-line errors, not tracebacks ----------------------------------------------------------

def _image_tree(root, size=8):
    import numpy as np
    from PIL import Image

    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((size, size, 3), 40 * k, np.uint8)).save(root / cls / f"{k}.png")
    return root


def test_decompression_bomb_image_is_a_data_error(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from bitalloc.data import load_dataset

    _image_tree(tmp_path / "imgs", size=32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32 x 32 = 1024 pixels > 2 x 100: PIL's bomb error
    ds = load_dataset("imagefolder", tmp_path / "imgs", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match=r"cat/0\.png is too large to decode safely"):  # was: DecompressionBombError
        ds[0]


def _zip_of(tree, path):
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for p in sorted(tree.rglob("*.png")):
            z.write(p, p.relative_to(tree).as_posix())
    return path


def test_corrupt_and_unsupported_zip_members_are_data_errors(tmp_path):
    import struct
    import zipfile

    from bitalloc.data import ImageFolder

    zpath = _zip_of(_image_tree(tmp_path / "imgs", size=16), tmp_path / "imgs.zip")
    raw = bytearray(zpath.read_bytes())
    with zipfile.ZipFile(zpath) as z:
        info = z.getinfo("cat/0.png")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    # a corrupt DEFLATE stream in the first member
    bad = bytearray(raw)
    bad[start: start + info.compress_size] = bytes(info.compress_size)
    (tmp_path / "deflate.zip").write_bytes(bad)
    with pytest.raises(DataError, match="cat/0.png"):
        ImageFolder(tmp_path / "deflate.zip")[0]
    # "version needed to extract" 9.9 in the central directory: zipfile raises NotImplementedError
    cd = raw.find(b"PK\x01\x02")
    unsupported = bytearray(raw)
    struct.pack_into("<H", unsupported, cd + 6, 99)
    (tmp_path / "version.zip").write_bytes(unsupported)
    with pytest.raises(DataError, match="version.zip"):
        ImageFolder(tmp_path / "version.zip")[0]


def test_missing_split_folder_names_options_that_exist(tmp_path):
    from bitalloc.data import load_dataset

    _image_tree(tmp_path / "flat")  # class folders at the root: no train / test
    with pytest.raises(DataError, match="no 'train' folder") as exc:
        load_dataset("cifar10", tmp_path / "flat", "train", cache_dir=tmp_path / "cache")
    assert "--dataset imagefolder" in str(exc.value)  # the command line has no split option


def test_packed_format_version_zero_is_corruption_not_an_old_bitalloc(tmp_path):
    import struct

    from bitalloc.coding import pack_model, unpack_model
    from bitalloc.errors import CheckpointError

    q = bitalloc.quantize(_mlp(), bitalloc.preset("minmax"), [torch.randn(8, 16)])
    path = tmp_path / "m.bapk"
    pack_model(q, path, example_shape=(16,))
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 8, 0)  # the u32 format version after the 8 magic bytes
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match="version 0 does not exist") as exc:
        unpack_model(path, model=_mlp())
    assert "upgrade" not in str(exc.value)  # was: "upgrade bitalloc"


def test_sweep_passes_method_options_after_dashes_to_their_methods_only(capsys):
    from bitalloc.cli import build_parser
    from bitalloc.cli.sweep import check_train_args, method_train_args

    parser = build_parser()
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]
    extra = ["--batch-size", "32", "--gate-lr", "0.1", "--skip-below", "-2", "--no-prune", "--q-lr=0.01"]
    assert method_train_args(extra, "bb", train) == ["--batch-size", "32", "--gate-lr", "0.1", "--skip-below", "-2",
                                                     "--no-prune"]
    assert method_train_args(extra, "lsq", train) == ["--batch-size", "32", "--q-lr=0.01"]
    check_train_args(extra, ["bb", "lsq"], train)
    with pytest.raises(ConfigError, match="--gate-lr.*--method bb.*does not train"):
        check_train_args(extra, ["lsq", "pact"], train)
