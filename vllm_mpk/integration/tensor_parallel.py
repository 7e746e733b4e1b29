"""``--tensor-parallel-size N --model-impl mpk``: each TP worker decodes through its rank's plan.

vLLM has already loaded every rank's TP-local weights (merged qkv/gate_up sliced by heads and
rows, o_proj/down_proj by columns, the embedding by vocabulary rows) and KV cache (its KV heads),
which is exactly what ``build_decoder(spec, ..., DecodeOptions(world_size=N, rank=r))`` reads. The
megakernel's all-reduce tiles replace vLLM's NCCL all-reduces; they exchange data through
NVSHMEM, bootstrapped here from vLLM's TP group: its rank 0 makes the unique id and broadcasts it
over the group's CPU (gloo) group. NVLink multicast stays off (``runtime/nvshmem.py``).

Every rank decides alike (same configuration, same batches), so all of them build, allocate the
collective symmetric buffers and launch in step. What one rank only can meet (a compiler error,
memory) is settled before any NVSHMEM collective: each rank builds what needs no peer (the plans,
the kernels' compilation), then every rank tells the others over the TP group's CPU (gloo) group
whether that succeeded (``agree_on_build``, bounded), and either all of them go on to NVSHMEM's
bootstrap, symmetric allocations and barriers, or all of them fall back to the stock layers
(whose NCCL all-reduces then pair up). Those NVSHMEM host calls are bounded too
(``runtime/nvshmem.py``): a rank that fails among them makes its peers time out and fall back.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch

from vllm_mpk.models.spec import ModelSpec
from vllm_mpk.runtime import nvshmem
from vllm_mpk.runtime.nvshmem import NVSHMEM_INSTALL_HINT, has_nvshmem


def tp_rank_and_size() -> tuple[int, int]:
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def tensor_parallel_problem(spec: ModelSpec, world: int) -> str | None:
    """Why this model cannot run tensor-parallel in the megakernel, or None."""
    if world == 1:
        return None
    if not has_nvshmem():
        return f"tensor parallelism needs NVSHMEM for the megakernel's all-reduce: {NVSHMEM_INSTALL_HINT}"
    try:
        spec.shard(world)
    except ValueError as e:
        return str(e)
    return None


def vocab_problem(spec: ModelSpec, world: int, embed_rows: int) -> str | None:
    """vLLM pads the vocabulary to a multiple of 64 before splitting it over ranks; the plan's
    argmax and embedding slices assume every rank holds ``vocab / world`` rows."""
    local = spec.shard(world).vocab_size
    if world > 1 and embed_rows != local:
        return (f"vLLM's vocabulary shard has {embed_rows} rows (padded), the plan's {local}: tensor parallelism "
                f"with a padded vocabulary is not supported")
    return None


def bootstrap_nvshmem(world: int, rank: int) -> None:
    """NVSHMEM over vLLM's TP group, once per process (every TP rank calls it at its first build)."""
    if not nvshmem.is_initialized():
        from vllm.distributed import get_tp_group

        nvshmem.init_from_process_group(get_tp_group().cpu_group)
    if (nvshmem.n_pes(), nvshmem.my_pe()) != (world, rank):
        raise RuntimeError(f"NVSHMEM runs this process as PE {nvshmem.my_pe()} of {nvshmem.n_pes()}, but it is "
                           f"tensor-parallel rank {rank} of {world}")


# Ranks finish compiling at different times (nvcc takes minutes without a cache hit), so a rank
# waits this long for the slowest before it takes the others for gone.
BUILD_AGREEMENT_TIMEOUT_S = 900.0
REASON_BYTES = 1024  # of a rank's reason, UTF-8, shared with the others


def agree_on_build(problem: str | None, timeout_s: float = BUILD_AGREEMENT_TIMEOUT_S) -> str | None:
    """Collective over the tensor-parallel ranks, before any NVSHMEM collective: None when every
    rank's build got this far (``problem`` None), else one reason for all of them, so that they
    fall back together. One rank: ``problem`` as is."""
    rank, world = tp_rank_and_size()
    if world == 1:
        return problem
    from vllm.distributed import get_tp_group

    try:
        return first_problem(exchange_outcomes(problem, get_tp_group().cpu_group, timeout_s))
    except TimeoutError as e:
        return str(e)


def exchange_outcomes(problem: str | None, group: Any, timeout_s: float) -> list[str | None]:
    """Every rank's ``problem`` (None: built), by rank, through one all-gather over the CPU
    ``group``; raises TimeoutError when a rank does not take part within ``timeout_s``."""
    import torch.distributed as dist

    mine = _encode(problem)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    work = dist.all_gather(gathered, mine, group=group, async_op=True)
    try:
        work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as e:
        raise TimeoutError(f"not every tensor-parallel rank reported its megakernel build within {timeout_s:g} s "
                           f"({e})") from e
    return [_decode(t) for t in gathered]


def first_problem(outcomes: Sequence[str | None]) -> str | None:
    """What every rank falls back for: the first rank's problem, or None when all built."""
    return next((f"tensor-parallel rank {rank}: {problem}" for rank, problem in enumerate(outcomes)
                 if problem is not None), None)


def _encode(problem: str | None) -> torch.Tensor:
    """[1 + REASON_BYTES] uint8: 1 for a problem, then its reason (UTF-8, truncated, zero-padded)."""
    raw = b"" if problem is None else problem.encode()[:REASON_BYTES]
    out = torch.zeros(1 + REASON_BYTES, dtype=torch.uint8)
    out[0] = problem is not None
    out[1:1 + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    return out


def _decode(t: torch.Tensor) -> str | None:
    return bytes(t[1:].tolist()).rstrip(b"\0").decode(errors="replace") if t[0] else None


def moe_parallel_problem(parallel_config: Any) -> str | None:
    """Why vLLM's fused MoE would not hold the experts as the plan reads them (every expert on
    every rank, a slice of each expert's width per tensor-parallel rank), or None. With expert
    parallelism a rank holds whole experts, a subset of them; with data or prefill context
    parallelism vLLM also shards the experts over those ranks (``FusedMoEParallelConfig.make``)."""
    if getattr(parallel_config, "enable_expert_parallel", False):
        return ("expert parallelism (--enable-expert-parallel) is not supported for mixture-of-experts models; the "
                "megakernel slices every expert over the tensor-parallel ranks (leave expert parallelism off)")
    for flag, key in (("--data-parallel-size", "data_parallel_size"),
                      ("--prefill-context-parallel-size", "prefill_context_parallel_size")):
        size = getattr(parallel_config, key, 1)
        if size != 1:
            return (f"{flag} {size} is not supported for mixture-of-experts models: vLLM then shards the experts "
                    f"over those ranks as well")
    return None
