"""The megakernels planned and built while vLLM loads the model (``integration/early_build.py``):
the kernels the background builds compile are the ones the first decode step needs, its plans are
taken there (``integration/plan_reuse.py``), and failures, hangs and a missing nvcc reach the
first decode step as they would without the early build. No nvcc runs: the builds are recorded."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers import model_spec
from tests.test_integration_model import vllm_cpu  # noqa: F401 (a fixture)
from vllm_mpk.codegen.jit import BuildError, BuildTimeoutError, JitSpec
from vllm_mpk.codegen.toolchain import ToolchainError, has_nvshmem
from vllm_mpk.graph.ir import Role
from vllm_mpk.integration import early_build
from vllm_mpk.integration.early_build import EarlyBuild, block_table_tokens, declare_plans, nvcc_builds_here
from vllm_mpk.integration.options import MpkOptions, plan_batches
from vllm_mpk.integration.plan_reuse import difference, widen_kv_caches
from vllm_mpk.models.catalog import shipped_config
from vllm_mpk.models.decoder import DecodeOptions, declare_decoder
from vllm_mpk.models.spec import ModelSpec
from vllm_mpk.models.weights import expected_shapes
from vllm_mpk.runtime.megakernel import build_kernels, kernel_spec

META = torch.device("meta")
PAGE, WORKERS, MAX_REQS = 16, 132, 256


@pytest.fixture
def log_lines() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("vllm.mpk")
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[JitSpec]:
    """Every spec built or loaded, in place of nvcc and the cache: nothing is cached."""
    built: list[JitSpec] = []
    monkeypatch.setattr(JitSpec, "try_load", lambda self: None)
    monkeypatch.setattr(JitSpec, "build", lambda self: built.append(self))
    monkeypatch.setattr(JitSpec, "load", lambda self: built.append(self))
    return built


def vllm_weights(spec: ModelSpec, world: int) -> dict[str, torch.Tensor]:
    return {n: torch.empty(s, dtype=torch.bfloat16, device=META) for n, s in expected_shapes(spec.shard(world)).items()}


def options_by_size(max_batch: int, max_seq_len: int, world: int = 1, rank: int = 0) -> dict[int, DecodeOptions]:
    """What the runtime passes for each plan (``MpkRuntime._decode_options``)."""
    return {size: MpkOptions().decode_options(batch=size, max_seq_len=max_seq_len, page_size=PAGE,
                                              num_workers=WORKERS, world_size=world, rank=rank,
                                              logits=world == 1)
            for size in plan_batches(max_batch)}


def first_decode_bindings(spec: ModelSpec, world: int, options: DecodeOptions, num_blocks: int,
                          weights: dict[str, torch.Tensor], rope: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor]]:
    """The layers the first decode step declares for one size and what it binds them to: vLLM's
    KV cache of ``num_blocks`` (FlashAttention's NHD layout, seen as heads-major) and leading-row
    views of its persistent step buffers."""
    local = spec.shard(world)
    caches = [torch.empty(num_blocks, PAGE, local.num_kv_heads, 2 * spec.head_dim, dtype=torch.bfloat16,
                          device=META).permute(0, 2, 1, 3) for _ in range(spec.num_layers)]
    layers = declare_decoder(spec, weights, caches, options, rope_cache=rope)
    width = options.max_seq_len // PAGE
    buffers = {"input_ids": torch.empty(MAX_REQS, dtype=torch.int32, device=META),
               "positions": torch.empty(MAX_REQS, dtype=torch.int64, device=META),
               "seq_lens": torch.empty(MAX_REQS, dtype=torch.int32, device=META),
               "slot_mapping": torch.empty(MAX_REQS, dtype=torch.int64, device=META),
               "block_tables": torch.empty(MAX_REQS, width, dtype=torch.int32, device=META)}
    step = {n: b[:options.max_batch] for n, b in buffers.items()}
    return layers, {**layers.kernel.attached, **step}


@pytest.mark.parametrize("name,world,rank,max_batch", [
    ("qwen3-0.6b", 1, 0, 8),
    ("llama-3.2-1b", 1, 0, 8),
    pytest.param("llama-3.2-1b", 2, 1, 2, marks=pytest.mark.skipif(not has_nvshmem(), reason="needs NVSHMEM")),
])
def test_the_background_builds_compile_the_first_decode_steps_kernels(name: str, world: int, rank: int,
                                                                      max_batch: int, builds: list[JitSpec]) -> None:
    """At every plan batch: the spec the background build compiles has the name and content hash
    of the one the first decode step builds from a fresh plan, and the early plan, widened to the
    KV cache vLLM allocated, gives that step the same source and task table."""
    spec = ModelSpec.from_hf_config(shipped_config(name))
    weights = vllm_weights(spec, world)
    rope = torch.empty(4096, spec.head_dim, dtype=torch.bfloat16, device=META)
    options = options_by_size(max_batch, 4096, world, rank)
    early = EarlyBuild(declare_plans(spec, options, weights, rope), kernels=True)
    assert early.join_builds()
    early_specs = {s.name: s.content_hash() for s in builds}
    compiled = early.plans()
    assert sorted(compiled) == list(plan_batches(max_batch)) and len(early_specs) == len(compiled)

    builds.clear()
    for size, o in options.items():
        layers, bindings = first_decode_bindings(spec, world, o, 5000, weights, rope)
        fresh = layers.kernel.compile()
        build_kernels([(fresh, bindings)])
        assert {s.name: s.content_hash() for s in builds} == {builds[0].name: early_specs[builds[0].name]}, size
        builds.clear()
        assert difference(early.layers[size], layers, compiled[size]) is None
        reused = widen_kv_caches(compiled[size], layers)
        bound = {**bindings, **{n: torch.empty(h.shape, dtype=h.dtype, device=META)
                                for n, h in fresh.tensors.items() if h.role is not Role.INPUT}}
        (want, want_table), (got, got_table) = kernel_spec(fresh, bound), kernel_spec(reused, bound)
        assert (got.name, got.content_hash()) == (want.name, want.content_hash())
        assert np.array_equal(got_table, want_table), size
        assert {n: h.shape for n, h in reused.tensors.items()} == {n: h.shape for n, h in fresh.tensors.items()}


def tiny_layers(max_batch: int = 2, max_seq_len: int = 256) -> dict[int, Any]:
    spec = model_spec("qwen3-0.6b", 2)
    rope = torch.empty(256, spec.head_dim, dtype=torch.bfloat16, device=META)
    return declare_plans(spec, options_by_size(max_batch, max_seq_len), vllm_weights(spec, 1), rope)


def test_a_plan_of_other_geometry_is_not_taken() -> None:
    """vLLM's block table turned out wider than the early guess: the first decode step plans again."""
    spec = model_spec("qwen3-0.6b", 2)
    early = EarlyBuild(tiny_layers(max_seq_len=256), kernels=False)
    plan = early.plans()[1]
    o = options_by_size(1, 512)[1]
    rope = torch.empty(256, spec.head_dim, dtype=torch.bfloat16, device=META)
    layers, _ = first_decode_bindings(spec, 1, o, 40, vllm_weights(spec, 1), rope)
    problem = difference(early.layers[1], layers, plan)
    assert problem == "plan options max_seq_len 256 -> 512"


def test_block_table_width_follows_the_model_runner() -> None:
    """V1: ``max_model_len`` in pages (vLLM's ``max_num_blocks_per_req``); V2 rounds rows to 128 tokens."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    def config(max_model_len: int, v2: bool) -> Any:
        return SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_model_len), use_v2_model_runner=v2,
                               parallel_config=SimpleNamespace(decode_context_parallel_size=1))

    v1_rows = FullAttentionSpec(block_size=PAGE, num_kv_heads=1, head_size=64, dtype=torch.bfloat16)
    assert block_table_tokens(config(1000, False), PAGE) == v1_rows.max_num_blocks_per_req(config(1000, False), 1000) * PAGE
    assert block_table_tokens(config(1000, False), PAGE) == 1008
    assert block_table_tokens(config(1000, True), PAGE) == 1024
    assert block_table_tokens(config(1000, True), 256) == 1024
    assert block_table_tokens(config(40960, True), PAGE) == 40960


def test_cached_kernels_start_no_build(monkeypatch: pytest.MonkeyPatch, log_lines: list[logging.LogRecord]) -> None:
    monkeypatch.setattr(JitSpec, "try_load", lambda self: object())
    monkeypatch.setattr(JitSpec, "build", lambda self: pytest.fail("a cached kernel was built"))
    early = EarlyBuild(tiny_layers(), kernels=True)
    assert early.join_builds()
    assert not [r for r in log_lines if r.levelno >= logging.INFO]


def test_progress_is_logged_once_at_start_and_end(builds: list[JitSpec], log_lines: list[logging.LogRecord]) -> None:
    early = EarlyBuild(tiny_layers(max_batch=2), kernels=True)
    assert early.join_builds() and len(builds) == 2
    for thread in threading.enumerate():
        if thread.name == "mpk-early-build":
            thread.join(10)  # the reporter, after the last build
    lines = [r.getMessage() for r in log_lines if r.levelno >= logging.INFO]
    assert len(lines) == 2, lines
    assert "compiling 2 megakernels (decode batches of 1/2) with nvcc in the background" in lines[0]
    assert "nvcc built 2 megakernels in" in lines[1]


def test_a_failed_build_reaches_the_first_decode_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(JitSpec, "try_load", lambda self: None)

    def fail(self: JitSpec) -> None:
        raise BuildError(f"nvcc failed building {self.name}")

    monkeypatch.setattr(JitSpec, "build", fail)
    early = EarlyBuild(tiny_layers(), kernels=True)
    with pytest.raises(BuildError, match="nvcc failed building mpk_"):
        early.join_builds()


def test_a_build_that_never_ends_is_given_up(monkeypatch: pytest.MonkeyPatch, log_lines: list[logging.LogRecord]) -> None:
    """The wait is bounded by the build timeout and the build threads are daemons: nothing,
    shutdown included, waits for a hung nvcc."""
    release = threading.Event()
    monkeypatch.setattr(JitSpec, "try_load", lambda self: None)
    monkeypatch.setattr(JitSpec, "build", lambda self: release.wait())
    early = EarlyBuild(tiny_layers(max_batch=1), kernels=True)
    assert early.plans()  # compiled; its build is running
    monkeypatch.setenv("VLLM_MPK_BUILD_TIMEOUT_S", "0.2")
    try:
        with pytest.raises(BuildTimeoutError, match="did not finish within 0.6 s"):
            early.join_builds()
        assert any("waiting for the background nvcc builds (1 of 1" in r.getMessage() for r in log_lines)
        assert all(t.daemon for t in threading.enumerate() if t.name == "mpk-early-build")
    finally:
        release.set()


def test_a_plan_that_fails_to_compile_is_planned_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_mpk.api import PersistentKernel

    def fail(self: Any) -> None:
        raise ValueError("an invalid graph")

    layers = tiny_layers()
    monkeypatch.setattr(PersistentKernel, "compile", fail)
    early = EarlyBuild(layers, kernels=True)
    assert early.plans() == {} and not early.join_builds()


def test_no_nvcc_no_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise ToolchainError("nvcc not found")

    assert nvcc_builds_here()  # this machine has nvcc and no GPU
    monkeypatch.setenv("VLLM_MPK_NO_BUILD", "1")
    assert not nvcc_builds_here()
    monkeypatch.delenv("VLLM_MPK_NO_BUILD")
    monkeypatch.setenv("VLLM_MPK_BUILD_TIMEOUT_S", "never")
    assert not nvcc_builds_here()
    monkeypatch.delenv("VLLM_MPK_BUILD_TIMEOUT_S")
    monkeypatch.setattr(early_build, "find_nvcc", missing)
    assert not nvcc_builds_here()
    early = EarlyBuild(tiny_layers(), kernels=False)
    assert sorted(early.plans()) == [1, 2] and not early.join_builds()


# the runtime under vLLM, on the CPU ----------------------------------------------------------


def test_the_first_decode_step_takes_the_early_plans(vllm_cpu: None, tmp_path: Path,  # noqa: F811
                                                      log_lines: list[logging.LogRecord]) -> None:
    """A model whose early guess of vLLM's geometry holds decodes through the plans compiled at
    model load, exactly as a model that plans at its first decode step."""
    from tests.test_integration_model import MAX_REQS as RUNNER_REQS
    from tests.test_integration_model import PAGE as RUNNER_PAGE
    from tests.test_integration_model import Runner, build_model

    outputs = []
    for early in (True, False):
        built = build_model(tmp_path, "qwen3")
        runtime = built.model._mpk
        # vLLM's CPU platform pages by 128 unless told; the runner pages by 16, as vLLM on a GPU.
        built.vllm_config.cache_config.block_size = RUNNER_PAGE
        runtime.reserve(built.model, torch.device("cpu"))
        compiled = runtime.early.plans() if early else {}
        if not early:
            runtime.early = None
        runner = Runner(built, [[1], [4, 2], [7]])
        width = block_table_tokens(built.vllm_config, RUNNER_PAGE) // RUNNER_PAGE
        runner.block_table = torch.zeros(RUNNER_REQS, width, dtype=torch.int32)
        steps = [runner.step([(0, 5, 0), (1, 9, 16)], 2).clone(), runner.step([(0, 6, 1)], 1).clone(),
                 runner.step([(0, 7, 2), (1, 3, 17), (2, 8, 0)], 4)[:3].clone()]  # the padded row is not computed
        if early:
            assert sorted(runtime.kernels) == sorted(compiled)
            assert all(runtime.kernels[b].plan is compiled[b] for b in compiled)
        outputs.append(steps)
    assert not any("planning again" in r.getMessage() for r in log_lines)
    for got, want in zip(*outputs, strict=True):
        assert torch.equal(got, want)



def test_exit_takes_a_background_builds_nvcc_along(tmp_path: Path) -> None:
    """A build thread is a daemon, so an exiting engine does not wait for it; its nvcc must not
    outlive the process either."""
    from vllm_mpk.codegen import jit

    outcome: dict[str, bool] = {}
    with open(tmp_path / "build.log", "w") as log:
        thread = threading.Thread(target=lambda: outcome.update(ok=jit._run_all(
            log, tmp_path, [["sleep", "600"]], time.monotonic() + 600, "mpk_test")), daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not jit._running and time.monotonic() < deadline:
            time.sleep(0.01)
        running = list(jit._running)
        jit._kill_running_builds()
        thread.join(30)
    assert len(running) == 1 and running[0].poll() is not None
    assert outcome == {"ok": False} and not jit._running


def test_a_failed_background_build_falls_back_at_the_first_decode_step(
        vllm_cpu: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        log_lines: list[logging.LogRecord]) -> None:
    """nvcc failed in the background: the first decode step reports it as a failed build (one
    warning, the traceback logged) and vLLM's stock layers serve the batch."""
    from tests.test_integration_model import PAGE as RUNNER_PAGE
    from tests.test_integration_model import Runner, build_model

    built = build_model(tmp_path, "llama")
    runtime = built.model._mpk
    built.vllm_config.cache_config.block_size = RUNNER_PAGE
    runtime.reserve(built.model, torch.device("cpu"))

    def fail(self: JitSpec) -> None:
        raise BuildError(f"nvcc failed building {self.name}")

    monkeypatch.setattr(JitSpec, "try_load", lambda self: None)
    monkeypatch.setattr(JitSpec, "build", fail)
    runtime.early = EarlyBuild(runtime.early.layers, kernels=True)  # as on a GPU host with nvcc
    stock = type(built.model).__mro__[2]
    monkeypatch.setattr(stock, "forward", lambda self, input_ids, positions, *args, **kwargs: torch.zeros(
        positions.shape[0], built.spec.hidden_size))
    runner = Runner(built, [[1]])
    runner.block_table = torch.zeros(runner.block_table.shape[0], block_table_tokens(
        built.vllm_config, RUNNER_PAGE) // RUNNER_PAGE, dtype=torch.int32)
    runner.step([(0, 5, 0)], 1)
    assert "building the megakernel failed: BuildError: nvcc failed building mpk_" in (runtime.disabled or "")
    assert runtime.steps == 0 and runtime.reservation is None and not runtime.kernels
    warnings = [r for r in log_lines if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "the megakernel is off" in warnings[0].getMessage()
