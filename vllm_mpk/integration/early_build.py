"""The megakernels of a model instance, planned and compiled while vLLM is still loading it.

Everything a plan's generated source depends on is known once vLLM has constructed the model: the
weights' shapes, the batch sizes (``plan_batches``), the page size (``cache_config.block_size``),
the width of vLLM's block table (``block_table_tokens``), the workers and the tensor-parallel rank.
So the model's constructor declares each plan there (the memory estimate reads the same
declaration, ``integration/memory.py``) and hands the declarations to ``EarlyBuild``, whose
background thread compiles the plans and starts nvcc for each kernel the build cache lacks. nvcc
runs as subprocesses, so the builds overlap vLLM's weight loading, torch.compile and memory
profiling. The first decode step takes the compiled plans (``integration/plan_reuse.py``) and
joins the builds, saying so when it has to wait.

Nothing here raises into vLLM: a failure is kept in its future and the first decode step, which
plans and builds again where the early work is missing, reports it as a failed build. The threads
are daemons and every wait on them is bounded, so neither shutdown nor a failed engine waits for
them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, wait
from typing import Any

import torch

from vllm_mpk.api import PersistentKernel
from vllm_mpk.codegen import plan_cache
from vllm_mpk.codegen.jit import BuildTimeoutError, JitSpec, builds_forbidden
from vllm_mpk.codegen.ops import UnsupportedOnGPU
from vllm_mpk.codegen.tables import all_args, record_layout
from vllm_mpk.codegen.toolchain import BUILD_TIMEOUT_ENV, ToolchainError, build_timeout_s, check_gpu, find_nvcc
from vllm_mpk.graph.plan import Plan
from vllm_mpk.integration.plan_reuse import partial_cache_access
from vllm_mpk.models.decoder import DecodeLayers, DecodeOptions, declare_decoder
from vllm_mpk.models.spec import ModelSpec

logger = logging.getLogger("vllm.mpk")

# A build waits at most twice the build timeout for its entry's lock (``codegen/jit.py``), then
# runs nvcc within one.
BUILD_WAIT_TIMEOUTS = 3
V2_ROW_ALIGN_TOKENS = 128


def block_table_tokens(vllm_config: Any, page_size: int) -> int:
    """The tokens one row of vLLM's block table covers, which the plans take as ``max_seq_len``:
    ``max_model_len`` in whole pages, rounded as Model Runner V2 rounds its rows (to 128 tokens
    where pages hold at most 128: ``v1/worker/gpu/model_runner.py:initialize_kv_cache``)."""
    pages = -(-vllm_config.model_config.max_model_len // page_size)
    if getattr(vllm_config, "use_v2_model_runner", False) and page_size <= V2_ROW_ALIGN_TOKENS:
        align = V2_ROW_ALIGN_TOKENS // page_size
        pages = -(-pages // align) * align
    return pages * page_size


def declare_plans(spec: ModelSpec, options: Mapping[int, DecodeOptions], weights: Mapping[str, torch.Tensor],
                  rope: torch.Tensor) -> dict[int, DecodeLayers]:
    """The layers of each batch size's plan (``options`` by size), declared on meta tensors shaped
    like the constructed model's ``weights`` and RoPE table, with KV caches of one block: their
    real count is decided after profiling (``integration/plan_reuse.py``)."""
    meta = {n: torch.empty_like(t, device="meta") for n, t in weights.items()}
    table = torch.empty_like(rope, device="meta")
    layers = {}
    for size, o in options.items():
        kv_heads = spec.shard(o.world_size).num_kv_heads
        cache = torch.empty(1, kv_heads, o.page_size, 2 * spec.head_dim, dtype=torch.bfloat16, device="meta")
        layers[size] = declare_decoder(spec, meta, [cache] * spec.num_layers, o, rope_cache=table)
    return layers


def nvcc_builds_here() -> bool:
    """Whether this process compiles megakernels itself: nvcc is installed, builds are allowed, the
    build timeout is valid and the current GPU runs the kernels' arch. Where not, the first decode
    step loads (or fails to build) the kernels as it does without an early build."""
    if builds_forbidden():
        return False
    try:
        find_nvcc()
        build_timeout_s()
        check_gpu(JitSpec.arch)
    except (ToolchainError, ValueError):
        return False
    return True


def meta_bindings(plan: Plan) -> dict[str, torch.Tensor]:
    """Meta tensors for every tensor of ``plan``: its source reads only their shapes and strides."""
    return {n: torch.empty(h.shape, dtype=h.dtype, device="meta") for n, h in plan.tensors.items()}


def compile_plan(kernel: PersistentKernel) -> Plan:
    """The plan of the declared ``kernel``: restored from the plan cache (deferred,
    ``codegen/plan_cache.py``), else compiled and stored there with its record layout, unless a
    task ties it to the KV caches' placeholder block count (it could not serve vLLM's caches)."""
    plan = plan_cache.restore(kernel)
    if plan is not None:
        return plan
    plan = kernel.compile()
    if partial_cache_access(plan) is None:
        try:
            layout = record_layout(plan, all_args(plan, meta_bindings(plan)))
        except UnsupportedOnGPU as e:  # the first decode step reports it as a failed build
            logger.debug("--model-impl mpk: not caching a plan the GPU does not run: %s", e)
        else:
            plan_cache.store(kernel, plan, layout)
    return plan


def _run(target: Callable[..., None], *args: Any) -> None:
    threading.Thread(target=target, args=args, name="mpk-early-build", daemon=True).start()


class EarlyBuild:
    """Compiles the declared plans (``layers`` by batch size) in a background thread and, with
    ``kernels``, builds their megakernels with nvcc, each in a thread of its own."""

    def __init__(self, layers: Mapping[int, DecodeLayers], *, kernels: bool):
        self.layers = dict(layers)
        self._plans: Future[dict[int, Plan]] = Future()
        self._builds: dict[int, Future[None]] = {}  # set before _plans resolves
        self._started = time.monotonic()
        _run(self._prepare, kernels)

    def plans(self) -> dict[int, Plan]:
        """The compiled plans by batch size; none where compiling them failed or is still running
        after the build timeout (the first decode step then plans again)."""
        try:
            return self._plans.result(timeout=build_timeout_s())
        except TimeoutError:
            logger.debug("--model-impl mpk: the plans compiled at model load are not ready; planning again")
            return {}

    def join_builds(self) -> bool:
        """Wait for the background builds (bounded) and raise the first one's failure; False where
        none were started (no nvcc, or the cache check failed: the caller builds)."""
        self.plans()
        futures = list(self._builds.values())
        if not futures:
            return False
        pending = sum(not f.done() for f in futures)
        if pending:
            logger.info("--model-impl mpk: waiting for the background nvcc builds (%d of %s, running for %.0f s)",
                        pending, _megakernels(len(futures)), time.monotonic() - self._started)
        limit = BUILD_WAIT_TIMEOUTS * build_timeout_s()
        _, late = wait(futures, timeout=limit)
        if late:
            raise BuildTimeoutError(f"the background nvcc builds did not finish within {limit:g} s (three times "
                                    f"{BUILD_TIMEOUT_ENV}: raise it if this machine is just slow)")
        for future in futures:
            future.result()
        return True

    def _prepare(self, kernels: bool) -> None:
        plans: dict[int, Plan] = {}
        try:
            plans = {size: compile_plan(layers.kernel) for size, layers in self.layers.items()}
            if kernels:
                self._start_builds(plans)
        except Exception as e:  # the first decode step plans again and reports it
            logger.debug("--model-impl mpk: preparing the megakernels at model load failed: %s", e)
        finally:
            self._plans.set_result(plans)

    def _start_builds(self, plans: dict[int, Plan]) -> None:
        from vllm_mpk.runtime.megakernel import kernel_source

        specs = {size: kernel_source(plan, meta_bindings(plan)) for size, plan in plans.items()}
        missing = {size: spec for size, spec in specs.items() if spec.try_load() is None}
        builds: dict[int, Future[None]] = {size: Future() for size in specs}
        for size in specs.keys() - missing.keys():
            builds[size].set_result(None)
        self._builds = builds
        if not missing:
            logger.debug("--model-impl mpk: the build cache holds the %s", _megakernels(len(specs)))
            return
        self._started = time.monotonic()
        logger.info("--model-impl mpk: compiling %s (decode batches of %s) with nvcc in the background while vLLM "
                    "loads the model", _megakernels(len(missing)), "/".join(map(str, sorted(missing))))
        for size, spec in missing.items():
            try:
                _run(_build, spec, builds[size])
            except RuntimeError as e:  # no thread to be had: the first decode step reports it
                builds[size].set_exception(e)
        _run(self._report, [builds[size] for size in missing])

    def _report(self, futures: list[Future[None]]) -> None:
        wait(futures)  # each build ends within its own timeouts
        failed = sum(f.exception() is not None for f in futures)
        seconds = time.monotonic() - self._started
        if failed:
            logger.info("--model-impl mpk: nvcc failed on %d of %s after %.1f s; the first decode step reports why",
                        failed, _megakernels(len(futures)), seconds)
        else:
            logger.info("--model-impl mpk: nvcc built %s in %.1f s", _megakernels(len(futures)), seconds)


def _megakernels(n: int) -> str:
    return f"{n} megakernel{'' if n == 1 else 's'}"


def _build(spec: JitSpec, done: Future[None]) -> None:
    try:
        spec.build()
    except BaseException as e:  # kept for the first decode step, which reports it
        done.set_exception(e)
    else:
        done.set_result(None)
