"""pytest-benchmark: vLLM's time per output token for Qwen3-0.6B, stock and ``--model-impl mpk``,
each engine in its own process (``vllm_mpk.bench.worker``, as ``vllm-mpk bench`` runs it). The
benchmark's rounds are the worker's TPOT samples; ``extra_info`` carries the median forward and
lm_head GPU times and the engine start time. The full table over every model: ``vllm-mpk bench``.

    python -m pytest benchmarks/test_vllm_tpot.py --benchmark-columns=median,min,max
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from vllm_mpk.bench.runner import Row, run_engine
from vllm_mpk.bench.worker import EngineConfig

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm"),
]

MODEL = "qwen3-0.6b"
BATCHES = (1, 8)
# Leaves room for what other benchmarks in this pytest process still hold on the GPU.
GPU_MEMORY_UTILIZATION = 0.5


@pytest.fixture(scope="module", params=["vllm", "mpk"])
def engine_rows(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Row]:
    cfg = EngineConfig(MODEL, request.param, BATCHES, gpu_memory_utilization=GPU_MEMORY_UTILIZATION)
    log: Path = tmp_path_factory.mktemp("vllm_tpot") / f"{MODEL}-{request.param}.log"
    rows = run_engine(cfg, log, timeout_s=300)
    if errors := [r["error"] for r in rows if "error" in r]:
        pytest.fail(f"{MODEL} {request.param}: {errors[0]}")
    return {r["batch"]: r for r in rows}


def record_samples(benchmark: BenchmarkFixture, seconds: list[float]) -> None:
    """Report durations measured in another process as this benchmark's rounds. pytest-benchmark
    has no public call for that; this is what its own ``pedantic`` does with each round."""
    if benchmark.disabled:
        return
    benchmark._mode = "samples from vllm_mpk.bench.worker"
    stats = benchmark._make_stats(1)
    for s in seconds:
        stats.update(s)


@pytest.mark.parametrize("batch", BATCHES)
def test_vllm_tpot(benchmark: BenchmarkFixture, engine_rows: dict[int, Row], batch: int) -> None:
    r = engine_rows[batch]
    record_samples(benchmark, [ms / 1e3 for ms in r["tpot_samples_ms"]])
    benchmark.extra_info.update({k: r[k] for k in ("model", "impl", "batch", "tpot_ms", "forward_ms", "lm_head_ms",
                                                   "graph_tokens", "gpu", "engine_s", "compilation")})
