"""The decode step of Qwen3 and Llama as a PersistentKernel graph.

Per layer (vLLM's fused residual structure, SSA intermediates):

    qkv   = rmsnorm_linear(x, input_layernorm, qkv_proj)
    attn  = attention(qkv, kv_cache)                 # q/k norm (Qwen3), RoPE, paged cache
    h     = linear_with_residual(attn, o_proj, x)    # x + attn @ o_proj^T
    act   = rmsnorm_linear_silu_mul(h, post_attention_layernorm, gate_up_proj)  # silu(gate) * up
    x'    = linear_with_residual(act, down_proj, h)

In a mixture-of-experts model (Qwen3-MoE) the MLP is, with vLLM's fused-MoE weights:

    logits = rmsnorm_linear(h, post_attention_layernorm, gate)     # router logits, float32
    ids, w = moe_topk(logits)                                      # top-k experts and weights
    act    = rmsnorm_moe_gate_up(h, post_attention_layernorm, w13, ids)   # [batch, k, I]
    x'     = moe_down(act, w2, ids, w, h)                          # h + sum_j w_j act_j W2^T

then ``logits = rmsnorm_linear(x, norm, lm_head)`` (float32) and ``tokens = argmax(logits)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from vllm_mpk.api import DEFAULT_SCHEDULE, PersistentKernel
from vllm_mpk.graph.ir import TensorHandle
from vllm_mpk.graph.limits import MAX_TILE_ROWS
from vllm_mpk.graph.ops.moe_experts import GATE_UP_ALIGN, max_chosen
from vllm_mpk.graph.plan import Plan
from vllm_mpk.models.rope import cos_sin_cache
from vllm_mpk.models.spec import ModelSpec
from vllm_mpk.models.weights import EMBED, FINAL_NORM, check_weights, layer_names, lm_head

TILE_COLUMNS = 16
FINALS = ("tokens", "logits", "hidden")


def valid_kv_splits(value: object) -> bool:
    """Whether ``value`` is a split-KV setting: None (auto, ``auto_kv_splits``) or a positive int."""
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


@dataclass(frozen=True)
class DecodeOptions:
    max_batch: int = 8
    max_seq_len: int = 4096
    page_size: int = 16
    num_workers: int = 132
    block_dim: int = 256
    schedule: str = DEFAULT_SCHEDULE
    world_size: int = 1  # tensor-parallel ranks
    rank: int = 0
    # "tokens": lm_head (float32) and greedy argmax; "hidden": stop at the final RMSNorm; "logits":
    # the final RMSNorm's output and, beside it, the lm_head's in the weights' dtype (vLLM takes
    # either: ``integration/kernel_logits.py``)
    final: str = "tokens"
    multi_step: bool = False  # begin_step first: one launch decodes many steps (standalone, one GPU)
    # attention tasks per KV head and request (split KV, merged by the last to finish); None: auto
    # (``auto_kv_splits``: 2 while the (request, KV head) pairs fill at most a quarter of the workers)
    kv_splits: int | None = None

    def __post_init__(self) -> None:
        if not valid_kv_splits(self.kv_splits):
            raise ValueError(f"DecodeOptions.kv_splits must be a positive int or None (auto), got {self.kv_splits!r}")
        if self.final not in FINALS:
            raise ValueError(f"DecodeOptions.final must be one of {FINALS}, got {self.final!r}")
        if self.multi_step and (self.final != "tokens" or self.world_size > 1):
            raise ValueError("DecodeOptions.multi_step needs final='tokens' (the step samples its next token) "
                             "and world_size 1")


@dataclass
class DecodeModel:
    """A built decode step: the kernel, its plan and the handles of its results. ``options`` are
    those it was built with, ``kv_splits`` resolved (``plan_kv_splits``)."""

    spec: ModelSpec
    options: DecodeOptions
    kernel: PersistentKernel
    plan: Plan
    logits: TensorHandle | None  # None when the plan stops at the final norm
    tokens: TensorHandle | None
    hidden: TensorHandle | None = None  # the final RMSNorm's output, when ``final`` is "hidden" or "logits"

    @property
    def kv_splits(self) -> int:
        """The split-KV count built."""
        return self.options.kv_splits  # type: ignore[return-value]  # resolved by declare_decoder


def linear_grid(columns: int, num_workers: int) -> int:
    """One tile per worker where the layer is wide enough, else one per 16 columns; never tiles
    wider than the GPU's linear tiles take. A layer that needs more tiles than workers (the
    vocabulary projection) gets a whole number per worker, so no worker streams one more tile
    than the others at the end of the step."""
    needed = -(-columns // MAX_TILE_ROWS)
    if needed > num_workers:
        return min(-(-needed // num_workers) * num_workers, columns // TILE_COLUMNS)
    return max(1, min(num_workers, columns // TILE_COLUMNS))


def moe_gate_up_grid(spec: ModelSpec, batch: int, num_workers: int) -> tuple[int, int]:
    """(column blocks, expert slots) of an expert gate/up layer: a slot for every expert a step
    of ``batch`` tokens can choose, each slot's columns cut so all slots together about fill the
    workers."""
    slots = max_chosen(batch, spec.num_experts_per_tok, spec.num_experts)
    units = -(-spec.moe_intermediate_size // GATE_UP_ALIGN)
    return max(1, min(units, num_workers // slots)), slots


def auto_kv_splits(num_kv_heads: int, batch: int, num_workers: int) -> int:
    """The split-KV count of a plan left to choose (``kv_splits=None``): 2 while its (request, KV
    head) attention tasks fill at most a quarter of the workers, ``num_kv_heads * batch * 4 <=
    num_workers``, else 1. ``num_kv_heads`` is the rank's (TP-local) count.

    Measured on an H100 (132 workers), 8 KV heads, context 256, µs per decode step of
    ``benchmarks/megakernel_step.py``, A/B alternated, 2 splits against 1: Qwen3-0.6B -4.1 / -2.3 /
    -4.4 / +3.2% at batch 1 / 2 / 4 / 8, Llama-3.1-8B -0.75 / -0.4 / -0.3 / +2.7%. Splitting pays
    while the pairs are few (8 to 32 tasks) and loses at 64 (batch 8), where the workers are busy
    enough without it; 4 splits gained little more (Qwen3-0.6B -4.6 / -3.9 / 0% at batch 1 / 2 / 4,
    Llama-3.1-8B +2% at batch 4)."""
    return 2 if num_kv_heads * batch * 4 <= num_workers else 1


def plan_kv_splits(spec: ModelSpec, max_batch: int, num_workers: int, kv_splits: int | None,
                   world_size: int = 1) -> int:
    """The split-KV count of a rank's plan for ``max_batch``: ``kv_splits`` when given (it wins
    everywhere), else ``auto_kv_splits`` for the rank's (TP-local) KV heads."""
    if kv_splits is not None:
        return kv_splits
    return auto_kv_splits(spec.shard(world_size).num_kv_heads, max_batch, num_workers)


