"""Standalone decoding through ``PersistentKernel``: ``generate`` feeds prompts token by token and
samples greedily, matching ``transformers``; EOS stops a request early; ``__call__`` runs one step."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TINY_QWEN3
from vllm_mpk.check import hf_model, reference_greedy
from vllm_mpk.graph.reference import ReferenceExecutor
from vllm_mpk.graph.step_state import step_inputs
from vllm_mpk.models import DecodeOptions, ModelSpec, build_decoder
from vllm_mpk.models.kv_cache import allocate_kv_caches
from vllm_mpk.models.weights import random_weights

MAX_BATCH, MAX_SEQ, PAGE = 3, 48, 16


def tiny_model(seed: int = 0, multi_step: bool = False, kv_splits: int = 1):
    """A float32 model, so the reference executor agrees with transformers far below any margin."""
    spec = ModelSpec.from_hf_config(TINY_QWEN3)
    weights = random_weights(spec, seed=seed, dtype=torch.float32, std=0.05)
    caches = allocate_kv_caches(spec, MAX_BATCH * MAX_SEQ // PAGE, PAGE, dtype=torch.float32)
    model = build_decoder(spec, weights, caches, DecodeOptions(max_batch=MAX_BATCH, max_seq_len=MAX_SEQ,
                                                               page_size=PAGE, num_workers=4, multi_step=multi_step,
                                                               kv_splits=kv_splits))
    return spec, weights, model


@pytest.mark.parametrize("kv_splits", [1, 3], ids=["one-task-per-head", "split-kv-3"])
def test_generate_matches_transformers_greedy(kv_splits: int):
    spec, weights, model = tiny_model(kv_splits=kv_splits)
    prompts = [[5, 9, 200, 31, 7], list(range(100, 119)), [42]]  # 19 crosses a page boundary
    got = model.kernel.generate(prompts, max_new_tokens=8, tokens_output=model.tokens)
    hf = hf_model(spec, weights)
    for prompt, seq in zip(prompts, got):
        want, _ = reference_greedy(hf, prompt, 8)
        assert seq == want


def test_eos_ends_a_request_and_meta_tensors_are_filled():
    step = torch.zeros(MAX_BATCH, dtype=torch.int64)
    tokens = torch.zeros(MAX_BATCH, MAX_SEQ, dtype=torch.int64)
    spec, weights, model = tiny_model(seed=1)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    free = model.kernel.generate(prompts, max_new_tokens=6, tokens_output=model.tokens)
    eos = free[0][3]  # request 0's first generated token
    kernel = model.kernel
    kernel.meta = {"step": step, "tokens": tokens}
    stopped = kernel.generate(prompts, max_new_tokens=6, tokens_output=model.tokens, eos_token_id=eos)
    assert stopped[0] == free[0][:4]
    cut = free[1][4:].index(eos) + 5 if eos in free[1][4:] else len(free[1])
    assert stopped[1] == free[1][:cut]
    assert step[:2].tolist() == [len(s) for s in stopped]
    assert tokens[1, :len(stopped[1])].tolist() == stopped[1]


@pytest.mark.parametrize("eos", [False, True], ids=["to-max-new-tokens", "eos"])
def test_multi_step_plan_decodes_every_step_in_one_launch_like_single_steps(eos: bool):
    """A multi-step plan (begin_step first) gives the single-step plan's sequences, ragged prompts
    and an EOS that ends one request early included, from one run_steps call."""
    _, _, single = tiny_model(seed=2)
    _, _, multi = tiny_model(seed=2, multi_step=True)
    prompts = [[5, 9, 200, 31, 7], list(range(100, 119)), [42]]
    free = single.kernel.generate(prompts, max_new_tokens=8, tokens_output=single.tokens)
    stop = free[2][2] if eos else None  # request 2's second generated token
    want = single.kernel.generate(prompts, max_new_tokens=8, tokens_output=single.tokens, eos_token_id=stop)
    executor = multi.kernel.executor()
    launches = []
    run_steps = executor.run_steps
    executor.run_steps = lambda n, steps: (launches.append((n, steps)), run_steps(n, steps))
    got = multi.kernel.generate(prompts, max_new_tokens=8, tokens_output=multi.tokens, eos_token_id=stop)
    assert got == want
    assert launches == [(3, 19 + 8 - 1)]  # one launch: the longest prompt's positions, then its new tokens
    assert [op.kind for op in multi.plan.ops][:2] == ["begin_step", "embed"]
    (carried,) = [e for e in multi.plan.events if e.lag]
    assert {multi.plan.tasks[t].op.kind for t in carried.producers} == {"argmax"}
    assert [multi.plan.tasks[t].op.kind for t in carried.consumers] == ["begin_step"]


def test_call_runs_one_step_on_the_step_buffers():
    spec, weights, model = tiny_model(seed=2)
    kernel = model.kernel
    step = torch.tensor([0, 0, -1])
    seq = torch.tensor([[7] * MAX_SEQ, [11] * MAX_SEQ, [0] * MAX_SEQ])
    blocks = torch.arange(MAX_BATCH * MAX_SEQ // PAGE, dtype=torch.int32).view(MAX_BATCH, -1)
    inputs = step_inputs(step, seq, blocks, PAGE).as_dict()
    for name, value in inputs.items():
        kernel.step_buffers[name].copy_(value)
    kernel(2)
    got = kernel.executor().tensors["logits"][:2].clone()
    reference = ReferenceExecutor(model.plan, {**{k: v.clone() if "kv_cache" in k else v
                                                  for k, v in kernel.attached.items()}, **inputs})
    reference.run_step(2, order="layers")
    torch.testing.assert_close(got, reference.tensors["logits"][:2])
    assert not got.isnan().any()


def test_plain_torch_step_matches_the_plan():
    """The stock-PyTorch baseline computes the same step as the plan (float32 weights)."""
    from vllm_mpk.models.torch_decode import TorchDecodeStep

    spec, weights, model = tiny_model(seed=3)
    step = torch.tensor([20, 3, 33])
    seq = torch.randint(0, spec.vocab_size, (MAX_BATCH, MAX_SEQ), generator=torch.Generator().manual_seed(3))
    blocks = torch.arange(MAX_BATCH * MAX_SEQ // PAGE, dtype=torch.int32).view(MAX_BATCH, -1)
    inputs = step_inputs(step, seq, blocks, PAGE).as_dict()
    caches = [model.kernel.attached[f"model.layers.{i}.self_attn.attn.kv_cache"] for i in range(spec.num_layers)]
    for c in caches:
        c.normal_()
    before = [c.clone() for c in caches]
    reference = ReferenceExecutor(model.plan, {**model.kernel.attached, **inputs})
    reference.run_step(MAX_BATCH)
    after = [c.clone() for c in caches]
    for c, b in zip(caches, before):
        c.copy_(b)
    step_fn = TorchDecodeStep(spec, weights, caches, model.kernel.attached["rope.cos_sin_cache"], MAX_SEQ)
    torch.testing.assert_close(step_fn(inputs), reference.tensors["logits"], rtol=1e-4, atol=1e-4)
    for c, a in zip(caches, after):
        torch.testing.assert_close(c, a)


def test_plan_can_stop_at_the_final_norm():
    """``final="hidden"`` ends the step with the final RMSNorm (for vLLM, which applies its own
    lm_head): no lm_head tiles, and the hidden state gives the full plan's logits."""
    spec, weights, model = tiny_model(seed=4)
    caches = [model.kernel.attached[f"model.layers.{i}.self_attn.attn.kv_cache"] for i in range(spec.num_layers)]
    hidden_model = build_decoder(spec, weights, caches, DecodeOptions(max_batch=MAX_BATCH, max_seq_len=MAX_SEQ,
                                                                      page_size=PAGE, num_workers=4, final="hidden"))
    assert hidden_model.logits is None and {op.kind for op in hidden_model.plan.ops}.isdisjoint({"argmax"})
    seq = torch.randint(0, spec.vocab_size, (MAX_BATCH, MAX_SEQ), generator=torch.Generator().manual_seed(4))
    blocks = torch.arange(MAX_BATCH * MAX_SEQ // PAGE, dtype=torch.int32).view(MAX_BATCH, -1)
    inputs = step_inputs(torch.tensor([9, 30, 2]), seq, blocks, PAGE).as_dict()
    full = ReferenceExecutor(model.plan, {**model.kernel.attached, **inputs})
    full.run_step(MAX_BATCH)
    head = ReferenceExecutor(hidden_model.plan, {**hidden_model.kernel.attached, **inputs})
    head.run_step(MAX_BATCH)
    logits = head.tensors["hidden"] @ weights["lm_head.weight"].T
    torch.testing.assert_close(logits, full.tensors["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("token", [-1, 10 ** 6])
def test_generate_refuses_prompt_tokens_outside_the_vocabulary(token: int):
    spec, _, model = tiny_model(seed=5)
    with pytest.raises(ValueError, match=rf"prompts\[1\] holds token id {token}, outside the vocabulary "
                                         rf"\[0, {spec.vocab_size}\)"):
        model.kernel.generate([[1, 2], [3, token]], max_new_tokens=2, tokens_output=model.kernel.tensors["tokens"])


@pytest.mark.parametrize("wrong", ["logits", "model.embed_tokens.weight"])
def test_generate_takes_only_an_argmax_output_as_tokens_output(wrong: str):
    """Another op's output (the logits) or a tensor no op writes (a weight): the tokens would be
    read from the wrong tensor, or from none."""
    _, _, model = tiny_model(seed=5)
    with pytest.raises(ValueError, match=f"tokens_output must be the output of an argmax_layer, got '{wrong}'"):
        model.kernel.generate([[1, 2]], max_new_tokens=2, tokens_output=model.kernel.tensors[wrong])
