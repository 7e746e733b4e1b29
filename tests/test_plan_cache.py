"""The plan cache (``codegen/plan_cache.py``): a restart takes the plans, record layouts and task
tables the first start stored, compiles none of them, and launches exactly what a fresh compile
gives; an entry of another declaration, or one that changed on disk, is not taken."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers import REPO, model_spec
from tests.test_integration_early_build import (
    first_decode_bindings,
    log_lines,  # noqa: F401 (a fixture)
    options_by_size,
    vllm_weights,
)
from tests.test_integration_model import vllm_cpu  # noqa: F401 (a fixture)
from vllm_mpk.codegen import plan_cache
from vllm_mpk.codegen.jit import JitSpec, package_version
from vllm_mpk.codegen.tables import PrefetchPolicy
from vllm_mpk.graph.ir import Role
from vllm_mpk.graph.plan import Plan, PlanCounts
from vllm_mpk.integration.early_build import EarlyBuild, compile_plan, declare_plans
from vllm_mpk.integration.plan_reuse import difference, kv_cache_names, widen_kv_caches
from vllm_mpk.models.decoder import DecodeLayers
from vllm_mpk.runtime.megakernel import bind_tensors, kernel_spec, kernel_table

META = torch.device("meta")
SPEC = model_spec("qwen3-0.6b", 2)
OPTIONS = options_by_size(2, 256)  # plans for decode batches of 1 and 2
NUM_BLOCKS = 40  # vLLM's KV cache; the early declaration has placeholders of one block
# What compiling a plan or building a task table calls, by module: none of it may run on a restart.
COMPILING = {"vllm_mpk.graph.plan": ("lower_ops",), "vllm_mpk.integration.memory": ("lower_ops",),
             "vllm_mpk.integration.early_build": ("all_args",),
             "vllm_mpk.runtime.megakernel": ("all_args", "task_table")}
CHILD = "from tests.test_plan_cache import launch_data, start\nlaunch_data(start())\n"

Started = dict[int, tuple[Plan, DecodeLayers, dict[str, torch.Tensor]]]


def early_layers() -> dict[int, DecodeLayers]:
    return declare_plans(SPEC, OPTIONS, vllm_weights(SPEC, 1), rope())


def rope() -> torch.Tensor:
    return torch.empty(256, SPEC.head_dim, dtype=torch.bfloat16, device=META)


def bound(plan: Plan, given: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``given`` and a meta tensor for each tensor the plan allocates itself."""
    return {**given, **{n: torch.empty(h.shape, dtype=h.dtype, device=META)
                        for n, h in plan.tensors.items() if h.role is not Role.INPUT}}


def start(num_blocks: int = NUM_BLOCKS) -> Started:
    """What a start of the runtime does with each plan before it launches: declare it while vLLM
    loads the model and take it from ``compile_plan``, then at the first decode step declare it on
    vLLM's tensors and widen it to vLLM's KV cache of ``num_blocks``. By batch size: the plan, the
    first step's layers and what the plan is bound to."""
    weights = vllm_weights(SPEC, 1)
    started = {}
    for size, early in declare_plans(SPEC, OPTIONS, weights, rope()).items():
        plan = compile_plan(early.kernel)
        now, bindings = first_decode_bindings(SPEC, 1, OPTIONS[size], num_blocks, weights, rope())
        assert difference(early, now, plan) is None
        plan = widen_kv_caches(plan, now)
        started[size] = (plan, now, bound(plan, bindings))
    return started


def launch_data(started: Started) -> dict[int, tuple[str, str, str, bytes]]:
    """By batch size: the kernel's name and content hash, and its task table's shape and bytes."""
    out = {}
    for size, (plan, _, tensors) in started.items():
        spec, table = kernel_spec(plan, tensors)
        out[size] = (spec.name, spec.content_hash(), f"{table.dtype}{table.shape}", table.tobytes())
    return out


def compiled_form(plan: Plan) -> list[Any]:
    """What a stop's description and the reference executor read of a compiled plan."""
    return [plan.queues, [(t.id, t.op.index, t.tile, t.worker, t.wait_events, t.signal_events, t.carried_events)
                          for t in plan.tasks], [(e.producers, e.consumers, e.lag) for e in plan.events]]


