"""Mixture-of-experts expert layers over vLLM's fused-MoE weights, for the experts the router chose
(``moe_topk.py``): only those experts' weights are read, each distinct expert's once per tile
for all the tokens that chose it.

- ``rmsnorm_moe_gate_up``: ``act[b, j] = silu(n_b Wg_e^T) * (n_b Wu_e^T)`` with ``n = rmsnorm(x)``,
  ``e = ids[b, j]`` and ``w13[e] = [Wg_e | Wu_e]`` (``[E, 2I, H]``); ``act`` is ``[batch, k, I]``.
  Tiles are (column block, expert slot): the ``grid_dim`` is ``(column blocks, slots)``. Slot
  ``s`` of ``S`` takes the step's chosen experts ``s, s + S, ...`` (ascending ids), reads the ids
  to find them and the tokens that chose them, and streams their gate and up rows of its column
  block. Which ``(b, j)`` a tile writes is known only at run time, so every slot's write of its
  column block is declared shared; readers wait for all slots.
- ``moe_down``: ``out[b] = residual[b] + sum_j weights[b, j] * act[b, j] W2_{ids[b, j]}^T`` with
  ``w2`` ``[E, H, I]``; without a residual, a tensor-parallel rank's part of the sum. Tiles own a block of output columns and go through the chosen experts in
  ascending order, each expert's rows of the block streamed once for all its tokens, adding into
  per-token sums: a fixed order, no atomics.

The CPU tiles below do exactly that; the layers' ``reference`` is the plain per-token sum.
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
from vllm_mpk.graph.ops.linear import COLUMN_ALIGN
from vllm_mpk.graph.ops.moe_topk import choices_of, chosen_experts
from vllm_mpk.graph.ops.silu_mul import silu_mul

GATE_UP_ALIGN = COLUMN_ALIGN // 2  # 8 output columns stream 16 weight rows of an expert: 8 gate, 8 up


def max_chosen(batch: int, top_k: int, num_experts: int) -> int:
    """The most distinct experts a step of ``batch`` tokens can choose: the expert slots a layer needs."""
    return min(num_experts, batch * top_k)


def check_routing(op: Op, batch: int, experts: int, top_k: int) -> None:
    ids = op.inputs["expert_ids"]
    expect_shape(op, "expert_ids", ids, (batch, top_k))
    expect_dtype(op, "expert_ids", ids, (torch.int32,))
    if top_k > experts:
        raise layer_error(op, f"expert_ids '{ids.name}' chooses {top_k} of {experts} experts")


def check_grid(op: Op, blocks: int, slots: int, what: str) -> None:
    x, y, z = op.grid_dim
    if not (1 <= x <= blocks and 1 <= y <= slots and z == 1):
        raise layer_error(op, f"grid_dim {op.grid_dim}: this layer takes (1 to {blocks} column blocks, 1 to {slots} "
                              f"expert slots, 1) ({what})")


class RMSNormMoEGateUp(OpDef):
    kind = "rmsnorm_moe_gate_up"
    opcode = 15
    required_inputs = ("input", "norm_weight", "weight", "expert_ids")

    def check(self, op: Op) -> None:
        x, w, out = op.inputs["input"], op.inputs["weight"], op.outputs["output"]
        expect_rank(op, "input", x, 2)
        expect_rank(op, "weight", w, 3)
        for role, t in (("input", x), ("weight", w), ("output", out)):
            expect_dtype(op, role, t, FLOAT_DTYPES)
        batch, hidden = x.shape
        experts, height = w.shape[:2]
        if height % 2:
            raise layer_error(op, f"weight '{w.name}' has {height} rows per expert; expected an even [gate | up] "
                                  f"height")
        expect_shape(op, "weight", w, (experts, height, hidden))
        expect_shape(op, "norm weight", op.inputs["norm_weight"], (hidden,))
        ids = op.inputs["expert_ids"]
        expect_rank(op, "expert_ids", ids, 2)
        top_k = ids.shape[1]
        check_routing(op, batch, experts, top_k)
        expect_shape(op, "output", out, (batch, top_k, height // 2))
        expect_positive(op, "eps")
        check_grid(op, -(-(height // 2) // GATE_UP_ALIGN), max_chosen(batch, top_k, experts),
                   f"{height // 2} columns in blocks of {GATE_UP_ALIGN}; at most {batch} tokens x {top_k} choices "
                   f"of {experts} experts")

    def lower(self, op: Op) -> list[Tile]:
        x, w, ids, out = op.inputs["input"], op.inputs["weight"], op.inputs["expert_ids"], op.outputs["output"]
        nw = op.inputs["norm_weight"]
        batch, top_k, inter = out.shape
        experts, hidden = w.shape[0], w.shape[2]
        blocks, slots = op.grid_dim[:2]
        per_slot = -(-max_chosen(batch, top_k, experts) // slots)  # experts a slot streams at most
        tiles = []
        for slot in range(slots):
            for c0, c1 in split_even(inter, blocks, GATE_UP_ALIGN):
                reads = (Access(x.name, x.full_box), Access(nw.name, nw.full_box), Access(ids.name, ids.full_box),
                         Access(w.name, ((0, experts), (c0, c1), (0, hidden))),
                         Access(w.name, ((0, experts), (inter + c0, inter + c1), (0, hidden))))
                writes = (Access(out.name, ((0, batch), (0, top_k), (c0, c1)), shared=True),)
                nbytes = (per_slot * 2 * (c1 - c0) * hidden * w.dtype.itemsize + x.nbytes
                          + batch * top_k * (c1 - c0) * out.dtype.itemsize)
                tiles.append(Tile(reads, writes, nbytes, {"slot": slot, "col_start": c0, "col_end": c1}))
        return tiles

    def run_tile(self, op: Op, params: dict[str, int], env: Env) -> None:
        r, c0, c1, slot = rows(env), params["col_start"], params["col_end"], params["slot"]
        ids = env[op.inputs["expert_ids"].name][r]
        w, out = env[op.inputs["weight"].name], env[op.outputs["output"].name]
        inter = w.shape[1] // 2
        x = rms_normalize(env[op.inputs["input"].name][r], env[op.inputs["norm_weight"].name], op.attrs["eps"])
        for expert in chosen_experts(ids)[slot::op.grid_dim[1]]:
            tokens, choices = choices_of(ids, expert)
            we = w[expert].float()
            gate_up = torch.cat([x[tokens] @ we[c0:c1].T, x[tokens] @ we[inter + c0:inter + c1].T], dim=1)
            out[tokens, choices, c0:c1] = silu_mul(gate_up).to(out.dtype)

    def reference(self, op: Op, env: Env) -> None:
        r = rows(env)
        ids = env[op.inputs["expert_ids"].name][r]
        w, out = env[op.inputs["weight"].name], env[op.outputs["output"].name]
        x = rms_normalize(env[op.inputs["input"].name][r], env[op.inputs["norm_weight"].name], op.attrs["eps"])
        for b, j in ((b, j) for b in range(ids.shape[0]) for j in range(ids.shape[1])):
            store(out[b, j], silu_mul(x[b] @ w[int(ids[b, j])].float().T))


class MoEDown(OpDef):
    kind = "moe_down"
    opcode = 16
    required_inputs = ("input", "weight", "expert_ids", "expert_weights")
    optional_inputs = ("residual",)

    def check(self, op: Op) -> None:
        act, w, out = op.inputs["input"], op.inputs["weight"], op.outputs["output"]
        expect_rank(op, "input", act, 3)
        expect_rank(op, "weight", w, 3)
        for role, t in (("input", act), ("weight", w), ("output", out)):
            expect_dtype(op, role, t, FLOAT_DTYPES)
        batch, top_k, inter = act.shape
        experts, hidden = w.shape[:2]
        expect_shape(op, "weight", w, (experts, hidden, inter))
        check_routing(op, batch, experts, top_k)
        expect_shape(op, "expert_weights", op.inputs["expert_weights"], (batch, top_k))
        expect_dtype(op, "expert_weights", op.inputs["expert_weights"], (torch.float32,))
        if "residual" in op.inputs:
            expect_shape(op, "residual", op.inputs["residual"], (batch, hidden))
        expect_shape(op, "output", out, (batch, hidden))
        expect_tiles(op, -(-hidden // COLUMN_ALIGN), f"{hidden} output columns in blocks of {COLUMN_ALIGN}")

    def lower(self, op: Op) -> list[Tile]:
        act, w, out = op.inputs["input"], op.inputs["weight"], op.outputs["output"]
        batch, top_k, inter = act.shape
        experts, hidden = w.shape[:2]
        routing = [Access(op.inputs[r].name, op.inputs[r].full_box) for r in ("expert_ids", "expert_weights")]
        tiles = []
        for c0, c1 in split_even(hidden, op.num_tiles, COLUMN_ALIGN):
            reads = [Access(act.name, act.full_box), *routing, Access(w.name, ((0, experts), (c0, c1), (0, inter)))]
            if "residual" in op.inputs:
                reads.append(Access(op.inputs["residual"].name, col_box(batch, c0, c1)))
            nbytes = (max_chosen(batch, top_k, experts) * (c1 - c0) * inter * w.dtype.itemsize + act.nbytes
                      + 2 * batch * (c1 - c0) * out.dtype.itemsize)
            tiles.append(Tile(tuple(reads), (Access(out.name, col_box(batch, c0, c1)),), nbytes,
                              {"col_start": c0, "col_end": c1}))
        return tiles

    def run_tile(self, op: Op, params: dict[str, int], env: Env) -> None:
        r, c0, c1 = rows(env), params["col_start"], params["col_end"]
        ids, weights = env[op.inputs["expert_ids"].name][r], env[op.inputs["expert_weights"].name][r]
        act, w = env[op.inputs["input"].name][r], env[op.inputs["weight"].name]
        acc = torch.zeros(ids.shape[0], c1 - c0, device=act.device)
        for expert in chosen_experts(ids):
            tokens, choices = choices_of(ids, expert)
            part = act[tokens, choices].float() @ w[expert, c0:c1].float().T
            acc.index_add_(0, tokens, part * weights[tokens, choices, None])
        if "residual" in op.inputs:
            acc += env[op.inputs["residual"].name][r, c0:c1].float()
        store(env[op.outputs["output"].name][r, c0:c1], acc)

    def reference(self, op: Op, env: Env) -> None:
        r = rows(env)
        ids, weights = env[op.inputs["expert_ids"].name][r], env[op.inputs["expert_weights"].name][r]
        act, w = env[op.inputs["input"].name][r].float(), env[op.inputs["weight"].name]
        y = torch.zeros(act.shape[0], w.shape[1], device=act.device)
        if "residual" in op.inputs:
            y = y + env[op.inputs["residual"].name][r].float()
        for j in range(ids.shape[1]):
            y = y + weights[:, j, None] * torch.stack([act[b, j] @ w[int(ids[b, j])].float().T
                                                       for b in range(ids.shape[0])])
        store(env[op.outputs["output"].name][r], y)
