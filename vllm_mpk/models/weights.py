"""Weights as a name -> tensor mapping in vLLM's merged layout (``qkv_proj``, ``gate_up_proj``, the
fused experts' ``w13_weight`` and ``w2_weight``), the same names vLLM's loaded modules carry, so one
builder serves checkpoints and vLLM alike. How the experts map to a checkpoint's per-expert names:
``models/spec.py``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from vllm_mpk.models.spec import ModelSpec

Weights = dict[str, torch.Tensor]


def layer_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}"
    return {
        "input_norm": f"{p}.input_layernorm.weight",
        "qkv": f"{p}.self_attn.qkv_proj.weight",
        "q_norm": f"{p}.self_attn.q_norm.weight",
        "k_norm": f"{p}.self_attn.k_norm.weight",
        "o": f"{p}.self_attn.o_proj.weight",
        "post_norm": f"{p}.post_attention_layernorm.weight",
        "gate_up": f"{p}.mlp.gate_up_proj.weight",
        "down": f"{p}.mlp.down_proj.weight",
        "router": f"{p}.mlp.gate.weight",
        "w13": f"{p}.mlp.experts.routed_experts.w13_weight",
        "w2": f"{p}.mlp.experts.routed_experts.w2_weight",
    }


def expert_checkpoint_name(layer: int, expert: int, proj: str) -> str:
    """A Hugging Face checkpoint's name of one expert's ``gate``, ``up`` or ``down`` projection."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.weight"


EMBED, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    h, hd = spec.hidden_size, spec.head_dim
    shapes = {EMBED: (spec.vocab_size, h), FINAL_NORM: (h,)}
    if not spec.tie_word_embeddings:
        shapes[LM_HEAD] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        n = layer_names(i)
        shapes.update({n["input_norm"]: (h,), n["qkv"]: (spec.qkv_width, h), n["o"]: (h, spec.num_q_heads * hd),
                       n["post_norm"]: (h,)})
        if spec.is_moe:
            e, inter = spec.num_experts, spec.moe_intermediate_size
            shapes.update({n["router"]: (e, h), n["w13"]: (e, 2 * inter, h), n["w2"]: (e, h, inter)})
        else:
            shapes.update({n["gate_up"]: (2 * spec.intermediate_size, h), n["down"]: (h, spec.intermediate_size)})
        if spec.qk_norm:
            shapes.update({n["q_norm"]: (hd,), n["k_norm"]: (hd,)})
    return shapes


