"""Build generated CUDA into a Python extension once, cache it on disk, load it fast.

One ``JitSpec`` per specialised module. Its cache folder is readable by a person::

    <cache root>/<vllm_mpk version>/<arch>/<name>-<hash12>/
        <generated sources>  build.log  key.json  <name>.so  .lock

The hash covers the generated sources, every header under ``include_dirs`` (a hash of the
generated text alone would miss an edit to ``csrc/`` and load a stale kernel), the compiler flags,
the nvcc version, the vllm_mpk version, the arch, the Python ABI and pybind11's version.

Environment: ``VLLM_MPK_CACHE_DIR`` (cache root, default ``$VLLM_CACHE_ROOT/mpk`` or
``~/.cache/vllm/mpk``); ``VLLM_MPK_NO_BUILD=1`` forbids building (production hosts load only).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TextIO

import pybind11

from vllm_mpk.codegen.toolchain import ToolchainError, check_gpu, find_nvcc, nvcc_version

HEADER_SUFFIXES = (".cuh", ".h", ".hpp", ".cu")
COMPILED_SUFFIXES = (".cu", ".cpp", ".cc")
BASE_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-Xcompiler",
              "-fvisibility=hidden")
# static cudart: the .so needs no libcudart on the loader path, and importing it runs no CUDA call
LINK_FLAGS = ("-shared", "-cudart", "static")
LOG_TAIL_LINES = 40

_loaded: dict[Path, ModuleType] = {}  # a .so is dlopen-ed once per process; reuse its module


class BuildError(RuntimeError):
    """nvcc failed; the message holds the tail of the compiler log and the log's path."""


class NoBuildError(RuntimeError):
    """``VLLM_MPK_NO_BUILD=1`` is set and the spec has no cached build."""


def cache_root() -> Path:
    """Read at call time, so tests and launchers may set the environment late."""
    if os.environ.get("VLLM_MPK_CACHE_DIR"):
        return Path(os.environ["VLLM_MPK_CACHE_DIR"]).expanduser()
    vllm_root = os.environ.get("VLLM_CACHE_ROOT") or "~/.cache/vllm"
    return Path(vllm_root).expanduser() / "mpk"


def _package_version() -> str:
    import vllm_mpk  # late: vllm_mpk/__init__ may still be importing when this module loads

    return getattr(vllm_mpk, "__version__", "0+unknown")


def _arch_flags(arch: str) -> list[str]:
    """Cubin only: ``-arch=sm_90a`` also embeds PTX (an extra front-end pass per build) that could
    only ever be JIT-ed for the same sm_90a GPU anyway."""
    compute = arch.replace("sm_", "compute_")
    return [f"-gencode=arch={compute},code={arch}"]


def _no_build() -> bool:
    return os.environ.get("VLLM_MPK_NO_BUILD", "").strip().lower() in ("1", "true", "yes")


