"""CUDA side of greedy sampling (``graph/ops/argmax.py``): ``mpk::argmax_task`` of
``csrc/tasks/argmax.cuh``, gathering every rank's partials through NVSHMEM when it has several."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vllm_mpk.codegen.ops.base import (
    CPP_DTYPES,
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

SCRATCH_BYTES = 768  # per warp: best value and index of the block reduction


class ArgmaxEmitter(TaskEmitter):
    kinds = ("argmax",)
    header = "tasks/argmax.cuh"
    # the words from "gather_value" on: only with NVSHMEM exchange buffers, gather buffers
    # [2, world, batch, partials] and signal words [2], halves by launch parity
    args = ArgLayout("ArgmaxArgs", ("logits", "partial_value", "partial_index", "output", "stage", "vocab_begin",
                                    "vocab_end", "slot", "partials", "vocab_offset", "logits_stride", "gather_value",
                                    "gather_index", "signal", "world", "rank", "batch"))

    def task(self, op: Op, target: Target) -> CudaTask:
        require_dtype(op, "input", tuple(CPP_DTYPES))
        dtype = CPP_DTYPES[op.inputs["input"].dtype]
        gathered = ", true" if uses_nvshmem(op) else ""
        return CudaTask(f"mpk::argmax_task<{target.threads}, {dtype}{gathered}>", str(SCRATCH_BYTES))

    def words(self, task: Task, ids: Mapping[str, int], tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
        op, p = task.op, task.params
        logits = op.inputs["input"]
        words = {"logits": tensor_id(op, ids, "input"),
                 **{role: tensor_id(op, ids, role) for role in ("partial_value", "partial_index", "output")},
                 "stage": p.get("stage", 0), "vocab_begin": p.get("vocab_start", 0), "vocab_end": p.get("vocab_end", 0),
                 "slot": p.get("slot", 0), "partials": op.num_tiles, "vocab_offset": op.attrs.get("vocab_start", 0),
                 "logits_stride": logits.shape[1]}
        if not uses_nvshmem(op):
            return words
        return {**words, **exchange_words(op, ids, ("gather_value", "gather_index", "signal")),
                "batch": logits.shape[0]}
