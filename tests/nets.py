"""Small models shared by tests: a Conv2d subclass with "same" padding (like EfficientNet-PyTorch's
Conv2dStaticSamePadding), depthwise/grouped convolutions, BatchNorms (foldable and not), Conv1d, an
unsupported ConvTranspose2d and an unused Linear."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SamePadConv(nn.Conv2d):
    """Like EfficientNet-PyTorch's Conv2dStaticSamePadding: a Conv2d subclass with a padding child."""

    def __init__(self, cin, cout, k, stride=1, image_size=16, **kw):
        super().__init__(cin, cout, k, stride, **kw)
        oh = math.ceil(image_size / stride)
        pad = max((oh - 1) * stride + k - image_size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = SamePadConv(3, 8, 3, stride=2, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.bn_shared_out = nn.BatchNorm2d(16)
        self.conv1d = nn.Conv1d(16, 4, 3, padding=1)
        self.tconv = nn.ConvTranspose2d(16, 4, 2)  # unsupported: stays float, listed with reason
        self.unused = nn.Linear(3, 3)  # never called
        self.fc = nn.Linear(4 * 8 + 16 + 4, 10)

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        x = F.relu6(self.bn1(self.dw(x)))
        y = self.pw(x)
        z = self.bn_shared_out(y) + y  # the pw output is used twice: its BN cannot be folded
        t = self.tconv(z).mean(dim=(2, 3))
        s = self.conv1d(z.mean(dim=3)).flatten(1)
        return self.fc(torch.cat([s, z.mean(dim=(2, 3)), t], dim=1))


def make_net(seed=0):
    torch.manual_seed(seed)
    net = Net()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()
