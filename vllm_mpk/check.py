"""``vllm-mpk check``: a decode plan against ``transformers`` on the same weights.

Each request's prompt is fed through the decode step token by token (which also fills the paged
KV cache), then the step continues teacher-forced on the tokens ``transformers`` chose greedily.
The logits of every position are compared with those of one causal ``transformers`` forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from vllm_mpk.graph.step_state import contiguous_block_tables
from vllm_mpk.models import DecodeModel, DecodeOptions, ModelSpec, build_decoder
from vllm_mpk.models.kv_cache import allocate_kv_caches
from vllm_mpk.models.weights import split_to_hf
from vllm_mpk.runtime.standalone import StepExecutor, decode

BF16_LOGITS_TOLERANCE = 3e-2  # relative L2 error of logits with bf16 weights and activations
EXACT_LOGITS_TOLERANCE = 1e-4  # the same with float32 intermediates
# A greedy flip is put down to rounding where the reference's top-two margin is under this many
# times the RMS difference of the two logit vectors at that position (two errors of that size
# differ by about 1.4 RMS; 4 keeps a real bug's flip from hiding, since it also moves the RMS).
NEAR_TIE_NOISE = 4.0


@dataclass
class CheckResult:
    rel_error: float
    tolerance: float
    reference_tokens: list[list[int]]
    tokens: list[list[int]]
    mismatches: int
    near_ties: int

    @property
    def passed(self) -> bool:
        return self.rel_error == self.rel_error and self.rel_error <= self.tolerance and self.mismatches == 0


def hf_model(spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A float32 ``transformers`` model holding the same (upcast) weights."""
    import transformers

    config_cls = {"Qwen3ForCausalLM": transformers.Qwen3Config, "LlamaForCausalLM": transformers.LlamaConfig,
                  "Qwen3MoeForCausalLM": transformers.Qwen3MoeConfig}
    model_cls = getattr(transformers, spec.architecture)
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling:
        rope = {**spec.rope_scaling, "rope_type": "llama3", "rope_theta": spec.rope_theta}
    moe = {}
    if spec.is_moe:
        moe = dict(num_experts=spec.num_experts, num_experts_per_tok=spec.num_experts_per_tok,
                   moe_intermediate_size=spec.moe_intermediate_size, norm_topk_prob=spec.norm_topk_prob,
                   decoder_sparse_step=1, mlp_only_layers=[])
    config = config_cls[spec.architecture](
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_q_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim, rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=spec.tie_word_embeddings,
        rope_parameters=rope, attn_implementation="eager", torch_dtype=torch.float32, **moe,
    )
    with torch.device("meta"):
        model = model_cls(config)
    # transformers 5 holds a MoE layer's experts fused, in vLLM's w13/w2 layout
    state = {k: v.float() for k, v in split_to_hf(spec, weights, fused_experts=True).items()}
    if spec.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its buffers are not in the state
    return model.eval()


def reference_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation by ``transformers`` and the float32 logits (on the CPU) at every position."""
    seq, device = list(prompt), next(model.parameters()).device
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor([seq], device=device)).logits[0]
            seq.append(int(logits[-1].argmax()))
        return seq, model(torch.tensor([seq], device=device)).logits[0].float().cpu()


def run_teacher_forced(model: DecodeModel, executor: StepExecutor, sequences: list[list[int]],
                       block_tables: torch.Tensor, order: str = "schedule") -> list[torch.Tensor]:
    """Decode every position of every sequence through the plan; per-request logits ``[len, V]``."""
    out = [torch.empty(len(s), model.spec.vocab_size) for s in sequences]

    def keep(positions: torch.Tensor, logits: torch.Tensor) -> None:
        for b, pos in enumerate(positions[:len(sequences)].tolist()):
            if pos >= 0:
                out[b][pos] = logits[b]

    decode(executor, sequences, block_tables, model.options.page_size, teacher_forced=True,
           logits_name=model.logits.name, tokens_name=model.tokens.name, on_step=keep, order=order)
    return out


def check_model(spec: ModelSpec, weights: Mapping[str, torch.Tensor], prompt_lens: list[int], new_tokens: int,
                *, exact: bool = False, page_size: int = 16, num_workers: int = 132, seed: int = 0,
                device: str = "cpu") -> CheckResult:
    """Compare the plan, run on ``device`` ("cpu": reference executor; "cuda": megakernel), with a
    float32 ``transformers`` model on the same weights. ``exact`` (CPU only) keeps intermediates
    and the KV cache in float32."""
    if exact and device != "cpu":
        raise ValueError("exact=True is a mode of the CPU reference executor; the megakernel computes in bf16")
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, spec.vocab_size, (n,), generator=gen).tolist() for n in prompt_lens]
    hf = hf_model(spec, weights).to(device)
    refs = [reference_greedy(hf, p, new_tokens) for p in prompts]
    max_len = max(len(seq) for seq, _ in refs)
    options = DecodeOptions(max_batch=len(prompts), max_seq_len=max_len, page_size=page_size, num_workers=num_workers)
    blocks = contiguous_block_tables(len(prompts), max_len, page_size)
    cache_dtype = torch.float32 if exact else weights["model.norm.weight"].dtype
    caches = allocate_kv_caches(spec, int(blocks.numel()), page_size, dtype=cache_dtype, device=device)
    on_device = {k: v.to(device) for k, v in weights.items()}
    model = build_decoder(spec, on_device, caches, options)
    ours = run_teacher_forced(model, model.kernel.executor(exact=exact), [seq for seq, _ in refs], blocks)
    ref_all = torch.cat([logits for _, logits in refs])
    rel = float((torch.cat(ours) - ref_all).norm() / ref_all.norm())
    mismatches = near_ties = 0
    our_tokens = []
    for (seq, ref_logits), got, plen in zip(refs, ours, prompt_lens):
        picked = got.argmax(-1)
        our_tokens.append(picked[plen - 1:-1].tolist())
        for pos in range(plen - 1, len(seq) - 1):
            top2 = ref_logits[pos].topk(2).values
            noise = float((got[pos] - ref_logits[pos]).pow(2).mean().sqrt())
            if float(top2[0] - top2[1]) < NEAR_TIE_NOISE * noise:
                near_ties += 1
            elif int(picked[pos]) != seq[pos + 1]:
                mismatches += 1
    return CheckResult(rel, EXACT_LOGITS_TOLERANCE if exact else BF16_LOGITS_TOLERANCE,
                       [seq[p:] for (seq, _), p in zip(refs, prompt_lens)], our_tokens, mismatches, near_ties)
