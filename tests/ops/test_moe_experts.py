"""Mixture-of-experts expert layers (``graph/ops/moe_experts.py``): the chosen experts' gate/up
projection with RMSNorm and SwiGLU, and their down projection weighted and summed into the
residual. Every case sets the weights of the experts no token of the step chose to NaN, and the
ids of the padding rows past ``num_tokens`` to an expert that does not exist: a tile that read
either would show it. Few experts and many tokens make tokens share experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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


def routing(c: dict, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token (ids int32 ``[batch, k]``, padding rows out of range) and a
    boolean mask of the experts the first ``num_tokens`` rows chose."""
    b, experts, k, n = c["batch"], c["experts"], c["k"], c.get("num_tokens", c["batch"])
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(b)]).to(torch.int32)
    ids[n:] = experts + 7
    chosen = torch.zeros(experts, dtype=torch.bool)
    chosen[ids[:n].flatten().long()] = True
    return ids, chosen


def expert_weights(shape: tuple[int, ...], chosen: torch.Tensor, gen: torch.Generator, dt: torch.dtype) -> torch.Tensor:
    w = randn(shape, gen, dt, shape[-1] ** -0.5)
    w[~chosen] = float("nan")
    return w


def build_gate_up(c: dict, gen: torch.Generator) -> Built:
    b, experts, k, hidden, inter, dt = c["batch"], c["experts"], c["k"], c["hidden"], c["inter"], c["dtype"]
    n = c.get("num_tokens", b)
    ids, chosen = routing(c, gen)
    x, nw = randn((b, hidden), gen, dt), norm_weight(hidden, gen, dt)
    w13 = expert_weights((experts, 2 * inter, hidden), chosen, gen, dt)
    mpk = kernel(b)
    out = mpk.new_tensor((b, k, inter), dt, "act")
    mpk.rmsnorm_moe_gate_up_layer(mpk.attach_input(x, "x"), mpk.attach_input(nw, "norm"), mpk.attach_input(w13, "w13"),
                                  mpk.attach_input(ids, "ids"), out, c["grid"], BLOCK, eps=EPS)
    normed = rms_norm(x, nw, EPS)
    want = torch.zeros(b, k, inter)
    for t in range(n):
        for j in range(k):
            gate, up = F.linear(normed[t], w13[int(ids[t, j])].float()).chunk(2)
            want[t, j] = F.silu(gate) * up
    return Built(mpk, plan_inputs(mpk), n, {"act": all_rows(n, want.to(dt))})


def build_down(c: dict, gen: torch.Generator) -> Built:
    b, experts, k, hidden, inter, dt = c["batch"], c["experts"], c["k"], c["hidden"], c["inter"], c["dtype"]
    n = c.get("num_tokens", b)
    ids, chosen = routing(c, gen)
    act, res = randn((b, k, inter), gen, dt), randn((b, hidden), gen, dt)
    weights = torch.softmax(torch.randn(b, k, generator=gen), dim=-1)
    w2 = expert_weights((experts, hidden, inter), chosen, gen, dt)
    mpk = kernel(b)
    out = mpk.new_tensor((b, hidden), dt, "out")
    with_residual = c.get("residual", True)  # without: a tensor-parallel rank's part of the sum
    mpk.moe_down_layer(mpk.attach_input(act, "act"), mpk.attach_input(w2, "w2"), mpk.attach_input(ids, "ids"),
                       mpk.attach_input(weights, "weights"), mpk.attach_input(res, "res") if with_residual else None,
                       out, c["grid"], BLOCK)
    want = res.float().clone() if with_residual else torch.zeros(b, hidden)
    for t in range(n):
        for j in range(k):
            want[t] += weights[t, j] * F.linear(act[t, j].float(), w2[int(ids[t, j])].float())
    return Built(mpk, plan_inputs(mpk), n, {"out": all_rows(n, want.to(dt))})


