"""The device memory the megakernel allocates when it is built, estimated before it exists, and the
reservation that makes vLLM's memory profiling count it.

vLLM sizes its KV cache from what the worker holds after loading the model plus the peak of one
profiling forward (``v1/worker/gpu_worker.py:determine_available_memory``; the weights' share is
``DeviceMemoryProfiler`` around ``load_model``). The megakernel is built much later, at the first
uncaptured decode step, so its activation buffers and task tables would sit outside that budget.
``Reservation`` allocates their estimated size while the model is constructed (inside
``load_model``, so it counts as model memory) and frees it, cache included, just before the build,
whose own allocations then take the same memory back.

The estimate comes from the plan itself: ``models/decoder.py:declare_decoder`` declares the rank's
decode step (``final`` as the runtime builds it; under vLLM the same declaration the early build compiles,
``integration/early_build.py``), and the estimate sums what a build allocates for it
(``runtime/megakernel.py:Megakernel.__init__``):
- every tensor the plan does not attach, exactly: intermediates, split-KV scratch, all-reduce parts
  and their exchange buffers (these on NVSHMEM's symmetric heap, whose own reserve and bookkeeping
  are not counted here);
- the task table ``[workers, max_tasks, words]`` int32, bounded: the task count is exact (the
  layers lowered), the longest queue is taken as twice the mean (plans measured stay under 1.35x),
  words under 32;
- event triggers and counters (fewer events than tasks), the pointer table (one per plan tensor),
  the control block and the optional profile.
The plan is lowered but not scheduled, which would cost seconds per size at model load.
Each allocation is rounded up as the caching allocator does, and 2 MiB is added for the segment
rounding of small allocations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from vllm_mpk.api import PersistentKernel
from vllm_mpk.codegen import plan_cache
from vllm_mpk.graph.ir import Role
from vllm_mpk.graph.lowering import lower_ops
from vllm_mpk.models.decoder import DecodeOptions, declare_decoder
from vllm_mpk.models.spec import ModelSpec
from vllm_mpk.models.weights import expected_shapes
from vllm_mpk.runtime import control

logger = logging.getLogger("vllm.mpk")

ALLOCATION_ROUND = 512  # the caching allocator's block granularity
SEGMENT_SLACK = 2 << 20  # small allocations come from 2 MiB segments
TABLE_WORDS = 32  # task record words: 6 header + waits + signals + arguments (27-28 measured)
QUEUE_SKEW = 2  # longest worker queue over the mean, bounded (earliest_finish measured <= 1.35)
BOOKKEEPING = ("tasks", "queue_lens", "pointers", "triggers", "counters", "control", "profile")
META = torch.device("meta")


def _rounded(nbytes: int) -> int:
    return -(-nbytes // ALLOCATION_ROUND) * ALLOCATION_ROUND


@dataclass(frozen=True)
class PlanContents:
    """What sizes a build's allocations: the bytes of each tensor the plan does not attach, its
    number of tensors and of tasks."""

    allocated: tuple[int, ...]
    num_tensors: int
    num_tasks: int


def declared_contents(kernel: PersistentKernel) -> PlanContents:
    """The contents of a declared (not yet compiled) plan: its tensors, and its task count from the
    plan cache (``codegen/plan_cache.py``), else from its layers lowered."""
    allocated = tuple(t.nbytes for t in kernel.tensors.values() if t.role is not Role.INPUT)
    counts = plan_cache.cached_counts(kernel)
    num_tasks = len(lower_ops(kernel.ops)) if counts is None else counts.num_tasks
    return PlanContents(allocated, len(kernel.tensors), num_tasks)


def plan_contents(spec: ModelSpec, max_batch: int, num_workers: int, kv_splits: int | None = None,
                  world_size: int = 1, final: str = "hidden") -> PlanContents:
    """The contents of rank 0's decode plan for ``max_batch`` (``kv_splits`` as given to the build:
    None resolves as ``build_decoder`` does), declared on meta tensors and lowered."""
    local = spec.shard(world_size)
    options = DecodeOptions(max_batch=max_batch, num_workers=num_workers, final=final, kv_splits=kv_splits,
                            world_size=world_size)
    weights = {n: torch.empty(s, dtype=torch.bfloat16, device=META) for n, s in expected_shapes(local).items()}
    cache = torch.empty(1, local.num_kv_heads, options.page_size, 2 * spec.head_dim, dtype=torch.bfloat16, device=META)
    rope = torch.empty(1, spec.head_dim, dtype=torch.bfloat16, device=META)
    return declared_contents(declare_decoder(spec, weights, [cache] * spec.num_layers, options, rope_cache=rope).kernel)


def activation_sizes(spec: ModelSpec, max_batch: int, num_workers: int, *, kv_splits: int | None = None,
                     world_size: int = 1, final: str = "hidden") -> list[int]:
    """Bytes of each of the plan's own tensors (what the CPU reference executor allocates too)."""
    return list(plan_contents(spec, max_batch, num_workers, kv_splits, world_size, final).allocated)


def megakernel_bytes(spec: ModelSpec, max_batch: int, num_workers: int, *, profile: bool = False,
                     kv_splits: int | None = None, world_size: int = 1, final: str = "hidden") -> int:
    """An upper estimate of the device memory rank's build allocates, allocator rounding included;
    ``kv_splits`` as given to the build (None: resolved for this plan as ``build_decoder`` does),
    ``final`` as the plans end under vLLM (``DecodeOptions.final``)."""
    return contents_bytes(plan_contents(spec, max_batch, num_workers, kv_splits, world_size, final), num_workers,
                          profile=profile)


def contents_bytes(plan: PlanContents, num_workers: int, *, profile: bool = False) -> int:
    """The estimate for a plan of these contents on ``num_workers`` workers (``megakernel_bytes``)."""
    tasks = plan.num_tasks
    longest = QUEUE_SKEW * -(-tasks // num_workers) + 8
    sizes = [*plan.allocated, num_workers * longest * TABLE_WORDS * 4, num_workers * 4, control.WORDS * 4]
    sizes += [2 * tasks * 4] * 2  # event triggers and counters: fewer events than task signals
    sizes.append(plan.num_tensors * 8)  # the pointer table
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
