"""Decode plans of whole models against ``transformers`` on the same random weights
(``vllm_mpk.check.check_model``): every shipped config with its real vocabulary and one or two
layers, at batch 1 and at batch 4 with ragged prompts that cross 16-token pages; bf16 mode; and
configs no shipped model has.

Cost on CPU is dominated by the lm_head (128k-152k rows streamed on every decode step), so the
8B configs run one layer and shorter prompts. Weights are float32, so that exact mode converts
nothing per tile, and made once per config for the module.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.helpers import TINY_LLAMA, TINY_QWEN3, config_paths, model_spec, plan_inputs, torch_threads
from vllm_mpk.check import CheckResult, check_model, run_teacher_forced
from vllm_mpk.graph.reference import ReferenceExecutor
from vllm_mpk.graph.step_state import contiguous_block_tables
from vllm_mpk.models import DecodeOptions, ModelSpec, build_decoder
from vllm_mpk.models.catalog import single_gpu_models
from vllm_mpk.models.kv_cache import allocate_kv_caches
from vllm_mpk.models.weights import expected_shapes, random_weights

# exact mode is float32 end to end: measured ~1e-6 relative error of the logits
EXACT_BOUND = 2e-5
NEW_TOKENS = 2
WORKERS = 132
# layers and batch-4 prompt lengths per shipped config; lengths cross the page boundary at 16 (and 32).
# In this order, each config's weights are drawn from the previous one's where shapes allow.
SHIPPED = {
    "qwen3-0.6b": (2, [5, 17, 33, 3]),
    "qwen3-1.7b": (2, [5, 17, 33, 3]),
    "llama-3.2-1b": (2, [5, 17, 33, 3]),
    "qwen3-8b": (1, [5, 17, 3, 9]),
    "llama-3.1-8b": (1, [5, 17, 3, 9]),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Thousands of small matmuls per step: one intra-op thread avoids OpenMP hand-offs that
    dominate on a two-core machine, and far more so on a busy one."""
    with torch_threads(1):
        yield


def test_every_single_gpu_config_is_covered():
    """The configs that need tensor parallelism (too large to check a layer against transformers
    on a CPU host) are planned at TP 2, 4 and 8 in test_tensor_parallel.py instead."""
    assert sorted(SHIPPED) == single_gpu_models()
    assert set(single_gpu_models()) < set(config_paths())


def draw_weights(spec: ModelSpec, donor: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Random float32 weights at ``random_weights``' scale, taking leading slices of the previous
    config's tensors where those are large enough: the two 8B configs then draw their 2.5 GB
    embedding and lm_head once (drawing them costs more than checking a config)."""
    if donor is None:
        return random_weights(spec, seed=3, dtype=torch.float32)
    gen = torch.Generator().manual_seed(4)
    out = {}
    for name, shape in expected_shapes(spec).items():
        have = donor.get(name)
        if have is not None and have.dim() == len(shape) and all(h >= s for h, s in zip(have.shape, shape)):
            out[name] = have[tuple(slice(0, s) for s in shape)]
        elif len(shape) == 1:
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[name] = 0.02 * torch.randn(shape, generator=gen)
    return out


@pytest.fixture(scope="module")
def donor() -> dict[str, dict[str, torch.Tensor]]:
    return {}


@pytest.fixture(scope="module", params=list(SHIPPED))
def shipped(request, donor) -> tuple[str, ModelSpec, dict[str, torch.Tensor]]:
    name = request.param
    spec = model_spec(name, SHIPPED[name][0])
    donor["weights"] = weights = draw_weights(spec, donor.get("weights"))
    return name, spec, weights


def assert_matches(result: CheckResult, bound: float) -> None:
    summary = (f"rel_error {result.rel_error:.2e} (bound {bound:.0e}), {result.mismatches} greedy mismatches, "
               f"{result.near_ties} near ties; tokens {result.tokens} vs transformers {result.reference_tokens}")
    assert result.passed, summary
    assert result.rel_error <= bound, summary
    assert result.mismatches == 0, summary
    assert all(len(t) == NEW_TOKENS for t in result.tokens), summary


@pytest.mark.parametrize("batch", ["b1", "b4"])
def test_shipped_config_matches_transformers(shipped, batch: str):
    name, spec, weights = shipped
    prompts = [5] if batch == "b1" else SHIPPED[name][1]
    result = check_model(spec, weights, prompts, NEW_TOKENS, exact=True, num_workers=WORKERS)
    assert_matches(result, EXACT_BOUND)


def test_bf16_mode_matches_within_its_tolerance():
    """bf16 weights, activations and KV cache, as on the GPU: within check's bf16 tolerance."""
    spec = model_spec("qwen3-0.6b", 2)
    weights = random_weights(spec, seed=4, dtype=torch.bfloat16)
    result = check_model(spec, weights, [17, 3], NEW_TOKENS, exact=False, num_workers=WORKERS)
    assert_matches(result, result.tolerance)
    assert result.rel_error > 1e-4, "bf16 mode should round like the GPU does, not run in float32"


@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_QWEN3], ids=["llama-h384-q6-kv2-hd64-llama3-rope",
                                                                   "qwen3-h384-q6-kv2-hd128-untied"])
