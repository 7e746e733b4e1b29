"""CUDA side of the all-reduce (``graph/ops/allreduce.py``): ``mpk::allreduce_task`` (a copy, one
rank) or ``mpk::allreduce_nvshmem_task`` of ``csrc/tasks/allreduce.cuh``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vllm_mpk.codegen.ops.base import (
    ArgLayout,
    CudaTask,
    Target,
    TaskEmitter,
    exchange_words,
    require_dtype,
    tensor_id,
    uses_nvshmem,
)
from vllm_mpk.graph.ir import Op, Task


class AllReduceEmitter(TaskEmitter):
    kinds = ("allreduce",)
    header = "tasks/allreduce.cuh"
    # the words from "recv" on: only with NVSHMEM exchange buffers
    args = ArgLayout("AllReduceArgs", ("input", "output", "col_start", "col_end", "width", "recv", "signal", "tile",
                                       "world", "rank", "batch", "tiles"))

    def task(self, op: Op, target: Target) -> CudaTask:
        for role in ("input", "output"):
            require_dtype(op, role, (torch.bfloat16,))
        body = "allreduce_nvshmem_task" if uses_nvshmem(op) else "allreduce_task"
        return CudaTask(f"mpk::{body}<{target.threads}>", "0")

    def words(self, task: Task, ids: Mapping[str, int], tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
        op, p = task.op, task.params
        x = op.inputs["input"]
        words = {"input": tensor_id(op, ids, "input"), "output": tensor_id(op, ids, "output"),
                 "col_start": p["col_start"], "col_end": p["col_end"], "width": x.shape[1]}
        if not uses_nvshmem(op):
            return words
        return {**words, **exchange_words(op, ids, ("recv", "signal")), "tile": task.tile, "batch": x.shape[0],
                "tiles": op.num_tiles}
