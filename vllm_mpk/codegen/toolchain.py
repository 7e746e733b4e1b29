"""Find nvcc and check the GPU, failing with errors that say what to install or change.

Kept apart from ``jit.py`` so CI (nvcc, no GPU) and production hosts (GPU, maybe no nvcc) can
each check only what they need.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

BUILD_TIMEOUT_ENV = "VLLM_MPK_BUILD_TIMEOUT_S"
DEFAULT_BUILD_TIMEOUT_S = 600.0


class ToolchainError(RuntimeError):
    """nvcc is missing, or the GPU cannot run code built for the requested arch."""


def build_timeout_s() -> float:
    """Seconds one nvcc build (all its compile and link steps) may take: ``$VLLM_MPK_BUILD_TIMEOUT_S``,
    else 600, generous for the largest megakernel, so that only a hung nvcc hits it."""
    raw = os.environ.get(BUILD_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_BUILD_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{BUILD_TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return seconds


def find_nvcc() -> Path:
    """``$CUDA_HOME/bin/nvcc`` first (the user chose it), then ``nvcc`` on PATH."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return Path(cuda_home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    raise ToolchainError(
        "nvcc not found (looked in $CUDA_HOME/bin and on PATH). vllm_mpk compiles its megakernel "
        "at first use: install the CUDA 13 toolkit, or set CUDA_HOME to an existing install.")


@functools.cache
def nvcc_version(nvcc: Path) -> str:
    """The release and build line of ``nvcc --version``; memoised, so a cache hit runs it once."""
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True,
                             timeout=build_timeout_s()).stdout
    except subprocess.TimeoutExpired as err:
        raise ToolchainError(f"{nvcc} --version did not answer within {err.timeout:g} s ({BUILD_TIMEOUT_ENV}); "
                             f"check that CUDA install, or point CUDA_HOME at another one") from None
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    release = next((line for line in lines if "release" in line), "")
    return f"{release} | {lines[-1] if lines else ''}"


def _arch_capability(arch: str) -> tuple[int, int, bool]:
    """``"sm_90a"`` -> ``(9, 0, True)``; the ``a`` suffix means the exact GPU, not newer ones."""
    match = re.fullmatch(r"sm_(\d+)(\d)([af]?)", arch)
    if not match:
        raise ValueError(f"arch must look like 'sm_90a', got {arch!r}")
    return int(match[1]), int(match[2]), match[3] == "a"


@functools.cache
def check_gpu(arch: str) -> None:
    """Raise if a GPU is visible that cannot run ``arch`` code. No GPU (CI) passes."""
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        return
    major, minor, exact = _arch_capability(arch)
    device = torch.cuda.current_device()
    have = torch.cuda.get_device_capability(device)
    if have == (major, minor) or (not exact and have > (major, minor)):
        return
    raise ToolchainError(
        f"GPU {device} is {torch.cuda.get_device_name(device)} (sm_{have[0]}{have[1]}); the vllm_mpk "
        f"megakernel is built for {arch} and needs a Hopper GPU (sm_90, e.g. H100/H200).")


NVSHMEM_INSTALL_HINT = ("pip install nvidia-nvshmem-cu13 (NVSHMEM 3.4 or newer, the CUDA 13 build), or set "
                        "NVSHMEM_HOME to an NVSHMEM install with include/nvshmem.h and lib/libnvshmem_host.so*")


@dataclass(frozen=True)
class Nvshmem:
    """Where NVSHMEM's headers and libraries are (tensor-parallel megakernels link against it)."""

    include: Path
    lib: Path

    @property
    def host_library(self) -> Path:
        """``libnvshmem_host.so.3`` (the pip wheel ships no unversioned ``.so`` link)."""
        found = sorted(self.lib.glob("libnvshmem_host.so*"), key=lambda p: len(p.name))
        return found[0]

    @property
    def device_library(self) -> Path:
        return self.lib / "libnvshmem_device.a"

    def host_link_flags(self) -> list[str]:
        """nvcc link flags for the host library, found again at run time through an rpath."""
        return [f"-Xlinker={self.host_library}", f"-Xlinker=-rpath,{self.lib}"]

    def version(self) -> str:
        text = (self.include / "non_abi" / "nvshmem_version.h").read_text()
        parts = [re.search(rf"NVSHMEM_VENDOR_{p}_VERSION\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
        return ".".join(m[1] if m else "?" for m in parts)


def _nvshmem_candidates() -> list[Path]:
    home = os.environ.get("NVSHMEM_HOME")
    if home:
        return [Path(home)]  # the user chose it: never silently use another install
    try:
        import nvidia.nvshmem as package  # the nvidia-nvshmem-cu13 wheel (a namespace package)
    except ImportError:
        return []
    return [Path(p) for p in getattr(package, "__path__", [])]


def _is_nvshmem(root: Path) -> bool:
    return (root / "include" / "nvshmem.h").is_file() and any((root / "lib").glob("libnvshmem_host.so*")) \
        and (root / "lib" / "libnvshmem_device.a").is_file()


@functools.cache
def find_nvshmem() -> Nvshmem:
    """``$NVSHMEM_HOME`` if set, else the ``nvidia.nvshmem`` package. Raises ToolchainError naming
    what to install."""
    candidates = _nvshmem_candidates()
    for root in candidates:
        if _is_nvshmem(root):
            return Nvshmem(root / "include", root / "lib")
    where = ", ".join(map(str, candidates)) or "no NVSHMEM_HOME and no nvidia.nvshmem package"
    raise ToolchainError(f"NVSHMEM not found (looked at: {where}); tensor-parallel megakernels need it: "
                         f"{NVSHMEM_INSTALL_HINT}.")


def has_nvshmem() -> bool:
    try:
        find_nvshmem()
    except ToolchainError:
        return False
    return True
