"""``vllm-mpk bench --profile-dir`` without a GPU: vLLM's profiler settings, the profiling passes
against a stand-in ``LLM`` that writes a synthetic trace, their analysis, the worker extension's
profiler reset and engine info, and the command's arguments."""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.test_bench_trace import EVENTS
from vllm_mpk import cli
from vllm_mpk.bench.profiling import analyze_profiles, engine_profile_dir, profile_engine, profile_passes
from vllm_mpk.bench.step_timer import HOST_PARTS, StepTimer
from vllm_mpk.bench.worker import EngineConfig, configs_from_json, engine_kwargs

INFO = {"model": "qwen3-0.6b", "impl": "mpk", "batch": 8, "prompt_len": 128, "async_scheduling": True,
        "attention_backend": "FLASH_ATTN", "model_runner": "GPUModelRunner", "cudagraph_mode": "FULL_DECODE_ONLY"}


class FakeLLM:
    """What ``profile_engine`` uses of ``vllm.LLM``; ``stop_profile`` writes what vLLM's worker does."""

    def __init__(self, directory: Path, fail_stop: bool = False):
        self.directory, self.fail_stop, self.calls, self.prefix = directory, fail_stop, [], ""

    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        self.calls.append((method, *args))
        return [None]

    def start_profile(self, profile_prefix: str) -> None:
        self.calls.append(("start", profile_prefix))
        self.prefix = profile_prefix

    def stop_profile(self) -> None:
        self.calls.append(("stop",))
        if self.fail_stop:
            raise RuntimeError("engine core died")
        trace = self.directory / f"{self.prefix}_dp0_pp0_tp0_dcp0_ep0_rank0.1700000000.pt.trace.json.gz"
        trace.write_bytes(gzip.compress(json.dumps({"traceEvents": EVENTS}).encode()))
        (self.directory / "profiler_out_0.txt").write_text("table")


def test_engine_profiler_settings() -> None:
    cfg = EngineConfig("qwen3-0.6b", "mpk", batches=(1, 8), profile_dir="/p", profile_tokens=16,
                       profile_stack_tokens=0)
    assert configs_from_json(json.dumps(asdict(cfg))) == [cfg]
    config = engine_kwargs(cfg, Path("/m"))["profiler_config"]
    assert config["profiler"] == "torch" and config["torch_profiler_dir"] == "/p/qwen3-0.6b-mpk"
    assert not config["torch_profiler_with_stack"] and config["torch_profiler_use_gzip"]
    assert "profiler_config" not in engine_kwargs(EngineConfig("qwen3-0.6b", "vllm"), Path("/m"))
    assert [(p.name, p.tokens, p.with_stack) for p in profile_passes(24, 12)] == [("ops", 24, False),
                                                                                  ("stack", 12, True)]
    assert [p.name for p in profile_passes(24, 0)] == ["ops"]


def test_profile_engine_writes_traces_record_and_analysis(tmp_path: Path) -> None:
    directory = engine_profile_dir(tmp_path, "qwen3-0.6b", "mpk")
    llm = FakeLLM(directory)
    seen: list[int] = []

    def generate(tokens: int) -> dict[str, Any]:
        seen.append(tokens)
        return {"forward_ms": 1.6, "lm_head_ms": 0.12, "graph_tokens": [8]}

    record = profile_engine(llm, directory, INFO, profile_passes(24, 12), generate)
    assert seen == [24, 12]
    assert llm.calls == [("bench_profiler_reset", False, True), ("start", "qwen3-0.6b-mpk-b8-ops"), ("stop",),
                         ("bench_profiler_reset", True, False), ("start", "qwen3-0.6b-mpk-b8-stack"), ("stop",)]
    ops, stack = record["passes"]
    assert ops["forward_ms"] == 1.6 and "error" not in ops and "warning" not in ops
    assert list(ops["traces"]) == ["qwen3-0.6b-mpk-b8-ops_dp0_pp0_tp0_dcp0_ep0_rank0.1700000000.pt.trace.json.gz"]
    assert json.loads((directory / "profile.json").read_text()) == record
    assert (directory / "qwen3-0.6b-mpk-b8-stack.profiler_out_0.txt").read_text() == "table"
    text = analyze_profiles([directory, tmp_path / "qwen3-0.6b-vllm"])
    assert text.startswith("== qwen3-0.6b mpk, batch 8: async_scheduling True, attention_backend FLASH_ATTN")
    assert "[ops pass, 24 tokens, forward 1.600 ms, lm_head 0.120 ms by CUDA events]" in text
    assert text.count("2 decode steps of 3") == 2 and "no profile.json" in text
    analysis = directory / "qwen3-0.6b-mpk-b8-ops_dp0_pp0_tp0_dcp0_ep0_rank0.1700000000.analysis.txt"
    assert "175 us idle after" in analysis.read_text()


