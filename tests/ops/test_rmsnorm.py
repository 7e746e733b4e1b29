"""RMSNorm with and without the fused residual add (``graph/ops/rmsnorm.py``)."""

from __future__ import annotations

import torch

from tests.helpers import plan_inputs
from tests.ops import harness
from tests.ops.harness import (
    BF16,
    BLOCK,
    EPS,
    F32,
    FLOAT_TOL,
    Built,
    OpTest,
    all_rows,
    kernel,
    norm_weight,
    randn,
    rms_norm,
)


def build_rmsnorm(c: dict, gen: torch.Generator) -> Built:
    b, h, dt, eps = c["batch"], c["hidden"], c["dtype"], c.get("eps", EPS)
    n = c.get("num_tokens", b)
    x, w = randn((b, h), gen, dt, 3.0), norm_weight(h, gen, dt)
    mpk = kernel(b)
    out = mpk.new_tensor((b, h), dt, "out")
    expected = {}
    if c["residual"]:
        res = randn((b, h), gen, dt)
        res_out = mpk.new_tensor((b, h), dt, "res_out")
        mpk.rmsnorm_layer(mpk.attach_input(x, "x"), mpk.attach_input(w, "w"), out, c["grid"], BLOCK, eps=eps,
                          residual=mpk.attach_input(res, "res"), residual_output=res_out)
        hidden = x.float() + res.float()
        expected["res_out"] = all_rows(n, hidden.to(dt))
    else:
        mpk.rmsnorm_layer(mpk.attach_input(x, "x"), mpk.attach_input(w, "w"), out, c["grid"], BLOCK, eps=eps)
        hidden = x.float()
    expected["out"] = all_rows(n, rms_norm(hidden, w, eps).to(dt))
    return Built(mpk, plan_inputs(mpk), n, expected)


RMSNORM_CASES = [
    dict(id="b1-h64", batch=1, hidden=64, grid=1, dtype=F32, residual=False),
    dict(id="b5-h1000-residual", batch=5, hidden=1000, grid=2, dtype=BF16, residual=True, eps=1e-5),
    dict(id="b16-residual-n11", batch=16, hidden=128, grid=16, dtype=F32, residual=True, num_tokens=11),
    dict(id="b16-grid5", batch=16, hidden=72, grid=5, dtype=BF16, residual=False),
]


OP_TESTS = [OpTest("rmsnorm", build_rmsnorm, RMSNORM_CASES, FLOAT_TOL)]
test_matches_torch = harness.test_matches_torch


def test_rms_norm_definition() -> None:
    """With a unit weight the normalised rows have unit mean square."""
    x = torch.randn(3, 64)
    torch.testing.assert_close(rms_norm(x, torch.ones(64), 0.0).pow(2).mean(-1), torch.ones(3))
