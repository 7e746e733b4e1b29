"""Decode the megakernel's per-task timestamps into a Perfetto/Chrome trace and a per-op summary.

The kernel records, for the i-th task of each worker, the global-timer nanoseconds at which its
events were satisfied (start) and at which it signalled (end). The gap between a worker's previous
end and its next start is time spent waiting on events.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import torch

from vllm_mpk.graph.plan import Plan


@dataclass
class TaskSpan:
    worker: int
    task: int
    kind: str
    op: str
    start_ns: int
    end_ns: int
    wait_ns: int


def task_spans(plan: Plan, profile: torch.Tensor) -> list[TaskSpan]:
    """``profile``: ``[num_workers, max_tasks, 2]`` int64 from a profiled launch."""
    rows = profile.cpu().tolist()
    origin = min(rows[w][0][0] for w, q in enumerate(plan.queues) if q)
    spans = []
    for w, queue in enumerate(plan.queues):
        previous_end = origin
        for i, tid in enumerate(queue):
            start, end = rows[w][i]
            task = plan.tasks[tid]
            spans.append(TaskSpan(w, tid, task.op.kind, task.op.name, start - origin, end - origin,
                                  max(0, start - previous_end)))
            previous_end = end
    return spans


def write_trace(plan: Plan, spans: list[TaskSpan], path: str | Path) -> None:
    """One track per worker (SM); open the file in ui.perfetto.dev or chrome://tracing."""
    events = [{"name": s.op, "cat": s.kind, "ph": "X", "pid": 0, "tid": s.worker, "ts": s.start_ns / 1e3,
               "dur": max(s.end_ns - s.start_ns, 1) / 1e3,
               "args": {"task": s.task, "bytes": plan.tasks[s.task].bytes, "wait_us": s.wait_ns / 1e3}}
              for s in spans]
    Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ns"}))


def stage_ns(spans: Iterable[TaskSpan]) -> int:
    """An op's stage: its first task's gate opening to its last task's signal."""
    spans = list(spans)
    return max(s.end_ns for s in spans) - min(s.start_ns for s in spans)


def producers(plan: Plan) -> dict[str, set[str]]:
    """Each op's producers: the ops whose tasks signal an event its tasks wait on (this step's)."""
    signalled_by: dict[int, set[str]] = defaultdict(set)
    for t in plan.tasks:
        for e in t.signal_events:
            signalled_by[e].add(t.op.name)
    found: dict[str, set[str]] = defaultdict(set)
    for t in plan.tasks:
        for e in t.wait_events:
            found[t.op.name] |= signalled_by[e] - {t.op.name}  # argmax's final tiles wait on its partials
    return found


def gate_gaps_ns(plan: Plan, by_op: dict[str, list[TaskSpan]]) -> dict[str, int]:
    """Per op: its first gate opening minus its producers' last signal (negative where it starts
    on the first producers' tiles): how late the stage starts once its inputs are ready."""
    gaps = {}
    for op, inputs in producers(plan).items():
        ends = [s.end_ns for p in inputs for s in by_op.get(p, [])]
        if ends and op in by_op:
            gaps[op] = min(s.start_ns for s in by_op[op]) - max(ends)
    return gaps


def summary(plan: Plan, spans: list[TaskSpan]) -> str:
    """Per op kind: share of busy time, bytes moved, bandwidth while running, time spent waiting,
    the median task's time (gate open to signal: the task's own cost), the median stage time
    (one op's first gate opening to its last signal: its length on the critical path) and the
    median gate gap (its first gate opening after its producers' last signal)."""
    busy: dict[str, int] = defaultdict(int)
    wait: dict[str, int] = defaultdict(int)
    nbytes: dict[str, int] = defaultdict(int)
    durations: dict[str, list[int]] = defaultdict(list)
    stages: dict[str, list[int]] = defaultdict(list)
    gaps: dict[str, list[int]] = defaultdict(list)
    by_op: dict[str, list[TaskSpan]] = defaultdict(list)
    for s in spans:
        busy[s.kind] += s.end_ns - s.start_ns
        wait[s.kind] += s.wait_ns
        nbytes[s.kind] += plan.tasks[s.task].bytes
        durations[s.kind].append(s.end_ns - s.start_ns)
        by_op[s.op].append(s)
    for op_spans in by_op.values():
        stages[op_spans[0].kind].append(stage_ns(op_spans))
    for op, gap in gate_gaps_ns(plan, by_op).items():
        gaps[by_op[op][0].kind].append(gap)
    total = sum(busy.values()) or 1
    makespan = max(s.end_ns for s in spans)
    lines = [f"step {makespan / 1e3:.1f} us on {plan.num_workers} workers; busy {total / plan.num_workers / 1e3:.1f} us "
             f"per worker",
             f"{'op':32} {'busy %':>7} {'MB':>9} {'GB/s/SM':>8} {'wait us/worker':>15} {'task us':>8} {'stage us':>9} "
             f"{'gap us':>7}"]
    for kind in sorted(busy, key=busy.get, reverse=True):
        gap = f"{median(gaps[kind]) / 1e3:7.2f}" if gaps[kind] else f"{'-':>7}"
        lines.append(f"{kind:32} {100 * busy[kind] / total:7.1f} {nbytes[kind] / 1e6:9.1f} "
                     f"{nbytes[kind] / max(busy[kind], 1):8.1f} {wait[kind] / plan.num_workers / 1e3:15.1f} "
                     f"{median(durations[kind]) / 1e3:8.2f} {median(stages[kind]) / 1e3:9.2f} {gap}")
    return "\n".join(lines)


def profile_step(plan: Plan, tensors: dict[str, torch.Tensor], num_tokens: int, trace_path: str | Path,
                 warmup: int = 2) -> str:
    """Run a profiled megakernel on ``tensors`` (step inputs filled), write the trace of its last
    step to ``trace_path`` and return the per-op summary."""
    from vllm_mpk.runtime.megakernel import Megakernel

    kernel = Megakernel(plan, tensors, profile=True)
    for _ in range(warmup + 1):
        kernel.run_step(num_tokens)
    spans = task_spans(plan, kernel.profile)
    write_trace(plan, spans, trace_path)
    return summary(plan, spans)