def test_a_failed_pass_is_recorded(tmp_path: Path) -> None:
    def generate(tokens: int) -> dict[str, Any]:
        raise ValueError("step failed")

    record = profile_engine(FakeLLM(tmp_path, fail_stop=True), tmp_path, INFO, profile_passes(24, 0), generate)
    (ops,) = record["passes"]
    assert ops["error"] == "RuntimeError: engine core died (after ValueError: step failed)" and ops["traces"] == {}
    assert "ops pass: RuntimeError: engine core died" in analyze_profiles([tmp_path])


def test_worker_profiles_its_largest_batch(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    from vllm_mpk.bench import worker

    class LLM(FakeLLM):  # a model runner without the step timer: the profiled passes still generate
        generated: list[tuple[int, int]] = []

        def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
            super().collective_rpc(method, args)
            return [False if method == "bench_timer_start" else None]

        def generate(self, prompts: list, params: Any, use_tqdm: bool) -> None:
            self.generated.append((len(prompts), params.max_tokens))

    cfg = EngineConfig("qwen3-0.6b", "vllm", batches=(1, 8), profile_dir=str(tmp_path), profile_tokens=16)
    directory = tmp_path / "qwen3-0.6b-vllm"
    directory.mkdir()
    llm = LLM(directory)
    worker.profile(llm, cfg, {k: INFO[k] for k in ("async_scheduling", "attention_backend")}, vocab=1000)
    assert llm.generated == [(8, 16), (8, 12)]
    record = json.loads((directory / "profile.json").read_text())
    assert (record["batch"], record["impl"], record["async_scheduling"]) == (8, "vllm", True)
    assert [p["forward_ms"] for p in record["passes"]] == [None, None] and "generate_s" in record["passes"][0]


class Worker(StepTimer):
    """The attributes of vLLM's GPU worker that the extension reads."""

    def __init__(self) -> None:
        from vllm.config import ProfilerConfig

        backend = SimpleNamespace(get_name=lambda: "FLASH_ATTN")
        self.model_runner = SimpleNamespace(attn_groups=[[SimpleNamespace(backend=backend)] * 2])
        self.vllm_config = SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=True),
                                           compilation_config=SimpleNamespace(cudagraph_mode="FULL_DECODE_ONLY"),
                                           cache_config=SimpleNamespace(num_gpu_blocks=25488))
        self.profiler_config = ProfilerConfig(profiler="torch", torch_profiler_dir="/p", torch_profiler_with_stack=False)
        self.profiler = SimpleNamespace(shutdown=lambda: setattr(self, "shut", True))


def test_worker_extension_resets_the_profiler_and_reports_settings() -> None:
    pytest.importorskip("vllm")
    worker = Worker()
    worker.bench_profiler_reset(True, False)
    assert worker.profiler is None and worker.shut
    assert worker.profiler_config.torch_profiler_with_stack and not worker.profiler_config.torch_profiler_dump_cuda_time_total
    assert worker.profiler_config.torch_profiler_dir == "/p"
    assert worker.bench_engine_info() == {"async_scheduling": True, "attention_backend": "FLASH_ATTN",
                                          "model_runner": "SimpleNamespace", "cudagraph_mode": "FULL_DECODE_ONLY",
                                          "kv_blocks": 25488}


def test_bench_profile_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[EngineConfig] = []
    monkeypatch.setattr(cli, "bench_unavailable_reason", lambda: None)
    monkeypatch.setattr(cli, "run_engines", lambda configs, *args, **kwargs: seen.extend(configs) or [])
    common = ["bench", "--models", "qwen3-0.6b", "--batches", "1", "8", "--rows", str(tmp_path / "r.jsonl"),
              "--results", str(tmp_path / "RESULTS.md")]
    assert cli.main([*common, "--profile-dir", str(tmp_path / "prof"), "--profile-tokens", "16"]) == 0
    # the floor engine is profiled too: its trace is vLLM's host step beside a one-layer forward
    assert [(c.impl, c.profile_dir, c.profile_tokens, c.profile_stack_tokens) for c in seen] == [
        (impl, str(tmp_path / "prof"), 16, 12) for impl in ("vllm", "mpk", "floor")]
    assert "qwen3-0.6b-mpk: no profile.json" in capsys.readouterr().out
    seen.clear()
    assert cli.main(common) == 0 and all(c.profile_dir is None for c in seen)
    assert cli.main([*common, "--profile-dir", "p", "--profile-tokens", "1"]) == 2
    assert "--profile-tokens must be 2 to --new-tokens" in capsys.readouterr().err


