"""NVSHMEM on the host, for tensor-parallel megakernels: bootstrap, symmetric tensors, barrier.

    nvshmem.init_from_process_group(group)      # every rank; the CUDA device already set
    recv = nvshmem.symmetric_zeros((2, 8, 1024), torch.bfloat16)
    ...
    nvshmem.finalize()

The library is bootstrapped from an NVSHMEM unique id that rank 0 of a torch.distributed group
makes and broadcasts over the group (gloo: a CPU group is enough). The glue is a small pybind11
module built by the project's JIT (``csrc/runtime/nvshmem_glue.cpp``, cached like the megakernel)
against the host library only; megakernels that call NVSHMEM on the device link its device
library and register their own device state after ``init``.

Symmetric allocations are collective (every PE allocates the same sizes in the same order) and
are never freed behind the caller's back: ``nvshmem_free`` is collective too, so freeing from a
garbage collector that runs at different times on different ranks would deadlock. They live until
``free_all`` or ``finalize``.

The collective host calls (``init``, the symmetric allocation, ``barrier``) wait for every PE, so a
peer that failed or left would hang this process there: each runs in a thread of its own and is
given up after ``HOST_TIMEOUT_S`` with an NvshmemError (the call cannot be cancelled; NVSHMEM is
not usable in this process afterwards, and the caller falls back).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from vllm_mpk.codegen.jit import JitSpec
from vllm_mpk.codegen.source import csrc_dir

# Re-exported (``as``): the integration layer asks the runtime, not the toolchain, about NVSHMEM.
from vllm_mpk.codegen.toolchain import NVSHMEM_INSTALL_HINT as NVSHMEM_INSTALL_HINT
from vllm_mpk.codegen.toolchain import find_nvshmem
from vllm_mpk.codegen.toolchain import has_nvshmem as has_nvshmem

GLUE_SOURCE = "runtime/nvshmem_glue.cpp"
ALIGN = 256  # bytes; every symmetric tensor starts on this boundary
# NVLink SHARP (multicast) stays off: the all-reduce moves its tiles itself, NVLS objects would
# take memory and setup time on every PE for nothing, and on shared hosts a program using
# multicast can take the GPUs out of service. Forced (not defaults) for NVSHMEM, NCCL and torch.
ENVIRONMENT = {"NVSHMEM_DISABLE_NVLS": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}

HOST_TIMEOUT_S = 120.0  # the longest wait for the other PEs in a collective host call
_allocations: list[int] = []  # addresses of live nvshmem_malloc blocks


class NvshmemError(RuntimeError):
    """NVSHMEM is not initialised, or initialising it failed; the message says what to do."""


def glue_spec() -> JitSpec:
    nv = find_nvshmem()
    source = (csrc_dir() / GLUE_SOURCE).read_text()
    return JitSpec(name="mpk_nvshmem_glue", sources={"nvshmem_glue.cpp": source}, include_dirs=[nv.include],
                   link_flags=nv.host_link_flags())


_glue: ModuleType | None = None


def glue() -> ModuleType:
    """The host glue module, built on first use."""
    global _glue
    if _glue is None:
        _glue = glue_spec().load()
    return _glue


def is_initialized() -> bool:
    """True once ``init`` ran in this process (without building the glue when it never did)."""
    return _glue is not None and _glue.init_status() >= 1  # NVSHMEM_STATUS_IS_BOOTSTRAPPED or later


def unique_id() -> bytes:
    return glue().unique_id()


def init(uid: bytes, rank: int, world: int) -> None:
    """Collective over ``world`` processes that hold the same ``uid``. Call after
    ``torch.cuda.set_device``: NVSHMEM binds this PE to the current device."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} must be in [0, world={world})")
    if not torch.cuda.is_available():
        raise NvshmemError("NVSHMEM needs a CUDA device; none is visible")
    os.environ.update(ENVIRONMENT)
    torch.cuda.init()
    torch.zeros(1, device="cuda")  # the primary context exists: NVSHMEM initialises fully, now
    module = glue()
    _bounded(lambda: module.init(uid, rank, world), f"init as PE {rank} of {world}")
    if module.n_pes() != world or module.my_pe() != rank:
        raise NvshmemError(f"NVSHMEM initialised as PE {module.my_pe()} of {module.n_pes()}, "
                           f"expected {rank} of {world}")


def init_single() -> None:
    """One PE (world size 1): the NVSHMEM path of a plan, without any peer."""
    init(unique_id(), 0, 1)


