"""``--tensor-parallel-size N --model-impl mpk`` without GPUs: which models and installs are
refused (one reason each), the NVSHMEM bootstrap's rank check, and the ranks' agreement on their
builds before any NVSHMEM collective (over gloo, bounded). The decode itself runs in
tests/gpu/test_tensor_parallel_gpu.py (standalone) and needs GPUs."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import model_spec
from vllm_mpk.integration import tensor_parallel
from vllm_mpk.integration.tensor_parallel import (
    REASON_BYTES,
    _decode,
    _encode,
    agree_on_build,
    bootstrap_nvshmem,
    exchange_outcomes,
    first_problem,
    tensor_parallel_problem,
    vocab_problem,
)


def test_one_rank_needs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensor_parallel, "has_nvshmem", lambda: False)
    assert tensor_parallel_problem(model_spec("qwen3-0.6b", 2), 1) is None


def test_missing_nvshmem_is_a_fallback_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensor_parallel, "has_nvshmem", lambda: False)
    problem = tensor_parallel_problem(model_spec("qwen3-0.6b", 2), 2)
    assert problem is not None and "NVSHMEM" in problem and "pip install nvidia-nvshmem-cu13" in problem


def test_sizes_that_do_not_shard_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensor_parallel, "has_nvshmem", lambda: True)
    problem = tensor_parallel_problem(model_spec("qwen3-0.6b", 2), 3)
    assert problem is not None and "does not divide" in problem
    assert tensor_parallel_problem(model_spec("llama-3.2-1b", 2), 2) is None


def test_padded_vocabulary_shards_are_refused() -> None:
    spec = model_spec("qwen3-0.6b", 2)
    local_rows = spec.shard(2).vocab_size
    assert vocab_problem(spec, 2, local_rows) is None
    assert vocab_problem(spec, 1, spec.vocab_size + 64) is None  # one rank: padding is fine
    problem = vocab_problem(spec, 2, local_rows + 32)
    assert problem is not None and "padded" in problem


def test_bootstrap_checks_the_pe_against_the_tp_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    nv = tensor_parallel.nvshmem
    monkeypatch.setattr(nv, "is_initialized", lambda: True)
    monkeypatch.setattr(nv, "n_pes", lambda: 2)
    monkeypatch.setattr(nv, "my_pe", lambda: 0)
    bootstrap_nvshmem(2, 0)
    with pytest.raises(RuntimeError, match="PE 0 of 2, but it is tensor-parallel rank 1 of 2"):
        bootstrap_nvshmem(2, 1)


# agreement before the collectives -------------------------------------------------------------------


def test_every_rank_learns_the_first_failing_ranks_reason() -> None:
    assert first_problem([None, None]) is None
    assert first_problem([None, "nvcc failed", "out of memory"]) == "tensor-parallel rank 1: nvcc failed"
    for problem in (None, "", "é" * 10, "x" * (2 * REASON_BYTES)):
        decoded = _decode(_encode(problem))
        assert decoded == (None if problem is None else problem.encode()[:REASON_BYTES].decode(errors="replace"))


def _gather_rank(rank: int, port: int, problems: list[str | None], out: str, timeout_s: float) -> None:
    """One process of a two-rank gloo group (a CPU group, as vLLM's TP group has): its outcome
    list, or the timeout's message when its peer never takes part (problem "absent")."""
    import json
    import os
    import time
    from pathlib import Path

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if problems[rank] == "absent":  # alive but elsewhere (still compiling, stuck) until its peer gave up
        while not Path(out, "0.json").exists():
            time.sleep(0.1)
    else:
        try:
            result: object = exchange_outcomes(problems[rank], None, timeout_s)
        except TimeoutError as e:
            result = f"timeout: {e}"
        Path(out, f"{rank}.json.tmp").write_text(json.dumps(result))
        Path(out, f"{rank}.json.tmp").rename(Path(out, f"{rank}.json"))
    os._exit(0)  # past a timed-out collective, gloo's teardown at exit would abort


@pytest.mark.parametrize("problems,timeout_s", [([None, "nvcc failed"], 120.0), ([None, None], 120.0),
                                                ([None, "absent"], 2.0)])
def test_outcomes_travel_over_a_gloo_group_and_an_absent_rank_times_out(problems: list[str | None], timeout_s: float,
                                                                        tmp_path: Path) -> None:
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_rank, args=(port, problems, str(tmp_path), timeout_s), nprocs=2)
    results = {int(p.stem): json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    if "absent" in problems:
        assert list(results) == [0] and results[0].startswith("timeout: not every tensor-parallel rank reported")
    else:
        assert results == {0: problems, 1: problems}


class TwoRanks:
    """A fake TP group of two threads named rank0 and rank1: ``agree_on_build`` over it."""

    def __init__(self) -> None:
        self.outcomes: list[str | None] = [None, None]
        self.met = threading.Barrier(2, timeout=60)

    def agree_on_build(self, problem: str | None) -> str | None:
        self.outcomes[int(threading.current_thread().name[-1])] = problem
        self.met.wait()
        return first_problem(self.outcomes)


def test_one_rank_failing_its_build_sends_every_rank_to_the_stock_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1's build fails before any collective: both ranks learn it, both fall back with its
    reason, and neither enters NVSHMEM's bootstrap or allocations."""
    from vllm_mpk.integration import model as integration
    from vllm_mpk.integration.options import MpkOptions

    group, collectives = TwoRanks(), []
    monkeypatch.setattr(integration, "agree_on_build", group.agree_on_build)

    def plan(self: Any, *args: Any) -> str:
        if threading.current_thread().name == "rank1":
            raise RuntimeError("nvcc exited with status 1")
        return "planned"

    monkeypatch.setattr(integration.MpkRuntime, "_problem", lambda self, input_ids: None)
    monkeypatch.setattr(integration.MpkRuntime, "_plan", plan)
    monkeypatch.setattr(integration.MpkRuntime, "_load", lambda self, planned: collectives.append(planned))
    runtimes = []
    for _ in range(2):
        runtime = integration.MpkRuntime.__new__(integration.MpkRuntime)
        runtime.options, runtime.disabled, runtime.reservation, runtime.kernels = MpkOptions(), None, None, {}
        runtimes.append(runtime)
    built: dict[str, bool] = {}
    threads = [threading.Thread(name=f"rank{r}", target=lambda r=r: built.update(
        {f"rank{r}": runtimes[r]._build(None, torch.zeros(1), torch.zeros(1), None)})) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert built == {"rank0": False, "rank1": False} and not collectives
    for runtime in runtimes:
        assert runtime.disabled == "tensor-parallel rank 1: building the megakernel failed: RuntimeError: nvcc exited " \
                                   "with status 1"


def test_one_rank_agrees_with_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensor_parallel, "tp_rank_and_size", lambda: (0, 1))
    assert agree_on_build(None) is None and agree_on_build("no NVSHMEM") == "no NVSHMEM"


def test_a_collective_nvshmem_call_that_never_returns_is_given_up() -> None:
    from vllm_mpk.runtime import nvshmem

    gate = threading.Event()
    with pytest.raises(nvshmem.NvshmemError, match="barrier did not finish within 0.5 s"):
        nvshmem._bounded(gate.wait, "barrier", timeout_s=0.5)
    gate.set()
    assert nvshmem._bounded(lambda: 7, "barrier", timeout_s=5) == 7
    with pytest.raises(ValueError, match="bad size"):
        nvshmem._bounded(lambda: (_ for _ in ()).throw(ValueError("bad size")), "symmetric allocation")
