"""Ops -> tasks: each op family cuts its layer into tiles; tasks are numbered in program order."""

from __future__ import annotations

from vllm_mpk.graph.ir import Op, Task
from vllm_mpk.graph.ops import REGISTRY


def lower_ops(ops: list[Op]) -> list[Task]:
    tasks: list[Task] = []
    for op in ops:
        for i, tile in enumerate(REGISTRY[op.kind].lower(op)):
            tasks.append(Task(len(tasks), op, i, tile.reads, tile.writes, tile.bytes, tile.params))
    return tasks
