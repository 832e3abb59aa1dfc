"""WideResNet (Zagoruyko & Komodakis 2016), the variant TRADES and ARoW train.

Stem conv with 16 channels, three groups of pre-activation (BN-ReLU-conv) blocks with
16k/32k/64k channels (k = widen factor), final BN-ReLU, average pool, fc. Differences from the
TRADES reference file, all deliberate: any ``in_channels``, adaptive pooling instead of a fixed
8x8 pool (the reference hard-codes 3x32x32 inputs), and no unused ``sub_block1`` (the reference
defines it but never calls it; load its checkpoints with ``strict=False`` or drop those keys).

Registered sizes: WRN-34-10 (TRADES, ARoW) and WRN-28-10 / WRN-70-16, the sizes of the
generated-data papers (Gowal et al. 2020, Wang et al. 2023), usually with ``activation="silu"``.
Their PyTorch WRN has the same layers and parameter count but BatchNorm momentum 0.01 (here
PyTorch's 0.1) and TensorFlow-style "SAME" padding of the stride-2 convs (right and bottom only).
The activation (ReLU by default) is a module per block, so it holds no weights and any
activation loads the same checkpoint keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from arow.models import MODELS, make_activation

_MIN_IMAGE_SIZE = 8


class WideBlock(nn.Module):
    """BN-act-conv3x3-BN-act-(dropout)-conv3x3 plus the identity or a 1x1 conv shortcut.

    When the shape changes, the shortcut reads the pre-activated input (as in the reference).
    """

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        stride: int,
        drop_rate: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.act = make_activation(activation)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut: nn.Module | None = None
        if in_planes != out_planes or stride != 1:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.act(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(act)
        out = self.act(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``; ``depth`` = 6n + 4 with n blocks per group.

    >>> WideResNet(10, 1, num_classes=10, in_channels=3)(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> WideResNet(10, 1, activation="silu").act
    SiLU()
    """

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, ..., 34), got {depth}"
            )
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._group(widths[0], widths[1], n, 1, drop_rate, activation)
        self.block2 = self._group(widths[1], widths[2], n, 2, drop_rate, activation)
        self.block3 = self._group(widths[2], widths[3], n, 2, drop_rate, activation)
        self.bn = nn.BatchNorm2d(widths[3])
        self.act = make_activation(activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        # The reference init: He normal with fan_out for convs, unit BN, zero linear bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _group(
        in_planes: int, out_planes: int, n: int, stride: int, drop_rate: float, activation: str
    ) -> nn.Sequential:
        return nn.Sequential(
            *[
                WideBlock(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    drop_rate,
                    activation,
                )
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.act(self.bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))


def wide_resnet(
    depth: int,
    widen_factor: int,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    drop_rate: float = 0.0,
    activation: str = "relu",
) -> WideResNet:
    """Build WRN-``depth``-``widen_factor``; tests use a tiny one.

    >>> model = wide_resnet(10, 1, num_classes=10, in_channels=1, image_size=28)
    >>> model(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"WideResNet needs image_size >= {_MIN_IMAGE_SIZE}, got {image_size}")
    return WideResNet(
        depth,
        widen_factor,
        num_classes=num_classes,
        in_channels=in_channels,
        drop_rate=drop_rate,
        activation=activation,
    )


@MODELS.register(
    "wrn-34-10", help="WideResNet-34-10 as in TRADES/ARoW (46.16M params for 10 classes)"
)
def wrn_34_10(
    *, num_classes: int, in_channels: int, image_size: int, activation: str = "relu"
) -> WideResNet:
    """WideResNet-34-10 as in TRADES/ARoW (46.16M params for 10 classes)."""
    return wide_resnet(
        34,
        10,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        activation=activation,
    )


@MODELS.register(
    "wrn-28-10",
    help="WideResNet-28-10 of the generated-data papers (36.48M params for 10 classes)",
)
def wrn_28_10(
    *, num_classes: int, in_channels: int, image_size: int, activation: str = "relu"
) -> WideResNet:
    """WideResNet-28-10 of Gowal et al. 2020 / Wang et al. 2023 (36.48M params for 10 classes)."""
    return wide_resnet(
        28,
        10,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        activation=activation,
    )


@MODELS.register(
    "wrn-70-16",
    help="WideResNet-70-16 of the generated-data papers (266.8M params for 10 classes)",
)
def wrn_70_16(
    *, num_classes: int, in_channels: int, image_size: int, activation: str = "relu"
) -> WideResNet:
    """WideResNet-70-16 of Gowal et al. 2020 / Wang et al. 2023 (266.8M params for 10 classes)."""
    return wide_resnet(
        70,
        16,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        activation=activation,
    )
