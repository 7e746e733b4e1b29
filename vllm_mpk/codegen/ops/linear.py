"""CUDA side of the linear family (``graph/ops/linear.py``): ``mpk::linear_task`` of
``csrc/tasks/linear.cuh``, one template per mode, its tile's weight rows held in shared memory."""

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
from vllm_mpk.graph.ir import Op, Task, split_even
from vllm_mpk.graph.limits import MAX_TILE_ROWS
from vllm_mpk.graph.ops import REGISTRY

MAX_LINEAR_BATCH = 32  # rows of input a linear tile stages in shared memory (with 256-row tiles: ~209 KiB)
LINEAR_MODES = {"linear": "kPlain", "linear_with_residual": "kResidual", "rmsnorm_linear": "kNorm",
                "silu_mul_linear": "kSilu", "silu_mul_linear_with_residual": "kSiluResidual",
                "rmsnorm_linear_silu_mul": "kNormSiluOut"}  # op kind -> mpk::LinearMode


class LinearEmitter(TaskEmitter):
    kinds = tuple(LINEAR_MODES)
    header = "tasks/linear.cuh"
    args = ArgLayout("LinearArgs", ("input", "weight", "output", "bias", "residual", "norm_weight", "col_start",
                                    "col_end", "eps", "out_stride", "up_row"))

    def task(self, op: Op, target: Target) -> CudaTask:
        for role in ("input", "weight", "residual", "norm_weight", "bias"):
            require_dtype(op, role, (torch.bfloat16,))
        require_dtype(op, "output", tuple(CPP_DTYPES))
        k, batch = op.inputs["weight"].shape[1], op.inputs["input"].shape[0]
        if k % 256:
            raise UnsupportedOnGPU(f"{op.kind} layer '{op.name}': reduction dim {k} is not a multiple of 256")
        if batch > MAX_LINEAR_BATCH:
            raise UnsupportedOnGPU(f"{op.kind} layer '{op.name}': batch {batch} exceeds the {MAX_LINEAR_BATCH} rows "
                                   f"a linear tile stages in shared memory; lower max_batch")
        out = CPP_DTYPES[op.outputs["output"].dtype]
        family = REGISTRY[op.kind]
        columns, per_column = op.outputs["output"].shape[1], 2 if family.silu_output else 1  # gate and up rows
        widest = max(c1 - c0 for c0, c1 in split_even(columns, op.num_tiles, family.column_align))
        rows = -(-widest * per_column // 16) * 16  # weight rows a tile streams
        if rows > MAX_TILE_ROWS:
            raise UnsupportedOnGPU(f"{op.kind} layer '{op.name}': tiles of {widest * per_column} weight rows exceed "
                                   f"the GPU's {MAX_TILE_ROWS}; raise grid_dim to at least "
                                   f"{-(-columns * per_column // MAX_TILE_ROWS)}")
        mode, threads = LINEAR_MODES[op.kind], target.threads
        return CudaTask(f"mpk::linear_task<mpk::LinearMode::{mode}, {k}, {batch}, {rows}, {threads}, {out}>",
                        f"mpk::linear_smem_bytes<{k}, {batch}, {rows}, {threads}>()", opens_gate=True)

    def words(self, task: Task, ids: Mapping[str, int], tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
        op, p = task.op, task.params
        columns = op.outputs["output"].shape[1]
        roles = ("input", "weight", "output", "bias", "residual", "norm_weight")
        return {**{role: tensor_id(op, ids, role) for role in roles}, "col_start": p["col_start"],
                "col_end": p["col_end"], "eps": f32_bits(op.attrs.get("eps", 0.0)), "out_stride": columns,
                "up_row": columns if REGISTRY[op.kind].silu_output else 0}

    def prefetch_region(self, task: Task, ids: Mapping[str, int],
                        tensors: Mapping[str, torch.Tensor]) -> tuple[int, int, int] | None:
        """The tile's weight rows when the weight is row-major: one contiguous block (the gate rows
        of ``rmsnorm_linear_silu_mul``)."""
        handle = task.op.inputs["weight"]
        w = tensors[handle.name]
        if w.stride(1) != 1 or w.stride(0) != w.shape[1]:
            return None
        row_bytes = w.shape[1] * w.element_size()
        c0, c1 = task.params["col_start"], task.params["col_end"]
        return ids[handle.name], c0 * row_bytes, (c1 - c0) * row_bytes
