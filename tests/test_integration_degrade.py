"""A megakernel stop under vLLM (``vllm_mpk/integration/degrade.py``), on the CPU: the worker's
guard at the output wait, the runner's CUDA graph dispatch, and vLLM's own scheduler failing the
marked requests in the engine core."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from vllm.config import CUDAGraphMode  # noqa: E402
from vllm.v1.outputs import AsyncModelRunnerOutput, LogprobsLists, ModelRunnerOutput  # noqa: E402

from vllm_mpk.integration import plugin  # noqa: E402
from vllm_mpk.integration.degrade import (  # noqa: E402
    DEGRADE,
    FAILED,
    GuardedOutput,
    StepGuard,
    _wrap_execute_model,
    fail_requests,
    stop_replaying,
)

BLOCK = 16


class FakeRuntime:
    """The guard's view of an ``MpkRuntime``: a pinned error word, the graphs holding a launch."""

    def __init__(self) -> None:
        self.word = torch.zeros(1, dtype=torch.int32)
        self.megakernel_graphs = {1, 2}
        self.disabled: str | None = None
        self.degraded = 0

    def stop_raised(self) -> bool:
        return bool(self.word[0])

    def degrade(self) -> None:
        self.degraded += 1
        self.disabled = "stopped"
        self.megakernel_graphs.clear()
        self.word.zero_()  # the reset


class PendingOutput(AsyncModelRunnerOutput):
    """A step's output whose tokens the host has not waited for yet."""

    def __init__(self, output: ModelRunnerOutput) -> None:
        self.output = output

    def get_output(self) -> ModelRunnerOutput:
        return self.output


def sampled(*req_ids: str) -> ModelRunnerOutput:
    return ModelRunnerOutput(req_ids=list(req_ids), req_id_to_index={r: i for i, r in enumerate(req_ids)},
                             sampled_token_ids=[[7] for _ in req_ids],
                             logprobs=LogprobsLists(logprob_token_ids=[[7]] * len(req_ids),
                                                    logprobs=[[-0.1]] * len(req_ids),
                                                    sampled_token_ranks=[1] * len(req_ids)),
                             prompt_logprobs_dict={r: None for r in req_ids})


def test_fail_requests_drops_every_token_and_names_the_requests() -> None:
    output = sampled("a", "b")
    fail_requests(output)
    assert output.sampled_token_ids == [[], []] and output.logprobs is None and not output.prompt_logprobs_dict
    assert getattr(output, FAILED) == ["a", "b"]
    empty = ModelRunnerOutput(req_ids=[], req_id_to_index={})
    fail_requests(empty)
    assert not hasattr(empty, FAILED)
    fail_requests(None)  # a step that returned nothing (pipeline stages) has nothing to fail


def test_a_stop_fails_the_steps_it_reached_and_no_later_one() -> None:
    """With async scheduling a step's output is waited for after the next step was launched: the
    stop that rises during step 2 fails step 2, and step 3, launched before the reset, even once
    the reset lowered the word; step 4, after it, is served as usual."""
    runtime = FakeRuntime()
    guard = StepGuard(runtime)
    first = guard.track(sampled("a"))  # V1 without async scheduling: already waited for
    assert first.sampled_token_ids == [[7]] and not hasattr(first, FAILED)
    second, third = guard.track(PendingOutput(sampled("a", "b"))), guard.track(PendingOutput(sampled("a", "b")))
    assert isinstance(second, GuardedOutput) and isinstance(third, GuardedOutput)
    runtime.word[0] = 1  # the kernel stops while step 2 runs
    assert getattr(second.get_output(), FAILED) == ["a", "b"]
    runner = SimpleNamespace()
    guard.degrade(runner)  # the engine's next step says DEGRADE: before its forward
    assert runtime.degraded == 1 and not runtime.stop_raised()
    assert getattr(third.get_output(), FAILED) == ["a", "b"]
    fourth = guard.track(PendingOutput(sampled("a"))).get_output()
    assert fourth.sampled_token_ids == [[7]] and not hasattr(fourth, FAILED)
    guard.degrade(runner)  # already off: nothing more
    assert runtime.degraded == 1


def test_the_degrade_hook_resets_what_a_forward_built_under_inference_mode() -> None:
    """vLLM runs every forward under ``torch.inference_mode``, so the megakernel built there has
    inference tensors (counters, control block, error words). The hook turns it off before
    ``Worker.execute_model``'s own inference mode begins; zeroing them must still work."""
    with torch.inference_mode():  # where the first decode forward builds the megakernel
        runtime = FakeRuntime()
        runtime.word[0] = 1  # and where its launch raises the word
    guard = StepGuard(runtime)
    worker = SimpleNamespace(model_runner=SimpleNamespace(model=SimpleNamespace(_mpk=SimpleNamespace(guard=guard))))
    ran: list[Any] = []

    @torch.inference_mode()
    def execute_model(self: Any, scheduler_output: Any) -> None:  # vLLM's, decorated as in gpu_worker.py
        ran.append(scheduler_output)

    marked = SimpleNamespace(**{DEGRADE: True})
    _wrap_execute_model(execute_model)(worker, marked)
    assert runtime.degraded == 1 and not runtime.stop_raised() and ran == [marked]


