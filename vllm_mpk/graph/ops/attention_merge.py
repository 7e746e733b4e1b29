"""Combines split-KV attention's partial results (``attention`` with ``kv_splits`` > 1) into the
attention output: per request and query head, with partials (acc_j, m_j, l_j) of the S splits
and M = max_j m_j, ``out = sum_j acc_j * exp(m_j - M) / sum_j l_j * exp(m_j - M)``; splits that saw
no position (m_j = -inf) add nothing. Idle rows (``seq_lens`` 0, or past ``num_tokens``) are
skipped, as attention skips them. Tiles are (KV head, chunk of requests) pairs, like attention's,
so each waits only for the splits of its own head and requests.
"""

from __future__ import annotations

import torch

from vllm_mpk.graph.ir import Access, Op
from vllm_mpk.graph.ops.attention import expect_head_tiles, expect_query_groups, request_chunks
from vllm_mpk.graph.ops.base import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    Env,
    OpDef,
    Tile,
    expect_dtype,
    expect_rank,
    expect_shape,
    store,
)


class AttentionMerge(OpDef):
    kind = "attention_merge"
    opcode = 14
    required_inputs = ("partial", "seq_lens")

    def check(self, op: Op) -> None:
        partial, out, nkv = op.inputs["partial"], op.outputs["output"], op.attrs["num_kv_heads"]
        expect_rank(op, "partial", partial, 4)
        expect_dtype(op, "partial", partial, (torch.float32,))
        batch, nq, _, width = partial.shape
        expect_shape(op, "output", out, (batch, nq * (width - 2)))
        expect_dtype(op, "output", out, FLOAT_DTYPES)
        expect_dtype(op, "seq_lens", op.inputs["seq_lens"], INDEX_DTYPES)
        expect_query_groups(op, nq, nkv)
        expect_head_tiles(op, nkv, batch)

    def lower(self, op: Op) -> list[Tile]:
        partial, out, nkv = op.inputs["partial"], op.outputs["output"], op.attrs["num_kv_heads"]
        batch, nq, splits, width = partial.shape
        group, hd = nq // nkv, width - 2
        tiles = []
        for head in range(nkv):
            for r0, r1 in request_chunks(op, nkv, batch):
                reads = (Access(partial.name, ((r0, r1), (head * group, (head + 1) * group), (0, splits), (0, width))),
                         Access(op.inputs["seq_lens"].name, ((r0, r1),)))
                writes = (Access(out.name, ((r0, r1), (head * group * hd, (head + 1) * group * hd))),)
                nbytes = (r1 - r0) * group * (splits * width * 4 + hd * out.dtype.itemsize)
                tiles.append(Tile(reads, writes, nbytes, {"kv_head": head, "row_start": r0, "row_end": r1}))
        return tiles

    def run_tile(self, op: Op, params: dict[str, int], env: Env) -> None:
        partial, out = env[op.inputs["partial"].name], env[op.outputs["output"].name]
        nq, hd = partial.shape[1], partial.shape[3] - 2
        group = nq // op.attrs["num_kv_heads"]
        heads = slice(params["kv_head"] * group, (params["kv_head"] + 1) * group)
        for b in range(params["row_start"], min(params["row_end"], env.num_tokens)):
            if int(env[op.inputs["seq_lens"].name][b]) <= 0:
                continue
            p = partial[b, heads].float()  # [group, splits, hd + 2]
            m = p[..., hd].max(-1, keepdim=True).values
            scale = torch.where(p[..., hd] == -torch.inf, 0.0, (p[..., hd] - m).exp())  # [group, splits]
            merged = (p[..., :hd] * scale[..., None]).sum(1) / (p[..., hd + 1] * scale).sum(1, keepdim=True)
            store(out[b, heads.start * hd:heads.stop * hd], merged.flatten())

    def reference(self, op: Op, env: Env) -> None:
        for tile in self.lower(op):
            self.run_tile(op, tile.params, env)
