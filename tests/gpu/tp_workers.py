"""What the tensor-parallel GPU tests run in their spawned processes (one per GPU, NVSHMEM
bootstrapped from a gloo group), and the launcher that runs them with a deadline.

Not a test module: the functions are top-level so ``torch.multiprocessing`` (spawn) can pickle
them by name. Each writes its results with ``torch.save`` to ``out_dir/rank<r>.pt``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import model_spec
from vllm_mpk import PersistentKernel
from vllm_mpk.graph.step_state import contiguous_block_tables, step_inputs
from vllm_mpk.models import DecodeOptions, build_decoder
from vllm_mpk.models.kv_cache import allocate_kv_caches
from vllm_mpk.models.weights import random_weights, shard_weights
from vllm_mpk.runtime import nvshmem
from vllm_mpk.runtime.control import MegakernelError

BATCH, MAX_SEQ, PAGE, STEPS = 4, 64, 16, 8
START = torch.tensor([40, 17, 33, 2])  # positions of the first decoded token; histories are random


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn: Callable[..., None], world: int, *args: Any, timeout_s: float = 600.0) -> None:
    """``fn(rank, world, port, *args)`` in ``world`` spawned processes; raises if one fails or the
    deadline passes (a hang in a collective then fails the test instead of blocking it)."""
    context = mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{world} ranks of {getattr(fn, '__name__', fn)} did not finish in {timeout_s:.0f} s")


def _bootstrap(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **nvshmem.ENVIRONMENT)
    torch.cuda.set_device(rank)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    nvshmem.init_from_process_group()


def _shutdown() -> None:
    torch.cuda.synchronize()
    nvshmem.finalize()
    dist.destroy_process_group()


# --- a whole decode step --------------------------------------------------------------------------


def decode_steps(name: str, layers: int, world: int, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """``STEPS`` teacher-forced decode steps of a random checkpoint (the same on every rank and in
    every process: seeded on the CPU), rank ``rank`` of ``world``: its logits slice and tokens."""
    spec = model_spec(name, layers)
    weights = random_weights(spec, seed=seed)
    local = spec.shard(world)
    mine = shard_weights(spec, weights, world, rank) if world > 1 else weights
    mine = {k: v.contiguous().cuda() for k, v in mine.items()}  # TP-local layout, like vLLM's parameters
    blocks = contiguous_block_tables(BATCH, MAX_SEQ, PAGE)
    gen = torch.Generator().manual_seed(seed)
    full = allocate_kv_caches(spec, int(blocks.numel()), PAGE)
    for cache in full:  # a random KV history, sliced by KV heads like vLLM's TP-local caches
        cache.copy_(torch.randn(cache.shape, generator=gen).to(cache.dtype))
    heads = slice(rank * local.num_kv_heads, (rank + 1) * local.num_kv_heads)
    caches = [c[:, heads].clone().cuda() for c in full]
    history = torch.randint(0, spec.vocab_size, (BATCH, MAX_SEQ), generator=gen)
    workers = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    model = build_decoder(spec, mine, caches, DecodeOptions(max_batch=BATCH, max_seq_len=MAX_SEQ, page_size=PAGE,
                                                            num_workers=workers, world_size=world, rank=rank))
    kernel = model.kernel.executor()
    logits, tokens = [], []
    for s in range(STEPS):
        for key, value in step_inputs(START + s, history, blocks, PAGE).as_dict().items():
            model.kernel.step_buffers[key].copy_(value)
        kernel.run_step(BATCH)
        logits.append(kernel.tensors["logits"][:BATCH].float().cpu())
        tokens.append(kernel.tensors["tokens"][:BATCH].cpu())
    return {"logits": torch.stack(logits), "tokens": torch.stack(tokens)}


def decode_rank(rank: int, world: int, port: int, name: str, layers: int, seed: int, out_dir: str) -> None:
    _bootstrap(rank, world, port)
    try:
        torch.save(decode_steps(name, layers, world, rank, seed), Path(out_dir) / f"rank{rank}.pt")
    finally:
        _shutdown()


# --- the all-reduce alone -------------------------------------------------------------------------

AR_BATCH, AR_WIDTH, AR_TILES = 5, 512, 8
LATE_RANK_S = 3.0


def allreduce_kernel(world: int, rank: int, symmetric: bool | None) -> tuple[PersistentKernel, torch.Tensor]:
    """One all-reduce layer over this rank's part, which a linear layer with an identity weight
    copies exactly from the attached ``x`` (the all-reduce's input must be written in the plan)."""
    mpk = PersistentKernel(world_size=world, mpi_rank=rank, num_workers=AR_TILES, max_batch=AR_BATCH,
                           max_seq_len=16)
    x = torch.zeros(AR_BATCH, AR_WIDTH, dtype=torch.bfloat16, device="cuda")
    eye = torch.eye(AR_WIDTH, dtype=torch.bfloat16, device="cuda")
    part = mpk.new_tensor((AR_BATCH, AR_WIDTH), torch.bfloat16, "part", "nvshmem_tensor" if world > 1 else "cuda_tensor")
    mpk.linear_layer(mpk.attach_input(x, "x"), mpk.attach_input(eye, "eye"), part, AR_TILES, 128, name="copy")
    out = mpk.new_tensor((AR_BATCH, AR_WIDTH), torch.bfloat16, "out")
    mpk.allreduce_layer(part, out, AR_TILES, 128, name="sum", symmetric=symmetric)
    mpk.compile()
    return mpk, x


def _draw(gen: torch.Generator, world: int) -> torch.Tensor:
    """Every rank's part for one launch (drawn alike on every rank). No -0.0: the identity linear
    that writes the part sums products in float from +0, so it hands the all-reduce +0.0 anyway."""
    return torch.randn(world, AR_BATCH, AR_WIDTH, generator=gen).bfloat16()


def allreduce_checks(world: int, rank: int) -> dict[str, Any]:
    """Eager launches, a short batch, CUDA-graph replays (the signals' epochs move on without the
    host); each output next to the sum in rank order in float, rounded to bf16 once. The last rank
    takes LATE_RANK_S longer to build its kernel (after the collective buffers), more than the
    watchdog's 2 s: the first launch must still meet every rank, not time out."""
    mpk, x = allreduce_kernel(world, rank, symmetric=True if world == 1 else None)
    if world > 1 and rank == world - 1:
        from vllm_mpk.runtime import megakernel

        build = megakernel.kernel_spec

        def slow_build(*args: Any) -> Any:  # as a rank still compiling its kernel would be
            time.sleep(LATE_RANK_S)
            return build(*args)

        megakernel.kernel_spec = slow_build
    kernel = mpk.executor()
    gen = torch.Generator().manual_seed(1234)
    got, want = [], []

    def expect(parts: torch.Tensor, rows: int) -> None:
        total = parts[0].float()
        for w in range(1, world):
            total = total + parts[w].float()
        got.append(kernel.tensors["out"][:rows].cpu())
        want.append(total.bfloat16()[:rows])

    for rows in (AR_BATCH, AR_BATCH, 3):
        parts = _draw(gen, world)
        x.copy_(parts[rank])
        mpk(rows)
        expect(parts, rows)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernel.launch(AR_BATCH)
    for _ in range(3):
        parts = _draw(gen, world)
        x.copy_(parts[rank])
        graph.replay()
        torch.cuda.synchronize()
        kernel.check()
        expect(parts, AR_BATCH)
    timeout = ""
    if world > 1:  # rank 0 launches once more alone: its all-reduce tiles must give up, not hang
        dist.barrier()
        if rank == 0:
            kernel.timeout_ns = int(0.3e9)
            try:
                kernel.run_step(AR_BATCH)
            except MegakernelError as err:
                timeout = str(err)
        dist.barrier()
    return {"got": got, "want": want, "timeout": timeout}


def allreduce_rank(rank: int, world: int, port: int, out_dir: str, decode_name: str | None = None) -> None:
    """The all-reduce checks; with one rank also a TP=1 decode with NVSHMEM initialised."""
    _bootstrap(rank, world, port)
    try:
        result = allreduce_checks(world, rank)
        if decode_name is not None:
            result["decode"] = decode_steps(decode_name, 2, 1, 0, seed=7)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        _shutdown()
