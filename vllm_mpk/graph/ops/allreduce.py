"""All-reduce (sum over tensor-parallel ranks) of a ``[batch, N]`` activation, tile by tile so
that one tile's reduction overlaps the next tile's compute. At world size 1 it is a copy."""

from __future__ import annotations

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
    rows,
    store,
)

COLUMN_ALIGN = 8


class AllReduce(OpDef):
    kind = "allreduce"
    opcode = 9
    required_inputs = ("input",)

    def check(self, op: Op) -> None:
        x, out = op.inputs["input"], op.outputs["output"]
        expect_rank(op, "input", x, 2)
        expect_dtype(op, "input", x, FLOAT_DTYPES)
        expect_shape(op, "output", out, x.shape)
        expect_tiles(op, -(-x.shape[1] // COLUMN_ALIGN), f"{x.shape[1]} columns in blocks of {COLUMN_ALIGN}")

    def lower(self, op: Op) -> list[Tile]:
        x, out = op.inputs["input"], op.outputs["output"]
        batch = x.shape[0]
        return [
            Tile((Access(x.name, col_box(batch, c0, c1)),), (Access(out.name, col_box(batch, c0, c1)),),
                 2 * batch * (c1 - c0) * x.dtype.itemsize * op.attrs["world_size"],
                 {"col_start": c0, "col_end": c1})
            for c0, c1 in split_even(x.shape[1], op.num_tiles, COLUMN_ALIGN)
        ]

    def _reduce(self, op: Op, env: Env, c0: int, c1: int) -> None:
        x = env[op.inputs["input"].name][rows(env), c0:c1].float()
        box = ((0, env.num_tokens), (c0, c1))
        store(env[op.outputs["output"].name][rows(env), c0:c1], env.all_reduce(op.inputs["input"].name, box, x))

    def run_tile(self, op: Op, params: dict[str, int], env: Env) -> None:
        self._reduce(op, env, params["col_start"], params["col_end"])

    def reference(self, op: Op, env: Env) -> None:
        self._reduce(op, env, 0, op.inputs["input"].shape[1])
