"""Reusing a plan compiled before vLLM allocated its KV cache.

Compiling a plan (lowering, event wiring, scheduling, validation) costs about a second per batch
size; declaring its layers costs almost nothing. The plans are therefore compiled while vLLM loads
the model (``integration/early_build.py``), from a declaration whose KV caches are placeholders of
one block: the number of blocks is what vLLM decides last, after profiling memory. At the first
decode step the layers are declared again on vLLM's own tensors; when that declaration is the
early one up to the KV caches' block count, the early plan is taken, its cache tensors widened to
the real block count. Nothing compiled depends on that count: attention tiles read and write a
head's whole cache, and the task table takes the cache's strides from the bound tensor.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from vllm_mpk.graph.ir import Access, Op, Task, TensorHandle
from vllm_mpk.graph.plan import Plan
from vllm_mpk.models.decoder import DecodeLayers

KV_CACHE_ROLE = "kv_cache"


def kv_cache_names(ops: list[Op]) -> set[str]:
    return {op.inputs[KV_CACHE_ROLE].name for op in ops if KV_CACHE_ROLE in op.inputs}


def _layer(op: Op) -> tuple[Any, ...]:
    """An op as its declaration gives it, with its tensors by name."""
    return (op.kind, op.name, op.attrs, op.grid_dim, op.block_dim, {r: h.name for r, h in op.inputs.items()},
            {r: h.name for r, h in op.outputs.items()})


def difference(early: DecodeLayers, now: DecodeLayers, plan: Plan) -> str | None:
    """What ``now`` declares that ``early`` (compiled into ``plan``) does not, besides the number of
    KV blocks; None when ``plan`` serves ``now``."""
    changed = [f"{f.name} {getattr(early.options, f.name)} -> {getattr(now.options, f.name)}"
               for f in fields(early.options) if getattr(early.options, f.name) != getattr(now.options, f.name)]
    if changed:
        return f"plan options {', '.join(changed)}"
    before, after = early.kernel.tensors, now.kernel.tensors
    if list(before) != list(after):
        return f"the plan's tensors changed: {sorted(set(before) ^ set(after)) or 'their order'}"
    caches = kv_cache_names(now.kernel.ops)
    for name, was in before.items():
        now_handle = after[name]
        same_shape = was.shape == now_handle.shape or (name in caches and was.shape[1:] == now_handle.shape[1:])
        if not same_shape or (was.dtype, was.role) != (now_handle.dtype, now_handle.role):
            return f"tensor '{name}' was {was}, is {now_handle}"
    if list(map(_layer, early.kernel.ops)) != list(map(_layer, now.kernel.ops)):
        return "the layers changed"
    return partial_cache_access(plan)


def partial_cache_access(plan: Plan) -> str | None:
    """A task of ``plan`` that reads or writes only some blocks of a KV cache, which would tie the
    plan to its block count; None where every cache access covers all blocks, and for a plan
    restored from the plan cache, stored only without one (``early_build.compile_plan``)."""
    if not plan.compiled:
        return None
    caches = kv_cache_names(plan.ops)
    for task in _cache_tasks(plan):
        for access in (*task.reads, *task.writes):
            if access.tensor in caches and access.box[0] != (0, plan.tensors[access.tensor].shape[0]):
                return f"{task} accesses blocks {access.box[0]} of '{access.tensor}', not all of them"
    return None


def _cache_tasks(plan: Plan) -> list[Task]:
    return [task for task in plan.tasks if KV_CACHE_ROLE in task.op.inputs]


def widen_kv_caches(plan: Plan, now: DecodeLayers) -> Plan:
    """``plan``, in place, with the KV cache tensors of ``now`` (whose block count differs; checked
    by ``difference``): the handles in its tensors and ops, and the whole-cache boxes of its tasks
    (where they are compiled)."""
    handles = {n: now.kernel.tensors[n] for n in kv_cache_names(now.kernel.ops)
               if plan.tensors[n].shape != now.kernel.tensors[n].shape}
    if not handles:
        return plan
    plan.tensors.update(handles)
    for op in plan.ops:
        for role, handle in op.inputs.items():
            if handle.name in handles:
                op.inputs[role] = handles[handle.name]
    if not plan.compiled:  # its tasks, when compiled, are lowered from the widened ops
        return plan
    for task in _cache_tasks(plan):
        if any(a.tensor in handles for a in (*task.reads, *task.writes)):
            task.reads = tuple(_widened(a, handles) for a in task.reads)
            task.writes = tuple(_widened(a, handles) for a in task.writes)
    return plan


def _widened(access: Access, handles: dict[str, TensorHandle]) -> Access:
    handle = handles.get(access.tensor)
    return access if handle is None else replace(access, box=((0, handle.shape[0]), *access.box[1:]))
