"""How each op of a plan becomes a CUDA task: dispatch by op kind to the op family's emitter
(``codegen/ops/<op>.py``), which knows the template instance, its shared memory and the
argument words of each tile."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vllm_mpk.codegen.ops import EMITTERS, CudaTask, Target, UnsupportedOnGPU, uses_nvshmem
from vllm_mpk.codegen.toolchain import NVSHMEM_INSTALL_HINT, has_nvshmem
from vllm_mpk.graph.ir import Op, Task

__all__ = ["CudaTask", "Target", "UnsupportedOnGPU", "cuda_task", "prefetch_region", "task_args",
           "uses_nvshmem"]


def cuda_task(op: Op, target: Target) -> CudaTask:
    """The task body of ``op``'s tiles, specialised for ``target``."""
    if op.kind not in EMITTERS:
        raise UnsupportedOnGPU(f"{op.kind} layer '{op.name}' has no CUDA task body (fuse it: e.g. silu_mul into "
                               f"silu_mul_linear_with_residual)")
    if op.kind in ("allreduce", "argmax") and op.attrs.get("world_size", 1) > 1 and not uses_nvshmem(op):
        raise UnsupportedOnGPU(f"{op.kind} layer '{op.name}': world_size > 1 without exchange buffers; build it "
                               f"with PersistentKernel.{op.kind}_layer, which declares them")
    if uses_nvshmem(op) and not has_nvshmem():
        raise UnsupportedOnGPU(f"{op.kind} layer '{op.name}' exchanges data between ranks through NVSHMEM, which "
                               f"is not installed: {NVSHMEM_INSTALL_HINT}")
    return EMITTERS[op.kind].task(op, target)


def task_args(task: Task, ids: Mapping[str, int], tensors: Mapping[str, torch.Tensor]) -> list[int]:
    """The argument words of one tile, in the order of its family's ``ArgLayout``."""
    family = EMITTERS.get(task.op.kind)
    if family is None:
        raise UnsupportedOnGPU(f"no argument layout for {task.op.kind}")
    return family.args.pack(family.words(task, ids, tensors))


def prefetch_region(task: Task, ids: Mapping[str, int], tensors: Mapping[str, torch.Tensor]) -> tuple[int, int, int] | None:
    """(tensor id, byte offset, bytes) of what a tile streams first (a linear tile's weight rows),
    or None."""
    family = EMITTERS.get(task.op.kind)
    return None if family is None else family.prefetch_region(task, ids, tensors)
