"""Greedy sampling: the index of the largest logit per row (first one on ties, like
``torch.argmax``). Lowered in two stages: ``grid_dim`` partial tiles each reduce a vocabulary
chunk into ``partial_value``/``partial_index``, then one tile reduces the partials: with several
tensor-parallel ranks (vocabulary-parallel logits, rank r holding the slice that starts at
``vocab_start``), every rank's partials, gathered in rank order, so all ranks pick the same token."""

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
    expect_rank,
    expect_shape,
    expect_tiles,
    rows,
)

VOCAB_ALIGN = 8
REDUCE_STAGE = 1


class Argmax(OpDef):
    kind = "argmax"
    opcode = 10
    required_inputs = ("input",)
    required_outputs = ("output", "partial_value", "partial_index")

    def check(self, op: Op) -> None:
        x = op.inputs["input"]
        expect_rank(op, "input", x, 2)
        expect_dtype(op, "input", x, FLOAT_DTYPES)
        batch, vocab = x.shape
        expect_tiles(op, -(-vocab // VOCAB_ALIGN), f"{vocab} logits in blocks of {VOCAB_ALIGN}")
        expect_shape(op, "output", op.outputs["output"], (batch,))
        expect_dtype(op, "output", op.outputs["output"], (torch.int64,))
        expect_shape(op, "partial_value", op.outputs["partial_value"], (batch, op.num_tiles))
        expect_shape(op, "partial_index", op.outputs["partial_index"], (batch, op.num_tiles))

    def lower(self, op: Op) -> list[Tile]:
        x, pv, pi = op.inputs["input"], op.outputs["partial_value"], op.outputs["partial_index"]
        batch = x.shape[0]
        tiles = [
            Tile((Access(x.name, col_box(batch, v0, v1)),),
                 (Access(pv.name, col_box(batch, g, g + 1)), Access(pi.name, col_box(batch, g, g + 1))),
                 batch * (v1 - v0) * x.dtype.itemsize, {"stage": 0, "vocab_start": v0, "vocab_end": v1, "slot": g})
            for g, (v0, v1) in enumerate(split_even(x.shape[1], op.num_tiles, VOCAB_ALIGN))
        ]
        out = op.outputs["output"]
        tiles.append(Tile((Access(pv.name, pv.full_box), Access(pi.name, pi.full_box)),
                          (Access(out.name, out.full_box),), pv.nbytes + pi.nbytes, {"stage": REDUCE_STAGE}))
        return tiles

    def run_tile(self, op: Op, params: dict[str, int], env: Env) -> None:
        r = rows(env)
        if params["stage"] == REDUCE_STAGE:
            values, indices = (gathered_rows(env, op.outputs[name].name, r) for name in ("partial_value",
                                                                                          "partial_index"))
            best = values.argmax(dim=1, keepdim=True)  # first maximum: the lowest vocabulary chunk
            env[op.outputs["output"].name][r] = indices.gather(1, best)[:, 0]
            return
        v0, g = params["vocab_start"], params["slot"]
        chunk = env[op.inputs["input"].name][r, v0:params["vocab_end"]].float()
        value, index = chunk.max(dim=1)
        env[op.outputs["partial_value"].name][r, g] = value
        env[op.outputs["partial_index"].name][r, g] = index + v0 + op.attrs.get("vocab_start", 0)

    def reference(self, op: Op, env: Env) -> None:
        r = rows(env)
        logits = gathered_rows(env, op.inputs["input"].name, r).float()  # every rank's slice, in order
        env[op.outputs["output"].name][r] = logits.argmax(dim=1) + op.attrs.get("vocab_start", 0) - (
            op.attrs.get("rank", 0) * env[op.inputs["input"].name].shape[1])


def gathered_rows(env: Env, name: str, r: slice) -> torch.Tensor:
    """Rows ``r`` of tensor ``name`` on every rank, concatenated along the columns in rank order."""
    stacked = env.all_gather(name, env[name][r])  # [ranks, rows, columns]
    return stacked.permute(1, 0, 2).reshape(stacked.shape[1], -1)
