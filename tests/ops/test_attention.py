"""Paged decode attention (``graph/ops/attention.py``): q/k norm, RoPE, the paged cache written
and read through block tables, and split KV merged by the last split to finish."""

from __future__ import annotations

import pytest
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
    kernel,
    norm_weight,
    randn,
    rms_norm,
)
from vllm_mpk.graph.reference import ReferenceExecutor


def rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with the halves of the head rotated as pairs (i, i + d/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * torch.cat([cos, cos]) + rotated * torch.cat([sin, sin])


def paged_step_inputs(c: dict, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], int]:
    """Block tables over shuffled blocks (with spare blocks nobody owns), and one decode token per
    request at position ``seq_len - 1``; a zero length marks an idle row (slot -1)."""
    b, bs = c["batch"], c["block_size"]
    per_seq = -(-c["max_seq_len"] // bs)
    num_blocks = b * per_seq + 3
    block_tables = torch.randperm(num_blocks, generator=gen)[:b * per_seq].view(b, per_seq).int()
    seq_lens = torch.tensor(c["seq_lens"], dtype=torch.int32)
    positions = (seq_lens - 1).clamp(min=0).long()
    slot = block_tables.long().gather(1, (positions // bs)[:, None])[:, 0] * bs + positions % bs
    step = dict(block_tables=block_tables, seq_lens=seq_lens, positions=positions,
                slot_mapping=torch.where(seq_lens > 0, slot, -1))
    return step, num_blocks


def rope_table(positions: int, head_dim: int) -> torch.Tensor:
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def attention_expected(c: dict, t: dict[str, torch.Tensor], num_tokens: int):
    """The cache after the step, the rows that attend, and their outputs, from plain torch."""
    nq, nkv, hd = c["nq"], c["nkv"], c["head_dim"]
    cache = t["kv_cache"].clone()
    changed = torch.zeros(cache.shape, dtype=torch.bool)
    bs = cache.shape[2]
    rows, outs = [], []
    for b in range(num_tokens):
        length = int(t["seq_lens"][b])
        if length == 0:
            continue
        q, k, v = t["qkv"][b].float().split([nq * hd, nkv * hd, nkv * hd])
        q, k, v = q.view(nq, hd), k.view(nkv, hd), v.view(nkv, hd)
        if c["qk_norm"]:
            q, k = rms_norm(q, t["q_norm"], EPS), rms_norm(k, t["k_norm"], EPS)
        cos, sin = t["cos_sin"][int(t["positions"][b])].chunk(2)
        q, k = rope_neox(q, cos, sin), rope_neox(k, cos, sin)
        block, offset = divmod(int(t["slot_mapping"][b]), bs)
        cache[block, :, offset] = torch.cat([k, v], dim=-1).to(cache.dtype)
        changed[block, :, offset] = True
        pos = torch.arange(length)
        kv = cache[t["block_tables"][b].long()[pos // bs], :, pos % bs].float().transpose(0, 1)  # [nkv, L, 2hd]
        kv = kv.repeat_interleave(nq // nkv, dim=0)
        o = F.scaled_dot_product_attention(q[:, None], kv[..., :hd], kv[..., hd:], scale=c.get("scale"))
        rows.append(b)
        outs.append(o.reshape(-1))
    return cache, changed, rows, torch.stack(outs)


def build_attention(c: dict, gen: torch.Generator) -> Built:
    b, nq, nkv, hd, dt, bs = c["batch"], c["nq"], c["nkv"], c["head_dim"], c["dtype"], c["block_size"]
    n = c.get("num_tokens", b)
    step, num_blocks = paged_step_inputs(c, gen)
    if c.get("layout", "vllm") == "vllm":  # physical [blocks, page, kv heads, 2 hd] seen as logical
        cache = randn((num_blocks, bs, nkv, 2 * hd), gen, dt).permute(0, 2, 1, 3)
    else:
        cache = randn((num_blocks, nkv, bs, 2 * hd), gen, dt)
    t = dict(qkv=randn((b, (nq + 2 * nkv) * hd), gen, dt, 2.0), kv_cache=cache,
             cos_sin=rope_table(c["max_seq_len"], hd), q_norm=norm_weight(hd, gen, dt),
             k_norm=norm_weight(hd, gen, dt), **step)
    mpk = kernel(b, max_seq_len=c["max_seq_len"], page_size=bs)
    out = mpk.new_tensor((b, nq * hd), dt, "out")
    norms = {}
    if c["qk_norm"]:
        norms = dict(q_norm=mpk.attach_input(t["q_norm"], "q_norm"), k_norm=mpk.attach_input(t["k_norm"], "k_norm"))
    mpk.attention_layer(mpk.attach_input(t["qkv"], "qkv"), mpk.attach_input(cache, "kv_cache"),
                        mpk.attach_input(t["cos_sin"], "cos_sin"), out, nkv * c["chunks"], BLOCK,
                        num_q_heads=nq, num_kv_heads=nkv, head_dim=hd, eps=EPS, scale=c.get("scale"),
                        kv_splits=c.get("kv_splits", 1), **norms)
    cache_after, changed, rows, want = attention_expected(c, t, n)
    return Built(mpk, plan_inputs(mpk, step), n, {"out": (rows, want.to(dt))}, {"kv_cache": (cache_after, changed)})


# Rows past num_tokens carry valid-looking lengths and slots: a tile that ran them would write the cache.
ATTENTION_CASES = [
    dict(id="b1-g1-hd64-bs16-len17", batch=1, nq=2, nkv=2, head_dim=64, block_size=16, seq_lens=[17],
         qk_norm=False, dtype=F32, chunks=1, max_seq_len=40),
    dict(id="b1-g1-hd128-bs32-len32-qknorm", batch=1, nq=4, nkv=4, head_dim=128, block_size=32, seq_lens=[32],
         qk_norm=True, dtype=F32, chunks=1, max_seq_len=64),
    dict(id="b5-g2-hd128-bs16-qknorm-idle", batch=5, nq=8, nkv=4, head_dim=128, block_size=16,
         seq_lens=[1, 16, 17, 33, 0], qk_norm=True, dtype=BF16, chunks=2, max_seq_len=48),
    dict(id="b5-g4-hd128-bs32-scale", batch=5, nq=4, nkv=1, head_dim=128, block_size=32,
         seq_lens=[31, 33, 0, 64, 65], qk_norm=False, dtype=BF16, chunks=5, max_seq_len=80, scale=0.05),
    dict(id="b16-g4-hd64-bs32-qknorm-n14", batch=16, nq=8, nkv=2, head_dim=64, block_size=32,
         seq_lens=[1, 2, 15, 16, 17, 0, 32, 33, 47, 48, 49, 63, 64, 65, 30, 20], qk_norm=True, dtype=F32,
         chunks=3, max_seq_len=80, num_tokens=14),
    dict(id="b16-g2-hd64-bs16-contiguous", batch=16, nq=4, nkv=2, head_dim=64, block_size=16,
         seq_lens=[16, 17, 0, 0, 5, 32, 33, 48, 49, 1, 2, 3, 15, 14, 31, 30], qk_norm=False, dtype=BF16,
         chunks=16, max_seq_len=49, layout="contiguous"),
    # A long history (600 positions over 38 pages, past 256: a chunk of the chunked CUDA body) next to short ones.
    dict(id="b4-g4-hd128-bs16-len600-qknorm", batch=4, nq=8, nkv=2, head_dim=128, block_size=16,
         seq_lens=[600, 257, 256, 3], qk_norm=True, dtype=BF16, chunks=2, max_seq_len=600),
]

# Split KV: more splits than some requests have positions (empty splits), one split per position,
# idle rows and rows past num_tokens, a long history.
SPLIT_ATTENTION_CASES = [
    dict(id="b5-g2-hd128-bs16-qknorm-idle-s3", batch=5, nq=8, nkv=4, head_dim=128, block_size=16,
         seq_lens=[1, 16, 17, 33, 0], qk_norm=True, dtype=BF16, chunks=2, max_seq_len=48, kv_splits=3),
    dict(id="b16-g4-hd64-bs32-n14-s4", batch=16, nq=8, nkv=2, head_dim=64, block_size=32,
         seq_lens=[1, 2, 15, 16, 17, 0, 32, 33, 47, 48, 49, 63, 64, 65, 30, 20], qk_norm=False, dtype=F32,
         chunks=3, max_seq_len=80, num_tokens=14, kv_splits=4),
    dict(id="b4-g4-hd128-bs16-len600-s8", batch=4, nq=8, nkv=2, head_dim=128, block_size=16,
         seq_lens=[600, 257, 3, 8], qk_norm=True, dtype=BF16, chunks=1, max_seq_len=600, kv_splits=8),
]


OP_TESTS = [OpTest("attention", build_attention, ATTENTION_CASES + SPLIT_ATTENTION_CASES, FLOAT_TOL)]
test_matches_torch = harness.test_matches_torch


@pytest.mark.parametrize("head_dim,group", [(64, 1), (128, 2), (64, 4)])
def test_attention_reads_history_through_block_table(head_dim: int, group: int):
    """Pointing a request's first block-table entry at a spare block changes its output unless the
    spare block holds a copy of the original: attention reads the history it is pointed at."""
    c = dict(batch=2, nq=2 * group, nkv=2, head_dim=head_dim, block_size=16, seq_lens=[40, 23], qk_norm=False,
             dtype=F32, chunks=1, max_seq_len=48)
    built = build_attention(c, torch.Generator().manual_seed(head_dim + group))
    plan = built.mpk.compile()
    table, cache = built.inputs["block_tables"], built.inputs["kv_cache"]
    spare = next(i for i in range(cache.shape[0]) if i not in table.flatten().tolist())

    def run(copy_block: bool | None) -> torch.Tensor:
        inputs = {k: v.clone() for k, v in built.inputs.items()}
        if copy_block is not None:
            inputs["block_tables"][0, 0] = spare
        if copy_block:
            inputs["kv_cache"][spare] = cache[int(table[0, 0])]
        executor = ReferenceExecutor(plan, inputs)
        executor.run_step(2)
        return executor.tensors["out"]

    base = run(None)
    torch.testing.assert_close(run(copy_block=True), base, rtol=0, atol=0)
    moved = run(copy_block=False)
    assert not torch.allclose(moved[0], base[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(moved[1], base[1], rtol=0, atol=0)


def test_last_split_merges_and_resets_the_count():
    """Split KV: a request's output for a KV head is written only by the split tile that brings the
    head's count of arrivals to S, which sets it back to 0; since the splits merge in split order,
    any order of the tiles gives the same bits, within float tolerance of one tile per head."""
    case = SPLIT_ATTENTION_CASES[1]  # float32, 4 splits, 3 chunks of requests, an idle row, rows past num_tokens
    splits, n = case["kv_splits"], case["num_tokens"]
    built = build_attention(case, torch.Generator().manual_seed(5))
    plan = built.mpk.compile()
    arrivals_name = plan.ops[0].outputs["arrivals"].name
    assert plan.counters == {arrivals_name}
    executor = ReferenceExecutor(plan, {k: v.clone() for k, v in built.inputs.items()})
    executor.poison()
    out, arrivals = executor.tensors["out"], executor.tensors[arrivals_name]
    assert not arrivals.any()  # zero from the start, and poisoning keeps it
    first = plan.tasks[0].params
    pair = [t for t in plan.tasks if (t.params["kv_head"], t.params["row_start"]) == (0, first["row_start"])]
    rows = [b for b in range(first["row_start"], first["row_end"]) if b < n and case["seq_lens"][b] > 0]
    head_cols = slice(0, out.shape[1] // case["nkv"])
    for count, task in enumerate(sorted(pair, key=lambda t: (t.params["split"] + 2) % splits), start=1):
        executor.run_task(task.id, n)
        assert (arrivals[rows, 0] == count % splits).all()
        assert out[rows, head_cols].isnan().all() == (count < splits)

    active = [b for b in range(n) if case["seq_lens"][b] > 0]
    results = []
    for seed in range(3):
        executor.run_step(n, order="random", seed=seed)
        assert not executor.tensors[arrivals_name].any()
        results.append(executor.tensors["out"][active].clone())
    assert all(torch.equal(r, results[0]) for r in results)
    unsplit = build_attention({**case, "kv_splits": 1}, torch.Generator().manual_seed(5))
    reference = ReferenceExecutor(unsplit.mpk.compile(), unsplit.inputs)
    reference.run_step(n)
    torch.testing.assert_close(results[0], reference.tensors["out"][active], **FLOAT_TOL[F32])


def test_rope_definition() -> None:
    """RoPE at position 0 is the identity and keeps norms elsewhere."""
    x = torch.randn(3, 64)
    table = rope_table(10, 64)
    torch.testing.assert_close(rope_neox(x, *table[0].chunk(2)), x)
    torch.testing.assert_close(rope_neox(x, *table[7].chunk(2)).norm(dim=-1), x.norm(dim=-1))
