"""Qwen3-MoE decode on the CPU: the config's MoE fields and what is refused, the fused-MoE
weights and their checkpoint names, the plan against ``transformers`` (batch 1, and batch 4 with
tokens sharing experts), every execution order, and the MoE task bodies built with nvcc (not run
here: no GPU)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_QWEN3_MOE, load_config, meta_weights, plan_inputs, torch_threads
from vllm_mpk.api import PersistentKernel
from vllm_mpk.check import check_model, hf_model, run_teacher_forced
from vllm_mpk.cli import main
from vllm_mpk.codegen.jit import compile_only
from vllm_mpk.codegen.tasks import UnsupportedOnGPU
from vllm_mpk.codegen.toolchain import ToolchainError, find_nvcc
from vllm_mpk.demo import weight_bytes
from vllm_mpk.graph.reference import ReferenceExecutor
from vllm_mpk.graph.step_state import contiguous_block_tables
from vllm_mpk.models import DecodeOptions, ModelSpec, build_decoder
from vllm_mpk.models.kv_cache import allocate_kv_caches
from vllm_mpk.models.spec import ModelConfigError, UnsupportedModelError
from vllm_mpk.models.weights import (
    expected_shapes,
    layer_names,
    merge_hf_state_dict,
    random_weights,
    save_checkpoint,
    split_to_hf,
)
from vllm_mpk.runtime.megakernel import kernel_spec

EXACT_BOUND = 2e-5  # float32 end to end, as in test_models.py


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec.from_hf_config(TINY_QWEN3_MOE)


@pytest.fixture(scope="module")
def weights(spec: ModelSpec) -> dict[str, torch.Tensor]:
    return random_weights(spec, seed=11, dtype=torch.float32)


# the config -------------------------------------------------------------------------------------


def test_transformers_to_dict_names_are_read() -> None:
    """vLLM reads the config through transformers, whose to_dict() renames ``num_experts``."""
    import transformers

    config = transformers.Qwen3MoeConfig(**{k: v for k, v in TINY_QWEN3_MOE.items() if k != "architectures"},
                                         architectures=TINY_QWEN3_MOE["architectures"]).to_dict()
    assert "num_experts" not in config
    assert ModelSpec.from_hf_config(config) == ModelSpec.from_hf_config(TINY_QWEN3_MOE)


def test_qwen3_30b_a3b_config_is_read() -> None:
    spec = ModelSpec.from_hf_config(load_config("qwen3-30b-a3b"))
    assert spec.is_moe and spec.qk_norm
    assert (spec.num_experts, spec.num_experts_per_tok, spec.moe_intermediate_size, spec.norm_topk_prob) == (
        128, 8, 768, True)
    assert not ModelSpec.from_hf_config(load_config("qwen3-8b")).is_moe


@pytest.mark.parametrize("changes,message", [
    ({"architectures": ["Qwen2MoeForCausalLM"], "shared_expert_intermediate_size": 5632},
     r"architecture \['Qwen2MoeForCausalLM'\] is not supported"),
    ({"shared_expert_intermediate_size": 512}, "shared experts .shared_expert_intermediate_size. are not supported"),
    ({"decoder_sparse_step": 2}, r"dense layers mixed in \(decoder_sparse_step 2, mlp_only_layers \[\]\)"),
    ({"mlp_only_layers": [0, 5]}, r"dense layers mixed in \(decoder_sparse_step 1, mlp_only_layers \[0, 5\]\)"),
    ({"scoring_func": "sigmoid"}, "router scoring 'sigmoid' is not supported"),
    ({"architectures": ["Qwen3ForCausalLM"]}, "mixture-of-experts layers on Qwen3ForCausalLM are not supported"),
])
def test_unsupported_moe_configs_are_refused_listing_what_is_supported(changes: dict, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message) as err:
        ModelSpec.from_hf_config({**TINY_QWEN3_MOE, **changes})
    assert "Qwen3MoeForCausalLM with every layer sparse" in str(err.value)


@pytest.mark.parametrize("changes,message", [
    ({"num_experts_per_tok": 17}, r"'num_experts_per_tok' \(17\) must be at most 'num_experts' \(16\)"),
    ({"moe_intermediate_size": None}, "config has no 'moe_intermediate_size'"),
    ({"num_experts": 0}, "config key 'num_experts' must be a positive integer, got 0"),
])
def test_malformed_moe_configs_name_the_key(changes: dict, message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        ModelSpec.from_hf_config({**TINY_QWEN3_MOE, **changes})


def test_a_tensor_parallel_rank_holds_a_slice_of_every_expert(spec: ModelSpec) -> None:
    """As vLLM's fused MoE without expert parallelism (test_tensor_parallel.py decodes it)."""
    local = spec.shard(2)
    assert (local.num_experts, local.moe_intermediate_size, local.intermediate_size) == (16, 48, 6144)
    with pytest.raises(ValueError, match=r"tensor parallel size 2 does not divide the expert width \(95\)"):
        ModelSpec.from_hf_config({**TINY_QWEN3_MOE, "moe_intermediate_size": 95}).shard(2)


