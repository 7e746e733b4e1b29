"""Tensor-parallel ranks simulated on the CPU: one reference executor per rank, run together.

Each rank's tiles run in an order that respects its own events; a collective tile (an all-reduce
tile, the argmax reduce) also waits until, on every rank, the tiles that write its inputs have run,
which is what the GPU's cross-rank signals guarantee. The all-reduce then sums the same box over
the ranks' input tensors; the argmax gathers every rank's partials. Intermediates are poisoned
before each step, so a missing edge shows up as NaN.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from vllm_mpk.graph.events import WriterIndex
from vllm_mpk.graph.ir import Box, Task, box_slices
from vllm_mpk.graph.ops.argmax import REDUCE_STAGE
from vllm_mpk.graph.plan import Plan
from vllm_mpk.graph.reference import ReadyTasks, ReferenceExecutor


def is_collective(task: Task) -> bool:
    return task.op.kind == "allreduce" or (task.op.kind == "argmax" and task.params.get("stage") == REDUCE_STAGE)


class SimulatedRanks:
    def __init__(self, plans: Sequence[Plan], inputs: Sequence[dict[str, torch.Tensor]], *, exact: bool = False):
        if len(plans) != len(inputs) or not plans:
            raise ValueError("give one plan and one input mapping per rank")
        self.plans = list(plans)
        self.ranks = [ReferenceExecutor(p, i, exact=exact, all_reduce=self._all_reduce, all_gather=self._all_gather)
                      for p, i in zip(plans, inputs)]
        self._writers = [self._input_writers(p) for p in plans]

    @staticmethod
    def _input_writers(plan: Plan) -> dict[tuple[str, int], set[int]]:
        """For each collective tile (by op name and tile), the tiles of this rank that write its inputs."""
        index = WriterIndex(plan.tensors, plan.tasks)
        return {(t.op.name, t.tile): {w for a in t.reads for w in index.writers(t, a)} - {-1}
                for t in plan.tasks if is_collective(t)}

    def _all_reduce(self, name: str, box: Box, value: torch.Tensor) -> torch.Tensor:
        return sum(r.tensors[name][box_slices(box)].float() for r in self.ranks)

    def _all_gather(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return torch.stack([r.tensors[name][: value.shape[0]] for r in self.ranks])

    def run_step(self, num_tokens: int, order: str = "random", seed: int = 0) -> None:
        """One step on every rank; ``order`` "random" (any legal interleaving, drawn with ``seed``)
        or "layers" (every rank runs each layer whole, collectives after all ranks' producers)."""
        for r in self.ranks:
            r.poison()
        if order == "layers":
            for op_index in range(len(self.plans[0].ops)):
                for r in self.ranks:
                    r.run_op(op_index, num_tokens)
            return
        rng = random.Random(seed)
        states = [ReadyTasks(p) for p in self.plans]
        done: list[set[int]] = [set() for _ in self.ranks]
        while any(state.ready for state in states):
            choices = [(k, tid) for k, state in enumerate(states) for tid in state.ready
                       if self._collective_ready(k, tid, done)]
            if not choices:
                raise RuntimeError("the ranks deadlocked: every ready tile is a collective waiting for a rank")
            k, tid = choices[rng.randrange(len(choices))]
            self.ranks[k].run_task(tid, num_tokens)
            states[k].finish(tid)
            done[k].add(tid)

    def _collective_ready(self, rank: int, tid: int, done: list[set[int]]) -> bool:
        task = self.plans[rank].tasks[tid]
        if not is_collective(task):
            return True
        key = (task.op.name, task.tile)
        return all(self._writers[k][key] <= done[k] for k in range(len(self.ranks)))
