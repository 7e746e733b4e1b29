"""A megakernel that stopped on its watchdog under vLLM: the requests of the affected steps fail,
none of their tokens reaches a client, and the engine goes on serving on vLLM's stock layers.

A stop rises in the kernel's pinned host error word while the launch runs, but the host learns
of it only where it already waits for the step's GPU work, so no step pays a synchronisation:
Model Runner V2 (always) and the V1 runner with async scheduling hand vLLM an
``AsyncModelRunnerOutput`` whose ``get_output`` waits for the copy of the sampled tokens (an event
recorded after the step's forward and sampling); the V1 runner without async scheduling returns a
``ModelRunnerOutput`` after a blocking copy. At either point the step's launches have ended, so
their words are final. (A word may also have been raised by the next step's launch, already
running: then a good step fails too, which errs on the safe side.)

Tensor parallelism: only the output rank (0) waits for outputs. A stop on another rank reaches
rank 0's own word through the peer timeouts of its all-reduces, in the same step, unless that
rank stopped after its step's last all-reduce: then rank 0 sees it one step later, and the
tokens of the step in between (sampled from that rank's logits) are not caught.

Why the requests fail rather than the step being recomputed on the stock layers: with async
scheduling (vLLM's default) the next step was already launched from the stopped step's sampled
tokens on the GPU (Model Runner V2 feeds them to the next step's inputs without the host), so by
the time the host knows, two steps are wrong and their inputs are gone from the runner's
persistent buffers. And the runner has no per-request error of its own to return: the scheduler
fails requests only for its own reasons (grammar errors, KV loads under the "fail" policy), and
an exception from the runner stops the engine. So the path runs through three processes' hooks:

1. Worker (``StepGuard``): the step's output carries the names of its requests (``FAILED``) and
   no sampled token or logprob; so does every output of a step launched before the megakernel
   was reset (the step in flight).
2. Engine core (``Scheduler.update_from_output``): those requests' blocks leave the prefix cache
   (a stopped step wrote their KV), and the scheduler finishes them with ``FINISHED_ERROR`` in
   this very output, as it does a request whose grammar failed to compile (the client gets
   finish reason "error"); the next ``SchedulerOutput`` says ``DEGRADE``. A request that finished,
   was aborted or was preempted between the stopped step's scheduling and its output has freed
   its blocks by then: the scheduler remembers the blocks of the requests it freed in the last
   few steps (``FreedBlocks``), and those leave the prefix cache too.
3. Every worker, at that step's ``execute_model`` (all tensor-parallel ranks run it in lockstep,
   so NVSHMEM's collective reset pairs up): the megakernels are reset and turned off (the
   fallback routing: every later batch runs the stock layers), the runner stops replaying the
   FULL CUDA graphs that hold a launch, and one warning names what stopped.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from vllm.config import CUDAGraphMode
from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput

from vllm_mpk.integration.plugin import wrap_once

FAILED = "mpk_failed_requests"  # on a ModelRunnerOutput: the ids of its requests, which must fail
DEGRADE = "mpk_degrade"  # on a SchedulerOutput: every worker turns the megakernel off before this step
_PENDING = "_mpk_degrade_pending"  # on the scheduler: the next SchedulerOutput says DEGRADE
_FREED = "_mpk_freed_blocks"  # on the scheduler: its FreedBlocks


class StepGuard:
    """The worker's side for one ``MpkRuntime``. ``runtime`` offers ``stop_raised()`` (reads the
    host error words: no CUDA call), ``megakernel_graphs`` and ``degrade()``."""

    def __init__(self, runtime: Any):
        self.runtime = runtime
        self.issued = 0  # outputs handed to vLLM so far (their step numbers)
        self.launched_before_reset = 0  # outputs up to this number ran before the megakernel was reset

    def track(self, output: Any) -> Any:
        """The output ``sample_tokens`` returns, numbered; checked where the host waits for it."""
        self.issued += 1
        if isinstance(output, AsyncModelRunnerOutput):
            return GuardedOutput(output, self, self.issued)
        return self.settle(output, self.issued)

    def settle(self, output: Any, step: int) -> Any:
        """Fail ``output``'s requests if its step's GPU work (now complete) met a stop."""
        stopped = self.runtime.stop_raised()  # before the step count: degrade() moves it first
        if stopped or step <= self.launched_before_reset:
            fail_requests(output)
        return output

    def degrade(self, model_runner: Any) -> None:
        """Before a step's forward, on every rank: the megakernel off for good. Runs under inference
        mode, as vLLM's forwards do: the megakernel was built inside one, so the counters and words
        its reset zeroes are inference tensors (the hook runs before ``Worker.execute_model``'s own
        ``torch.inference_mode``)."""
        if self.runtime.disabled is not None:
            return
        self.launched_before_reset = self.issued  # before the reset lowers the words (see settle)
        stop_replaying(model_runner, set(self.runtime.megakernel_graphs))
        with torch.inference_mode():
            self.runtime.degrade()


class GuardedOutput(AsyncModelRunnerOutput):
    """An asynchronous step output whose wait ends in ``StepGuard.settle``."""

    def __init__(self, inner: AsyncModelRunnerOutput, guard: StepGuard, step: int):
        self.inner, self.guard, self.step = inner, guard, step

    def get_output(self) -> ModelRunnerOutput:
        return self.guard.settle(self.inner.get_output(), self.step)


def fail_requests(output: Any) -> None:
    """Drop ``output``'s sampled tokens and logprobs and name its requests as failed."""
    if not isinstance(output, ModelRunnerOutput) or not output.req_ids:
        return  # nothing sampled (the shared empty output among them: never written to)
    output.sampled_token_ids = [[] for _ in output.req_ids]
    output.logprobs = None
    for req_id in output.req_ids:
        output.prompt_logprobs_dict.pop(req_id, None)
    setattr(output, FAILED, list(output.req_ids))


