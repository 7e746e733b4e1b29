"""The first layer of a multi-step plan (``graph/ops/begin_step.py``): the decoding state moves
on by one step, checked row by row in plain Python."""

from __future__ import annotations

import torch

from tests.helpers import plan_inputs
from tests.ops import harness
from tests.ops.harness import BLOCK, INDEX_EXACT, Built, OpTest, kernel


def build_begin_step(c: dict, gen: torch.Generator) -> Built:
    """Rows in every situation: prompt (the sampled token is not written), generating, reaching
    their end, hitting EOS, a first step (nothing pending), idle, and rows past num_tokens."""
    b, width, page, n = c["batch"], c["width"], c["page"], c["num_tokens"]
    per_seq = width // page
    mpk = kernel(b, max_seq_len=width, page_size=page, meta_tensors={
        "step": torch.tensor(c["step"]), "tokens": torch.randint(0, 1000, (b, width), generator=gen)})
    sampled = mpk.attach_input(torch.tensor(c["sampled"]), "sampled")
    mpk.begin_step_layer(sampled, BLOCK)
    state = {name.removeprefix("state."): t for name, t in mpk.attached.items()}
    state["prompt_lens"].copy_(torch.tensor(c["prompt_lens"]))
    state["end"].copy_(torch.tensor(c["end"]))
    state["pending"].copy_(torch.tensor(c["pending"], dtype=torch.int32))
    state["eos"].fill_(c["eos"])
    tables = torch.randperm(b * per_seq + 2, generator=gen)[:b * per_seq].view(b, per_seq).int()
    inputs = plan_inputs(mpk, {"block_tables": tables, **{k: torch.full((b,), 7, dtype=mpk.tensors[k].dtype)
                                                          for k in ("input_ids", "positions", "seq_lens",
                                                                    "slot_mapping")}})
    after = {k: inputs[k].clone() for k in ("state.step", "state.tokens", "state.pending", "input_ids", "positions",
                                            "seq_lens", "slot_mapping")}
    step, tokens = after["state.step"], after["state.tokens"]
    for r in range(n):  # one row at a time, in plain Python
        if c["pending"][r] and step[r] >= 0:
            nxt = int(step[r]) + 1
            generating = c["prompt_lens"][r] <= nxt < width
            if generating:
                tokens[r, nxt] = c["sampled"][r]
            eos_hit = generating and c["eos"] >= 0 and c["sampled"][r] == c["eos"]
            step[r] = -1 if nxt >= c["end"][r] or eos_hit else nxt
        pos = max(int(step[r]), 0)
        active = step[r] >= 0
        after["input_ids"][r] = int(tokens[r, pos]) if active else 0
        after["positions"][r] = pos
        after["seq_lens"][r] = pos + 1 if active else 0
        after["slot_mapping"][r] = int(tables[r, pos // page]) * page + pos % page if active else -1
        after["state.pending"][r] = int(active)
    changed = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in after.items()}
    for k in changed:
        changed[k][:n] = True
    return Built(mpk, inputs, n, {}, {k: (after[k], changed[k]) for k in after})


BEGIN_STEP_CASES = [
    # rows: prompt, generating, reaching its end, EOS, first step, idle, past num_tokens
    dict(id="b7-n6-page16", batch=7, width=48, page=16, num_tokens=6, step=[2, 20, 30, 9, 0, -1, 4],
         prompt_lens=[10, 5, 5, 3, 4, 3, 3], end=[40, 40, 31, 40, 40, 0, 40], pending=[1, 1, 1, 1, 0, 0, 1],
         sampled=[11, 12, 13, 99, 15, 16, 17], eos=99),
    dict(id="b3-no-eos-page32", batch=3, width=64, page=32, num_tokens=3, step=[31, 0, 62],
         prompt_lens=[2, 1, 1], end=[63, 63, 63], pending=[1, 1, 1], sampled=[5, 99, 6], eos=-1),
]


OP_TESTS = [OpTest("begin_step", build_begin_step, BEGIN_STEP_CASES, INDEX_EXACT)]
test_matches_torch = harness.test_matches_torch
