"""The CPU reference executor: runs a compiled plan tile by tile with torch ops.

Orders:
- ``"schedule"``: the workers' queues, run the way the GPU may run them (each worker runs its
  head task once the task's events have fired; ``validate.run_queues``);
- ``"random"``: any order that respects only the events, drawn with ``seed``; a missing event
  then lets a tile read a poisoned (NaN) intermediate and the result goes wrong;
- ``"layers"``: every layer whole, in program order, through its plain definition.

Intermediates are poisoned before every step (NaN for floats, -1 for integers), except the
counters that carry from step to step (``Plan.counters``: split-KV attention's arrivals), which
start at zero and which every step returns to zero. With
``exact=True`` intermediates are stored in float32 instead of their declared dtype, which makes
the executor a float32 model for comparisons with ``transformers``; by default rounding matches
the declared dtypes, as on the GPU.
"""

from __future__ import annotations

import random

import torch

from vllm_mpk.graph.ir import Role
from vllm_mpk.graph.ops import REGISTRY, Env
from vllm_mpk.graph.ops.base import AllGather, AllReduce
from vllm_mpk.graph.plan import Plan
from vllm_mpk.graph.schedule import topological_order
from vllm_mpk.graph.validate import run_queues

ORDERS = ("schedule", "random", "layers")


class ReadyTasks:
    """The tasks of a plan whose events have all fired, updated as tasks finish."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.count = [0] * len(plan.events)
        self.unfired = [len(t.wait_events) for t in plan.tasks]
        self.ready = [t.id for t in plan.tasks if not self.unfired[t.id]]

    def finish(self, tid: int) -> None:
        self.ready.remove(tid)
        for s in self.plan.tasks[tid].signal_events:
            self.count[s] += 1
            if self.count[s] == self.plan.events[s].trigger_count and not self.plan.events[s].lag:
                for c in self.plan.events[s].consumers:
                    self.unfired[c] -= 1
                    if not self.unfired[c]:
                        self.ready.append(c)


class ReferenceExecutor:
    def __init__(self, plan: Plan, inputs: dict[str, torch.Tensor], *, exact: bool = False,
                 all_reduce: AllReduce | None = None, all_gather: AllGather | None = None):
        missing = [n for n, t in plan.tensors.items() if t.role is Role.INPUT and n not in inputs]
        if missing:
            raise ValueError(f"no tensor given for plan inputs {missing}")
        self.plan = plan
        self.tensors = dict(inputs)
        device = next(iter(inputs.values())).device
        for name, t in plan.tensors.items():
            if t.role is not Role.INPUT:
                dtype = torch.float32 if exact and t.dtype.is_floating_point else t.dtype
                # zeroed: the counters must start at 0 (everything else is poisoned before each step)
                self.tensors[name] = torch.zeros(t.shape, dtype=dtype, device=device)
        self.collectives = {k: v for k, v in (("all_reduce", all_reduce), ("all_gather", all_gather)) if v}
        # what a multi-step plan's next step reads (the last tokens) and the counters survive the poisoning
        self.carried = {a.tensor for t in plan.tasks for a in t.reads if a.previous_step} | plan.counters

    def poison(self) -> None:
        for name, t in self.plan.tensors.items():
            if t.role is not Role.INPUT and name not in self.carried:
                self.tensors[name].fill_(float("nan") if t.dtype.is_floating_point else -1)

    def env(self, num_tokens: int) -> Env:
        return Env(self.tensors, num_tokens, **self.collectives)

    def run_task(self, tid: int, num_tokens: int) -> None:
        task = self.plan.tasks[tid]
        REGISTRY[task.op.kind].run_tile(task.op, task.params, self.env(num_tokens))

    def run_op(self, index: int, num_tokens: int) -> None:
        """Layer ``index`` whole, through its plain definition."""
        op = self.plan.ops[index]
        REGISTRY[op.kind].reference(op, self.env(num_tokens))

    def run_step(self, num_tokens: int, order: str = "schedule", seed: int = 0) -> None:
        if order not in ORDERS:
            raise ValueError(f"unknown order '{order}'; choose one of {ORDERS}")
        self.poison()
        if order == "layers":
            for index in range(len(self.plan.ops)):
                self.run_op(index, num_tokens)
            return
        for tid in self._scheduled_order() if order == "schedule" else self._random_order(seed):
            self.run_task(tid, num_tokens)

    def run_steps(self, num_tokens: int, steps: int) -> None:
        """``steps`` decode steps in a row, as one launch of a multi-step plan runs them."""
        for _ in range(steps):
            self.run_step(num_tokens)

    def _scheduled_order(self) -> list[int]:
        try:
            return run_queues(self.plan.tasks, self.plan.events, self.plan.queues)
        except ValueError as e:  # a plan changed after validation: an execution failure here
            raise RuntimeError(f"the schedule deadlocked: {e}") from e

    def _random_order(self, seed: int) -> list[int]:
        """A uniformly random choice among the tasks whose events have fired, step by step."""
        rng, tasks = random.Random(seed), ReadyTasks(self.plan)
        order: list[int] = []
        while tasks.ready:
            order.append(tasks.ready[rng.randrange(len(tasks.ready))])
            tasks.finish(order[-1])
        if len(order) != len(self.plan.tasks):
            topological_order(self.plan.tasks, self.plan.events)  # raises with the cycle
        return order
