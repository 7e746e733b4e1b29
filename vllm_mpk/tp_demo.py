"""Standalone tensor-parallel decoding, one process per GPU:

    torchrun --nproc-per-node 2 -m vllm_mpk.tp_demo --model qwen3-0.6b --layers 2

Every rank draws the same random checkpoint (seeded), keeps its TP-local shards, builds its
rank's plan and decodes greedily through ``PersistentKernel.generate``; the first launch
bootstraps NVSHMEM from torchrun's environment (``PersistentKernel(world_size=N, mpi_rank=r)``).
Rank 0 then decodes the same prompts with the unsharded model (TP=1) on its GPU and prints how
many new tokens the two agree on before they first differ (greedy decoding of a random checkpoint
meets near ties, where a different summation order may pick the other token). Exit code 0 when
every rank produced the same tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

import torch

from vllm_mpk.graph.step_state import contiguous_block_tables
from vllm_mpk.models import DecodeOptions, build_decoder
from vllm_mpk.models.catalog import resolve_model
from vllm_mpk.models.kv_cache import allocate_kv_caches
from vllm_mpk.models.spec import ModelSpec
from vllm_mpk.models.weights import random_weights, shard_weights

PAGE = 16


def generate(spec: ModelSpec, weights: Mapping[str, torch.Tensor], world: int, rank: int, prompts: list[list[int]],
             new_tokens: int) -> list[list[int]]:
    """Greedy sequences from rank ``rank``'s plan of ``world`` (weights: the full checkpoint)."""
    local = spec.shard(world)
    mine = shard_weights(spec, weights, world, rank) if world > 1 else weights
    mine = {k: v.contiguous().cuda() for k, v in mine.items()}
    max_seq = max(map(len, prompts)) + new_tokens
    blocks = contiguous_block_tables(len(prompts), max_seq, PAGE)
    caches = allocate_kv_caches(local, int(blocks.numel()), PAGE, device="cuda")
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    model = build_decoder(spec, mine, caches, DecodeOptions(max_batch=len(prompts), max_seq_len=max_seq,
                                                            page_size=PAGE, num_workers=sms, world_size=world,
                                                            rank=rank))
    return model.kernel.generate(prompts, new_tokens, tokens_output=model.tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    spec = resolve_model(args.model).spec.with_layers(args.layers)
    weights = random_weights(spec, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(0, spec.vocab_size, (8 + 5 * b,), generator=gen).tolist() for b in range(args.batch)]
    ours = generate(spec, weights, world, rank, prompts, args.new_tokens)
    ok = True
    if world > 1:
        import torch.distributed as dist

        gathered: list[list[list[int]] | None] = [None] * world
        dist.all_gather_object(gathered, ours)
        ok = all(g == ours for g in gathered)
        if rank == 0 and not ok:
            print("ranks disagree on the generated tokens", file=sys.stderr)
    if rank == 0:
        single = generate(spec, weights, 1, 0, prompts, args.new_tokens)
        for b, (a, s) in enumerate(zip(ours, single, strict=True)):
            agree = next((i for i, (x, y) in enumerate(zip(a, s)) if x != y), len(a))
            print(f"request {b}: TP={world} and TP=1 agree on {agree - len(prompts[b])} of {args.new_tokens} "
                  f"new tokens: {a[len(prompts[b]):]}")
    if world > 1:  # NVSHMEM's finalize is collective: every rank waits for rank 0's TP=1 run
        from vllm_mpk.runtime import nvshmem

        dist.barrier()
        nvshmem.finalize()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
