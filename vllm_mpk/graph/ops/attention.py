"""Paged decode attention for grouped-query heads, one new token per request.

Per request and KV head: optional per-head RMSNorm of q and k (Qwen3), neox RoPE from vLLM's
``cos_sin_cache`` at the request's position, the new k/v written into the paged cache at
``slot_mapping[b]`` (skipped when negative), then softmax attention of the group's query heads
over the first ``seq_lens[b]`` cached positions found through ``block_tables[b]``.

The cache is vLLM 0.26's packed layout: logical ``[num_blocks, num_kv_heads, block_size,
2 * head_size]`` with K in the first half of the last dim and V in the second; strides are free.
Tiles are (KV head, chunk of requests) pairs, so a tile waits only for the QKV columns of its head.

Split KV (``kv_splits`` S > 1): each (KV head, chunk) pair becomes S tiles, tile j attending over
positions ``[L * j / S, L * (j + 1) / S)`` of a request with L cached positions. Per request it
writes a partial result: per query head the sum of ``exp(score - m) * v``, then the maximum m and
the sum of ``exp(score - m)``, into its slice of ``partial [batch, num_q_heads, S, head_dim + 2]``
(float32), and counts itself in ``arrivals [batch, num_kv_heads]`` (int32). The tile that brings the
count to S merges the S partials, in split order (the result does not depend on which tile came
last), writes the output and sets the count back to 0 for the next step. So every split tile may
write the output of its heads and requests, and declares that write (and the count's) shared:
readers of the output wait for all S. The last tile of a pair is the one that writes the new k/v
(its range ends at the new token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_mpk.graph.ir import Access, Op, split_even
from vllm_mpk.graph.ops.base import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    Env,
    OpDef,
    Tile,
    expect_dtype,
    expect_positive,
    expect_rank,
    expect_shape,
    layer_error,
    rms_normalize,
    store,
)

SUPPORTED_HEAD_DIMS = (64, 128)


def expect_query_groups(op: Op, nq: int, nkv: int) -> None:
    if nq % nkv:
        raise layer_error(op, f"{nq} query heads do not split into groups over {nkv} KV heads")


def expect_head_tiles(op: Op, nkv: int, batch: int, splits: int = 1) -> None:
    """Tiles are (KV head, chunk of requests) pairs, ``splits`` tiles per pair (split KV)."""
    if op.num_tiles % (nkv * splits) or not 1 <= op.num_tiles // (nkv * splits) <= batch:
        per_pair = f"times {splits} KV splits " if splits > 1 else ""
        raise layer_error(op, f"grid_dim {op.grid_dim} makes {op.num_tiles} tasks; expected {nkv} KV heads "
                              f"{per_pair}times a number of request chunks between 1 and {batch}")


def request_chunks(op: Op, nkv: int, batch: int, splits: int = 1) -> list[tuple[int, int]]:
    """The request rows of each (KV head, chunk) pair's tiles (see ``expect_head_tiles``)."""
    return split_even(batch, op.num_tiles // (nkv * splits))
STEP_INPUTS = ("positions", "seq_lens", "block_tables", "slot_mapping")


def merge_partials(p: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Combine online-softmax partials ``p [..., splits, head_dim + 2]`` (sums, maximum, sum of
    weights) into normalised outputs ``[..., head_dim]``; a split with no position (maximum -inf)
    adds nothing."""
    m = p[..., head_dim].max(-1, keepdim=True).values
    scale = torch.where(p[..., head_dim] == -torch.inf, 0.0, (p[..., head_dim] - m).exp())
    return (p[..., :head_dim] * scale[..., None]).sum(-2) / (p[..., head_dim + 1] * scale).sum(-1, keepdim=True)


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotary embedding of ``x [..., hd]`` with ``cos_sin = cat(cos, sin) [hd]``."""
    cos, sin = cos_sin.float().chunk(2, dim=-1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(OpDef):
    kind = "attention"
    opcode = 6
    required_inputs = ("input", "kv_cache", "cos_sin_cache", *STEP_INPUTS)
    optional_inputs = ("q_norm", "k_norm")
    optional_outputs = ("partial", "arrivals")  # with kv_splits > 1: scratch of the split tiles

    def check(self, op: Op) -> None:
        qkv, cache = op.inputs["input"], op.inputs["kv_cache"]
        nq, nkv, hd = op.attrs["num_q_heads"], op.attrs["num_kv_heads"], op.attrs["head_dim"]
        splits = op.attrs.get("kv_splits", 1)
        if splits < 1:
            raise layer_error(op, f"kv_splits must be at least 1, got {splits}")
        expected = {"output"} if splits == 1 else {"output", "partial", "arrivals"}
        if set(op.outputs) != expected:
            raise layer_error(op, f"with kv_splits {splits} the layer writes {sorted(expected)}, "
                                  f"got {sorted(op.outputs)}")
        if hd not in SUPPORTED_HEAD_DIMS:
            raise layer_error(op, f"head_dim {hd} is not supported; supported: {SUPPORTED_HEAD_DIMS}")
        expect_query_groups(op, nq, nkv)
        expect_rank(op, "input", qkv, 2)
        expect_dtype(op, "input", qkv, FLOAT_DTYPES)
        batch = qkv.shape[0]
        expect_shape(op, "input", qkv, (batch, (nq + 2 * nkv) * hd))
        expect_shape(op, "output", op.outputs["output"], (batch, nq * hd))
        if splits > 1:
            expect_shape(op, "partial", op.outputs["partial"], (batch, nq, splits, hd + 2))
            expect_dtype(op, "partial", op.outputs["partial"], (torch.float32,))
            expect_shape(op, "arrivals", op.outputs["arrivals"], (batch, nkv))
            expect_dtype(op, "arrivals", op.outputs["arrivals"], (torch.int32,))
        expect_rank(op, "kv_cache", cache, 4)
        expect_shape(op, "kv_cache", cache, (cache.shape[0], nkv, cache.shape[2], 2 * hd))
        expect_rank(op, "cos_sin_cache", op.inputs["cos_sin_cache"], 2)
        if op.inputs["cos_sin_cache"].shape[1] != hd:
            raise layer_error(op, f"cos_sin_cache '{op.inputs['cos_sin_cache'].name}' has rotary dim "
                                  f"{op.inputs['cos_sin_cache'].shape[1]}, expected {hd} (partial rotary is not supported)")
        for name in STEP_INPUTS:
            expect_dtype(op, name, op.inputs[name], INDEX_DTYPES)
            if op.inputs[name].shape[0] != batch:
                raise layer_error(op, f"{name} '{op.inputs[name].name}' has {op.inputs[name].shape[0]} rows, expected {batch}")
        expect_rank(op, "block_tables", op.inputs["block_tables"], 2)
        for name in ("q_norm", "k_norm"):
            if name in op.inputs:
                expect_shape(op, name, op.inputs[name], (hd,))
        if ("q_norm" in op.inputs) != ("k_norm" in op.inputs):
            raise layer_error(op, "q_norm and k_norm must be given together")
        if "q_norm" in op.inputs:
            expect_positive(op, "eps")
        expect_positive(op, "scale")
        expect_head_tiles(op, nkv, batch, splits)

    def lower(self, op: Op) -> list[Tile]:
        qkv, cache = op.inputs["input"], op.inputs["kv_cache"]
        nq, nkv, hd = op.attrs["num_q_heads"], op.attrs["num_kv_heads"], op.attrs["head_dim"]
        group, splits = nq // nkv, op.attrs.get("kv_splits", 1)
        chunks = request_chunks(op, nkv, qkv.shape[0], splits)
        tiles = []
        for head, (r0, r1), split in ((h, c, j) for h in range(nkv) for c in chunks for j in range(splits)):
            head_box = ((0, cache.shape[0]), (head, head + 1), (0, cache.shape[2]), (0, 2 * hd))
            q_cols = (head * group * hd, (head + 1) * group * hd)
            k_cols = ((nq + head) * hd, (nq + head + 1) * hd)
            v_cols = ((nq + nkv + head) * hd, (nq + nkv + head + 1) * hd)
            reads = [Access(qkv.name, ((r0, r1), cols)) for cols in (q_cols, k_cols, v_cols)]
            reads += [Access(cache.name, head_box), Access(op.inputs["cos_sin_cache"].name,
                                                           op.inputs["cos_sin_cache"].full_box)]
            for name in STEP_INPUTS:
                t = op.inputs[name]
                reads.append(Access(t.name, ((r0, r1),) + t.full_box[1:]))
            for name in ("q_norm", "k_norm"):
                if name in op.inputs:
                    reads.append(Access(op.inputs[name].name, op.inputs[name].full_box))
            # With split KV whichever split tile of a request comes last writes its output.
            writes = [Access(op.outputs["output"].name, ((r0, r1), q_cols), shared=splits > 1)]
            # Bytes are dominated by the KV history, which depends on the step; count one block.
            nbytes = (r1 - r0) * (group + 2) * hd * qkv.dtype.itemsize * 2 + cache.shape[2] * 2 * hd * 2
            if splits > 1:
                writes += [Access(op.outputs["partial"].name, ((r0, r1), (head * group, (head + 1) * group),
                                                                (split, split + 1), (0, hd + 2))),
                           Access(op.outputs["arrivals"].name, ((r0, r1), (head, head + 1)), shared=True)]
                nbytes += (r1 - r0) * group * (hd + 2) * 4 * 2  # a partial written, and on average one read
            if split == splits - 1:
                writes.append(Access(cache.name, head_box))
            tiles.append(Tile(tuple(reads), tuple(writes), nbytes,
                              {"kv_head": head, "row_start": r0, "row_end": r1, "split": split}))
        return tiles

    def _queries_and_write_kv(self, op: Op, env: Env, b: int, heads: range, write: bool = True) -> torch.Tensor:
        """Normalise and rotate q and k of request ``b`` for ``heads``, write k and v to the cache
        (``write``), and return the rotated queries ``[len(heads) * group, hd]``."""
        nq, nkv, hd = op.attrs["num_q_heads"], op.attrs["num_kv_heads"], op.attrs["head_dim"]
        group = nq // nkv
        row = env[op.inputs["input"].name][b]
        q = row[heads.start * group * hd:heads.stop * group * hd].view(-1, hd)
        k = row[(nq + heads.start) * hd:(nq + heads.stop) * hd].view(-1, hd)
        v = row[(nq + nkv + heads.start) * hd:(nq + nkv + heads.stop) * hd].view(-1, hd)
        if "q_norm" in op.inputs:
            q = rms_normalize(q, env[op.inputs["q_norm"].name], op.attrs["eps"])
            k = rms_normalize(k, env[op.inputs["k_norm"].name], op.attrs["eps"])
        cos_sin = env[op.inputs["cos_sin_cache"].name][int(env[op.inputs["positions"].name][b])]
        q, k = apply_rope(q, cos_sin), apply_rope(k, cos_sin)
        slot = int(env[op.inputs["slot_mapping"].name][b])
        if write and slot >= 0:
            cache = env[op.inputs["kv_cache"].name]
            block, offset = divmod(slot, cache.shape[2])
            store(cache[block, heads.start:heads.stop, offset, :hd], k)
            store(cache[block, heads.start:heads.stop, offset, hd:], v)
        return q

    def _history(self, op: Op, env: Env, b: int, heads: range) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached keys and values of request ``b``: two ``[len(heads), seq_len, hd]`` tensors."""
        cache = env[op.inputs["kv_cache"].name]
        hd, block_size = op.attrs["head_dim"], cache.shape[2]
        seq_len = int(env[op.inputs["seq_lens"].name][b])
        pos = torch.arange(seq_len, device=cache.device)
        blocks = env[op.inputs["block_tables"].name][b].long()[pos // block_size]
        kv = cache[blocks, heads.start:heads.stop, pos % block_size].float().transpose(0, 1)
        return kv[..., :hd], kv[..., hd:]

    def _active(self, env: Env, b: int, op: Op) -> bool:
        return b < env.num_tokens and int(env[op.inputs["seq_lens"].name][b]) > 0

    def run_tile(self, op: Op, params: dict[str, int], env: Env) -> None:
        nq, nkv, hd = op.attrs["num_q_heads"], op.attrs["num_kv_heads"], op.attrs["head_dim"]
        head, group, split = params["kv_head"], nq // nkv, params["split"]
        splits = op.attrs.get("kv_splits", 1)
        for b in range(params["row_start"], params["row_end"]):
            if not self._active(env, b, op):
                continue
            q = self._queries_and_write_kv(op, env, b, range(head, head + 1), write=split == splits - 1)
            keys, values = self._history(op, env, b, range(head, head + 1))
            if splits == 1:
                scores = (q @ keys[0].T) * op.attrs["scale"]
                out = env[op.outputs["output"].name]
                store(out[b, head * group * hd:(head + 1) * group * hd], (scores.softmax(-1) @ values[0]).flatten())
                continue
            length = keys.shape[1]
            lo, hi = length * split // splits, length * (split + 1) // splits
            partials = env[op.outputs["partial"].name][b, head * group:(head + 1) * group]  # [group, S, hd + 2]
            part = partials[:, split]
            if lo == hi:  # no position here: nothing to add
                part[:, :hd], part[:, hd], part[:, hd + 1] = 0.0, -torch.inf, 0.0
            else:
                scores = (q @ keys[0, lo:hi].T) * op.attrs["scale"]
                m = scores.max(-1).values
                weights = (scores - m[:, None]).exp()
                part[:, :hd], part[:, hd], part[:, hd + 1] = weights @ values[0, lo:hi], m, weights.sum(-1)
            arrivals = env[op.outputs["arrivals"].name]
            arrivals[b, head] += 1
            if int(arrivals[b, head]) == splits:  # the last split of the request: merge, reset the count
                out = env[op.outputs["output"].name]
                store(out[b, head * group * hd:(head + 1) * group * hd], merge_partials(partials, hd).flatten())
                arrivals[b, head] = 0

    def counters(self, op: Op) -> tuple[str, ...]:
        return ("arrivals",) if op.attrs.get("kv_splits", 1) > 1 else ()

    def reference(self, op: Op, env: Env) -> None:
        if op.attrs.get("kv_splits", 1) > 1:  # partials are a tiling artefact: the tiles are the definition
            for tile in self.lower(op):
                self.run_tile(op, tile.params, env)
            return
        nkv = op.attrs["num_kv_heads"]
        out = env[op.outputs["output"].name]
        for b in range(out.shape[0]):
            if not self._active(env, b, op):
                continue
            q = self._queries_and_write_kv(op, env, b, range(nkv))
            keys, values = self._history(op, env, b, range(nkv))
            o = F.scaled_dot_product_attention(q.view(nkv, -1, q.shape[-1]), keys, values,
                                               scale=op.attrs["scale"])
            store(out[b], o.flatten())
