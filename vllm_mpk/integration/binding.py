"""What the megakernel reads from vLLM, found in place: the loaded parameters, the paged KV cache
each attention layer holds once vLLM binds it, the RoPE table, and the per-step buffers behind the
attention metadata of a decode batch. Nothing here copies a tensor; every function either returns
views of vLLM's own storage or says why it cannot.

Names follow vLLM 0.26 (``v1/attention/backends/flash_attn.py:FlashAttentionMetadata``, the same
field names in TRITON_ATTN's metadata): ``max_query_len``, ``seq_lens [num_reqs] int32``,
``block_table [num_reqs, max_blocks] int32``, ``slot_mapping [num_tokens] int64``. Both model
runners keep these in persistent buffers and hand out leading-row views of them, which is what
lets one megakernel bound to fixed addresses (and a CUDA graph around its launch) serve every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vllm_mpk.models.spec import ModelSpec
from vllm_mpk.models.weights import expected_shapes

METADATA_FIELDS = ("max_query_len", "seq_lens", "block_table", "slot_mapping")
# ``--kv-cache-dtype`` values that leave the cache in the model's dtype; the tensor's own dtype is
# checked as well ("auto" on an fp16 model is refused there).
BF16_CACHE_DTYPES = ("auto", "bfloat16")
# vLLM's unquantized fused-MoE backends (``fused_moe/oracle/unquantized.py``) that keep the expert
# weights as loaded; TRITON is vLLM's choice on Hopper, CPU its CPU platform's (where tests build).
MOE_BACKENDS_AS_LOADED = ("TRITON", "CPU")


@dataclass(frozen=True)
class DecodeBatch:
    """One new token per request: token ``i`` belongs to request ``i``."""

    num_tokens: int  # rows of input_ids and positions, padding included
    num_reqs: int  # rows of seq_lens and block_table; the rows the megakernel computes
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor


class UnsupportedMetadata(ValueError):
    """The attention backend's metadata lacks the fields the megakernel binds to."""


def decode_batch(attn_metadata: Any, layer_name: str, num_tokens: int) -> DecodeBatch | None:
    """The decode batch this forward runs, or None when it is anything else: the profiling run
    and dummy runs without attention (``attn_metadata is None``), micro-batched steps (a list),
    prefill and mixed batches (``max_query_len > 1``), speculative verification. Raises
    UnsupportedMetadata for a backend whose metadata lacks the fields above (FlashInfer's)."""
    if not isinstance(attn_metadata, Mapping):
        return None
    md = attn_metadata.get(layer_name)
    if md is None:
        return None
    missing = [f for f in METADATA_FIELDS if not hasattr(md, f)]
    if missing:
        raise UnsupportedMetadata(f"attention metadata {type(md).__name__} has no {missing}; the megakernel binds "
                                  "to FLASH_ATTN's or TRITON_ATTN's (pass --attention-backend FLASH_ATTN)")
    if md.max_query_len != 1:
        return None
    num_reqs = int(md.seq_lens.shape[0])
    if not 1 <= num_reqs <= num_tokens or md.block_table.shape[0] < num_reqs:
        return None
    slot_mapping = md.slot_mapping
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] < num_reqs:
        return None
    return DecodeBatch(num_tokens, num_reqs, md.seq_lens, md.block_table, slot_mapping)


def widen_rows(t: torch.Tensor, rows: int, what: str) -> torch.Tensor:
    """A view of the first ``rows`` rows of the buffer ``t`` is a leading-row view of: same
    address and strides, more rows. Raises ValueError if the storage is too small."""
    shape = (rows, *t.shape[1:])
    needed = t.storage_offset() + (rows - 1) * t.stride(0) + sum((n - 1) * s for n, s in zip(t.shape[1:], t.stride()[1:]))
    if needed >= t.untyped_storage().nbytes() // t.element_size():
        raise ValueError(f"vLLM's {what} buffer holds fewer than {rows} rows; lower max_batch")
    return t.as_strided(shape, t.stride(), t.storage_offset())


