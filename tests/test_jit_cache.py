"""The JIT cache's trust checks, without a GPU and (but for the last test) without nvcc.

A fake nvcc answers ``--version``; the compile step is replaced by one that writes known bytes, and
the import step by one that records the bytes it was handed instead of dlopen-ing them, so a test
can assert that a damaged or planted file never reached the loader.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

import vllm_mpk
from vllm_mpk.codegen import cache_trust, jit
from vllm_mpk.codegen.jit import BuildTimeoutError, CacheError, JitSpec, NoBuildError
from vllm_mpk.codegen.toolchain import BUILD_TIMEOUT_ENV, ToolchainError, build_timeout_s

FAKE_NVCC = """#!/bin/sh
if [ -n "$FAKE_NVCC_HANG" ]; then exec sleep 30; fi
if [ "$1" = --version ]; then echo "Cuda compilation tools, release 99.9, V99.9.0"; echo "Build fake"; exit 0; fi
if [ -n "$FAKE_NVCC_OK" ]; then  # write the file after -o
  while [ $# -gt 1 ]; do if [ "$1" = -o ]; then echo "fake output" > "$2"; fi; shift; done; exit 0
fi
sleep 30 &
echo $! > "$(dirname "$0")/child.pid"
wait
"""
REAL_COMPILE = jit._compile


@dataclass
class Cache:
    """One test's cache root, private fallback and fake nvcc, and what was compiled and loaded."""

    root: Path
    fallback: Path
    nvcc: Path
    compiled: list[Path] = field(default_factory=list)
    loaded: list[tuple[Path, bytes]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def loaded_from(self) -> list[Path]:
        return [path for path, _ in self.loaded]


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cache]:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(FAKE_NVCC)
    nvcc.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(nvcc.parents[1]))
    monkeypatch.setenv("VLLM_MPK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VLLM_MPK_NO_BUILD", raising=False)
    monkeypatch.delenv(BUILD_TIMEOUT_ENV, raising=False)
    state = Cache(tmp_path / "cache", cache_trust.private_root(), nvcc)

    def fake_compile(spec: JitSpec, nvcc: Path, build_dir: Path) -> Path:
        tmp = build_dir / f".{spec.name}.so.tmp"
        tmp.write_bytes(f"build {len(state.compiled) + 1} of {spec.name}\n".encode() * 64)
        state.compiled.append(build_dir)
        return tmp

    def fake_import(name: str, so: Path) -> SimpleNamespace:
        state.loaded.append((so, so.read_bytes()))
        return SimpleNamespace(so=so)

    monkeypatch.setattr(jit, "_compile", fake_compile)
    monkeypatch.setattr(jit, "_import_so", fake_import)
    handler = _ListHandler(state.warnings)
    cache_trust.logger.addHandler(handler)
    yield state
    cache_trust.logger.removeHandler(handler)


def probe_spec() -> JitSpec:
    return JitSpec("probe", {"probe.cu": "// probe\n"})


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_cache_is_private_whatever_the_umask(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jit, "_compile", REAL_COMPILE)
    monkeypatch.setenv("FAKE_NVCC_OK", "1")
    old_umask = os.umask(0)
    try:
        module = probe_spec().load()
    finally:
        os.umask(old_umask)
    build_dir = module.so.parent
    arch_dir = build_dir.parent
    for folder in (cache.root, arch_dir.parent, arch_dir, build_dir):
        assert _mode(folder) == 0o700, folder
    for private_file in (build_dir / "key.json", build_dir / "probe.cu", build_dir / "build.log",
                         probe_spec().lock_path(build_dir)):
        assert _mode(private_file) == 0o600, private_file
    assert _mode(module.so) == 0o700
    record = json.loads((build_dir / "key.json").read_text())["artifact"]
    data = module.so.read_bytes()
    assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_second_load_checks_and_reuses_the_build(cache: Cache) -> None:
    first = probe_spec().load()
    again = probe_spec().load()
    assert again.so == first.so and len(cache.compiled) == 1


def _cache_paths(cache: Cache, so: Path) -> dict[str, Path]:
    return {"root": cache.root, "arch_dir": so.parents[1], "entry": so.parent, "key": so.parent / "key.json", "so": so}


