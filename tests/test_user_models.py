"""The user's own model on the command line and through the API: a factory in a file (imported only with
--trust-code), a weights file, image-folder preprocessing, tensor-file inputs (tuple / dict, token ids) with
evaluation by agreement with the FP32 model, in every command that takes a model."""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest
import torch

import bitalloc
from bitalloc.cli import main
from bitalloc.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL_FILE = textwrap.dedent('''
    import torch
    from torch import nn
    from bitalloc.models.bert import bert_encoder

    class Net(nn.Module):
        def __init__(self, num_classes=3, width=6):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.fc = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    def build(num_classes=3, width=6):
        return Net(num_classes, width)

    def encoder():
        torch.manual_seed(0)
        return bert_encoder(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16)

    def outlier_encoder():  # LayerNorm output channels 40x the others, as trained BERTs have
        m = encoder()
        with torch.no_grad():
            for layer in m.encoder.layer:
                layer.attention.output.LayerNorm.weight[[2, 9]] = 40.0
        return m

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(3, 8), nn.Linear(8, 5)

        def forward(self, x, z):
            return self.head(torch.relu(self.a(x) + self.b(z)))

    def two_inputs():
        torch.manual_seed(1)
        return TwoInputs()
''')


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def user(tmp_path):
    """The model file, its trained-looking weights, an image folder and two tensor files."""
    from PIL import Image

    (tmp_path / "net.py").write_text(MODEL_FILE)
    torch.manual_seed(0)
    ns: dict = {}
    exec(MODEL_FILE, ns)  # the same classes, to write weights
    torch.save(ns["build"]().state_dict(), tmp_path / "net.pt")
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "img" / f"c{c}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (14, 18, 3), dtype=np.uint8)).save(tmp_path / "img" / f"c{c}" / f"{i}.png")
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(40, 9, dtype=torch.long)
    mask[::3, 6:] = 0
    torch.save({"input_ids": torch.randint(1, 40, (40, 9), generator=g), "attention_mask": mask}, tmp_path / "tok.pt")
    torch.save([(torch.randn(4, generator=g), torch.randn(3, generator=g)) for _ in range(30)], tmp_path / "two.pt")
    return tmp_path


def test_ptq_on_a_factory_in_a_file_needs_trust_code(user, capsys):
    args = ["ptq", "--model", f"{user}/net.py:build", "--weights", str(user / "net.pt"), "--dataset", "imagefolder",
            "--data", str(user / "img"), "--calib", "6", "--out", str(user / "out"), "--no-plot"]
    code, _, err = run(args, capsys)
    assert code == 2 and "--trust-code" in err and "net.py" in err and not (user / "out").exists()
    code, out, err = run(args + ["--trust-code", "--input-size", "12", "--mean", "0.5", "--std", "0.25",
                                 "--preset", "minmax", "--w-bits", "4", "--a-bits", "8"], capsys)
    assert code == 0, err
    report = json.loads((user / "out" / "report.json").read_text())
    assert report["model"] == f"{user}/net.py:build" and report["preprocess"].startswith("custom(resize=14,crop=12")
    assert [(l["name"], l["w_bits"]) for l in report["layers"]] == [("conv", 8), ("fc", 8)]  # first and last
    # the weights were loaded: the FP32 accuracy is the loaded model's on the 12 evaluation images
    assert 0 <= report["fp32_top1"] <= 100 and report["dataset"] == "imagefolder"


def test_preprocessing_matches_a_hand_written_pipeline(user):
    """--resize / --crop / --mean / --std give torchvision-style preprocessing, checked against PIL + numpy."""
    import argparse

    from PIL import Image

    from bitalloc.cli.model_args import preprocess_from_args

    ns = argparse.Namespace(input_size=None, resize=16, crop=10, mean="127", std="128")
    pre = preprocess_from_args(ns, "imagefolder")
    img = Image.open(user / "img" / "c0" / "0.png")
    w, h = img.size  # 18 x 14: short side 14 -> 16, long side int(16 * 18 / 14) = 20
    ref = np.asarray(img.convert("RGB").resize((20, 16), Image.BILINEAR), dtype=np.float64)
    top, left = round((16 - 10) / 2), round((20 - 10) / 2)
    ref = (ref[top:top + 10, left:left + 10] - 127.0) / 128.0
    assert np.allclose(pre(img).numpy().transpose(1, 2, 0), ref, atol=1e-6)
    with pytest.raises(ConfigError, match="fixed preprocessing"):
        preprocess_from_args(ns, "mnist")
    with pytest.raises(ConfigError, match="smaller than the crop"):
        preprocess_from_args(argparse.Namespace(input_size=None, resize=8, crop=10, mean=None, std=None), "imagenet")


