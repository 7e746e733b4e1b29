"""Qwen3-MoE decode on a Hopper GPU: two layers of the shipped qwen3-30b-a3b config against
``transformers``, at batch 1 and at batch 4 (tokens share experts), and determinism of the expert
sums. The task bodies alone run in test_megakernel.py with the op cases that fit them. Skipped
where torch sees no CUDA device."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import model_spec, seed_of
from vllm_mpk.check import check_model
from vllm_mpk.demo import gpu_model
from vllm_mpk.graph.step_state import step_inputs
from vllm_mpk.models.weights import random_weights
from vllm_mpk.runtime.megakernel import Megakernel

pytestmark = pytest.mark.gpu
NAME = "qwen3-30b-a3b"


@pytest.mark.parametrize("prompts", [[7], [5, 17, 33, 3]], ids=["bs1", "bs4"])
def test_decode_matches_transformers(prompts: list[int]) -> None:
    spec = model_spec(NAME, 2)
    result = check_model(spec, random_weights(spec, seed=seed_of(NAME)), prompts, 16, device="cuda")
    assert result.rel_error <= result.tolerance, f"rel err {result.rel_error:.2e}"
    assert result.mismatches == 0


def test_expert_sums_are_bit_identical_from_run_to_run() -> None:
    spec = model_spec(NAME, 1)
    model, _, caches, blocks = gpu_model(spec, random_weights(spec, device="cuda"), 4, 64)
    for c in caches:
        c.normal_()
    inputs = step_inputs(torch.tensor([40, 17, 33, 2]), torch.randint(0, spec.vocab_size, (4, 64)), blocks, 16)
    mk = Megakernel(model.plan, {**model.kernel.attached, **{k: v.cuda() for k, v in inputs.as_dict().items()}})
    mk.run_step(4)
    first = mk.tensors["layers.0.out"].clone()
    mk.run_step(4)
    assert torch.equal(mk.tensors["layers.0.out"], first)
