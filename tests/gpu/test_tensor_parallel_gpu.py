"""Tensor parallelism on GPUs over NVSHMEM, one spawned process per GPU (tests/gpu/tp_workers.py).

One GPU: NVSHMEM with one PE; an all-reduce forced through the NVSHMEM path is an exact identity
(eager, short batches, CUDA-graph replays), and a TP=1 decode with NVSHMEM initialised gives the
same logits, bit for bit, as without. Two (four) GPUs: the all-reduce equals the rank-order float
sum on every rank, a lone rank's all-reduce times out cleanly, and TP=2 (TP=4) decode of 2-layer
Qwen3 and Llama random checkpoints matches TP=1: logits within bf16 tolerance, the same greedy
token on every rank, and TP=1's token wherever its top-two margin is not a near-tie.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.gpu import tp_workers
from vllm_mpk.check import BF16_LOGITS_TOLERANCE, NEAR_TIE_NOISE
from vllm_mpk.codegen.toolchain import has_nvshmem

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not has_nvshmem(), reason="NVSHMEM is not installed")]


def gpus(n: int) -> pytest.MarkDecorator:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pytest.mark.skipif(count < n, reason=f"needs {n} GPUs, torch sees {count}")


def load(out_dir: Path, world: int) -> list[dict]:
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


@gpus(1)
def test_one_pe_allreduce_is_an_exact_identity_and_tp1_is_unchanged(tmp_path: Path) -> None:
    reference = tp_workers.decode_steps("qwen3-0.6b", 2, 1, 0, seed=7)  # this process: no NVSHMEM
    tp_workers.run_ranks(tp_workers.allreduce_rank, 1, str(tmp_path), "qwen3-0.6b")
    (result,) = load(tmp_path, 1)
    assert len(result["got"]) == 6
    for got, want in zip(result["got"], result["want"], strict=True):
        assert bitwise_equal(got, want)
    assert torch.equal(result["decode"]["logits"], reference["logits"])
    assert torch.equal(result["decode"]["tokens"], reference["tokens"])


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=gpus(4))])
@gpus(2)
def test_allreduce_sums_in_rank_order_on_every_rank(world: int, tmp_path: Path) -> None:
    tp_workers.run_ranks(tp_workers.allreduce_rank, world, str(tmp_path))
    results = load(tmp_path, world)
    for result in results:
        for got, want in zip(result["got"], result["want"], strict=True):
            assert bitwise_equal(got, want)
    assert "other tensor-parallel ranks" in results[0]["timeout"], results[0]["timeout"]


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=gpus(4))])
@pytest.mark.parametrize("name", ["qwen3-0.6b", "llama-3.2-1b"])
@gpus(2)
def test_tp_decode_matches_tp1(name: str, world: int, tmp_path: Path) -> None:
    reference = tp_workers.decode_steps(name, 2, 1, 0, seed=11)
    tp_workers.run_ranks(tp_workers.decode_rank, world, name, 2, 11, str(tmp_path))
    ranks = load(tmp_path, world)
    logits = torch.cat([r["logits"] for r in ranks], dim=-1)  # vocabulary-parallel slices, in rank order
    want = reference["logits"]
    assert logits.shape == want.shape
    rel = float((logits - want).norm() / want.norm())
    assert rel <= BF16_LOGITS_TOLERANCE, f"relative logits error {rel:.2e}"
    for r in ranks:  # the collective argmax: one token for all ranks, the gathered logits' argmax
        assert torch.equal(r["tokens"], ranks[0]["tokens"])
    assert torch.equal(ranks[0]["tokens"], logits.argmax(-1))
    mismatches = 0
    for step in range(want.shape[0]):
        for b in range(want.shape[1]):
            top2 = want[step, b].topk(2).values
            noise = float((logits[step, b] - want[step, b]).pow(2).mean().sqrt())
            near_tie = float(top2[0] - top2[1]) < NEAR_TIE_NOISE * noise
            mismatches += int(not near_tie and int(ranks[0]["tokens"][step, b]) != int(reference["tokens"][step, b]))
    assert mismatches == 0
    print(f"{name} TP={world}: relative logits error {rel:.2e}")
