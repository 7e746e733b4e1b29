"""How each op kind becomes a CUDA task: the template instance it runs, the shared memory it
needs, and the argument words of each tile. Argument order matches the ``*Args`` enums in
``csrc/tasks/<kind>.cuh``; this file and those headers are the only two places that know it."""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from vllm_mpk.codegen.toolchain import NVSHMEM_INSTALL_HINT, has_nvshmem
from vllm_mpk.graph.ir import Op, Task, split_even
from vllm_mpk.graph.ops import REGISTRY

# begin_step's tensor operands, in the order of BeginStepArgs (csrc/tasks/begin_step.cuh)
BEGIN_STEP_OPERANDS = ("sampled", "step", "tokens", "prompt_lens", "end", "pending", "eos", "block_tables",
                       "input_ids", "positions", "seq_lens", "slot_mapping")
MAX_TILE_ROWS = 256  # keeps a linear tile's partial sums and staged input inside shared memory
MAX_LINEAR_BATCH = 32  # rows of input a linear tile stages in shared memory (with 256-row tiles: ~209 KiB)
CPP_DTYPES = {torch.bfloat16: "__nv_bfloat16", torch.float32: "float"}
LINEAR_MODES = {"linear": "kPlain", "linear_with_residual": "kResidual", "rmsnorm_linear": "kNorm",
                "silu_mul_linear": "kSilu", "silu_mul_linear_with_residual": "kSiluResidual",
                "rmsnorm_linear_silu_mul": "kNormSiluOut"}


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


def f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _require(op: Op, role: str, dtypes: tuple[torch.dtype, ...], tensors: Mapping[str, torch.Tensor] | None = None):
    t = op.inputs.get(role) or op.outputs.get(role)
    if t is not None and t.dtype not in dtypes:
        raise UnsupportedOnGPU(f"{op.kind} layer '{op.name}': {role} '{t.name}' is {t.dtype}; the GPU kernels take "
                               f"{', '.join(map(str, dtypes))}")


