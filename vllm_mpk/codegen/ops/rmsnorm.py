"""CUDA side of RMSNorm with its optional residual add (``graph/ops/rmsnorm.py``):
``mpk::rmsnorm_task`` of ``csrc/tasks/rmsnorm.cuh``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vllm_mpk.codegen.ops.base import ArgLayout, CudaTask, Target, TaskEmitter, f32_bits, require_dtype, tensor_id
from vllm_mpk.graph.ir import Op, Task

SCRATCH_BYTES = 128  # one float per warp of the block sum


class RMSNormEmitter(TaskEmitter):
    kinds = ("rmsnorm",)
    header = "tasks/rmsnorm.cuh"
    args = ArgLayout("RMSNormArgs", ("input", "weight", "output", "residual", "residual_output", "row_start",
                                     "row_end", "eps", "hidden"))
    OPERANDS = ("input", "weight", "output", "residual", "residual_output")

    def task(self, op: Op, target: Target) -> CudaTask:
        for role in self.OPERANDS:
            require_dtype(op, role, (torch.bfloat16,))
        return CudaTask(f"mpk::rmsnorm_task<{target.threads}>", str(SCRATCH_BYTES))

    def words(self, task: Task, ids: Mapping[str, int], tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
        op, p = task.op, task.params
        return {**{role: tensor_id(op, ids, role) for role in self.OPERANDS}, "row_start": p["row_start"],
                "row_end": p["row_end"], "eps": f32_bits(op.attrs["eps"]), "hidden": op.inputs["input"].shape[1]}