@pytest.mark.parametrize("prompts", [[5], [5, 17, 33, 3]], ids=["b1", "b4"])
def test_unseen_config_matches_transformers(config: dict, prompts: list[int]):
    spec = ModelSpec.from_hf_config(config)
    weights = random_weights(spec, seed=5, dtype=torch.float32)
    result = check_model(spec, weights, prompts, 4, exact=True, num_workers=7)
    summary = f"rel_error {result.rel_error:.2e}, {result.mismatches} greedy mismatches"
    assert result.passed and result.rel_error <= EXACT_BOUND, summary


def test_llama3_rope_scaling_matters_at_these_positions():
    """The unseen Llama's RoPE scaling changes the logits of its prompts; without it the check
    above could not tell scaled from unscaled RoPE."""
    spec = ModelSpec.from_hf_config(TINY_LLAMA)
    unscaled = ModelSpec.from_hf_config({**TINY_LLAMA, "rope_scaling": None})
    weights = random_weights(spec, seed=5, dtype=torch.float32)
    logits = [decode(s, weights, [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]], "schedule")[0]
              for s in (spec, unscaled)]
    assert not torch.allclose(logits[0][-1], logits[1][-1], rtol=1e-3, atol=1e-3)


def decode(spec: ModelSpec, weights: dict[str, torch.Tensor], sequences: list[list[int]],
           order: str) -> list[torch.Tensor]:
    page, max_len = 16, max(map(len, sequences))
    blocks = contiguous_block_tables(len(sequences), max_len, page)
    caches = allocate_kv_caches(spec, int(blocks.numel()), page, dtype=torch.float32)
    options = DecodeOptions(max_batch=len(sequences), max_seq_len=max_len, page_size=page, num_workers=5)
    model = build_decoder(spec, weights, caches, options)
    executor = ReferenceExecutor(model.plan, plan_inputs(model.kernel), exact=True)
    return run_teacher_forced(model, executor, sequences, blocks, order)


def test_every_order_decodes_the_same_logits():
    """The whole model through the executor in random and per-layer order gives the scheduled
    order's logits at every position of ragged requests."""
    spec = ModelSpec.from_hf_config(TINY_QWEN3)
    weights = random_weights(spec, seed=6, dtype=torch.float32)
    gen = torch.Generator().manual_seed(6)
    sequences = [torch.randint(0, spec.vocab_size, (n,), generator=gen).tolist() for n in (18, 3, 33)]
    want = decode(spec, weights, sequences, "schedule")
    for order in ("random", "layers"):
        for got, ref in zip(decode(spec, weights, sequences, order), want):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_unseen_config_with_32_token_pages_matches_transformers():
    spec = ModelSpec.from_hf_config(TINY_QWEN3)
    weights = random_weights(spec, seed=7, dtype=torch.float32)
    result = check_model(spec, weights, [31, 3, 40], 3, exact=True, page_size=32, num_workers=9)
    assert result.passed and result.rel_error <= EXACT_BOUND, f"rel_error {result.rel_error:.2e}"
