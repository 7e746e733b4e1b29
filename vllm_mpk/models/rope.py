"""RoPE ``cos_sin_cache [positions, head_dim] = cat(cos, sin)``, neox style, as vLLM builds it;
Llama 3 scaling changes only the inverse frequencies."""

from __future__ import annotations

import math

import torch

from vllm_mpk.models.spec import ModelSpec


def inverse_frequencies(spec: ModelSpec) -> torch.Tensor:
    hd = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    scaling = spec.rope_scaling
    if scaling is None:
        return inv
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = ((original / wavelen) - low) / (high - low)
    scaled = torch.where(wavelen > original / low, inv / factor, inv)
    middle = (wavelen <= original / low) & (wavelen >= original / high)
    return torch.where(middle, (1 - smooth) * inv / factor + smooth * inv, scaled)


def cos_sin_cache(spec: ModelSpec, num_positions: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The float32 table on ``device``. On the ``meta`` device (a plan over shape-only weights) it
    is shape-only too: nothing that grows with ``num_positions`` is computed or allocated."""
    if torch.device(device).type == "meta":
        return torch.empty((num_positions, spec.head_dim), dtype=torch.float32, device="meta")
    freqs = torch.outer(torch.arange(num_positions, dtype=torch.float64), inverse_frequencies(spec))
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).float().to(device)
