"""VGG-7 for CIFAR-10 as used by Relaxed Quantization and Bayesian Bits.

Louizos et al., "Relaxed Quantization for Discretized Neural Networks", ICLR 2019, and van Baalen et al.,
"Bayesian Bits", NeurIPS 2020 (CIFAR-10 VGG-7): 2x(128C3) - MP2 - 2x(256C3) - MP2 - 2x(512C3) - MP2 - 1024FC -
10FC, each 3x3 convolution (padding 1) followed by batch norm and ReLU. Convolutions followed by BN carry no
bias; on 32x32 inputs the flattened features are 512 * 4 * 4 = 8192. 12,978,058 parameters (BN affine parameters included).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGG7", "vgg7"]


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class VGG7(nn.Module):
    """Six 3x3 conv+BN+ReLU layers (128, 128, 256, 256, 512, 512) with max pools, then FC 8192->1024->classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for width in (128, 256, 512):
            layers += _conv_bn_relu(cin, width) + _conv_bn_relu(width, width) + [nn.MaxPool2d(2)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(512 * 4 * 4, 1024),
            nn.ReLU(inplace=True),
            nn.Linear(1024, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg7(num_classes: int = 10) -> VGG7:
    """VGG-7 (Relaxed Quantization / Bayesian Bits CIFAR-10 variant) for ``[N, 3, 32, 32]`` inputs."""
    return VGG7(num_classes)
