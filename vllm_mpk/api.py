"""``PersistentKernel``: a Mirage-MPK-style builder for decode-step megakernels.

    mpk = PersistentKernel(num_workers=132, meta_tensors={"step": step, "tokens": tokens})
    w = mpk.attach_input(weight, name="layers.0.qkv_proj")
    y = mpk.new_tensor((mpk.max_batch, n), torch.bfloat16, "qkv", "cuda_tensor")
    mpk.rmsnorm_linear_layer(input=x, weight_norm=wn, weight_linear=w, output=y,
                             grid_dim=(96, 1, 1), block_dim=(128, 1, 1), eps=1e-6)
    plan = mpk.compile()
    mpk.step_buffers["input_ids"].copy_(ids)   # ... and the other step inputs, then
    mpk()                                      # one decode step (single-step mode), or
    mpk.generate(prompts, max_new_tokens=32, tokens_output=tokens)   # standalone decoding

CPU tensors run on the reference executor, CUDA tensors on the megakernel (built on first use,
and again after layers are added). ``timeout_s`` bounds any wait inside the megakernel (its
watchdog stops a stalled step), within the bounds of ``runtime/watchdog.py``.

What differs from Mirage, because the plan here is static:
- ``num_local_schedulers`` and ``num_remote_schedulers`` are accepted and checked (non-negative;
  remote schedulers only with ``world_size > 1``) but take no SMs: the host computes the per-worker
  queues ahead of time, and the GPU side only waits on and signals event counters.
- ``profiler_tensor`` (int64, on the GPU) receives each task's start and end (global timer, ns)
  as ``[num_workers, max_tasks, 2]``; ``vllm_mpk.runtime.profiler`` turns it into a trace.
- The per-step inputs of a decode step (``input_ids``, ``positions``, ``seq_lens``,
  ``block_tables``, ``slot_mapping``) are plan inputs the kernel owns (``mpk.input_ids`` ...). In
  standalone mode they are derived from the ``step`` and ``tokens`` meta tensors each step; under
  vLLM they are bound to vLLM's own buffers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vllm_mpk.graph.ir import Op, Role, TensorHandle
from vllm_mpk.graph.ops import REGISTRY
from vllm_mpk.graph.plan import Plan, build_plan
from vllm_mpk.graph.reference import ReferenceExecutor
from vllm_mpk.graph.step_state import STEP_INPUT_NAMES, contiguous_block_tables
from vllm_mpk.runtime.standalone import StepExecutor, decode, decode_in_one_launch
from vllm_mpk.runtime.watchdog import DEFAULT_TIMEOUT_S, check_timeout_s

SUPPORTED_BLOCK_DIMS = ((128, 1, 1), (256, 1, 1))
DEFAULT_SCHEDULE = "earliest_finish"
PARITIES = 2  # collectives' exchange buffers come in two halves, used by alternate launches (peers.cuh)
IO_CATEGORIES = {"cuda_tensor": Role.INTERMEDIATE, "nvshmem_tensor": Role.SYMMETRIC}
STEP_INPUT_DTYPES = {"input_ids": torch.int32, "positions": torch.int64, "seq_lens": torch.int32,
                     "slot_mapping": torch.int64}
# Attached inputs the GPU tasks read through their strides (each checks its own layout in codegen);
# every other attached tensor is read densely, so it must be contiguous.
STRIDED_INPUTS = {("attention", "kv_cache"), ("begin_step", "tokens")}

Dim3 = int | Sequence[int]


def _dim3(value: Dim3, what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, int) and d >= 1 for d in dims):
        raise ValueError(f"{what} must be a positive int or a tuple of 1 to 3 positive ints, got {value!r}")
    return (*dims, *(1,) * (3 - len(dims)))  # type: ignore[return-value]


class PersistentKernel:
    def __init__(
        self,
        world_size: int = 1,
        mpi_rank: int = 0,
        num_workers: int = 132,
        num_local_schedulers: int = 0,
        num_remote_schedulers: int = 0,
        meta_tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | None = None,
        profiler_tensor: torch.Tensor | None = None,
        max_batch: int | None = None,
        max_seq_len: int | None = None,
        page_size: int = 16,
        schedule: str = DEFAULT_SCHEDULE,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        for what, value in (("world_size", world_size), ("mpi_rank", mpi_rank), ("num_workers", num_workers),
                            ("num_local_schedulers", num_local_schedulers),
                            ("num_remote_schedulers", num_remote_schedulers), ("page_size", page_size),
                            ("max_batch", max_batch), ("max_seq_len", max_seq_len)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{what} must be an int, got {value!r}")
        if world_size < 1 or not 0 <= mpi_rank < world_size:
            raise ValueError(f"mpi_rank {mpi_rank} must be in [0, world_size={world_size})")
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        if num_local_schedulers < 0 or num_remote_schedulers < 0:
            raise ValueError("scheduler counts must be non-negative")
        if num_remote_schedulers and world_size == 1:
            raise ValueError("num_remote_schedulers > 0 needs world_size > 1")
        if page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        self.world_size, self.mpi_rank, self.num_workers = world_size, mpi_rank, num_workers
        self.num_local_schedulers, self.num_remote_schedulers = num_local_schedulers, num_remote_schedulers
        self.page_size, self.schedule = page_size, schedule
        self.timeout_s = check_timeout_s(timeout_s)
        self.meta = self._check_meta(meta_tensors)
        self.max_batch = self._infer("max_batch", max_batch, self.meta, "step", 0)
        self.max_seq_len = self._infer("max_seq_len", max_seq_len, self.meta, "tokens", 1)
        if "tokens" in self.meta and tuple(self.meta["tokens"].shape[:1]) != (self.max_batch,):
            raise ValueError(f"meta tensor 'tokens' has shape {tuple(self.meta['tokens'].shape)}, "
                             f"expected ({self.max_batch}, max_seq_len)")
        self.profiler_tensor = profiler_tensor
        self.tensors: dict[str, TensorHandle] = {}
        self.attached: dict[str, torch.Tensor] = {}
        self.ops: list[Op] = []
        self.plan: Plan | None = None
        self._executor: StepExecutor | None = None
        self._step_buffers: dict[str, torch.Tensor] | None = None
        self.max_blocks_per_seq = -(-self.max_seq_len // page_size)
        for name, dtype in STEP_INPUT_DTYPES.items():
            setattr(self, name, self._declare(name, (self.max_batch,), dtype, Role.INPUT))
        self.block_tables = self._declare("block_tables", (self.max_batch, self.max_blocks_per_seq),
                                          torch.int32, Role.INPUT)

    @staticmethod
    def _check_meta(meta: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | None) -> dict[str, torch.Tensor]:
        if meta is None:
            return {}
        if not isinstance(meta, Mapping):
            meta = dict(zip(("step", "tokens"), meta))
        unknown = set(meta) - {"step", "tokens"}
        if unknown:
            raise ValueError(f"unknown meta tensors {sorted(unknown)}; expected 'step' and 'tokens'")
        if "step" in meta and meta["step"].dim() != 1:
            raise ValueError(f"meta tensor 'step' must be [batch], got shape {tuple(meta['step'].shape)}")
        if "tokens" in meta and meta["tokens"].dim() != 2:
            raise ValueError(f"meta tensor 'tokens' must be [batch, max_seq_len], got {tuple(meta['tokens'].shape)}")
        return dict(meta)

    @staticmethod
    def _infer(what: str, given: int | None, metas: dict[str, torch.Tensor], name: str, dim: int) -> int:
        meta = metas.get(name)
        if given is None and meta is None:
            raise ValueError(f"give {what} or the meta tensor '{name}' it is read from")
        if given is not None and meta is not None and meta.shape[dim] != given:
            raise ValueError(f"{what}={given} disagrees with meta tensor '{name}' of shape {tuple(meta.shape)} "
                             f"(dim {dim} is {meta.shape[dim]})")
        value = given if given is not None else int(meta.shape[dim])  # type: ignore[union-attr]
        if value < 1:
            raise ValueError(f"{what} must be positive, got {value}")
        return value

    # tensors ------------------------------------------------------------------------------------

    def _declare(self, name: str, dims: Sequence[int], dtype: torch.dtype, role: Role) -> TensorHandle:
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if name in self.tensors:
            raise ValueError(f"a tensor named '{name}' already exists in this kernel")
        if not all(isinstance(d, int) and d >= 1 for d in dims):
            raise ValueError(f"tensor '{name}' has dims {tuple(dims)}; expected positive ints")
        handle = TensorHandle(name, tuple(dims), dtype, role)
        self.tensors[name] = handle
        return handle

    def attach_input(self, torch_tensor: torch.Tensor, name: str) -> TensorHandle:
        """Use an existing tensor (a weight, a KV cache) in place; the plan never copies it."""
        if not isinstance(torch_tensor, torch.Tensor):
            raise ValueError(f"attach_input('{name}') needs a torch.Tensor, got {type(torch_tensor).__name__}")
        device = next((t.device for t in self.attached.values()), torch_tensor.device)
        if torch_tensor.device != device:
            raise ValueError(f"attach_input('{name}'): the tensor is on {torch_tensor.device}, the kernel's other "
                             f"inputs on {device}; move it there")
        handle = self._declare(name, tuple(torch_tensor.shape), torch_tensor.dtype, Role.INPUT)
        self.attached[name] = torch_tensor
        return handle

    def new_tensor(self, dims: Sequence[int], dtype: torch.dtype, name: str,
                   io_category: str = "cuda_tensor") -> TensorHandle:
        """An intermediate the kernel allocates; ``nvshmem_tensor`` ones are symmetric across ranks."""
        if io_category not in IO_CATEGORIES:
            raise ValueError(f"tensor '{name}': io_category '{io_category}' is not one of {sorted(IO_CATEGORIES)}")
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"tensor '{name}': dtype must be a torch.dtype, got {dtype!r}")
        return self._declare(name, tuple(dims), dtype, IO_CATEGORIES[io_category])

    # layers -------------------------------------------------------------------------------------

    def _add(self, kind: str, inputs: dict[str, Any], outputs: dict[str, Any], grid_dim: Dim3,
             block_dim: Dim3, **attrs: Any) -> None:
        opdef = REGISTRY[kind]
        name = attrs.pop("name", None) or f"{kind}_{len(self.ops)}"
        where = f"{kind}_layer '{name}'"
        handles = {}
        for role, value in (*inputs.items(), *outputs.items()):
            if value is None:
                if role in (*opdef.required_inputs, *opdef.required_outputs):
                    raise ValueError(f"{where}: {role} is required")
                continue
            if not isinstance(value, TensorHandle) or self.tensors.get(value.name) is not value:
                raise ValueError(f"{where}: {role} must be a tensor of this kernel (from attach_input or "
                                 f"new_tensor), got {value!r}")
            handles[role] = value
        for role in outputs:
            if role in handles and handles[role].role is Role.INPUT:
                raise ValueError(f"{where}: output '{handles[role].name}' is an attached input; "
                                 f"outputs must come from new_tensor")
        for role, handle in handles.items():
            tensor = self.attached.get(handle.name)
            if tensor is not None and (kind, role) not in STRIDED_INPUTS and not tensor.is_contiguous():
                raise ValueError(f"{where}: {role} '{handle.name}' is not contiguous (strides {tensor.stride()} for "
                                 f"shape {tuple(tensor.shape)}); the kernel reads it densely: attach "
                                 f"tensor.contiguous()")
        block = _dim3(block_dim, f"{where}: block_dim")
        if block not in SUPPORTED_BLOCK_DIMS:
            raise ValueError(f"{where}: block_dim {block} is not supported; the runtime runs {SUPPORTED_BLOCK_DIMS}")
        op = Op(len(self.ops), kind, name, {r: h for r, h in handles.items() if r in inputs},
                {r: h for r, h in handles.items() if r in outputs}, attrs, _dim3(grid_dim, f"{where}: grid_dim"), block)
        opdef.check(op)
        self.ops.append(op)
        self.plan, self._executor = None, None  # the next run compiles and builds the new graph

    def embed_layer(self, input: TensorHandle | None, weight: TensorHandle, output: TensorHandle,
                    grid_dim: Dim3, block_dim: Dim3, vocab_start: int = 0, name: str | None = None) -> None:
        """``output = weight[input]``; ``input`` defaults to the kernel's ``input_ids``."""
        self._add("embed", {"input": input or self.input_ids, "weight": weight}, {"output": output},
                  grid_dim, block_dim, vocab_start=vocab_start, name=name)

    def rmsnorm_layer(self, input: TensorHandle, weight: TensorHandle, output: TensorHandle, grid_dim: Dim3,
                      block_dim: Dim3, eps: float = 1e-6, residual: TensorHandle | None = None,
                      residual_output: TensorHandle | None = None, name: str | None = None) -> None:
        self._add("rmsnorm", {"input": input, "weight": weight, "residual": residual},
                  {"output": output, "residual_output": residual_output}, grid_dim, block_dim, eps=eps, name=name)

    def rmsnorm_linear_layer(self, input: TensorHandle, weight_norm: TensorHandle, weight_linear: TensorHandle,
                             output: TensorHandle, grid_dim: Dim3, block_dim: Dim3, eps: float = 1e-6,
                             name: str | None = None) -> None:
        self._add("rmsnorm_linear", {"input": input, "norm_weight": weight_norm, "weight": weight_linear},
                  {"output": output}, grid_dim, block_dim, eps=eps, name=name)

    def rmsnorm_linear_silu_mul_layer(self, input: TensorHandle, weight_norm: TensorHandle,
                                      weight_gate_up: TensorHandle, output: TensorHandle, grid_dim: Dim3,
                                      block_dim: Dim3, eps: float = 1e-6, name: str | None = None) -> None:
        """SwiGLU of the normalised input's gate and up projections: ``weight_gate_up`` is ``[2I, K]``
        (gate rows, then up rows), ``output`` ``[batch, I]``."""
        self._add("rmsnorm_linear_silu_mul", {"input": input, "norm_weight": weight_norm, "weight": weight_gate_up},
                  {"output": output}, grid_dim, block_dim, eps=eps, name=name)

    def linear_layer(self, input: TensorHandle, weight: TensorHandle, output: TensorHandle, grid_dim: Dim3,
                     block_dim: Dim3, bias: TensorHandle | None = None, name: str | None = None) -> None:
        self._add("linear", {"input": input, "weight": weight, "bias": bias}, {"output": output},
                  grid_dim, block_dim, name=name)

    def linear_with_residual_layer(self, input: TensorHandle, weight: TensorHandle, residual: TensorHandle,
                                   output: TensorHandle, grid_dim: Dim3, block_dim: Dim3,
                                   bias: TensorHandle | None = None, name: str | None = None) -> None:
        self._add("linear_with_residual", {"input": input, "weight": weight, "bias": bias, "residual": residual},
                  {"output": output}, grid_dim, block_dim, name=name)

    def attention_layer(self, input: TensorHandle, kv_cache: TensorHandle, cos_sin_cache: TensorHandle,
                        output: TensorHandle, grid_dim: Dim3, block_dim: Dim3, num_q_heads: int,
                        num_kv_heads: int, head_dim: int, q_norm: TensorHandle | None = None,
                        k_norm: TensorHandle | None = None, eps: float = 1e-6, scale: float | None = None,
                        name: str | None = None, kv_splits: int = 1) -> None:
        """Paged GQA decode attention over vLLM's packed K|V cache; see ``graph/ops/attention.py``.
        ``kv_splits`` S > 1 splits every request's history over S tasks per KV head (``grid_dim``
        times S tasks in all), for long contexts where one task per KV head and request would take
        longest; the last of a request's S tasks to finish merges their partial results into
        ``output``. The layer declares its scratch tensors itself: ``<name>.partial`` (the partial
        results) and ``<name>.arrivals`` (the count of a request's finished tasks per KV head)."""
        if kv_cache is not None and kv_cache.role is not Role.INPUT:
            raise ValueError(f"attention_layer: kv_cache '{kv_cache.name}' must be attached with attach_input")
        if kv_cache is not None and len(kv_cache.shape) == 4 and kv_cache.shape[2] != self.page_size:
            raise ValueError(f"attention_layer: kv_cache '{kv_cache.name}' has block size {kv_cache.shape[2]}, "
                             f"expected the kernel's page_size {self.page_size}")
        if not isinstance(kv_splits, int) or isinstance(kv_splits, bool) or kv_splits < 1:
            raise ValueError(f"attention_layer: kv_splits must be a positive int, got {kv_splits!r}")
        label = name or f"attention_{len(self.ops)}"
        tiles = _dim3(grid_dim, "attention_layer: grid_dim")
        scratch: dict[str, TensorHandle] = {}
        try:
            if kv_splits > 1:
                batch = input.shape[0] if isinstance(input, TensorHandle) else self.max_batch
                scratch["partial"] = self.new_tensor((batch, num_q_heads, kv_splits, head_dim + 2), torch.float32,
                                                     f"{label}.partial")
                scratch["arrivals"] = self.new_tensor((batch, num_kv_heads), torch.int32, f"{label}.arrivals")
            self._add("attention", {"input": input, "kv_cache": kv_cache, "cos_sin_cache": cos_sin_cache,
                                    "positions": self.positions, "seq_lens": self.seq_lens,
                                    "block_tables": self.block_tables, "slot_mapping": self.slot_mapping,
                                    "q_norm": q_norm, "k_norm": k_norm},
                      {"output": output, **scratch}, (tiles[0] * tiles[1] * tiles[2] * kv_splits, 1, 1), block_dim,
                      num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, eps=eps,
                      kv_splits=kv_splits, scale=scale if scale is not None else head_dim ** -0.5, name=label)
        except ValueError:  # a rejected layer adds nothing, so the call can be fixed and repeated
            for handle in scratch.values():
                del self.tensors[handle.name]
            raise

    def silu_mul_layer(self, input: TensorHandle, output: TensorHandle, grid_dim: Dim3, block_dim: Dim3,
                       name: str | None = None) -> None:
        self._add("silu_mul", {"input": input}, {"output": output}, grid_dim, block_dim, name=name)

    def silu_mul_linear_layer(self, input: TensorHandle, weight: TensorHandle, output: TensorHandle,
                              grid_dim: Dim3, block_dim: Dim3, name: str | None = None) -> None:
        self._add("silu_mul_linear", {"input": input, "weight": weight}, {"output": output}, grid_dim, block_dim,
                  name=name)

    def silu_mul_linear_with_residual_layer(self, input: TensorHandle, weight: TensorHandle, residual: TensorHandle,
                                            output: TensorHandle, grid_dim: Dim3, block_dim: Dim3,
                                            name: str | None = None) -> None:
        self._add("silu_mul_linear_with_residual", {"input": input, "weight": weight, "residual": residual},
                  {"output": output}, grid_dim, block_dim, name=name)

    def moe_topk_layer(self, input: TensorHandle, expert_ids: TensorHandle, expert_weights: TensorHandle,
                       grid_dim: Dim3, block_dim: Dim3, top_k: int, normalize: bool = False,
                       name: str | None = None) -> None:
        """Mixture-of-experts routing over router logits ``input`` ``[batch, E]``: softmax, the top
        ``top_k`` experts (``expert_ids`` int32) and their weights (``expert_weights`` float32, each
        ``[batch, top_k]``), renormalised to sum to 1 with ``normalize``; see ``graph/ops/moe_topk.py``."""
        self._add("moe_topk", {"input": input}, {"expert_ids": expert_ids, "expert_weights": expert_weights},
                  grid_dim, block_dim, top_k=top_k, normalize=normalize, name=name)

    def rmsnorm_moe_gate_up_layer(self, input: TensorHandle, weight_norm: TensorHandle, weight_w13: TensorHandle,
                                  expert_ids: TensorHandle, output: TensorHandle, grid_dim: Dim3, block_dim: Dim3,
                                  eps: float = 1e-6, name: str | None = None) -> None:
        """SwiGLU of the chosen experts' gate and up projections of the normalised input:
        ``weight_w13`` ``[E, 2I, H]``, ``output`` ``[batch, top_k, I]``; ``grid_dim`` is (column
        blocks, expert slots); see ``graph/ops/moe_experts.py``."""
        self._add("rmsnorm_moe_gate_up", {"input": input, "norm_weight": weight_norm, "weight": weight_w13,
                                          "expert_ids": expert_ids}, {"output": output}, grid_dim, block_dim,
                  eps=eps, name=name)

    def moe_down_layer(self, input: TensorHandle, weight_w2: TensorHandle, expert_ids: TensorHandle,
                       expert_weights: TensorHandle, residual: TensorHandle | None, output: TensorHandle,
                       grid_dim: Dim3, block_dim: Dim3, name: str | None = None) -> None:
        """``output = residual + sum_j expert_weights[:, j] * input[:, j] W2_{expert_ids[:, j]}^T`` with
        ``weight_w2`` ``[E, H, I]`` (no residual: a tensor-parallel rank's part); see
        ``graph/ops/moe_experts.py``."""
        self._add("moe_down", {"input": input, "weight": weight_w2, "expert_ids": expert_ids,
                               "expert_weights": expert_weights, "residual": residual}, {"output": output},
                  grid_dim, block_dim, name=name)

    def allreduce_layer(self, input: TensorHandle, output: TensorHandle, grid_dim: Dim3, block_dim: Dim3,
                        buffer: TensorHandle | None = None, name: str | None = None,
                        symmetric: bool | None = None) -> None:
        """Sum ``input`` over the ``world_size`` ranks into ``output``. With several ranks ``input``
        must be an ``nvshmem_tensor``. The exchange buffers are declared here as nvshmem tensors:
        ``<name>.recv`` ``[2, world_size, *input.shape]`` (slot r: rank r's part) and
        ``<name>.signal`` ``[2, tiles]`` (int64 words), halves used by alternate launches. ``symmetric`` (default: ``world_size > 1``) forces the NVSHMEM path,
        e.g. with one rank, where it is an exact identity."""
        if symmetric is False and self.world_size > 1:
            raise ValueError("allreduce_layer: symmetric=False needs world_size 1 (peers exchange through NVSHMEM)")
        if self.world_size > 1 and input is not None and input.role is not Role.SYMMETRIC:
            raise ValueError(f"allreduce_layer: input '{input.name}' must be an nvshmem_tensor when world_size > 1")
        label = name or f"allreduce_{len(self.ops)}"
        exchange: dict[str, str] = {}
        if (self.world_size > 1 if symmetric is None else symmetric) and isinstance(input, TensorHandle):
            tiles = _dim3(grid_dim, "allreduce_layer: grid_dim")
            exchange = self._exchange_buffers(label, {
                "recv": ((PARITIES, self.world_size, *input.shape), input.dtype),
                "signal": ((PARITIES, tiles[0] * tiles[1] * tiles[2]), torch.int64)})
        try:
            self._add("allreduce", {"input": input}, {"output": output}, grid_dim, block_dim,
                      world_size=self.world_size, rank=self.mpi_rank, name=label, **exchange)
        except ValueError:
            for tensor in exchange.values():
                del self.tensors[tensor]
            raise

    def _exchange_buffers(self, label: str, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, str]:
        """Symmetric tensors a collective exchanges through, named ``<label>.<role>``; the op keeps
        their names in its attributes (they are no inputs or outputs of the task graph: they
        carry data between ranks, not between this rank's tiles)."""
        return {role: self._declare(f"{label}.{role}", shape, dtype, Role.EXCHANGE).name
                for role, (shape, dtype) in specs.items()}

    def argmax_layer(self, input: TensorHandle, output: TensorHandle, grid_dim: Dim3, block_dim: Dim3,
                     vocab_start: int = 0, name: str | None = None) -> None:
        """Greedy token per row; the partial results of the two-stage reduction are allocated here."""
        tiles = _dim3(grid_dim, "argmax_layer: grid_dim")
        count = tiles[0] * tiles[1] * tiles[2]
        label = name or f"argmax_{len(self.ops)}"
        batch = input.shape[0] if isinstance(input, TensorHandle) else self.max_batch
        category = "nvshmem_tensor" if self.world_size > 1 else "cuda_tensor"  # the sources of NVSHMEM puts
        partial_value = self.new_tensor((batch, count), torch.float32, f"{label}.partial_value", category)
        partial_index = self.new_tensor((batch, count), torch.int64, f"{label}.partial_index", category)
        exchange: dict[str, str] = {}
        if self.world_size > 1:  # every rank's partials, gathered by each rank's reduce tile
            exchange = self._exchange_buffers(label, {
                "gather_value": ((PARITIES, self.world_size, batch, count), torch.float32),
                "gather_index": ((PARITIES, self.world_size, batch, count), torch.int64),
                "signal": ((PARITIES,), torch.int64)})
        try:
            self._add("argmax", {"input": input}, {"output": output, "partial_value": partial_value,
                                                   "partial_index": partial_index},
                      grid_dim, block_dim, vocab_start=vocab_start, world_size=self.world_size,
                      rank=self.mpi_rank, name=label, **exchange)
        except ValueError:  # a rejected layer adds nothing, so the call can be fixed and repeated
            for tensor in (partial_value.name, partial_index.name, *exchange.values()):
                del self.tensors[tensor]
            raise

    def begin_step_layer(self, sampled: TensorHandle, block_dim: Dim3, name: str | None = None) -> None:
        """Make this a multi-step plan: the first layer moves the decoding state on by one step on
        the GPU (``graph/ops/begin_step.py``), so one launch decodes many steps. ``sampled`` is the
        argmax layer's output (declare it with ``new_tensor`` first; add the argmax layer last). The
        state (``step``, ``tokens``: the meta tensors if given, int64; prompt lengths, ends, pending
        flags, the EOS token) is attached here, on the device of the tensors attached so far."""
        if self.ops:
            raise ValueError("begin_step_layer must be the kernel's first layer: it writes the step inputs")
        if self.world_size > 1:
            raise ValueError("begin_step_layer: multi-step plans run on one GPU (world_size 1)")
        for meta in ("step", "tokens"):
            if meta in self.meta and self.meta[meta].dtype != torch.int64:
                raise ValueError(f"begin_step_layer: meta tensor '{meta}' must be int64, got {self.meta[meta].dtype}")
        device = next((t.device for t in self.attached.values()), torch.device("cpu"))
        b = self.max_batch

        def state(role: str, shape: tuple[int, ...], dtype: torch.dtype) -> TensorHandle:
            tensor = self.meta.get(role)
            return self.attach_input(tensor if tensor is not None else torch.zeros(shape, dtype=dtype, device=device),
                                     f"state.{role}")

        inputs = {"sampled": sampled, "step": state("step", (b,), torch.int64),
                  "tokens": state("tokens", (b, self.max_seq_len), torch.int64),
                  "prompt_lens": state("prompt_lens", (b,), torch.int64), "end": state("end", (b,), torch.int64),
                  "pending": state("pending", (b,), torch.int32), "eos": state("eos", (1,), torch.int64),
                  "block_tables": self.block_tables, **{n: getattr(self, n) for n in STEP_INPUT_DTYPES}}
        self._add("begin_step", inputs, {}, 1, block_dim, page_size=self.page_size, name=name or "begin_step")

    # compile and run ----------------------------------------------------------------------------

    def compile(self) -> Plan:
        """Lower, wire events, schedule and validate. Raises ValueError on an invalid graph."""
        if not self.ops:
            raise ValueError("nothing to compile: add layers first")
        blocks = {op.block_dim for op in self.ops}
        if len(blocks) > 1:
            raise ValueError(f"all layers must share one block_dim (the kernel's block size), got {sorted(blocks)}")
        self.plan = build_plan(self.tensors, self.ops, self.num_workers, self.schedule)
        self._executor = None
        return self.plan

    @property
    def step_buffers(self) -> dict[str, torch.Tensor]:
        """The per-step inputs the kernel reads, on the attached tensors' device; fill them in
        place before each ``__call__`` (the megakernel holds their addresses)."""
        if self._step_buffers is None:
            device = next((t.device for t in self.attached.values()), torch.device("cpu"))
            self._step_buffers = {name: torch.zeros(self.tensors[name].shape, dtype=self.tensors[name].dtype,
                                                    device=device) for name in STEP_INPUT_NAMES}
        return self._step_buffers

    def executor(self, exact: bool = False) -> StepExecutor:
        """The CPU reference executor or the GPU megakernel for the compiled plan, made once (and
        again once layers were added).
        ``exact`` (CPU only, at the first call) keeps intermediates in float32."""
        if exact and self.step_buffers["input_ids"].device.type != "cpu":
            raise ValueError("exact=True is a mode of the CPU reference executor; the megakernel computes in bf16")
        if self._executor is None:
            plan = self.plan or self.compile()
            inputs = {**self.attached, **self.step_buffers}
            if self.step_buffers["input_ids"].device.type == "cuda":
                from vllm_mpk.codegen.source import plan_uses_nvshmem
                from vllm_mpk.runtime import nvshmem
                from vllm_mpk.runtime.megakernel import Megakernel  # builds CUDA code: only when asked

                if plan_uses_nvshmem(plan):  # collectives across ranks: NVSHMEM first (torchrun: from its env)
                    nvshmem.ensure_initialized(self.world_size, self.mpi_rank, self.step_buffers["input_ids"].device)
                profile = self.profiler_tensor if self.profiler_tensor is not None else False
                self._executor = Megakernel(plan, inputs, profile=profile, timeout_s=self.timeout_s)
            else:
                self._executor = ReferenceExecutor(plan, inputs, exact=exact)
        return self._executor

    def __call__(self, num_tokens: int | None = None) -> None:
        """Run one decode step for the first ``num_tokens`` rows (default: all) of the step buffers."""
        n = self.max_batch if num_tokens is None else num_tokens
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"num_tokens must be in [1, {self.max_batch}], got {n}")
        self.executor().run_step(n)

    def _check_prompt_tokens(self, prompts: Sequence[Sequence[int]]) -> None:
        """Every prompt token inside the vocabulary of the embedding that reads ``input_ids`` (each
        rank holds an equal shard of its rows); an id outside it would embed as zeros."""
        embed = next((op for op in self.ops if op.kind == "embed" and op.inputs["input"] is self.input_ids), None)
        if embed is None:
            return
        vocab = embed.inputs["weight"].shape[0] * self.world_size
        for b, prompt in enumerate(prompts):
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"prompts[{b}] holds token id {bad}, outside the vocabulary [0, {vocab})")

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, tokens_output: TensorHandle,
                 eos_token_id: int | None = None) -> list[list[int]]:
        """Standalone decoding: feed each prompt through the decode step token by token, then
        sample greedily (``tokens_output`` is the argmax layer's output) until ``max_new_tokens``
        or ``eos_token_id``. Requests use contiguous blocks of the attached KV caches. When meta
        tensors were given, ``tokens`` receives the sequences and ``step`` their lengths."""
        self._check_prompt_tokens(prompts)
        blocks = contiguous_block_tables(self.max_batch, self.max_seq_len, self.page_size)
        begin = next((op for op in self.ops if op.kind == "begin_step"), None)
        if begin is not None:
            if begin.inputs["sampled"] is not tokens_output:
                raise ValueError(f"tokens_output must be the tensor begin_step reads, '{begin.inputs['sampled'].name}'")
            sequences = decode_in_one_launch(self.executor(), begin, [list(p) for p in prompts], blocks,
                                             max_new_tokens, eos_token_id)
        else:
            argmax = next((op for op in self.ops if op.kind == "argmax" and op.outputs["output"] is tokens_output), None)
            if argmax is None:
                raise ValueError(f"tokens_output must be the output of an argmax_layer, got "
                                 f"'{getattr(tokens_output, 'name', tokens_output)}'")
            logits = argmax.inputs["input"].name
            sequences = decode(self.executor(), [list(p) for p in prompts], blocks, self.page_size,
                               max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, logits_name=logits,
                               tokens_name=tokens_output.name)
        if "tokens" in self.meta:
            for b, seq in enumerate(sequences):
                self.meta["tokens"][b, :len(seq)] = torch.tensor(seq, dtype=self.meta["tokens"].dtype)
        if "step" in self.meta:
            self.meta["step"][:len(sequences)] = torch.tensor([len(s) for s in sequences])
        return sequences
