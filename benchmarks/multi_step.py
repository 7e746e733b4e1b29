"""Multi-step decode on the GPU: one launch decodes every step, against one launch per step.

A multi-step plan starts with ``begin_step``, which takes in the previous step's token and writes
the step's inputs on the GPU, so one launch runs a whole generation: no host work and no launch
between steps. Its time per step is the floor of what per-step overhead costs. For each model and
batch this generates the same prompts through the single-step plan (host-driven, one launch per
step) and the multi-step plan (one launch), checks the sequences are identical, and prints the
time per step of each next to the single-step plan's step replayed from a CUDA graph.

    python benchmarks/multi_step.py --models qwen3-0.6b llama-3.2-1b --batches 1 8 --new-tokens 256
"""

from __future__ import annotations

import argparse
import time

import torch

from vllm_mpk.demo import PAGE, gpu_model
from vllm_mpk.graph.step_state import step_inputs
from vllm_mpk.models.catalog import resolve_model
from vllm_mpk.models.weights import random_weights
from vllm_mpk.runtime.timing import graph_replay_us

PROMPT = 4  # tokens per prompt: the steps are mostly decode steps


def timed_generate(model, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
    """The sequences and the wall seconds of one generation (the GPU included)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    sequences = model.kernel.generate(prompts, new_tokens, tokens_output=model.tokens)
    torch.cuda.synchronize()
    return sequences, time.perf_counter() - start


def run(name: str, batch: int, new_tokens: int) -> dict:
    spec = resolve_model(name).spec
    weights = random_weights(spec, device="cuda")
    max_seq = PROMPT + new_tokens + PAGE
    single, _, _, blocks = gpu_model(spec, weights, batch, max_seq)
    multi, *_ = gpu_model(spec, weights, batch, max_seq, multi_step=True)
    prompts = torch.randint(0, spec.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(0)).tolist()
    steps = PROMPT + new_tokens - 1  # the prompts are fed through the decode step too
    timed_generate(single, prompts, 2)  # warm-up: the executors are built on first use
    timed_generate(multi, prompts, 2)
    want, single_s = timed_generate(single, prompts, new_tokens)
    got, multi_s = timed_generate(multi, prompts, new_tokens)
    step = torch.full((batch,), PROMPT + new_tokens // 2)  # a mid-generation step, every row active
    for key, value in step_inputs(step, torch.tensor(want), blocks, PAGE).as_dict().items():
        single.kernel.step_buffers[key].copy_(value.cuda())
    executor = single.kernel.executor()
    replay_us = graph_replay_us(lambda: executor.launch(batch))
    del weights
    return {"model": name, "batch": batch, "steps": steps, "identical": got == want,
            "single_us": single_s / steps * 1e6, "multi_us": multi_s / steps * 1e6, "replay_us": replay_us}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["qwen3-0.6b"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=256)
    args = p.parse_args()
    rows = []
    for m in args.models:
        for b in args.batches:
            rows.append(run(m, b, args.new_tokens))
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}, {args.new_tokens} new tokens after {PROMPT}-token prompts; µs per step")
    print(f"{'model':14} {'bs':>3} {'same tokens':>11} {'one launch/step':>15} {'graph replay':>12} {'multi-step':>10}")
    for r in rows:
        print(f"{r['model']:14} {r['batch']:>3} {str(r['identical']):>11} {r['single_us']:15.1f} {r['replay_us']:12.1f} "
              f"{r['multi_us']:10.1f}")


if __name__ == "__main__":
    main()
