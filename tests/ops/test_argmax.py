"""Greedy sampling (``graph/ops/argmax.py``): ties to the lower index, vocabulary shards."""

from __future__ import annotations

import torch

from tests.helpers import plan_inputs
from tests.ops import harness
from tests.ops.harness import BF16, BLOCK, EXACT, F32, Built, OpTest, all_rows, kernel, randn


def build_argmax(c: dict, gen: torch.Generator) -> Built:
    b, vocab, dt, start = c["batch"], c["vocab"], c["dtype"], c.get("vocab_start", 0)
    n = c.get("num_tokens", b)
    logits = randn((b, vocab), gen, dt)
    for row, (i, j) in enumerate(c.get("ties", ())):  # equal maxima: the lower index wins
        logits[row, i] = logits[row, j] = logits[row].max() + 1
    mpk = kernel(b)
    out = mpk.new_tensor((b,), torch.int64, "tokens")
    mpk.argmax_layer(mpk.attach_input(logits, "logits"), out, c["grid"], BLOCK, vocab_start=start)
    want = torch.argmax(logits.float(), dim=-1) + start
    return Built(mpk, plan_inputs(mpk), n, {"tokens": all_rows(n, want)})


ARGMAX_CASES = [
    dict(id="b1-v1000-one-tile", batch=1, vocab=1000, grid=1, dtype=F32),
    dict(id="b5-v151936-grid132", batch=5, vocab=151936, grid=132, dtype=F32, ties=[(7, 151935), (140000, 150000)]),
    dict(id="b16-bf16-ties-shard-n12", batch=16, vocab=1000, grid=7, dtype=BF16, vocab_start=1000,
         ties=[(0, 999), (143, 144), (5, 6), (500, 501)], num_tokens=12),
]


OP_TESTS = [OpTest("argmax", build_argmax, ARGMAX_CASES, EXACT)]
test_matches_torch = harness.test_matches_torch
