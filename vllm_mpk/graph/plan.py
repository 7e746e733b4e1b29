"""A compiled plan: ops, tasks, events and per-worker queues, plus the numbers people read."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from vllm_mpk.graph.events import wire_events
from vllm_mpk.graph.ir import Event, Op, Task, TensorHandle
from vllm_mpk.graph.lowering import lower_ops
from vllm_mpk.graph.ops import REGISTRY
from vllm_mpk.graph.schedule import assign, critical_path, task_cost_us
from vllm_mpk.graph.validate import validate


@dataclass
class Plan:
    tensors: dict[str, TensorHandle]
    ops: list[Op]
    tasks: list[Task]
    events: list[Event]
    queues: list[list[int]]

    @property
    def num_workers(self) -> int:
        return len(self.queues)

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