def test_ptq_with_dict_token_inputs_evaluates_agreement(user, capsys):
    out = user / "enc"
    code, stdout, err = run(["ptq", "--model", f"{user}/net.py:encoder", "--trust-code", "--inputs",
                             str(user / "tok.pt"), "--calib", "16", "--preset", "minmax", "--w-bits", "8", "--a-bits",
                             "8", "--out", str(out), "--no-plot"], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    ag = report["agreement"]
    assert ag["samples"] == 24 and report["fp32_top1"] == 100.0 and report["top1"] == ag["top1_agreement"]
    assert 0.99 < ag["cosine"] <= 1.0 and ag["sqnr_db"] > 20 and "SQNR" in stdout
    kinds = {l.get("kind", "layer") for l in report["layers"]}
    assert {"matmul", "softmax"} <= kinds  # attention products are counted (in float)
    firsts = [l["name"] for l in report["layers"] if "first layer at 8 bits" in l.get("rules", [])]
    assert firsts == [f"encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value")]


def test_ptq_refuses_static_activations_on_outlier_channels(user, capsys):
    """The CLI refuses a static per-tensor W8A8 preset on a model whose token features have outlier channels (exit
    2, one line naming the layer and the fixes, nothing written); --allow-act-outliers and --preset smoothquant
    quantize it."""
    base = ["ptq", "--model", f"{user}/net.py:outlier_encoder", "--trust-code", "--inputs", str(user / "tok.pt"),
            "--calib", "16", "--w-bits", "8", "--a-bits", "8", "--no-plot"]
    code, _, err = run(base + ["--preset", "minmax", "--out", str(user / "a")], capsys)
    assert code == 2 and "cannot serve this model" in err and "--allow-act-outliers" in err
    assert len(err.strip().splitlines()) == 1 and not (user / "a").exists()
    code, _, err = run(base + ["--preset", "minmax", "--allow-act-outliers", "--out", str(user / "b")], capsys)
    assert code == 0, err
    report = json.loads((user / "b" / "report.json").read_text())
    assert report["config"]["act_outliers"] == "allow"
    rows = report["calibration"]["activation_outliers"]  # the ratios, in the report
    assert any(r["flagged"] and r["ratio"] > 16 for r in rows) and all(r["bits"] == 8 for r in rows)
    code, _, err = run(base + ["--preset", "smoothquant", "--out", str(user / "c")], capsys)
    assert code == 0, err


def test_tuple_inputs_from_a_list_of_samples(user, capsys):
    code, _, err = run(["ptq", "--model", f"{user}/net.py:two_inputs", "--trust-code", "--inputs",
                        str(user / "two.pt"), "--calib", "10", "--preset", "minmax", "--w-bits", "8", "--a-bits", "8",
                        "--out", str(user / "two"), "--no-plot"], capsys)
    assert code == 0, err
    report = json.loads((user / "two" / "report.json").read_text())
    assert report["agreement"]["samples"] == 20 and {l["name"] for l in report["layers"]} == {"a", "b", "head"}


def test_cost_of_a_factory_model_with_token_inputs(user, capsys):
    code, _, err = run(["cost", "--model", f"{user}/net.py:encoder", "--trust-code", "--inputs", str(user / "tok.pt"),
                        "--preset", "minmax", "--w-bits", "8", "--a-bits", "8", "--json", str(user / "c.json")], capsys)
    assert code == 0, err and "computed in float" in err
    layers = json.loads((user / "c.json").read_text())["layers"]
    mm = [l for l in layers if l["kind"] == "matmul"]
    assert len(mm) == 4 and all(l["macs"] == 2 * 9 * 9 * 8 and not l["quantized"] for l in mm)  # heads x T x T x d
    code, _, err = run(["cost", "--model", f"{user}/net.py:encoder", "--trust-code"], capsys)
    assert code == 2 and "--input-shape" in err and "--inputs" in err