@pytest.mark.parametrize("mode", [0o020, 0o002], ids=["group", "others"])
@pytest.mark.parametrize("writable", ["root", "arch_dir", "entry", "key", "so"])
def test_cache_path_writable_by_others_is_not_used(cache: Cache, writable: str, mode: int) -> None:
    planted = probe_spec().load().so  # a build that matches its record, in a cache others may write
    path = _cache_paths(cache, planted)[writable]
    path.chmod(path.stat().st_mode | mode)
    module = probe_spec().load()
    assert module.so.is_relative_to(cache.fallback) and len(cache.compiled) == 2
    assert cache.loaded_from() == [planted, module.so]
    [warning] = cache.warnings
    assert f"{path} is writable by group or others" in warning and f"chmod go-w {path}" in warning
    assert str(cache.fallback) in warning


@pytest.mark.parametrize("foreign", ["root", "arch_dir", "entry", "key", "so"])
def test_foreign_owned_cache_path_is_not_used(cache: Cache, foreign: str, monkeypatch: pytest.MonkeyPatch) -> None:
    planted = probe_spec().load().so
    paths = _cache_paths(cache, planted)
    foreign_inode = paths[foreign].stat().st_ino
    monkeypatch.setattr(cache_trust, "_owned_by_me", lambda st: st.st_ino != foreign_inode)
    module = probe_spec().load()
    assert module.so.is_relative_to(cache.fallback)
    assert cache.loaded_from() == [planted, module.so]
    [warning] = cache.warnings
    assert f"{paths[foreign]} is owned by uid" in warning and str(cache.fallback) in warning