class Stamp:
    """A CUDA event stand-in recorded at ``ms`` on the GPU's timeline."""

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def elapsed_time(self, then: Stamp) -> float:
        return then.ms - self.ms


class FakeGraphs:
    def run_fullgraph(self, desc: Any) -> str:
        return "hidden"


class FakeModel:
    def compute_logits(self, hidden: Any) -> str:
        return "logits"


class FakeModelState:
    def prepare_attn(self, *args: Any) -> str:
        return "metadata"


class FakeRunner:
    """The Model Runner V2 methods that the step timer wraps (class methods, as in vLLM)."""

    def __init__(self) -> None:
        self.cudagraph_manager, self.model, self.model_state = FakeGraphs(), FakeModel(), FakeModelState()

    def execute_model(self) -> str:
        return "execute_model"

    def sample_tokens(self) -> str:
        return "sample_tokens"

    def prepare_inputs(self) -> str:
        return "prepare_inputs"

    def prepare_attn(self) -> str:
        return "prepare_attn"

    def sample(self) -> str:
        return "sample"

    def postprocess_sampled(self) -> str:
        return "postprocess_sampled"

    def step(self) -> None:
        """The calls of one decode step (the real ones nest; the order suffices here)."""
        for call in (self.execute_model, self.prepare_inputs, self.prepare_attn, self.model_state.prepare_attn,
                     self.sample_tokens, self.sample, self.postprocess_sampled):
            call()
        self.cudagraph_manager.run_fullgraph(SimpleNamespace(num_tokens=8))
        self.model.compute_logits("hidden")


