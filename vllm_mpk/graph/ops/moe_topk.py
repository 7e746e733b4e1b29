"""Mixture-of-experts routing: per token, softmax over the router logits, the top-k experts and
their weights, renormalised to sum to 1 with ``normalize`` (Qwen3-MoE's ``norm_topk_prob``).

The router logits come from an ``rmsnorm_linear`` layer before this one (float32 output), tiled
over the experts like any projection; this layer's tiles own whole rows, since the softmax needs
every expert of a row. Outputs: expert ids ``int32 [batch, k]`` in descending weight order (equal
weights: the lower id first) and their weights ``float32 [batch, k]``.

The expert layers after it (``moe_experts.py``) read the ids at run time. ``chosen_experts`` and
``choices_of`` fix, the same way for every tile, which experts a step uses and which (token,
choice) pairs chose each.
"""

from __future__ import annotations

import torch

from vllm_mpk.graph.ir import Access, Op, split_even
from vllm_mpk.graph.ops.base import (
    FLOAT_DTYPES,
    Env,
    OpDef,
    Tile,
    expect_dtype,
    expect_rank,
    expect_shape,
    expect_tiles,
    layer_error,
)


def chosen_experts(ids: torch.Tensor) -> list[int]:
    """The distinct experts in ``ids`` (this step's rows), ascending: the order every expert tile
    takes them in, so sums over experts have one fixed order."""
    return sorted(set(ids.flatten().tolist()))


def choices_of(ids: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, their choice index) of the rows of ``ids`` that chose ``expert``; a token chooses
    an expert at most once."""
    rows, slots = (ids == expert).nonzero(as_tuple=True)
    return rows, slots


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids int32, weights float32) of the top ``top_k`` experts of each row of ``logits``."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = (t[:, :top_k] for t in probs.sort(dim=-1, descending=True, stable=True))
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids.to(torch.int32), weights


class MoETopK(OpDef):
    kind = "moe_topk"
    opcode = 14
    required_inputs = ("input",)
    required_outputs = ("expert_ids", "expert_weights")

    def check(self, op: Op) -> None:
        logits, ids, weights = op.inputs["input"], op.outputs["expert_ids"], op.outputs["expert_weights"]
        expect_rank(op, "input", logits, 2)
        expect_dtype(op, "input", logits, FLOAT_DTYPES)
        batch, experts = logits.shape
        top_k = op.attrs.get("top_k")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= experts:
            raise layer_error(op, f"top_k must be an int from 1 to the {experts} experts, got {top_k!r}")
        expect_shape(op, "expert_ids", ids, (batch, top_k))
        expect_dtype(op, "expert_ids", ids, (torch.int32,))
        expect_shape(op, "expert_weights", weights, (batch, top_k))
        expect_dtype(op, "expert_weights", weights, (torch.float32,))
        expect_tiles(op, batch, f"{batch} rows")

    def lower(self, op: Op) -> list[Tile]:
        logits, ids, weights = op.inputs["input"], op.outputs["expert_ids"], op.outputs["expert_weights"]
        batch, experts = logits.shape
        k = ids.shape[1]
        tiles = []
        for r0, r1 in split_even(batch, op.num_tiles):
            out_box = ((r0, r1), (0, k))
            nbytes = (r1 - r0) * (experts * logits.dtype.itemsize + k * 8)
            tiles.append(Tile((Access(logits.name, ((r0, r1), (0, experts))),),
                              (Access(ids.name, out_box), Access(weights.name, out_box)), nbytes,
                              {"row_start": r0, "row_end": r1}))
        return tiles

    def _route_rows(self, op: Op, env: Env, r0: int, r1: int) -> None:
        r1 = min(r1, env.num_tokens)
        if r0 >= r1:
            return
        ids, weights = route(env[op.inputs["input"].name][r0:r1], op.attrs["top_k"], op.attrs.get("normalize", False))
        env[op.outputs["expert_ids"].name][r0:r1] = ids
        env[op.outputs["expert_weights"].name][r0:r1] = weights

    def run_tile(self, op: Op, params: dict[str, int], env: Env) -> None:
        self._route_rows(op, env, params["row_start"], params["row_end"])

    def reference(self, op: Op, env: Env) -> None:
        self._route_rows(op, env, 0, env.num_tokens)