def test_the_runners_stop_replaying_the_megakernels_full_graphs() -> None:
    """Model Runner V2's dispatch (the real method) and the V1 dispatcher's keys: FULL graphs of the
    token counts that hold a launch are no longer chosen; other graphs still are."""
    from vllm.forward_context import BatchDescriptor
    from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor, CudaGraphManager

    def full(n: int) -> BatchExecutionDescriptor:
        return BatchExecutionDescriptor(CUDAGraphMode.FULL, n, n, uniform_token_count=1)

    def piecewise(n: int) -> BatchExecutionDescriptor:
        return BatchExecutionDescriptor(CUDAGraphMode.PIECEWISE, n, None)

    manager = CudaGraphManager.__new__(CudaGraphManager)
    manager._graphs_captured, manager._lora_dispatch_map, manager._max_lora_case = True, {}, 0
    manager._candidates = {(n, 0): [full(n), piecewise(n)] for n in (1, 2, 16)}
    v1 = SimpleNamespace(cudagraph_keys={CUDAGraphMode.FULL: {BatchDescriptor(n, uniform=True) for n in (1, 2, 16)},
                                         CUDAGraphMode.PIECEWISE: {BatchDescriptor(16)}})
    assert manager.dispatch(2, 2, 1, 0).cg_mode == CUDAGraphMode.FULL
    stop_replaying(SimpleNamespace(cudagraph_manager=manager), {1, 2})
    stop_replaying(SimpleNamespace(cudagraph_dispatcher=v1), {1, 2})
    assert [manager.dispatch(n, n, 1, 0).cg_mode for n in (1, 2, 16)] == [CUDAGraphMode.PIECEWISE] * 2 + [
        CUDAGraphMode.FULL]
    assert {d.num_tokens for d in v1.cudagraph_keys[CUDAGraphMode.FULL]} == {16}
    assert v1.cudagraph_keys[CUDAGraphMode.PIECEWISE] == {BatchDescriptor(16)}


