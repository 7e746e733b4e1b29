"""The MPK model classes built from vLLM's own Qwen3, Llama and Qwen3-MoE modules on the CPU: the
weights (fused experts included) and RoPE table found in the module tree, whole decode steps
through the plan's CPU reference executor bound to vLLM-style persistent buffers and KV cache
(compared with the standalone decode of the same plan), the routing of every other batch to the
stock forward, and the MoE opt-in and what it still leaves to stock vLLM.

vLLM's CUDA build has no CPU kernels here, so the modules are built under vLLM's CPU platform with
a schema-only stand-in for the one custom op their constructors look up (``_C::silu_and_mul``);
no vLLM kernel runs: the MPK path uses only torch and the plan's reference executor.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.helpers import vllm_platform
from vllm_mpk.integration.binding import (
    attention_modules,
    kv_layout_problem,
    module_weights,
    moe_layout_problem,
    rope_cache,
)
from vllm_mpk.integration.model import MpkFallbackError, is_mpk_class
from vllm_mpk.models.decoder import DecodeOptions, build_decoder
from vllm_mpk.models.kv_cache import allocate_kv_caches
from vllm_mpk.models.spec import ModelSpec
from vllm_mpk.models.weights import (
    EMBED,
    expected_shapes,
    expert_checkpoint_name,
    layer_names,
    random_weights,
    split_to_hf,
)
from vllm_mpk.runtime import control
from vllm_mpk.runtime.megakernel import Megakernel
from vllm_mpk.runtime.standalone import decode

pytest.importorskip("vllm")

PAGE, NUM_BLOCKS, MAX_BLOCKS, MAX_REQS, MAX_TOKENS, WORKERS = 16, 12, 4, 4, 32, 8
CONFIGS = {
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 64, "vocab_size": 1000, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
              "max_position_embeddings": 256, "tie_word_embeddings": True, "hidden_act": "silu",
              "torch_dtype": "bfloat16", "attention_bias": False},
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 1000, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 256,
              "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 64}},
}
# Qwen3-MoE as vLLM builds it: fused experts (mlp.experts.routed_experts) and a router (mlp.gate)
CONFIGS["qwen3-moe"] = {**CONFIGS["qwen3"], "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                        "tie_word_embeddings": False, "num_experts": 8, "num_experts_per_tok": 2,
                        "moe_intermediate_size": 128, "norm_topk_prob": True}
# Every model here is served by the megakernel (MoE is opt-in), with its logits and argmax sampler.
OPT_IN = {"moe": True, "logits_in_kernel": True, "greedy_argmax": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_cpu() -> Iterator[None]:
    """vLLM's CPU platform and one-rank gloo groups, restored afterwards. The groups are made under
    a config without a model, for which vLLM makes the expert-parallel group a MoE model needs."""
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.platforms.cpu import CpuPlatform

    if not hasattr(torch.ops._C, "silu_and_mul"):
        lib = torch.library.Library("_C", "FRAGMENT")  # noqa: F841 (kept alive by torch's registry)
        lib.define("silu_and_mul(Tensor! out, Tensor input) -> ()")
    with vllm_platform(CpuPlatform()):
        try:
            with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
                parallel_state.init_distributed_environment(1, 0, f"tcp://127.0.0.1:{_free_port()}", 0, "gloo")
                parallel_state.initialize_model_parallel(1, 1)
            yield
        finally:
            parallel_state.destroy_model_parallel()
            parallel_state.destroy_distributed_environment()


@dataclass
class Built:
    name: str
    spec: ModelSpec
    model: Any
    vllm_config: Any
    weights: dict[str, torch.Tensor]  # what was loaded, in the merged layout


def resolve_under_options(tmp: Path, config: dict[str, Any], mpk: dict[str, Any], tensor_parallel_size: int = 1,
                          **engine: Any) -> tuple[type, Any]:
    """The class vLLM's registry resolves for ``model_impl="mpk"`` under a CPU VllmConfig holding
    ``mpk`` and ``tensor_parallel_size`` (as a worker loading the model does), and that config."""
    from vllm.config import CUDAGraphMode, DeviceConfig, ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs

    tmp.mkdir(exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config))
    mc = EngineArgs(model=str(tmp), model_impl="mpk", skip_tokenizer_init=True, **engine).create_model_config()
    vc = VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu"), additional_config={"mpk": mpk},
                    parallel_config=ParallelConfig(tensor_parallel_size=tensor_parallel_size))
    vc.compilation_config.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE  # what vLLM resolves on a GPU
    with set_current_vllm_config(vc):
        cls, _ = mc.registry.resolve_model_cls(mc.architectures, mc)
    return cls, vc


def build_model(tmp: Path, name: str, mpk: dict[str, Any] | None = None, **engine: Any) -> Built:
    """vLLM's model class for ``model_impl="mpk"`` on the CPU, random weights loaded through its
    own ``load_weights`` and post-processed as vLLM's loader does, and a packed KV cache bound to
    each attention layer."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    cls, vc = resolve_under_options(tmp / name, CONFIGS[name],
                                    {"max_batch": MAX_REQS, "num_workers": WORKERS, **OPT_IN, **(mpk or {})}, **engine)
    spec = ModelSpec.from_hf_config(CONFIGS[name])
    with set_current_vllm_config(vc), set_default_torch_dtype(torch.bfloat16), torch.device("cpu"):
        model = cls(vllm_config=vc, prefix="")
    weights = random_weights(spec, seed=len(name))
    model.load_weights(split_to_hf(spec, weights).items())
    with set_current_vllm_config(vc):  # what vLLM's loader runs next (fused MoE: its backend's weight setup)
        process_weights_after_loading(model, vc.model_config, torch.device("cpu"))
    for cache, attn in zip(allocate_kv_caches(spec, NUM_BLOCKS, PAGE), attention_modules(model)):
        attn.kv_cache = cache
    return Built(name, spec, model, vc, weights)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def built(request: pytest.FixtureRequest, vllm_cpu: None, tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_model(tmp_path_factory.mktemp("models"), request.param)


def test_the_mpk_class_wraps_the_stock_class(built: Built) -> None:
    cls = type(built.model)
    assert is_mpk_class(cls) and cls.__name__ == f"Mpk{built.spec.architecture}"
    assert cls.__mro__[2].__name__ == built.spec.architecture


def test_weights_are_the_loaded_parameters_in_place(built: Built) -> None:
    found = module_weights(built.model, built.spec)
    assert set(found) == set(expected_shapes(built.spec))
    params = dict(built.model.named_parameters(remove_duplicate=False))
    for name, t in found.items():
        assert t.data_ptr() == params[name].data_ptr(), name
        loaded = built.weights[name]
        torch.testing.assert_close(t[:loaded.shape[0]], loaded, rtol=0, atol=0, msg=name)
    assert found[EMBED].shape[0] % 64 == 0  # vLLM pads the vocabulary rows


def test_rope_table_is_vllms_shared_cache(built: Built) -> None:
    table = rope_cache(built.model, built.spec)
    assert table.shape[1] == built.spec.head_dim
    assert table.data_ptr() == built.model.model.layers[-1].self_attn.rotary_emb.cos_sin_cache.data_ptr()


def test_bound_kv_cache_passes_the_layout_check(built: Built) -> None:
    for attn in attention_modules(built.model):
        assert kv_layout_problem(attn, built.spec) is None


# decode steps ---------------------------------------------------------------------------------


class Runner:
    """vLLM's side of a decode step, as Model Runner V2 lays it out: persistent buffers whose
    leading rows hold this step (requests condensed to the first rows, block tables gathered in
    batch order, padded rows with seq_len 0 and slot -1), and FlashAttention metadata over them."""

    def __init__(self, built: Built, blocks: list[list[int]]):
        self.built, self.blocks = built, blocks
        self.input_ids = torch.zeros(MAX_TOKENS, dtype=torch.int32)
        self.positions = torch.zeros(MAX_TOKENS, dtype=torch.int64)
        self.seq_lens = torch.zeros(MAX_REQS, dtype=torch.int32)
        self.block_table = torch.zeros(MAX_REQS, MAX_BLOCKS, dtype=torch.int32)
        self.slot_mapping = torch.full((MAX_TOKENS,), -1, dtype=torch.int64)

    def metadata(self, num_reqs: int, num_tokens: int, max_query_len: int = 1) -> dict[str, Any]:
        from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

        md = FlashAttentionMetadata(
            num_actual_tokens=num_tokens, max_query_len=max_query_len,
            query_start_loc=torch.arange(num_reqs + 1, dtype=torch.int32), max_seq_len=int(self.seq_lens.max()),
            seq_lens=self.seq_lens[:num_reqs], block_table=self.block_table[:num_reqs],
            slot_mapping=self.slot_mapping[:num_tokens], use_cascade=False, common_prefix_len=0,
            cu_prefix_query_lens=None, prefix_kv_lens=None, suffix_kv_lens=None)
        return {attn.layer_name: md for attn in attention_modules(self.built.model)}

    def forward(self, attn_metadata: Any, num_tokens: int, mode: Any = None) -> torch.Tensor:
        from vllm.config import CUDAGraphMode
        from vllm.forward_context import set_forward_context

        with set_forward_context(attn_metadata, self.built.vllm_config, num_tokens=num_tokens,
                                 cudagraph_runtime_mode=mode or CUDAGraphMode.NONE):
            return self.built.model(input_ids=self.input_ids[:num_tokens], positions=self.positions[:num_tokens])

    def step(self, rows: list[tuple[int, int, int]], padded: int, mode: Any = None) -> torch.Tensor:
        """``rows``: (request, token, position) per active request; returns hidden states."""
        self.seq_lens.zero_()
        self.block_table.zero_()
        self.slot_mapping.fill_(-1)
        for b, (req, token, pos) in enumerate(rows):
            self.input_ids[b], self.positions[b], self.seq_lens[b] = token, pos, pos + 1
            self.block_table[b, :len(self.blocks[req])] = torch.tensor(self.blocks[req], dtype=torch.int32)
            self.slot_mapping[b] = self.blocks[req][pos // PAGE] * PAGE + pos % PAGE
        return self.forward(self.metadata(padded, padded), padded, mode)


def decode_step(num_reqs: int, padded: int) -> Any:
    """What Model Runner V2's model state reads of a pure decode batch (``InputBatch``)."""
    return SimpleNamespace(num_reqs=num_reqs, num_tokens=num_reqs, num_tokens_after_padding=padded)


def test_decode_steps_match_the_standalone_plan(built: Built) -> None:
    """Three ragged teacher-forced requests (crossing pages, finishing at different steps, batch
    padded to a power of two) through the vLLM binding, against the same layers planned with the
    lm_head and driven by the standalone loop on a KV cache of their own. The vLLM path's plan stops
    at the final norm; its logits are taken with the lm_head weights, as vLLM's compute_logits would."""
    spec, model = built.spec, built.model
    gen = torch.Generator().manual_seed(7)
    sequences = [torch.randint(0, spec.vocab_size, (n,), generator=gen).tolist() for n in (5, 19, 33)]
    blocks = [[7], [3, 0], [11, 2, 9]]  # scattered on purpose

    reference = build_decoder(spec, built.weights, allocate_kv_caches(spec, NUM_BLOCKS, PAGE),
                              DecodeOptions(max_batch=len(sequences), max_seq_len=MAX_BLOCKS * PAGE, page_size=PAGE,
                                            num_workers=WORKERS))
    from vllm_mpk.graph.reference import ReferenceExecutor
    from vllm_mpk.graph.step_state import STEP_INPUT_NAMES

    ex = ReferenceExecutor(reference.plan, {**reference.kernel.attached,
                                            **{n: torch.zeros(reference.kernel.tensors[n].shape,
                                                              dtype=reference.kernel.tensors[n].dtype)
                                               for n in STEP_INPUT_NAMES}})
    expected: dict[tuple[int, int], torch.Tensor] = {}

    def keep(pos: torch.Tensor, logits: torch.Tensor) -> None:
        for r, p in enumerate(pos.tolist()):
            if p >= 0:
                expected[r, p] = logits[r].clone()

    table = torch.tensor([b + [0] * (MAX_BLOCKS - len(b)) for b in blocks], dtype=torch.int32)
    decode(ex, sequences, table, PAGE, teacher_forced=True, on_step=keep)

    steps_before = model._mpk.steps
    runner, head = Runner(built, blocks), built.weights[EMBED if spec.tie_word_embeddings else "lm_head.weight"]
    for pos in range(max(len(s) for s in sequences)):
        rows = [(r, s[pos], pos) for r, s in enumerate(sequences) if pos < len(s)]
        padded = 1 << (len(rows) - 1).bit_length()
        hidden = runner.step(rows, padded)
        assert hidden.shape == (padded, spec.hidden_size)
        logits = hidden[:len(rows)].float() @ head.float().T
        want = torch.stack([expected[r, p] for r, _, p in rows])
        # bf16 rounding of the final hidden state is the only difference: ~1% of scale.
        tol = 0.02 * float(want.abs().max())
        torch.testing.assert_close(logits, want, rtol=0.02, atol=tol)
        picked = logits.argmax(-1)
        gaps = want.max(-1).values - want.gather(1, picked[:, None])[:, 0]
        assert (gaps <= 2 * tol).all(), f"greedy tokens differ beyond a near-tie at position {pos}: {gaps}"
    assert model._mpk.steps - steps_before == max(len(s) for s in sequences)
    # The megakernel wrote K and V into the cache vLLM bound, at vLLM's slots.
    cache = attention_modules(model)[0].kv_cache
    assert cache[blocks[2][2], :, 0].abs().sum() > 0 and cache[blocks[2][2], :, 1].abs().sum() == 0


# routing ----------------------------------------------------------------------------------------


@pytest.fixture
def stock_calls(built: Built, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    return record_stock_forward(built, monkeypatch)


def record_stock_forward(built: Built, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the stock forward (which needs vLLM's CUDA kernels) with a recorder."""
    calls: list[int] = []
    stock = type(built.model).__mro__[2]

    def recorded(self: Any, input_ids: torch.Tensor, positions: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(positions.shape[0])
        return torch.zeros(positions.shape[0], built.spec.hidden_size)

    monkeypatch.setattr(stock, "forward", recorded)
    return calls


def test_non_decode_batches_run_the_stock_forward(built: Built, stock_calls: list[int]) -> None:
    runner = Runner(built, [[1], [2], [4], [5], [6]])
    before = built.model._mpk.steps
    runner.forward(None, 16)  # the profiling run: no attention metadata
    runner.seq_lens[:2] = torch.tensor([5, 3], dtype=torch.int32)
    runner.forward(runner.metadata(2, 8, max_query_len=5), 8)  # prefill / mixed
    runner.seq_lens[:MAX_REQS] = 1
    runner.forward(runner.metadata(MAX_REQS, MAX_REQS + 2), MAX_REQS + 2)  # above max_batch
    runner.forward([runner.metadata(1, 1)], 1)  # micro-batched steps come as a list
    assert stock_calls == [16, 8, MAX_REQS + 2, 1]
    assert built.model._mpk.steps == before and built.model._mpk.disabled is None


@pytest.fixture
def log_lines() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("vllm.mpk")
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)


def test_fp8_kv_cache_falls_back_with_one_line(built: Built, stock_calls: list[int], log_lines: list[logging.LogRecord],
                                              monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fresh = build_model(tmp_path, built.name)
    for attn in attention_modules(fresh.model):
        monkeypatch.setattr(attn, "kv_cache_dtype", "fp8")
    runner = Runner(fresh, [[1]])
    for pos in range(3):
        runner.step([(0, 5, pos)], 1)
    assert "fp8" in (fresh.model._mpk.disabled or "")
    assert len(stock_calls) == 3 and fresh.model._mpk.steps == 0
    warnings = [r for r in log_lines if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "fp8" in warnings[0].getMessage()


def test_strict_mode_refuses_to_fall_back(built: Built, stock_calls: list[int], monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    fresh = build_model(tmp_path, built.name, mpk={"strict": True})
    for attn in attention_modules(fresh.model):
        monkeypatch.setattr(attn, "kv_cache_dtype", "fp8")
    with pytest.raises(MpkFallbackError, match="fp8"):
        Runner(fresh, [[1]]).step([(0, 5, 0)], 1)


def test_moved_buffers_stop_the_megakernel(built: Built, stock_calls: list[int], tmp_path: Path) -> None:
    fresh = build_model(tmp_path, built.name)
    runner = Runner(fresh, [[1]])
    runner.step([(0, 5, 0)], 1)
    assert fresh.model._mpk.steps == 1
    runner.seq_lens = torch.zeros(MAX_REQS, dtype=torch.int32)  # a runner that reallocated its buffer
    runner.step([(0, 6, 1)], 1)
    assert "seq_lens" in (fresh.model._mpk.disabled or "") and fresh.model._mpk.steps == 1
    assert len(stock_calls) == 1


# memory ---------------------------------------------------------------------------------------


def test_memory_is_reserved_at_load_and_given_to_the_build(built: Built, stock_calls: list[int], tmp_path: Path) -> None:
    """The model holds the estimated build size from construction (inside vLLM's load_model, so
    its memory profiling counts it) until the build, which allocates no more than that."""
    from vllm_mpk.integration.memory import _rounded, activation_sizes, allocated_bytes, megakernel_bytes
    from vllm_mpk.integration.options import plan_batches

    fresh = build_model(tmp_path, built.name)
    mpk = fresh.model._mpk
    sizes = plan_batches(MAX_REQS)
    assert mpk.logits_off is None  # the plans run the lm_head beside the final norm (kernel_logits.py)
    estimate = sum(megakernel_bytes(built.spec, b, WORKERS, final="logits") for b in sizes)
    assert mpk.reservation is not None and mpk.reservation.block is not None
    assert mpk.reservation.block.numel() == estimate
    Runner(fresh, [[1]]).step([(0, 5, 0)], 1)
    assert sorted(mpk.kernels) == list(sizes) and mpk.reservation is None
    # kv_splits auto: 2 KV heads on 8 workers split at batch 1 only (2 x 1 x 4 <= 8); the estimate
    # resolved each size as its build did.
    assert {b: bool(k.plan.counters) for b, k in mpk.kernels.items()} == {b: b == 1 for b in sizes}
    # The CPU build allocates the plan's intermediates, exactly as estimated (each rounded as the
    # caching allocator does: the split-KV arrival words are smaller than its 512-byte blocks).
    allocated = sum(allocated_bytes(k) for k in mpk.kernels.values())
    assert allocated == sum(_rounded(n) for b in sizes for n in activation_sizes(built.spec, b, WORKERS,
                                                                                 final="logits"))
    assert allocated < estimate


def test_a_fallback_gives_the_reservation_back(built: Built, stock_calls: list[int], monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    fresh = build_model(tmp_path, built.name)
    for attn in attention_modules(fresh.model):
        monkeypatch.setattr(attn, "kv_cache_dtype", "fp8")
    Runner(fresh, [[1]]).step([(0, 5, 0)], 1)
    assert fresh.model._mpk.disabled and fresh.model._mpk.reservation is None


def test_breakable_piecewise_steps_run_the_stock_forward(built: Built, stock_calls: list[int],
                                                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With VLLM_USE_BREAKABLE_CUDAGRAPH=1 a PIECEWISE step captures the whole outer forward keyed
    by token count only; a megakernel launch captured there could be replayed for a prefill."""
    from vllm.config import CUDAGraphMode

    import vllm_mpk.integration.model as model_module

    monkeypatch.setattr(model_module, "is_breakable_cudagraph_enabled", lambda: True)
    fresh = build_model(tmp_path, built.name)
    runner = Runner(fresh, [[1]])
    runner.step([(0, 5, 0)], 1, CUDAGraphMode.PIECEWISE)
    assert len(stock_calls) == 1 and fresh.model._mpk.steps == 0
    runner.step([(0, 6, 1)], 1, CUDAGraphMode.NONE)  # its eager warm-up may run the megakernel
    assert len(stock_calls) == 1 and fresh.model._mpk.steps == 1


def test_speculative_decoding_falls_back(built: Built, stock_calls: list[int], monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    fresh = build_model(tmp_path, built.name)
    mpk = fresh.model._mpk
    monkeypatch.setattr(mpk, "vllm_config", SimpleNamespace(speculative_config=object()))
    Runner(fresh, [[1]]).step([(0, 5, 0)], 1)
    assert "speculative" in (mpk.disabled or "") and len(stock_calls) == 1


def test_the_ray_executor_falls_back(built: Built, stock_calls: list[int], monkeypatch: pytest.MonkeyPatch,
                                     tmp_path: Path) -> None:
    """Ray's workers call the model runner past the Worker hooks that keep a stopped step's tokens
    from clients, so the megakernel must not run there."""
    fresh = build_model(tmp_path, built.name)
    mpk = fresh.model._mpk
    monkeypatch.setattr(mpk, "vllm_config", SimpleNamespace(parallel_config=SimpleNamespace(
        distributed_executor_backend="ray")))
    Runner(fresh, [[1]]).step([(0, 5, 0)], 1)
    assert "Ray executor" in (mpk.disabled or "") and len(stock_calls) == 1


def test_full_cudagraphs_for_mixed_batches_fall_back(built: Built, stock_calls: list[int],
                                                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """cudagraph_mode=FULL replays a graph captured from a one-token-per-request dummy batch for
    mixed batches of the same token count: a megakernel captured there would run prefills."""
    from vllm.config import CUDAGraphMode

    fresh = build_model(tmp_path, built.name)
    mpk = fresh.model._mpk
    monkeypatch.setattr(mpk, "vllm_config", SimpleNamespace(compilation_config=SimpleNamespace(
        cudagraph_mode=CUDAGraphMode.FULL)))
    Runner(fresh, [[1]]).step([(0, 5, 0)], 1)
    assert "cudagraph_mode FULL" in (mpk.disabled or "") and len(stock_calls) == 1


def test_each_decode_batch_runs_the_smallest_plan_that_holds_it(built: Built, stock_calls: list[int],
                                                               tmp_path: Path) -> None:
    """One plan per power-of-two batch size up to max_batch: a batch of 1 does not run the
    attention tasks and schedule of the largest plan."""
    from vllm_mpk.integration.options import plan_batches

    assert plan_batches(1) == (1,) and plan_batches(6) == (1, 2, 4, 6) and plan_batches(16) == (1, 2, 4, 8, 16)
    fresh = build_model(tmp_path, built.name)
    runner = Runner(fresh, [[1], [2], [3]])
    runner.step([(0, 5, 0)], 1)
    kernels = fresh.model._mpk.kernels
    assert sorted(kernels) == list(plan_batches(MAX_REQS))
    ran = {b: k.tensors["input_ids"].shape[0] for b, k in kernels.items()}
    assert ran == {b: b for b in kernels}  # each plan reads only the rows it decodes
    calls: list[int] = []
    for b, k in kernels.items():
        k.run_step = lambda n, b=b: calls.append(b)
    runner.step([(0, 6, 1), (1, 7, 0), (2, 8, 0)], 4)
    runner.step([(0, 7, 2)], 1)
    runner.step([(0, 8, 3), (1, 9, 1)], 2)
    assert calls == [4, 1, 2] and not stock_calls


class StoppedKernel:
    """A built plan's stand-in for its megakernel after a watchdog stop on ``task``: its control
    block and its row of the runtime's pinned error words say so; ``reset`` lowers both."""

    describe_stop = Megakernel.describe_stop

    def __init__(self, plan: Any, flags: torch.Tensor, row: int, task: int | None) -> None:
        self.plan, self.flags, self.row, self.resets = plan, flags, row, 0
        self.control = torch.zeros(control.WORDS, dtype=torch.int32)
        if task is not None:
            words = {control.ERROR: control.TIMEOUT, control.ERR_WORKER: 3, control.ERR_TASK: task,
                     control.ERR_EVENT: 11, control.ERR_SEEN: 4, control.ERR_WANTED: 5}
            for word, value in words.items():
                self.control[word] = value
            flags[row] = control.TIMEOUT

    def reset(self) -> None:
        self.resets += 1
        self.control.zero_()
        self.flags[self.row] = 0


def stop_one_kernel(runtime: Any, task: int) -> list[StoppedKernel]:
    """The built runtime's kernels, replaced by stand-ins; the largest plan's stopped on ``task``."""
    runtime.error_flags = torch.zeros(len(runtime.kernels), dtype=torch.int32)
    largest = max(runtime.kernels)
    runtime.kernels = {b: StoppedKernel(k.plan, runtime.error_flags, i, task if b == largest else None)
                       for i, (b, k) in enumerate(sorted(runtime.kernels.items()))}
    return list(runtime.kernels.values())


def test_the_stop_check_reads_host_memory_only(built: Built, stock_calls: list[int], monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """vLLM's output wait asks every step whether a launch stopped: the kernels' pinned error
    words, no CUDA call."""
    fresh = build_model(tmp_path, built.name)
    runtime = fresh.model._mpk
    assert not runtime.stop_raised()  # nothing built: no words
    Runner(fresh, [[1]]).step([(0, 5, 0)], 1)
    stop_one_kernel(runtime, task=0)
    runtime.error_flags.zero_()

    def cuda_call(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the stop check made a CUDA call")

    monkeypatch.setattr(torch.cuda, "synchronize", cuda_call)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", cuda_call)
    assert not runtime.stop_raised()
    runtime.error_flags[-1] = control.COPY_TIMEOUT
    assert runtime.stop_raised()


def test_a_stop_degrades_to_the_stock_layers_with_one_warning(built: Built, stock_calls: list[int],
                                                              log_lines: list[logging.LogRecord],
                                                              tmp_path: Path) -> None:
    """What every worker does at the step the engine marked after a stop: one warning naming the
    stalled task and event from the control block, every kernel reset, the FULL graphs of the
    megakernel forgotten, and every later decode batch on the stock layers."""
    fresh = build_model(tmp_path, built.name)
    runtime, runner = fresh.model._mpk, Runner(fresh, [[1], [2]])
    runner.step([(0, 5, 0)], 1)
    steps = runtime.steps
    runtime.megakernel_graphs.update({1, 2})
    largest = runtime.kernels[max(runtime.kernels)]
    task = largest.plan.tasks[-1]
    kernels = stop_one_kernel(runtime, task=task.id)
    assert runtime.stop_raised()
    runtime.guard.degrade(SimpleNamespace())
    assert [k.resets for k in kernels] == [1] * len(kernels) and not runtime.stop_raised()
    assert not runtime.megakernel_graphs and runtime.disabled is not None
    warnings = [r.getMessage() for r in log_lines if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(task) in warnings[0] and "waited on event 11" in warnings[0] and "stock layers" in warnings[0]
    runner.step([(0, 6, 1), (1, 7, 0)], 2)
    runner.step([(0, 7, 2)], 1)
    assert stock_calls == [2, 1] and runtime.steps == steps
    runtime.guard.degrade(SimpleNamespace())  # a second mark changes nothing
    assert [k.resets for k in kernels] == [1] * len(kernels)
    assert len([r for r in log_lines if r.levelno >= logging.WARNING]) == 1


def test_strict_mode_raises_on_a_stop(built: Built, stock_calls: list[int], tmp_path: Path) -> None:
    fresh = build_model(tmp_path, built.name, mpk={"strict": True})
    runtime = fresh.model._mpk
    Runner(fresh, [[1]]).step([(0, 5, 0)], 1)
    task = runtime.kernels[max(runtime.kernels)].plan.tasks[0]
    stop_one_kernel(runtime, task=task.id)
    with pytest.raises(MpkFallbackError, match="waited on event 11"):
        runtime.guard.degrade(SimpleNamespace())


def test_only_graphs_holding_the_megakernel_skip_the_attention_metadata(built: Built, stock_calls: list[int],
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    """Model Runner V2 asks the model for its per-model state. Ours skips the attention backend's
    metadata on a replay of a FULL graph that captured a megakernel launch, and builds it for every
    other step: graphs that captured the stock layers, piecewise and eager steps, and captures."""
    from vllm.config import CUDAGraphMode
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    from vllm_mpk.integration import model as integration

    fresh = build_model(tmp_path, built.name)
    runtime, runner = fresh.model._mpk, Runner(fresh, [[1], [2], [3], [4]])
    runner.step([(0, 5, 0), (1, 6, 0)], 2)  # the uncaptured warm-up step builds the megakernel
    runner.step([(r, 5, 0) for r in range(4)], 4)
    assert not runtime.megakernel_graphs  # nothing was captured
    monkeypatch.setattr(integration, "_capturing", lambda t: True)
    runner.step([(0, 5, 0), (1, 6, 0)], 2)  # Model Runner V2 captures a FULL graph in mode NONE
    runner.step([(r, 5, 0) for r in range(4)], 4, CUDAGraphMode.FULL)  # the V1 runner, in mode FULL
    runner.step([(0, 5, 0), (1, 6, 0)], 2, CUDAGraphMode.PIECEWISE)  # a breakable graph of 2: another graph
    assert runtime.megakernel_graphs == {2, 4} and not stock_calls
    runtime.disabled = "a test turned the megakernel off"  # a recapture of 4 then holds the stock layers
    runner.step([(r, 5, 0) for r in range(4)], 4)
    assert runtime.megakernel_graphs == {2} and stock_calls == [4]

    built_metadata: list[tuple[int, CUDAGraphMode, bool]] = []

    def stock_prepare_attn(self: Any, input_batch: Any, mode: CUDAGraphMode, *args: Any,
                           for_capture: bool = False) -> dict[str, Any]:
        built_metadata.append((input_batch.num_tokens_after_padding, mode, for_capture))
        return {"metadata": input_batch.num_tokens_after_padding}

    from vllm.config import set_current_vllm_config
    from vllm.v1.worker.gpu.model_states import init_model_state

    from vllm_mpk.integration.greedy_sampler import GreedyDecodeSampler
    from vllm_mpk.integration.model_state import MpkModelState

    monkeypatch.setattr(DefaultModelState, "prepare_attn", stock_prepare_attn)
    with set_current_vllm_config(fresh.vllm_config):  # the runner's own constructor picks our class
        state = init_model_state(fresh.vllm_config, fresh.model, None, torch.device("cpu"))
    assert type(state) is MpkModelState and state.model is fresh.model
    steps = [(2, CUDAGraphMode.FULL, False), (4, CUDAGraphMode.FULL, False), (2, CUDAGraphMode.NONE, False),
             (2, CUDAGraphMode.PIECEWISE, False), (2, CUDAGraphMode.NONE, True)]
    answers = [state.prepare_attn(decode_step(n, n), mode, (), None, [], None, for_capture=capture)
               for n, mode, capture in steps]
    assert answers == [None, {"metadata": 4}, {"metadata": 2}, {"metadata": 2}, {"metadata": 2}]
    assert built_metadata == steps[1:]

    # The same steps get a sampler that takes all-greedy batches by one argmax (greedy_sampler.py).
    sampler, rejection = state.custom_sampler("vLLM's sampler")
    assert isinstance(sampler, GreedyDecodeSampler) and rejection is None
    assert sampler.sampler == "vLLM's sampler" and sampler.megakernel_graphs is runtime.megakernel_graphs
    monkeypatch.setattr(state.vllm_config, "speculative_config", SimpleNamespace(method="eagle"))
    assert state.custom_sampler("vLLM's sampler") is None  # a drafter keeps vLLM's rejection sampler
    monkeypatch.setattr(state.vllm_config, "speculative_config", None)
    monkeypatch.setattr(runtime, "options", replace(runtime.options, greedy_argmax=False))
    assert state.custom_sampler("vLLM's sampler") is None


def test_compute_logits_takes_the_megakernels_logits_on_its_graph_replays(built: Built, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The plans run the lm_head beside the final norm. A step whose model state saw a replay of a
    megakernel graph gets those logits from compute_logits (no lm_head GEMM), close to vLLM's own
    on the hidden states the step returned; every other call runs vLLM's lm_head."""
    from vllm.config import CUDAGraphMode, set_current_vllm_config
    from vllm.v1.worker.gpu.model_states import init_model_state

    from vllm_mpk.integration import model as integration
    from vllm_mpk.integration.model import MpkDecodeMixin

    fresh = build_model(tmp_path, built.name)
    model, runtime = fresh.model, fresh.model._mpk
    runner = Runner(fresh, [[1], [2], [3], [4]])
    runner.step([(0, 5, 0), (1, 6, 0)], 2)  # builds the megakernels
    monkeypatch.setattr(integration, "_capturing", lambda t: True)
    runner.step([(0, 5, 0), (1, 6, 0)], 2)  # "captures" the graph of 2
    monkeypatch.undo()
    hidden = runner.step([(0, 5, 1), (1, 6, 1)], 2)  # the step a replay would run
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    monkeypatch.setattr(DefaultModelState, "prepare_attn", lambda self, *args, **kwargs: {})  # vLLM's metadata
    with set_current_vllm_config(fresh.vllm_config):
        state = init_model_state(fresh.vllm_config, model, None, torch.device("cpu"))

    def stock(h: torch.Tensor) -> torch.Tensor:
        return super(MpkDecodeMixin, model).compute_logits(h)

    ours = runtime.kernels[2].tensors[runtime.logits]
    state.prepare_attn(decode_step(2, 2), CUDAGraphMode.FULL, (), None, [], None)
    logits = model.compute_logits(hidden[:2])
    assert logits.data_ptr() == ours.data_ptr() and logits.shape == (2, built.spec.vocab_size)
    assert logits.dtype == stock(hidden[:2]).dtype == torch.bfloat16  # vLLM's dtype: near ties fall alike
    want = stock(hidden[:2]).float()
    assert torch.isfinite(logits).all() and (logits - want).abs().max() <= 0.02 * want.abs().max()
    assert model.compute_logits(hidden[:2]).data_ptr() != ours.data_ptr()  # taken once: then vLLM's lm_head
    state.prepare_attn(decode_step(2, 2), CUDAGraphMode.FULL, (), None, [], None)
    assert model.compute_logits(hidden[:1]).data_ptr() != ours.data_ptr()  # not this step's rows: vLLM's
    for mode in (CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE):  # steps that did not replay a megakernel graph
        state.prepare_attn(decode_step(2, 2), CUDAGraphMode.FULL, (), None, [], None)
        state.prepare_attn(decode_step(2, 2), mode, (), None, [], None)
        assert model.compute_logits(hidden[:2]).data_ptr() != ours.data_ptr()


@pytest.mark.parametrize("why", ["option", "scaled logits", "tensor parallel", "no FULL graphs"])
def test_plans_end_at_the_final_norm_where_vllms_logits_are_not_a_plain_projection(
        built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    from vllm_mpk.integration import model as integration
    from vllm_mpk.integration.kernel_logits import logits_problem

    fresh = build_model(tmp_path, built.name)
    model, runtime = fresh.model, fresh.model._mpk
    if why == "option":
        runtime.options = replace(runtime.options, logits_in_kernel=False)
    elif why == "scaled logits":
        monkeypatch.setattr(model.logits_processor, "scale", 0.5)
    elif why == "no FULL graphs":  # eager or piecewise decode: nothing would arm the logits
        from vllm.config import CUDAGraphMode

        monkeypatch.setattr(fresh.vllm_config.compilation_config, "cudagraph_mode", CUDAGraphMode.PIECEWISE)
    else:
        monkeypatch.setattr(integration, "tp_rank_and_size", lambda: (0, 2))
        assert "tensor parallel" in logits_problem(model, fresh.vllm_config, built.spec.vocab_size, 2)
    runtime.note_model(model)
    assert runtime.logits_off
    monkeypatch.undo()
    Runner(fresh, [[1]]).step([(0, 5, 0)], 1)
    assert runtime.kernels and runtime.logits == ""
    assert all("logits" not in k.tensors for k in runtime.kernels.values())


# mixture of experts ---------------------------------------------------------------------------


def routed_experts(model: Any) -> list[Any]:
    return [layer.mlp.experts.routed_experts for layer in model.model.layers]


def expert_parallel(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model._mpk, "vllm_config", SimpleNamespace(parallel_config=SimpleNamespace(
        enable_expert_parallel=True)))


def data_parallel(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model._mpk, "vllm_config", SimpleNamespace(parallel_config=SimpleNamespace(
        data_parallel_size=2)))


def flashinfer_backend(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend

    for experts in routed_experts(model):
        monkeypatch.setattr(experts.quant_method, "unquantized_backend", UnquantizedMoeBackend.FLASHINFER_CUTLASS)


def packed_cpu_experts(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What VLLM_CPU_SGL_KERNEL=1 leaves on an x86 CPU: the experts repacked for vLLM's CPU kernel."""
    from vllm.model_executor.layers.fused_moe.cpu_fused_moe import SGLFusedMOE

    monkeypatch.setattr(routed_experts(model)[0].quant_method, "cpu_fused_moe", object.__new__(SGLFusedMOE),
                        raising=False)


def experts_split_over_ranks(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for experts in routed_experts(model):
        monkeypatch.setattr(experts, "local_num_experts", 4)


def router_without_renormalising(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model.model.layers[1].mlp.experts.router, "renormalize", False)


def simulated_routing(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What VLLM_MOE_ROUTING_SIMULATION_STRATEGY makes vLLM build: a router of another kind."""
    from vllm.model_executor.layers.fused_moe.router.routing_simulator_router import RoutingSimulatorRouter

    runner = model.model.layers[0].mlp.experts
    monkeypatch.setattr(runner, "router", RoutingSimulatorRouter(top_k=2, global_num_experts=8, eplb_state=None))


def not_opted_in(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_mpk.integration.options import MpkOptions

    monkeypatch.setattr(model._mpk, "options", MpkOptions(max_batch=MAX_REQS, num_workers=WORKERS))


MOE_FALLBACKS = {
    "expert parallelism": (expert_parallel, "expert parallelism (--enable-expert-parallel) is not supported"),
    "data parallelism": (data_parallel, "--data-parallel-size 2 is not supported for mixture-of-experts models"),
    "MoE backend": (flashinfer_backend, "layer 0: vLLM's MoE backend FLASHINFER_CUTLASS rearranges the expert weights "
                                        "after loading; the megakernel reads them as loaded (pass --moe-backend triton)"),
    "packed CPU experts": (packed_cpu_experts, "layer 0: vLLM's MoE backend CPU rearranges the expert weights after "
                                               "loading"),
    "expert split": (experts_split_over_ranks, "layer 0: vLLM holds 4 of 8 experts per rank"),
    "router": (router_without_renormalising, "layer 1: vLLM's router differs from the plan's softmax top-k: "
                                             "renormalize False (the plan: True)"),
    "simulated routing": (simulated_routing, "layer 0: vLLM's router differs from the plan's softmax top-k: router "
                                             "'RoutingSimulatorRouter' (the plan: 'FusedTopKRouter')"),
    "no opt-in": (not_opted_in, """pass --additional-config '{"mpk": {"moe": true}}'"""),
}


@pytest.mark.parametrize("case", sorted(MOE_FALLBACKS))
def test_moe_cases_the_megakernel_does_not_run_fall_back_with_one_line(
        case: str, vllm_cpu: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        log_lines: list[logging.LogRecord]) -> None:
    """What vLLM's configuration or modules hold that the MoE plan does not match: the whole model
    runs on the stock layers, after one warning naming it."""
    fresh = build_model(tmp_path, "qwen3-moe")
    calls = record_stock_forward(fresh, monkeypatch)
    change, reason = MOE_FALLBACKS[case]
    change(fresh.model, monkeypatch)
    runner = Runner(fresh, [[1]])
    runner.step([(0, 5, 0)], 1)
    runner.step([(0, 6, 1)], 1)
    mpk = fresh.model._mpk
    assert reason in (mpk.disabled or ""), mpk.disabled
    assert calls == [1, 1] and mpk.steps == 0 and not mpk.kernels and mpk.reservation is None
    warnings = [r.getMessage() for r in log_lines if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and reason in warnings[0], warnings


@pytest.fixture(scope="module")
def moe(vllm_cpu: None, tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_model(tmp_path_factory.mktemp("moe"), "qwen3-moe")


def test_moe_weights_are_vllms_fused_experts_gate_rows_first(moe: Built) -> None:
    """vLLM's loader puts each expert's checkpoint ``gate_proj`` (its shard w1) in the first
    ``moe_intermediate_size`` rows of ``w13_weight`` and ``up_proj`` (w3) in the rest; the plan
    reads those parameters themselves, after vLLM's weight post-processing, and the router its
    runner computes the logits with."""
    spec, inter = moe.spec, moe.spec.moe_intermediate_size
    found = module_weights(moe.model, spec)
    checkpoint = split_to_hf(spec, moe.weights)
    for i, layer in enumerate(moe.model.model.layers):
        names, experts = layer_names(i), layer.mlp.experts.routed_experts
        assert moe_layout_problem(layer, spec, 1) is None
        assert layer.mlp.experts.gate is layer.mlp.gate  # vLLM's runner routes with the bound router
        for name, param in ((names["w13"], experts.w13_weight), (names["w2"], experts.w2_weight),
                            (names["router"], layer.mlp.gate.weight)):
            assert found[name].data_ptr() == param.data_ptr() and found[name].shape == param.shape, name
        assert found[names["w13"]].shape == (spec.num_experts, 2 * inter, spec.hidden_size)
        assert found[names["w2"]].shape == (spec.num_experts, spec.hidden_size, inter)
        for e in range(spec.num_experts):
            w13 = found[names["w13"]][e]
            assert torch.equal(w13[:inter], checkpoint[expert_checkpoint_name(i, e, "gate")])
            assert torch.equal(w13[inter:], checkpoint[expert_checkpoint_name(i, e, "up")])
            assert torch.equal(found[names["w2"]][e], checkpoint[expert_checkpoint_name(i, e, "down")])
        assert torch.equal(found[names["router"]], checkpoint[names["router"]])


@pytest.mark.parametrize("opted_in", [False, True])
def test_moe_is_served_by_the_megakernel_only_when_opted_in(opted_in: bool, vllm_cpu: None, tmp_path: Path,
                                                            log_lines: list[logging.LogRecord]) -> None:
    """A worker resolves the class under the VllmConfig holding ``additional_config``: without the
    opt-in, vLLM's own Qwen3-MoE (no megakernel runtime in the model it builds) after one warning
    that says how to opt in, however often it resolves; with it, the MPK class, silently."""
    from vllm.config import set_current_vllm_config
    from vllm.utils.torch_utils import set_default_torch_dtype

    from vllm_mpk.integration.options import MOE_OPT_IN

    for _ in range(2):
        cls, vc = resolve_under_options(tmp_path, CONFIGS["qwen3-moe"], {"moe": opted_in})
    with set_current_vllm_config(vc), set_default_torch_dtype(torch.bfloat16), torch.device("cpu"):
        model = cls(vllm_config=vc, prefix="")
    warnings = [r.getMessage() for r in log_lines if r.levelno >= logging.WARNING]
    assert is_mpk_class(cls) == hasattr(model, "_mpk") == opted_in
    if opted_in:
        assert cls.__mro__[2].__name__ == "Qwen3MoeForCausalLM" and model._mpk.options.moe and not warnings, warnings
    else:
        assert cls.__name__ == "Qwen3MoeForCausalLM" and cls.__module__ == "vllm.model_executor.models.qwen3_moe"
        assert len(warnings) == 1 and MOE_OPT_IN in warnings[0], warnings


@pytest.mark.parametrize("opted_in", [False, True])
def test_tensor_parallelism_is_served_by_the_megakernel_only_when_opted_in(
        opted_in: bool, vllm_cpu: None, tmp_path: Path, log_lines: list[logging.LogRecord]) -> None:
    """A worker of a TP=2 engine resolves vLLM's own class after one warning that says how to opt in
    (the megakernel is slower than stock there), however often it resolves; opted in, the MPK class,
    silently. One GPU needs no opt-in."""
    from vllm_mpk.integration.options import TP_OPT_IN

    for _ in range(2):
        cls, _ = resolve_under_options(tmp_path, CONFIGS["qwen3"], {"tensor_parallel": opted_in},
                                       tensor_parallel_size=2)
    warnings = [r.getMessage() for r in log_lines if r.levelno >= logging.WARNING]
    assert is_mpk_class(cls) == opted_in
    if opted_in:
        assert not warnings, warnings
    else:
        assert cls.__name__ == "Qwen3ForCausalLM" and len(warnings) == 1 and TP_OPT_IN in warnings[0], warnings
    assert is_mpk_class(resolve_under_options(tmp_path, CONFIGS["qwen3"], {})[0])


def test_strict_mode_refuses_tensor_parallelism_that_is_not_opted_in(vllm_cpu: None, tmp_path: Path) -> None:
    from vllm_mpk.integration.options import TP_OPT_IN
    from vllm_mpk.models.spec import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=re.escape(TP_OPT_IN)):
        resolve_under_options(tmp_path, CONFIGS["qwen3"], {"strict": True}, tensor_parallel_size=2)


MOE_DESIGNS = {
    "shared experts": ({"shared_expert_intermediate_size": 256},
                       "shared experts (shared_expert_intermediate_size) are not supported"),
    "dense layers": ({"mlp_only_layers": [1]}, "dense layers mixed in (decoder_sparse_step 1, mlp_only_layers [1])"),
    "sparse step": ({"decoder_sparse_step": 2}, "dense layers mixed in (decoder_sparse_step 2, mlp_only_layers []"),
}


@pytest.mark.parametrize("design", sorted(MOE_DESIGNS))
def test_other_moe_designs_are_refused_with_what_is_supported(design: str, vllm_cpu: None, tmp_path: Path,
                                                              log_lines: list[logging.LogRecord]) -> None:
    """Opted in or not, vLLM's Qwen3-MoE variants the plan does not compute run on vLLM's own
    layers after one warning naming the variant and what is supported; strict mode raises that."""
    from vllm_mpk.models.spec import SUPPORT_SUMMARY, UnsupportedModelError

    change, why = MOE_DESIGNS[design]
    config = {**CONFIGS["qwen3-moe"], **change}
    cls, _ = resolve_under_options(tmp_path / "lenient", config, {"moe": True})
    assert cls.__name__ == "Qwen3MoeForCausalLM" and not is_mpk_class(cls)
    warnings = [r.getMessage() for r in log_lines if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and why in warnings[0] and SUPPORT_SUMMARY in warnings[0], warnings
    with pytest.raises(UnsupportedModelError, match=r"strict mode: .*supported: architectures"):
        resolve_under_options(tmp_path / "strict", config, {"moe": True, "strict": True})
