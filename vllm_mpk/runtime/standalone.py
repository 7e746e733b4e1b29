"""Standalone decoding: prompts and generated tokens flow through the ``step`` / ``tokens`` meta
tensors, one decode step per launch, on any executor with the plan's ``run_step`` interface (the
CPU reference executor or the megakernel). Prompts are fed token by token through the same decode
step, which writes the paged KV cache the later steps read.

``decode`` launches once per step from the host. ``decode_in_one_launch`` runs a multi-step plan
(its first layer is ``begin_step``, which moves the state on by one step on the GPU): the host
writes the prompts and the requests' ends into the state, one launch decodes every step, and the
host takes in the last step's tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from vllm_mpk.graph.ir import Op
from vllm_mpk.graph.ops import REGISTRY, Env
from vllm_mpk.graph.step_state import advance, step_inputs


class StepExecutor(Protocol):
    tensors: dict[str, torch.Tensor]

    def run_step(self, num_tokens: int, order: str = "schedule", seed: int = 0) -> None: ...

    def run_steps(self, num_tokens: int, steps: int) -> None: ...


StepHook = Callable[[torch.Tensor, torch.Tensor], None]  # (positions decoded [B], logits [B, V])


def decode(executor: StepExecutor, sequences: list[list[int]], block_tables: torch.Tensor, page_size: int,
           *, max_new_tokens: int = 0, eos_token_id: int | None = None, teacher_forced: bool = False,
           logits_name: str = "logits", tokens_name: str = "tokens", on_step: StepHook | None = None,
           order: str = "schedule") -> list[list[int]]:
    """Run requests to completion and return each one's whole sequence.

    ``sequences`` are prompts, extended by up to ``max_new_tokens`` greedy tokens (stopping early at
    ``eos_token_id``); with ``teacher_forced`` they are complete sequences, every position of which
    is decoded and nothing is sampled into them. ``on_step`` sees each step's positions (-1 for idle
    rows) and logits. ``order`` goes to the reference executor (the GPU picks its own). The step-input buffers of ``executor`` are written in place: a megakernel
    holds their addresses.
    """
    batch = executor.tensors["input_ids"].shape[0]
    _check_requests(sequences, batch)
    lengths = torch.tensor([len(s) for s in sequences] + [1] * (batch - len(sequences)))
    extra = 0 if teacher_forced else max_new_tokens
    capacity = int(lengths.max()) + extra
    if capacity > block_tables.shape[1] * page_size:
        raise ValueError(f"sequences reach {capacity} tokens; the block tables hold {block_tables.shape[1] * page_size}")
    if not teacher_forced and max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    tokens = torch.zeros(batch, capacity, dtype=torch.int64)
    for b, seq in enumerate(sequences):
        tokens[b, :len(seq)] = torch.tensor(seq)
    end = lengths if teacher_forced else lengths + max_new_tokens - 1
    step = torch.where(torch.arange(batch) < len(sequences), 0, -1)
    while (step >= 0).any():
        for name, value in step_inputs(step, tokens, block_tables, page_size).as_dict().items():
            executor.tensors[name].copy_(value)
        executor.run_step(len(sequences), order=order)
        if on_step is not None:
            on_step(step.clone(), executor.tensors[logits_name])
        advance(step, tokens, executor.tensors[tokens_name], lengths, end, teacher_forced, eos_token_id)
    if teacher_forced:
        return [list(seq) for seq in sequences]
    return _prompts_and_generated(sequences, tokens, max_new_tokens, eos_token_id)


def _check_requests(sequences: list[list[int]], batch: int) -> None:
    if not 1 <= len(sequences) <= batch:
        raise ValueError(f"got {len(sequences)} requests; this plan decodes 1 to {batch} at a time")
    if any(not s for s in sequences):
        raise ValueError("every request needs at least one token")


def decode_in_one_launch(executor: StepExecutor, begin: Op, sequences: list[list[int]], block_tables: torch.Tensor,
                         max_new_tokens: int, eos_token_id: int | None = None) -> list[list[int]]:
    """Run requests to completion in one launch of a multi-step plan whose first layer is ``begin``
    and return each one's whole sequence (prompt, then up to ``max_new_tokens`` greedy tokens,
    stopping early at ``eos_token_id``)."""
    state = {role: executor.tensors[handle.name] for role, handle in begin.inputs.items()}
    batch, width = state["tokens"].shape
    _check_requests(sequences, batch)
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    n = len(sequences)
    lengths = torch.tensor([len(s) for s in sequences])
    capacity = int(lengths.max()) + max_new_tokens
    if capacity > min(width, block_tables.shape[1] * begin.attrs["page_size"]):
        raise ValueError(f"sequences reach {capacity} tokens; the plan holds {width} per request and the block "
                         f"tables {block_tables.shape[1] * begin.attrs['page_size']}")
    state["tokens"].zero_()
    for b, seq in enumerate(sequences):
        state["tokens"][b, :len(seq)] = torch.tensor(seq)
    end = lengths + max_new_tokens - 1  # the last position decoded; its token lands at end
    state["prompt_lens"][:n] = lengths
    state["end"][:n] = end
    state["step"][:n] = 0
    state["pending"].zero_()  # nothing to take in before the first step
    state["eos"].fill_(-1 if eos_token_id is None else eos_token_id)
    state["block_tables"].copy_(block_tables)
    executor.run_steps(n, int(end.max()))
    REGISTRY[begin.kind].reference(begin, Env(executor.tensors, n))  # the last step's tokens
    return _prompts_and_generated(sequences, state["tokens"], max_new_tokens, eos_token_id)


def _prompts_and_generated(sequences: list[list[int]], tokens: torch.Tensor, max_new_tokens: int,
                           eos_token_id: int | None) -> list[list[int]]:
    """Each prompt followed by its generated tokens from ``tokens`` (prompt then generated, per
    row): ``max_new_tokens`` of them, or up to and including the first ``eos_token_id``."""
    out = []
    for b, seq in enumerate(sequences):
        row = tokens[b, len(seq):len(seq) + max_new_tokens].tolist()
        if eos_token_id is not None and eos_token_id in row:
            row = row[:row.index(eos_token_id) + 1]
        out.append(list(seq) + row)
    return out
