"""Build generated CUDA into a Python extension once, cache it on disk, load it fast.

One ``JitSpec`` per specialised module. Its cache folder is readable by a person::

    <cache root>/<vllm_mpk version>/<arch>/<name>-<hash12>/
        <generated sources>  build.log  key.json  <name>.so
    <cache root>/<vllm_mpk version>/<arch>/.<name>-<hash12>.lock

The hash covers the generated sources, every header under ``include_dirs`` (a hash of the
generated text alone would miss an edit to ``csrc/`` and load a stale kernel), the compiler flags,
the nvcc version, the vllm_mpk version, the arch, the Python ABI and pybind11's version.

Loading a cached ``.so`` runs its code, so the cache is private and checked (``cache_trust``): a
cache that another user owns or can write is not used (a warning names it, and builds go to a
private fallback folder); ``key.json`` records the ``.so``'s size and sha256, checked before
dlopen; an entry that fails the check or does not import is renamed aside and rebuilt. The lock
sits beside its entry, so renaming the entry aside keeps it.

Environment: ``VLLM_MPK_CACHE_DIR`` (cache root, default ``$VLLM_CACHE_ROOT/mpk`` or
``~/.cache/vllm/mpk``); ``VLLM_MPK_NO_BUILD=1`` forbids building (production hosts load only);
``VLLM_MPK_BUILD_TIMEOUT_S`` bounds a build (see ``toolchain.build_timeout_s``) and, twice over,
the wait for another process's build of the same spec.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TextIO

import pybind11

from vllm_mpk.codegen import cache_trust
from vllm_mpk.codegen.cache_trust import CacheError, CorruptArtifact
from vllm_mpk.codegen.toolchain import (
    BUILD_TIMEOUT_ENV,
    ToolchainError,
    build_timeout_s,
    check_gpu,
    find_nvcc,
    nvcc_version,
)

HEADER_SUFFIXES = (".cuh", ".h", ".hpp", ".cu")
COMPILED_SUFFIXES = (".cu", ".cpp", ".cc")
BASE_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-Xcompiler",
              "-fvisibility=hidden")
# static cudart: the .so needs no libcudart on the loader path, and importing it runs no CUDA call
LINK_FLAGS = ("-shared", "-cudart", "static")
LOG_TAIL_LINES = 40
LOCK_POLL_S = 0.05
KEY_FILE = "key.json"

_loaded: dict[Path, ModuleType] = {}  # a .so is dlopen-ed once per process; reuse its module
_running: set[subprocess.Popen] = set()  # nvcc processes of builds in progress, killed at exit

class BuildError(RuntimeError):
    """nvcc failed; the message holds the tail of the compiler log and the log's path."""


class BuildTimeoutError(BuildError, TimeoutError):
    """nvcc, or the wait for another process's build, ran past its limit; the message names it."""


class NoBuildError(RuntimeError):
    """``VLLM_MPK_NO_BUILD=1`` is set and the spec has no usable cached build."""


def cache_root() -> Path:
    """Read at call time, so tests and launchers may set the environment late."""
    if os.environ.get("VLLM_MPK_CACHE_DIR"):
        return Path(os.environ["VLLM_MPK_CACHE_DIR"]).expanduser()
    vllm_root = os.environ.get("VLLM_CACHE_ROOT") or "~/.cache/vllm"
    return Path(vllm_root).expanduser() / "mpk"


@functools.cache
def package_version() -> str:
    """From the installed package's metadata: importing ``vllm_mpk`` here would be an import cycle
    (its ``__init__`` imports the API, which imports this module). Without an install (a source
    tree on ``PYTHONPATH``), read ``__version__`` where it is defined."""
    try:
        return importlib.metadata.version("vllm_mpk")
    except importlib.metadata.PackageNotFoundError:
        init = Path(__file__).parents[1] / "__init__.py"
        match = re.search(r'^__version__ = "([^"]+)"$', init.read_text(), re.MULTILINE)
        if match is None:
            raise RuntimeError(f"vllm_mpk is not installed and {init} defines no __version__") from None
        return match[1]


def _arch_flags(arch: str) -> list[str]:
    """Cubin only: ``-arch=sm_90a`` also embeds PTX (an extra front-end pass per build) that could
    only ever be JIT-ed for the same sm_90a GPU anyway."""
    compute = arch.replace("sm_", "compute_")
    return [f"-gencode=arch={compute},code={arch}"]


