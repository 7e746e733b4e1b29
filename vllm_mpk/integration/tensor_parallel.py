"""``--tensor-parallel-size N --model-impl mpk``: each TP worker decodes through its rank's plan.

vLLM has already loaded every rank's TP-local weights (merged qkv/gate_up sliced by heads and
rows, o_proj/down_proj by columns, the embedding by vocabulary rows) and KV cache (its KV heads),
which is exactly what ``build_decoder(spec, ..., DecodeOptions(world_size=N, rank=r))`` reads. The
megakernel's all-reduce tiles replace vLLM's NCCL all-reduces; they exchange data through
NVSHMEM, bootstrapped here from vLLM's TP group: its rank 0 makes the unique id and broadcasts it
over the group's CPU (gloo) group. NVLink multicast stays off (``runtime/nvshmem.py``).

Every rank decides alike (same configuration, same batches), so all of them build, allocate the
collective symmetric buffers and launch in step. A failure on one rank only (a build error) would
leave its peers' all-reduce tiles waiting: their watchdog stops them with a clear error.
"""

from __future__ import annotations

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
