"""A plan as the arrays the megakernel reads: per-worker queues of fixed-width int32 task records,
event trigger counts, and the order of the tensor pointer table.

Record layout (the one source of truth; ``source.py`` emits the matching C++ struct):
``{opcode, variant, task id, prefetch tensor, prefetch offset / 16, prefetch bytes / 16,
waits[max_waits], signals[max_signals], args[num_args]}``, -1 padded. A wait for the previous
step's signals (an event with lag 1, ``Task.carried_events``) is written as ``-(event + 2)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from vllm_mpk.codegen.ops import CudaTask, Target
from vllm_mpk.codegen.ops.linear import LINEAR_MODES
from vllm_mpk.codegen.tasks import cuda_task, prefetch_region, task_args
from vllm_mpk.graph.ir import Task
from vllm_mpk.graph.ops import REGISTRY
from vllm_mpk.graph.plan import Plan

HEADER_WORDS = 6
PREFETCH_CAP_BYTES = 48 * 1024  # per task: the step-time optimum of a 16-96 KiB sweep at 8B (H100), within noise elsewhere


@dataclass(frozen=True)
class PrefetchPolicy:
    """How far ahead a worker asks L2 for its tasks' weights: the first ``cap_bytes`` of a linear
    tile's rows (``kind_caps``: another cap for the tiles of some op kinds, e.g.
    ``(("rmsnorm_linear_silu_mul", 0),)``), when the task ``ahead`` places before it in the worker's
    queue starts (0: never), or, with ``landed``, once that task's own weights are all in (a linear
    tile, after its last multiply; another task at its end), so the two do not share DRAM. All of it
    is launch data (the task table and kernel arguments), so a built kernel can be timed under
    several policies."""

    cap_bytes: int = PREFETCH_CAP_BYTES
    ahead: int = 1
    kind_caps: tuple[tuple[str, int], ...] = ()
    landed: bool = False

    def __post_init__(self) -> None:
        kinds = [kind for kind, _ in self.kind_caps]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"prefetch policy {self}: a kind has more than one cap")
        object.__setattr__(self, "kind_caps", tuple(sorted(self.kind_caps)))  # one spelling per policy
        caps = [self.cap_bytes, *(cap for _, cap in self.kind_caps)]
        if any(cap < 0 or cap % 16 for cap in caps) or self.ahead < 0:
            raise ValueError(f"prefetch policy {self}: caps must be non-negative multiples of 16 and ahead "
                             "non-negative")
        unknown = sorted({kind for kind, _ in self.kind_caps} - set(LINEAR_MODES))
        if unknown:
            raise ValueError(f"prefetch policy {self}: only linear tiles prefetch; {unknown} are not among "
                             f"{sorted(LINEAR_MODES)}")

    def cap_of(self, kind: str) -> int:
        """Bytes of a tile of op ``kind`` asked of L2."""
        return dict(self.kind_caps).get(kind, self.cap_bytes)


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
    target = Target(threads, host_step_inputs=not any(op.kind == "begin_step" for op in plan.ops))
    for op in plan.ops:
        t = cuda_task(op, target)
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
            region = prefetch_region(task, ids, tensors)
            pf = (-1, 0, 0) if region is None else (region[0], region[1] // 16,
                                                     min(region[2], prefetch.cap_of(task.op.kind)) // 16)
            row[:HEADER_WORDS] = (REGISTRY[task.op.kind].opcode, variants.of_op[task.op.index], tid, *pf)
            row[w0:w0 + len(waits(task))] = waits(task)
            row[s0:s0 + len(task.signal_events)] = task.signal_events
            row[a0:a0 + len(args[tid])] = args[tid]
    return table


def trigger_counts(plan: Plan) -> np.ndarray:
    return np.array(plan.counts.trigger_counts or [0], dtype=np.int32)
