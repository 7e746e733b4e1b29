"""Linear layers: ``y = f(x) W^T (+ bias) (+ residual)`` with ``f`` the identity, ``rmsnorm`` or
SwiGLU's ``silu(gate) * up`` over vLLM's merged ``[gate | up]`` input (each tile then recomputes
the activation of the whole row, I values, cheaper than a round trip through memory and an event),
and ``rmsnorm_linear_silu_mul``, the gate/up projection that applies SwiGLU to its own output (a
tile owns matching gate and up rows), so the down projection after it is a plain linear layer.

Tiles own a contiguous block of output columns (weight rows) and read the whole input row, so
each tile streams its own slice of the weight exactly once. Column blocks are multiples of 16,
the tensor-core tile width on the GPU.
"""

from __future__ import annotations

import torch

from vllm_mpk.graph.ir import Access, Op, split_even
from vllm_mpk.graph.ops.base import (
    FLOAT_DTYPES,
    Env,
    OpDef,
    Tile,
    col_box,
    expect_dtype,
    expect_positive,
    expect_rank,
    expect_shape,
    expect_tiles,
    layer_error,
    rms_normalize,
    rows,
    store,
)
from vllm_mpk.graph.ops.silu_mul import silu_mul

COLUMN_ALIGN = 16


class LinearFamily(OpDef):
    """Shared checks, tiling and arithmetic for the linear layers."""

    column_align = COLUMN_ALIGN  # output columns per tiling unit: 16 weight rows
    required_inputs = ("input", "weight")
    optional_inputs: tuple[str, ...] = ("bias",)
    normalized = False
    gated = False  # input is [gate | up], twice the weight's width
    silu_output = False  # weight is [gate | up]: output column c is silu(gate row c) * (up row I + c)
    with_residual = False

    def weight_rows(self, columns: int, c0: int, c1: int) -> list[tuple[int, int]]:
        """The weight row blocks that output columns [c0, c1) of a ``columns``-wide output read."""
        return [(c0, c1), (columns + c0, columns + c1)] if self.silu_output else [(c0, c1)]

    def check(self, op: Op) -> None:
        x, w, out = op.inputs["input"], op.inputs["weight"], op.outputs["output"]
        for role, t in (("input", x), ("weight", w), ("output", out)):
            expect_rank(op, role, t, 2)
            expect_dtype(op, role, t, FLOAT_DTYPES)
        batch, height = x.shape[0], w.shape[0]
        if self.silu_output and height % 2:
            raise layer_error(op, f"weight '{w.name}' has {height} rows; expected an even [gate | up] height")
        n = height // 2 if self.silu_output else height  # output columns
        if self.gated:  # the weight's width I fixes the input's: [gate | up] = 2I
            k = w.shape[1]
            expect_shape(op, "input", x, (batch, 2 * k))
        else:
            k = x.shape[1]
            expect_shape(op, "weight", w, (height, k))
        expect_shape(op, "output", out, (batch, n))
        if "bias" in op.inputs:
            expect_shape(op, "bias", op.inputs["bias"], (n,))
        if self.with_residual:
            expect_shape(op, "residual", op.inputs["residual"], (batch, n))
        if self.normalized:
            expect_shape(op, "norm weight", op.inputs["norm_weight"], (k,))
            expect_positive(op, "eps")
        expect_tiles(op, -(-n // self.column_align), f"{n} output columns in blocks of {self.column_align}")

    def lower(self, op: Op) -> list[Tile]:
        x, w, out = op.inputs["input"], op.inputs["weight"], op.outputs["output"]
        batch, k, n = x.shape[0], w.shape[1], out.shape[1]
        tiles = []
        for c0, c1 in split_even(n, op.num_tiles, self.column_align):
            blocks = self.weight_rows(n, c0, c1)
            reads = [Access(x.name, x.full_box), *(Access(w.name, (block, (0, k))) for block in blocks)]
            if "bias" in op.inputs:
                reads.append(Access(op.inputs["bias"].name, ((c0, c1),)))
            if self.with_residual:
                reads.append(Access(op.inputs["residual"].name, col_box(batch, c0, c1)))
            if self.normalized:
                nw = op.inputs["norm_weight"]
                reads.append(Access(nw.name, nw.full_box))
            nbytes = len(blocks) * (c1 - c0) * k * w.dtype.itemsize + x.nbytes + batch * (c1 - c0) * out.dtype.itemsize
            tiles.append(Tile(tuple(reads), (Access(out.name, col_box(batch, c0, c1)),), nbytes,
                              {"col_start": c0, "col_end": c1}))
        return tiles

    def _compute(self, op: Op, env: Env, c0: int, c1: int) -> torch.Tensor:
        r = rows(env)
        x = env[op.inputs["input"].name][r].float()
        if self.gated:
            x = silu_mul(x)
        if self.normalized:
            x = rms_normalize(x, env[op.inputs["norm_weight"].name], op.attrs["eps"])
        w, n = env[op.inputs["weight"].name], op.outputs["output"].shape[1]
        y = torch.cat([x @ w[b0:b1].float().T for b0, b1 in self.weight_rows(n, c0, c1)], dim=1)
        if self.silu_output:
            y = silu_mul(y)
        if "bias" in op.inputs:
            y = y + env[op.inputs["bias"].name][c0:c1].float()
        if self.with_residual:
            y = y + env[op.inputs["residual"].name][r, c0:c1].float()
        return y

    def run_tile(self, op: Op, params: dict[str, int], env: Env) -> None:
        c0, c1 = params["col_start"], params["col_end"]
        store(env[op.outputs["output"].name][rows(env), c0:c1], self._compute(op, env, c0, c1))

    def reference(self, op: Op, env: Env) -> None:
        n = op.outputs["output"].shape[1]
        store(env[op.outputs["output"].name][rows(env)], self._compute(op, env, 0, n))


class Linear(LinearFamily):
    kind = "linear"
    opcode = 3


class LinearWithResidual(LinearFamily):
    kind = "linear_with_residual"
    opcode = 4
    required_inputs = ("input", "weight", "residual")
    with_residual = True


class RMSNormLinear(LinearFamily):
    """RMSNorm fused into the following projection; every tile recomputes the row statistics
    (K values per row), which costs far less than a separate pass and an extra event."""

    kind = "rmsnorm_linear"
    opcode = 5
    required_inputs = ("input", "norm_weight", "weight")
    normalized = True


class SiluMulLinear(LinearFamily):
    """``out = silu_mul(x) W^T``; W is ``[N, I]`` with ``x`` of width ``2I`` (a tensor-parallel
    rank's down projection, whose residual another rank adds)."""

    kind = "silu_mul_linear"
    opcode = 11
    required_inputs = ("input", "weight")
    optional_inputs = ()
    gated = True


class SiluMulLinearWithResidual(SiluMulLinear):
    """``out = silu_mul(x) W^T + residual``."""

    kind = "silu_mul_linear_with_residual"
    opcode = 8
    required_inputs = ("input", "weight", "residual")
    with_residual = True


class RMSNormLinearSiluMul(RMSNormLinear):
    """``out = silu(n Wg^T) * (n Wu^T)`` with ``n = rmsnorm(x)`` and ``W = [Wg | Wu]`` of shape
    ``[2I, K]`` (vLLM's merged gate_up_proj, used in place): the output is ``[batch, I]``. A tile
    owns output columns ``[c0, c1)`` and streams weight rows ``[c0, c1)`` and ``[I + c0, I + c1)``."""

    kind = "rmsnorm_linear_silu_mul"
    opcode = 12
    column_align = COLUMN_ALIGN // 2  # 8 output columns stream 16 weight rows: 8 gate, 8 up
    optional_inputs = ()
    silu_output = True
