"""Greedy megakernel steps sampled by one argmax instead of vLLM's whole sampler.

On a small model vLLM's host step, not the forward, sets the time per token, and its sampler is a
large part of that step: for a batch of greedy requests it still gathers positions and token ids,
checks each sampling feature, runs its Gumbel kernel (a Triton launch, a reduction and a gather
for what is an argmax at temperature 0) and a Triton kernel that counts the sampled tokens. For a
step that replays a graph holding the megakernel (a pure decode batch), where every request is
greedy and nothing else changes the logits or reads them, the same tokens are one ``argmax`` of the
logits, and every request samples exactly one token and rejects none.

Every other step goes to vLLM's sampler unchanged. "Nothing else" is read from the sampler's own
per-request state, the same arrays its stages check before they launch anything: logit bias,
allowed tokens and min_tokens (``use_logit_bias``), penalties, bad words, logprobs of any kind, and
NaN counting. A grammar's bitmask is already applied to the logits this gets, so structured output
stays exact. Ties go to the lowest token id, as in vLLM's kernel (the first maximum of each block,
then the first block holding the maximum).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.output import SamplerOutput


class GreedyDecodeSampler:
    """vLLM's ``Sampler`` (``sampler``), with the steps ``takes`` accepts sampled by argmax.

    Everything else the model runner asks of its sampler (its states, ``add_request``, staged
    writes) is the wrapped sampler's. ``megakernel_graphs`` is the runtime's live set of token
    counts whose FULL graph holds a megakernel launch. ``argmax_steps`` counts the steps taken.
    """

    def __init__(self, sampler: Any, megakernel_graphs: set[int], max_num_reqs: int, device: torch.device):
        self.sampler = sampler
        self.megakernel_graphs = megakernel_graphs
        self.one = torch.ones(max_num_reqs, dtype=torch.int32, device=device)
        self.zero = torch.zeros(max_num_reqs, dtype=torch.int32, device=device)
        self.argmax_steps = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sampler, name)

    def takes(self, logits: torch.Tensor, input_batch: Any) -> bool:
        """Whether argmax gives this step's tokens: a pure decode batch of greedy requests, one
        logit row each, on a graph holding the megakernel, that no sampling feature touches."""
        s = self.sampler
        idx = input_batch.idx_mapping_np
        return (input_batch.num_tokens_after_padding in self.megakernel_graphs
                and input_batch.num_draft_tokens == 0
                and logits.shape[0] == input_batch.num_reqs == len(idx)
                and not s.compute_nans
                and not np.any(input_batch.is_prefilling_np)
                and bool(np.all(s.sampling_states.temperature.np[idx] == 0.0))
                and not s.returns_logprobs(idx)
                and not np.any(s.logit_bias_state.use_logit_bias[idx])
                and not np.any(s.penalties_state.use_penalty[idx])
                and not np.any(s.bad_words_state.num_bad_words.np[idx]))

    def __call__(self, logits: torch.Tensor, input_batch: Any) -> SamplerOutput:
        if not self.takes(logits, input_batch):
            return self.sampler(logits, input_batch)
        n = input_batch.num_reqs
        self.argmax_steps += 1
        return SamplerOutput(sampled_token_ids=logits.argmax(dim=-1).view(-1, 1), logprobs_tensors=None,
                             num_nans=None, num_sampled=self.one[:n], num_rejected=self.zero[:n])
