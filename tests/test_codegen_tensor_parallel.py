"""Code generation for tensor-parallel plans (no GPU): the collectives' exchange buffers, their
argument words, the NVSHMEM build (relocatable device code, NVSHMEM's libraries), and an nvcc
compile of a TP=2 Qwen3 plan for sm_90a. World size 1 plans keep the build they had."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import meta_weights, model_spec
from tests.test_codegen import Generated, generated, meta_bound
from vllm_mpk import PersistentKernel
from vllm_mpk.codegen import tasks
from vllm_mpk.codegen.jit import compile_only
from vllm_mpk.codegen.source import BINDING, plan_uses_nvshmem
from vllm_mpk.codegen.tables import HEADER_WORDS
from vllm_mpk.codegen.tasks import Target, UnsupportedOnGPU, cuda_task
from vllm_mpk.codegen.toolchain import has_nvshmem
from vllm_mpk.graph.ir import Role
from vllm_mpk.models import DecodeOptions, build_decoder
from vllm_mpk.models.kv_cache import allocate_kv_caches

needs_nvshmem = pytest.mark.skipif(not has_nvshmem(), reason="NVSHMEM (nvidia-nvshmem-cu13) is not installed")
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"),
                                reason="nvcc not installed")
BATCH, WORKERS = 4, 32


def decoder_plan(world_size: int, rank: int, final: str = "tokens") -> Generated:
    spec = model_spec("qwen3-0.6b", 2)
    local = spec.shard(world_size)
    caches = allocate_kv_caches(local, 8, 16, device="meta")
    model = build_decoder(spec, meta_weights(local), caches,
                          DecodeOptions(max_batch=BATCH, max_seq_len=64, num_workers=WORKERS, world_size=world_size,
                                        rank=rank, final=final))
    return generated(model.plan, meta_bound(model.plan, model.kernel.attached))


@pytest.fixture(scope="module")
def tp2() -> list[Generated]:
    if not has_nvshmem():
        pytest.skip("NVSHMEM is not installed")
    return [decoder_plan(2, rank) for rank in range(2)]


def collective_records(g: Generated, kind: str):
    return [(task, row) for _, _, task, row in g.records() if task.op.kind == kind]


def test_world_size_1_plans_keep_their_build() -> None:
    g = decoder_plan(1, 0)
    assert not plan_uses_nvshmem(g.plan)
    assert g.spec.sources["binding.cu"] == BINDING and "nvshmem" not in g.spec.sources["megakernel.cu"]
    assert "-rdc=true" not in g.spec.flags() and g.spec.link_flags == []
    assert not any(h.role in (Role.SYMMETRIC, Role.EXCHANGE) for h in g.plan.tensors.values())


@needs_nvshmem
def test_tp_plans_declare_exchange_buffers(tp2: list[Generated]) -> None:
    for rank, g in enumerate(tp2):
        for op in g.plan.ops:
            if op.kind == "allreduce":
                recv, signal = g.plan.tensors[op.attrs["recv"]], g.plan.tensors[op.attrs["signal"]]
                assert recv.role is signal.role is Role.EXCHANGE
                assert recv.shape == (2, 2, *op.inputs["input"].shape) and recv.dtype == torch.bfloat16
                assert signal.shape == (2, op.num_tiles) and signal.dtype == torch.int64
                assert op.attrs["rank"] == rank
            if op.kind == "argmax":
                partials = op.outputs["partial_value"].shape[1]
                assert g.plan.tensors[op.attrs["gather_value"]].shape == (2, 2, BATCH, partials)
                assert g.plan.tensors[op.attrs["gather_index"]].dtype == torch.int64
                assert g.plan.tensors[op.attrs["signal"]].shape == (2,)
    # symmetric allocations are collective: every rank declares the same tensors in the same order
    symmetric = (Role.SYMMETRIC, Role.EXCHANGE)
    assert [(n, h.shape, h.dtype) for n, h in tp2[0].plan.tensors.items() if h.role in symmetric] == \
        [(n, h.shape, h.dtype) for n, h in tp2[1].plan.tensors.items() if h.role in symmetric]


@needs_nvshmem
def test_allreduce_argument_words(tp2: list[Generated]) -> None:
    for rank, g in enumerate(tp2):
        a0 = HEADER_WORDS + g.layout.max_waits + g.layout.max_signals
        ids = {name: i for i, name in enumerate(g.plan.tensors)}
        records = collective_records(g, "allreduce")
        assert records
        for task, row in records:
            op, args = task.op, row[a0:]
            width = op.inputs["input"].shape[1]
            assert list(args[:12]) == [ids[op.inputs["input"].name], ids[op.outputs["output"].name],
                                       task.params["col_start"], task.params["col_end"], width,
                                       ids[op.attrs["recv"]], ids[op.attrs["signal"]], task.tile, 2, rank, BATCH,
                                       op.num_tiles]
            assert 0 <= task.tile < op.num_tiles


@needs_nvshmem
def test_argmax_argument_words(tp2: list[Generated]) -> None:
    for rank, g in enumerate(tp2):
        a0 = HEADER_WORDS + g.layout.max_waits + g.layout.max_signals
        ids = {name: i for i, name in enumerate(g.plan.tensors)}
        for task, row in collective_records(g, "argmax"):
            op = task.op
            assert list(row[a0 + 11:a0 + 17]) == [ids[op.attrs["gather_value"]], ids[op.attrs["gather_index"]],
                                                  ids[op.attrs["signal"]], 2, rank, BATCH]


@needs_nvshmem
def test_tp_plans_use_the_nvshmem_build(tp2: list[Generated]) -> None:
    for g in tp2:
        assert plan_uses_nvshmem(g.plan) and g.spec.name.endswith("_nvshmem")
        text = g.spec.sources["megakernel.cu"]
        assert "mpk::allreduce_nvshmem_task<" in text and "mpk::argmax_task<256, float, true>" in text
        assert "mpk::nvshmem_attach()" in text and "nvshmem_attach" in g.spec.sources["binding.cu"]
        flags = g.spec.flags()
        assert "-rdc=true" in flags and "-DMPK_WITH_NVSHMEM" in flags
        assert "-lnvshmem_device" in g.spec.link_flags
        assert any("libnvshmem_host.so" in f for f in g.spec.link_flags)


def test_missing_nvshmem_is_unsupported_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "has_nvshmem", lambda: False)
    plan = decoder_plan(1, 0).plan  # world size 1: no NVSHMEM needed
    assert all(cuda_task(op, Target(256)) for op in plan.ops)
    step = torch.zeros(4, dtype=torch.int64)
    mpk = PersistentKernel(world_size=2, mpi_rank=0, num_workers=4, meta_tensors={"step": step}, max_seq_len=16)
    x = mpk.new_tensor((4, 64), torch.bfloat16, "x", "nvshmem_tensor")
    y = mpk.new_tensor((4, 64), torch.bfloat16, "y")
    mpk.allreduce_layer(x, y, grid_dim=4, block_dim=128)
    with pytest.raises(UnsupportedOnGPU, match="pip install nvidia-nvshmem-cu13"):
        cuda_task(mpk.ops[0], Target(128))


def test_forced_nvshmem_path_with_one_rank_declares_buffers() -> None:
    step = torch.zeros(4, dtype=torch.int64)
    mpk = PersistentKernel(num_workers=4, meta_tensors={"step": step}, max_seq_len=16)
    x, y = mpk.new_tensor((4, 64), torch.bfloat16, "x"), mpk.new_tensor((4, 64), torch.bfloat16, "y")
    mpk.allreduce_layer(x, y, grid_dim=4, block_dim=128, name="sum", symmetric=True)
    op = mpk.ops[0]
    assert mpk.tensors[op.attrs["recv"]].shape == (2, 1, 4, 64) and mpk.tensors["sum.signal"].shape == (2, 4)
    assert tasks.uses_nvshmem(op)
    with pytest.raises(ValueError, match="symmetric=False needs world_size 1"):
        PersistentKernel(world_size=2, num_workers=4, meta_tensors={"step": step}, max_seq_len=16).allreduce_layer(
            x, y, grid_dim=4, block_dim=128, symmetric=False)


@needs_nvshmem
@needs_nvcc
def test_tp2_qwen3_megakernel_compiles_for_sm90a(tp2: list[Generated], tmp_path: Path) -> None:
    """nvcc builds rank 1's plan (2 layers) as relocatable device code linked with NVSHMEM."""
    start = time.perf_counter()
    so = compile_only(tp2[1].spec, tmp_path)
    assert so.is_file() and so.stat().st_size > 0
    print(f"\ncompiled {tp2[1].spec.name} in {time.perf_counter() - start:.1f} s")
