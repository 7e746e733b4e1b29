"""Embedding lookup: ``out[b] = weight[ids[b] - vocab_start]``, zero for ids outside this rank's
vocabulary shard (vocab-parallel embedding; the all-reduce that follows sums the shards)."""

from __future__ import annotations

import torch

from vllm_mpk.graph.ir import Access, Op, split_even
from vllm_mpk.graph.ops.base import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
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

COLUMN_ALIGN = 8  # 16-byte vectors of bf16


class Embed(OpDef):
    kind = "embed"
    opcode = 1
    required_inputs = ("input", "weight")

    def check(self, op: Op) -> None:
        ids, w, out = op.inputs["input"], op.inputs["weight"], op.outputs["output"]
        expect_rank(op, "input", ids, 1)
        expect_dtype(op, "input", ids, INDEX_DTYPES)
        expect_rank(op, "weight", w, 2)
        expect_dtype(op, "weight", w, FLOAT_DTYPES)
        expect_shape(op, "output", out, (ids.shape[0], w.shape[1]))
        expect_tiles(op, -(-w.shape[1] // COLUMN_ALIGN), f"{w.shape[1]} columns in blocks of {COLUMN_ALIGN}")

    def lower(self, op: Op) -> list[Tile]:
        ids, w, out = op.inputs["input"], op.inputs["weight"], op.outputs["output"]
        batch = ids.shape[0]
        tiles = []
        for c0, c1 in split_even(w.shape[1], op.num_tiles, COLUMN_ALIGN):
            reads = (Access(ids.name, ids.full_box), Access(w.name, ((0, w.shape[0]), (c0, c1))))
            nbytes = 2 * batch * (c1 - c0) * out.dtype.itemsize
            tiles.append(Tile(reads, (Access(out.name, col_box(batch, c0, c1)),), nbytes,
                              {"col_start": c0, "col_end": c1}))
        return tiles

    def _compute(self, op: Op, env: Env, c0: int, c1: int) -> torch.Tensor:
        w = env[op.inputs["weight"].name]
        local = env[op.inputs["input"].name][rows(env)].long() - op.attrs.get("vocab_start", 0)
        inside = (local >= 0) & (local < w.shape[0])
        picked = w[local.clamp(0, w.shape[0] - 1), c0:c1].float()
        return picked * inside[:, None]

    def run_tile(self, op: Op, params: dict[str, int], env: Env) -> None:
        c0, c1 = params["col_start"], params["col_end"]
        store(env[op.outputs["output"].name][rows(env), c0:c1], self._compute(op, env, c0, c1))

    def reference(self, op: Op, env: Env) -> None:
        n = op.inputs["weight"].shape[1]
        store(env[op.outputs["output"].name][rows(env)], self._compute(op, env, 0, n))
