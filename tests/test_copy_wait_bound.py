"""The bound on the wait for bulk copies into shared memory (``barrier_wait`` in
``csrc/tasks/common.cuh``): a phase whose bytes never come traps the kernel after the bound
instead of hanging it, and a copy that lands passes as before. A two-kernel harness built with
the project's JIT: compiled on the CPU (CI), run on a GPU in a subprocess (a trap leaves that
process's CUDA context unusable)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from vllm_mpk.codegen.jit import JitSpec, compile_only
from vllm_mpk.codegen.source import csrc_dir

HARNESS_CU = r"""
#include <cuda_runtime.h>
#include <cstdint>
#include "tasks/common.cuh"

// One warp: thread 0 expects 64 bytes on a barrier; with `copy` it brings them from `src`.
__global__ void wait_for_copy(const int32_t* src, int32_t* out, bool copy, int64_t bound_ns) {
  __shared__ __align__(16) int32_t staged[16];
  __shared__ __align__(8) uint64_t bar;
  if (threadIdx.x == 0) mpk::barrier_init(&bar);
  __syncthreads();
  if (threadIdx.x == 0) {
    mpk::fence_async_smem();
    mpk::expect_bytes(&bar, sizeof(staged));
    if (copy) mpk::bulk_copy_to_smem(staged, src, sizeof(staged), &bar);
    mpk::barrier_arrive(&bar);
  }
  mpk::barrier_wait(&bar, 0, bound_ns);
  if (threadIdx.x < 16) out[threadIdx.x] = staged[threadIdx.x];
}

void launch_wait_for_copy(std::uintptr_t src, std::uintptr_t out, bool copy, std::int64_t bound_ns) {
  wait_for_copy<<<1, 32>>>(reinterpret_cast<const int32_t*>(src), reinterpret_cast<int32_t*>(out), copy, bound_ns);
}
"""
BINDING_CPP = r"""
#include <pybind11/pybind11.h>
#include <cstdint>
void launch_wait_for_copy(std::uintptr_t src, std::uintptr_t out, bool copy, std::int64_t bound_ns);
PYBIND11_MODULE(MPK_MODULE_NAME, m) { m.def("wait_for_copy", &launch_wait_for_copy); }
"""

RUN = """
import json, sys, time
import torch
from vllm_mpk.codegen.jit import JitSpec
module = JitSpec(**json.loads(sys.argv[1])).build()
src = torch.arange(16, dtype=torch.int32, device="cuda")
out = torch.full((16,), -1, dtype=torch.int32, device="cuda")
module.wait_for_copy(src.data_ptr(), out.data_ptr(), True, 50_000_000)
torch.cuda.synchronize()
print(json.dumps({"landed": out.tolist()}), flush=True)
start = time.monotonic()
module.wait_for_copy(src.data_ptr(), out.data_ptr(), False, 50_000_000)
try:
    torch.cuda.synchronize()
    print(json.dumps({"stuck": "returned", "seconds": time.monotonic() - start}), flush=True)
except RuntimeError as e:
    print(json.dumps({"stuck": str(e).splitlines()[0], "seconds": time.monotonic() - start}), flush=True)
"""

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"),
                                reason="nvcc not installed")


def harness_spec() -> JitSpec:
    return JitSpec("copy_wait_bound", {"harness.cu": HARNESS_CU, "binding.cpp": BINDING_CPP},
                   include_dirs=[csrc_dir()])


@needs_nvcc
def test_the_harness_compiles_for_sm90a(tmp_path: Path) -> None:
    assert compile_only(harness_spec(), tmp_path).exists()


@pytest.mark.gpu
def test_a_copy_that_never_lands_traps_after_the_bound_and_one_that_lands_passes() -> None:
    spec = harness_spec()
    run = subprocess.run([sys.executable, "-c", RUN, json.dumps({**asdict(spec), "include_dirs":
                                                                 [str(d) for d in spec.include_dirs]})],
                         capture_output=True, text=True, timeout=600)
    results = {k: v for line in run.stdout.splitlines() if line.startswith("{") for k, v in json.loads(line).items()}
    assert results.get("landed") == list(range(16)), run.stdout + run.stderr
    assert results["stuck"] != "returned", "a wait for bytes that never come finished without them"
    assert "launch failure" in results["stuck"] or "illegal instruction" in results["stuck"], results["stuck"]
    assert results["seconds"] < 30  # the bound (50 ms) and the error's report, not a hang