def test_cache_root_symlink_owned_by_another_user_is_not_used(cache: Cache, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Its owner could point it at another folder between the check and the load."""
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    cache.root.symlink_to(mine)
    planted = probe_spec().load().so
    foreign_inode = cache.root.lstat().st_ino
    monkeypatch.setattr(cache_trust, "_owned_by_me", lambda st: st.st_ino != foreign_inode)
    module = probe_spec().load()
    assert module.so.is_relative_to(cache.fallback) and cache.loaded_from() == [planted, module.so]
    [warning] = cache.warnings
    assert f"{cache.root} is owned by uid" in warning


def test_untrusted_fallback_too_is_an_error(cache: Cache) -> None:
    cache.root.mkdir(mode=0o777)
    cache.root.chmod(0o777)
    cache.fallback.mkdir()
    cache.fallback.chmod(0o777)
    with pytest.raises(CacheError, match="VLLM_MPK_CACHE_DIR") as err:
        probe_spec().load()
    assert f"chmod go-w {cache.root}" in str(err.value) and f"chmod go-w {cache.fallback}" in str(err.value)
    assert cache.compiled == [] and cache.loaded == []


def _truncate(so: Path, build_dir: Path) -> None:
    so.write_bytes(so.read_bytes()[: so.stat().st_size // 2])


def _empty(so: Path, build_dir: Path) -> None:
    so.write_bytes(b"")


def _flip_a_byte(so: Path, build_dir: Path) -> None:
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0xFF
    so.write_bytes(bytes(data))


def _drop_record(so: Path, build_dir: Path) -> None:
    key = json.loads((build_dir / "key.json").read_text())
    del key["artifact"]
    (build_dir / "key.json").write_text(json.dumps(key))


def _drop_key(so: Path, build_dir: Path) -> None:
    (build_dir / "key.json").unlink()


DAMAGE = [_truncate, _empty, _flip_a_byte, _drop_record, _drop_key]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_damaged_build_is_set_aside_and_rebuilt(cache: Cache, damage) -> None:
    so = probe_spec().load().so
    damage(so, so.parent)
    damaged = so.read_bytes()
    module = probe_spec().load()
    assert module.so == so and len(cache.compiled) == 2
    assert [data for _, data in cache.loaded][1:] == [so.read_bytes()] and so.read_bytes() != damaged
    [aside] = so.parents[1].glob(f"{so.parent.name}.bad-*")
    assert (aside / so.name).read_bytes() == damaged
    assert any(str(so.parent) in warning and str(aside) in warning for warning in cache.warnings)


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_damaged_build_with_no_build_is_an_error(cache: Cache, damage, monkeypatch: pytest.MonkeyPatch) -> None:
    so = probe_spec().load().so
    damage(so, so.parent)
    monkeypatch.setenv("VLLM_MPK_NO_BUILD", "1")
    with pytest.raises(NoBuildError, match="VLLM_MPK_NO_BUILD") as err:
        probe_spec().load()
    assert str(so) in str(err.value) and "fails its check" in str(err.value)
    assert len(cache.loaded) == 1 and len(cache.compiled) == 1 and so.is_file()  # not loaded, not moved


def test_build_that_does_not_import_is_set_aside_and_rebuilt(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = probe_spec()
    first = spec.build().so
    recording_import = jit._import_so

    def first_build_does_not_import(name: str, so: Path) -> SimpleNamespace:
        if so.read_bytes().startswith(b"build 1 "):
            raise ImportError(f"undefined symbol in {so}")
        return recording_import(name, so)

    monkeypatch.setattr(jit, "_import_so", first_build_does_not_import)
    module = spec.load()
    assert len(cache.compiled) == 2 and module.so == first and first.read_bytes().startswith(b"build 2 ")
    [aside] = first.parents[1].glob(f"{first.parent.name}.bad-*")
    assert any("does not import: undefined symbol" in warning and str(aside) in warning for warning in cache.warnings)


def _without_nvcc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", "")


def _plant_sibling(arch_dir: Path, suffix: str, data: bytes, record_data: bytes) -> Path:
    """A build folder as another nvcc would leave it, with the content hash of ``probe_spec``."""
    sibling = arch_dir / f"probe-{suffix}"
    sibling.mkdir(mode=0o700)
    (sibling / "probe.so").write_bytes(data)
    artifact = {"size": len(record_data), "sha256": hashlib.sha256(record_data).hexdigest()}
    (sibling / "key.json").write_text(json.dumps({"content": probe_spec().content_hash(), "artifact": artifact}))
    return sibling


def test_host_without_nvcc_loads_only_a_checked_sibling(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    good = probe_spec().load().so
    arch_dir = good.parents[1]
    forged = _plant_sibling(arch_dir, "0" * 12, b"forged!!", record_data=b"claimed!")
    foreign = _plant_sibling(arch_dir, "1" * 12, b"well recorded", record_data=b"well recorded")
    aside = _plant_sibling(arch_dir, "2" * 12 + ".bad-1", b"set aside", record_data=b"set aside")
    foreign_inode = foreign.stat().st_ino
    monkeypatch.setattr(cache_trust, "_owned_by_me", lambda st: st.st_ino != foreign_inode)
    for newer in (forged, foreign, aside):
        os.utime(newer / "probe.so", (good.stat().st_mtime + 60,) * 2)
    _without_nvcc(monkeypatch)
    cache.loaded.clear()
    module = probe_spec().try_load()
    assert module is not None and module.so == good and cache.loaded_from() == [good]
    assert any(str(forged / "probe.so") in warning and "sha256" in warning for warning in cache.warnings)
    assert any(f"{foreign} is owned by uid" in warning for warning in cache.warnings)


def test_host_without_nvcc_refuses_a_forged_sibling(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    arch_dir = probe_spec().arch_dir(create=True)
    forged = _plant_sibling(arch_dir, "0" * 12, b"forged!!", record_data=b"claimed!")
    _without_nvcc(monkeypatch)
    assert probe_spec().try_load() is None
    monkeypatch.setenv("VLLM_MPK_NO_BUILD", "1")
    with pytest.raises(NoBuildError, match="sha256") as err:
        probe_spec().load()
    assert str(forged / "probe.so") in str(err.value)
    assert cache.loaded == []


def test_read_only_cache_loads_but_cannot_build(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    built = probe_spec().load().so
    folders = [cache.root, *built.parents[:3]]
    for folder in folders:
        folder.chmod(0o500)
    cache.loaded.clear()
    assert probe_spec().try_load().so == built and cache.loaded_from() == [built]
    other = JitSpec("other", {"other.cu": "// other\n"})
    if os.geteuid() == 0:  # root ignores mode bits: refuse new folders as a read-only cache does
        real_mkdir = Path.mkdir

        def read_only_mkdir(self: Path, *args: object, **kwargs: object) -> None:
            if self.is_relative_to(cache.root):
                raise PermissionError(13, "Permission denied", str(self))
            real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    try:
        with pytest.raises(CacheError, match="VLLM_MPK_CACHE_DIR") as err:
            other.load()
    finally:
        for folder in folders:
            folder.chmod(0o700)
    arch_dir = built.parents[1]
    assert f"cannot create {arch_dir / other.build_dir().name} (Permission denied)" in str(err.value)
    assert f"make {arch_dir} writable" in str(err.value) and len(cache.compiled) == 1


def _is_killed(pid: int) -> bool:
    """Gone, a zombie nobody has reaped yet, or with SIGKILL pending (the kernel queues it at once,
    the process may be scheduled to die a moment later)."""
    try:
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except FileNotFoundError:
        return True
    pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
    return status["State"].startswith("Z") or bool(pending & (1 << (signal.SIGKILL - 1)))


def test_hung_nvcc_is_killed_with_an_error_naming_it(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jit, "_compile", REAL_COMPILE)  # which runs the fake nvcc: it hangs
    monkeypatch.setenv(BUILD_TIMEOUT_ENV, "1")
    spec = probe_spec()
    with pytest.raises(BuildTimeoutError, match=rf"'probe' within 1 s \({BUILD_TIMEOUT_ENV}:") as err:
        spec.build()
    assert f"killed: {cache.nvcc} " in str(err.value) and "probe.cu" in str(err.value)
    build_dir = spec.build_dir()
    assert str(err.value).endswith(f"log: {build_dir / 'build.log'}")
    assert not spec.so_path(build_dir).exists() and not list(build_dir.glob(".*.tmp"))
    assert _is_killed(int((cache.nvcc.parent / "child.pid").read_text()))  # nvcc's own children too


def test_hung_nvcc_version_is_an_error(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NVCC_HANG", "1")
    monkeypatch.setenv(BUILD_TIMEOUT_ENV, "0.3")
    with pytest.raises(ToolchainError, match=rf"{cache.nvcc} --version did not answer within 0.3 s"):
        probe_spec().build()


def test_held_build_lock_times_out_with_an_error_naming_it(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = probe_spec()
    build_dir = spec.arch_dir(create=True) / spec.build_dir().name
    lock = spec.lock_path(build_dir)
    monkeypatch.setenv(BUILD_TIMEOUT_ENV, "0.1")
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(BuildTimeoutError, match="JIT spec 'probe'") as err:
            spec.build()
    assert f"build lock {lock}" in str(err.value) and BUILD_TIMEOUT_ENV in str(err.value)
    assert cache.compiled == []


def test_concurrent_builders_build_once(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both builders reach the lock before either holds it; the second to get it finds the build."""
    both_waiting = threading.Barrier(2, timeout=30)
    real_lock = jit._build_lock

    @contextlib.contextmanager
    def lock_after_both_arrive(path: Path, spec_name: str) -> Iterator[None]:
        both_waiting.wait()
        with real_lock(path, spec_name):
            yield

    monkeypatch.setattr(jit, "_build_lock", lock_after_both_arrive)
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(probe_spec().build())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and len(cache.compiled) == 1
    assert results[0].so == results[1].so


@pytest.mark.parametrize("value", ["abc", "0", "-5", "inf", "nan"])
def test_build_timeout_must_be_positive(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BUILD_TIMEOUT_ENV, value)
    with pytest.raises(ValueError, match=f"{BUILD_TIMEOUT_ENV} must be a positive number of seconds, got '{value}'"):
        build_timeout_s()


def test_version_comes_from_metadata_or_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    assert jit.package_version.__wrapped__() == vllm_mpk.__version__

    def not_installed(name: str) -> str:
        raise jit.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(jit.importlib.metadata, "version", not_installed)
    assert jit.package_version.__wrapped__() == vllm_mpk.__version__


CAPI_CU = r"""
#include <Python.h>
static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};
static PyModuleDef def = {PyModuleDef_HEAD_INIT, "truncated", nullptr, -1, methods};
PyMODINIT_FUNC PyInit_truncated() { return PyModule_Create(&def); }
"""


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="nvcc not installed")
def test_truncated_real_build_is_rebuilt_not_loaded(tmp_path: Path) -> None:
    """dlopen of a truncated .so dies of SIGBUS, so both builds and loads run in child processes."""
    spec = JitSpec("truncated", {"truncated.cu": CAPI_CU})
    script = ("import json, sys\nfrom vllm_mpk.codegen.jit import JitSpec\n"
              "spec = JitSpec(**json.loads(sys.argv[1]))\nprint(spec.load().answer(), spec.build_dir())\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "VLLM_MPK_CACHE_DIR": str(tmp_path)}
    env.pop("VLLM_MPK_NO_BUILD", None)

    def load_in_child() -> tuple[str, Path, str]:
        done = subprocess.run([sys.executable, "-c", script, json.dumps(asdict(spec), default=str)],
                              capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        answer, build_dir = done.stdout.split()
        return answer, Path(build_dir), done.stderr

    answer, build_dir, _ = load_in_child()
    so = spec.so_path(build_dir)
    so.write_bytes(so.read_bytes()[:4096])
    answer, _, stderr = load_in_child()
    assert answer == "42" and "failed its check" in stderr and "building truncated" in stderr
    assert list(build_dir.parent.glob(f"{build_dir.name}.bad-*"))