def test_step_timer_reports_each_step_period(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three replays starting at 0, 7 and 15 ms: periods 7 and 8 ms, each forward 5 ms; every call
    it wraps is timed on the host's clock, what they return passes through, and the wrappers are
    removed again."""
    import torch

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "Event", lambda enable_timing: SimpleNamespace(record=lambda: None))
    timer = StepTimer()
    runner = timer.model_runner = FakeRunner()  # type: ignore[attr-defined]
    assert timer.bench_timer_start()
    assert "execute_model" in vars(runner) and "prepare_attn" in vars(runner.model_state)
    for _ in range(3):
        runner.step()
    assert runner.model.compute_logits("h") == "logits" and runner.sample() == "sample"
    timer._bench_events = {"forward": [(Stamp(t), Stamp(t + 5)) for t in (0, 7, 15)],
                           "lm_head": [(Stamp(5.5), Stamp(6.0))]}
    timer._bench_host["host_execute"] = [(10.0, 10.0003), (10.002, 10.0023), (10.005, 10.0053)]
    times = timer.bench_timer_stop()
    host = {key: times.pop(key) for key in list(times) if key.startswith("host_")}
    assert times == {"forward": [5, 5, 5], "lm_head": [0.5], "period": [7, 8], "graph_tokens": [8.0, 8.0, 8.0]}
    assert host["host_execute"] == pytest.approx([0.3] * 3) and host["host_period"] == pytest.approx([2.0, 3.0])
    assert set(host) == {"host_execute", "host_sample", "host_output_wait", "host_period",
                         *(key for key, _, _ in HOST_PARTS)}
    assert len(host["host_attn_metadata"]) == 3 and len(host["host_compute_logits"]) == 4
    assert host["host_output_wait"] == []  # sample_tokens returned no asynchronous output
    assert set(vars(runner)) == {"cudagraph_manager", "model", "model_state"}  # the class's methods again
    assert not vars(runner.cudagraph_manager) and not vars(runner.model) and not vars(runner.model_state)


def test_step_timer_times_the_hosts_phases_and_its_wait_for_each_step() -> None:
    """The runner's execute_model and sample_tokens are timed on the host's clock, and so is the
    engine's later wait in the asynchronous output's get_output; what they return passes through."""
    class AsyncOutput:
        def get_output(self) -> str:
            time.sleep(0.02)  # the host blocked until the GPU finished the step
            return "tokens"

    timer = StepTimer()
    timer._bench_host = {"host_execute": [], "host_sample": [], "host_output_wait": []}
    execute = timer._bench_host_timed(lambda scheduled: f"ran {scheduled}", "host_execute")
    sample = timer._bench_host_timed(lambda grammar: AsyncOutput(), "host_sample")
    assert execute("step") == "ran step"
    out = sample(None)
    assert timer._bench_host["host_output_wait"] == [] and out.get_output() == "tokens"
    assert len(timer._bench_host["host_execute"]) == len(timer._bench_host["host_sample"]) == 1
    (start, end), = timer._bench_host["host_output_wait"]
    assert end - start >= 0.02


def test_step_times_give_the_median_period_and_its_tail() -> None:
    pytest.importorskip("vllm")
    from vllm_mpk.bench import worker

    periods = [7.0] * 9 + [9.0]

    class LLM:
        def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
            stop = {"forward": [6.4] * 10 + [7.5], "lm_head": [0.4] * 11, "period": periods,
                    "graph_tokens": [8.0] * 11, "host_output_wait": [0.1, 0.3, 0.2]}
            return [True if method == "bench_timer_start" else stop]

        def generate(self, prompts: list, params: Any, use_tqdm: bool) -> None:
            pass

    (times,) = worker.step_times_ms([LLM()], [{"prompt_token_ids": [1]}], 12)
    assert (times["forward_ms"], times["period_ms"], times["period_p90_ms"], times["graph_tokens"]) == (6.4, 7.0, 7.0, [8])
    assert times["host_output_wait_ms"] == 0.2 and times["host_period_ms"] is None  # a phase it did not report
    assert times["forward_mean_ms"] == pytest.approx(6.5) and times["period_mean_ms"] == pytest.approx(7.2)
    periods[-2:] = [9.0, 9.5]
    assert worker.step_times_ms([LLM()], [{"prompt_token_ids": [1]}], 12)[0]["period_p90_ms"] == 9.0


def test_step_times_merge_the_engines_generations_taken_in_turn() -> None:
    pytest.importorskip("vllm")
    from vllm_mpk.bench import worker

    order: list[str] = []

    class LLM:
        def __init__(self, name: str) -> None:
            self.name, self.generations = name, 0

        def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
            if method == "bench_timer_start":
                order.append(self.name)
                return [True]
            self.generations += 1
            return [{"period": [7.0 if self.generations == 1 else 9.0] * 10, "host_period": [2.0] * 5}]

        def generate(self, prompts: list, params: Any, use_tqdm: bool) -> None:
            pass

    a, b = worker.step_times_ms([LLM("a"), LLM("b")], [{"prompt_token_ids": [1]}], 12, generations=3)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert a["period_ms"] == 9.0 and a["period_mean_ms"] == pytest.approx(25 / 3)  # 10 periods of 7, 20 of 9
    assert b["host_period_ms"] == 2.0 and b["forward_ms"] is None


def test_an_mpk_engine_that_never_built_gets_an_error_row_not_a_crash() -> None:
    """Side by side, the other engines' rows of the batch still count: the refusal is one row."""
    pytest.importorskip("vllm")
    from vllm_mpk.bench import worker

    state = {"class": "MpkQwen3ForCausalLM", "built": False, "disabled": "no GPU", "stock": [], "steps": 0}
    llm = SimpleNamespace(collective_rpc=lambda method: [state])
    engine = worker.Engine(EngineConfig("qwen3-0.6b", "mpk"), llm, 1.0, "H100", {})
    row = worker.measured_row(engine, 8, [2.0], {}, side_by_side=2)
    assert (row["impl"], row["batch"]) == ("mpk", 8) and "never built its megakernel" in row["error"]
    state["built"] = True
    info = {"async_scheduling": True, "attention_backend": "FLASH_ATTN", "kv_blocks": 100}
    engine = worker.Engine(EngineConfig("qwen3-0.6b", "mpk"), llm, 1.0, "H100", info)
    row = worker.measured_row(engine, 8, [2.0, 3.0, 2.5], {"forward_ms": 1.2}, side_by_side=2)
    assert "error" not in row and row["tpot_ms"] == 2.5 and row["side_by_side"] == 2 and row["forward_ms"] == 1.2
