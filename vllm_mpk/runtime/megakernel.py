"""A compiled plan loaded on the GPU and bound to device tensors; one ``launch`` runs one decode
step. The launch reads everything from fixed device buffers, so a CUDA graph can capture it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from vllm_mpk.codegen import plan_cache
from vllm_mpk.codegen.jit import JitSpec
from vllm_mpk.codegen.source import generate, plan_uses_nvshmem
from vllm_mpk.codegen.tables import (
    PrefetchPolicy,
    RecordLayout,
    Variants,
    all_args,
    plan_variants,
    record_layout,
    task_table,
    tensor_ids,
    trigger_counts,
)
from vllm_mpk.codegen.tasks import uses_nvshmem
from vllm_mpk.codegen.toolchain import check_gpu
from vllm_mpk.graph.ir import Role
from vllm_mpk.graph.plan import Plan
from vllm_mpk.graph.schedule import topological_order
from vllm_mpk.runtime import control, nvshmem
from vllm_mpk.runtime.control import MegakernelError
from vllm_mpk.runtime.watchdog import DEFAULT_TIMEOUT_S, check_timeout_s

SYMMETRIC_ROLES = (Role.SYMMETRIC, Role.EXCHANGE)


def plan_ranks(plan: Plan) -> tuple[int, int]:
    """(world size, rank) of a plan whose collectives go through NVSHMEM; (1, 0) otherwise."""
    op = next((op for op in plan.ops if uses_nvshmem(op)), None)
    return (1, 0) if op is None else (op.attrs["world_size"], op.attrs.get("rank", 0))


def _symmetric(plan: Plan, device: torch.device) -> dict[str, torch.Tensor]:
    """The plan's nvshmem tensors, zeroed (the collectives' signal words count from 0), in one
    collective allocation: every rank's plan declares the same ones in the same order. From then
    on the ranks' megakernels must launch together: the same number of times, with the same
    ``num_tokens`` (a rank that stops or skips a launch makes its peers' collectives time out)."""
    world, rank = plan_ranks(plan)
    if not nvshmem.is_initialized():
        raise nvshmem.NvshmemError(
            f"this plan (rank {rank} of {world}) exchanges data through NVSHMEM, which is not initialised in this "
            f"process: call vllm_mpk.runtime.nvshmem.init_from_process_group(group) on every rank first")
    if (nvshmem.n_pes(), nvshmem.my_pe()) != (world, rank):
        raise nvshmem.NvshmemError(f"the plan is rank {rank} of {world}, but NVSHMEM runs this process as PE "
                                   f"{nvshmem.my_pe()} of {nvshmem.n_pes()}")
    if torch.cuda.current_device() != device.index:
        raise ValueError(f"the plan's tensors are on {device}, but the current CUDA device is "
                         f"{torch.cuda.current_device()} (NVSHMEM's PE is bound to it): torch.cuda.set_device first")
    names = [n for n, h in plan.tensors.items() if h.role in SYMMETRIC_ROLES]
    tensors = nvshmem.symmetric_tensors([(plan.tensors[n].shape, plan.tensors[n].dtype) for n in names])
    return dict(zip(names, tensors, strict=True))


def bind_tensors(plan: Plan, given: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Check the given tensors against the plan's inputs and allocate its intermediates (its
    nvshmem tensors on the symmetric heap when its collectives use NVSHMEM); the counters that
    carry from step to step (``Plan.counters``) zeroed, the rest uninitialised."""
    bound: dict[str, torch.Tensor] = _symmetric(plan, device) if plan_uses_nvshmem(plan) else {}
    counters = plan.counters
    for name, handle in plan.tensors.items():
        if name in bound:
            continue
        if handle.role is not Role.INPUT:
            alloc = torch.zeros if name in counters else torch.empty
            bound[name] = alloc(handle.shape, dtype=handle.dtype, device=device)
            continue
        if name not in given:
            raise ValueError(f"no device tensor given for plan input '{name}'")
        t = given[name]
        if t.device != device or tuple(t.shape) != handle.shape or t.dtype != handle.dtype:
            raise ValueError(f"plan input '{name}' needs {handle.dtype} {handle.shape} on {device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
        bound[name] = t
    return bound


def _layout(plan: Plan, tensors: Mapping[str, torch.Tensor]) -> tuple[RecordLayout, list[list[int]] | None]:
    """The plan's record layout and each task's argument words; a plan stored in the plan cache
    (``codegen/plan_cache.py``) takes its stored layout, and its words are not computed here."""
    layout = plan_cache.cached_layout(plan)
    if layout is not None:
        return layout, None
    args = all_args(plan, tensors)
    return record_layout(plan, args), args


def _threads(plan: Plan) -> int:
    return plan.ops[0].block_dim[0]


def _variants(plan: Plan) -> Variants:
    return plan_variants(plan, _threads(plan))


def _table(plan: Plan, tensors: Mapping[str, torch.Tensor], prefetch: PrefetchPolicy, variants: Variants,
           layout: RecordLayout, args: list[list[int]] | None) -> np.ndarray:
    """The task table from the plan cache where it holds it, else built (``args``: the argument
    words where ``_layout`` computed them)."""
    def build() -> np.ndarray:
        words = all_args(plan, tensors) if args is None else args
        return task_table(plan, variants, words, layout, tensors, prefetch)

    return plan_cache.task_table(plan, tensors, prefetch, build)


def kernel_table(plan: Plan, tensors: Mapping[str, torch.Tensor],
                 prefetch: PrefetchPolicy = PrefetchPolicy()) -> np.ndarray:
    """The task table of a plan bound to ``tensors`` under ``prefetch`` (launch data: no rebuild)."""
    return _table(plan, tensors, prefetch, _variants(plan), *_layout(plan, tensors))


def kernel_source(plan: Plan, tensors: Mapping[str, torch.Tensor]) -> JitSpec:
    """The specialised source of a plan bound to ``tensors`` (what a build needs; no task table)."""
    return generate(plan, _variants(plan), _layout(plan, tensors)[0], _threads(plan))


def kernel_spec(plan: Plan, tensors: Mapping[str, torch.Tensor],
                prefetch: PrefetchPolicy = PrefetchPolicy()) -> tuple[JitSpec, np.ndarray]:
    """The specialised source and the task table of a plan bound to ``tensors`` (meta tensors do:
    only shapes and strides are read), so builds can run ahead of loading weights."""
    variants = _variants(plan)
    layout, args = _layout(plan, tensors)
    return (generate(plan, variants, layout, _threads(plan)),
            _table(plan, tensors, prefetch, variants, layout, args))


def build_kernels(plans: Sequence[tuple[Plan, Mapping[str, torch.Tensor]]]) -> None:
    """Compile the kernels of several bound plans at once (nvcc runs as subprocesses), so that
    ``Megakernel`` then loads each from the build cache; a kernel already there is loaded, which
    needs no nvcc. The plans' intermediates are described by meta tensors: codegen reads only
    shapes and strides, which ``bind_tensors`` reproduces."""
    specs = []
    for plan, tensors in plans:
        meta = {n: torch.empty(h.shape, dtype=h.dtype, device="meta") for n, h in plan.tensors.items()
                if h.role is not Role.INPUT}
        specs.append(kernel_source(plan, {**tensors, **meta}))
    for arch in {spec.arch for spec in specs}:
        check_gpu(arch)  # here, on this thread's current device
    with ThreadPoolExecutor(max(1, len(specs))) as pool:
        list(pool.map(lambda spec: spec.load(), specs))


class Megakernel:
    def __init__(self, plan: Plan, tensors: Mapping[str, torch.Tensor], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 profile: bool | torch.Tensor = False, error_flag: torch.Tensor | None = None,
                 prefetch: PrefetchPolicy = PrefetchPolicy()):
        """``profile``: True to record per-task timestamps into ``self.profile``, or an int64 CUDA
        tensor of at least ``num_workers * max_tasks * 2`` elements to record into (MPK's
        ``profiler_tensor``); ``self.profile`` is then a ``[num_workers, max_tasks, 2]`` view of it.
        ``error_flag``: one int32 word of pinned host memory (zeroed here; default: its own) that a
        watchdog stop sets to the error code, so that a host can poll for a stop without a CUDA
        call (``stopped``), e.g. one element of a tensor shared by several kernels.
        ``prefetch``: how far ahead workers ask L2 for weights (``set_prefetch`` changes it without
        a rebuild)."""
        device = next((t.device for t in tensors.values() if t.device.type == "cuda"), None)
        if device is None:
            raise ValueError("the megakernel runs on CUDA tensors; none of the given tensors is on a GPU")
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        if plan.num_workers > sms:
            raise ValueError(f"the plan has {plan.num_workers} workers but {torch.cuda.get_device_name(device)} has "
                             f"{sms} SMs; a persistent kernel needs one resident worker per SM")
        if plan.compiled:  # a plan restored from the plan cache was checked when it was compiled
            topological_order(plan.tasks, plan.events)
        self.plan, self.device, self.timeout_ns = plan, device, int(check_timeout_s(timeout_s) * 1e9)
        self.tensors = bind_tensors(plan, tensors, device)
        spec, table = kernel_spec(plan, self.tensors, prefetch)
        self.prefetch = prefetch
        self.module = spec.load()
        if plan_uses_nvshmem(plan):
            status = self.module.nvshmem_attach()  # this module's own copy of NVSHMEM's device state
            if status != 0:
                raise nvshmem.NvshmemError(f"registering the megakernel with NVSHMEM failed (status {status})")
        self.max_tasks = table.shape[1]
        self.tasks = torch.from_numpy(table).to(device)
        self.queue_lens = torch.tensor(plan.counts.queue_lens, dtype=torch.int32, device=device)
        ids = tensor_ids(plan)
        self.pointers = torch.tensor([self.tensors[n].data_ptr() for n in sorted(ids, key=ids.get)],
                                     dtype=torch.int64, device=device)
        self.triggers = torch.from_numpy(trigger_counts(plan)).to(device)
        self.counters = torch.zeros_like(self.triggers)
        self.control = torch.zeros(control.WORDS, dtype=torch.int32, device=device)
        if error_flag is None:
            error_flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        elif error_flag.shape != (1,) or error_flag.dtype != torch.int32 or not error_flag.is_pinned():
            raise ValueError(f"the error flag must be one int32 word of pinned host memory, got {error_flag.dtype} "
                             f"{tuple(error_flag.shape)} on {error_flag.device} (pinned: {error_flag.is_pinned()})")
        self.error_flag = error_flag.zero_()
        base = error_flag.untyped_storage().data_ptr()  # the pinned allocation, which CUDA maps as a whole
        self._error_flag_address = self.module.device_pointer(base) + error_flag.data_ptr() - base
        self.profile = self._profile_buffer(profile, device)
        if plan_uses_nvshmem(plan):
            # The first launch's collectives wait only timeout_s for the peers' same launch, and a
            # rank may still be compiling or loading its kernel (seconds): no rank leaves here
            # before every rank has its kernel loaded. (Collective, like the symmetric buffers.)
            torch.cuda.synchronize(device)
            nvshmem.barrier()

    def _profile_buffer(self, profile: bool | torch.Tensor, device: torch.device) -> torch.Tensor | None:
        shape = (self.plan.num_workers, self.max_tasks, 2)
        if not isinstance(profile, torch.Tensor):
            return torch.zeros(shape, dtype=torch.int64, device=device) if profile else None
        needed = shape[0] * shape[1] * shape[2]
        if profile.dtype != torch.int64 or profile.device != device or profile.numel() < needed:
            raise ValueError(f"the profiler tensor must be int64 on {device} with at least {needed} elements "
                             f"({shape[0]} workers x {shape[1]} tasks x 2), got {profile.dtype} "
                             f"{tuple(profile.shape)} on {profile.device}")
        return profile.view(-1)[:needed].view(shape)

    def launch(self, num_tokens: int, stream: torch.cuda.Stream | None = None, steps: int = 1) -> None:
        """Enqueue one decode step for the first ``num_tokens`` rows (``steps`` of them for a
        multi-step plan, whose first task moves the state on); capturable in a CUDA graph."""
        if steps > 1 and not self.multi_step:
            raise ValueError(f"launch(steps={steps}) needs a multi-step plan (begin_step first): each step of this "
                             f"plan reads step inputs that only the host writes")
        stream = stream or torch.cuda.current_stream(self.device)
        self.module.launch(self.tasks.data_ptr(), self.queue_lens.data_ptr(), self.pointers.data_ptr(),
                           self.counters.data_ptr(), self.triggers.data_ptr(), self.control.data_ptr(),
                           self._error_flag_address, 0 if self.profile is None else self.profile.data_ptr(),
                           num_tokens, steps, self.max_tasks, self.prefetch.ahead, int(self.prefetch.landed),
                           self.plan.num_workers,
                           self.timeout_ns, stream.cuda_stream)

    def set_prefetch(self, prefetch: PrefetchPolicy) -> None:
        """Use ``prefetch`` from the next launch on (the task table is rewritten in place; a CUDA
        graph captured before keeps the old ``ahead``: capture again)."""
        self.tasks.copy_(torch.from_numpy(kernel_table(self.plan, self.tensors, prefetch)))
        self.prefetch = prefetch

    @property
    def multi_step(self) -> bool:
        return any(op.kind == "begin_step" for op in self.plan.ops)

    def run_steps(self, num_tokens: int, steps: int) -> None:
        """``steps`` decode steps in one synchronous launch of a multi-step plan."""
        self.launch(num_tokens, steps=steps)
        self.check()

    def run_step(self, num_tokens: int, order: str = "schedule", seed: int = 0) -> None:
        """One synchronous step, with the reference executor's signature (the GPU picks its own
        order, so ``order`` and ``seed`` are ignored); raises MegakernelError on a watchdog stop."""
        self.launch(num_tokens)
        self.check()

    @property
    def stopped(self) -> bool:
        """Whether a launch stopped on its watchdog (the word rises as the first worker stops,
        before the launch ends); reads host memory only (no CUDA call, no synchronisation), so a
        host can ask every step."""
        return bool(self.error_flag.numpy()[0])

    def check(self) -> None:
        """Synchronise and raise MegakernelError if a launch stopped on its watchdog."""
        words = self.control.tolist()
        if words[control.ERROR]:
            raise MegakernelError(self.describe_stop(words))

    def describe_stop(self, words: Sequence[int]) -> str:
        """What stopped a launch, from its control block's ``words``: the error, the worker, the
        task and what that task waited for."""
        code = words[control.ERROR]
        task = self.plan.tasks[words[control.ERR_TASK]]
        head = f"megakernel {control.ERROR_NAMES.get(code, f'error {code}')}: worker {words[control.ERR_WORKER]} at {task}"
        if code == control.PEER_TIMEOUT:
            world, _ = plan_ranks(self.plan)
            return (f"{head} waited on signal word {words[control.ERR_EVENT]} (count {words[control.ERR_SEEN]}, wanted "
                    f"{words[control.ERR_WANTED]}: {world} ranks per launch); a rank stopped, launched a different "
                    f"number of steps, or runs another plan")
        if code == control.COPY_TIMEOUT:
            return (f"{head} waited for its bulk copies of the KV history into shared memory (phase parity "
                    f"{words[control.ERR_WANTED]}); the worker stopped once they had landed or, at twice the timeout, "
                    f"without them")
        return (f"{head} waited on event {words[control.ERR_EVENT]} (count {words[control.ERR_SEEN]}, wanted "
                f"{words[control.ERR_WANTED]})")

    def reset(self) -> None:
        """Zero the counters and the control block, e.g. after a watchdog stop (which can leave a
        step's counts behind, split-KV attention's arrivals among them). A plan with NVSHMEM
        collectives zeroes its signal words too, so every rank must reset together (collective: a
        barrier on each side)."""
        collective = plan_uses_nvshmem(self.plan)
        torch.cuda.synchronize(self.device)  # no launch, on any stream, is left to count or raise the flag
        if collective:
            nvshmem.barrier()
        self.counters.zero_()
        self.control.zero_()
        self.error_flag.zero_()
        for name in self.plan.counters:
            self.tensors[name].zero_()
        if collective:
            for name, handle in self.plan.tensors.items():
                if handle.role is Role.EXCHANGE:
                    self.tensors[name].zero_()
            torch.cuda.synchronize(self.device)
            nvshmem.barrier()
