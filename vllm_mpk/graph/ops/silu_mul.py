"""SwiGLU activation ``silu(gate) * up`` over vLLM's merged ``[gate | up]`` columns, as a layer of
its own (fused into the down projection, it is a linear layer: see ``linear.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_mpk.graph.ir import Access, Op, split_even
from vllm_mpk.graph.ops.base import (
    FLOAT_DTYPES,
    Env,
    OpDef,
    Tile,
    col_box,
    expect_dtype,
    expect_rank,
    expect_shape,
    expect_tiles,
    layer_error,
    rows,
    store,
)

ACT_ALIGN = 8


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return F.silu(gate) * up


class SiluMul(OpDef):
    kind = "silu_mul"
    opcode = 7
    required_inputs = ("input",)

    def check(self, op: Op) -> None:
        x, out = op.inputs["input"], op.outputs["output"]
        expect_rank(op, "input", x, 2)
        expect_dtype(op, "input", x, FLOAT_DTYPES)
        if x.shape[1] % 2:
            raise layer_error(op, f"input '{x.name}' has {x.shape[1]} columns; expected an even [gate | up] width")
        expect_shape(op, "output", out, (x.shape[0], x.shape[1] // 2))
        expect_tiles(op, -(-out.shape[1] // ACT_ALIGN), f"{out.shape[1]} columns in blocks of {ACT_ALIGN}")

    def lower(self, op: Op) -> list[Tile]:
        x, out = op.inputs["input"], op.outputs["output"]
        batch, inter = out.shape
        tiles = []
        for c0, c1 in split_even(inter, op.num_tiles, ACT_ALIGN):
            reads = (Access(x.name, col_box(batch, c0, c1)), Access(x.name, col_box(batch, inter + c0, inter + c1)))
            tiles.append(Tile(reads, (Access(out.name, col_box(batch, c0, c1)),),
                              3 * batch * (c1 - c0) * x.dtype.itemsize, {"col_start": c0, "col_end": c1}))
        return tiles

    def _compute(self, op: Op, env: Env, c0: int, c1: int) -> torch.Tensor:
        x = env[op.inputs["input"].name][rows(env)]
        inter = x.shape[1] // 2
        return silu_mul(torch.cat([x[:, c0:c1], x[:, inter + c0:inter + c1]], dim=1))

    def run_tile(self, op: Op, params: dict[str, int], env: Env) -> None:
        c0, c1 = params["col_start"], params["col_end"]
        store(env[op.outputs["output"].name][rows(env), c0:c1], self._compute(op, env, c0, c1))

    def reference(self, op: Op, env: Env) -> None:
        store(env[op.outputs["output"].name][rows(env)], silu_mul(env[op.inputs["input"].name][rows(env)]))

