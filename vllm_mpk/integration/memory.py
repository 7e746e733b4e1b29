"""The device memory the megakernel allocates when it is built, estimated before it exists, and the
reservation that makes vLLM's memory profiling count it.

vLLM sizes its KV cache from what the worker holds after loading the model plus the peak of one
profiling forward (``v1/worker/gpu_worker.py:determine_available_memory``; the weights' share is
``DeviceMemoryProfiler`` around ``load_model``). The megakernel is built much later, at the first
uncaptured decode step, so its activation buffers and task tables would sit outside that budget.
``Reservation`` allocates their estimated size while the model is constructed (inside
``load_model``, so it counts as model memory) and frees it, cache included, just before the build,
whose own allocations then take the same memory back.

The estimate mirrors what a build allocates (``runtime/megakernel.py:Megakernel.__init__``, and
the plan of ``models/decoder.py:build_decoder`` with ``final="hidden"``, for one rank of
``world_size``):
- intermediates, exactly: ``[max_batch, width]`` bf16 buffers, per layer qkv, attention output,
  SwiGLU activation (the rank's shards of these three), the two residual sums, plus the embedding
  output and the final norm's output; with split KV (``kv_splits`` S > 1; None, the default,
  resolves per plan as the build does, ``models/decoder.py:plan_kv_splits``) each layer's float32
  partials ``[max_batch, q heads, S, head_dim + 2]`` and int32 arrival counts ``[max_batch, kv
  heads]`` too; with several ranks each all-reduce's
  part, receive slots ``[2, world, max_batch, hidden]`` and signal words ``[2, tiles]`` (these on
  NVSHMEM's symmetric heap, whose own reserve and bookkeeping are not counted here);
- the task table ``[workers, max_tasks, words]`` int32, bounded: the task count is exact, the
  longest queue is taken as twice the mean (plans measured stay under 1.35x), words under 32;
- event triggers and counters, the pointer table, the control block and the optional profile.
Each allocation is rounded up as the caching allocator does, and 2 MiB is added for the segment
rounding of small allocations.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vllm_mpk.api import PARITIES
from vllm_mpk.graph.ir import Role
from vllm_mpk.models.decoder import linear_grid, plan_kv_splits
from vllm_mpk.models.spec import ModelSpec
from vllm_mpk.models.weights import expected_shapes
from vllm_mpk.runtime import control

logger = logging.getLogger("vllm.mpk")

ALLOCATION_ROUND = 512  # the caching allocator's block granularity
SEGMENT_SLACK = 2 << 20  # small allocations come from 2 MiB segments
TABLE_WORDS = 32  # task record words: 6 header + waits + signals + arguments (27-28 measured)
QUEUE_SKEW = 2  # longest worker queue over the mean, bounded (earliest_finish measured <= 1.35)
BOOKKEEPING = ("tasks", "queue_lens", "pointers", "triggers", "counters", "control", "profile")


def _rounded(nbytes: int) -> int:
    return -(-nbytes // ALLOCATION_ROUND) * ALLOCATION_ROUND


def all_reduces(spec: ModelSpec, world_size: int) -> int:
    """Sums over ranks in a decode plan: the embedding's and two per layer (none on one rank)."""
    return 0 if world_size == 1 else 2 * spec.num_layers + 1


def activation_widths(spec: ModelSpec, world_size: int = 1) -> list[int]:
    """The row width of every intermediate of rank's decode plan, each ``[max_batch, width]`` bf16
    (with several ranks, each all-reduce's part next to its sum)."""
    h, local = spec.hidden_size, spec.shard(world_size)
    layer = [local.qkv_width, local.num_q_heads * spec.head_dim, local.intermediate_size, h, h]
    return [h, *layer * spec.num_layers, h] + [h] * all_reduces(spec, world_size)


def split_kv_bytes(spec: ModelSpec, max_batch: int, kv_splits: int, world_size: int = 1) -> list[int]:
    """Bytes of each layer's split-KV partials and arrival counts (none without splitting);
    ``kv_splits`` is the resolved count (``plan_kv_splits``)."""
    if kv_splits == 1:
        return []
    local = spec.shard(world_size)
    partials = max_batch * local.num_q_heads * kv_splits * (spec.head_dim + 2) * 4
    return [partials, max_batch * local.num_kv_heads * 4] * spec.num_layers


