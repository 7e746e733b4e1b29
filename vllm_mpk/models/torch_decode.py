"""One decode step in plain PyTorch (cuBLAS GEMMs, SDPA over the gathered paged cache), with no
host synchronisation, so a CUDA graph can capture it: the stock-PyTorch baseline that
``vllm-mpk generate`` times next to the megakernel, and a third implementation of the same step.

Every row must be active (``slot_mapping >= 0``): an idle row would scatter into slot 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from vllm_mpk.models.spec import ModelSpec
from vllm_mpk.models.weights import EMBED, FINAL_NORM, layer_names, lm_head


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class TorchDecodeStep:
    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor], kv_caches: Sequence[torch.Tensor],
                 rope_cache: torch.Tensor, max_seq_len: int):
        self.spec, self.weights, self.caches, self.rope = spec, weights, kv_caches, rope_cache
        self.page = kv_caches[0].shape[2]
        self.positions = torch.arange(max_seq_len, device=rope_cache.device)
        self.head = lm_head(spec, weights)[:spec.vocab_size]

    def attention(self, i: int, qkv: torch.Tensor, s: Mapping[str, torch.Tensor]) -> torch.Tensor:
        spec, hd, cache, names = self.spec, self.spec.head_dim, self.caches[i], layer_names(i)
        b = qkv.shape[0]
        q, k, v = qkv.split([spec.num_q_heads * hd, spec.num_kv_heads * hd, spec.num_kv_heads * hd], dim=-1)
        q, k, v = q.view(b, -1, hd), k.view(b, -1, hd), v.view(b, -1, hd)
        if spec.qk_norm:
            q = rms_norm(q, self.weights[names["q_norm"]], spec.rms_norm_eps)
            k = rms_norm(k, self.weights[names["k_norm"]], spec.rms_norm_eps)
        cos, sin = self.rope[s["positions"]].float().chunk(2, dim=-1)
        q, k = rotate(q, cos[:, None], sin[:, None]), rotate(k, cos[:, None], sin[:, None])
        slot = s["slot_mapping"]
        cache[slot // self.page, :, slot % self.page] = torch.cat([k, v], dim=-1).to(cache.dtype)
        blocks = s["block_tables"][:, self.positions // self.page].long()
        kv = cache[blocks, :, self.positions % self.page].transpose(1, 2)  # [B, nkv, L, 2hd]
        mask = (self.positions[None] < s["seq_lens"][:, None])[:, None, None]
        out = F.scaled_dot_product_attention(q[:, :, None], kv[..., :hd].to(q.dtype), kv[..., hd:].to(q.dtype),
                                             attn_mask=mask, enable_gqa=True)
        return out.reshape(b, -1)

    def __call__(self, s: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits (float32) of one step; ``s`` holds the step inputs (graph.step_state.StepInputs)."""
        w, eps = self.weights, self.spec.rms_norm_eps
        x = w[EMBED][s["input_ids"].long()]
        for i in range(self.spec.num_layers):
            n = layer_names(i)
            qkv = F.linear(rms_norm(x, w[n["input_norm"]], eps), w[n["qkv"]])
            x = x + F.linear(self.attention(i, qkv, s), w[n["o"]])
            gate, up = F.linear(rms_norm(x, w[n["post_norm"]], eps), w[n["gate_up"]]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w[n["down"]])
        return F.linear(rms_norm(x, w[FINAL_NORM], eps), self.head).float()
