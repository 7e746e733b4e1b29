"""Tests marked ``gpu`` are skipped when torch sees no CUDA device, so CI runs on CPU-only hosts.
Each test has a plan cache of its own (``codegen/plan_cache.py``), empty at its start: a plan one
test compiled would otherwise be restored, not compiled, by the next (and land in the user's cache).
Each test starts with torch's default dtype float32: vLLM's ``set_default_torch_dtype`` does not
restore it when the code inside raises, and a test that failed there would leave bfloat16 behind."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    torch.set_default_dtype(torch.float32)


@pytest.fixture(autouse=True)
def plan_cache_root(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cache root the plan cache uses in this test (compiled kernels keep the configured one)."""
    from vllm_mpk.codegen import plan_cache

    root = tmp_path_factory.mktemp("plan-cache")
    monkeypatch.setattr(plan_cache, "cache_root", lambda: root)
    return root


@pytest.fixture(scope="session")
def vllm_plugin_installed() -> None:
    """Fails the test at once, saying what to install, where a vLLM engine it starts would not load
    this package's plugin and so would time vLLM's own layers under mpk's name."""
    from tests.helpers import plugin_missing

    if (why := plugin_missing()) is not None:
        pytest.fail(why)


@pytest.fixture
def vllm_parser() -> Iterator[Callable[[Callable[[Any], Any]], Any]]:
    """Build a parser with one of vLLM's ``add_cli_args``. vLLM's engine arguments infer a device
    as they are defined; on a host without a GPU, its CPU platform (restored afterwards, also in the
    vLLM modules that bound the platform at import: ``helpers.vllm_platform``) decides."""
    from vllm.platforms.cpu import CpuPlatform

    from tests.helpers import vllm_platform

    with vllm_platform(CpuPlatform()):
        yield build_parser


def build_parser(add_args):
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    return add_args(parser) or parser
