"""The linear family (``graph/ops/linear.py``): plain, with residual, with the RMSNorm or SwiGLU
fused before it, and the gate/up projection that applies SwiGLU to its own output."""

from __future__ import annotations

from collections.abc import Callable

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
from vllm_mpk.graph.reference import ReferenceExecutor


def build_linear_family(kind: str) -> Callable[[dict, torch.Generator], Built]:
    def build(c: dict, gen: torch.Generator) -> Built:
        b, k, nout, dt = c["batch"], c["k"], c["n"], c["dtype"]
        wdt, odt = c.get("weight_dtype", dt), c.get("out_dtype", dt)
        n = c.get("num_tokens", b)
        width = 2 * k if kind.startswith("silu_mul_linear") else k
        rows = 2 * nout if kind == "rmsnorm_linear_silu_mul" else nout  # [gate | up] weight rows
        x, w = randn((b, width), gen, dt), randn((rows, k), gen, wdt, k ** -0.5)
        mpk = kernel(b)
        X, W, out = mpk.attach_input(x, "x"), mpk.attach_input(w, "w"), mpk.new_tensor((b, nout), odt, "out")
        bias = randn((nout,), gen, wdt) if c.get("bias") else None
        B = mpk.attach_input(bias, "bias") if bias is not None else None
        res = randn((b, nout), gen, dt)
        if kind == "linear":
            mpk.linear_layer(X, W, out, c["grid"], BLOCK, bias=B)
            want = F.linear(x.float(), w.float(), None if bias is None else bias.float())
        elif kind == "linear_with_residual":
            mpk.linear_with_residual_layer(X, W, mpk.attach_input(res, "res"), out, c["grid"], BLOCK, bias=B)
            want = F.linear(x.float(), w.float(), None if bias is None else bias.float()) + res.float()
        elif kind == "rmsnorm_linear":
            nw = norm_weight(k, gen, dt)
            mpk.rmsnorm_linear_layer(X, mpk.attach_input(nw, "norm"), W, out, c["grid"], BLOCK, eps=EPS)
            want = F.linear(rms_norm(x, nw, EPS), w.float())
        elif kind == "rmsnorm_linear_silu_mul":
            nw = norm_weight(k, gen, dt)
            mpk.rmsnorm_linear_silu_mul_layer(X, mpk.attach_input(nw, "norm"), W, out, c["grid"], BLOCK, eps=EPS)
            gate, up = F.linear(rms_norm(x, nw, EPS), w.float()).chunk(2, dim=-1)
            want = F.silu(gate) * up
        elif kind == "silu_mul_linear":
            gate, up = x.float()[:, :k], x.float()[:, k:]
            mpk.silu_mul_linear_layer(X, W, out, c["grid"], BLOCK)
            want = F.linear(F.silu(gate) * up, w.float())
        else:
            gate, up = x.float()[:, :k], x.float()[:, k:]
            mpk.silu_mul_linear_with_residual_layer(X, W, mpk.attach_input(res, "res"), out, c["grid"], BLOCK)
            want = F.linear(F.silu(gate) * up, w.float()) + res.float()
        return Built(mpk, plan_inputs(mpk), n, {"out": all_rows(n, want.to(odt))})

    return build


LINEAR_CASES = [
    dict(id="b1-k64-n48", batch=1, k=64, n=48, grid=3, dtype=F32),
    dict(id="b5-k200-n100-bias", batch=5, k=200, n=100, grid=7, dtype=BF16, bias=True),
    dict(id="b16-n33-bias-mixed", batch=16, k=128, n=33, grid=2, dtype=F32, weight_dtype=BF16, bias=True),
    dict(id="b16-n256-n9", batch=16, k=96, n=256, grid=16, dtype=BF16, out_dtype=F32, num_tokens=9),
]
RESIDUAL_CASES = [
    dict(id="b1-k64-n48", batch=1, k=64, n=48, grid=1, dtype=F32),
    dict(id="b5-k200-n100", batch=5, k=200, n=100, grid=7, dtype=BF16),
    dict(id="b16-n40-bias-n14", batch=16, k=128, n=40, grid=2, dtype=F32, bias=True, num_tokens=14),
]
NORM_LINEAR_CASES = [
    dict(id="b1-k64-n16", batch=1, k=64, n=16, grid=1, dtype=F32),
    dict(id="b5-k1000-n100", batch=5, k=1000, n=100, grid=4, dtype=BF16),
    dict(id="b16-k128-n200-f32-out", batch=16, k=128, n=200, grid=13, dtype=BF16, out_dtype=F32),
]
# n: output columns (the SwiGLU width I); the weight has 2n rows. grid 7 over 100 columns leaves a
# last tile of 4 columns, whose gate and up rows share one 16-row tensor-core group on the GPU.
NORM_SILU_CASES = [
    dict(id="b1-k64-n16", batch=1, k=64, n=16, grid=1, dtype=F32),
    dict(id="b5-k1000-n100", batch=5, k=1000, n=100, grid=7, dtype=BF16),
    dict(id="b16-k128-n200-n11", batch=16, k=128, n=200, grid=13, dtype=F32, num_tokens=11),
]
SILU_LINEAR_CASES = [
    dict(id="b1-i64-n48", batch=1, k=64, n=48, grid=3, dtype=F32),
    dict(id="b5-i100-n100", batch=5, k=100, n=100, grid=7, dtype=BF16),
    dict(id="b16-i32-n16-n7", batch=16, k=32, n=16, grid=1, dtype=F32, num_tokens=7),
]


OP_TESTS = [
    OpTest("linear", build_linear_family("linear"), LINEAR_CASES, FLOAT_TOL),
    OpTest("linear_with_residual", build_linear_family("linear_with_residual"), RESIDUAL_CASES, FLOAT_TOL),
    OpTest("rmsnorm_linear", build_linear_family("rmsnorm_linear"), NORM_LINEAR_CASES, FLOAT_TOL),
    OpTest("rmsnorm_linear_silu_mul", build_linear_family("rmsnorm_linear_silu_mul"), NORM_SILU_CASES, FLOAT_TOL),
    OpTest("silu_mul_linear", build_linear_family("silu_mul_linear"), SILU_LINEAR_CASES, FLOAT_TOL),
    OpTest("silu_mul_linear_with_residual", build_linear_family("silu_mul_linear_with_residual"),
           SILU_LINEAR_CASES, FLOAT_TOL),
]
test_matches_torch = harness.test_matches_torch


def test_outputs_are_poisoned_between_steps():
    """A second step with fewer tokens leaves the rows it does not run poisoned, not stale."""
    gen = torch.Generator().manual_seed(1)
    built = build_linear_family("linear")(LINEAR_CASES[1], gen)
    executor = ReferenceExecutor(built.mpk.compile(), built.inputs)
    executor.run_step(5)
    assert not executor.tensors["out"].isnan().any()
    executor.run_step(2)
    assert executor.tensors["out"][2:].isnan().all()
    assert not executor.tensors["out"][:2].isnan().any()