# the weights ------------------------------------------------------------------------------------


def test_weights_are_vllm_fused_moe_parameters(spec: ModelSpec) -> None:
    shapes = expected_shapes(spec)
    assert shapes["model.layers.2.mlp.gate.weight"] == (16, 256)
    assert shapes["model.layers.2.mlp.experts.routed_experts.w13_weight"] == (16, 2 * 96, 256)
    assert shapes["model.layers.2.mlp.experts.routed_experts.w2_weight"] == (16, 256, 96)
    assert layer_names(2)["gate_up"] not in shapes and layer_names(2)["down"] not in shapes


def test_checkpoint_names_are_per_expert_and_round_trip(spec: ModelSpec, weights: dict[str, torch.Tensor]) -> None:
    hf = split_to_hf(spec, weights)
    w13, w2 = (weights[layer_names(1)[k]] for k in ("w13", "w2"))
    assert torch.equal(hf["model.layers.1.mlp.experts.5.gate_proj.weight"], w13[5, :96])
    assert torch.equal(hf["model.layers.1.mlp.experts.5.up_proj.weight"], w13[5, 96:])
    assert torch.equal(hf["model.layers.1.mlp.experts.5.down_proj.weight"], w2[5])
    merged = merge_hf_state_dict(spec, hf)
    assert merged.keys() == weights.keys()
    assert all(torch.equal(merged[k], weights[k]) for k in weights)


def test_transformers_loads_the_saved_checkpoint_as_check_builds_it(spec: ModelSpec, weights: dict[str, torch.Tensor],
                                                                   tmp_path: Path) -> None:
    """transformers' own checkpoint conversion of the per-expert names gives the model ``check``
    builds from the fused weights."""
    import json

    import transformers

    save_checkpoint(spec, weights, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY_QWEN3_MOE))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    built = hf_model(spec, weights).state_dict()
    state = loaded.state_dict()
    assert state.keys() == built.keys()
    assert all(torch.equal(state[k], built[k]) for k in state if "rotary" not in k)


# the plan against transformers ----------------------------------------------------------------


@pytest.mark.parametrize("prompts", [[5], [5, 17, 33, 3]], ids=["b1", "b4"])
def test_plan_matches_transformers(spec: ModelSpec, weights: dict[str, torch.Tensor], prompts: list[int]) -> None:
    result = check_model(spec, weights, prompts, 3, exact=True, num_workers=7)
    summary = (f"rel_error {result.rel_error:.2e}, {result.mismatches} greedy mismatches; tokens {result.tokens} "
               f"vs transformers {result.reference_tokens}")
    assert result.passed and result.rel_error <= EXACT_BOUND, summary


def test_bf16_mode_matches_within_its_tolerance(spec: ModelSpec) -> None:
    result = check_model(spec, random_weights(spec, seed=12), [17, 3], 2, num_workers=7)
    assert result.passed, f"rel_error {result.rel_error:.2e}, {result.mismatches} greedy mismatches"
    assert result.rel_error > 1e-4, "bf16 mode should round like the GPU does, not run in float32"