# grid: (column blocks, expert slots) for gate/up; the slots may be fewer than the experts chosen
GATE_UP_CASES = [
    dict(id="b1-e16-k4-slot-per-expert", batch=1, experts=16, k=4, hidden=64, inter=48, grid=(3, 4), dtype=F32),
    dict(id="b5-e4-k2-shared-i100-2-slots", batch=5, experts=4, k=2, hidden=96, inter=100, grid=(5, 2), dtype=F32),
    dict(id="b16-e8-k3-bf16-n9", batch=16, experts=8, k=3, hidden=128, inter=64, grid=(2, 8), dtype=BF16,
         num_tokens=9),
    dict(id="b5-e128-k8-1-block", batch=5, experts=128, k=8, hidden=64, inter=24, grid=(1, 40), dtype=F32),
    # shapes the GPU task body takes too (hidden a multiple of 256)
    dict(id="b8-e32-k8-h512-n6", batch=8, experts=32, k=8, hidden=512, inter=40, grid=(3, 32), dtype=BF16,
         num_tokens=6),
]
DOWN_CASES = [
    dict(id="b1-e16-k4", batch=1, experts=16, k=4, hidden=64, inter=48, grid=3, dtype=F32),
    dict(id="b5-e4-k2-shared-h100", batch=5, experts=4, k=2, hidden=100, inter=96, grid=7, dtype=F32),
    dict(id="b16-e8-k3-bf16-n9", batch=16, experts=8, k=3, hidden=128, inter=64, grid=8, dtype=BF16, num_tokens=9),
    dict(id="b5-e8-k2-no-residual", batch=5, experts=8, k=2, hidden=48, inter=32, grid=3, dtype=F32, residual=False),
    # shapes the GPU task body takes too (expert width a multiple of 256)
    dict(id="b8-e32-k8-i512-n6", batch=8, experts=32, k=8, hidden=80, inter=512, grid=5, dtype=BF16, num_tokens=6),
]

OP_TESTS = [OpTest("rmsnorm_moe_gate_up", build_gate_up, GATE_UP_CASES, FLOAT_TOL),
            OpTest("moe_down", build_down, DOWN_CASES, FLOAT_TOL)]
test_matches_torch = harness.test_matches_torch


def test_gate_up_tiles_share_their_column_block_and_write_it_shared() -> None:
    """Which (token, choice) a slot writes is decided at run time: every slot's write covers its
    column block of all rows, shared, and the reader (down) waits for every slot."""
    c = GATE_UP_CASES[1]
    plan = build_gate_up(c, torch.Generator().manual_seed(0)).mpk.compile()
    tasks = [t for t in plan.tasks if t.op.kind == "rmsnorm_moe_gate_up"]
    assert len(tasks) == 5 * 2 and {t.params["slot"] for t in tasks} == {0, 1}
    for t in tasks:
        (write,) = t.writes
        assert write.shared and write.box == ((0, 5), (0, 2), (t.params["col_start"], t.params["col_end"]))


@pytest.mark.parametrize("grid,message", [
    ((14, 1), r"grid_dim \(14, 1, 1\): this layer takes \(1 to 13 column blocks, 1 to 8 expert slots, 1\)"),
    ((1, 9), r"1 to 8 expert slots"),
])
def test_gate_up_grid_is_checked(grid: tuple[int, int], message: str) -> None:
    mpk = kernel(2)
    x, nw = mpk.attach_input(torch.zeros(2, 32), "x"), mpk.attach_input(torch.ones(32), "norm")
    w13 = mpk.attach_input(torch.zeros(16, 200, 32), "w13")
    ids = mpk.attach_input(torch.zeros(2, 4, dtype=torch.int32), "ids")
    with pytest.raises(ValueError, match=message):
        mpk.rmsnorm_moe_gate_up_layer(x, nw, w13, ids, mpk.new_tensor((2, 4, 100), F32, "act"), grid, BLOCK)
