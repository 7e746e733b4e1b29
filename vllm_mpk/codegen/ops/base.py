"""What every op family's CUDA side provides: the task body its tiles run, specialised for a
plan (``CudaTask``), and its argument words, named once (``ArgLayout``: the generated source
declares the matching C++ ``*Args`` enum that the task body in ``csrc/tasks/`` reads)."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_mpk.graph.ir import Op, Task

CPP_DTYPES = {torch.bfloat16: "__nv_bfloat16", torch.float32: "float"}


class UnsupportedOnGPU(ValueError):
    """The plan uses something the CUDA task bodies do not implement; the message says what."""


@dataclass(frozen=True)
class Target:
    """What a plan's task bodies are specialised for besides their ops."""

    threads: int  # per worker block
    host_step_inputs: bool = True  # the host writes the step inputs before each launch (no begin_step in the plan)


@dataclass(frozen=True)
class CudaTask:
    call: str  # a device function template instance taking (const TaskContext&)
    smem: str  # a C++ constant expression: the dynamic shared memory it needs
    opens_gate: bool = False  # the body waits for its inputs itself, after loads that do not need them


@dataclass(frozen=True)
class ArgLayout:
    """The argument words of a task record, in order. ``struct`` is the C++ name the task body
    reads them through: word ``"col_start"`` is ``LinearArgs::kColStart``."""

    struct: str
    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.words)) != len(self.words):
            raise ValueError(f"{self.struct}: a word is named twice in {self.words}")

    @staticmethod
    def cpp_name(word: str) -> str:
        return "k" + "".join(part.capitalize() for part in word.split("_"))

    def cpp(self) -> str:
        """The C++ declaration: ``struct LinearArgs { enum { kInput, ... }; };``."""
        names = ", ".join(map(self.cpp_name, self.words))
        return f"struct {self.struct} {{\n  enum {{ {names} }};\n}};"

    def pack(self, named: Mapping[str, int]) -> list[int]:
        """The words of ``named`` in record order. ``named`` holds a prefix of the layout (a task
        without the trailing words, e.g. an all-reduce on one rank, leaves them out)."""
        prefix = self.words[:len(named)]
        if set(named) != set(prefix):
            raise ValueError(f"{self.struct}: got words {sorted(named)}, expected the first {len(named)} of "
                             f"{self.words}")
        return [int(named[w]) for w in prefix]


class TaskEmitter:
    """The CUDA side of one op family: the task body of an op's tiles and their argument words.
    Subclasses set ``kinds`` (the op kinds served), ``header`` and ``args``."""

    kinds: ClassVar[tuple[str, ...]]
    header: ClassVar[str]  # under csrc/, e.g. "tasks/linear.cuh"
    args: ClassVar[ArgLayout]

    def task(self, op: Op, target: Target) -> CudaTask:
        """The template instance for ``op``; raises UnsupportedOnGPU saying what to change."""
        raise NotImplementedError

    def words(self, task: Task, ids: Mapping[str, int], tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """One tile's argument words by name (tensor operands: ids into the pointer table)."""
        raise NotImplementedError

    def prefetch_region(self, task: Task, ids: Mapping[str, int],
                        tensors: Mapping[str, torch.Tensor]) -> tuple[int, int, int] | None:
        """(tensor id, byte offset, bytes) of what the tile streams first, for L2; None: nothing."""
        return None


def f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


def tensor_id(op: Op, ids: Mapping[str, int], role: str) -> int:
    """The pointer-table id of ``op``'s operand ``role``; -1 (a null pointer) when it has none."""
    t = op.inputs.get(role) or op.outputs.get(role)
    return -1 if t is None else ids[t.name]


def require_dtype(op: Op, role: str, dtypes: tuple[torch.dtype, ...]) -> None:
    t = op.inputs.get(role) or op.outputs.get(role)
    if t is not None and t.dtype not in dtypes:
        raise UnsupportedOnGPU(f"{op.kind} layer '{op.name}': {role} '{t.name}' is {t.dtype}; the GPU kernels take "
                               f"{', '.join(map(str, dtypes))}")


def uses_nvshmem(op: Op) -> bool:
    """The op exchanges data with other ranks through NVSHMEM (its exchange buffers exist)."""
    return "signal" in op.attrs


def exchange_words(op: Op, ids: Mapping[str, int], roles: tuple[str, ...]) -> dict[str, int]:
    """Tensor ids of a collective's exchange buffers (``roles``, named as its words), world size
    and rank."""
    return {**{role: ids[op.attrs[role]] for role in roles}, "world": op.attrs["world_size"],
            "rank": op.attrs.get("rank", 0)}
