"""The small CNN TRADES used for MNIST-like data: 4 conv + 3 fully connected layers."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from arow.models import MODELS, make_activation

_MIN_IMAGE_SIZE = 16  # smallest side that leaves a 1x1 map after conv-conv-pool-conv-conv-pool


def _feature_side(image_size: int) -> int:
    # Two unpadded 3x3 convs shrink by 4, then a 2x2 max-pool halves (floor); twice.
    return ((image_size - 4) // 2 - 4) // 2


class SmallCNN(nn.Module):
    """conv(C,32,3) conv(32,32,3) pool conv(32,64,3) conv(64,64,3) pool fc200 fc200 fc(classes).

    All activations are ReLU (``activation="silu"`` swaps them). Two deliberate differences from the TRADES reference:
    - no dropout before the second fc layer: dropout makes the forward pass, and so the
      attack, stochastic in train mode (TRADES attacks with the model in train mode there);
    - the last layer keeps PyTorch's default init instead of zeros, so an untrained model
      already has input gradients (an all-zero head gives constant logits and a zero attack
      gradient until the first update).
    The flattened size follows ``image_size``: 64*4*4 for 28x28, 64*5*5 for 32x32.

    >>> SmallCNN(num_classes=10, in_channels=1, image_size=28)(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if image_size < _MIN_IMAGE_SIZE:
            raise ValueError(f"small-cnn needs image_size >= {_MIN_IMAGE_SIZE}, got {image_size}")
        side = _feature_side(image_size)
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, 32, 3),
                relu1=make_activation(activation),
                conv2=nn.Conv2d(32, 32, 3),
                relu2=make_activation(activation),
                pool1=nn.MaxPool2d(2, 2),
                conv3=nn.Conv2d(32, 64, 3),
                relu3=make_activation(activation),
                conv4=nn.Conv2d(64, 64, 3),
                relu4=make_activation(activation),
                pool2=nn.MaxPool2d(2, 2),
            )
        )
        self.classifier = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(64 * side * side, 200),
                relu1=make_activation(activation),
                fc2=nn.Linear(200, 200),
                relu2=make_activation(activation),
                fc3=nn.Linear(200, num_classes),
            )
        )
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@MODELS.register("small-cnn", help="TRADES' 4-conv + 3-fc CNN for MNIST-like data (no dropout)")
def small_cnn(
    *, num_classes: int, in_channels: int, image_size: int, activation: str = "relu"
) -> SmallCNN:
    """TRADES' 4-conv + 3-fc CNN for MNIST-like data (no dropout)."""
    return SmallCNN(
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        activation=activation,
    )
