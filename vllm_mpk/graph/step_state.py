"""Standalone decoding state: the ``step`` and ``tokens`` meta tensors, and how each decode step's
inputs (ids, positions, sequence lengths, slots) follow from them. Plain torch, so the CPU
executor and the GPU host path share one definition.

``step[b]`` is the position request ``b`` decodes next; ``tokens[b, :]`` holds its prompt followed
by generated tokens. A request with ``step[b] < 0`` is idle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepInputs:
    """The per-step inputs of a decode plan, in the dtypes vLLM uses."""

    input_ids: torch.Tensor  # int32 [batch]
    positions: torch.Tensor  # int64 [batch]
    seq_lens: torch.Tensor  # int32 [batch]; 0 marks an idle row
    slot_mapping: torch.Tensor  # int64 [batch]; -1 marks an idle row
    block_tables: torch.Tensor  # int32 [batch, max_blocks]

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(vars(self))


STEP_INPUT_NAMES = ("input_ids", "positions", "seq_lens", "slot_mapping", "block_tables")


def step_inputs(step: torch.Tensor, tokens: torch.Tensor, block_tables: torch.Tensor, page_size: int) -> StepInputs:
    active = step >= 0
    pos = step.clamp(min=0).long()
    ids = tokens.gather(1, pos[:, None])[:, 0]
    block = block_tables.gather(1, (pos // page_size)[:, None])[:, 0].long()
    return StepInputs(
        input_ids=torch.where(active, ids, 0).int(),
        positions=pos,
        seq_lens=torch.where(active, pos + 1, 0).int(),
        slot_mapping=torch.where(active, block * page_size + pos % page_size, -1),
        block_tables=block_tables,
    )


def advance(step: torch.Tensor, tokens: torch.Tensor, sampled: torch.Tensor, prompt_lens: torch.Tensor,
            end: torch.Tensor, teacher_forced: bool = False, eos_token_id: int | None = None) -> None:
    """After a step: write each sampled token after the prompt (unless teacher-forced), move every
    active request one position on, and retire requests that reached ``end`` (exclusive) or, when
    ``eos_token_id`` is given, that just generated it."""
    active = step >= 0
    nxt = step + 1
    generating = active & (nxt >= prompt_lens) & (nxt < tokens.shape[1])
    sampled = sampled.to(tokens.device, tokens.dtype)
    if not teacher_forced:
        rows = generating.nonzero()[:, 0]
        tokens[rows, nxt[rows]] = sampled[rows]
    done = nxt >= end
    if eos_token_id is not None:
        done |= generating & (sampled == eos_token_id)
    step.copy_(torch.where(active & ~done, nxt, -1))


def contiguous_block_tables(batch: int, max_seq_len: int, block_size: int,
                            device: str | torch.device = "cpu") -> torch.Tensor:
    """Request ``b`` owns blocks ``[b * n, (b + 1) * n)``: the standalone path's allocation."""
    n = -(-max_seq_len // block_size)
    return torch.arange(batch * n, dtype=torch.int32, device=device).view(batch, n)
