"""CUDA side of paged decode attention (``graph/ops/attention.py``): ``mpk::attention_task`` of
``csrc/tasks/attention.cuh``, specialised for the head shape, page size and split count."""

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


class AttentionEmitter(TaskEmitter):
    kinds = ("attention",)
    header = "tasks/attention.cuh"
    args = ArgLayout("AttentionArgs", (
        "qkv", "cache", "rope", "positions", "seq_lens", "block_tables", "slots", "q_norm", "k_norm", "output",
        "head", "row_start", "row_end", "block_stride", "head_stride", "slot_stride", "table_stride", "eps", "scale",
        "split", "partial", "arrivals"))
    # argument word -> the op's tensor role, where the two names differ
    ROLES = {"qkv": "input", "cache": "kv_cache", "rope": "cos_sin_cache", "slots": "slot_mapping"}

    def task(self, op: Op, target: Target) -> CudaTask:
        """Where the host writes the step inputs (block tables, sequence lengths) before the launch,
        a task stages its KV history before its gate (not so in a multi-step plan, whose begin_step
        writes them)."""
        for role in ("input", "output", "kv_cache", "q_norm", "k_norm"):
            require_dtype(op, role, (torch.bfloat16,))
        require_dtype(op, "cos_sin_cache", tuple(CPP_DTYPES))
        a = op.attrs
        group = a["num_q_heads"] // a["num_kv_heads"]
        page = op.inputs["kv_cache"].shape[2]
        rope = CPP_DTYPES[op.inputs["cos_sin_cache"].dtype]
        qk = "true" if "q_norm" in op.inputs else "false"
        threads, early = target.threads, str(target.host_step_inputs).lower()
        return CudaTask(f"mpk::attention_task<{a['head_dim']}, {group}, {a['num_q_heads']}, {a['num_kv_heads']}, "
                        f"{page}, {qk}, {threads}, {rope}, {a.get('kv_splits', 1)}, {early}>",
                        f"mpk::attention_smem_bytes<{a['head_dim']}, {group}, {threads}>()", opens_gate=True)

    def words(self, task: Task, ids: Mapping[str, int], tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
        op, p = task.op, task.params
        cache = tensors[op.inputs["kv_cache"].name]
        if cache.stride(3) != 1:
            raise UnsupportedOnGPU(f"attention layer '{op.name}': the KV cache's last dim must be contiguous")
        if any(stride % 8 for stride in cache.stride()[:3]) or cache.data_ptr() % 16:
            raise UnsupportedOnGPU(f"attention layer '{op.name}': the KV cache's rows must start on 16 bytes "
                                   f"(strides {cache.stride()}, in elements, must be multiples of 8)")
        operands = ("qkv", "cache", "rope", "positions", "seq_lens", "block_tables", "slots", "q_norm", "k_norm",
                    "output", "partial", "arrivals")
        return {**{w: tensor_id(op, ids, self.ROLES.get(w, w)) for w in operands}, "head": p["kv_head"],
                "row_start": p["row_start"], "row_end": p["row_end"], "block_stride": cache.stride(0),
                "head_stride": cache.stride(1), "slot_stride": cache.stride(2),
                "table_stride": tensors[op.inputs["block_tables"].name].stride(0), "eps": f32_bits(op.attrs["eps"]),
                "scale": f32_bits(op.attrs["scale"]), "split": p["split"]}
