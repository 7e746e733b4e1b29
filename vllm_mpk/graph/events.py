"""Event wiring.

For each task, the tiles that wrote what it reads are grouped by the op they belong to; each
group becomes one event (a counter with that many producers), shared by every task that needs
exactly that group. A linear layer's tiles thus all wait on one event, while an attention tile for
KV head h waits on an event that only the QKV tiles covering head h trigger.

Groups implied by another are dropped (transitive reduction at op level): once every tile of op
Q has run, every op whose tiles Q's tiles together depended on has run too. The residual read of
``o_proj`` is covered this way by its wait on the attention tiles, so it costs no event.

A read marked ``previous_step`` (a multi-step plan's ``begin_step`` reading the last step's tokens)
becomes an event with lag 1, listed in the reader's ``carried_events``: it orders the reader after
the previous step's writers, and nothing within a step.

A write marked ``shared`` (split-KV attention: whichever of a head's split tiles finishes last
writes its output) has several possible writers; a reader of the box depends on all of them, so
``o_proj`` waits for every split tile of the heads it reads.
"""

from __future__ import annotations

from collections import defaultdict
from functools import cache

import numpy as np

from vllm_mpk.graph.ir import Access, Event, Role, Task, TensorHandle, box_slices

SHARED = -2  # in an owner map: an element written through shared writes (``WriterIndex.overlapping``)


class WriterIndex:
    """Which task wrote each element of each tensor.

    SSA intermediates get a dense owner map (a double write raises). Writes that several tasks may
    do are kept as accesses and matched by box overlap with the writes of earlier ops: attached
    tensors an op updates in place (the KV cache), and the shared writes of intermediates
    (``Access.shared``), whose elements the owner map marks ``SHARED``; an element written both
    shared and by a single writer raises.
    """

    def __init__(self, tensors: dict[str, TensorHandle], tasks: list[Task]):
        self.owner: dict[str, np.ndarray] = {}
        self.overlapping: dict[str, list[tuple[Task, Access]]] = defaultdict(list)
        self._memo: dict[tuple[str, tuple, int], frozenset[int]] = {}
        for task in tasks:
            for w in task.writes:
                t = tensors[w.tensor]
                if t.role is Role.INPUT:
                    self.overlapping[w.tensor].append((task, w))
                    continue
                owner = self.owner.setdefault(w.tensor, np.full(t.shape, -1, dtype=np.int32))
                region = owner[box_slices(w.box)]
                if (region >= 0).any() or ((region == SHARED).any() and not self._shares_with_own_op(task, w)):
                    self._raise_double_write(task, w, region)
                if w.shared:
                    self.overlapping[w.tensor].append((task, w))
                region[...] = SHARED if w.shared else task.id

    def _shares_with_own_op(self, task: Task, w: Access) -> bool:
        """``w`` is shared, and so is every earlier write it overlaps, all by tiles of ``task``'s op
        (shared writers of one op race only among themselves, which the op resolves)."""
        return w.shared and all(t.op.index == task.op.index for t, s in self.overlapping[w.tensor] if s.overlaps(w))

    def _raise_double_write(self, task: Task, w: Access, region: np.ndarray) -> None:
        """``w``, written by ``task``, covers elements that another write claims."""
        single = region[region >= 0]
        if single.size:
            other = f"task {int(single.flat[0])}" + (" alone" if w.shared else "")
        else:
            other = next(f"shared by task {t.id} ({t.op.name})" for t, s in self.overlapping[w.tensor]
                         if s.overlaps(w) and not (w.shared and t.op.index == task.op.index))
        mine = f"{'shared ' if w.shared else ''}by task {task.id} ({task.op.name})"
        raise ValueError(f"tensor '{w.tensor}' box {w.box} is written {mine} and {other}: every element needs "
                         f"exactly one writer, or only shared writers")

    def writers(self, reader: Task, access: Access) -> frozenset[int]:
        """Tasks that write what ``access`` reads; -1 in the result marks unwritten elements."""
        key = (access.tensor, access.box, reader.op.index)
        if key not in self._memo:
            owner = self.owner.get(access.tensor)
            found = set() if owner is None else set(np.unique(owner[box_slices(access.box)]).tolist())
            if owner is None or SHARED in found:
                found.discard(SHARED)
                found |= {t.id for t, w in self.overlapping.get(access.tensor, ())
                          if t.op.index < reader.op.index and w.overlaps(access)}
            self._memo[key] = frozenset(found)
        return self._memo[key]

    def dependencies(self, task: Task, previous_step: bool = False) -> set[int]:
        """Tasks whose writes ``task`` reads in the same step (or, with ``previous_step``, in the
        step before)."""
        deps: set[int] = set()
        for access in task.reads:
            if access.previous_step == previous_step:
                deps |= self.writers(task, access)
        deps.discard(-1)
        deps.discard(task.id)
        return deps


def _group_by_op(tasks: list[Task], deps: set[int]) -> dict[int, frozenset[int]]:
    groups: dict[int, set[int]] = defaultdict(set)
    for d in deps:
        groups[tasks[d].op.index].add(d)
    return {op: frozenset(g) for op, g in groups.items()}


def wire_events(tensors: dict[str, TensorHandle], tasks: list[Task]) -> list[Event]:
    """Set ``wait_events`` and ``signal_events`` on every task and return the events."""
    index = WriterIndex(tensors, tasks)
    tiles_of_op: dict[int, int] = defaultdict(int)
    for t in tasks:
        tiles_of_op[t.op.index] += 1
    groups = [_group_by_op(tasks, index.dependencies(t)) for t in tasks]

    covered: dict[int, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for t, g in zip(tasks, groups):
        for op, members in g.items():
            covered[t.op.index][op] |= members
    full_cover = {q: {p for p, m in deps.items() if len(m) == tiles_of_op[p]} for q, deps in covered.items()}

    @cache
    def completes(q: int) -> frozenset[int]:
        """Ops that have fully run once every tile of op ``q`` has run (``q`` included)."""
        out = {q}
        for p in full_cover.get(q, ()):
            if p < q:
                out |= completes(p)
        return frozenset(out)

    by_producers: dict[tuple[frozenset[int], int], Event] = {}
    signals: dict[int, list[int]] = defaultdict(list)

    def event_for(producers: frozenset[int], lag: int, consumer: int) -> int:
        if (producers, lag) not in by_producers:
            event = Event(len(by_producers), tuple(sorted(producers)), lag=lag)
            by_producers[producers, lag] = event
            for p in event.producers:
                signals[p].append(event.id)
        by_producers[producers, lag].consumers.append(consumer)
        return by_producers[producers, lag].id

    for task, g in zip(tasks, groups):
        full = [op for op, m in g.items() if len(m) == tiles_of_op[op]]
        implied = set().union(*(completes(op) - {op} for op in full))
        task.wait_events = tuple(event_for(g[op], 0, task.id) for op in sorted(g) if op not in implied)
        carried = _group_by_op(tasks, index.dependencies(task, previous_step=True))
        task.carried_events = tuple(event_for(carried[op], 1, task.id) for op in sorted(carried))
    for task in tasks:
        task.signal_events = tuple(signals[task.id])
    return list(by_producers.values())
