"""A plan as the arrays the megakernel reads: per-worker queues of fixed-width int32 task records,
event trigger counts, and the order of the tensor pointer table.

Record layout (the one source of truth; ``source.py`` emits the matching C++ struct):
``{opcode, variant, task id, prefetch tensor, prefetch offset / 16, bytes asked ahead / 16,
bytes asked at the task's own start / 16, waits[max_waits], signals[max_signals], args[num_args]}``,
-1 padded. A wait for the previous
step's signals (an event with lag 1, ``Task.carried_events``) is written as ``-(event + 2)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from vllm_mpk.codegen.tasks import LINEAR_MODES, CudaTask, cuda_task, prefetch_region, task_args
from vllm_mpk.graph.ir import Task
from vllm_mpk.graph.ops import REGISTRY
from vllm_mpk.graph.plan import Plan

HEADER_WORDS = 7
PREFETCH_CAP_BYTES = 48 * 1024  # per task: the step-time optimum of a 16-96 KiB sweep at 8B (H100), within noise elsewhere


def _sorted_caps(policy: PrefetchPolicy, caps: tuple[tuple[str, int], ...], what: str) -> tuple[tuple[str, int], ...]:
    keys = [key for key, _ in caps]
    if len(set(keys)) != len(keys):
        raise ValueError(f"prefetch policy {policy}: {what} names a key more than once")
    if any(cap < 0 or cap % 16 for _, cap in caps):
        raise ValueError(f"prefetch policy {policy}: caps must be non-negative multiples of 16")
    return tuple(sorted(caps))  # one spelling per policy


@dataclass(frozen=True)
class PrefetchPolicy:
    """How a worker asks L2 for its linear tiles' weights ahead of the loads that read them.

    Ahead: the first ``cap_bytes`` of a tile's rows (``kind_caps``: another cap for the tiles of
    some op kinds, e.g. ``(("rmsnorm_linear_silu_mul", 0),)``) when the task ``ahead`` places
    before it in the worker's queue starts (0: never). At its own start: ``own_caps`` lets the
    tiles of an op kind or of ops whose name ends in a key (``"o_proj"``) ask for their first
    ``cap`` bytes when they start themselves, which is while they wait for their inputs (o_proj
    waits for attention with DRAM otherwise idle). A tile whose ahead-asker streams no weights of
    its own (an attention task) asks all of its own cap ahead instead. All of it is launch data
    (the task table and a kernel argument), so a built kernel can be timed under several policies."""

    cap_bytes: int = PREFETCH_CAP_BYTES
    ahead: int = 1
    kind_caps: tuple[tuple[str, int], ...] = ()
    own_caps: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.cap_bytes < 0 or self.cap_bytes % 16 or self.ahead < 0:
            raise ValueError(f"prefetch policy {self}: caps must be non-negative multiples of 16 and ahead "
                             "non-negative")
        object.__setattr__(self, "kind_caps", _sorted_caps(self, self.kind_caps, "kind_caps"))
        object.__setattr__(self, "own_caps", _sorted_caps(self, self.own_caps, "own_caps"))
        unknown = sorted({kind for kind, _ in self.kind_caps} - set(LINEAR_MODES))
        if unknown:
            raise ValueError(f"prefetch policy {self}: only linear tiles prefetch; {unknown} are not among "
                             f"{sorted(LINEAR_MODES)}")

    def cap_of(self, kind: str) -> int:
        """Bytes of a tile of op ``kind`` asked of L2 ahead of its start."""
        return dict(self.kind_caps).get(kind, self.cap_bytes)

    def own_cap_of(self, task: Task) -> int:
        """Bytes of ``task``'s tile asked at its own start (its op kind's key first, then the
        longest name ending that matches; 0 when none does)."""
        caps = dict(self.own_caps)
        if task.op.kind in caps:
            return caps[task.op.kind]
        endings = [key for key in caps if task.op.name.endswith(key)]
        return caps[max(endings, key=len)] if endings else 0


@dataclass(frozen=True)
class RecordLayout:
    max_waits: int
    max_signals: int
    num_args: int

    @property
    def words(self) -> int:
        return HEADER_WORDS + self.max_waits + self.max_signals + self.num_args


@dataclass
class Variants:
    """The distinct template instances a plan runs, numbered in first-use order."""

    tasks: list[CudaTask]
    of_op: dict[int, int]  # op index -> variant number


def plan_variants(plan: Plan, threads: int) -> Variants:
    tasks: list[CudaTask] = []
    of_op: dict[int, int] = {}
    for op in plan.ops:
        t = cuda_task(op, threads)
        if t not in tasks:
            tasks.append(t)
        of_op[op.index] = tasks.index(t)
    return Variants(tasks, of_op)


def waits(task: Task) -> tuple[int, ...]:
    """The task's wait words: this step's events, then the previous step's as ``-(event + 2)``."""
    return (*task.wait_events, *(-(e + 2) for e in task.carried_events))


