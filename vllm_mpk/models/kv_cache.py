"""Paged KV caches in vLLM 0.26's layout: physical ``[num_blocks, block_size, num_kv_heads,
2 * head_size]`` (K | V packed in the last dim), viewed as the logical ``[num_blocks,
num_kv_heads, block_size, 2 * head_size]`` that attention layers take."""

from __future__ import annotations

import torch

from vllm_mpk.models.spec import ModelSpec


def allocate_kv_caches(spec: ModelSpec, num_blocks: int, block_size: int = 16,
                       dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> list[torch.Tensor]:
    shape = (num_blocks, block_size, spec.num_kv_heads, 2 * spec.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device).permute(0, 2, 1, 3) for _ in range(spec.num_layers)]

