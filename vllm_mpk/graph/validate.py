"""Compile-time checks of a plan, independent of how its events were wired:

1. every element of every intermediate is written by exactly one task (or only by shared writes,
   ``Access.shared``), and nothing reads an element that no task writes;
2. the event graph is acyclic;
3. every read is ordered after the tasks that wrote it by events, directly or transitively;
4. the per-worker queues cannot deadlock (simulated with the counters);
5. in a multi-step plan (events with lag 1), steps cannot overlap: every task has run when a lagged
   event fires, and every task but the step's entry tasks waits, transitively, for those entries.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from vllm_mpk.graph.events import WriterIndex
from vllm_mpk.graph.ir import Event, Role, Task, TensorHandle
from vllm_mpk.graph.schedule import topological_order


def check_coverage(tensors: dict[str, TensorHandle], index: WriterIndex) -> None:
    for name, t in tensors.items():
        if t.role in (Role.INPUT, Role.EXCHANGE):
            continue
        owner = index.owner.get(name)
        if owner is None:
            raise ValueError(f"intermediate '{name}' is never written by any layer")
        unwritten = owner == -1
        if unwritten.any():
            first = tuple(int(i) for i in np.argwhere(unwritten)[0])
            raise ValueError(f"intermediate '{name}' has {unwritten.sum()} elements no task writes, e.g. {first}")


def event_ancestry(tasks: list[Task], events: list[Event]) -> tuple[list[int], list[int]]:
    """Bitsets (Python ints) of tasks: for each event, every task that has run once it fires; for
    each task, every task that has run before it starts (within one step)."""
    done = [0] * len(events)
    before = [0] * len(tasks)
    for tid in topological_order(tasks, events):
        for e in tasks[tid].wait_events:
            before[tid] |= done[e]
        for e in tasks[tid].signal_events:
            done[e] |= before[tid] | (1 << tid)
    return done, before


def check_reads_ordered(tasks: list[Task], before: list[int], index: WriterIndex) -> None:
    for task in tasks:
        seen = before[task.id]
        for access in task.reads:
            if access.previous_step:  # ordered across steps: check_steps_serialized
                continue
            for p in index.writers(task, access):
                if p == -1 and access.tensor in index.owner:
                    raise ValueError(f"{task} reads '{access.tensor}' box {access.box}, part of which nothing writes")
                if p not in (-1, task.id) and not (seen >> p) & 1:
                    raise ValueError(f"{task} reads '{access.tensor}' box {access.box} written by {tasks[p]}, "
                                     f"but no event orders the write before the read")


def check_steps_serialized(tasks: list[Task], events: list[Event], done: list[int], before: list[int]) -> None:
    lagged = [e for e in events if e.lag]
    if not lagged:
        return
    everything = (1 << len(tasks)) - 1
    for e in lagged:
        if done[e.id] != everything:
            late = next(t for t in tasks if not (done[e.id] >> t.id) & 1)
            raise ValueError(f"{late} may still run when event {e.id} (carried to the next step) fires: the next "
                             f"step could overwrite what it reads")
    entries = {c for e in lagged for c in e.consumers}
    for task in tasks:
        missing = [t for t in entries if t != task.id and not (before[task.id] >> t) & 1]
        if task.id not in entries and missing:
            raise ValueError(f"{task} does not wait for the step's entry {tasks[missing[0]]}: it could run "
                             f"before the step begins")


def run_queues(tasks: list[Task], events: list[Event], queues: list[list[int]]) -> list[int]:
    """Run the queues the way the GPU does: a worker's head task starts once each of its events
    has reached its trigger count; finishing it signals its events. Returns the order the tasks
    ran in; raises ValueError if the queues deadlock."""
    if sorted(t for q in queues for t in q) != list(range(len(tasks))):
        raise ValueError("the schedule does not place every task on exactly one worker")
    count = [0] * len(events)
    head = [0] * len(queues)
    waiting: dict[int, list[int]] = {}
    runnable = deque(range(len(queues)))
    order: list[int] = []
    while runnable:
        w = runnable.popleft()
        while head[w] < len(queues[w]):
            task = tasks[queues[w][head[w]]]
            pending = next((e for e in task.wait_events if count[e] < events[e].trigger_count), None)
            if pending is not None:
                waiting.setdefault(pending, []).append(w)
                break
            head[w] += 1
            order.append(task.id)
            for s in task.signal_events:
                count[s] += 1
                if count[s] == events[s].trigger_count:
                    runnable.extend(waiting.pop(s, []))
    if len(order) != len(tasks):
        stuck = [(w, tasks[queues[w][head[w]]]) for w in range(len(queues)) if head[w] < len(queues[w])]
        raise ValueError(f"the schedule deadlocks after {len(order)} of {len(tasks)} tasks; "
                         f"blocked workers: {stuck[:4]}")
    return order


def check_no_deadlock(tasks: list[Task], events: list[Event], queues: list[list[int]]) -> None:
    run_queues(tasks, events, queues)


def validate(tensors: dict[str, TensorHandle], tasks: list[Task], events: list[Event],
             queues: list[list[int]]) -> None:
    """Raise ValueError on the first violated property."""
    index = WriterIndex(tensors, tasks)
    check_coverage(tensors, index)
    done, before = event_ancestry(tasks, events)
    check_reads_ordered(tasks, before, index)
    check_steps_serialized(tasks, events, done, before)
    check_no_deadlock(tasks, events, queues)
