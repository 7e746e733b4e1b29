"""``--tensor-parallel-size N --model-impl mpk`` without GPUs: which models and installs are
refused (one reason each), and the NVSHMEM bootstrap's rank check. The decode itself runs in
tests/gpu/test_tensor_parallel_gpu.py (standalone) and needs GPUs."""

from __future__ import annotations

import pytest

from tests.helpers import model_spec
from vllm_mpk.integration import tensor_parallel
from vllm_mpk.integration.tensor_parallel import bootstrap_nvshmem, tensor_parallel_problem, vocab_problem


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
