"""CUDA side of a multi-step plan's first layer (``graph/ops/begin_step.py``):
``mpk::begin_step_task`` of ``csrc/tasks/begin_step.cuh``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vllm_mpk.codegen.ops.base import ArgLayout, CudaTask, Target, TaskEmitter, UnsupportedOnGPU, tensor_id
from vllm_mpk.graph.ir import Op, Task

# argument word -> the op's tensor role, where the two names differ
ROLES = {"tables": "block_tables", "slots": "slot_mapping"}
MATRICES = ("tokens", "tables")  # operands with a row stride; the others are vectors


class BeginStepEmitter(TaskEmitter):
    kinds = ("begin_step",)
    header = "tasks/begin_step.cuh"
    args = ArgLayout("BeginStepArgs", ("sampled", "step", "tokens", "prompt_lens", "end", "pending", "eos", "tables",
                                       "input_ids", "positions", "seq_lens", "slots", "width", "token_stride",
                                       "table_stride", "page"))
    OPERANDS = args.words[:args.words.index("width")]

    def task(self, op: Op, target: Target) -> CudaTask:
        return CudaTask(f"mpk::begin_step_task<{target.threads}>", "0")

    def words(self, task: Task, ids: Mapping[str, int], tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
        op = task.op
        operand = {w: tensors[op.inputs[ROLES.get(w, w)].name] for w in self.OPERANDS}
        strided = [ROLES.get(w, w) for w, t in operand.items() if t.stride(1 if w in MATRICES else 0) != 1]
        if strided:
            raise UnsupportedOnGPU(f"begin_step layer '{op.name}': {strided} must be contiguous in their last dim")
        return {**{w: tensor_id(op, ids, ROLES.get(w, w)) for w in self.OPERANDS},
                "width": operand["tokens"].shape[1], "token_stride": operand["tokens"].stride(0),
                "table_stride": operand["tables"].stride(0), "page": op.attrs["page_size"]}
