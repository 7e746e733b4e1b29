"""A compiled plan: ops, tasks, events and per-worker queues, plus the numbers people read.

A plan restored from the plan cache (``codegen/plan_cache.py``) starts as its declaration and its
``PlanCounts``, which is all a GPU launch reads besides the cached task table; its tasks, events
and queues are compiled the first time one of them is read (the CPU reference executor, a
stopped task's description, a profile), and checked against the counts then.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TypeAlias

from vllm_mpk.graph.events import wire_events
from vllm_mpk.graph.ir import Event, Op, Task, TensorHandle
from vllm_mpk.graph.lowering import lower_ops
from vllm_mpk.graph.ops import REGISTRY
from vllm_mpk.graph.schedule import assign, critical_path, task_cost_us
from vllm_mpk.graph.validate import validate

Compiled: TypeAlias = tuple[list[Task], list[Event], list[list[int]]]


@dataclass(frozen=True)
class PlanCounts:
    """What a compiled plan's queues and events amount to: each worker's queue length and each
    event's trigger count (by event id)."""

    queue_lens: tuple[int, ...]
    trigger_counts: tuple[int, ...]

    @property
    def num_tasks(self) -> int:
        return sum(self.queue_lens)

    @classmethod
    def of(cls, events: list[Event], queues: list[list[int]]) -> PlanCounts:
        return cls(tuple(map(len, queues)), tuple(e.trigger_count for e in events))


class Plan:
    def __init__(self, tensors: dict[str, TensorHandle], ops: list[Op], tasks: list[Task], events: list[Event],
                 queues: list[list[int]]):
        self.tensors, self.ops = tensors, ops
        self._compiled: Compiled | None = (tasks, events, queues)
        self.counts = PlanCounts.of(events, queues)
        self._policy = ""
        self.key: str | None = None  # its plan cache key, where it was stored or restored there

    @classmethod
    def deferred(cls, tensors: dict[str, TensorHandle], ops: list[Op], policy: str, counts: PlanCounts) -> Plan:
        """The plan of this declaration, compiled under ``policy`` when its tasks are first read."""
        plan = cls.__new__(cls)
        plan.tensors, plan.ops, plan.counts, plan._policy, plan.key = tensors, ops, counts, policy, None
        plan._compiled = None
        return plan

    @property
    def compiled(self) -> bool:
        """Whether the tasks, events and queues exist (false until a deferred plan's are read)."""
        return self._compiled is not None

    def _compile(self) -> Compiled:
        if self._compiled is None:
            plan = build_plan(self.tensors, self.ops, self.num_workers, self._policy)
            if plan.counts != self.counts:
                raise RuntimeError(f"the plan cache entry {self.key} disagrees with compiling its declaration "
                                   f"({plan.num_tasks} tasks, {len(plan.events)} events; cached: "
                                   f"{self.counts.num_tasks} tasks, {len(self.counts.trigger_counts)} events): "
                                   f"delete the plans folder of the JIT cache")
            self._compiled = plan._compiled
        return self._compiled

    @property
    def tasks(self) -> list[Task]:
        return self._compile()[0]

    @property
    def events(self) -> list[Event]:
        return self._compile()[1]

    @property
    def queues(self) -> list[list[int]]:
        return self._compile()[2]

    @property
    def num_workers(self) -> int:
        return len(self.counts.queue_lens)

    @property
    def num_tasks(self) -> int:
        return self.counts.num_tasks

    @property
    def counters(self) -> set[str]:
        """Intermediates that count across steps (``OpDef.counters``): allocate them zeroed and
        keep them (the steps themselves return them to zero)."""
        return {op.outputs[role].name for op in self.ops for role in REGISTRY[op.kind].counters(op)}

    def summary(self) -> str:
        """Layers, tasks and events per op kind; tasks and bytes per worker; critical path."""
        tasks_by_kind = Counter(t.op.kind for t in self.tasks)
        events_by_kind = Counter(self.tasks[e.consumers[0]].op.kind for e in self.events)
        layers_by_kind = Counter(op.kind for op in self.ops)
        lines = [f"{'op':34} {'layers':>6} {'tasks':>7} {'events':>7}"]
        for kind in layers_by_kind:
            lines.append(f"{kind:34} {layers_by_kind[kind]:>6} {tasks_by_kind[kind]:>7} {events_by_kind[kind]:>7}")
        lines.append(f"{'total':34} {len(self.ops):>6} {len(self.tasks):>7} {len(self.events):>7}")
        per_worker_bytes: dict[int, int] = defaultdict(int)
        for t in self.tasks:
            per_worker_bytes[t.worker] += t.bytes
        counts = [len(q) for q in self.queues]
        nbytes = [per_worker_bytes[w] for w in range(self.num_workers)]
        lines.append(f"workers: {self.num_workers}; tasks per worker min/mean/max "
                     f"{min(counts)}/{sum(counts) / len(counts):.1f}/{max(counts)}; MB per worker min/mean/max "
                     f"{min(nbytes) / 1e6:.2f}/{sum(nbytes) / len(nbytes) / 1e6:.2f}/{max(nbytes) / 1e6:.2f}")
        us, length = critical_path(self.tasks, self.events, self.num_workers)
        total_us = sum(task_cost_us(t, self.num_workers) for t in self.tasks) / self.num_workers
        lines.append(f"critical path: {length} tasks, ~{us:.0f} us estimated; "
                     f"busy time per worker ~{total_us:.0f} us; bytes per step {sum(nbytes) / 1e6:.1f} MB")
        return "\n".join(lines)


def build_plan(tensors: dict[str, TensorHandle], ops: list[Op], num_workers: int, policy: str) -> Plan:
    tasks = lower_ops(ops)
    events = wire_events(tensors, tasks)
    queues = assign(tasks, events, num_workers, policy)
    validate(tensors, tasks, events, queues)
    return Plan(tensors, ops, tasks, events, queues)