def write_if_changed(path: Path, text: str) -> bool:
    """Keep the mtime of unchanged files, so tools watching timestamps see no edit."""
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Cross-process lock: ``filelock`` when installed (vLLM depends on it), else ``fcntl``."""
    try:
        from filelock import FileLock
    except ImportError:
        import fcntl

        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    with FileLock(str(path)):
        yield


@dataclass
class JitSpec:
    """One specialised extension module. One file in ``sources`` defines ``PYBIND11_MODULE(<name>,
    m)`` (the macro ``MPK_MODULE_NAME`` expands to ``name``); put it in a ``.cpp`` next to the
    ``.cu`` kernels: they compile in parallel and pybind11 through nvcc's device front end is ~2x
    slower. The module takes raw device pointers and a ``cudaStream_t`` as ints; no torch headers."""

    name: str
    sources: dict[str, str]
    include_dirs: list[Path] = field(default_factory=list)
    extra_cuda_flags: list[str] = field(default_factory=list)
    link_flags: list[str] = field(default_factory=list)  # after the objects: libraries, rpaths
    arch: str = "sm_90a"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_]\w*", self.name):
            raise ValueError(f"JitSpec name must be a C identifier (it names the module), got {self.name!r}")
        if not any(Path(f).suffix in COMPILED_SUFFIXES for f in self.sources):
            raise ValueError(f"JitSpec {self.name}: sources need at least one .cu/.cpp file")
        self.include_dirs = [Path(d).resolve() for d in self.include_dirs]

    # --- identity -------------------------------------------------------------------------------
    def flags(self) -> list[str]:
        """nvcc compile flags without include paths (those differ per venv; their content is hashed)."""
        return [*BASE_FLAGS, *_arch_flags(self.arch), f"-DMPK_MODULE_NAME={self.name}", *self.extra_cuda_flags]

    def content_hash(self) -> str:
        """Everything that decides the binary except the nvcc version (see ``_find_any_toolchain``)."""
        h = hashlib.sha256()

        def feed(*parts: str | bytes) -> None:
            for part in parts:
                data = part.encode() if isinstance(part, str) else part
                h.update(len(data).to_bytes(8, "little") + data)

        for fname in sorted(self.sources):
            feed("src", fname, self.sources[fname])
        for inc in self.include_dirs:
            for path in sorted(p for p in inc.rglob("*") if p.suffix in HEADER_SUFFIXES and p.is_file()):
                feed("hdr", path.relative_to(inc).as_posix(), path.read_bytes())
        feed("flags", *self.flags(), "link", *self.link_flags, "arch", self.arch, "pkg", _package_version(),
             "py", sys.implementation.cache_tag, "pybind11", pybind11.__version__)
        return h.hexdigest()

    def _key(self, nvcc: Path) -> dict[str, str]:
        content = self.content_hash()
        version = nvcc_version(nvcc)
        digest = hashlib.sha256(f"{content}\n{version}".encode()).hexdigest()
        return {"name": self.name, "hash": digest, "content": content, "nvcc": version}

    def arch_dir(self) -> Path:
        return cache_root() / _package_version() / self.arch

    def build_dir(self) -> Path:
        """Needs nvcc (its version is part of the hash)."""
        return self.arch_dir() / f"{self.name}-{self._key(find_nvcc())['hash'][:12]}"

    def so_path(self, build_dir: Path) -> Path:
        return build_dir / f"{self.name}.so"

    # --- load / build ---------------------------------------------------------------------------
    def try_load(self) -> ModuleType | None:
        """The cached module, or None. Never compiles. Raises ToolchainError on a non-Hopper GPU."""
        check_gpu(self.arch)
        try:
            so = self.so_path(self.build_dir())
        except ToolchainError:  # production host without nvcc: accept any toolchain's build
            so = self._find_any_toolchain()
        return _import_so(self.name, so) if so is not None and so.is_file() else None

    def _find_any_toolchain(self) -> Path | None:
        """Newest build of the same content by any nvcc; for load-only hosts that lack nvcc."""
        content, found = self.content_hash(), []
        for key_file in self.arch_dir().glob(f"{self.name}-*/key.json"):
            so = self.so_path(key_file.parent)
            if so.is_file() and json.loads(key_file.read_text()).get("content") == content:
                found.append(so)
        return max(found, key=lambda p: p.stat().st_mtime, default=None)

    def build(self) -> ModuleType:
        """Compile under a lock in the cache folder; the cache is checked again once the lock is
        held, so concurrent workers build once and the others load that build."""
        if _no_build():
            raise NoBuildError(self._missing_message())
        nvcc = find_nvcc()
        key = self._key(nvcc)
        build_dir = self.arch_dir() / f"{self.name}-{key['hash'][:12]}"
        build_dir.mkdir(parents=True, exist_ok=True)
        with _file_lock(build_dir / ".lock"):
            so = self.so_path(build_dir)
            if not so.is_file():
                print(f"[vllm_mpk] building {self.name} in {build_dir} ...", file=sys.stderr, flush=True)
                start = time.perf_counter()
                _compile(self, nvcc, build_dir, so)
                write_if_changed(build_dir / "key.json", json.dumps(key, indent=1) + "\n")
                print(f"[vllm_mpk] built {self.name} in {time.perf_counter() - start:.1f} s",
                      file=sys.stderr, flush=True)
        return _import_so(self.name, so)

    def load(self) -> ModuleType:
        """The cached module, else build it (unless ``VLLM_MPK_NO_BUILD=1``)."""
        module = self.try_load()
        if module is not None:
            return module
        return self.build()

    def _missing_message(self) -> str:
        try:
            where = str(self.build_dir())
        except ToolchainError:
            where = f"{self.arch_dir()}/{self.name}-<hash>"
        return (f"VLLM_MPK_NO_BUILD=1 forbids building, and JIT spec {self.name!r} has no cached build "
                f"at {where}. Build it once on a host with nvcc (same vllm_mpk version, arch and "
                f"sources) and copy the cache folder, or unset VLLM_MPK_NO_BUILD.")


def compile_only(spec: JitSpec, out_dir: Path) -> Path:
    """Compile ``spec`` into ``out_dir/<name>.so`` without loading it (CI: no GPU, proves the
    generated sources compile). Ignores the cache and VLLM_MPK_NO_BUILD; raises BuildError."""
    out_dir = Path(out_dir)
    so = spec.so_path(out_dir)
    _compile(spec, find_nvcc(), out_dir, so)
    return so


def _compile(spec: JitSpec, nvcc: Path, build_dir: Path, so: Path) -> None:
    """Write sources (only if changed), compile each .cu/.cpp to an object in parallel (a pybind11
    binding compiles far slower than a kernel, so keep it in its own .cpp), link into a temp file
    and rename that into place, so a reader not holding the lock never sees half a .so."""
    for fname, text in spec.sources.items():
        write_if_changed(build_dir / fname, text)
    includes = [build_dir, *spec.include_dirs, Path(pybind11.get_include()), Path(sysconfig.get_paths()["include"])]
    compile_flags = [*spec.flags(), *(f"-I{d}" for d in includes)]
    units = sorted(build_dir / f for f in spec.sources if Path(f).suffix in COMPILED_SUFFIXES)
    objects = [unit.with_name(unit.name.replace(".", "_") + ".o") for unit in units]
    tmp = so.with_name(f".{so.name}.{os.getpid()}.tmp")
    log = build_dir / "build.log"
    with open(log, "w") as out:
        ok = _run_all(out, build_dir, [[str(nvcc), *compile_flags, "-c", str(u), "-o", str(o)]
                                       for u, o in zip(units, objects, strict=True)])
        ok = ok and _run_all(out, build_dir, [[str(nvcc), *spec.flags(), *LINK_FLAGS, *map(str, objects),
                                               *spec.link_flags, "-o", str(tmp)]])
    for obj in objects:
        obj.unlink(missing_ok=True)
    if not ok:
        tmp.unlink(missing_ok=True)
        tail = "\n".join(log.read_text().splitlines()[-LOG_TAIL_LINES:])
        raise BuildError(f"nvcc failed building {spec.name}; full log: {log}\n{tail}")
    os.replace(tmp, so)


def _run_all(log: TextIO, cwd: Path, cmds: list[list[str]]) -> bool:
    """Run commands concurrently, append each command and its output to ``log``; all succeeded?"""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
             for cmd in cmds]
    for cmd, proc in zip(cmds, procs, strict=True):
        output, _ = proc.communicate()
        log.write(f"$ {' '.join(cmd)}\n{output}exit code {proc.returncode}\n\n")
    return all(proc.returncode == 0 for proc in procs)


def _import_so(name: str, so: Path) -> ModuleType:
    """Import from a path. The dotted name is unique per build folder; its last part must be the
    PYBIND11_MODULE name because Python looks up ``PyInit_<last part>``."""
    so = so.resolve()
    if so not in _loaded:
        qualified = f"vllm_mpk._jit.{so.parent.name.replace('-', '_')}.{name}"
        spec = importlib.util.spec_from_file_location(qualified, so)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _loaded[so] = module
    return _loaded[so]