def stop_replaying(model_runner: Any, token_counts: set[int]) -> None:
    """The runner no longer replays its FULL CUDA graphs of ``token_counts`` (they hold a megakernel
    launch); those batches run uncaptured or piecewise, through the model's forward."""
    if not token_counts:
        return
    manager = getattr(model_runner, "cudagraph_manager", None)  # Model Runner V2
    if manager is not None:
        manager._candidates = {key: [d for d in descs if not _holds_launch(d, token_counts)]
                               for key, descs in manager._candidates.items()}
    dispatcher = getattr(model_runner, "cudagraph_dispatcher", None)  # the V1 runner
    if dispatcher is not None:
        keys = dispatcher.cudagraph_keys
        keys[CUDAGraphMode.FULL] = {d for d in keys[CUDAGraphMode.FULL] if d.num_tokens not in token_counts}


def _holds_launch(desc: Any, token_counts: set[int]) -> bool:
    return desc.cg_mode == CUDAGraphMode.FULL and desc.num_tokens in token_counts


class FreedBlocks:
    """The KV blocks of the requests a scheduler freed (finished, aborted, preempted) in its last
    ``steps`` scheduled steps, by request id: a stopped step's output arrives a step or two after
    it was scheduled, and the KV it wrote may by then sit in freed, prefix-cached blocks."""

    def __init__(self, steps: int = 4):
        self.steps = steps
        self.step = 0  # steps scheduled so far
        self.freed: OrderedDict[str, tuple[int, set[int]]] = OrderedDict()  # request id -> (step, blocks)

    def scheduled(self) -> None:
        self.step += 1
        while self.freed and next(iter(self.freed.values()))[0] < self.step - self.steps:
            self.freed.popitem(last=False)

    def remember(self, req_id: str, groups: Iterable[Iterable[int]]) -> None:
        self.freed.pop(req_id, None)  # a preempted request may free again: keep its latest blocks
        self.freed[req_id] = (self.step, {b for group in groups for b in group})

    def of(self, req_id: str) -> set[int]:
        return self.freed.get(req_id, (0, set()))[1]


def freed_blocks(scheduler: Any) -> FreedBlocks:
    if _FREED not in scheduler.__dict__:
        setattr(scheduler, _FREED, FreedBlocks())
    return getattr(scheduler, _FREED)


def fail_in_scheduler(scheduler: Any, req_ids: Iterable[str]) -> None:
    """Engine core: the step's KV leaves the prefix cache (its requests' blocks, and those of its
    requests freed since), the requests still running finish with an error in the output being
    processed, and the next step turns the megakernel off on every worker. (A step launched before
    the reset names requests that already failed: their blocks are evicted again, nothing more.)"""
    req_ids = list(req_ids)
    freed = freed_blocks(scheduler)
    blocks: set[int] = set()
    for req_id in req_ids:
        blocks |= freed.of(req_id)
        if req_id in scheduler.requests:
            for group in scheduler.kv_cache_manager.get_block_ids(req_id):
                blocks.update(group)
    if blocks:
        scheduler.kv_cache_manager.evict_blocks(blocks)
    live = [r for r in req_ids if (request := scheduler.requests.get(r)) is not None and not request.is_finished()]
    if not live:
        return
    scheduler.grammar_compile_error_reqs.update(live)  # finished with FINISHED_ERROR, outputs included
    setattr(scheduler, _PENDING, True)


# hooks --------------------------------------------------------------------------------------------


def _guard_of(worker: Any) -> StepGuard | None:
    runtime = getattr(getattr(getattr(worker, "model_runner", None), "model", None), "_mpk", None)
    return None if runtime is None else runtime.guard


def _wrap_sample_tokens(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = original(self, *args, **kwargs)
        guard = _guard_of(self)
        return output if guard is None else guard.track(output)

    return sample_tokens


def _wrap_execute_model(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(scheduler_output, DEGRADE, False):
            guard = _guard_of(self)
            if guard is not None:
                guard.degrade(self.model_runner)
        return original(self, scheduler_output, *args, **kwargs)

    return execute_model


def _wrap_update_from_output(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
        failed = getattr(model_runner_output, FAILED, None)
        if failed:
            fail_in_scheduler(self, failed)
        return original(self, scheduler_output, model_runner_output)

    return update_from_output


def _wrap_free_request_blocks(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _free_request_blocks(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        freed_blocks(self).remember(request.request_id, self.kv_cache_manager.get_block_ids(request.request_id))
        return original(self, request, *args, **kwargs)

    return _free_request_blocks


def _wrap_schedule(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        freed_blocks(self).scheduled()
        output = original(self, *args, **kwargs)
        if getattr(self, _PENDING, False):
            setattr(output, DEGRADE, True)
            setattr(self, _PENDING, False)
        return output

    return schedule


def install_worker_hooks() -> None:
    """In a worker process (where an MPK model is built); idempotent."""
    from vllm.v1.worker.gpu_worker import Worker

    wrap_once(Worker, "sample_tokens", _wrap_sample_tokens)
    wrap_once(Worker, "execute_model", _wrap_execute_model)


def install_scheduler_hooks(scheduler_cls: type) -> None:
    """On the engine core's scheduler class (the plugin wraps the config's choice of it); idempotent."""
    wrap_once(scheduler_cls, "update_from_output", _wrap_update_from_output)
    wrap_once(scheduler_cls, "schedule", _wrap_schedule)
    if hasattr(scheduler_cls, "_free_request_blocks"):  # vLLM's schedulers; where requests' blocks are freed
        wrap_once(scheduler_cls, "_free_request_blocks", _wrap_free_request_blocks)
