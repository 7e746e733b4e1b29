"""NVSHMEM host glue without a GPU: finding the install, building and loading the glue module,
unique ids, and clear errors before ``init``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from vllm_mpk.codegen.jit import JitSpec
from vllm_mpk.codegen.toolchain import ToolchainError, find_nvshmem, has_nvshmem
from vllm_mpk.runtime import nvshmem

needs_nvshmem = pytest.mark.skipif(not has_nvshmem(), reason="NVSHMEM (nvidia-nvshmem-cu13) is not installed")
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"),
                                reason="nvcc not installed")


@pytest.fixture
def fresh_lookup(monkeypatch: pytest.MonkeyPatch):
    find_nvshmem.cache_clear()
    yield monkeypatch
    find_nvshmem.cache_clear()


def test_missing_nvshmem_names_what_to_install(fresh_lookup: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fresh_lookup.setenv("NVSHMEM_HOME", str(tmp_path))
    with pytest.raises(ToolchainError, match="pip install nvidia-nvshmem-cu13") as info:
        find_nvshmem()
    assert str(tmp_path) in str(info.value)
    assert not has_nvshmem()


@needs_nvshmem
def test_nvshmem_home_wins_over_the_package(fresh_lookup: pytest.MonkeyPatch) -> None:
    package = find_nvshmem()
    fresh_lookup.setenv("NVSHMEM_HOME", str(package.include.parent))
    found = find_nvshmem()
    assert found == package
    assert found.host_library.name.startswith("libnvshmem_host.so")
    assert found.device_library.is_file()
    assert found.version().count(".") == 2 and "?" not in found.version()


@needs_nvshmem
def test_glue_spec_links_the_host_library_only() -> None:
    spec = nvshmem.glue_spec()
    assert isinstance(spec, JitSpec)
    assert "-rdc=true" not in spec.flags()
    assert any("libnvshmem_host.so" in f for f in spec.link_flags)
    assert not any("libnvshmem_device" in f for f in spec.link_flags)


def test_link_flags_change_the_build_hash() -> None:
    source = {"m.cpp": "int f() { return 1; }\n"}
    assert JitSpec("m", source).content_hash() != JitSpec("m", source, link_flags=["-Xlinker=-lm"]).content_hash()


@needs_nvshmem
@needs_nvcc
def test_glue_builds_loads_and_makes_unique_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_MPK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(nvshmem, "_glue", None)
    module = nvshmem.glue()
    assert module.init_status() == 0  # nothing initialised NVSHMEM in this process
    assert not nvshmem.is_initialized()
    uid = nvshmem.unique_id()
    assert isinstance(uid, bytes) and len(uid) == 128
    with pytest.raises(ValueError, match="128 bytes"):
        module.init(b"short", 0, 1)


def test_queries_before_init_raise_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvshmem, "_glue", None)
    with pytest.raises(nvshmem.NvshmemError, match="not initialised"):
        nvshmem.my_pe()
    with pytest.raises(nvshmem.NvshmemError, match="not initialised"):
        nvshmem.symmetric_zeros((4,), nvshmem.torch.float32)


def test_process_group_bootstrap_needs_torch_distributed() -> None:
    with pytest.raises(nvshmem.NvshmemError, match="init_process_group"):
        nvshmem.init_from_process_group()


def test_bad_rank_is_refused() -> None:
    with pytest.raises(ValueError, match="rank 2"):
        nvshmem.init(b"", 2, 2)


def test_standalone_rank_without_peers_says_how_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(nvshmem, "_glue", None)
    with pytest.raises(nvshmem.NvshmemError, match="torchrun"):
        nvshmem.ensure_initialized(2, 1, nvshmem.torch.device("cuda", 1))


def test_binding_a_tp_plan_needs_nvshmem_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_codegen_tensor_parallel import decoder_plan
    from vllm_mpk.runtime.megakernel import bind_tensors, plan_ranks

    monkeypatch.setattr(nvshmem, "_glue", None)
    plan = decoder_plan(2, 1).plan
    assert plan_ranks(plan) == (2, 1)
    assert plan_ranks(decoder_plan(1, 0).plan) == (1, 0)
    with pytest.raises(nvshmem.NvshmemError, match=r"rank 1 of 2\).*init_from_process_group"):
        bind_tensors(plan, {}, nvshmem.torch.device("cuda", 1))


def test_peer_timeout_names_the_signal_and_the_ranks() -> None:
    from tests.test_codegen_tensor_parallel import decoder_plan
    from vllm_mpk.runtime import control
    from vllm_mpk.runtime.megakernel import Megakernel

    plan = decoder_plan(2, 0).plan
    task = next(t for t in plan.tasks if t.op.kind == "allreduce")
    kernel = Megakernel.__new__(Megakernel)  # the host side of check() only: no GPU
    kernel.plan = plan
    kernel.control = nvshmem.torch.zeros(control.WORDS, dtype=nvshmem.torch.int32)
    kernel.control[control.ERROR], kernel.control[control.ERR_TASK] = control.PEER_TIMEOUT, task.id
    kernel.control[control.ERR_EVENT], kernel.control[control.ERR_SEEN] = task.tile, 2
    kernel.control[control.ERR_WANTED] = 4
    with pytest.raises(control.MegakernelError, match=rf"other tensor-parallel ranks.*signal word {task.tile} "
                                                      r"\(count 2, wanted 4: 2 ranks per launch\)"):
        kernel.check()