def _linear(op: Op, target: Target) -> CudaTask:
    for role in ("input", "weight", "residual", "norm_weight", "bias"):
        _require(op, role, (torch.bfloat16,))
    _require(op, "output", tuple(CPP_DTYPES))
    k, batch = op.inputs["weight"].shape[1], op.inputs["input"].shape[0]
    if k % 256:
        raise UnsupportedOnGPU(f"{op.kind} layer '{op.name}': reduction dim {k} is not a multiple of 256")
    if batch > MAX_LINEAR_BATCH:
        raise UnsupportedOnGPU(f"{op.kind} layer '{op.name}': batch {batch} exceeds the {MAX_LINEAR_BATCH} rows a "
                               f"linear tile stages in shared memory; lower max_batch")
    out = CPP_DTYPES[op.outputs["output"].dtype]
    family = REGISTRY[op.kind]
    columns, per_column = op.outputs["output"].shape[1], 2 if family.silu_output else 1  # gate and up rows
    widest = max(c1 - c0 for c0, c1 in split_even(columns, op.num_tiles, family.column_align))
    rows = -(-widest * per_column // 16) * 16  # weight rows a tile streams
    if rows > MAX_TILE_ROWS:
        raise UnsupportedOnGPU(f"{op.kind} layer '{op.name}': tiles of {widest * per_column} weight rows exceed the "
                               f"GPU's {MAX_TILE_ROWS}; raise grid_dim to at least "
                               f"{-(-columns * per_column // MAX_TILE_ROWS)}")
    mode = LINEAR_MODES[op.kind]
    threads = target.threads
    return CudaTask(f"mpk::linear_task<mpk::LinearMode::{mode}, {k}, {batch}, {rows}, {threads}, {out}>",
                    f"mpk::linear_smem_bytes<{k}, {batch}, {rows}, {threads}>()", opens_gate=True)


def _attention(op: Op, target: Target) -> CudaTask:
    """Where the host writes the step inputs (block tables, sequence lengths) before the launch, a
    task stages its KV history before its gate (not so in a multi-step plan, whose begin_step
    writes them)."""
    for role in ("input", "output", "kv_cache", "q_norm", "k_norm"):
        _require(op, role, (torch.bfloat16,))
    _require(op, "cos_sin_cache", tuple(CPP_DTYPES))
    a = op.attrs
    group = a["num_q_heads"] // a["num_kv_heads"]
    page = op.inputs["kv_cache"].shape[2]
    rope = CPP_DTYPES[op.inputs["cos_sin_cache"].dtype]
    qk = "true" if "q_norm" in op.inputs else "false"
    threads, early = target.threads, str(target.host_step_inputs).lower()
    return CudaTask(f"mpk::attention_task<{a['head_dim']}, {group}, {a['num_q_heads']}, {a['num_kv_heads']}, {page}, "
                    f"{qk}, {threads}, {rope}, {a.get('kv_splits', 1)}, {early}>",
                    f"mpk::attention_smem_bytes<{a['head_dim']}, {group}, {threads}>()", opens_gate=True)


def _simple(name: str, smem: str, roles: tuple[str, ...]) -> Callable[[Op, Target], CudaTask]:
    def emit(op: Op, target: Target) -> CudaTask:
        for role in roles:
            _require(op, role, (torch.bfloat16,))
        return CudaTask(f"mpk::{name}<{target.threads}>", smem)
    return emit


def _embed(op: Op, target: Target) -> CudaTask:
    _require(op, "input", (torch.int32,))
    return _simple("embed_task", "0", ("weight", "output"))(op, target)


def uses_nvshmem(op: Op) -> bool:
    """The op exchanges data with other ranks through NVSHMEM (its exchange buffers exist)."""
    return "signal" in op.attrs


def _nvshmem_ready(op: Op) -> None:
    if not has_nvshmem():
        raise UnsupportedOnGPU(f"{op.kind} layer '{op.name}' exchanges data between ranks through NVSHMEM, which "
                               f"is not installed: {NVSHMEM_INSTALL_HINT}")


def _argmax(op: Op, target: Target) -> CudaTask:
    _require(op, "input", tuple(CPP_DTYPES))
    dtype = CPP_DTYPES[op.inputs["input"].dtype]
    if uses_nvshmem(op):
        _nvshmem_ready(op)
        return CudaTask(f"mpk::argmax_task<{target.threads}, {dtype}, true>", "768")
    return CudaTask(f"mpk::argmax_task<{target.threads}, {dtype}>", "768")


def _allreduce(op: Op, target: Target) -> CudaTask:
    _require(op, "input", (torch.bfloat16,))
    _require(op, "output", (torch.bfloat16,))
    if uses_nvshmem(op):
        _nvshmem_ready(op)
        return CudaTask(f"mpk::allreduce_nvshmem_task<{target.threads}>", "0")
    return CudaTask(f"mpk::allreduce_task<{target.threads}>", "0")


EMITTERS: dict[str, Callable[[Op, Target], CudaTask]] = {
    "embed": _embed,
    "rmsnorm": _simple("rmsnorm_task", "128", ("input", "weight", "output", "residual", "residual_output")),
    **dict.fromkeys(LINEAR_MODES, _linear),
    "attention": _attention,
    "allreduce": _allreduce,
    "argmax": _argmax,
    "begin_step": lambda op, target: CudaTask(f"mpk::begin_step_task<{target.threads}>", "0"),
}


def cuda_task(op: Op, target: Target) -> CudaTask:
    """The task body of ``op``'s tiles, specialised for ``target``."""
    if op.kind not in EMITTERS:
        raise UnsupportedOnGPU(f"{op.kind} layer '{op.name}' has no CUDA task body (fuse it: e.g. silu_mul into "
                               f"silu_mul_linear_with_residual)")
    if op.kind in ("allreduce", "argmax") and op.attrs.get("world_size", 1) > 1 and not uses_nvshmem(op):
        raise UnsupportedOnGPU(f"{op.kind} layer '{op.name}': world_size > 1 without exchange buffers; build it "
                               f"with PersistentKernel.{op.kind}_layer, which declares them")
    return EMITTERS[op.kind](op, target)


def task_args(task: Task, ids: Mapping[str, int], tensors: Mapping[str, torch.Tensor]) -> list[int]:
    """The argument words of one tile; tensor operands are ids into the kernel's pointer table."""
    op, p = task.op, task.params

    def tid(role: str) -> int:
        t = op.inputs.get(role) or op.outputs.get(role)
        return -1 if t is None else ids[t.name]

    if op.kind in LINEAR_MODES:
        up_row = op.outputs["output"].shape[1] if REGISTRY[op.kind].silu_output else 0
        return [tid("input"), tid("weight"), tid("output"), tid("bias"), tid("residual"), tid("norm_weight"),
                p["col_start"], p["col_end"], f32_bits(op.attrs.get("eps", 0.0)), op.outputs["output"].shape[1],
                up_row]
    if op.kind == "attention":
        cache = tensors[op.inputs["kv_cache"].name]
        if cache.stride(3) != 1:
            raise UnsupportedOnGPU(f"attention layer '{op.name}': the KV cache's last dim must be contiguous")
        if any(stride % 8 for stride in cache.stride()[:3]) or cache.data_ptr() % 16:
            raise UnsupportedOnGPU(f"attention layer '{op.name}': the KV cache's rows must start on 16 bytes "
                                   f"(strides {cache.stride()}, in elements, must be multiples of 8)")
        table = tensors[op.inputs["block_tables"].name]
        return [tid("input"), tid("kv_cache"), tid("cos_sin_cache"), tid("positions"), tid("seq_lens"),
                tid("block_tables"), tid("slot_mapping"), tid("q_norm"), tid("k_norm"), tid("output"),
                p["kv_head"], p["row_start"], p["row_end"], cache.stride(0), cache.stride(1), cache.stride(2),
                table.stride(0), f32_bits(op.attrs["eps"]), f32_bits(op.attrs["scale"]), p["split"], tid("partial"),
                tid("arrivals")]
    if op.kind == "embed":
        w = op.inputs["weight"]
        return [tid("input"), tid("weight"), tid("output"), p["col_start"], p["col_end"],
                op.attrs.get("vocab_start", 0), w.shape[0], w.shape[1]]
    if op.kind == "rmsnorm":
        return [tid("input"), tid("weight"), tid("output"), tid("residual"), tid("residual_output"),
                p["row_start"], p["row_end"], f32_bits(op.attrs["eps"]), op.inputs["input"].shape[1]]
    if op.kind == "argmax":
        logits = op.inputs["input"]
        stage = [p.get("stage", 0), p.get("vocab_start", 0), p.get("vocab_end", 0), p.get("slot", 0)]
        words = [tid("input"), tid("partial_value"), tid("partial_index"), tid("output"), *stage,
                 op.num_tiles, op.attrs.get("vocab_start", 0), logits.shape[1]]
        if not uses_nvshmem(op):
            return words
        return [*words, *exchange_words(op, ids, ("gather_value", "gather_index", "signal")), logits.shape[0]]
    if op.kind == "allreduce":
        x = op.inputs["input"]
        words = [tid("input"), tid("output"), p["col_start"], p["col_end"], x.shape[1]]
        if not uses_nvshmem(op):
            return words
        recv, signal = exchange_words(op, ids, ("recv", "signal"))[:2]
        return [*words, recv, signal, task.tile, op.attrs["world_size"], op.attrs.get("rank", 0), x.shape[0],
                op.num_tiles]
    if op.kind == "begin_step":
        rows = [r for r in BEGIN_STEP_OPERANDS if r not in ("tokens", "block_tables")]
        strided = [r for r in rows if tensors[op.inputs[r].name].stride(0) != 1]
        strided += [r for r in ("tokens", "block_tables") if tensors[op.inputs[r].name].stride(1) != 1]
        if strided:
            raise UnsupportedOnGPU(f"begin_step layer '{op.name}': {strided} must be contiguous in their last dim")
        tokens = tensors[op.inputs["tokens"].name]
        return [tid(r) for r in BEGIN_STEP_OPERANDS] + [tokens.shape[1], tokens.stride(0),
                                                       tensors[op.inputs["block_tables"].name].stride(0),
                                                       op.attrs["page_size"]]
    raise UnsupportedOnGPU(f"no argument layout for {op.kind}")


def exchange_words(op: Op, ids: Mapping[str, int], roles: tuple[str, ...]) -> list[int]:
    """Tensor ids of a collective's exchange buffers (``roles``), then world size and rank."""
    return [*(ids[op.attrs[role]] for role in roles), op.attrs["world_size"], op.attrs.get("rank", 0)]


def prefetch_region(task: Task, ids: Mapping[str, int], tensors: Mapping[str, torch.Tensor]) -> tuple[int, int, int] | None:
    """(tensor id, byte offset, bytes) of the weight rows a linear tile streams first: one contiguous
    block when the weight is row-major (the gate rows of ``rmsnorm_linear_silu_mul``). None for
    other tasks."""
    if task.op.kind not in LINEAR_MODES:
        return None
    handle = task.op.inputs["weight"]
    w = tensors[handle.name]
    if w.stride(1) != 1 or w.stride(0) != w.shape[1]:
        return None
    row_bytes = w.shape[1] * w.element_size()
    c0, c1 = task.params["col_start"], task.params["col_end"]
    return ids[handle.name], c0 * row_bytes, (c1 - c0) * row_bytes