def count_compiling(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each call of a ``COMPILING`` function from now on, by name (each still runs)."""
    calls: list[str] = []

    def counted(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return f(*args, **kwargs)

        return call

    for module, names in COMPILING.items():
        for name in names:
            monkeypatch.setattr(f"{module}.{name}", counted(f"{module}.{name}", getattr(sys.modules[module], name)))
    return calls


def plans_folder(root: Path) -> Path:
    return root / package_version() / plan_cache.FOLDER


def test_a_restart_in_another_process_launches_what_a_fresh_compile_gives(plan_cache_root: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The first start runs in a child process with another hash seed; this process restarts, with
    a KV cache of other size (vLLM sizes it after profiling): nothing is compiled, and the kernel
    sources and task tables are byte for byte those of plans compiled afresh. A restored plan's
    tasks, compiled once something reads them, are the fresh plan's too."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_MPK_CACHE_DIR": str(plan_cache_root), "PYTHONHASHSEED": "0"}
    child = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    stored = sorted(p.name.split(".", 1)[1] for p in plans_folder(plan_cache_root).iterdir())
    assert stored == sorted(["plan.json", "plan.json.rec", "table.npy", "table.npy.rec"] * 2)

    calls = count_compiling(monkeypatch)
    restarted = start(num_blocks=3 * NUM_BLOCKS)
    restored = launch_data(restarted)
    assert calls == [] and not any(plan.compiled for plan, _, _ in restarted.values())

    fresh = {size: (now.kernel.compile(), now, tensors) for size, (_, now, tensors) in restarted.items()}
    assert calls and all(fresh[size][0].key is None for size in fresh)  # compiled, and nothing cached for it
    assert restored == launch_data(fresh)
    for size, (plan, _, _) in restarted.items():
        assert compiled_form(plan) == compiled_form(fresh[size][0]), size


def test_a_restart_under_vllm_compiles_nothing(vllm_cpu: None, tmp_path: Path,  # noqa: F811
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Two starts of the runtime on vLLM's CPU platform, each as on a GPU host whose build cache
    holds the kernels: the memory estimate, the plans compiled while vLLM loads the model and the
    first decode step's plans and task tables are all the plan cache's on the second. Both decode
    alike (through the reference executor, which compiles the restored plans' tasks)."""
    from tests.test_integration_model import PAGE as RUNNER_PAGE
    from tests.test_integration_model import Runner, build_model
    from vllm_mpk.integration.early_build import block_table_tokens
    from vllm_mpk.integration.model import MpkRuntime

    monkeypatch.setattr(JitSpec, "try_load", lambda self: object())
    calls = count_compiling(monkeypatch)
    load = MpkRuntime._load
    starts: list[dict[str, Any]] = []

    def loaded(runtime: MpkRuntime, planned: Any) -> dict[int, Any]:
        """The launch data a GPU would load, then the CPU executors (which compile the plans)."""
        starts[-1]["launch"] = {size: kernel_spec(plan, bind_tensors(plan, tensors, torch.device("cpu")))
                                for size, (plan, tensors) in planned.plans.items()}
        starts[-1]["compiled"] = [plan.compiled for plan, _ in planned.plans.values()]
        starts[-1]["calls"] = list(calls)
        return load(runtime, planned)

    monkeypatch.setattr(MpkRuntime, "_load", loaded)
    for _ in range(2):
        calls.clear()
        starts.append({})
        built = build_model(tmp_path, "qwen3")
        runtime = built.model._mpk
        built.vllm_config.cache_config.block_size = RUNNER_PAGE
        runtime.reserve(built.model, torch.device("cpu"))
        runtime.early = EarlyBuild(runtime.early.layers, kernels=True)  # as on a GPU host with nvcc
        runner = Runner(built, [[1], [4, 2]])
        width = block_table_tokens(built.vllm_config, RUNNER_PAGE) // RUNNER_PAGE
        runner.block_table = torch.zeros(runner.block_table.shape[0], width, dtype=torch.int32)
        starts[-1]["hidden"] = runner.step([(0, 5, 0), (1, 9, 16)], 2).clone()
        assert runtime.steps == 1 and runtime.disabled is None

    first, restart = starts
    assert first["calls"] and all(first["compiled"])
    assert restart["calls"] == [] and not any(restart["compiled"])
    assert sorted(restart["launch"]) == [1, 2, 4]
    for size, (spec, table) in restart["launch"].items():
        want_spec, want_table = first["launch"][size]
        assert (spec.name, spec.content_hash()) == (want_spec.name, want_spec.content_hash())
        assert table.tobytes() == want_table.tobytes() and table.shape == want_table.shape
    assert torch.equal(restart["hidden"], first["hidden"])


def test_a_changed_declaration_or_compiler_misses() -> None:
    stored = early_layers()
    for layers in stored.values():
        assert compile_plan(layers.kernel).compiled
        assert not compile_plan(layers.kernel).compiled  # the same declaration: restored
    wider = declare_plans(SPEC, options_by_size(2, 512), vllm_weights(SPEC, 1), rope())
    assert all(plan_cache.restore(layers.kernel) is None for layers in wider.values())
    assert plan_cache.cached_counts(wider[1].kernel) is None
    other_workers = declare_plans(SPEC, {1: replace(OPTIONS[1], num_workers=64)}, vllm_weights(SPEC, 1), rope())
    assert plan_cache.restore(other_workers[1].kernel) is None
    with pytest.MonkeyPatch.context() as mp:  # an edit to the compiler's source
        mp.setattr(plan_cache, "compiler_hash", lambda: "0" * 64)
        assert plan_cache.restore(stored[1].kernel) is None
    assert plan_cache.restore(stored[1].kernel) is not None


def test_a_table_of_other_strides_or_prefetch_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    plan, now, tensors = start()[1]
    first = kernel_table(plan, tensors)
    calls = count_compiling(monkeypatch)
    assert np.array_equal(kernel_table(plan, tensors), first) and calls == []
    no_prefetch = kernel_table(plan, tensors, PrefetchPolicy(cap_bytes=0))
    assert calls and not np.array_equal(no_prefetch, first)
    calls.clear()
    cache = sorted(kv_cache_names(plan.ops))[0]
    padded = torch.empty(NUM_BLOCKS, SPEC.num_kv_heads, 24, 2 * SPEC.head_dim, dtype=torch.bfloat16,
                         device=META)[:, :, :16]  # rows of 24 slots: another block stride
    other = kernel_table(plan, {**tensors, cache: padded})
    assert calls and not np.array_equal(other, first)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-5])