def decode(spec: ModelSpec, weights: dict[str, torch.Tensor], sequences: list[list[int]], order: str
           ) -> tuple[list[torch.Tensor], ReferenceExecutor]:
    page, max_len = 16, max(map(len, sequences))
    blocks = contiguous_block_tables(len(sequences), max_len, page)
    caches = allocate_kv_caches(spec, int(blocks.numel()), page, dtype=torch.float32)
    model = build_decoder(spec, weights, caches, DecodeOptions(max_batch=len(sequences), max_seq_len=max_len,
                                                               page_size=page, num_workers=5))
    executor = ReferenceExecutor(model.plan, plan_inputs(model.kernel), exact=True)
    return run_teacher_forced(model, executor, sequences, blocks, order), executor


def test_tokens_share_experts_and_every_order_decodes_the_same(spec: ModelSpec,
                                                               weights: dict[str, torch.Tensor]) -> None:
    gen = torch.Generator().manual_seed(13)
    sequences = [torch.randint(0, spec.vocab_size, (n,), generator=gen).tolist() for n in (18, 3, 33, 7)]
    want, executor = decode(spec, weights, sequences, "schedule")
    ids = executor.tensors["layers.0.expert_ids"]  # the last step's routing: every request but the 3-token one
    assert len(set(ids[[0, 2, 3]].flatten().tolist())) < 3 * spec.num_experts_per_tok, "no expert shared"
    for order in ("random", "layers"):
        for got, ref in zip(decode(spec, weights, sequences, order)[0], want):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_renormalising_the_routing_weights_matters(spec: ModelSpec, weights: dict[str, torch.Tensor]) -> None:
    """Without ``norm_topk_prob`` the logits move, so the check above tells the two apart."""
    unnormalised = ModelSpec.from_hf_config({**TINY_QWEN3_MOE, "norm_topk_prob": False})
    sequences = [[1, 2, 3, 4, 5]]
    a, b = (decode(s, weights, sequences, "schedule")[0][0] for s in (spec, unnormalised))
    assert not torch.allclose(a, b, rtol=1e-3, atol=1e-3)


def test_each_moe_layer_waits_on_one_event_for_its_producer() -> None:
    """Shipped Qwen3-30B-A3B, two layers, batch 8: the router waits for o_proj, each routing
    tile for the router's tiles, the expert gate/up tiles for routing alone (it implies the
    rest), and the down tiles for every gate/up slot (their writes are shared)."""
    spec = ModelSpec.from_hf_config(load_config("qwen3-30b-a3b")).with_layers(2)
    caches = allocate_kv_caches(spec, 8 * 32, 16, device="meta")
    plan = build_decoder(spec, meta_weights(spec), caches, DecodeOptions(max_batch=8, max_seq_len=512)).plan
    tasks_of = {op.name: [t for t in plan.tasks if t.op is op] for op in plan.ops}
    chain = ["layers.1.o_proj", "layers.1.router", "layers.1.moe_topk", "layers.1.experts.gate_up",
             "layers.1.experts.down"]
    for producer, consumer in zip(chain, chain[1:]):
        for task in tasks_of[consumer]:
            assert len(task.wait_events) == 1, (consumer, task.wait_events)
            assert set(plan.events[task.wait_events[0]].producers) == {t.id for t in tasks_of[producer]}, consumer
    gate_up = tasks_of["layers.1.experts.gate_up"]
    assert len(gate_up) == 132 // 64 * 64 and {t.params["slot"] for t in gate_up} == set(range(64))  # 8 x top 8


def test_cli_plans_the_shipped_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "qwen3-30b-a3b", "--layers", "2", "--max-batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "Qwen3MoeForCausalLM, 2 of 48 layers" in out
    for kind in ("moe_topk", "rmsnorm_moe_gate_up", "moe_down"):
        assert f"\n{kind} " in out


# the GPU ------------------------------------------------------------------------------------------