@dataclass
class DecodeLayers:
    """The decode step's layers declared on a kernel, not yet compiled, and its result handles;
    ``options`` as given, ``kv_splits`` resolved (``plan_kv_splits``)."""

    options: DecodeOptions
    kernel: PersistentKernel
    logits: TensorHandle | None
    tokens: TensorHandle | None
    hidden: TensorHandle | None


def build_decoder(spec: ModelSpec, weights: Mapping[str, torch.Tensor], kv_caches: Sequence[torch.Tensor],
                  options: DecodeOptions = DecodeOptions(), rope_cache: torch.Tensor | None = None) -> DecodeModel:
    """Build and compile one decode step of rank ``options.rank`` of ``options.world_size``.
    ``weights`` use vLLM's merged names, TP-local shapes (``spec.shard(world_size)``), and are used
    in place; ``kv_caches`` are per-layer logical ``[blocks, kv_heads, page, 2 * head_dim]`` views;
    ``rope_cache`` defaults to one computed from the config for ``max_seq_len`` positions."""
    d = declare_decoder(spec, weights, kv_caches, options, rope_cache)
    return DecodeModel(spec, d.options, d.kernel, d.kernel.compile(), d.logits, d.tokens, d.hidden)


def declare_decoder(spec: ModelSpec, weights: Mapping[str, torch.Tensor], kv_caches: Sequence[torch.Tensor],
                    options: DecodeOptions = DecodeOptions(), rope_cache: torch.Tensor | None = None) -> DecodeLayers:
    """``build_decoder`` up to the compile: the layers and tensors of the step, for whoever needs
    the plan's contents without its schedule (the memory estimate)."""
    o = replace(options, kv_splits=plan_kv_splits(spec, options.max_batch, options.num_workers, options.kv_splits,
                                                  options.world_size))
    local = spec.shard(o.world_size)
    check_weights(local, weights)
    if len(kv_caches) != spec.num_layers:
        raise ValueError(f"got {len(kv_caches)} KV caches, expected one per layer ({spec.num_layers})")
    mpk = PersistentKernel(world_size=o.world_size, mpi_rank=o.rank, num_workers=o.num_workers,
                           max_batch=o.max_batch, max_seq_len=o.max_seq_len, page_size=o.page_size,
                           schedule=o.schedule)
    block = (o.block_dim, 1, 1)
    dtype = weights[EMBED].dtype
    b, h, w = o.max_batch, spec.hidden_size, o.num_workers
    sharded = o.world_size > 1

    def new(name: str, width: int, dt: torch.dtype = dtype) -> TensorHandle:
        return mpk.new_tensor((b, width), dt, name)

    def summed(name: str, add: Callable[[TensorHandle], None]) -> TensorHandle:
        """``add`` writes this rank's part into a tensor; with several ranks, their sum."""
        if not sharded:
            out = new(name, h)
            add(out)
            return out
        part, out = mpk.new_tensor((b, h), dtype, f"{name}.part", "nvshmem_tensor"), new(name, h)
        add(part)
        mpk.allreduce_layer(part, out, linear_grid(h, w), block, name=f"{name}.allreduce")
        return out

    if rope_cache is None:
        rope_cache = cos_sin_cache(spec, o.max_seq_len, weights[EMBED].device)
    rope = mpk.attach_input(rope_cache, "rope.cos_sin_cache")
    tokens = mpk.new_tensor((b,), torch.int64, "tokens") if o.final == "tokens" else None
    if o.multi_step:
        mpk.begin_step_layer(tokens, block)
    embed = mpk.attach_input(weights[EMBED], EMBED)
    x = summed("embed.out", lambda out: mpk.embed_layer(None, embed, out, grid_dim=min(w, h // 8), block_dim=block,
                                                        vocab_start=o.rank * local.vocab_size, name="embed"))
    for i in range(spec.num_layers):
        n = {k: v for k, v in layer_names(i).items() if v in weights}
        wt = {k: mpk.attach_input(weights[v], v) for k, v in n.items()}
        cache = mpk.attach_input(kv_caches[i], f"model.layers.{i}.self_attn.attn.kv_cache")
        p = f"layers.{i}"
        qkv, attn = new(f"{p}.qkv", local.qkv_width), new(f"{p}.attn", local.num_q_heads * spec.head_dim)
        mpk.rmsnorm_linear_layer(x, wt["input_norm"], wt["qkv"], qkv, linear_grid(local.qkv_width, w), block,
                                 eps=spec.rms_norm_eps, name=f"{p}.qkv_proj")
        mpk.attention_layer(qkv, cache, rope, attn, grid_dim=local.num_kv_heads * b, block_dim=block,
                            num_q_heads=local.num_q_heads, num_kv_heads=local.num_kv_heads, head_dim=spec.head_dim,
                            q_norm=wt.get("q_norm"), k_norm=wt.get("k_norm"), eps=spec.rms_norm_eps,
                            name=f"{p}.attention", kv_splits=o.kv_splits)
        # The residual is added once: by rank 0, before the sum over ranks.
        if o.rank == 0:
            hid = summed(f"{p}.h", lambda out, x=x: mpk.linear_with_residual_layer(
                attn, wt["o"], x, out, linear_grid(h, w), block, name=f"{p}.o_proj"))
        else:
            hid = summed(f"{p}.h", lambda out: mpk.linear_layer(attn, wt["o"], out, linear_grid(h, w), block,
                                                                name=f"{p}.o_proj"))
        if spec.is_moe:
            x = summed(f"{p}.out", lambda out, hid=hid: declare_moe_mlp(mpk, local, wt, hid, out, p, o))
            continue
        act = new(f"{p}.act", local.intermediate_size)
        # Tiled like the 2I weight rows it streams: 8 output columns read 16 of them (gate and up).
        mpk.rmsnorm_linear_silu_mul_layer(hid, wt["post_norm"], wt["gate_up"], act,
                                          linear_grid(2 * local.intermediate_size, w), block,
                                          eps=spec.rms_norm_eps, name=f"{p}.gate_up_proj")
        if o.rank == 0:
            x = summed(f"{p}.out", lambda out, hid=hid: mpk.linear_with_residual_layer(
                act, wt["down"], hid, out, linear_grid(h, w), block, name=f"{p}.down_proj"))
        else:
            x = summed(f"{p}.out", lambda out: mpk.linear_layer(act, wt["down"], out, linear_grid(h, w), block,
                                                                name=f"{p}.down_proj"))
    final_norm = mpk.attach_input(weights[FINAL_NORM], FINAL_NORM)
    hidden = None
    if o.final in ("hidden", "logits"):  # for vLLM's compute_logits; beside the lm_head tiles, off their path
        hidden = new("hidden", h)
        mpk.rmsnorm_layer(x, final_norm, hidden, grid_dim=b, block_dim=block, eps=spec.rms_norm_eps, name="norm")
    if o.final == "hidden":
        return DecodeLayers(o, mpk, None, None, hidden)
    # vLLM pads the vocabulary rows; the view of the real rows aliases the weight (tied or not).
    v = local.vocab_size
    head = mpk.attach_input(lm_head(local, weights)[:v], "lm_head.weight")
    # For vLLM in its dtype (bf16), so that near ties fall as its own lm_head's do; float32 for the argmax.
    logits = mpk.new_tensor((b, v), weights[FINAL_NORM].dtype if o.final == "logits" else torch.float32, "logits")
    mpk.rmsnorm_linear_layer(x, final_norm, head, logits,
                             linear_grid(v, w), block, eps=spec.rms_norm_eps, name="lm_head")
    if o.final == "logits":
        return DecodeLayers(o, mpk, logits, None, hidden)
    mpk.argmax_layer(logits, tokens, grid_dim=w, block_dim=block, vocab_start=o.rank * v, name="argmax")
    return DecodeLayers(o, mpk, logits, tokens, None)


def declare_moe_mlp(mpk: PersistentKernel, local: ModelSpec, wt: Mapping[str, TensorHandle], hid: TensorHandle,
                    out: TensorHandle, prefix: str, o: DecodeOptions) -> None:
    """One mixture-of-experts MLP on ``hid`` (the module docstring's four layers), writing ``out``:
    ``hid`` plus the weighted sum of the chosen experts' outputs; with several ranks, this rank's
    part of that sum over its slice of every expert (rank 0 adds ``hid``)."""
    spec, b, w, block = local, o.max_batch, o.num_workers, (o.block_dim, 1, 1)
    k, h = spec.num_experts_per_tok, spec.hidden_size
    logits = mpk.new_tensor((b, spec.num_experts), torch.float32, f"{prefix}.router_logits")
    ids = mpk.new_tensor((b, k), torch.int32, f"{prefix}.expert_ids")
    weights = mpk.new_tensor((b, k), torch.float32, f"{prefix}.expert_weights")
    act = mpk.new_tensor((b, k, spec.moe_intermediate_size), hid.dtype, f"{prefix}.act")
    mpk.rmsnorm_linear_layer(hid, wt["post_norm"], wt["router"], logits, linear_grid(spec.num_experts, w), block,
                             eps=spec.rms_norm_eps, name=f"{prefix}.router")
    mpk.moe_topk_layer(logits, ids, weights, b, block, top_k=k, normalize=spec.norm_topk_prob,
                       name=f"{prefix}.moe_topk")
    mpk.rmsnorm_moe_gate_up_layer(hid, wt["post_norm"], wt["w13"], ids, act, (*moe_gate_up_grid(spec, b, w), 1),
                                  block, eps=spec.rms_norm_eps, name=f"{prefix}.experts.gate_up")
    mpk.moe_down_layer(act, wt["w2"], ids, weights, hid if o.rank == 0 else None, out, linear_grid(h, w), block,
                       name=f"{prefix}.experts.down")
