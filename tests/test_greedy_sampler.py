"""Greedy megakernel steps sampled by argmax (vllm_mpk/integration/greedy_sampler.py), against vLLM's
own ``Sampler`` and its per-request state, on the CPU.

vLLM's sampler states keep pinned host memory mapped for the GPU; here those buffers are plain CPU
tensors, so every request is added through vLLM's own ``add_request`` bookkeeping."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.worker.gpu import buffer_utils  # noqa: E402
from vllm.v1.worker.gpu.sample.sampler import Sampler  # noqa: E402
from vllm.v1.worker.gpu.states import RequestState  # noqa: E402

from vllm_mpk.integration.greedy_sampler import GreedyDecodeSampler  # noqa: E402

VOCAB, MAX_REQS, GRAPH = 64, 8, 4


@pytest.fixture
def sampler(monkeypatch: pytest.MonkeyPatch) -> GreedyDecodeSampler:
    def cpu_buffer(self: Any, size: Any, dtype: torch.dtype) -> None:
        self.cpu = torch.zeros(size, dtype=dtype)
        self.np, self.uva = self.cpu.numpy(), self.cpu

    monkeypatch.setattr(buffer_utils.UvaBuffer, "__init__", cpu_buffer)
    cpu = torch.device("cpu")
    states = RequestState(max_num_reqs=MAX_REQS, max_model_len=64, max_num_batched_tokens=64,
                          num_speculative_steps=0, vocab_size=VOCAB, device=cpu)
    return GreedyDecodeSampler(Sampler(MAX_REQS, VOCAB, cpu, states), {GRAPH}, MAX_REQS, cpu)


def add(sampler: GreedyDecodeSampler, *params: SamplingParams) -> None:
    for i, p in enumerate(params):
        sampler.add_request(i, 4, p)  # through the wrapper, to vLLM's sampler


def decode_batch(n: int, *, padded: int = GRAPH, prefilling: int | None = None, drafts: int = 0) -> Any:
    is_prefilling = np.zeros(n, dtype=np.bool_)
    if prefilling is not None:
        is_prefilling[prefilling] = True
    return SimpleNamespace(num_reqs=n, idx_mapping_np=np.arange(n, dtype=np.int32), num_tokens_after_padding=padded,
                           num_draft_tokens=drafts, is_prefilling_np=is_prefilling)


def greedy(**kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


def with_bad_words() -> SamplingParams:
    p = greedy(bad_words=["x"])
    p._bad_words_token_ids = [[7]]  # what vLLM's input processor sets from the tokenizer
    return p


@pytest.mark.parametrize("other,taken", [
    (greedy(), True),
    (greedy(seed=3, top_k=5, top_p=0.5, min_p=0.1), True),  # filters keep the largest logit: argmax stands
    (SamplingParams(temperature=0.7), False),
    (greedy(logprobs=2), False),
    (greedy(logprobs=0), False),  # the sampled token's own logprob
    (greedy(repetition_penalty=1.2), False),
    (greedy(presence_penalty=0.5), False),
    (greedy(frequency_penalty=0.5), False),
    (greedy(logit_bias={3: 1.0}), False),
    (greedy(allowed_token_ids=[1, 2]), False),
    (greedy(min_tokens=3, stop_token_ids=[5]), False),
    (with_bad_words(), False),
], ids=lambda x: repr(x)[:60] if isinstance(x, SamplingParams) else str(x))
def test_argmax_takes_a_batch_only_when_every_request_is_plain_greedy(sampler: GreedyDecodeSampler,
                                                                      other: SamplingParams, taken: bool) -> None:
    add(sampler, greedy(), other, greedy())
    logits = torch.randn(3, VOCAB)
    assert sampler.takes(logits, decode_batch(3)) is taken


@pytest.mark.parametrize("change", ["no megakernel graph", "a prefilling request", "draft tokens", "more logit rows",
                                    "NaN counting"])
def test_argmax_takes_no_step_outside_a_pure_decode_megakernel_step(sampler: GreedyDecodeSampler,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     change: str) -> None:
    add(sampler, greedy(), greedy())
    logits, batch = torch.randn(2, VOCAB), decode_batch(2)
    assert sampler.takes(logits, batch)
    if change == "no megakernel graph":
        batch.num_tokens_after_padding = GRAPH * 2
    elif change == "a prefilling request":  # e.g. one prompt chunk of one token in a uniform batch
        batch.is_prefilling_np[1] = True
    elif change == "draft tokens":
        batch.num_draft_tokens = 2
    elif change == "more logit rows":
        logits = torch.randn(3, VOCAB)
    else:
        monkeypatch.setattr(sampler.sampler, "compute_nans", True)
    assert not sampler.takes(logits, batch)


def test_argmax_tokens_and_counts(sampler: GreedyDecodeSampler) -> None:
    add(sampler, greedy(), greedy(), greedy())
    logits = torch.randn(3, VOCAB, dtype=torch.bfloat16)
    logits[1, 9] = logits[1, 40] = logits[1].max() + 1  # a tie goes to the lower token id, as in vLLM's kernel
    out = sampler(logits, decode_batch(3))
    assert out.sampled_token_ids.shape == (3, 1) and out.sampled_token_ids.dtype == torch.int64
    assert out.sampled_token_ids[:, 0].tolist() == [int(logits[0].float().argmax()), 9, int(logits[2].float().argmax())]
    assert out.num_sampled.tolist() == [1, 1, 1] and out.num_rejected.tolist() == [0, 0, 0]
    assert out.num_sampled.dtype == out.num_rejected.dtype == torch.int32  # as vLLM's sampler gives them
    assert out.logprobs_tensors is None and out.num_nans is None
    assert sampler.argmax_steps == 1


def test_every_other_step_is_vllms_sampler(sampler: GreedyDecodeSampler, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[torch.Tensor, Any]] = []
    answer = object()

    def stock(self: Sampler, logits: torch.Tensor, batch: Any) -> Any:
        calls.append((logits, batch))
        return answer

    monkeypatch.setattr(Sampler, "__call__", stock)
    add(sampler, greedy(), SamplingParams(temperature=1.0))
    logits, batch = torch.randn(2, VOCAB), decode_batch(2)
    assert sampler(logits, batch) is answer and calls == [(logits, batch)]
    assert sampler.argmax_steps == 0
    assert sampler.sampling_states is sampler.sampler.sampling_states  # the runner's reads reach vLLM's
