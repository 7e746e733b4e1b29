"""Mixture-of-experts routing (``graph/ops/moe_topk.py``): softmax over the router logits, the
top-k experts in descending weight order (ties, frequent with bf16 logits: the lower id first),
their weights renormalised or not."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import plan_inputs
from tests.ops import harness
from tests.ops.harness import BF16, BLOCK, F32, FLOAT_TOL, INDEX_EXACT, Built, OpTest, all_rows, kernel, randn


def build_moe_topk(c: dict, gen: torch.Generator) -> Built:
    b, experts, k, dt = c["batch"], c["experts"], c["k"], c["dtype"]
    n = c.get("num_tokens", b)
    logits = randn((b, experts), gen, dt, 2.0)
    mpk = kernel(b)
    ids, weights = mpk.new_tensor((b, k), torch.int32, "ids"), mpk.new_tensor((b, k), F32, "weights")
    mpk.moe_topk_layer(mpk.attach_input(logits, "logits"), ids, weights, c["grid"], BLOCK, top_k=k,
                       normalize=c["normalize"])
    probs, order = torch.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True, stable=True)
    want_w = probs[:, :k] / probs[:, :k].sum(-1, keepdim=True) if c["normalize"] else probs[:, :k]
    return Built(mpk, plan_inputs(mpk), n, {"ids": all_rows(n, order[:, :k].to(torch.int32)),
                                            "weights": all_rows(n, want_w)})


TOPK_CASES = [
    dict(id="b1-e16-k4-norm", batch=1, experts=16, k=4, grid=1, dtype=F32, normalize=True),
    dict(id="b5-e128-k8-bf16-logits", batch=5, experts=128, k=8, grid=3, dtype=BF16, normalize=True),
    dict(id="b16-e8-k8-every-expert-n11", batch=16, experts=8, k=8, grid=16, dtype=F32, normalize=False,
         num_tokens=11),
    dict(id="b5-e60-k1-unnormalised", batch=5, experts=60, k=1, grid=5, dtype=F32, normalize=False),
]

OP_TESTS = [OpTest("moe_topk", build_moe_topk, TOPK_CASES, {**INDEX_EXACT, F32: FLOAT_TOL[F32]})]
test_matches_torch = harness.test_matches_torch


@pytest.mark.parametrize("top_k,ids_dtype,message", [
    (0, torch.int32, "top_k must be an int from 1 to the 16 experts, got 0"),
    (17, torch.int32, "top_k must be an int from 1 to the 16 experts, got 17"),
    (4, torch.int64, "expert_ids 'ids' has dtype int64, expected one of int32"),
])
def test_bad_routing_is_refused(top_k: int, ids_dtype: torch.dtype, message: str) -> None:
    mpk = kernel(2)
    ids, weights = mpk.new_tensor((2, 4), ids_dtype, "ids"), mpk.new_tensor((2, 4), F32, "weights")
    logits = mpk.attach_input(torch.zeros(2, 16), "logits")
    with pytest.raises(ValueError, match=message):
        mpk.moe_topk_layer(logits, ids, weights, 1, BLOCK, top_k=top_k)