def exchange_bytes(spec: ModelSpec, max_batch: int, num_workers: int, world_size: int) -> list[int]:
    """Bytes of the all-reduces' receive slots and signal words (``allreduce_layer``)."""
    slots = PARITIES * world_size * max_batch * spec.hidden_size * 2
    signals = PARITIES * linear_grid(spec.hidden_size, num_workers) * 8
    return [slots, signals] * all_reduces(spec, world_size)


def activation_sizes(spec: ModelSpec, max_batch: int, num_workers: int, dtype: torch.dtype = torch.bfloat16, *,
                     kv_splits: int | None = None, world_size: int = 1) -> list[int]:
    """Bytes of each of the plan's intermediates (what the CPU reference executor allocates too)."""
    splits = plan_kv_splits(spec, max_batch, num_workers, kv_splits, world_size)
    return [max_batch * w * dtype.itemsize for w in activation_widths(spec, world_size)] + \
        split_kv_bytes(spec, max_batch, splits, world_size)


def activation_bytes(spec: ModelSpec, max_batch: int, num_workers: int, dtype: torch.dtype = torch.bfloat16, *,
                     kv_splits: int | None = None, world_size: int = 1) -> int:
    """Bytes of the plan's intermediates, unrounded."""
    return sum(activation_sizes(spec, max_batch, num_workers, dtype, kv_splits=kv_splits, world_size=world_size))


def task_count(spec: ModelSpec, max_batch: int, num_workers: int, kv_splits: int | None = None,
               world_size: int = 1) -> int:
    """Tiles of rank's decode plan: embedding, five ops per layer, the all-reduces, the final norm."""
    h, w, local = spec.hidden_size, num_workers, spec.shard(world_size)
    attention = local.num_kv_heads * max_batch * plan_kv_splits(spec, max_batch, w, kv_splits, world_size)
    layer = (linear_grid(local.qkv_width, w) + attention + linear_grid(h, w)
             + linear_grid(2 * local.intermediate_size, w) + linear_grid(h, w))
    return min(w, h // 8) + spec.num_layers * layer + all_reduces(spec, world_size) * linear_grid(h, w) + max_batch


def megakernel_bytes(spec: ModelSpec, max_batch: int, num_workers: int, *, profile: bool = False,
                     kv_splits: int | None = None, world_size: int = 1) -> int:
    """An upper estimate of the device memory rank's build allocates, allocator rounding included;
    ``kv_splits`` as given to the build (None: resolved for this plan as ``build_decoder`` does)."""
    tasks = task_count(spec, max_batch, num_workers, kv_splits, world_size)
    longest = QUEUE_SKEW * -(-tasks // num_workers) + 8
    activations = activation_sizes(spec, max_batch, num_workers, kv_splits=kv_splits, world_size=world_size)
    sizes = activations + exchange_bytes(spec, max_batch, num_workers, world_size)
    sizes += [num_workers * longest * TABLE_WORDS * 4, num_workers * 4, control.WORDS * 4]
    sizes += [2 * tasks * 4] * 2  # event triggers and counters: fewer events than task signals
    # pointers: weights, KV caches, intermediates, exchange buffers, step inputs and a few more
    num_tensors = len(expected_shapes(spec)) + spec.num_layers + len(activations) + 2 * all_reduces(spec, world_size) + 8
    sizes.append(num_tensors * 8)
    if profile:
        sizes.append(num_workers * longest * 2 * 8)
    return sum(map(_rounded, sizes)) + SEGMENT_SLACK


def allocated_bytes(executor: Any) -> int:
    """What a built executor allocated: the plan's intermediates and, on the GPU, its tables."""
    plan = executor.plan
    total = sum(_rounded(executor.tensors[n].nbytes) for n, t in plan.tensors.items() if t.role is not Role.INPUT)
    for name in BOOKKEEPING:
        t = getattr(executor, name, None)
        if isinstance(t, torch.Tensor):
            total += _rounded(t.nbytes)
    return total


class Reservation:
    """A block of device memory held from model construction until the megakernel is built."""

    def __init__(self, nbytes: int, device: torch.device):
        self.nbytes = nbytes
        self.block: torch.Tensor | None = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def release(self) -> None:
        """Free the block and, on a GPU, return it from the caching allocator to the device: the
        build's allocations are mostly small ones from another pool (and may run on vLLM's graph
        capture stream), so a cached block would not be reused and would count twice."""
        if self.block is None:
            return
        on_gpu = self.block.device.type == "cuda"
        self.block = None
        if on_gpu and not torch.cuda.is_current_stream_capturing():
            torch.cuda.empty_cache()