def builds_forbidden() -> bool:
    return os.environ.get("VLLM_MPK_NO_BUILD", "").strip().lower() in ("1", "true", "yes")


def write_if_changed(path: Path, text: str) -> bool:
    """Keep the mtime of unchanged files, so tools watching timestamps see no edit."""
    if path.is_file() and path.read_text() == text:
        return False
    cache_trust.make_private_dirs(path.parent)
    cache_trust.write_private(path, text.encode())
    return True


@contextlib.contextmanager
def _build_lock(path: Path, spec_name: str) -> Iterator[None]:
    """``flock`` on ``path``, polled for at most twice the build timeout: the holder's own build is
    bounded by one. The kernel drops the lock when its holder dies, so none goes stale."""
    timeout_s = 2 * build_timeout_s()
    deadline = time.monotonic() + timeout_s
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, cache_trust.FILE_MODE)
    except OSError as err:
        raise cache_trust.unwritable(path, err) from err
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BuildTimeoutError(
                        f"waited {timeout_s:g} s for the build lock {path} of JIT spec {spec_name!r}: another "
                        f"process holds it and is still building. Raise {BUILD_TIMEOUT_ENV}, or find that "
                        f"process (e.g. fuser {path}).") from None
                time.sleep(LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_key(build_dir: Path) -> dict:
    try:
        key = json.loads((build_dir / KEY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return key if isinstance(key, dict) else {}


def _load_checked(name: str, build_dir: Path) -> ModuleType | None:
    """The module built in ``build_dir``, or None when there is none. Raises CorruptArtifact when
    the ``.so`` fails its record (checked before dlopen) or does not import."""
    so = build_dir / f"{name}.so"
    if so.resolve() in _loaded:  # checked when it was loaded
        return _loaded[so.resolve()]
    try:
        cache_trust.verify_artifact(so, _read_key(build_dir).get("artifact"))
    except FileNotFoundError:  # not built, or its entry was just moved aside by a builder
        return None
    try:
        return _import_so(name, so)
    except ImportError as err:
        raise CorruptArtifact(so, f"it does not import: {err}") from err


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
        """Everything that decides the binary except the nvcc version (see ``_load_any_toolchain``)."""
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
        feed("flags", *self.flags(), "link", *self.link_flags, "arch", self.arch, "pkg", package_version(),
             "py", sys.implementation.cache_tag, "pybind11", pybind11.__version__)
        return h.hexdigest()

    def _key(self, nvcc: Path) -> dict[str, str]:
        content = self.content_hash()
        version = nvcc_version(nvcc)
        digest = hashlib.sha256(f"{content}\n{version}".encode()).hexdigest()
        return {"name": self.name, "hash": digest, "content": content, "nvcc": version}

    def _entry(self, key: dict[str, str]) -> str:
        return f"{self.name}-{key['hash'][:12]}"

    def arch_dir(self, entry: str | None = None, *, create: bool = False) -> Path:
        """``<cache root>/<version>/<arch>``, if it and ``entry`` (with its key and ``.so``) are
        trusted; else the same under ``cache_trust.private_root()``, with a warning that names what
        to change. ``create`` makes the folders (0700). Raises CacheError when neither is usable."""
        problems = []
        for root in (cache_root(), cache_trust.private_root()):
            arch_dir = root / package_version() / self.arch
            chain = [root, arch_dir.parent, arch_dir]
            if entry is not None:
                chain += [arch_dir / entry, arch_dir / entry / KEY_FILE, self.so_path(arch_dir / entry)]
            problem = cache_trust.first_distrusted(chain)
            if problem is None and create:
                cache_trust.make_private_dirs(chain[3] if entry is not None else arch_dir)
                problem = cache_trust.first_distrusted(chain)  # another user may have made a folder first
            if problem is None:
                if problems:
                    cache_trust.warn_once(f"not using the JIT cache under {cache_root()}: {problems[0]}. "
                                          f"Using the private folder {root} instead.")
                return arch_dir
            problems.append(problem)
        raise CacheError(f"no trusted folder for the JIT cache: {'; '.join(problems)}. Set VLLM_MPK_CACHE_DIR "
                         f"to a folder that only you can write.")

    def build_dir(self) -> Path:
        """Needs nvcc (its version is part of the hash)."""
        entry = self._entry(self._key(find_nvcc()))
        return self.arch_dir(entry) / entry

    def so_path(self, build_dir: Path) -> Path:
        return build_dir / f"{self.name}.so"

    def lock_path(self, build_dir: Path) -> Path:
        return build_dir.with_name(f".{build_dir.name}.lock")

    # --- load / build ---------------------------------------------------------------------------
    def try_load(self) -> ModuleType | None:
        """The cached module, or None. Never compiles. Raises ToolchainError on a non-Hopper GPU,
        and NoBuildError under ``VLLM_MPK_NO_BUILD=1`` when the cached build fails its check."""
        check_gpu(self.arch)
        try:
            nvcc = find_nvcc()
        except ToolchainError:  # production host without nvcc
            return self._load_any_toolchain()
        entry = self._entry(self._key(nvcc))
        try:
            return _load_checked(self.name, self.arch_dir(entry) / entry)
        except CorruptArtifact as bad:
            if builds_forbidden():
                raise NoBuildError(self._corrupt_message([bad])) from bad
            return None  # build() sets it aside under the lock and rebuilds

    def _load_any_toolchain(self) -> ModuleType | None:
        """The newest build of the same content by any nvcc, for load-only hosts without nvcc (whose
        version is part of the hash, so the entry's name cannot be computed). A build is taken only
        from the trusted cache folder, only if its entry passes the same ownership checks, and only
        if its ``.so`` matches the size and sha256 in its ``key.json``. The sha256 catches damage, not
        forgery: only someone who can already write this user's private cache could plant one."""
        arch_dir, content = self.arch_dir(), self.content_hash()
        candidates = []
        for build_dir in arch_dir.glob(f"{self.name}-*"):
            if not re.fullmatch(rf"{self.name}-[0-9a-f]{{12}}", build_dir.name):
                continue  # an entry set aside, or a stray folder
            problem = cache_trust.first_distrusted([build_dir, build_dir / KEY_FILE, self.so_path(build_dir)])
            if problem is not None:
                cache_trust.warn_once(f"not loading the JIT build {build_dir}: {problem}")
            elif self.so_path(build_dir).is_file() and _read_key(build_dir).get("content") == content:
                candidates.append(build_dir)
        rejected = []
        for build_dir in sorted(candidates, key=lambda d: self.so_path(d).stat().st_mtime, reverse=True):
            try:
                module = _load_checked(self.name, build_dir)
            except CorruptArtifact as bad:
                cache_trust.warn_once(f"not loading the JIT build {bad}")
                rejected.append(bad)
                continue
            if module is not None:
                return module
        if rejected and builds_forbidden():
            raise NoBuildError(self._corrupt_message(rejected))
        return None

    def build(self) -> ModuleType:
        """Compile under a lock beside the cache entry; the cache is checked again once the lock is
        held, so concurrent workers build once and the others load that build. An entry that fails
        its check is set aside and rebuilt."""
        if builds_forbidden():
            raise NoBuildError(self._missing_message())
        nvcc = find_nvcc()
        key = self._key(nvcc)
        entry = self._entry(key)
        build_dir = self.arch_dir(entry, create=True) / entry
        with _build_lock(self.lock_path(build_dir), self.name):
            try:
                module = _load_checked(self.name, build_dir)
            except CorruptArtifact as bad:
                cache_trust.quarantine(build_dir, bad.reason)
                module = None
            if module is None:
                self._build_into(build_dir, nvcc, key)
                module = _import_so(self.name, self.so_path(build_dir))
        return module

    def _build_into(self, build_dir: Path, nvcc: Path, key: dict[str, str]) -> None:
        """Compile, then record the finished ``.so``'s size and sha256 in ``key.json`` and only then
        rename it into place: whenever the ``.so`` is there, so is its record."""
        cache_trust.make_private_dirs(build_dir)
        print(f"[vllm_mpk] building {self.name} in {build_dir} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        tmp = _compile(self, nvcc, build_dir)
        record = {**key, "artifact": cache_trust.artifact_record(tmp)}
        cache_trust.write_private(build_dir / KEY_FILE, (json.dumps(record, indent=1) + "\n").encode())
        os.replace(tmp, self.so_path(build_dir))
        print(f"[vllm_mpk] built {self.name} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

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

    def _corrupt_message(self, problems: list[CorruptArtifact]) -> str:
        return (f"VLLM_MPK_NO_BUILD=1 forbids building, and the cached build of JIT spec {self.name!r} fails "
                f"its check: {'; '.join(map(str, problems))}. Copy a good build there from a host with nvcc, "
                f"or unset VLLM_MPK_NO_BUILD (the entry is then moved aside and rebuilt).")


def compile_only(spec: JitSpec, out_dir: Path) -> Path:
    """Compile ``spec`` into ``out_dir/<name>.so`` without loading it (CI: no GPU, proves the
    generated sources compile). Ignores the cache and VLLM_MPK_NO_BUILD; raises BuildError."""
    out_dir = Path(out_dir)
    so = spec.so_path(out_dir)
    os.replace(_compile(spec, find_nvcc(), out_dir), so)
    return so


def _compile(spec: JitSpec, nvcc: Path, build_dir: Path) -> Path:
    """Write sources (only if changed), compile each .cu/.cpp to an object in parallel (a pybind11
    binding compiles far slower than a kernel, so keep it in its own .cpp) and link, all within
    ``build_timeout_s()``. Returns the ``.so`` under a temp name: the caller renames it into place,
    so a crashed or killed build never leaves half a ``.so`` under the final name."""
    for fname, text in spec.sources.items():
        write_if_changed(build_dir / fname, text)
    includes = [build_dir, *spec.include_dirs, Path(pybind11.get_include()), Path(sysconfig.get_paths()["include"])]
    compile_flags = [*spec.flags(), *(f"-I{d}" for d in includes)]
    units = sorted(build_dir / f for f in spec.sources if Path(f).suffix in COMPILED_SUFFIXES)
    objects = [unit.with_name(unit.name.replace(".", "_") + ".o") for unit in units]
    tmp = build_dir / f".{spec.name}.so.{os.getpid()}.tmp"
    log = build_dir / "build.log"
    deadline = time.monotonic() + build_timeout_s()
    ok = False
    try:
        with open(log, "w", opener=lambda name, flags: os.open(name, flags, cache_trust.FILE_MODE)) as out:
            ok = _run_all(out, build_dir, [[str(nvcc), *compile_flags, "-c", str(u), "-o", str(o)]
                                           for u, o in zip(units, objects, strict=True)], deadline, spec.name)
            ok = ok and _run_all(out, build_dir, [[str(nvcc), *spec.flags(), *LINK_FLAGS, *map(str, objects),
                                                   *spec.link_flags, "-o", str(tmp)]], deadline, spec.name)
    finally:
        for obj in objects:
            obj.unlink(missing_ok=True)
        if not ok:
            tmp.unlink(missing_ok=True)
    if not ok:
        tail = "\n".join(log.read_text().splitlines()[-LOG_TAIL_LINES:])
        raise BuildError(f"nvcc failed building {spec.name}; full log: {log}\n{tail}")
    os.chmod(tmp, cache_trust.ARTIFACT_MODE)
    return tmp


def _run_all(log: TextIO, cwd: Path, cmds: list[list[str]], deadline: float, spec_name: str) -> bool:
    """Run commands concurrently, append each command and its output to ``log``; all succeeded?
    Output goes to files, not pipes, so a chatty command never blocks on a full pipe. Each command
    runs in its own process group, so a timeout kills nvcc's children too."""
    outputs = [tempfile.TemporaryFile("w+") for _ in cmds]
    procs: list[subprocess.Popen] = []
    try:
        for cmd, output in zip(cmds, outputs, strict=True):
            procs.append(subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, cwd=cwd,
                                          start_new_session=True))
            _running.add(procs[-1])
        for proc in procs:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as late:
        raise BuildTimeoutError(
            f"nvcc did not finish building JIT spec {spec_name!r} within {build_timeout_s():g} s "
            f"({BUILD_TIMEOUT_ENV}: raise it if this machine is just slow); killed: {' '.join(late.cmd)}; "
            f"log: {log.name}") from None
    finally:
        for proc in procs:
            _kill(proc)
            _running.discard(proc)
        for cmd, proc, output in zip(cmds, procs, outputs, strict=False):
            output.seek(0)
            log.write(f"$ {' '.join(cmd)}\n{output.read()}exit code {proc.returncode}\n\n")
        for output in outputs:
            output.close()
    return all(proc.returncode == 0 for proc in procs)


def _kill(proc: subprocess.Popen) -> None:
    """Kill a build command still running, with its process group (nvcc's own children)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@atexit.register
def _kill_running_builds() -> None:
    """A process that exits while a build runs in a background thread (vLLM's early build) takes
    its nvcc along: left running, it would write objects a later build of that entry compiles too."""
    for proc in list(_running):
        _kill(proc)


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
