"""LeNet-5 as used by Bayesian Bits for MNIST.

van Baalen et al., "Bayesian Bits: Unifying Quantization and Pruning", NeurIPS 2020, appendix (MNIST
LeNet-5): 32C5 - MP2 - 64C5 - MP2 - 512FC - 10FC with ReLU, following the "LeNet-5-Caffe" variant used by
Louizos et al. 2017/2018 (L0 regularisation, Bayesian compression). On 28x28 inputs: conv 1->32 5x5 (no
padding) -> 24x24, pool -> 12x12, conv 32->64 5x5 -> 8x8, pool -> 4x4, flatten 64*4*4 = 1024, FC 1024->512,
FC 512->10. All layers have a bias: 582,026 parameters (the Bayesian Bits rebuttal says "about 583k").
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LeNet5", "lenet5"]


class LeNet5(nn.Module):
    """conv(1->32, 5x5) ReLU maxpool2, conv(32->64, 5x5) ReLU maxpool2, FC 1024->512 ReLU, FC 512->classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def lenet5(num_classes: int = 10) -> LeNet5:
    """LeNet-5 (Bayesian Bits MNIST variant) for ``[N, 1, 28, 28]`` inputs."""
    return LeNet5(num_classes)