def test_export_pack_bench_train_on_a_factory(user, capsys, tmp_path):
    pytest.importorskip("onnxruntime")
    net = ["--model", f"{user}/net.py:build", "--trust-code", "--weights", str(user / "net.pt")]
    data = ["--dataset", "imagefolder", "--data", str(user / "img"), "--input-size", "12", "--calib", "6"]
    code, _, err = run(["export", "onnx", *net, *data, "--out", str(tmp_path / "n.onnx"), "--verify"], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "n.json").read_text())
    assert rep["verify"]["samples"] == 12 and rep["verify"]["top1_agreement"] >= 90
    # token ids through onnxruntime with align ort (the Gather output stays float, the ids int64)
    code, _, err = run(["export", "onnx", "--model", f"{user}/net.py:encoder", "--trust-code", "--inputs",
                        str(user / "tok.pt"), "--calib", "16", "--align", "ort", "--out", str(tmp_path / "e.onnx"),
                        "--verify"], capsys)
    assert code == 0, err
    # pack / unpack a factory model (the file records the factory: unpacking needs --trust-code too)
    code, _, err = run(["pack", *net, *data, "--preset", "minmax", "--out", str(tmp_path / "n.bapk")], capsys)
    assert code == 0, err
    code, _, err = run(["unpack", str(tmp_path / "n.bapk")], capsys)
    assert code == 2 and "--trust-code" in err
    code, _, err = run(["unpack", str(tmp_path / "n.bapk"), "--trust-code"], capsys)
    assert code == 0, err
    # bench cpu on tensor inputs without labels: "top-1" is the agreement with the FP32 model
    code, _, err = run(["bench", "cpu", "--model", f"{user}/net.py:two_inputs", "--trust-code", "--inputs",
                        str(user / "two.pt"), "--calib", "10", "--configs", "minmax/8x8/none", "--batch-sizes", "1",
                        "--runs", "1", "--min-seconds", "0", "--warmup", "0", "--no-anchors", "--out",
                        str(tmp_path / "bench")], capsys)
    assert code == 0, err
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert bench["rows"][0]["top1"] == 100.0 and bench["labels"].startswith("none")
    # train --init from a plain state_dict, then ptq from the checkpoint (its factory needs --trust-code again)
    ckpt = tmp_path / "t.pt"
    code, _, err = run(["train", "--model", f"{user}/net.py:build", "--trust-code", "--model-kwargs",
                        '{"width": 6}', "--dataset", "imagefolder",
                        "--data", str(user / "img"), "--transform", "to-tensor", "--init", str(user / "net.pt"),
                        "--steps", "2", "--batch-size", "4", "--out", str(ckpt), "--progress", "off"], capsys)
    assert code == 0, err
    start = torch.load(user / "net.pt")
    assert ckpt.exists() and set(start) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    ptq = ["ptq", "--checkpoint", str(ckpt), *data, "--preset", "minmax", "--out", str(tmp_path / "p"), "--no-plot"]
    code, _, err = run(ptq, capsys)
    assert code == 2 and "--trust-code" in err
    code, _, err = run(ptq + ["--trust-code"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("extra, message", [
    (["--model", "lenet5", "--weights", "w.pt"], "--weights"),
    (["--model", "x.py:f", "--trust-code", "--model-kwargs", "[1]"], "JSON object"),
    (["--model", "nope.py:f", "--trust-code"], "does not exist"),
    (["--model", "bitalloc.models.bert:bert_encoder", "--inputs", "missing.pt", "--dataset", "mnist"], "--dataset"),
])
def test_user_model_errors_are_one_line(extra, message, capsys, tmp_path):
    code, _, err = run(["ptq", *extra, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_import_factory_and_weights(tmp_path):
    from bitalloc.models.user import build_user_model, import_factory, load_weights, read_state_dict
    from bitalloc.errors import CheckpointError

    (tmp_path / "m.py").write_text(MODEL_FILE)
    with pytest.raises(ConfigError, match="trust_code=True"):
        import_factory(f"{tmp_path}/m.py:build", hint="trust_code=True")
    with pytest.raises(ConfigError, match="no attribute"):
        import_factory(f"{tmp_path}/m.py:nothing", trust_code=True)
    assert import_factory("bitalloc.models.bert:bert_encoder") is not None  # bitalloc's own: no trust needed
    model = build_user_model(f"{tmp_path}/m.py:build", trust_code=True, kwargs={"width": 4})
    state = {f"module.{k}": v + 1 for k, v in model.state_dict().items()}  # saved from DistributedDataParallel
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "w.pt")
    assert set(read_state_dict(tmp_path / "w.pt")) == set(model.state_dict())
    load_weights(model, tmp_path / "w.pt")
    assert torch.equal(model.fc.bias, state["module.fc.bias"])
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_weights(model, tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_weights(model, tmp_path / "junk.pt")


def test_tensor_files(tmp_path):
    from bitalloc.data.tensors import load_tensor_inputs
    from bitalloc.errors import DataError

    x = torch.randn(5, 3)
    torch.save({"inputs": x, "labels": torch.arange(5)}, tmp_path / "l.pt")
    s = load_tensor_inputs(tmp_path / "l.pt")
    assert s.labelled and len(s) == 5 and [b[0].shape[0] for b in s.batches(2)] == [2, 2, 1]
    assert torch.equal(torch.cat([b[0] for b in s.batches(2)]), x) and torch.equal(s.subset([4, 0]).labels,
                                                                                  torch.tensor([4, 0]))
    torch.save([{"a": torch.zeros(3)}, {"a": torch.zeros(4)}], tmp_path / "ragged.pt")
    with pytest.raises(DataError, match="pad them"):
        load_tensor_inputs(tmp_path / "ragged.pt")
    torch.save((torch.zeros(4, 2), torch.zeros(3, 2)), tmp_path / "sizes.pt")
    with pytest.raises(DataError, match="first"):
        load_tensor_inputs(tmp_path / "sizes.pt")
    torch.save({"inputs": x, "labels": torch.zeros(5)}, tmp_path / "fl.pt")
    with pytest.raises(DataError, match="integer"):
        load_tensor_inputs(tmp_path / "fl.pt")


def test_output_agreement_against_direct_formulas():
    from bitalloc.report.stats import output_agreement

    rng = np.random.default_rng(0)
    r = rng.normal(size=(6, 4))
    o = r + 0.1 * rng.normal(size=(6, 4))
    a = output_agreement(r, o)
    cos = [float(np.dot(r[i], o[i]) / np.linalg.norm(r[i]) / np.linalg.norm(o[i])) for i in range(6)]
    assert math.isclose(a.cosine, sum(cos) / 6, rel_tol=1e-12) and math.isclose(a.cosine_min, min(cos))
    assert math.isclose(a.sqnr_db, 10 * math.log10((r ** 2).sum() / ((r - o) ** 2).sum()))
    assert a.top1_agreement == 100 * np.mean(r.argmax(1) == o.argmax(1))
    nn = lambda m: [max((j for j in range(6) if j != i), key=lambda j: np.dot(m[i], m[j]) / np.linalg.norm(m[j]))
                    for i in range(6)]  # noqa: E731
    assert a.nn_agreement == 100 * np.mean(np.array(nn(r)) == np.array(nn(o)))
    assert output_agreement(r, r).sqnr_db == math.inf


def test_import_bitalloc_gives_runtime_and_pack_without_example_shape(tmp_path):
    import bitalloc as b
    from bitalloc.coding import pack_model, unpack_model
    from bitalloc.models.bert import bert_encoder

    assert callable(b.runtime.integer_mode)
    torch.manual_seed(0)
    model = bert_encoder(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=8).eval()
    ids = torch.randint(1, 30, (6, 5), generator=torch.Generator().manual_seed(1))
    q = bitalloc.quantize(model, bitalloc.preset("minmax", 4, 8), [ids])
    assert q.bitalloc_example_shape == (5,) and q.bitalloc_example_dtype == "int64"
    pack_model(q, tmp_path / "m.bapk")  # no example_shape: the model from quantize() carries it
    assert torch.equal(unpack_model(tmp_path / "m.bapk", model=model)(ids), q(ids))
