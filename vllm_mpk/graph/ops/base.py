"""What every op family provides, and the checks they share.

An op family is one fused layer type: how its inputs are validated (``check``), how it is cut into
tiles (``lower``), how one tile runs on the CPU (``run_tile``) and what the whole layer computes
(``reference``). Its CUDA side is named the same: the emitter in ``codegen/ops/`` and the task body
in ``csrc/tasks/``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vllm_mpk.graph.ir import Access, Box, Op, TensorHandle

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass
class Tile:
    """What lowering says about one tile; the compiler turns it into a Task."""

    reads: tuple[Access, ...]
    writes: tuple[Access, ...]
    bytes: int
    params: dict[str, int] = field(default_factory=dict)


AllReduce = Callable[[str, Box, torch.Tensor], torch.Tensor]
AllGather = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass
class Env:
    """Tensors by name plus the per-step scalars a tile may need, for the CPU executors.

    The collectives: ``all_reduce(name, box, value)`` sums ``value`` (this rank's ``box`` of tensor
    ``name``) over ranks; ``all_gather(name, value)`` stacks every rank's ``value`` along a new first
    dim, in rank order. With one rank both are the identity (up to that new dim)."""

    tensors: dict[str, torch.Tensor]
    num_tokens: int
    all_reduce: AllReduce = field(default=lambda name, box, value: value)
    all_gather: AllGather = field(default=lambda name, value: value[None])

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]


class OpDef:
    """Base class of op families. Subclasses set ``kind``, ``opcode`` and the tensor names."""

    kind: ClassVar[str]
    opcode: ClassVar[int]
    required_inputs: ClassVar[tuple[str, ...]]
    optional_inputs: ClassVar[tuple[str, ...]] = ()
    required_outputs: ClassVar[tuple[str, ...]] = ("output",)
    optional_outputs: ClassVar[tuple[str, ...]] = ()

    def check(self, op: Op) -> None:
        """Raise ValueError naming the tensor and saying expected versus actual."""
        raise NotImplementedError

    def lower(self, op: Op) -> list[Tile]:
        raise NotImplementedError

    def run_tile(self, op: Op, params: dict[str, int], env: Env) -> None:
        raise NotImplementedError

    def reference(self, op: Op, env: Env) -> None:
        """The whole layer at once, in float32, written into the output tensors of ``env``."""
        raise NotImplementedError

    def counters(self, op: Op) -> tuple[str, ...]:
        """Output roles that count across steps (split-KV attention's arrivals): zero at first, and
        every step leaves them at zero again. Executors allocate them zeroed and never poison them."""
        return ()


def layer_error(op: Op, message: str) -> ValueError:
    return ValueError(f"{op.kind}_layer '{op.name}': {message}")


def expect_shape(op: Op, role: str, t: TensorHandle, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise layer_error(
            op, f"{role} '{t.name}' has shape {tuple(t.shape)}, expected {tuple(shape)}"
        )


def expect_dtype(op: Op, role: str, t: TensorHandle, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise layer_error(
            op, f"{role} '{t.name}' has dtype {str(t.dtype).removeprefix('torch.')}, expected one of {names}"
        )


def expect_rank(op: Op, role: str, t: TensorHandle, rank: int) -> None:
    if len(t.shape) != rank:
        raise layer_error(op, f"{role} '{t.name}' has {len(t.shape)} dims {tuple(t.shape)}, expected {rank}")


def expect_positive(op: Op, attr: str) -> None:
    """``op.attrs[attr]`` is a positive finite number (RMSNorm's eps, attention's scale): a NaN,
    negative or infinite one would turn every output into NaN or inf."""
    value = op.attrs.get(attr)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise layer_error(op, f"{attr} must be a positive finite number, got {value!r}")


def expect_tiles(op: Op, at_most: int, what: str) -> None:
    if not 1 <= op.num_tiles <= at_most:
        raise layer_error(
            op, f"grid_dim {op.grid_dim} makes {op.num_tiles} tasks; this layer takes 1 to {at_most} ({what})"
        )


def rows(env: Env) -> slice:
    return slice(0, env.num_tokens)


def col_box(batch: int, c0: int, c1: int) -> Box:
    return ((0, batch), (c0, c1))


def rms_normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in float32: x / rms(x) * weight."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def store(dst: torch.Tensor, value: torch.Tensor) -> None:
    dst.copy_(value.to(dst.dtype))
