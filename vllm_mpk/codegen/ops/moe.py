"""CUDA side of the mixture-of-experts layers: routing (``graph/ops/moe_topk.py``,
``mpk::moe_topk_task`` of ``csrc/tasks/moe_topk.cuh``) and the expert tiles
(``graph/ops/moe_experts.py``, ``mpk::moe_gate_up_task`` and ``mpk::moe_down_task`` of
``csrc/tasks/moe_experts.cuh``). An expert tile learns which experts it streams only from the
router's output, after its gate, so it names no weight region to prefetch."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vllm_mpk.codegen.ops.base import (
    CPP_DTYPES,
    ArgLayout,
    CudaTask,
    Target,
    TaskEmitter,
    UnsupportedOnGPU,
    f32_bits,
    require_dtype,
    tensor_id,
)
from vllm_mpk.graph.ir import Op, Task

MAX_ROUTER_EXPERTS = 1024  # csrc/tasks/moe_topk.cuh: kMaxRouterExperts
MAX_MOE_BATCH = 32  # tokens an expert tile keeps a partial sum of per lane
SLICE = 256  # columns a warp covers per pass (kMoESliceK): reduction dims are multiples of it
SMEM_LIMIT = 227 * 1024


def refuse(op: Op, why: str) -> UnsupportedOnGPU:
    return UnsupportedOnGPU(f"{op.kind} layer '{op.name}': {why}")


def check_experts(op: Op, batch: int, experts: int, reduction: int, what: str) -> None:
    if reduction % SLICE:
        raise refuse(op, f"{what} {reduction} is not a multiple of {SLICE}")
    if batch > MAX_MOE_BATCH:
        raise refuse(op, f"batch {batch} exceeds the {MAX_MOE_BATCH} tokens an expert tile sums; lower max_batch")
    if experts > MAX_ROUTER_EXPERTS:
        raise refuse(op, f"{experts} experts exceed the {MAX_ROUTER_EXPERTS} the expert tiles list")


class MoETopKEmitter(TaskEmitter):
    kinds = ("moe_topk",)
    header = "tasks/moe_topk.cuh"
    args = ArgLayout("MoETopKArgs", ("input", "expert_ids", "expert_weights", "row_start", "row_end", "normalize"))

    def task(self, op: Op, target: Target) -> CudaTask:
        require_dtype(op, "input", tuple(CPP_DTYPES))
        experts, top_k = op.inputs["input"].shape[1], op.attrs["top_k"]
        if experts > MAX_ROUTER_EXPERTS:
            raise refuse(op, f"{experts} experts exceed the {MAX_ROUTER_EXPERTS} a routing warp holds")
        logits = CPP_DTYPES[op.inputs["input"].dtype]
        return CudaTask(f"mpk::moe_topk_task<{logits}, {experts}, {top_k}, {target.threads}>", "0")

    def words(self, task: Task, ids: Mapping[str, int], tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
        op, p = task.op, task.params
        return {**{role: tensor_id(op, ids, role) for role in ("input", "expert_ids", "expert_weights")},
                "row_start": p["row_start"], "row_end": p["row_end"], "normalize": int(op.attrs.get("normalize", False))}


class MoEGateUpEmitter(TaskEmitter):
    kinds = ("rmsnorm_moe_gate_up",)
    header = "tasks/moe_experts.cuh"
    args = ArgLayout("MoEGateUpArgs", ("input", "norm_weight", "weight", "expert_ids", "output", "col_start",
                                       "col_end", "slot", "slots", "inter", "eps"))

    def task(self, op: Op, target: Target) -> CudaTask:
        for role in ("input", "norm_weight", "weight", "output"):
            require_dtype(op, role, (torch.bfloat16,))
        (batch, hidden), top_k = op.inputs["input"].shape, op.inputs["expert_ids"].shape[1]
        experts = op.inputs["weight"].shape[0]
        check_experts(op, batch, experts, hidden, "hidden size")
        if batch * hidden * 2 > SMEM_LIMIT // 2:  # the normalised input, with room for the expert lists
            raise refuse(op, f"batch {batch} x hidden {hidden} in bf16 does not fit shared memory; lower max_batch")
        shape = f"{hidden}, {batch}, {top_k}, {experts}"
        return CudaTask(f"mpk::moe_gate_up_task<{shape}, {target.threads}>", f"mpk::moe_gate_up_smem_bytes<{shape}>()")

    def words(self, task: Task, ids: Mapping[str, int], tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
        op, p = task.op, task.params
        roles = ("input", "norm_weight", "weight", "expert_ids", "output")
        return {**{role: tensor_id(op, ids, role) for role in roles}, "col_start": p["col_start"],
                "col_end": p["col_end"], "slot": p["slot"], "slots": op.grid_dim[1],
                "inter": op.outputs["output"].shape[2], "eps": f32_bits(op.attrs["eps"])}


class MoEDownEmitter(TaskEmitter):
    kinds = ("moe_down",)
    header = "tasks/moe_experts.cuh"
    args = ArgLayout("MoEDownArgs", ("input", "weight", "expert_ids", "expert_weights", "residual", "output",
                                     "col_start", "col_end", "hidden"))

    def task(self, op: Op, target: Target) -> CudaTask:
        for role in ("input", "weight", "residual", "output"):
            require_dtype(op, role, (torch.bfloat16,))
        batch, top_k, inter = op.inputs["input"].shape
        experts = op.inputs["weight"].shape[0]
        check_experts(op, batch, experts, inter, "expert width")
        shape = f"{batch}, {top_k}, {experts}"
        return CudaTask(f"mpk::moe_down_task<{inter}, {shape}, {target.threads}>",
                        f"mpk::moe_down_smem_bytes<{target.threads}, {shape}>()")

    def words(self, task: Task, ids: Mapping[str, int], tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
        op, p = task.op, task.params
        roles = ("input", "weight", "expert_ids", "expert_weights", "residual", "output")
        return {**{role: tensor_id(op, ids, role) for role in roles}, "col_start": p["col_start"],
                "col_end": p["col_end"], "hidden": op.outputs["output"].shape[1]}