def step_buffers(input_ids: torch.Tensor, positions: torch.Tensor, batch: DecodeBatch,
                 max_batch: int) -> dict[str, torch.Tensor]:
    """vLLM's per-step buffers as the plan's step inputs (``graph/step_state.py:STEP_INPUT_NAMES``)."""
    return {
        "input_ids": widen_rows(input_ids, max_batch, "input_ids"),
        "positions": widen_rows(positions, max_batch, "positions"),
        "seq_lens": widen_rows(batch.seq_lens, max_batch, "seq_lens"),
        "slot_mapping": widen_rows(batch.slot_mapping, max_batch, "slot_mapping"),
        "block_tables": widen_rows(batch.block_table, max_batch, "block_table"),
    }


def same_buffers(bound: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]) -> str | None:
    """None when each current step tensor starts where the bound one does (with the same row
    stride), else the name of the first that moved."""
    for name, t in current.items():
        b = bound[name]
        if t.data_ptr() != b.data_ptr() or t.stride() != b.stride():
            return name
    return None


def module_weights(model: nn.Module, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The parameters the decode graph reads, by their vLLM names, as views of the loaded
    parameters (tied ones included). Raises ValueError naming a missing parameter."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for name in expected_shapes(spec):
        if name not in params:
            raise ValueError(f"the loaded model has no parameter '{name}'")
        out[name] = params[name].detach()
    return out


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(model.model.layers)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """vLLM's ``Attention`` module of each decoder layer (``model.layers.i.self_attn.attn``)."""
    return [layer.self_attn.attn for layer in decoder_layers(model)]


def kv_layout_problem(attn: nn.Module, spec: ModelSpec) -> str | None:
    """Why the megakernel cannot read and write this layer's bound KV cache in place, or None.

    The megakernel reads the packed layout ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``
    (K then V in the last dim, which must be contiguous; block, head and slot strides are free).
    The layout is confirmed with the layer's backend (``get_kv_cache_shape``) rather than assumed,
    so a backend with another layout (FlashInfer's separate K and V) is refused."""
    cache, backend = attn.kv_cache, attn.attn_backend
    name = backend.get_name()
    if getattr(attn, "kv_cache_dtype", "auto") not in BF16_CACHE_DTYPES:
        return f"KV cache dtype '{attn.kv_cache_dtype}' is not supported (the megakernel reads a bf16 cache)"
    if not isinstance(cache, torch.Tensor) or cache.dim() != 4:
        return f"{name} bound a KV cache of type {type(cache).__name__} with shape {getattr(cache, 'shape', None)}"
    if cache.dtype != torch.bfloat16:
        return f"KV cache dtype {cache.dtype} is not supported (the megakernel reads a bf16 cache)"
    num_blocks, block_size = cache.shape[0], cache.shape[2]
    packed = (num_blocks, spec.num_kv_heads, block_size, 2 * spec.head_dim)
    try:
        logical = tuple(backend.get_kv_cache_shape(num_blocks, block_size, spec.num_kv_heads, spec.head_dim))
    except Exception as e:  # a backend may refuse these sizes outright
        return f"{name}.get_kv_cache_shape refused the layout: {e}"
    if logical != packed or tuple(cache.shape) != packed:
        return (f"{name} KV cache layout {logical} (bound tensor {tuple(cache.shape)}) is not the packed "
                f"K|V layout {packed} the megakernel reads")
    if cache.stride(3) != 1:
        return f"{name} KV cache has K|V stride {cache.stride(3)}; the megakernel needs it contiguous"
    if block_size & (block_size - 1):
        return f"KV block size {block_size} is not a power of two"
    return None


def moe_layout_problem(layer: nn.Module, spec: ModelSpec, world_size: int) -> str | None:
    """Why the megakernel cannot read this decoder layer's fused experts in place, or would route
    tokens otherwise than vLLM does, or None.

    vLLM 0.26 builds ``mlp.experts`` as a ``MoERunner`` whose ``routed_experts`` holds ``w13_weight
    [E, 2I, H]`` (per expert the gate rows ``w1``, then the up rows ``w3``) and ``w2_weight [E, H,
    I]``, as loaded, under the backends of ``MOE_BACKENDS_AS_LOADED``; others rearrange them after
    loading (FlashInfer's swap gate and up or tile them, ROCm's shuffle them, the CPU backend's
    ``VLLM_CPU_SGL_KERNEL`` packs them). The experts must be split as the plan's ranks split them
    (``ModelSpec.shard``), and routed as the plan routes: the runner's router a plain
    ``FusedTopKRouter`` (softmax over every expert, top-k, renormalised when the config says so),
    its weights applied after the experts, unscaled, no transform around them."""
    runner = getattr(layer.mlp, "experts", None)
    routed = getattr(runner, "routed_experts", None)
    if routed is None:
        return f"its MLP ({type(layer.mlp).__name__}) has no fused experts at mlp.experts.routed_experts"
    method = routed.quant_method
    name = getattr(getattr(method, "unquantized_backend", None), "name", type(method).__name__)
    if name not in MOE_BACKENDS_AS_LOADED or type(getattr(method, "cpu_fused_moe", None)).__name__ == "SGLFusedMOE":
        return (f"vLLM's MoE backend {name} rearranges the expert weights after loading; the megakernel reads them as "
                f"loaded (pass --moe-backend triton)")
    parallel = routed.moe_config.moe_parallel_config
    if parallel.use_ep or parallel.tp_size != world_size or routed.local_num_experts != spec.num_experts:
        return (f"vLLM holds {routed.local_num_experts} of {spec.num_experts} experts per rank, split over "
                f"{parallel.tp_size} ranks (expert parallelism {'on' if parallel.use_ep else 'off'}); the plan reads "
                f"every expert, its width split over the {world_size} tensor-parallel ranks")
    router = runner.router
    seen = {"router": type(router).__name__, "scoring": getattr(router, "scoring_func", None),
            "renormalize": getattr(router, "renormalize", None), "top_k": router.top_k,
            "weights on input": routed.apply_router_weight_on_input,
            "scaling": runner.routed_scaling_factor * routed.routed_scaling_factor,
            "transforms": runner.routed_input_transform is not None or runner.routed_output_transform is not None}
    planned = {"router": "FusedTopKRouter", "scoring": "softmax", "renormalize": spec.norm_topk_prob,
               "top_k": spec.num_experts_per_tok, "weights on input": False, "scaling": 1.0, "transforms": False}
    differs = [f"{k} {seen[k]!r} (the plan: {planned[k]!r})" for k in planned if seen[k] != planned[k]]
    if differs:
        return f"vLLM's router differs from the plan's softmax top-k: {', '.join(differs)}"
    return None


def rope_cache(model: nn.Module, spec: ModelSpec) -> torch.Tensor:
    """vLLM's ``cos_sin_cache [max_position, head_dim]`` (cat(cos, sin), neox), shared by every
    layer. Raises ValueError if the layers hold different tables or the table is partial."""
    caches = [layer.self_attn.rotary_emb.cos_sin_cache for layer in decoder_layers(model)]
    first = caches[0]
    if any(c.data_ptr() != first.data_ptr() or c.shape != first.shape for c in caches[1:]):
        raise ValueError("the decoder layers hold different RoPE tables; the megakernel reads one")
    if first.dim() != 2 or first.shape[1] != spec.head_dim or not first.is_contiguous():
        raise ValueError(f"RoPE table of shape {tuple(first.shape)} is not a contiguous "
                         f"[positions, {spec.head_dim}] table (partial rotary is not supported)")
    return first
