"""The estimate of the device memory a megakernel build allocates (``integration/memory.py``),
against the plans ``build_decoder`` makes for shipped configs (on meta tensors: only shapes are
read) and the tables ``Megakernel`` would allocate for them."""

from __future__ import annotations

import pytest
import torch

from vllm_mpk.codegen.tables import all_args, record_layout
from vllm_mpk.graph.ir import Role
from vllm_mpk.graph.plan import Plan
from vllm_mpk.graph.step_state import STEP_INPUT_NAMES
from vllm_mpk.integration.memory import SEGMENT_SLACK, Reservation, activation_sizes, megakernel_bytes, plan_contents
from vllm_mpk.models.catalog import shipped_config
from vllm_mpk.models.decoder import DecodeOptions, build_decoder
from vllm_mpk.models.spec import ModelSpec
from vllm_mpk.models.weights import expected_shapes
from vllm_mpk.runtime import control

META = torch.device("meta")


def meta_plan(spec: ModelSpec, max_batch: int, workers: int, schedule: str,
              kv_splits: int | None = 1, world_size: int = 1) -> tuple[Plan, dict[str, torch.Tensor]]:
    """The last rank's plan of ``world_size`` (it adds no residual: the smallest tables) and
    meta tensors for everything it binds, its symmetric ones included."""
    local = spec.shard(world_size)
    weights = {n: torch.empty(s, dtype=torch.bfloat16, device=META) for n, s in expected_shapes(local).items()}
    caches = [torch.empty(4, 16, local.num_kv_heads, 2 * spec.head_dim, dtype=torch.bfloat16, device=META)
              .permute(0, 2, 1, 3) for _ in range(spec.num_layers)]
    rope = torch.empty(4096, spec.head_dim, dtype=torch.bfloat16, device=META)
    options = DecodeOptions(max_batch=max_batch, max_seq_len=4096, num_workers=workers, schedule=schedule,
                            final="hidden", kv_splits=kv_splits, world_size=world_size, rank=world_size - 1)
    decoder = build_decoder(spec, weights, caches, options, rope_cache=rope)
    plan = decoder.plan
    made = {n: torch.empty(h.shape, dtype=h.dtype, device=META) for n, h in plan.tensors.items()
            if h.role is not Role.INPUT or n in STEP_INPUT_NAMES}
    return plan, {**decoder.kernel.attached, **made}


def gpu_allocation(plan: Plan, tensors: dict[str, torch.Tensor], profile: bool) -> int:
    """What ``Megakernel.__init__`` allocates for ``plan``, without allocator rounding."""
    words = record_layout(plan, all_args(plan, tensors)).words
    longest = max(len(q) for q in plan.queues)
    total = sum(h.nbytes for h in plan.tensors.values() if h.role is not Role.INPUT)
    total += plan.num_workers * longest * words * 4 + plan.num_workers * 4 + len(plan.tensors) * 8
    total += 2 * max(1, len(plan.events)) * 4 + control.WORDS * 4
    return total + (plan.num_workers * longest * 2 * 8 if profile else 0)


@pytest.mark.parametrize("name,max_batch,workers,schedule,kv_splits,world", [
    ("qwen3-0.6b", 8, 132, "earliest_finish", 1, 1),
    ("qwen3-0.6b", 1, 132, "earliest_finish", 1, 1),
    ("llama-3.2-1b", 8, 132, "round_robin", 1, 1),
    ("qwen3-0.6b", 5, 16, "earliest_finish", 1, 1),
    ("llama-3.2-1b", 8, 132, "earliest_finish", 4, 1),
    ("qwen3-0.6b", 8, 132, "earliest_finish", 1, 2),
    ("llama-3.1-8b", 1, 132, "earliest_finish", 1, 4),
    ("qwen3-8b", 8, 132, "earliest_finish", 2, 2),
    # auto (None): 2 splits at batch 1-4 of 8 KV heads on 132 workers, 1 at batch 8 unless TP halves the heads
    ("qwen3-0.6b", 1, 132, "earliest_finish", None, 1),
    ("llama-3.1-8b", 4, 132, "earliest_finish", None, 1),
    ("qwen3-0.6b", 8, 132, "earliest_finish", None, 1),
    ("llama-3.1-8b", 8, 132, "earliest_finish", None, 2),
    ("qwen3-0.6b", 2, 16, "earliest_finish", None, 1),
])
def test_estimate_covers_what_a_build_allocates(name: str, max_batch: int, workers: int, schedule: str,
                                                kv_splits: int | None, world: int) -> None:
    spec = ModelSpec.from_hf_config(shipped_config(name))
    plan, tensors = meta_plan(spec, max_batch, workers, schedule, kv_splits, world)
    contents = plan_contents(spec, max_batch, workers, kv_splits, world)
    assert (contents.num_tasks, contents.num_tensors) == (len(plan.tasks), len(plan.tensors))
    own = sorted(h.nbytes for h in plan.tensors.values() if h.role is not Role.INPUT)
    assert sorted(activation_sizes(spec, max_batch, workers, kv_splits=kv_splits, world_size=world)) == own
    for profile in (False, True):
        exact = gpu_allocation(plan, tensors, profile)
        estimate = megakernel_bytes(spec, max_batch, workers, profile=profile, kv_splits=kv_splits, world_size=world)
        assert exact <= estimate <= 2 * exact + SEGMENT_SLACK, (exact, estimate)


def test_auto_estimate_matches_the_plans_vllm_builds() -> None:
    """vLLM's reservation sums the estimate over ``plan_batches`` with ``kv_splits`` None: each
    size is resolved as its build resolves it (split at batch 1/2/4 of 8 KV heads on 132 workers,
    not at 8), so the estimate's split-KV scratch and tasks are exactly the built plans'."""
    from vllm_mpk.integration.options import plan_batches

    spec = ModelSpec.from_hf_config(shipped_config("qwen3-0.6b"))
    split = {}
    for b in plan_batches(8):
        plan, tensors = meta_plan(spec, b, 132, "earliest_finish", None)
        split[b] = bool(plan.counters)  # the arrival words exist only in a split plan
        assert plan_contents(spec, b, 132).num_tasks == len(plan.tasks)
        assert sum(activation_sizes(spec, b, 132)) == sum(h.nbytes for h in plan.tensors.values()
                                                          if h.role is Role.INTERMEDIATE)
        exact = gpu_allocation(plan, tensors, False)
        assert exact <= megakernel_bytes(spec, b, 132) <= 2 * exact + SEGMENT_SLACK
    assert split == {1: True, 2: True, 4: True, 8: False}
    # forcing 1 everywhere costs less than auto at batch 1, which adds the split scratch
    assert megakernel_bytes(spec, 1, 132, kv_splits=1) < megakernel_bytes(spec, 1, 132)


def test_reservation_releases_once() -> None:
    r = Reservation(4096, torch.device("cpu"))
    assert r.block is not None and r.block.numel() == 4096
    r.release()
    r.release()
    assert r.block is None
