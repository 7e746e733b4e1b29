"""Time the model forward inside vLLM's GPU worker, step by step.

Loaded by vLLM as ``worker_extension_cls`` (its methods join the worker's, callable through
``LLM.collective_rpc("bench_...")`` by name, so it works whether the engine core runs in the
caller's process or in its own). Model Runner V2 (``v1/worker/gpu/model_runner.py``, the default
for dense Qwen3 and Llama in vLLM 0.26) runs every decode batch of a FULL CUDA graph size through
``cudagraph_manager.run_fullgraph(desc)``: one graph replay, the model from embedding to the final
norm, nothing else. CUDA events on the current stream just before and after that replay time the
graph's execution on the GPU (the replay is one launch, so no host gap sits between the events).
``model.compute_logits`` (lm_head, outside the graph) is timed the same way.

On the host, the same generation times (wall clock) the runner's ``execute_model`` (input
preparation and the graph launch), its ``sample_tokens`` (lm_head, sampling and the output copy's
launch), the engine's wait for each step's sampled tokens (``get_output`` of the asynchronous
output: the host blocked on the GPU) and the host's step period (one ``execute_model`` start to
the next). With asynchronous scheduling these tell host work from host waits when TPOT sits above
what the GPU needs. Where the host sets the pace, ``HOST_PARTS`` say where its step goes: the
calls inside ``execute_model`` and ``sample_tokens`` that Model Runner V2 makes (each timed where
the runner has it).

The wrappers are instance attributes set by ``bench_timer_start`` and deleted by
``bench_timer_stop``: while the timer is off the worker runs vLLM's code untouched.

The extension also reports the engine settings that shape vLLM's per-step overhead
(``bench_engine_info``) and resets vLLM's profiler between the passes of
``vllm_mpk.bench.profiling`` (``bench_profiler_reset``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

EventPair = tuple[torch.cuda.Event, torch.cuda.Event]
HOST_PHASES = ("host_execute", "host_sample", "host_output_wait")  # the runner's calls, and the engine's wait
# Calls inside them, timed on the host's clock: name, the runner's attribute path to the owner, method.
HOST_PARTS = (
    ("host_prepare_inputs", (), "prepare_inputs"),  # the batch's ids, positions, sequence lengths
    ("host_prepare_attn", (), "prepare_attn"),  # block tables and slot mappings
    ("host_attn_metadata", ("model_state",), "prepare_attn"),  # the attention backend's metadata
    ("host_graph_launch", ("cudagraph_manager",), "run_fullgraph"),  # the FULL graph's replay call
    ("host_sample_call", (), "sample"),  # compute_logits and the sampler
    ("host_compute_logits", ("model",), "compute_logits"),
    ("host_postprocess", (), "postprocess_sampled"),  # the sampled tokens into the requests' state
)


class StepTimer:
    """Mixed into vLLM's ``Worker``; ``self.model_runner`` is the worker's model runner."""

    def bench_device_name(self) -> str:
        return torch.cuda.get_device_name()

    def bench_mpk_state(self) -> dict[str, Any]:
        """Which model class runs and, for ``--model-impl mpk``, whether its megakernel is built,
        why it is off, which batches went to the stock layers, and how many steps it launched from
        Python: a benchmark of a megakernel that never ran would otherwise time stock vLLM twice."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        mpk = getattr(model, "_mpk", None)
        return {"class": type(model).__name__, "built": bool(mpk is not None and mpk.kernels),
                "disabled": mpk and mpk.disabled, "stock": sorted(mpk.stock_reasons) if mpk else [],
                "steps": mpk.steps if mpk else 0}

    def bench_engine_info(self) -> dict[str, Any]:
        """Whether the engine core schedules asynchronously (it then prepares step n+1 while the
        GPU runs step n, hiding most of its per-step work), the attention backend(s) of the KV
        cache groups, the model runner class, the resolved CUDA graph mode and the KV cache's
        blocks (the floor engine takes the stock engine's count)."""
        config = self.vllm_config  # type: ignore[attr-defined]
        runner = self.model_runner  # type: ignore[attr-defined]
        groups = getattr(runner, "attn_groups", None) or []
        backends = sorted({g.backend.get_name() for per_kv_group in groups for g in per_kv_group})
        return {"async_scheduling": bool(config.scheduler_config.async_scheduling),
                "attention_backend": "+".join(backends) or None, "model_runner": type(runner).__name__,
                "cudagraph_mode": str(config.compilation_config.cudagraph_mode),
                "kv_blocks": config.cache_config.num_gpu_blocks}

    def bench_profiler_reset(self, with_stack: bool, table: bool) -> None:
        """Make the next ``start_profile`` build a new torch profiler, with Python stacks or not
        and with or without vLLM's table of ops by CUDA time. vLLM builds the worker's profiler on
        the first ``start_profile`` and reuses it (its settings and trace name) afterwards."""
        if self.profiler is not None:  # type: ignore[has-type]
            self.profiler.shutdown()  # type: ignore[has-type]  # stops it if it still runs
        self.profiler = None
        self.profiler_config = dataclasses.replace(self.profiler_config,  # type: ignore[has-type]
                                                   torch_profiler_with_stack=with_stack,
                                                   torch_profiler_dump_cuda_time_total=table)

    def bench_timer_start(self) -> bool:
        """Start timing; False when the runner has no FULL-graph replay to time (V1 model runner)."""
        runner = self.model_runner  # type: ignore[attr-defined]
        graphs = getattr(runner, "cudagraph_manager", None)
        if graphs is None or not hasattr(graphs, "run_fullgraph"):
            return False
        self._bench_events: dict[str, list[EventPair]] = {"forward": [], "lm_head": []}
        self._bench_tokens: list[int] = []
        self._bench_host: dict[str, list[tuple[float, float]]] = {key: [] for key in HOST_PHASES}
        self._bench_wrapped: dict[tuple[int, str], tuple[Any, str]] = {}
        self._bench_wrap(graphs, "run_fullgraph", lambda fn: self._bench_timed(fn, "forward"))
        self._bench_wrap(runner.model, "compute_logits", lambda fn: self._bench_timed(fn, "lm_head"))
        for key, path, name in HOST_PARTS:
            owner = runner
            for attribute in path:
                owner = getattr(owner, attribute, None)
            if callable(getattr(owner, name, None)):
                self._bench_wrap(owner, name, lambda fn, key=key: self._bench_host_timed(fn, key))
        self._bench_wrap(runner, "execute_model", lambda fn: self._bench_host_timed(fn, "host_execute"))
        self._bench_wrap(runner, "sample_tokens", lambda fn: self._bench_host_timed(fn, "host_sample"))
        return True

    def bench_timer_stop(self) -> dict[str, list[float]]:
        """Stop timing; milliseconds of each timed call (``forward``, ``lm_head``), of each step on
        the GPU's timeline (``period``: one replay's start to the next one's, so a step whose GPU
        waited for the host reads longer than its forward, lm_head and sampling) and the token
        count of each replayed graph (``graph_tokens``, padding included); on the host's clock, each
        call of ``HOST_PHASES`` and ``HOST_PARTS`` and each host step (``host_period``)."""
        for owner, name in self._bench_wrapped.values():
            delattr(owner, name)  # the class's method again
        torch.cuda.synchronize()
        times = {key: [start.elapsed_time(end) for start, end in pairs] for key, pairs in self._bench_events.items()}
        starts = [start for start, _ in self._bench_events["forward"]]
        period = [first.elapsed_time(then) for first, then in zip(starts, starts[1:])]
        host = {key: [(end - start) * 1e3 for start, end in spans] for key, spans in self._bench_host.items()}
        host_starts = [start for start, _ in self._bench_host["host_execute"]]
        host_period = [(then - first) * 1e3 for first, then in zip(host_starts, host_starts[1:])]
        return {**times, "period": period, "graph_tokens": [float(n) for n in self._bench_tokens],
                **host, "host_period": host_period}

    def _bench_wrap(self, owner: Any, name: str, wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Shadow ``owner.name`` with ``wrapper`` of what it is now (a method may be wrapped twice:
        one ``delattr`` at stop removes both)."""
        setattr(owner, name, wrapper(getattr(owner, name)))
        self._bench_wrapped[id(owner), name] = (owner, name)

    def _bench_timed(self, fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if key == "forward":
                self._bench_tokens.append(args[0].num_tokens)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self._bench_events[key].append((start, end))
            return out

        return timed

    def _bench_host_timed(self, fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        """``fn`` timed on the host's clock into ``key`` (its start and end); an asynchronous output
        that ``sample_tokens`` returns gets its ``get_output`` (the engine's blocking wait for the
        step) timed too."""
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self._bench_host.setdefault(key, []).append((start, time.perf_counter()))
            if key == "host_sample" and callable(getattr(out, "get_output", None)):
                out.get_output = self._bench_host_timed(out.get_output, "host_output_wait")
            return out

        return timed
