"""CUDA side of the embedding lookup (``graph/ops/embed.py``): ``mpk::embed_task`` of
``csrc/tasks/embed.cuh``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vllm_mpk.codegen.ops.base import ArgLayout, CudaTask, Target, TaskEmitter, require_dtype, tensor_id
from vllm_mpk.graph.ir import Op, Task


class EmbedEmitter(TaskEmitter):
    kinds = ("embed",)
    header = "tasks/embed.cuh"
    args = ArgLayout("EmbedArgs", ("ids", "weight", "output", "col_start", "col_end", "vocab_start", "vocab_rows",
                                   "hidden"))

    def task(self, op: Op, target: Target) -> CudaTask:
        require_dtype(op, "input", (torch.int32,))
        for role in ("weight", "output"):
            require_dtype(op, role, (torch.bfloat16,))
        return CudaTask(f"mpk::embed_task<{target.threads}>", "0")

    def words(self, task: Task, ids: Mapping[str, int], tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
        op, p = task.op, task.params
        rows, hidden = op.inputs["weight"].shape
        return {"ids": tensor_id(op, ids, "input"), "weight": tensor_id(op, ids, "weight"),
                "output": tensor_id(op, ids, "output"), "col_start": p["col_start"], "col_end": p["col_end"],
                "vocab_start": op.attrs.get("vocab_start", 0), "vocab_rows": rows, "hidden": hidden}