def tensor_ids(plan: Plan) -> dict[str, int]:
    return {name: i for i, name in enumerate(plan.tensors)}


def record_layout(plan: Plan, args: list[list[int]]) -> RecordLayout:
    return RecordLayout(max(1, max(len(waits(t)) for t in plan.tasks)),
                        max(1, max(len(t.signal_events) for t in plan.tasks)), max(map(len, args)))


def all_args(plan: Plan, tensors: Mapping[str, torch.Tensor]) -> list[list[int]]:
    ids = tensor_ids(plan)
    return [task_args(t, ids, tensors) for t in plan.tasks]


def task_table(plan: Plan, variants: Variants, args: list[list[int]], layout: RecordLayout,
               tensors: Mapping[str, torch.Tensor], prefetch: PrefetchPolicy = PrefetchPolicy()) -> np.ndarray:
    """``[num_workers, max_tasks, words]`` int32, each worker's queue in order, -1 padded."""
    ids = tensor_ids(plan)
    max_tasks = max(len(q) for q in plan.queues)
    table = np.full((plan.num_workers, max_tasks, layout.words), -1, dtype=np.int32)
    w0, s0 = HEADER_WORDS, HEADER_WORDS + layout.max_waits
    a0 = s0 + layout.max_signals
    for worker, queue in enumerate(plan.queues):
        for i, tid in enumerate(queue):
            task = plan.tasks[tid]
            row = table[worker, i]
            asker = plan.tasks[queue[i - prefetch.ahead]] if prefetch.ahead and i >= prefetch.ahead else None
            row[:HEADER_WORDS] = (REGISTRY[task.op.kind].opcode, variants.of_op[task.op.index], tid,
                                  *prefetch_words(task, asker, ids, tensors, prefetch))
            row[w0:w0 + len(waits(task))] = waits(task)
            row[s0:s0 + len(task.signal_events)] = task.signal_events
            row[a0:a0 + len(args[tid])] = args[tid]
    return table


def prefetch_words(task: Task, asker: Task | None, ids: Mapping[str, int], tensors: Mapping[str, torch.Tensor],
                   prefetch: PrefetchPolicy) -> tuple[int, int, int, int]:
    """A record's (tensor, offset / 16, bytes asked ahead / 16, bytes asked by its own start / 16);
    ``asker`` is the task whose start asks ahead (None: the step's start does)."""
    region = prefetch_region(task, ids, tensors)
    if region is None:
        return -1, 0, 0, 0
    tensor, offset, size = region
    ahead = min(size, prefetch.cap_of(task.op.kind)) if prefetch.ahead else 0
    own = min(size, prefetch.own_cap_of(task))
    if prefetch.ahead and asker is not None and asker.op.kind not in LINEAR_MODES:
        ahead = max(ahead, own)  # the asker streams no weights: DRAM is free while it runs
    return tensor, offset // 16, ahead // 16, max(ahead, own) // 16


def trigger_counts(plan: Plan) -> np.ndarray:
    return np.array([e.trigger_count for e in plan.events] or [0], dtype=np.int32)
