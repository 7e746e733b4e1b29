"""The compiler's intermediate representation: tensors, ops and the tiles (tasks) ops lower to.

A plan is SSA over intermediates: every ``new_tensor`` is written by exactly one op, so the only
hazards inside a decode step are read-after-write, which the event wiring orders. State tensors
(the paged KV cache) are attached inputs that the op owning them reads and writes in place.
Each element of an intermediate has one writing tile, except where the tiles declare the write
``shared``: then any one of them may write it (split-KV attention's last split to finish writes
the output), and readers wait for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

Box = tuple[tuple[int, int], ...]
"""A rectangular region of a tensor: one half-open ``(start, stop)`` interval per dimension."""


class Role(str, Enum):
    INPUT = "input"  # attached: weights, per-step inputs, and state an op updates in place (KV cache)
    INTERMEDIATE = "intermediate"  # new_tensor with io_category="cuda_tensor"
    SYMMETRIC = "symmetric"  # new_tensor with io_category="nvshmem_tensor" (all-reduce buffers)
    # Symmetric too: where a collective's peers put their data and signals (the all-reduce's receive
    # slots). Written by other ranks, never by this rank's task graph, so no event covers it.
    EXCHANGE = "exchange"


@dataclass(frozen=True, eq=False)
class TensorHandle:
    """A named tensor in a plan. Identity matters: two handles with one name cannot coexist."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    role: Role

    @property
    def full_box(self) -> Box:
        return tuple((0, n) for n in self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __repr__(self) -> str:
        dims = "x".join(map(str, self.shape))
        return f"{self.name}[{dims}:{str(self.dtype).removeprefix('torch.')}]"


@dataclass(frozen=True)
class Access:
    """One tile's read or write of a region of a tensor. ``previous_step``: a read of what the
    previous decode step wrote (a multi-step plan's first layer reads the last step's tokens).
    ``shared``: a write that any one of the tiles marking the box shared may do, decided at run
    time; readers of the box wait for all of those tiles."""

    tensor: str
    box: Box
    previous_step: bool = False
    shared: bool = False

    def overlaps(self, other: Access) -> bool:
        return self.tensor == other.tensor and all(
            a0 < b1 and b0 < a1 for (a0, a1), (b0, b1) in zip(self.box, other.box)
        )


@dataclass
class Op:
    """One fused layer as the user declared it."""

    index: int
    kind: str
    name: str
    inputs: dict[str, TensorHandle]
    outputs: dict[str, TensorHandle]
    attrs: dict[str, Any]
    grid_dim: tuple[int, int, int]
    block_dim: tuple[int, int, int]

    @property
    def num_tiles(self) -> int:
        x, y, z = self.grid_dim
        return x * y * z


@dataclass
class Task:
    """One tile of an op: what it reads, what it writes, what it costs, where it runs."""

    id: int
    op: Op
    tile: int
    reads: tuple[Access, ...]
    writes: tuple[Access, ...]
    bytes: int
    params: dict[str, int] = field(default_factory=dict)
    wait_events: tuple[int, ...] = ()
    signal_events: tuple[int, ...] = ()
    carried_events: tuple[int, ...] = ()  # waited for one step behind (events with lag 1)
    worker: int = -1

    def __repr__(self) -> str:
        return f"Task({self.id}: {self.op.name}[{self.tile}])"


@dataclass
class Event:
    """A dependency counter: consumers wait until all ``producers`` (tiles of one op) have
    signalled it once. With ``lag`` 1 the consumers wait for the previous step's signals: the
    event carries a value from one decode step to the next, and orders nothing within a step."""

    id: int
    producers: tuple[int, ...]
    consumers: list[int] = field(default_factory=list)
    lag: int = 0

    @property
    def trigger_count(self) -> int:
        return len(self.producers)


def box_slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


def box_volume(box: Box) -> int:
    v = 1
    for a, b in box:
        v *= b - a
    return v


def split_even(n: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """Split ``range(n)`` into ``parts`` contiguous chunks whose sizes are multiples of ``align``
    (except possibly the last) and differ by at most one ``align`` unit."""
    units = -(-n // align)
    if not 1 <= parts <= units:
        raise ValueError(f"cannot split {n} into {parts} tiles of {align}-element granularity")
    base, extra = divmod(units, parts)
    bounds, start = [], 0
    for p in range(parts):
        stop = min(n, start + (base + (p < extra)) * align)
        bounds.append((start, stop))
        start = stop
    return bounds
