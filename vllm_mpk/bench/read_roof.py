"""The decode roof: how fast the SMs can read DRAM, measured by a read-only stream.

A decode step reads its weights and KV history and writes almost nothing, so the bound it can
approach is a read stream, not a device copy (a copy also writes every byte it reads, which lowers
the rate and hides headroom). ``read_roof_tbps`` reads a buffer larger than any L2 with a persistent
grid of Triton programs (several per SM, 16-byte loads, many in flight) that fold what they read
into one word each, so nothing but the reads costs bandwidth. It times a few launch shapes and
reports the fastest: the roof is the best rate the SMs reach, not one configuration's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_mpk.runtime.timing import graph_replay_us

ROOF_BYTES = 4 << 30  # far past L2 (50-60 MB on Hopper): every byte comes from DRAM
SHAPES = ((4096, 4), (8192, 2), (8192, 4), (16384, 2))  # (int32 words per program per round, programs per SM)


@triton.jit
def _fold_reads(words, folded, n_rounds, WORDS: tl.constexpr):
    """Program p reads rounds p, p + P, ... of ``WORDS`` int32 each and xors them into one word."""
    p, programs = tl.program_id(0), tl.num_programs(0)
    acc = tl.zeros([WORDS], dtype=tl.int32)
    for r in range(p, n_rounds, programs):
        offsets = r.to(tl.int64) * WORDS + tl.arange(0, WORDS)
        acc ^= tl.load(words + offsets, eviction_policy="evict_first")
    tl.store(folded + p, tl.reduce(acc, 0, _xor))


@triton.jit
def _xor(a, b):
    return a ^ b


def read_tbps(buffer: torch.Tensor, words_per_round: int, programs_per_sm: int) -> float:
    """TB/s of one read of ``buffer`` (int32, size a multiple of ``words_per_round``), replayed from
    a CUDA graph."""
    rounds = buffer.numel() // words_per_round
    programs = torch.cuda.get_device_properties(buffer.device).multi_processor_count * programs_per_sm
    folded = torch.empty(programs, dtype=torch.int32, device=buffer.device)
    us = graph_replay_us(lambda: _fold_reads[(programs,)](buffer, folded, rounds, WORDS=words_per_round,
                                                          num_warps=8), iters=20)
    return buffer.numel() * 4 / us / 1e6


def read_roof_tbps(device: str | torch.device = "cuda", nbytes: int = ROOF_BYTES) -> float:
    """The fastest read stream over ``nbytes`` of DRAM among ``SHAPES`` (TB/s)."""
    buffer = torch.ones(nbytes // 4, dtype=torch.int32, device=device)
    try:
        return max(read_tbps(buffer, words, per_sm) for words, per_sm in SHAPES)
    finally:
        del buffer
        torch.cuda.empty_cache()
