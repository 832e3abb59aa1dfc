"""The plain module under the wrappers a model can be run in (DDP, DataParallel, torch.compile).

Its own module (torch only) so that checkpoints, models, methods and attacks can all use it
without importing each other.
"""
from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module, *, compiled: bool = False) -> nn.Module:
    """The module under DistributedDataParallel / DataParallel wrappers, and with ``compiled=True``
    also under torch.compile's (the result shares its parameters with ``model``).

    Attacks run on ``unwrap(model)``: DDP's forward broadcasts buffers, which would put a
    collective call inside every attack step, while a compiled module stays compiled.
    ``compiled=True`` gives the plain module whose state dict has neither ``module.`` nor
    ``_orig_mod.`` prefixes (checkpoints, AWP's weights, FLOP counts).

    >>> net = nn.Linear(2, 2)
    >>> unwrap(nn.DataParallel(net)) is net
    True
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif compiled and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model
