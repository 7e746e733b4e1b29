"""The bound on the wait for bulk copies into shared memory (``barrier_wait`` in
``csrc/tasks/common.cuh``): the plan's timeout, after which the wait records ``kCopyTimeout`` in the
control block and the host's error word (as an event's watchdog does), keeps waiting as long
again for a copy still in flight, and gives up only on a phase no copy completes; the CUDA
context stays usable (no trap). A two-warp harness built with the project's JIT: compiled on the
CPU (CI), run on a GPU in a subprocess (a wait that never returned would hang only that process)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from vllm_mpk.codegen.jit import JitSpec, compile_only
from vllm_mpk.codegen.source import csrc_dir
from vllm_mpk.codegen.toolchain import find_nvcc
from vllm_mpk.runtime import control

TASK = 7  # the task id the harness's gate reports

HARNESS_CU = r"""
#include <cuda_runtime.h>
#include <cstdint>
#include "runtime/launcher.cuh"

// Warp 0 waits on a barrier that expects 64 bytes; warp 1's lane 0 brings them from `src` after
// `delay_ns` of its clock (never, when negative). The gate's timeout bounds the wait.
// out[0..15]: the staged words (-2 each when the wait gave up); out[16]: the gate's ok flag after.
__global__ void wait_for_copy(const int32_t* src, int32_t* out, int32_t* control, int32_t* error_host,
                              int64_t delay_ns, int64_t timeout_ns) {
  __shared__ __align__(16) int32_t staged[16];
  __shared__ __align__(8) uint64_t bar;
  __shared__ bool ok;
  if (threadIdx.x == 0) {
    mpk::barrier_init(&bar);
    ok = true;
  }
  __syncthreads();
  const mpk::InputGate gate{nullptr, 0, nullptr, nullptr, control, error_host, 0u, TASK, timeout_ns, nullptr, &ok,
                            nullptr};
  if (threadIdx.x == 0) {
    mpk::expect_bytes(&bar, sizeof(staged));
    mpk::barrier_arrive(&bar);
  }
  __syncthreads();
  if (threadIdx.x == 32 && delay_ns >= 0) {
    const int64_t start = mpk::global_ns();
    while (mpk::global_ns() - start < delay_ns) {
    }
    mpk::fence_async_smem();
    mpk::bulk_copy_to_smem(staged, src, sizeof(staged), &bar);
  }
  if (threadIdx.x < 32) {
    const bool landed = mpk::barrier_wait(&bar, 0, gate);
    if (threadIdx.x < 16) out[threadIdx.x] = landed ? staged[threadIdx.x] : -2;
    __syncwarp();
    if (threadIdx.x == 0) out[16] = ok;
  }
}

void launch_wait_for_copy(std::uintptr_t src, std::uintptr_t out, std::uintptr_t control, std::uintptr_t error_host,
                          std::int64_t delay_ns, std::int64_t timeout_ns) {
  wait_for_copy<<<1, 64>>>(reinterpret_cast<const int32_t*>(src), reinterpret_cast<int32_t*>(out),
                           reinterpret_cast<int32_t*>(control),
                           reinterpret_cast<int32_t*>(mpk::mapped_device_pointer(error_host)), delay_ns, timeout_ns);
  mpk::check_cuda(cudaGetLastError(), "launching the copy-wait harness");
}
""".replace("TASK", str(TASK))
BINDING_CPP = r"""
#include <pybind11/pybind11.h>
#include <cstdint>
void launch_wait_for_copy(std::uintptr_t src, std::uintptr_t out, std::uintptr_t control, std::uintptr_t error_host,
                          std::int64_t delay_ns, std::int64_t timeout_ns);
