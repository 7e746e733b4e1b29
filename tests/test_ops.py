"""Every op family against its plain-torch definition, written here independently of
``graph/ops``: one tiny kernel per case, compiled and run by the reference executor in each order.

Each op kind carries its cases and tolerances (``OP_TESTS``); one collector parametrises over all
of them. Sizes are awkward on purpose (batch 1, 5, 16; widths that leave a partial last tile;
sequence lengths on both sides of page boundaries) and every case draws its own random inputs.
The executor poisons intermediates with NaN before the step, so an output element that no tile
writes shows up as NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import ORDERS, plan_inputs, seed_of
from vllm_mpk.api import PersistentKernel
from vllm_mpk.graph.ir import box_slices
from vllm_mpk.graph.ops import REGISTRY
from vllm_mpk.graph.reference import ReferenceExecutor

BLOCK = (128, 1, 1)
WORKERS = 3  # odd, fewer than most grids: workers interleave tiles of several ops
EPS = 1e-6
F32, BF16 = torch.float32, torch.bfloat16
# float32 outputs agree to rounding; bfloat16 ones may differ by one unit in the last place (2**-8)
# where the float32 results fall on either side of a rounding boundary
FLOAT_TOL = {F32: dict(rtol=2e-5, atol=2e-5), BF16: dict(rtol=1.6e-2, atol=1e-2)}
EXACT = {torch.int64: dict(rtol=0, atol=0)}


@dataclass
class Built:
    """A kernel with one layer (or a producer and the layer), its inputs and what torch says."""

    mpk: PersistentKernel
    inputs: dict[str, torch.Tensor]
    num_tokens: int
    expected: dict[str, tuple[list[int], torch.Tensor]]  # output -> (rows checked, their values)
    state: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # -> (after, may change)
    all_reduce: Callable | None = None


@dataclass
class OpTest:
    kind: str
    build: Callable[[dict, torch.Generator], Built]
    cases: list[dict]
    tolerance: dict[torch.dtype, dict[str, float]]


def randn(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(shape, generator=gen)).to(dtype)


def norm_weight(n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return (1 + 0.1 * torch.randn(n, generator=gen)).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight.float()


def kernel(batch: int, **kw) -> PersistentKernel:
    return PersistentKernel(num_workers=WORKERS, max_batch=batch, max_seq_len=kw.pop("max_seq_len", 64), **kw)


def all_rows(n: int, value: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    return list(range(n)), value[:n]


# embed --------------------------------------------------------------------------------------------


def build_embed(c: dict, gen: torch.Generator) -> Built:
    b, vocab, hidden, dt, start = c["batch"], c["vocab"], c["hidden"], c["dtype"], c.get("vocab_start", 0)
    n = c.get("num_tokens", b)
    weight = randn((vocab, hidden), gen, dt)
    ids = torch.randint(0, start + vocab + c.get("beyond", 0), (b,), generator=gen, dtype=torch.int32)
    mpk = kernel(b)
    out = mpk.new_tensor((b, hidden), dt, "out")
    mpk.embed_layer(None, mpk.attach_input(weight, "embed"), out, c["grid"], BLOCK, vocab_start=start)
    # ids outside [start, start + vocab) belong to another rank's shard: zero rows here
    want = torch.stack([weight[i - start] if start <= i < start + vocab else torch.zeros(hidden, dtype=dt)
                        for i in ids.tolist()])
    return Built(mpk, plan_inputs(mpk, {"input_ids": ids}), n, {"out": all_rows(n, want)})


EMBED_CASES = [
    dict(id="b1-h64-all-tiles", batch=1, vocab=50, hidden=64, grid=8, dtype=F32),
    dict(id="b5-h200-partial-tile", batch=5, vocab=1000, hidden=200, grid=3, dtype=BF16),
    dict(id="b16-shard-n13", batch=16, vocab=40, vocab_start=20, beyond=20, hidden=96, grid=12, dtype=BF16,
         num_tokens=13),
]


# rmsnorm ------------------------------------------------------------------------------------------


def build_rmsnorm(c: dict, gen: torch.Generator) -> Built:
    b, h, dt, eps = c["batch"], c["hidden"], c["dtype"], c.get("eps", EPS)
    n = c.get("num_tokens", b)
    x, w = randn((b, h), gen, dt, 3.0), norm_weight(h, gen, dt)
    mpk = kernel(b)
    out = mpk.new_tensor((b, h), dt, "out")
    expected = {}
    if c["residual"]:
        res = randn((b, h), gen, dt)
        res_out = mpk.new_tensor((b, h), dt, "res_out")
        mpk.rmsnorm_layer(mpk.attach_input(x, "x"), mpk.attach_input(w, "w"), out, c["grid"], BLOCK, eps=eps,
                          residual=mpk.attach_input(res, "res"), residual_output=res_out)
        hidden = x.float() + res.float()
        expected["res_out"] = all_rows(n, hidden.to(dt))
    else:
        mpk.rmsnorm_layer(mpk.attach_input(x, "x"), mpk.attach_input(w, "w"), out, c["grid"], BLOCK, eps=eps)
        hidden = x.float()
    expected["out"] = all_rows(n, rms_norm(hidden, w, eps).to(dt))
    return Built(mpk, plan_inputs(mpk), n, expected)


RMSNORM_CASES = [
    dict(id="b1-h64", batch=1, hidden=64, grid=1, dtype=F32, residual=False),
    dict(id="b5-h1000-residual", batch=5, hidden=1000, grid=2, dtype=BF16, residual=True, eps=1e-5),
    dict(id="b16-residual-n11", batch=16, hidden=128, grid=16, dtype=F32, residual=True, num_tokens=11),
    dict(id="b16-grid5", batch=16, hidden=72, grid=5, dtype=BF16, residual=False),
]


# linear family ------------------------------------------------------------------------------------


def build_linear_family(kind: str) -> Callable[[dict, torch.Generator], Built]:
    def build(c: dict, gen: torch.Generator) -> Built:
        b, k, nout, dt = c["batch"], c["k"], c["n"], c["dtype"]
        wdt, odt = c.get("weight_dtype", dt), c.get("out_dtype", dt)
        n = c.get("num_tokens", b)
        width = 2 * k if kind.startswith("silu_mul_linear") else k
        rows = 2 * nout if kind == "rmsnorm_linear_silu_mul" else nout  # [gate | up] weight rows
        x, w = randn((b, width), gen, dt), randn((rows, k), gen, wdt, k ** -0.5)
        mpk = kernel(b)
        X, W, out = mpk.attach_input(x, "x"), mpk.attach_input(w, "w"), mpk.new_tensor((b, nout), odt, "out")
        bias = randn((nout,), gen, wdt) if c.get("bias") else None
        B = mpk.attach_input(bias, "bias") if bias is not None else None
        res = randn((b, nout), gen, dt)
        if kind == "linear":
            mpk.linear_layer(X, W, out, c["grid"], BLOCK, bias=B)
            want = F.linear(x.float(), w.float(), None if bias is None else bias.float())
        elif kind == "linear_with_residual":
            mpk.linear_with_residual_layer(X, W, mpk.attach_input(res, "res"), out, c["grid"], BLOCK, bias=B)
            want = F.linear(x.float(), w.float(), None if bias is None else bias.float()) + res.float()
        elif kind == "rmsnorm_linear":
            nw = norm_weight(k, gen, dt)
            mpk.rmsnorm_linear_layer(X, mpk.attach_input(nw, "norm"), W, out, c["grid"], BLOCK, eps=EPS)
            want = F.linear(rms_norm(x, nw, EPS), w.float())
        elif kind == "rmsnorm_linear_silu_mul":
            nw = norm_weight(k, gen, dt)
            mpk.rmsnorm_linear_silu_mul_layer(X, mpk.attach_input(nw, "norm"), W, out, c["grid"], BLOCK, eps=EPS)
            gate, up = F.linear(rms_norm(x, nw, EPS), w.float()).chunk(2, dim=-1)
            want = F.silu(gate) * up
        elif kind == "silu_mul_linear":
            gate, up = x.float()[:, :k], x.float()[:, k:]
            mpk.silu_mul_linear_layer(X, W, out, c["grid"], BLOCK)
            want = F.linear(F.silu(gate) * up, w.float())
        else:
            gate, up = x.float()[:, :k], x.float()[:, k:]
            mpk.silu_mul_linear_with_residual_layer(X, W, mpk.attach_input(res, "res"), out, c["grid"], BLOCK)
            want = F.linear(F.silu(gate) * up, w.float()) + res.float()
        return Built(mpk, plan_inputs(mpk), n, {"out": all_rows(n, want.to(odt))})

    return build


LINEAR_CASES = [
    dict(id="b1-k64-n48", batch=1, k=64, n=48, grid=3, dtype=F32),
    dict(id="b5-k200-n100-bias", batch=5, k=200, n=100, grid=7, dtype=BF16, bias=True),
    dict(id="b16-n33-bias-mixed", batch=16, k=128, n=33, grid=2, dtype=F32, weight_dtype=BF16, bias=True),
    dict(id="b16-n256-n9", batch=16, k=96, n=256, grid=16, dtype=BF16, out_dtype=F32, num_tokens=9),
]
RESIDUAL_CASES = [
    dict(id="b1-k64-n48", batch=1, k=64, n=48, grid=1, dtype=F32),
    dict(id="b5-k200-n100", batch=5, k=200, n=100, grid=7, dtype=BF16),
    dict(id="b16-n40-bias-n14", batch=16, k=128, n=40, grid=2, dtype=F32, bias=True, num_tokens=14),
]
NORM_LINEAR_CASES = [
    dict(id="b1-k64-n16", batch=1, k=64, n=16, grid=1, dtype=F32),
    dict(id="b5-k1000-n100", batch=5, k=1000, n=100, grid=4, dtype=BF16),
    dict(id="b16-k128-n200-f32-out", batch=16, k=128, n=200, grid=13, dtype=BF16, out_dtype=F32),
]
# n: output columns (the SwiGLU width I); the weight has 2n rows. grid 7 over 100 columns leaves a
# last tile of 4 columns, whose gate and up rows share one 16-row tensor-core group on the GPU.
NORM_SILU_CASES = [
    dict(id="b1-k64-n16", batch=1, k=64, n=16, grid=1, dtype=F32),
    dict(id="b5-k1000-n100", batch=5, k=1000, n=100, grid=7, dtype=BF16),
    dict(id="b16-k128-n200-n11", batch=16, k=128, n=200, grid=13, dtype=F32, num_tokens=11),
]
SILU_LINEAR_CASES = [
    dict(id="b1-i64-n48", batch=1, k=64, n=48, grid=3, dtype=F32),
    dict(id="b5-i100-n100", batch=5, k=100, n=100, grid=7, dtype=BF16),
    dict(id="b16-i32-n16-n7", batch=16, k=32, n=16, grid=1, dtype=F32, num_tokens=7),
]


# silu_mul -----------------------------------------------------------------------------------------


def build_silu_mul(c: dict, gen: torch.Generator) -> Built:
    b, inter, dt = c["batch"], c["inter"], c["dtype"]
    n = c.get("num_tokens", b)
    x = randn((b, 2 * inter), gen, dt, 2.0)
    mpk = kernel(b)
    out = mpk.new_tensor((b, inter), dt, "out")
    mpk.silu_mul_layer(mpk.attach_input(x, "gate_up"), out, c["grid"], BLOCK)
    want = F.silu(x.float()[:, :inter]) * x.float()[:, inter:]
    return Built(mpk, plan_inputs(mpk), n, {"out": all_rows(n, want.to(dt))})


SILU_CASES = [
    dict(id="b1-i8", batch=1, inter=8, grid=1, dtype=F32),
    dict(id="b5-i100-partial-tile", batch=5, inter=100, grid=13, dtype=BF16),
    dict(id="b16-i64-n3", batch=16, inter=64, grid=3, dtype=F32, num_tokens=3),
]


# allreduce ----------------------------------------------------------------------------------------


def build_allreduce(c: dict, gen: torch.Generator) -> Built:
    """World size 1 is a copy. With two ranks a linear layer writes the symmetric buffer and a fake
    peer adds its own tile: the executor's all-reduce hook gets each tile's box."""
    b, width, dt, world = c["batch"], c["n"], c["dtype"], c.get("world_size", 1)
    n = c.get("num_tokens", b)
    mpk = kernel(b, world_size=world)
    out = mpk.new_tensor((b, width), dt, "out")
    if world == 1:
        x = randn((b, width), gen, dt)
        mpk.allreduce_layer(mpk.attach_input(x, "x"), out, c["grid"], BLOCK)
        return Built(mpk, plan_inputs(mpk), n, {"out": all_rows(n, x)})
    x, w, peer = randn((b, 64), gen, dt), randn((width, 64), gen, dt, 0.125), randn((b, width), gen, dt)
    partial = mpk.new_tensor((b, width), dt, "partial", io_category="nvshmem_tensor")
    mpk.linear_layer(mpk.attach_input(x, "x"), mpk.attach_input(w, "w"), partial, 1, BLOCK)
    mpk.allreduce_layer(partial, out, c["grid"], BLOCK)

    def all_reduce(name: str, box: tuple, value: torch.Tensor) -> torch.Tensor:
        assert name == "partial"
        return value + peer[box_slices(box)].float()

    want = F.linear(x.float(), w.float()).to(dt).float() + peer.float()
    return Built(mpk, plan_inputs(mpk), n, {"out": all_rows(n, want.to(dt))}, all_reduce=all_reduce)


ALLREDUCE_CASES = [
    dict(id="b1-n64", batch=1, n=64, grid=8, dtype=F32),
    dict(id="b5-n100-partial-tile", batch=5, n=100, grid=13, dtype=BF16),
    dict(id="b16-world2-n10", batch=16, n=40, grid=3, dtype=F32, world_size=2, num_tokens=10),
]


# argmax -------------------------------------------------------------------------------------------


def build_argmax(c: dict, gen: torch.Generator) -> Built:
    b, vocab, dt, start = c["batch"], c["vocab"], c["dtype"], c.get("vocab_start", 0)
    n = c.get("num_tokens", b)
    logits = randn((b, vocab), gen, dt)
    for row, (i, j) in enumerate(c.get("ties", ())):  # equal maxima: the lower index wins
        logits[row, i] = logits[row, j] = logits[row].max() + 1
    mpk = kernel(b)
    out = mpk.new_tensor((b,), torch.int64, "tokens")
    mpk.argmax_layer(mpk.attach_input(logits, "logits"), out, c["grid"], BLOCK, vocab_start=start)
    want = torch.argmax(logits.float(), dim=-1) + start
    return Built(mpk, plan_inputs(mpk), n, {"tokens": all_rows(n, want)})


ARGMAX_CASES = [
    dict(id="b1-v1000-one-tile", batch=1, vocab=1000, grid=1, dtype=F32),
    dict(id="b5-v151936-grid132", batch=5, vocab=151936, grid=132, dtype=F32, ties=[(7, 151935), (140000, 150000)]),
    dict(id="b16-bf16-ties-shard-n12", batch=16, vocab=1000, grid=7, dtype=BF16, vocab_start=1000,
         ties=[(0, 999), (143, 144), (5, 6), (500, 501)], num_tokens=12),
]


# attention ----------------------------------------------------------------------------------------


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


# begin_step --------------------------------------------------------------------------------------


def build_begin_step(c: dict, gen: torch.Generator) -> Built:
    """Rows in every situation: prompt (the sampled token is not written), generating, reaching
    their end, hitting EOS, a first step (nothing pending), idle, and rows past num_tokens."""
    b, width, page, n = c["batch"], c["width"], c["page"], c["num_tokens"]
    per_seq = width // page
    mpk = kernel(b, max_seq_len=width, page_size=page, meta_tensors={
        "step": torch.tensor(c["step"]), "tokens": torch.randint(0, 1000, (b, width), generator=gen)})
    sampled = mpk.attach_input(torch.tensor(c["sampled"]), "sampled")
    mpk.begin_step_layer(sampled, BLOCK)
    state = {name.removeprefix("state."): t for name, t in mpk.attached.items()}
    state["prompt_lens"].copy_(torch.tensor(c["prompt_lens"]))
    state["end"].copy_(torch.tensor(c["end"]))
    state["pending"].copy_(torch.tensor(c["pending"], dtype=torch.int32))
    state["eos"].fill_(c["eos"])
    tables = torch.randperm(b * per_seq + 2, generator=gen)[:b * per_seq].view(b, per_seq).int()
    inputs = plan_inputs(mpk, {"block_tables": tables, **{k: torch.full((b,), 7, dtype=mpk.tensors[k].dtype)
                                                          for k in ("input_ids", "positions", "seq_lens",
                                                                    "slot_mapping")}})
    after = {k: inputs[k].clone() for k in ("state.step", "state.tokens", "state.pending", "input_ids", "positions",
                                            "seq_lens", "slot_mapping")}
    step, tokens = after["state.step"], after["state.tokens"]
    for r in range(n):  # one row at a time, in plain Python
        if c["pending"][r] and step[r] >= 0:
            nxt = int(step[r]) + 1
            generating = c["prompt_lens"][r] <= nxt < width
            if generating:
                tokens[r, nxt] = c["sampled"][r]
            eos_hit = generating and c["eos"] >= 0 and c["sampled"][r] == c["eos"]
            step[r] = -1 if nxt >= c["end"][r] or eos_hit else nxt
        pos = max(int(step[r]), 0)
        active = step[r] >= 0
        after["input_ids"][r] = int(tokens[r, pos]) if active else 0
        after["positions"][r] = pos
        after["seq_lens"][r] = pos + 1 if active else 0
        after["slot_mapping"][r] = int(tables[r, pos // page]) * page + pos % page if active else -1
        after["state.pending"][r] = int(active)
    changed = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in after.items()}
    for k in changed:
        changed[k][:n] = True
    return Built(mpk, inputs, n, {}, {k: (after[k], changed[k]) for k in after})


BEGIN_STEP_CASES = [
    # rows: prompt, generating, reaching its end, EOS, first step, idle, past num_tokens
    dict(id="b7-n6-page16", batch=7, width=48, page=16, num_tokens=6, step=[2, 20, 30, 9, 0, -1, 4],
         prompt_lens=[10, 5, 5, 3, 4, 3, 3], end=[40, 40, 31, 40, 40, 0, 40], pending=[1, 1, 1, 1, 0, 0, 1],
         sampled=[11, 12, 13, 99, 15, 16, 17], eos=99),
    dict(id="b3-no-eos-page32", batch=3, width=64, page=32, num_tokens=3, step=[31, 0, 62],
         prompt_lens=[2, 1, 1], end=[63, 63, 63], pending=[1, 1, 1], sampled=[5, 99, 6], eos=-1),
]
INDEX_EXACT = {torch.int64: dict(rtol=0, atol=0), torch.int32: dict(rtol=0, atol=0)}

OP_TESTS = [
    OpTest("embed", build_embed, EMBED_CASES, FLOAT_TOL),
    OpTest("rmsnorm", build_rmsnorm, RMSNORM_CASES, FLOAT_TOL),
    OpTest("linear", build_linear_family("linear"), LINEAR_CASES, FLOAT_TOL),
    OpTest("linear_with_residual", build_linear_family("linear_with_residual"), RESIDUAL_CASES, FLOAT_TOL),
    OpTest("rmsnorm_linear", build_linear_family("rmsnorm_linear"), NORM_LINEAR_CASES, FLOAT_TOL),
    OpTest("rmsnorm_linear_silu_mul", build_linear_family("rmsnorm_linear_silu_mul"), NORM_SILU_CASES, FLOAT_TOL),
    OpTest("attention", build_attention, ATTENTION_CASES + SPLIT_ATTENTION_CASES, FLOAT_TOL),
    OpTest("silu_mul", build_silu_mul, SILU_CASES, FLOAT_TOL),
    OpTest("silu_mul_linear", build_linear_family("silu_mul_linear"), SILU_LINEAR_CASES, FLOAT_TOL),
    OpTest("silu_mul_linear_with_residual", build_linear_family("silu_mul_linear_with_residual"),
           SILU_LINEAR_CASES, FLOAT_TOL),
    OpTest("allreduce", build_allreduce, ALLREDUCE_CASES, FLOAT_TOL),
    OpTest("argmax", build_argmax, ARGMAX_CASES, EXACT),
    OpTest("begin_step", build_begin_step, BEGIN_STEP_CASES, INDEX_EXACT),
]
CASES = [pytest.param(t, c, id=f"{t.kind}-{c['id']}") for t in OP_TESTS for c in t.cases]


def test_every_op_kind_has_cases():
    assert sorted(t.kind for t in OP_TESTS) == sorted(REGISTRY)
    assert all(t.cases for t in OP_TESTS)


def check_outputs(built: Built, tensors: dict[str, torch.Tensor], tolerance: dict, where: str) -> None:
    for name, (rows, want) in built.expected.items():
        got = tensors[name][rows]
        assert got.dtype == want.dtype, f"{where}: {name} has dtype {got.dtype}, expected {want.dtype}"
        if got.is_floating_point():
            assert not got.isnan().any(), f"{where}: {name} has unwritten (NaN) elements in rows {rows}"
        torch.testing.assert_close(got, want, **tolerance[want.dtype], msg=lambda m: f"{where}: {name}: {m}")
    for name, (after, may_change) in built.state.items():
        got, before = tensors[name], built.inputs[name]
        assert torch.equal(got[~may_change], before[~may_change]), f"{where}: {name} changed outside the new slots"
        torch.testing.assert_close(got, after, **tolerance[after.dtype], msg=lambda m: f"{where}: {name}: {m}")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("op_test,case", CASES)
def test_op_matches_torch(op_test: OpTest, case: dict, order: str):
    gen = torch.Generator().manual_seed(seed_of(f"{op_test.kind}-{case['id']}"))
    built = op_test.build(case, gen)
    plan = built.mpk.compile()
    assert {op.kind for op in plan.ops} >= {op_test.kind}
    for seed in (0, 1, 2) if order == "random" else (0,):
        executor = ReferenceExecutor(plan, {k: v.clone() for k, v in built.inputs.items()},
                                     all_reduce=built.all_reduce)
        executor.run_step(built.num_tokens, order=order, seed=seed)
        check_outputs(built, executor.tensors, op_test.tolerance, f"{order} order, seed {seed}")


def test_outputs_are_poisoned_between_steps():
    """A second step with fewer tokens leaves the rows it does not run poisoned, not stale."""
    gen = torch.Generator().manual_seed(1)
    built = build_linear_family("linear")(LINEAR_CASES[1], gen)
    executor = ReferenceExecutor(built.mpk.compile(), built.inputs)
    executor.run_step(5)
    assert not executor.tensors["out"].isnan().any()
    executor.run_step(2)
    assert executor.tensors["out"][2:].isnan().all()
    assert not executor.tensors["out"][:2].isnan().any()


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

def test_torch_definitions_sanity():
    """The definitions this file checks against: RoPE at position 0 is the identity and keeps norms
    elsewhere; RMSNorm with unit weight gives unit mean square; SiLU is x * sigmoid(x)."""
    x = torch.randn(3, 64)
    table = rope_table(10, 64)
    torch.testing.assert_close(rope_neox(x, *table[0].chunk(2)), x)
    torch.testing.assert_close(rope_neox(x, *table[7].chunk(2)).norm(dim=-1), x.norm(dim=-1))
    w = torch.ones(64)
    torch.testing.assert_close(rms_norm(x, w, 0.0).pow(2).mean(-1), torch.ones(3))
    assert math.isclose(float(F.silu(torch.tensor(1.0))), 1 / (1 + math.exp(-1)), rel_tol=1e-6)
