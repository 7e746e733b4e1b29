"""SwiGLU's ``silu(gate) * up`` as a layer of its own (``graph/ops/silu_mul.py``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tests.helpers import plan_inputs
from tests.ops import harness
from tests.ops.harness import BF16, BLOCK, F32, FLOAT_TOL, Built, OpTest, all_rows, kernel, randn


def build_silu_mul(c: dict, gen: torch.Generator) -> Built:
    b, inter, dt = c["batch"], c["inter"], c["dtype"]
    n = c.get("num_tokens", b)
    x = randn((b, 2 * inter), gen, dt, 2.0)
    mpk = kernel(b)
    out = mpk.new_tensor((b, inter), dt, "out")
    mpk.silu_mul_layer(mpk.attach_input(x, "gate_up"), out, c["grid"], BLOCK)
    want = F.silu(x.float()[:, :inter]) * x.float()[:, inter:]
    return Built(mpk, plan_inputs(mpk), n, {"out": all_rows(n, want.to(dt))})


SILU_CASES = [
    dict(id="b1-i8", batch=1, inter=8, grid=1, dtype=F32),
    dict(id="b5-i100-partial-tile", batch=5, inter=100, grid=13, dtype=BF16),
    dict(id="b16-i64-n3", batch=16, inter=64, grid=3, dtype=F32, num_tokens=3),
]


OP_TESTS = [OpTest("silu_mul", build_silu_mul, SILU_CASES, FLOAT_TOL)]
test_matches_torch = harness.test_matches_torch


def test_silu_definition() -> None:
    assert math.isclose(float(F.silu(torch.tensor(1.0))), 1 / (1 + math.exp(-1)), rel_tol=1e-6)