def moe_plan_source(config: dict, batch: int, layers: int) -> tuple:
    """(plan, jit spec) of ``layers`` layers of a MoE config on shape-only tensors."""
    spec = ModelSpec.from_hf_config(config).with_layers(layers)
    caches = allocate_kv_caches(spec, 8 * batch, 16, device="meta")
    options = DecodeOptions(max_batch=batch, max_seq_len=128, num_workers=132)
    model = build_decoder(spec, meta_weights(spec), caches, options)
    bound = {**model.kernel.attached, **{name: torch.empty(h.shape, dtype=h.dtype, device="meta")
                                         for name, h in model.plan.tensors.items() if name not in model.kernel.attached}}
    return model.plan, kernel_spec(model.plan, bound)[0]


def test_qwen3_30b_a3b_moe_megakernel_compiles_for_sm90a(tmp_path: Path) -> None:
    """The MoE task bodies as the shipped config instantiates them (128 experts, top 8, batch 8):
    nvcc builds them. tests/gpu/test_moe_gpu.py runs them against transformers."""
    try:
        find_nvcc()
    except ToolchainError as err:
        pytest.skip(f"cannot prove the generated CUDA compiles: {err}")
    _, jit = moe_plan_source(load_config("qwen3-30b-a3b"), 8, 1)
    source = jit.sources["megakernel.cu"]
    for call in ("mpk::moe_topk_task<float, 128, 8, 256>", "mpk::moe_gate_up_task<2048, 8, 8, 128, 256>",
                 "mpk::moe_down_task<768, 8, 8, 128, 256>"):
        assert call in source
    assert compile_only(jit, tmp_path).is_file()


@pytest.mark.parametrize("hidden,inter,batch,message", [
    (320, 256, 2, "rmsnorm_moe_gate_up layer 'gate_up': hidden size 320 is not a multiple of 256"),
    (256, 96, 2, "moe_down layer 'down': expert width 96 is not a multiple of 256"),
    (256, 256, 33, "rmsnorm_moe_gate_up layer 'gate_up': batch 33 exceeds the 32 tokens an expert tile sums"),
])
def test_shapes_the_moe_task_bodies_do_not_take_are_refused(hidden: int, inter: int, batch: int,
                                                            message: str) -> None:
    mpk = PersistentKernel(num_workers=4, max_batch=batch, max_seq_len=32)

    def attach(shape: tuple[int, ...], name: str, dtype: torch.dtype = torch.bfloat16):
        return mpk.attach_input(torch.empty(shape, dtype=dtype, device="meta"), name)

    x, ids = attach((batch, hidden), "x"), attach((batch, 2), "ids", torch.int32)
    act, out = mpk.new_tensor((batch, 2, inter), torch.bfloat16, "act"), mpk.new_tensor((batch, hidden), torch.bfloat16, "out")
    mpk.rmsnorm_moe_gate_up_layer(x, attach((hidden,), "norm"), attach((4, 2 * inter, hidden), "w13"), ids, act,
                                  (1, 2), 256, name="gate_up")
    mpk.moe_down_layer(act, attach((4, hidden, inter), "w2"), ids, attach((batch, 2), "weights", torch.float32), x,
                       out, 1, 256, name="down")
    plan = mpk.compile()
    bound = {**mpk.attached, **{name: torch.empty(h.shape, dtype=h.dtype, device="meta")
                                for name, h in plan.tensors.items() if name not in mpk.attached}}
    with pytest.raises(UnsupportedOnGPU, match=message):
        kernel_spec(plan, bound)


def test_a_step_streams_only_the_experts_it_chose() -> None:
    """The step benchmark's byte count (``vllm_mpk.demo.weight_bytes``): a MoE step reads the
    chosen experts' gate/up and down rows, not all of them; a dense count is unchanged."""
    spec = ModelSpec.from_hf_config(TINY_QWEN3_MOE)
    weights = meta_weights(spec)
    per_expert = 2 * (2 * spec.moe_intermediate_size * spec.hidden_size + spec.hidden_size * spec.moe_intermediate_size)
    every = weight_bytes(spec, weights)
    chosen = 5 * spec.num_layers
    assert weight_bytes(spec, weights, chosen) == every - (spec.num_experts * spec.num_layers - chosen) * per_expert
    assert weight_bytes(spec, weights, 0) == every - spec.num_experts * spec.num_layers * per_expert
