"""``vllm-mpk generate`` on a Hopper GPU: generate through the megakernel, then time one decode
step of the megakernel and of the same model in plain PyTorch (both replayed from CUDA graphs, same
weights, same KV cache, same inputs), side by side, with their logits compared."""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from vllm_mpk.graph.step_state import contiguous_block_tables, step_inputs
from vllm_mpk.models import DecodeModel, DecodeOptions, ModelSpec, build_decoder
from vllm_mpk.models.kv_cache import allocate_kv_caches
from vllm_mpk.models.torch_decode import TorchDecodeStep
from vllm_mpk.runtime.timing import graph_replay_us

PAGE = 16


def weight_bytes(spec: ModelSpec, weights: Mapping[str, torch.Tensor], experts_read: int | None = None) -> int:
    """What one step streams: every weight but the embedding rows it does not look up and, in a
    mixture-of-experts model given ``experts_read`` (the step's distinct chosen experts, summed
    over layers), only those experts' weights."""
    head = spec.vocab_size * spec.hidden_size * 2
    expert_names = {n for n in weights if n.endswith((".w13_weight", ".w2_weight"))} if experts_read is not None else set()
    experts = sum(weights[n].nbytes // weights[n].shape[0] for n in expert_names) // max(1, spec.num_layers)
    return sum(t.numel() * t.element_size() for n, t in weights.items()
               if n != "model.embed_tokens.weight" and n not in expert_names) + (
        head if spec.tie_word_embeddings else 0) + (experts_read or 0) * experts


def gpu_model(spec: ModelSpec, weights: Mapping[str, torch.Tensor], batch: int, max_seq: int, multi_step: bool = False
              ) -> tuple[DecodeModel, dict[str, torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The decode plan on the GPU, one worker per SM: (model, weights, KV caches, block tables)."""
    device = torch.device("cuda")
    weights = {k: v.to(device) for k, v in weights.items()}
    blocks = contiguous_block_tables(batch, max_seq, PAGE)
    caches = allocate_kv_caches(spec, int(blocks.numel()), PAGE, device=device)
    workers = torch.cuda.get_device_properties(device).multi_processor_count
    model = build_decoder(spec, weights, caches, DecodeOptions(max_batch=batch, max_seq_len=max_seq, page_size=PAGE,
                                                               num_workers=workers, multi_step=multi_step))
    return model, weights, caches, blocks


def run_demo(spec: ModelSpec, weights: Mapping[str, torch.Tensor], batch: int, prompt_len: int,
             new_tokens: int, seed: int) -> bool:
    """Returns whether the megakernel's logits agree with PyTorch's within bf16 tolerance."""
    max_seq = prompt_len + new_tokens
    model, weights, caches, blocks = gpu_model(spec, weights, batch, max_seq)
    workers = model.plan.num_workers
    start = time.perf_counter()
    megakernel = model.kernel.executor()
    print(f"megakernel ready in {time.perf_counter() - start:.1f} s ({workers} workers, {len(model.plan.tasks)} tasks)")
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, spec.vocab_size, (batch, prompt_len), generator=gen).tolist()
    start = time.perf_counter()
    sequences = model.kernel.generate(prompts, new_tokens, tokens_output=model.tokens, eos_token_id=None)
    print(f"generated {batch} x {new_tokens} tokens in {time.perf_counter() - start:.2f} s "
          f"(one launch per step, host-driven)")
    for b, seq in enumerate(sequences[:4]):
        print(f"  request {b}: ... {' '.join(map(str, seq[prompt_len:prompt_len + 16]))}")

    # Both timed on the last decode step of the generation: every row active, full KV history.
    step = torch.full((batch,), max_seq - 2)
    inputs = {k: v.cuda() for k, v in step_inputs(step, torch.tensor(sequences), blocks, PAGE).as_dict().items()}
    for name, value in inputs.items():
        model.kernel.step_buffers[name].copy_(value)
    baseline = TorchDecodeStep(spec, weights, caches, model.kernel.attached["rope.cos_sin_cache"], max_seq)
    torch_logits = baseline(inputs)
    model.kernel(batch)
    mk_logits = megakernel.tensors[model.logits.name][:batch].float()
    rel = float((mk_logits - torch_logits).norm() / torch_logits.norm())
    mk_us = graph_replay_us(lambda: megakernel.launch(batch))
    torch_us = graph_replay_us(lambda: baseline(inputs))
    tbps = weight_bytes(spec, weights) / mk_us / 1e6
    print(f"\n{torch.cuda.get_device_name()}, batch {batch}, {max_seq - 1} tokens of context")
    print(f"{'':28} {'us/token':>9}")
    print(f"{'megakernel':28} {mk_us:9.1f}   ({tbps:.2f} TB/s of weights)")
    print(f"{'PyTorch + CUDA graphs':28} {torch_us:9.1f}")
    print(f"speed-up {torch_us / mk_us:.2f}x; logits relative difference {rel:.2e}")
    return rel <= 5e-2
