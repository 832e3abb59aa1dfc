"""Random numbers that do not depend on how a batch is sharded across processes, and private ones.

Under torchrun every rank draws the random start for the GLOBAL batch from the same seed
and keeps its own slice, so an N-process run sees exactly the noise of a 1-process run.
Drawing N times more uniforms than needed costs nothing next to a forward pass.

Code that must draw from torch's global generators (an attack library, a seeded evaluation)
without touching the caller's random state runs inside :func:`private_rng`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch


@contextlib.contextmanager
def private_rng(device: torch.device, seed: Optional[int] = None) -> Iterator[None]:
    """Torch's global generators of the CPU and of ``device`` restored on exit, seeded with ``seed``
    on entry when one is given.

    On CUDA the current device's generator is restored too (libraries such as pyautoattack reseed
    it, whatever device the data is on).

    >>> with private_rng(torch.device("cpu"), seed=0):
    ...     a = torch.rand(2)
    >>> with private_rng(torch.device("cpu"), seed=0):
    ...     torch.equal(a, torch.rand(2))
    True
    """
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    devices = sorted({index, torch.cuda.current_device()}) if cuda else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.default_generators[index].manual_seed(seed)
        yield


@dataclass
class BatchRNG:
    """Draws noise for a global batch of ``total`` rows and returns rows ``[offset, offset+n)``.

    >>> rng = BatchRNG(seed=0)
    >>> rng.rand_like(torch.zeros(4, 3)).shape
    torch.Size([4, 3])
    """

    seed: int
    offset: int = 0
    total: Optional[int] = None
    _gens: dict = field(default_factory=dict, repr=False)

    def _gen(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._gens:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._gens[key] = g
        return self._gens[key]

    def rand_like(self, x: torch.Tensor) -> torch.Tensor:
        """Uniform [0, 1) noise shaped like ``x`` (this rank's rows of the global draw)."""
        return self._draw(torch.rand, x)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``x`` (this rank's rows of the global draw)."""
        return self._draw(torch.randn, x)

    def _draw(self, fn, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        total = self.total if self.total is not None else n
        if self.offset + n > total:
            raise ValueError(f"slice [{self.offset}, {self.offset + n}) exceeds global batch {total}")
        u = fn((total, *x.shape[1:]), generator=self._gen(x.device), device=x.device, dtype=x.dtype)
        return u[self.offset : self.offset + n]


class ExampleRNG:
    """Noise drawn per example: row ``i`` comes from its own generator, seeded by ``seed`` and the
    example's position ``index[i]`` in the data set.

    An example's random start then depends on neither the batch it falls in nor the batch size,
    the number of processes or the examples an earlier attack removed, so evaluation verdicts
    do not change with ``batch_size``. Each generator continues where it stopped, so a second
    draw (another restart) gives new noise. Noise is drawn on the CPU and moved to ``x``'s device.

    >>> a = ExampleRNG(0, torch.tensor([3, 7])).rand_like(torch.zeros(2, 4))
    >>> b = ExampleRNG(0, torch.tensor([7])).rand_like(torch.zeros(1, 4))
    >>> torch.equal(a[1], b[0])
    True
    """

    def __init__(self, seed: int, index: torch.Tensor) -> None:
        self._gens = [torch.Generator().manual_seed(((seed & 0x7FFF_FFFF) * 1_000_003 + i) & 0x7FFF_FFFF_FFFF)
                      for i in index.tolist()]

    def rand_like(self, x: torch.Tensor) -> torch.Tensor:
        """Uniform [0, 1) noise shaped like ``x``, one generator per row."""
        return self._draw(torch.rand, x)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``x``, one generator per row."""
        return self._draw(torch.randn, x)

    def _draw(self, fn, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self._gens):
            raise ValueError(f"{x.shape[0]} rows of noise asked of an ExampleRNG for {len(self._gens)} examples")
        if not self._gens:
            return torch.empty_like(x)
        rows = [fn(tuple(x.shape[1:]), generator=g, dtype=x.dtype) for g in self._gens]
        return torch.stack(rows).to(x.device)


#: what an attack's random start may draw from (``None``: torch's global generator)
NoiseSource = Union[BatchRNG, ExampleRNG]
