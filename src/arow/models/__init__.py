"""Classifiers for adversarial training, filled into the ``MODELS`` registry.

Every model takes images in [0, 1] (the paper's setting). When a mean and std are given,
normalisation is the model's first layer, so attacks, projections and clamps all stay in
pixel space and a checkpoint carries its own normalisation.

>>> model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
>>> model(torch.rand(2, 1, 28, 28)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from arow.modules import unwrap
from arow.registry import Registry

ModelFactory = Callable[..., nn.Module]
"""``factory(*, num_classes, in_channels, image_size[, activation]) -> nn.Module``; ValueError on bad
sizes. A factory that takes ``activation`` gets the name (``relu``, ``silu``) from :func:`build_model`."""

MODELS: Registry[ModelFactory] = Registry("model")

#: the activations the WideResNets, ResNets and the small CNN can use (``--activation``)
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU}


def make_activation(name: str = "relu") -> nn.Module:
    """A new activation module by name: ``relu`` or ``silu`` (Swish, as in Gowal et al. 2020).

    >>> make_activation("silu")
    SiLU()
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers of shape (1, C, 1, 1).

    >>> Normalize([0.5], [0.25])(torch.ones(1, 1, 2, 2)).flatten().tolist()
    [2.0, 2.0, 2.0, 2.0]
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} values but std has {len(std)}")
        if any(float(s) <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    activation: str = "relu",
) -> nn.Module:
    """Build the registered model ``name`` for square images of ``image_size`` pixels.

    Without ``mean``/``std`` the model sees raw [0, 1] inputs (the paper's setting). With them the
    result is ``nn.Sequential(normalize=Normalize(mean, std), net=<model>)``. ``activation``
    (``relu`` or ``silu``) goes to factories that take an ``activation`` keyword.

    >>> build_model("resnet18", num_classes=10, in_channels=3, image_size=32,
    ...             mean=[0.5] * 3, std=[0.25] * 3)[0]
    Normalize(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    """
    factory = MODELS.get(name)
    if not _is_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not _is_int(in_channels) or in_channels < 1:
        raise ValueError(f"in_channels must be an integer >= 1, got {in_channels!r}")
    if not _is_int(image_size) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of: {', '.join(ACTIVATIONS)}")
    kwargs: dict[str, object] = {}
    if "activation" in inspect.signature(factory).parameters:
        kwargs["activation"] = activation
    elif activation != "relu":
        raise ValueError(f"model {name!r} has no choice of activation (it takes relu only)")
    net = factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    if mean is None or std is None:
        return net
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(
            f"mean and std need one value per input channel ({in_channels}), "
            f"got {len(mean)} and {len(std)}"
        )
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (a shared parameter counts once).

    >>> count_parameters(nn.Linear(3, 2))
    8
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def model_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Forward FLOPs (2 x multiply-accumulates) of the conv and linear layers for one input.

    ``input_shape`` is (B, C, H, W), or (C, H, W) for a single example. Biases, norms,
    activations and pooling are ignored (they are a rounding error next to the matmuls).
    Runs one forward pass on zeros in eval mode; the model's mode is restored.

    >>> model_flops(nn.Linear(3, 2), (5, 3))
    60
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    model = unwrap(model, compiled=True)
    total = 0

    def conv_hook(m: nn.modules.conv._ConvNd, _inp: object, out: torch.Tensor) -> None:
        nonlocal total
        per_output = (m.in_channels // m.groups) * math.prod(m.kernel_size)
        total += 2 * out.numel() * per_output

    def linear_hook(m: nn.Linear, _inp: object, out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    ref = next(model.parameters(), None)
    x = torch.zeros(
        shape,
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None else None,
    )
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


# Importing the architectures fills MODELS (they import MODELS from this module).
from arow.models import resnet, small_cnn, wrn  # noqa: E402,F401
from arow.models.resnet import PreActResNet, ResNet  # noqa: E402
from arow.models.small_cnn import SmallCNN  # noqa: E402
from arow.models.wrn import WideResNet, wide_resnet  # noqa: E402

__all__ = [
    "ACTIVATIONS",
    "MODELS",
    "ModelFactory",
    "Normalize",
    "PreActResNet",
    "ResNet",
    "SmallCNN",
    "WideResNet",
    "build_model",
    "count_parameters",
    "make_activation",
    "model_flops",
    "wide_resnet",
]