def drop_the_record(path: Path) -> None:
    path.with_name(path.name + plan_cache.RECORD_SUFFIX).unlink()


def make_world_writable(path: Path) -> None:
    path.chmod(0o666)


TAMPERINGS = [flip_a_byte, truncate, drop_the_record, make_world_writable]


@pytest.mark.parametrize("tamper", TAMPERINGS, ids=lambda f: f.__name__)
def test_a_changed_plan_entry_is_compiled_again(tamper: Callable[[Path], None], plan_cache_root: Path,
                                                log_lines: list[logging.LogRecord]) -> None:  # noqa: F811
    kernel = early_layers()[2].kernel
    fresh = compile_plan(kernel)
    entry = plans_folder(plan_cache_root) / f"{plan_cache.kernel_key(kernel)}.plan.json"
    tamper(entry)
    assert plan_cache.cached_counts(kernel) is None
    again = compile_plan(kernel)
    assert again.compiled and again.counts == fresh.counts
    if tamper is not drop_the_record:
        assert any(str(entry) in r.getMessage() for r in log_lines if r.levelno == logging.WARNING)
    assert (entry.stat().st_mode & 0o777) == 0o600
    assert not compile_plan(kernel).compiled  # stored again


@pytest.mark.parametrize("tamper", TAMPERINGS, ids=lambda f: f.__name__)
def test_a_changed_table_entry_is_built_again(tamper: Callable[[Path], None], plan_cache_root: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    plan, _, tensors = start()[2]
    want = kernel_table(plan, tensors)
    entry, = plans_folder(plan_cache_root).glob("*.table.npy")
    tamper(entry)
    calls = count_compiling(monkeypatch)
    assert np.array_equal(kernel_table(plan, tensors), want) and "vllm_mpk.runtime.megakernel.task_table" in calls
    calls.clear()
    assert np.array_equal(kernel_table(plan, tensors), want) and calls == []  # stored again


def test_a_plan_whose_counts_disagree_says_so_when_compiled(plan_cache_root: Path) -> None:
    """An entry whose record is intact but whose counts are not what the declaration compiles to
    (written by another compiler of the same version, say) is taken, and fails loudly the moment
    its tasks are compiled rather than running a table of other queues."""
    kernel = early_layers()[1].kernel
    fresh = compile_plan(kernel)
    entry = plans_folder(plan_cache_root) / f"{fresh.key}.plan.json"
    record = json.loads(entry.read_bytes())
    record["queue_lens"][0] += 1
    data = json.dumps(record).encode()
    entry.write_bytes(data)
    entry.with_name(entry.name + plan_cache.RECORD_SUFFIX).write_text(
        json.dumps({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    restored = compile_plan(kernel)
    assert not restored.compiled and restored.num_tasks == fresh.num_tasks + 1
    with pytest.raises(RuntimeError, match=f"plan cache entry {fresh.key} disagrees with compiling its declaration "
                                           rf"\({fresh.num_tasks} tasks, .*cached: {fresh.num_tasks + 1} tasks"):
        restored.tasks
    deferred = Plan.deferred(kernel.tensors, kernel.ops, kernel.schedule, PlanCounts(fresh.counts.queue_lens, ()))
    with pytest.raises(RuntimeError, match="disagrees"):
        deferred.queues
    right = Plan.deferred(kernel.tensors, kernel.ops, kernel.schedule, fresh.counts)
    assert compiled_form(right) == compiled_form(fresh)