PYBIND11_MODULE(MPK_MODULE_NAME, m) { m.def("wait_for_copy", &launch_wait_for_copy); }
"""

TIMEOUT_NS = 50_000_000
# The copy lands at once; half a bound after the wait timed out (it reports, then takes it); never.
DELAYS = {"at_once": 0, "late": TIMEOUT_NS * 3 // 2, "never": -1}

RUN = """
import json, sys
import torch
from vllm_mpk.codegen.jit import JitSpec
spec, delays, timeout_ns = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
module = JitSpec(**spec).build()
src = torch.arange(16, dtype=torch.int32, device="cuda")
for name, delay in delays.items():
    out = torch.full((17,), -1, dtype=torch.int32, device="cuda")
    control = torch.zeros(8, dtype=torch.int32, device="cuda")
    host = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    module.wait_for_copy(src.data_ptr(), out.data_ptr(), control.data_ptr(), host.data_ptr(), delay, timeout_ns)
    torch.cuda.synchronize()  # raises if the wait trapped: the context would be lost
    print(json.dumps({name: {"out": out.tolist(), "control": control.tolist(), "host": int(host[0])}}), flush=True)
"""

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"),
                                reason="nvcc not installed")


def harness_spec() -> JitSpec:
    return JitSpec("copy_wait_bound", {"harness.cu": HARNESS_CU, "binding.cpp": BINDING_CPP},
                   include_dirs=[csrc_dir()])


@needs_nvcc
def test_the_harness_compiles_for_sm90a(tmp_path: Path) -> None:
    assert compile_only(harness_spec(), tmp_path).exists()


@needs_nvcc
def test_the_copy_wait_reports_instead_of_trapping(tmp_path: Path) -> None:
    """The wait's PTX for sm_90a has the error path (the control block's atomic, the host word's
    system fence) and no trap; no task body traps either."""
    spec = harness_spec()
    (tmp_path / "harness.cu").write_text(spec.sources["harness.cu"])
    ptx = tmp_path / "harness.ptx"
    subprocess.run([str(find_nvcc()), "-ptx", f"-arch={spec.arch}", *spec.flags()[:3], f"-I{csrc_dir()}",
                    str(tmp_path / "harness.cu"), "-o", str(ptx)], check=True, capture_output=True, text=True)
    code = ptx.read_text()
    assert "mbarrier.try_wait.parity" in code and "atom.global.cas" in code and "membar.sys" in code
    assert not re.search(r"\btrap\b", code)


TRAP = re.compile(r"__trap\s*\(|\btrap\s*;|__brkpt\s*\(")


def test_no_source_under_csrc_traps() -> None:
    """A trap loses the CUDA context (the engine could not go on on stock layers): every stop takes
    the bounded error path instead. Checked on the sources, so a host without nvcc checks it too."""
    sources = [p for p in csrc_dir().rglob("*") if p.is_file()]
    assert len(sources) > 10
    assert not [p for p in sources if TRAP.search(p.read_text())]
    assert TRAP.search('asm volatile("trap;");') and TRAP.search("__trap();")


def test_the_error_code_is_named_on_the_host() -> None:
    assert control.COPY_TIMEOUT in control.ERROR_NAMES and "bulk copy" in control.ERROR_NAMES[control.COPY_TIMEOUT]


@pytest.mark.gpu
def test_a_copy_wait_past_the_bound_reports_and_the_context_survives() -> None:
    spec = harness_spec()
    encoded = json.dumps({**asdict(spec), "include_dirs": [str(d) for d in spec.include_dirs]})
    run = subprocess.run([sys.executable, "-c", RUN, encoded, json.dumps(DELAYS), str(TIMEOUT_NS)],
                         capture_output=True, text=True, timeout=600)
    results = {k: v for line in run.stdout.splitlines() if line.startswith("{") for k, v in json.loads(line).items()}
    assert set(results) == set(DELAYS), run.stdout + run.stderr
    reported = [0] * control.WORDS
    reported[control.ERROR], reported[control.ERR_TASK], reported[control.ERR_EVENT] = control.COPY_TIMEOUT, TASK, -1
    at_once, late, never = results["at_once"], results["late"], results["never"]
    assert at_once == {"out": [*range(16), 1], "control": [0] * control.WORDS, "host": 0}
    # Past the bound: reported (worker 0, the harness's task, parity 0) and the worker told to stop;
    # the copy that was in flight is still waited for, so its bytes arrive before the wait returns.
    assert late == {"out": [*range(16), 0], "control": reported, "host": control.COPY_TIMEOUT}
    # A phase no copy completes: reported once, given up after the second bound, no trap.
    assert never == {"out": [-2] * 16 + [0], "control": reported, "host": control.COPY_TIMEOUT}
