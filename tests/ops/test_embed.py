"""Embedding lookup (``graph/ops/embed.py``), vocabulary shards included."""

from __future__ import annotations

import torch

from tests.helpers import plan_inputs
from tests.ops import harness
from tests.ops.harness import BF16, BLOCK, F32, FLOAT_TOL, Built, OpTest, all_rows, kernel, randn


def build_embed(c: dict, gen: torch.Generator) -> Built:
    b, vocab, hidden, dt, start = c["batch"], c["vocab"], c["hidden"], c["dtype"], c.get("vocab_start", 0)
    n = c.get("num_tokens", b)
    weight = randn((vocab, hidden), gen, dt)
    ids = torch.randint(0, start + vocab + c.get("beyond", 0), (b,), generator=gen, dtype=torch.int32)
    mpk = kernel(b)
    out = mpk.new_tensor((b, hidden), dt, "out")
    mpk.embed_layer(None, mpk.attach_input(weight, "embed"), out, c["grid"], BLOCK, vocab_start=start)
    # ids outside [start, start + vocab) belong to another rank's shard: zero rows here
    want = torch.stack([weight[i - start] if start <= i < start + vocab else torch.zeros(hidden, dtype=dt)
                        for i in ids.tolist()])
    return Built(mpk, plan_inputs(mpk, {"input_ids": ids}), n, {"out": all_rows(n, want)})


EMBED_CASES = [
    dict(id="b1-h64-all-tiles", batch=1, vocab=50, hidden=64, grid=8, dtype=F32),
    dict(id="b5-h200-partial-tile", batch=5, vocab=1000, hidden=200, grid=3, dtype=BF16),
    dict(id="b16-shard-n13", batch=16, vocab=40, vocab_start=20, beyond=20, hidden=96, grid=12, dtype=BF16,
         num_tokens=13),
]


OP_TESTS = [OpTest("embed", build_embed, EMBED_CASES, FLOAT_TOL)]
test_matches_torch = harness.test_matches_torch
