"""``benchmarks/megakernel_step.py`` without a GPU: the decode step it times, with the requests'
pages adjacent or drawn at random from a vLLM-like pool."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from vllm_mpk.models.catalog import resolve_model

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "megakernel_step.py"
_spec = importlib.util.spec_from_file_location("megakernel_step", PATH)
assert _spec is not None and _spec.loader is not None
megakernel_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(megakernel_step)

SPEC = resolve_model("qwen3-0.6b").spec.with_layers(2)


def test_pool_pages_are_distinct_random_pages_of_a_pool_sized_cache() -> None:
    _, tensors, caches = megakernel_step.build(SPEC, 3, 40, "cpu", pool_blocks=500)
    _, adjacent, _ = megakernel_step.build(SPEC, 3, 40, "cpu")
    pages = tensors["block_tables"].flatten()
    assert tensors["block_tables"].shape == adjacent["block_tables"].shape
    assert len(set(pages.tolist())) == pages.numel() and 0 <= int(pages.min()) and int(pages.max()) < 500
    assert not pages.equal(adjacent["block_tables"].flatten())
    assert all(c.shape[0] == 500 for c in caches)


def test_a_pool_smaller_than_the_requests_pages_is_refused() -> None:
    with pytest.raises(ValueError, match="--kv-pool-blocks 4 is below"):
        megakernel_step.build(SPEC, 3, 40, "cpu", pool_blocks=4)


@pytest.mark.parametrize("text, cap_kib, ahead, kinds, landed", [
    ("48", 48, 1, (), False),
    ("96:2,rmsnorm_linear_silu_mul=0", 96, 2, (("rmsnorm_linear_silu_mul", 0),), False),
    ("48:1@landed", 48, 1, (), True),
    ("96:2,rmsnorm_linear=32@landed", 96, 2, (("rmsnorm_linear", 32 * 1024),), True),
])
def test_prefetch_policies_parse_and_name_themselves(text: str, cap_kib: int, ahead: int, kinds: tuple,
                                                     landed: bool) -> None:
    policy = megakernel_step.prefetch_policy(text)
    assert (policy.cap_bytes, policy.ahead, policy.kind_caps, policy.landed) == (cap_kib * 1024, ahead, kinds, landed)
    assert megakernel_step.prefetch_policy(megakernel_step.policy_name(policy)) == policy


def test_an_unknown_prefetch_timing_is_refused() -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="the only timing is @landed"):
        megakernel_step.prefetch_policy("48:1@gate")