def check_weights(spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError naming the first missing or misshapen weight. The embedding may be padded
    to more rows than the vocabulary (vLLM pads to a multiple of 64)."""
    for name, shape in expected_shapes(spec).items():
        if name not in weights:
            raise ValueError(f"weight '{name}' is missing")
        actual = tuple(weights[name].shape)
        padded_ok = name in (EMBED, LM_HEAD) and actual[1:] == shape[1:] and actual[0] >= shape[0]
        if actual != shape and not padded_ok:
            raise ValueError(f"weight '{name}' has shape {actual}, expected {shape}")


def lm_head(spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return weights[EMBED] if spec.tie_word_embeddings else weights[LM_HEAD]


def random_weights(spec: ModelSpec, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                   std: float = 0.02, device: str | torch.device = "cpu") -> Weights:
    """Weights at a realistic scale: matrices ~ N(0, std), norms ~ 1 + N(0, 0.1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out: Weights = {}
    for name, shape in expected_shapes(spec).items():
        w = torch.randn(shape, generator=gen, device=device)
        out[name] = (1.0 + 0.1 * w if len(shape) == 1 else std * w).to(dtype)
    return out


def shard_weights(spec: ModelSpec, weights: Mapping[str, torch.Tensor], world_size: int, rank: int) -> Weights:
    """Rank ``rank``'s slices of full merged weights, laid out as vLLM's TP-local parameters:
    qkv_proj and gate_up_proj by rows (q, k, v and gate, up sliced separately), o_proj and
    down_proj by columns, embedding and lm_head by vocabulary rows, norms whole; experts' w13 by
    rows of each expert (gate and up sliced separately), w2 by columns, the router whole."""
    local, hd = spec.shard(world_size), spec.head_dim

    def rows(t: torch.Tensor, block: int, offset: int = 0) -> torch.Tensor:
        return t[offset + rank * block:offset + (rank + 1) * block]

    out: Weights = {}
    for i in range(spec.num_layers):
        n = layer_names(i)
        nq, nkv = local.num_q_heads * hd, local.num_kv_heads * hd
        qkv = weights[n["qkv"]]
        out[n["qkv"]] = torch.cat([rows(qkv, nq), rows(qkv, nkv, spec.num_q_heads * hd),
                                   rows(qkv, nkv, (spec.num_q_heads + spec.num_kv_heads) * hd)])
        if spec.is_moe:
            w13, w2, width = weights[n["w13"]].transpose(0, 1), weights[n["w2"]], local.moe_intermediate_size
            out[n["w13"]] = torch.cat([rows(w13, width), rows(w13, width, spec.moe_intermediate_size)]).transpose(0, 1)
            out[n["w2"]] = rows(w2.permute(2, 0, 1), width).permute(1, 2, 0)
            out[n["router"]] = weights[n["router"]]
        else:
            gate_up = weights[n["gate_up"]]
            out[n["gate_up"]] = torch.cat([rows(gate_up, local.intermediate_size),
                                           rows(gate_up, local.intermediate_size, spec.intermediate_size)])
            out[n["down"]] = rows(weights[n["down"]].T, local.intermediate_size).T
        out[n["o"]] = rows(weights[n["o"]].T, nq).T
        for key in ("input_norm", "post_norm") + (("q_norm", "k_norm") if spec.qk_norm else ()):
            out[n[key]] = weights[n[key]]
    out[EMBED], out[FINAL_NORM] = rows(weights[EMBED], local.vocab_size), weights[FINAL_NORM]
    if not spec.tie_word_embeddings:
        out[LM_HEAD] = rows(weights[LM_HEAD], local.vocab_size)
    return {k: v.contiguous() for k, v in out.items()}


def merge_hf_state_dict(spec: ModelSpec, state: Mapping[str, torch.Tensor]) -> Weights:
    """Hugging Face names (``q_proj``, ``k_proj``, ``gate_proj``, per-expert projections ...) ->
    vLLM's merged names."""
    out: Weights = {}
    for i in range(spec.num_layers):
        p, n = f"model.layers.{i}", layer_names(i)
        out[n["qkv"]] = torch.cat([state[f"{p}.self_attn.{x}_proj.weight"] for x in "qkv"])
        if spec.is_moe:
            experts = range(spec.num_experts)
            out[n["w13"]] = torch.stack([torch.cat([state[expert_checkpoint_name(i, e, x)] for x in ("gate", "up")])
                                         for e in experts])
            out[n["w2"]] = torch.stack([state[expert_checkpoint_name(i, e, "down")] for e in experts])
            out[n["router"]] = state[n["router"]]
        else:
            out[n["gate_up"]] = torch.cat([state[f"{p}.mlp.{x}_proj.weight"] for x in ("gate", "up")])
            out[n["down"]] = state[n["down"]]
        for key in ("input_norm", "o", "post_norm") + (("q_norm", "k_norm") if spec.qk_norm else ()):
            out[n[key]] = state[n[key]]
    out[EMBED], out[FINAL_NORM] = state[EMBED], state[FINAL_NORM]
    if not spec.tie_word_embeddings:
        out[LM_HEAD] = state[LM_HEAD]
    return out


def split_to_hf(spec: ModelSpec, weights: Mapping[str, torch.Tensor], *, fused_experts: bool = False) -> Weights:
    """vLLM's merged names -> Hugging Face checkpoint names; the inverse of ``merge_hf_state_dict``.
    ``fused_experts``: each MoE layer's experts as ``transformers`` 5 holds them in memory,
    ``mlp.experts.gate_up_proj`` (w13) and ``mlp.experts.down_proj`` (w2), not per expert."""
    hd = spec.head_dim
    out: Weights = {}
    for i in range(spec.num_layers):
        p, n = f"model.layers.{i}", layer_names(i)
        q, k, v = weights[n["qkv"]].split([spec.num_q_heads * hd, spec.num_kv_heads * hd,
                                           spec.num_kv_heads * hd])
        out.update({f"{p}.self_attn.q_proj.weight": q, f"{p}.self_attn.k_proj.weight": k,
                    f"{p}.self_attn.v_proj.weight": v})
        if spec.is_moe and fused_experts:
            out.update({f"{p}.mlp.experts.gate_up_proj": weights[n["w13"]],
                        f"{p}.mlp.experts.down_proj": weights[n["w2"]], n["router"]: weights[n["router"]]})
        elif spec.is_moe:
            for e, (w13, w2) in enumerate(zip(weights[n["w13"]], weights[n["w2"]])):
                gate, up = w13.chunk(2)
                out.update({expert_checkpoint_name(i, e, "gate"): gate, expert_checkpoint_name(i, e, "up"): up,
                            expert_checkpoint_name(i, e, "down"): w2})
            out[n["router"]] = weights[n["router"]]
        else:
            gate, up = weights[n["gate_up"]].chunk(2)
            out.update({f"{p}.mlp.gate_proj.weight": gate, f"{p}.mlp.up_proj.weight": up,
                        n["down"]: weights[n["down"]]})
        for key in ("input_norm", "o", "post_norm") + (("q_norm", "k_norm") if spec.qk_norm else ()):
            out[n[key]] = weights[n[key]]
    out[EMBED], out[FINAL_NORM] = weights[EMBED], weights[FINAL_NORM]
    if not spec.tie_word_embeddings:
        out[LM_HEAD] = weights[LM_HEAD]
    return out


def load_checkpoint(spec: ModelSpec, model_dir: str | Path) -> Weights | None:
    """The merged weights of a safetensors checkpoint in ``model_dir``, or None if it has none."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    state: Weights = {}
    for f in files:
        state.update(load_file(str(f)))
    return merge_hf_state_dict(spec, state)


def save_checkpoint(spec: ModelSpec, weights: Mapping[str, torch.Tensor], model_dir: str | Path) -> None:
    """Write ``weights`` as a Hugging Face safetensors checkpoint (tied weights stored once)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in split_to_hf(spec, weights).items()},
              str(Path(model_dir) / "model.safetensors"), metadata={"format": "pt"})
