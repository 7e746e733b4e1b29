"""All metadata lives in pyproject.toml. This file adds one build step: the hand-written CUDA
sources in ``csrc/`` (a top-level folder, beside the package) go into the wheel as
``vllm_mpk/_csrc/``, so an installed vllm_mpk can build its megakernel without the checkout.
``vllm_mpk.codegen.source.csrc_dir`` finds them in either place."""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = "csrc"  # relative to this file; setuptools runs builds from the project root
PACKAGED = os.path.join("vllm_mpk", "_csrc")  # keep in step with vllm_mpk/codegen/source.py


def csrc_files() -> list[str]:
    """Every file under csrc/, as paths relative to csrc/ (sorted: reproducible wheels)."""
    found = []
    for folder, dirs, files in os.walk(CSRC):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        found += [os.path.relpath(os.path.join(folder, f), CSRC) for f in files if not f.startswith(".")]
    if not found:
        raise RuntimeError(f"{os.path.abspath(CSRC)} is empty or missing: the sdist or checkout lacks csrc/")
    return sorted(found)


class BuildPyWithCsrc(build_py):
    """build_py, plus csrc/ copied to <build_lib>/vllm_mpk/_csrc/. An editable install copies
    nothing (the package reads csrc/ in the checkout); its strict mode links the files through
    ``get_output_mapping``."""

    def _csrc_mapping(self) -> dict[str, str]:
        return {os.path.join(self.build_lib, PACKAGED, rel): os.path.join(CSRC, rel) for rel in csrc_files()}

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for dst, src in self._csrc_mapping().items():
            self.mkpath(os.path.dirname(dst))
            self.copy_file(src, dst, preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), *self._csrc_mapping()]

    def get_output_mapping(self) -> dict[str, str]:
        return {**super().get_output_mapping(), **self._csrc_mapping()}


setup(cmdclass={"build_py": BuildPyWithCsrc})