def init_from_process_group(group: Any = None) -> None:
    """Bootstrap from a torch.distributed group (default: the world group; a gloo group works):
    its rank 0 makes the unique id and broadcasts it over the group; group ranks become PEs."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise NvshmemError("torch.distributed is not initialised: call init_process_group first (torchrun sets "
                           "its environment), or pass the unique id to nvshmem.init yourself")
    os.environ.update(ENVIRONMENT)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    payload: list[bytes | None] = [unique_id() if rank == 0 else None]
    dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0) if group is not None else 0,
                               group=group)
    assert payload[0] is not None
    init(payload[0], rank, world)


def ensure_initialized(world: int, rank: int, device: torch.device) -> None:
    """For a standalone plan of rank ``rank`` of ``world`` on ``device``: NVSHMEM as it is if
    already initialised, else one PE for world 1, else bootstrapped from torch.distributed, whose
    default group is initialised here (gloo, from torchrun's environment) when nobody did."""
    if is_initialized():
        return
    if world == 1:
        torch.cuda.set_device(device)
        init_single()
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        if not all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")):
            raise NvshmemError(f"rank {rank} of {world} needs its peers: start one process per GPU with torchrun, or "
                               f"call torch.distributed.init_process_group (or nvshmem.init) before the first step")
        dist.init_process_group("gloo")
    if (dist.get_world_size(), dist.get_rank()) != (world, rank):
        raise NvshmemError(f"the kernel is rank {rank} of {world}, torch.distributed has rank {dist.get_rank()} of "
                           f"{dist.get_world_size()}")
    torch.cuda.set_device(device)
    init_from_process_group()


def my_pe() -> int:
    return _require().my_pe()


def n_pes() -> int:
    return _require().n_pes()


def barrier() -> None:
    """Every PE waits here (host side; the device queue is not synchronised)."""
    module = _require()
    _bounded(module.barrier_all, "barrier")


def _bounded(call: Callable[[], Any], what: str, timeout_s: float | None = None) -> Any:
    """``call()`` (a collective NVSHMEM host call, which releases the GIL) from a thread bound to
    this thread's CUDA device; raises NvshmemError when it has not returned after ``timeout_s``
    (default ``HOST_TIMEOUT_S``)."""
    timeout_s = HOST_TIMEOUT_S if timeout_s is None else timeout_s
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            if device is not None:
                torch.cuda.set_device(device)
            outcome["value"] = call()
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=run, name=f"nvshmem {what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise NvshmemError(f"NVSHMEM {what} did not finish within {timeout_s:g} s: a peer failed, left or never "
                           f"reached it (NVSHMEM is not usable in this process any more)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _require() -> ModuleType:
    if not is_initialized():
        raise NvshmemError("NVSHMEM is not initialised in this process: call vllm_mpk.runtime.nvshmem.init(...) "
                           "or init_from_process_group(...) first")
    assert _glue is not None
    return _glue


@dataclass
class _DeviceMemory:
    """A view of symmetric memory that torch can wrap (``__cuda_array_interface__``)."""

    address: int
    shape: tuple[int, ...]
    typestr: str

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.typestr, "data": (self.address, False), "version": 3,
                "strides": None}


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def symmetric_tensors(specs: Sequence[tuple[Sequence[int], torch.dtype]], zero: bool = True) -> list[torch.Tensor]:
    """Several symmetric tensors carved from one collective ``nvshmem_malloc`` (one barrier instead
    of one per tensor), each aligned to ``ALIGN`` bytes. Every PE must ask for the same list."""
    module = _require()
    sizes = [_aligned(math.prod(shape) * torch.empty((), dtype=dtype).element_size()) for shape, dtype in specs]
    base = _bounded(lambda: module.malloc(max(sum(sizes), ALIGN)), "symmetric allocation")
    _allocations.append(base)
    out, offset = [], 0
    device = torch.device("cuda", torch.cuda.current_device())
    for (shape, dtype), size in zip(specs, sizes, strict=True):
        raw = torch.as_tensor(_DeviceMemory(base + offset, (size,), "|u1"), device=device)
        t = raw[:math.prod(shape) * torch.empty((), dtype=dtype).element_size()].view(dtype).view(tuple(shape))
        if zero:
            t.zero_()
        out.append(t)
        offset += size
    if zero:  # no peer may signal into these before every PE has zeroed its copy
        torch.cuda.current_stream().synchronize()
        barrier()
    return out


def symmetric_zeros(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return symmetric_tensors([(shape, dtype)])[0]


def peer_address(tensor: torch.Tensor, pe: int) -> int:
    """Where ``pe``'s copy of a symmetric tensor is mapped in this process, or 0 when that PE is not
    reachable with loads and stores (NVSHMEM then moves data through its proxy)."""
    return _require().ptr(tensor.data_ptr(), pe)


def free_all() -> None:
    """Collective: free every symmetric allocation (tensors on them must not be used again)."""
    module = _require()
    while _allocations:
        module.free(_allocations.pop())


def finalize() -> None:
    """Collective: free everything and shut NVSHMEM down in this process."""
    global _glue
    if not is_initialized():
        return
    free_all()
    assert _glue is not None
    _glue.finalize()
