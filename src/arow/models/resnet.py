"""CIFAR-style ResNet-18 and PreActResNet-18 (3x3 stride-1 stem, no max-pool).

Same layout as the implementations adversarial-training papers use (ARoW's ResNet-18 is the
common CIFAR one), with any number of input channels and classes, adaptive average pooling so
any image size >= 8 works, and PyTorch's default initialisation as in those implementations.
The activation is ReLU unless ``activation="silu"`` is given (a weightless module per block).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from arow.models import MODELS, make_activation

_MIN_IMAGE_SIZE = 8  # three stride-2 stages; below 8 the last stage only sees padding


def _check_image_size(name: str, image_size: int) -> None:
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"{name} needs image_size >= {_MIN_IMAGE_SIZE}, got {image_size}")


class BasicBlock(nn.Module):
    """conv-BN-act-conv-BN plus a (1x1 conv-BN when the shape changes) shortcut, then act."""

    expansion = 1

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, activation: str = "relu"
    ) -> None:
        super().__init__()
        self.act = make_activation(activation)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN-act-conv-BN-act-conv; the 1x1 shortcut (no BN) reads the pre-activated input."""

    expansion = 1

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, activation: str = "relu"
    ) -> None:
        super().__init__()
        self.act = make_activation(activation)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.act(self.bn2(out)))
        return out + shortcut


def _make_stage(
    block: type[nn.Module],
    in_planes: int,
    planes: int,
    num_blocks: int,
    stride: int,
    activation: str = "relu",
) -> nn.Sequential:
    layers = []
    for s in [stride] + [1] * (num_blocks - 1):
        layers.append(block(in_planes, planes, s, activation))
        in_planes = planes
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem (64 ch), four stages of BasicBlocks (64/128/256/512), avg-pool, fc.

    >>> ResNet([2, 2, 2, 2], num_classes=10, in_channels=3)(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        num_blocks: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act = make_activation(activation)
        self.layer1 = _make_stage(BasicBlock, 64, 64, num_blocks[0], 1, activation)
        self.layer2 = _make_stage(BasicBlock, 64, 128, num_blocks[1], 2, activation)
        self.layer3 = _make_stage(BasicBlock, 128, 256, num_blocks[2], 2, activation)
        self.layer4 = _make_stage(BasicBlock, 256, 512, num_blocks[3], 2, activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.pool(out), 1))


class PreActResNet(nn.Module):
    """Pre-activation ResNet (He et al. 2016) with a final BN-ReLU before pooling.

    The final BN-ReLU follows the adversarial-training versions (Wong et al. 2020, Rice et al.
    2020); without it the last block's sum would be pooled un-normalised.

    >>> PreActResNet([2, 2, 2, 2], num_classes=10, in_channels=3)(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        num_blocks: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = _make_stage(PreActBlock, 64, 64, num_blocks[0], 1, activation)
        self.layer2 = _make_stage(PreActBlock, 64, 128, num_blocks[1], 2, activation)
        self.layer3 = _make_stage(PreActBlock, 128, 256, num_blocks[2], 2, activation)
        self.layer4 = _make_stage(PreActBlock, 256, 512, num_blocks[3], 2, activation)
        self.bn = nn.BatchNorm2d(512)
        self.act = make_activation(activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.act(self.bn(out))
        return self.linear(torch.flatten(self.pool(out), 1))


@MODELS.register(
    "resnet18", help="CIFAR ResNet-18 (BasicBlock [2,2,2,2], 11.17M params for 10 classes)"
)
def resnet18(
    *, num_classes: int, in_channels: int, image_size: int, activation: str = "relu"
) -> ResNet:
    """CIFAR ResNet-18 (BasicBlock [2,2,2,2], 11.17M params for 10 classes)."""
    _check_image_size("resnet18", image_size)
    return ResNet(
        [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels, activation=activation
    )


@MODELS.register("preact-resnet18", help="PreActResNet-18 with final BN-ReLU (11.17M params)")
def preact_resnet18(
    *, num_classes: int, in_channels: int, image_size: int, activation: str = "relu"
) -> PreActResNet:
    """PreActResNet-18 with final BN-ReLU (11.17M params)."""
    _check_image_size("preact-resnet18", image_size)
    return PreActResNet(
        [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels, activation=activation
    )
