"""The JIT layer on a CPU-only machine: nvcc compiles for sm_90a, and importing the .so runs no
CUDA call, so building, caching and loading are all testable without a GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import pytest

from vllm_mpk.codegen import jit
from vllm_mpk.codegen.jit import BuildError, JitSpec, NoBuildError, compile_only, write_if_changed
from vllm_mpk.codegen.toolchain import ToolchainError, check_gpu, find_nvcc

needs_nvcc = pytest.mark.skipif(
    shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="nvcc not installed")

KERNEL_CU = r"""
#include <cuda_runtime.h>
#include <cstdint>
__global__ void add_one(int* x) { x[threadIdx.x] += 1; }
void launch_add_one(std::intptr_t ptr, std::intptr_t stream) {
  add_one<<<1, 32, 0, reinterpret_cast<cudaStream_t>(stream)>>>(reinterpret_cast<int*>(ptr));
}
"""
BINDING_CPP = r"""
#include <pybind11/pybind11.h>
#include <cstdint>
void launch_add_one(std::intptr_t ptr, std::intptr_t stream);
PYBIND11_MODULE(MPK_MODULE_NAME, m) {
  m.def("answer", [] { return 42; });
  m.def("launch_add_one", &launch_add_one);
}
"""
# The raw CPython API compiles in a second or two (pybind11 takes tens): for tests that need
# fresh builds rather than a pybind11 module.
CAPI_CU = r"""
#include <Python.h>
__global__ void noop() {}
static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(%d); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};
static PyModuleDef def = {PyModuleDef_HEAD_INIT, "%s", nullptr, -1, methods};
PyMODINIT_FUNC PyInit_%s() { return PyModule_Create(&def); }
"""


def tiny_pybind11_spec(**kw: object) -> JitSpec:
    return JitSpec("tiny_pybind", {"tiny_pybind.cu": KERNEL_CU, "binding.cpp": BINDING_CPP}, **kw)


def capi_spec(name: str, value: int = 42) -> JitSpec:
    return JitSpec(name, {f"{name}.cu": CAPI_CU % (value, name, name)})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("mpk_cache")
        mp.setenv("VLLM_MPK_CACHE_DIR", str(root))
        mp.delenv("VLLM_MPK_NO_BUILD", raising=False)
        yield root


@pytest.fixture(scope="module")
def built(cache_dir: Path) -> tuple[JitSpec, ModuleType]:
    """Prebuilt once per module (the one slow pybind11 build)."""
    spec = tiny_pybind11_spec()
    return spec, spec.load()


def _forbid_subprocesses(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a cache hit must not run a subprocess: {args}")

    monkeypatch.setattr(subprocess, "run", fail)
    monkeypatch.setattr(subprocess, "Popen", fail)


@needs_nvcc
def test_compile_only_writes_so_without_loading(tmp_path: Path) -> None:
    so = compile_only(tiny_pybind11_spec(), tmp_path)
    assert so == tmp_path / "tiny_pybind.so" and so.stat().st_size > 0
    assert (tmp_path / "build.log").is_file() and (tmp_path / "binding.cpp").is_file()
    assert so.resolve() not in jit._loaded


@needs_nvcc
def test_build_imports_and_lays_out_cache(built: tuple[JitSpec, ModuleType], cache_dir: Path) -> None:
    spec, module = built
    assert module.answer() == 42 and callable(module.launch_add_one)
    build_dir = spec.build_dir()
    assert build_dir.parent == cache_dir / jit.package_version() / "sm_90a"
    assert build_dir.name.startswith("tiny_pybind-") and len(build_dir.name) == len("tiny_pybind-") + 12
    assert Path(module.__file__).resolve() == (build_dir / "tiny_pybind.so").resolve()
    for fname in ("tiny_pybind.cu", "binding.cpp", "build.log", "key.json"):
        assert (build_dir / fname).is_file(), fname


@needs_nvcc
def test_second_load_is_cache_hit(built: tuple[JitSpec, ModuleType], monkeypatch: pytest.MonkeyPatch) -> None:
    _, module = built
    _forbid_subprocesses(monkeypatch)  # nvcc --version is memoised from the first load
    start = time.perf_counter()
    again = tiny_pybind11_spec().load()
    assert time.perf_counter() - start < 2.0
    assert again is module


@needs_nvcc
def test_cache_hit_in_fresh_process_is_fast(built: tuple[JitSpec, ModuleType]) -> None:
    """What a second vLLM start pays: hash sources and headers, nvcc --version, dlopen."""
    spec, _ = built
    script = ("import json, sys, time\nfrom vllm_mpk.codegen.jit import JitSpec\n"
              "spec = JitSpec(**json.loads(sys.stdin.read()))\nt = time.perf_counter()\n"
              "m = spec.load()\nprint(json.dumps([m.answer(), time.perf_counter() - t]))\n")
    env = {**os.environ, "VLLM_MPK_NO_BUILD": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", script], input=json.dumps(asdict(spec), default=str),
                         capture_output=True, text=True, env=env, check=True).stdout
    answer, seconds = json.loads(out.strip().splitlines()[-1])
    assert answer == 42 and seconds < 2.0


@needs_nvcc
def test_load_only_host_without_nvcc_finds_build(built: tuple[JitSpec, ModuleType],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, module = built
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("VLLM_MPK_NO_BUILD", "1")
    assert tiny_pybind11_spec().try_load() is module


def test_header_edit_changes_hash(tmp_path: Path) -> None:
    inc = tmp_path / "csrc"
    (inc / "tasks").mkdir(parents=True)
    header = inc / "tasks" / "gemv.cuh"
    header.write_text("#pragma once\nconstexpr int kTile = 64;\n")
    spec = JitSpec("h", {"h.cu": '#include "tasks/gemv.cuh"\n'}, include_dirs=[inc])
    first = spec.content_hash()
    (inc / "README.md").write_text("not a header")
    assert spec.content_hash() == first
    header.write_text("#pragma once\nconstexpr int kTile = 128;\n")
    second = spec.content_hash()
    assert second != first
    (inc / "runtime.h").write_text("// new header\n")
    assert spec.content_hash() not in (first, second)
    flags = JitSpec("h", spec.sources, include_dirs=[inc], extra_cuda_flags=["-lineinfo"])
    assert flags.content_hash() != spec.content_hash()


def test_unchanged_sources_keep_mtime(tmp_path: Path) -> None:
    path = tmp_path / "gen" / "kernel.cu"
    assert write_if_changed(path, "int a;\n")
    os.utime(path, (1_000_000, 1_000_000))
    assert not write_if_changed(path, "int a;\n")
    assert path.stat().st_mtime == 1_000_000
    assert write_if_changed(path, "int b;\n") and path.stat().st_mtime != 1_000_000


@needs_nvcc
def test_no_build_env_names_spec_and_cache(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_MPK_NO_BUILD", "1")
    spec = capi_spec("never_built")
    assert spec.try_load() is None
    with pytest.raises(NoBuildError, match="never_built") as err:
        spec.load()
    assert str(cache_dir) in str(err.value) and "VLLM_MPK_NO_BUILD" in str(err.value)


@needs_nvcc
def test_syntax_error_raises_build_error_with_log_tail(cache_dir: Path) -> None:
    spec = JitSpec("broken", {"broken.cu": "__global__ void k() { int x = ; }\n"})
    with pytest.raises(BuildError) as err:
        spec.build()
    log = spec.build_dir() / "build.log"
    assert str(log) in str(err.value) and "error" in str(err.value) and "broken.cu" in str(err.value)
    assert not (spec.build_dir() / "broken.so").exists()


@needs_nvcc
def test_concurrent_builds_compile_once(cache_dir: Path) -> None:
    """Two workers race on one spec: the lock makes one build and the other load that build."""
    spec = capi_spec("raced", value=7)
    script = ("import json, sys\nfrom vllm_mpk.codegen.jit import JitSpec\n"
              "print(JitSpec(**json.loads(sys.argv[1])).build().answer())\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", script, json.dumps(asdict(spec), default=str)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [proc.communicate() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    assert [out.strip() for out, _ in outs] == ["7", "7"]
    assert sum(err.count("[vllm_mpk] building raced") for _, err in outs) == 1


def test_missing_nvcc_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    with pytest.raises(ToolchainError, match="CUDA 13.*CUDA_HOME"):
        find_nvcc()
    with pytest.raises(ToolchainError):
        capi_spec("no_toolchain").build()


def test_non_hopper_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ToolchainError, match="A100.*Hopper"):
        check_gpu.__wrapped__("sm_90a")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_gpu.__wrapped__("sm_90a")