# the engine core ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scheduler_factory(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """vLLM's async scheduler, as the engine core picks it through the config (the plugin's hooks
    on it), over a small prefix-cached KV cache."""
    from vllm.config import CacheConfig, DeviceConfig, SchedulerConfig, VllmConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from tests.test_integration_model import CONFIGS

    model = tmp_path_factory.mktemp("scheduled")
    (model / "config.json").write_text(json.dumps(CONFIGS["qwen3"]))
    model_config = EngineArgs(model=str(model), skip_tokenizer_init=True).create_model_config()
    plugin.register()

    def make() -> Any:
        scheduler_config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=256,
                                           is_encoder_decoder=False, async_scheduling=True)
        cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=True)
        cache.num_gpu_blocks = 64
        config = VllmConfig(scheduler_config=scheduler_config, model_config=model_config, cache_config=cache,
                            device_config=DeviceConfig(device="cpu"))
        spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=8, dtype=torch.bfloat16)
        kv = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l"], spec)])
        scheduler_cls = scheduler_config.get_scheduler_cls()
        return scheduler_cls(vllm_config=config, kv_cache_config=kv,
                             structured_output_manager=StructuredOutputManager(config), block_size=BLOCK)

    return make


def request(req_id: str, prompt: list[int]) -> Any:
    """A request as the engine core makes it: with the block hasher that prefix caching reads."""
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    return Request(req_id, prompt, SamplingParams(max_tokens=16, ignore_eos=True), None,
                   block_hasher=get_request_block_hasher(BLOCK, hash_fn))


def tokens(result: dict[int, Any]) -> dict[str, tuple[list[int], Any]]:
    return {o.request_id: (o.new_token_ids, o.finish_reason) for eco in result.values() for o in eco.outputs}


def test_the_scheduler_fails_marked_requests_and_forgets_their_kv(scheduler_factory: Any) -> None:
    """Async scheduling, step by step: step 2's output comes back marked (its launch stopped) while
    step 3 is already scheduled; its requests finish with an error and no token, their blocks leave
    the prefix cache, the next step says DEGRADE and serves a new request, and step 3's marked
    output (launched before the reset) changes nothing."""
    from vllm.v1.engine import FinishReason

    scheduler = scheduler_factory()
    prompts = {"a": list(range(20)), "b": list(range(100, 105))}
    for req_id, prompt in prompts.items():
        scheduler.add_request(request(req_id, prompt))
    first = scheduler.schedule()
    second = scheduler.schedule()  # async: the decode step is scheduled before the prefill's output
    assert tokens(scheduler.update_from_output(first, sampled("a", "b"))) == {"a": ([7], None), "b": ([7], None)}
    third = scheduler.schedule()
    assert not getattr(second, DEGRADE, False) and not getattr(third, DEGRADE, False)
    a_blocks = scheduler.kv_cache_manager.get_block_ids("a")[0]
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.blocks[a_blocks[0]].block_hash is not None  # the prompt's full block is cached

    stopped = sampled("a", "b")
    fail_requests(stopped)  # what the worker's guard does with a stopped step's output
    assert tokens(scheduler.update_from_output(second, stopped)) == {"a": ([], FinishReason.ERROR),
                                                                     "b": ([], FinishReason.ERROR)}
    assert all(scheduler.requests.get(r) is None or scheduler.requests[r].is_finished() for r in prompts)
    assert pool.blocks[a_blocks[0]].block_hash is None  # no later request reuses KV a stopped step wrote

    scheduler.add_request(request("c", list(range(200, 205))))
    fourth = scheduler.schedule()
    assert getattr(fourth, DEGRADE) is True and set(fourth.num_scheduled_tokens) == {"c"}
    in_flight = sampled("a", "b")
    fail_requests(in_flight)  # step 3 was launched before the reset
    assert tokens(scheduler.update_from_output(third, in_flight)) == {}
    assert tokens(scheduler.update_from_output(fourth, sampled("c"))) == {"c": ([7], None)}
    scheduler.add_request(request("d", prompts["a"]))  # a's prompt again: computed afresh
    fifth = scheduler.schedule()
    assert not getattr(fifth, DEGRADE, False)  # said once
    assert [(r.req_id, r.num_computed_tokens) for r in fifth.scheduled_new_reqs] == [("d", 0)]


def test_register_hooks_the_scheduler_the_config_picks(scheduler_factory: Any) -> None:
    from vllm.config import SchedulerConfig

    plugin.register()
    cls = SchedulerConfig(max_model_len=256, is_encoder_decoder=False, async_scheduling=False).get_scheduler_cls()
    for name in ("update_from_output", "schedule"):
        method = getattr(cls, name)
        assert getattr(method, plugin.WRAPPED_MARK) and not getattr(method.__wrapped__, plugin.WRAPPED_MARK, False)


def test_hooks_leave_unmarked_outputs_alone(scheduler_factory: Any) -> None:
    scheduler = scheduler_factory()
    scheduler.add_request(request("a", list(range(5))))
    first = scheduler.schedule()
    assert tokens(scheduler.update_from_output(first, sampled("a"))) == {"a": ([7], None)}
    assert not getattr(scheduler.schedule(), DEGRADE, False)


def test_a_request_freed_before_its_stopped_step_returns_leaves_no_kv_in_the_prefix_cache(
        scheduler_factory: Any) -> None:
    """Async scheduling: a request is aborted while its step is in flight (and another finished
    before that step's output arrives); the step's output comes back marked: the blocks the
    requests had, already freed, leave the prefix cache all the same."""
    from vllm.v1.request import RequestStatus

    scheduler = scheduler_factory()
    prompts = {"a": list(range(20)), "b": list(range(100, 120))}
    for req_id, prompt in prompts.items():
        scheduler.add_request(request(req_id, prompt))
    first = scheduler.schedule()
    second = scheduler.schedule()
    scheduler.update_from_output(first, sampled("a", "b"))
    held = {r: scheduler.kv_cache_manager.get_block_ids(r)[0] for r in prompts}
    pool = scheduler.kv_cache_manager.block_pool
    assert all(pool.blocks[blocks[0]].block_hash is not None for blocks in held.values())

    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)  # the client went away mid-step
    assert "a" not in scheduler.requests or scheduler.requests["a"].is_finished()
    stopped = sampled("a", "b")
    fail_requests(stopped)
    scheduler.update_from_output(second, stopped)
    for req_id, blocks in held.items():
        assert pool.blocks[blocks[0]].block_hash is None, req_id  # neither prompt's KV is reused

    scheduler.add_request(request("c", prompts["a"]))  # a's prompt again: computed afresh
    third = scheduler.schedule()
    assert [(r.req_id, r.num_computed_tokens) for r in third.scheduled_new_reqs] == [("c", 0)]


def test_freed_blocks_are_forgotten_after_a_few_steps() -> None:
    from vllm_mpk.integration.degrade import FreedBlocks

    freed = FreedBlocks(steps=2)
    freed.remember("a", [[1, 2], [3]])
    assert freed.of("a") == {1, 2, 3}
    freed.scheduled()
    freed.scheduled()
    assert freed.of("a") == {1, 2, 3}
    freed.scheduled()
    assert freed.of("a") == set() and freed.of("never") == set()
