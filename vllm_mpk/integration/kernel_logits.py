"""vLLM's ``compute_logits`` answered by the megakernel's own lm_head on the steps it ran.

The plans end in two outputs side by side (``DecodeOptions(final="logits")``): the final RMSNorm's
hidden state, which ``forward`` returns as vLLM expects, and the lm_head's logits, in the model's
dtype as vLLM's own are (bf16: near ties fall alike; only the summation order differs). On a
replayed FULL graph no model Python runs, so ``compute_logits`` alone could not tell whose hidden
states it gets; Model Runner V2 however asks the model state for the step's attention metadata
first, with the batch in hand (``model_state.py``). Where that step replays a graph holding a
megakernel launch, the model state arms ``StepLogits`` with the first ``num_reqs`` rows of that
plan's logits; the next ``compute_logits`` of as many rows takes them, and anything else (another
step, a count that does not match, a stale arm) goes to vLLM's lm_head on the hidden states, which
are the megakernel's own and correct either way. A decode step's logits rows are its requests in
order (one token each, ``logits_indices`` the identity).

This saves the host the lm_head GEMM's launch per step (vLLM still gathers the hidden rows it
passes), and the GPU its launch gap. It applies where vLLM's own ``compute_logits`` is a plain
projection and decode steps replay FULL CUDA graphs (``logits_problem``): a megakernel launched
eagerly would run the lm_head for nothing, since only the model state arms the logits.
"""

from __future__ import annotations

from typing import Any

import torch


class StepLogits:
    """The logits rows of the step about to be sampled, when a megakernel computed them."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None

    def arm(self, rows: torch.Tensor | None) -> None:
        self.rows = rows

    def take(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The armed rows if they stand for ``hidden_states``' logits (as many rows), else None;
        disarms either way."""
        rows, self.rows = self.rows, None
        return rows if rows is not None and rows.shape[0] == hidden_states.shape[0] else None


def logits_problem(model: Any, vllm_config: Any, vocab_size: int, world_size: int) -> str | None:
    """Why the megakernel's lm_head cannot stand for ``model.compute_logits``, or None."""
    from vllm.config import CUDAGraphMode

    mode = getattr(getattr(vllm_config, "compilation_config", None), "cudagraph_mode", None)
    if mode is None or mode.decode_mode() != CUDAGraphMode.FULL:
        return "decode steps do not replay FULL CUDA graphs"
    if world_size > 1:
        return "tensor parallel (vLLM gathers each rank's vocabulary slice)"
    if getattr(vllm_config, "lora_config", None) is not None:
        return "LoRA (adapters may change the lm_head)"
    processor = getattr(model, "logits_processor", None)
    if processor is None:
        return "the model has no logits processor"
    if getattr(processor, "logits_as_input", False) or getattr(processor, "soft_cap", None) is not None \
            or getattr(processor, "scale", 1.0) != 1.0:
        return "the logits processor scales or caps the logits"
    if getattr(processor, "head_dtype", None) not in (None, torch.bfloat16):
        return f"an lm_head in {processor.head_dtype}"
    if getattr(processor, "org_vocab_size", vocab_size) != vocab_size:
        return f"logits of {processor.org_vocab_size} tokens for a vocabulary of {vocab_size}"
    return None
