"""Static placement of tasks on workers (one worker per SM).

Every policy emits each worker's queue in one global topological order, which makes the schedule
deadlock-free by construction (validation still simulates it). Costs are estimated from bytes
moved: decode is memory-bound, so a task's time is its bytes over one worker's share of DRAM
bandwidth plus a fixed per-task overhead.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from vllm_mpk.graph.ir import Event, Task

DRAM_BYTES_PER_US = 3.0e6  # ~3.0 TB/s, an H100's read stream (docs/DESIGN.md, the schedule)
TASK_OVERHEAD_US = 0.5


def task_cost_us(task: Task, num_workers: int) -> float:
    return task.bytes / (DRAM_BYTES_PER_US / num_workers) + TASK_OVERHEAD_US


def predecessors(task: Task, events: list[Event]) -> set[int]:
    return {p for e in task.wait_events for p in events[e].producers}


def topological_order(tasks: list[Task], events: list[Event]) -> list[int]:
    """Kahn's algorithm over event edges, lowest task id first; raises on a cycle."""
    unfired = [len(t.wait_events) for t in tasks]
    remaining = [e.trigger_count for e in events]
    ready = [t.id for t in tasks if not unfired[t.id]]
    heapq.heapify(ready)
    order = []
    while ready:
        tid = heapq.heappop(ready)
        order.append(tid)
        for eid in tasks[tid].signal_events:
            remaining[eid] -= 1
            if remaining[eid] == 0 and not events[eid].lag:  # a lagged event orders the next step
                for c in events[eid].consumers:
                    unfired[c] -= 1
                    if not unfired[c]:
                        heapq.heappush(ready, c)
    if len(order) != len(tasks):
        stuck = sorted(set(range(len(tasks))) - set(order))[:5]
        raise ValueError(f"the task graph has a cycle; tasks never ready include {stuck}")
    return order


def critical_path(tasks: list[Task], events: list[Event], num_workers: int) -> tuple[float, int]:
    """Longest chain of dependent tasks: (estimated microseconds, number of tasks)."""
    best: dict[int, tuple[float, int]] = {}
    for tid in topological_order(tasks, events):
        cost = task_cost_us(tasks[tid], num_workers)
        before = max((best[p] for p in predecessors(tasks[tid], events)), default=(0.0, 0))
        best[tid] = (before[0] + cost, before[1] + 1)
    return max(best.values(), default=(0.0, 0))


def round_robin(tasks: list[Task], events: list[Event], num_workers: int) -> list[list[int]]:
    queues: list[list[int]] = [[] for _ in range(num_workers)]
    for i, tid in enumerate(topological_order(tasks, events)):
        queues[i % num_workers].append(tid)
    return queues


def earliest_finish(tasks: list[Task], events: list[Event], num_workers: int) -> list[list[int]]:
    """List scheduling: in topological order, each task goes to the worker that frees up first;
    the simulated finish times decide when its consumers can start."""
    queues: list[list[int]] = [[] for _ in range(num_workers)]
    free = [(0.0, w) for w in range(num_workers)]
    finish: dict[int, float] = {}
    for tid in topological_order(tasks, events):
        ready = max((finish[p] for p in predecessors(tasks[tid], events)), default=0.0)
        t_free, w = heapq.heappop(free)
        finish[tid] = max(t_free, ready) + task_cost_us(tasks[tid], num_workers)
        queues[w].append(tid)
        heapq.heappush(free, (finish[tid], w))
    return queues


Policy = Callable[[list[Task], list[Event], int], list[list[int]]]
POLICIES: dict[str, Policy] = {"round_robin": round_robin, "earliest_finish": earliest_finish}


def assign(tasks: list[Task], events: list[Event], num_workers: int, policy: str) -> list[list[int]]:
    if policy not in POLICIES:
        raise ValueError(f"unknown schedule policy '{policy}'; choose one of {sorted(POLICIES)}")
    queues = POLICIES[policy](tasks, events, num_workers)
    for w, queue in enumerate(queues):
        for tid in queue:
            tasks[tid].worker = w
    return queues
