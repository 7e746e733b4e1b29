"""Bad input to the public API fails early with a ValueError that names the tensor and says what
was expected and what was given; model configs the megakernel cannot run raise
UnsupportedModelError listing what it supports."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import TINY_LLAMA, load_config
from vllm_mpk.api import PersistentKernel
from vllm_mpk.graph.reference import ReferenceExecutor
from vllm_mpk.models import ModelSpec, UnsupportedModelError
from vllm_mpk.models.spec import ModelConfigError
from vllm_mpk.runtime.watchdog import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S, MIN_TIMEOUT_S, TIMEOUT_RANGE

BLOCK = (128, 1, 1)
BATCH = 2


def setup() -> SimpleNamespace:
    """A kernel with a few tensors that fit together: x [2, 32] -> linear w [48, 32] -> y [2, 48],
    a QKV row for 4 query and 2 KV heads of 64, and its cache and RoPE table."""
    mpk = PersistentKernel(num_workers=4, max_batch=BATCH, max_seq_len=32, page_size=16)
    at, new = mpk.attach_input, mpk.new_tensor
    return SimpleNamespace(
        mpk=mpk, x=at(torch.randn(BATCH, 32), "x"), w=at(torch.randn(48, 32), "w"),
        y=new((BATCH, 48), torch.float32, "y"), norm=at(torch.ones(32), "norm"),
        qkv=at(torch.randn(BATCH, 8 * 64), "qkv"), attn=new((BATCH, 4 * 64), torch.float32, "attn"),
        cache=at(torch.zeros(4, 2, 16, 128), "cache"), rope=at(torch.zeros(32, 64), "rope"),
        ids_f=at(torch.zeros(BATCH), "ids_f"), xi=at(torch.zeros(BATCH, 32, dtype=torch.int32), "xi"),
    )


def attention(s: SimpleNamespace, **kw) -> None:
    args = dict(input=s.qkv, kv_cache=s.cache, cos_sin_cache=s.rope, output=s.attn, grid_dim=2, block_dim=BLOCK,
                num_q_heads=4, num_kv_heads=2, head_dim=64)
    s.mpk.attention_layer(**{**args, **kw})


def other_kernel_tensor(s: SimpleNamespace):
    other = PersistentKernel(num_workers=4, max_batch=BATCH, max_seq_len=32)
    return other.attach_input(torch.randn(48, 32), "w")


def at(s: SimpleNamespace, shape: tuple[int, ...], name: str):
    return s.mpk.attach_input(torch.zeros(shape), name)


def new(s: SimpleNamespace, shape: tuple[int, ...], name: str, dtype: torch.dtype = torch.float32):
    return s.mpk.new_tensor(shape, dtype, name)


# (id, what to do with a fresh setup(), the message it must raise)
LAYER_ERRORS: list[tuple[str, Callable[[SimpleNamespace], object], str]] = [
    ("attach-not-a-tensor", lambda s: s.mpk.attach_input([1.0, 2.0], "v"),
     r"attach_input\('v'\) needs a torch.Tensor, got list"),
    ("attach-duplicate", lambda s: at(s, (3,), "w"), "a tensor named 'w' already exists"),
    ("attach-step-input-name", lambda s: at(s, (2,), "positions"), "a tensor named 'positions' already exists"),
    ("new-duplicate", lambda s: new(s, (2, 8), "y"), "a tensor named 'y' already exists"),
    ("new-empty-name", lambda s: new(s, (2, 8), ""), "non-empty strings, got ''"),
    ("new-io-category", lambda s: s.mpk.new_tensor((2, 8), torch.float32, "z", io_category="host_tensor"),
     r"tensor 'z': io_category 'host_tensor' is not one of \['cuda_tensor', 'nvshmem_tensor'\]"),
    ("new-dtype", lambda s: s.mpk.new_tensor((2, 8), "bfloat16", "z"),
     "tensor 'z': dtype must be a torch.dtype, got 'bfloat16'"),
    ("new-dims", lambda s: new(s, (2, 0), "z"), r"tensor 'z' has dims \(2, 0\); expected positive ints"),
    ("linear-weight-shape", lambda s: s.mpk.linear_layer(s.x, at(s, (48, 31), "w31"), s.y, 1, BLOCK),
     r"linear_layer 'linear_0': weight 'w31' has shape \(48, 31\), expected \(48, 32\)"),
    ("linear-output-shape", lambda s: s.mpk.linear_layer(s.x, s.w, new(s, (2, 40), "y40"), 1, BLOCK),
     r"linear_layer 'linear_0': output 'y40' has shape \(2, 40\), expected \(2, 48\)"),
    ("linear-bias-shape", lambda s: s.mpk.linear_layer(s.x, s.w, s.y, 1, BLOCK, bias=s.norm),
     r"bias 'norm' has shape \(32,\), expected \(48,\)"),
    ("linear-input-dtype", lambda s: s.mpk.linear_layer(s.xi, s.w, s.y, 1, BLOCK),
     "input 'xi' has dtype int32, expected one of bfloat16, float16, float32"),
    ("linear-required-weight", lambda s: s.mpk.linear_layer(s.x, None, s.y, 1, BLOCK),
     "linear_layer 'linear_0': weight is required"),
    ("linear-other-kernel", lambda s: s.mpk.linear_layer(s.x, other_kernel_tensor(s), s.y, 1, BLOCK),
     r"weight must be a tensor of this kernel .* got w\[48x32:float32\]"),
    ("linear-output-attached", lambda s: s.mpk.linear_layer(s.x, s.w, at(s, (2, 48), "o"), 1, BLOCK),
     "output 'o' is an attached input; outputs must come from new_tensor"),
    ("linear-grid-too-large", lambda s: s.mpk.linear_layer(s.x, s.w, s.y, 4, BLOCK),
     r"grid_dim \(4, 1, 1\) makes 4 tasks; this layer takes 1 to 3 \(48 output columns in blocks of 16\)"),
    ("linear-grid-3d-too-large", lambda s: s.mpk.linear_layer(s.x, s.w, s.y, (2, 2, 1), BLOCK),
     r"makes 4 tasks; this layer takes 1 to 3"),
    ("linear-grid-zero", lambda s: s.mpk.linear_layer(s.x, s.w, s.y, (2, 0), BLOCK),
     r"grid_dim must be a positive int or a tuple of 1 to 3 positive ints, got \(2, 0\)"),
    ("linear-block-dim", lambda s: s.mpk.linear_layer(s.x, s.w, s.y, 1, (64, 1, 1)),
     r"block_dim \(64, 1, 1\) is not supported; the runtime runs \(\(128, 1, 1\), \(256, 1, 1\)\)"),
    ("linear-block-dim-4d", lambda s: s.mpk.linear_layer(s.x, s.w, s.y, 1, (128, 1, 1, 1)),
     r"block_dim must be .* got \(128, 1, 1, 1\)"),
    ("residual-shape", lambda s: s.mpk.linear_with_residual_layer(s.x, s.w, s.x, s.y, 1, BLOCK),
     r"residual 'x' has shape \(2, 32\), expected \(2, 48\)"),
    ("rmsnorm-linear-norm-shape", lambda s: s.mpk.rmsnorm_linear_layer(s.x, at(s, (48,), "n48"), s.w, s.y, 1, BLOCK),
     r"norm weight 'n48' has shape \(48,\), expected \(32,\)"),
    ("swiglu-odd-weight", lambda s: s.mpk.rmsnorm_linear_silu_mul_layer(s.x, s.norm, at(s, (47, 32), "w47"),
                                                                       new(s, (2, 23), "a"), 1, BLOCK),
     r"weight 'w47' has 47 rows; expected an even \[gate \| up\] height"),
    ("swiglu-output-shape", lambda s: s.mpk.rmsnorm_linear_silu_mul_layer(s.x, s.norm, s.w, s.y, 1, BLOCK),
     r"output 'y' has shape \(2, 48\), expected \(2, 24\)"),
    ("swiglu-grid", lambda s: s.mpk.rmsnorm_linear_silu_mul_layer(s.x, s.norm, s.w, new(s, (2, 24), "a"), 4, BLOCK),
     r"makes 4 tasks; this layer takes 1 to 3 \(24 output columns in blocks of 8\)"),
    ("rmsnorm-eps-nan", lambda s: s.mpk.rmsnorm_layer(s.x, s.norm, new(s, (2, 32), "h"), 1, BLOCK, eps=float("nan")),
     "rmsnorm_layer 'rmsnorm_0': eps must be a positive finite number, got nan"),
    ("rmsnorm-linear-eps-negative", lambda s: s.mpk.rmsnorm_linear_layer(s.x, s.norm, s.w, s.y, 1, BLOCK, eps=-1e-6),
     "rmsnorm_linear_layer 'rmsnorm_linear_0': eps must be a positive finite number, got -1e-06"),
    ("swiglu-eps-zero", lambda s: s.mpk.rmsnorm_linear_silu_mul_layer(s.x, s.norm, s.w, new(s, (2, 24), "a"), 1, BLOCK,
                                                                     eps=0.0),
     "eps must be a positive finite number, got 0.0"),
    ("attention-qk-norm-eps-inf", lambda s: attention(s, q_norm=at(s, (64,), "qn"), k_norm=at(s, (64,), "kn"),
                                                      eps=float("inf")),
     "eps must be a positive finite number, got inf"),
    ("attention-scale-string", lambda s: attention(s, scale="0.125"),
     "scale must be a positive finite number, got '0.125'"),
    ("rmsnorm-weight-shape", lambda s: s.mpk.rmsnorm_layer(s.x, at(s, (31,), "n31"), new(s, (2, 32), "h"), 1, BLOCK),
     r"rmsnorm_layer 'rmsnorm_0': weight 'n31' has shape \(31,\), expected \(32,\)"),
    ("rmsnorm-residual-alone",
     lambda s: s.mpk.rmsnorm_layer(s.x, s.norm, new(s, (2, 32), "h"), 1, BLOCK, residual=s.x),
     "residual and residual_output must be given together"),
    ("rmsnorm-grid-beyond-rows", lambda s: s.mpk.rmsnorm_layer(s.x, s.norm, new(s, (2, 32), "h"), 3, BLOCK),
     r"makes 3 tasks; this layer takes 1 to 2 \(2 rows\)"),
    ("embed-ids-dtype", lambda s: s.mpk.embed_layer(s.ids_f, s.w, new(s, (2, 32), "e"), 1, BLOCK),
     "input 'ids_f' has dtype float32, expected one of int32, int64"),
    ("embed-output-shape", lambda s: s.mpk.embed_layer(None, s.w, s.y, 1, BLOCK),
     r"output 'y' has shape \(2, 48\), expected \(2, 32\)"),
    ("attention-input-width", lambda s: attention(s, input=at(s, (2, 500), "qkv500")),
     r"input 'qkv500' has shape \(2, 500\), expected \(2, 512\)"),
    ("attention-output-width", lambda s: attention(s, output=s.y),
     r"output 'y' has shape \(2, 48\), expected \(2, 256\)"),
    ("attention-block-size", lambda s: attention(s, kv_cache=at(s, (4, 2, 32, 128), "c32")),
     "kv_cache 'c32' has block size 32, expected the kernel's page_size 16"),
    ("attention-cache-heads", lambda s: attention(s, kv_cache=at(s, (4, 1, 16, 128), "c1")),
     r"kv_cache 'c1' has shape \(4, 1, 16, 128\), expected \(4, 2, 16, 128\)"),
    ("attention-cache-not-attached", lambda s: attention(s, kv_cache=new(s, (4, 2, 16, 128), "cn")),
     "kv_cache 'cn' must be attached with attach_input"),
    ("attention-head-dim-96", lambda s: attention(s, head_dim=96),
     r"head_dim 96 is not supported; supported: \(64, 128\)"),
    ("attention-groups", lambda s: attention(s, num_q_heads=3),
     "3 query heads do not split into groups over 2 KV heads"),
    ("attention-rope-dim", lambda s: attention(s, cos_sin_cache=at(s, (32, 32), "rope32")),
     "cos_sin_cache 'rope32' has rotary dim 32, expected 64"),
    ("attention-q-norm-alone", lambda s: attention(s, q_norm=at(s, (64,), "qn")),
     "q_norm and k_norm must be given together"),
    ("attention-grid", lambda s: attention(s, grid_dim=3), r"grid_dim \(3, 1, 1\) makes 3 tasks; expected 2 KV heads"),
    ("attention-grid-too-many-chunks", lambda s: attention(s, grid_dim=6),
     r"makes 6 tasks; expected 2 KV heads times .* between 1 and 2"),
    ("attention-split-output-width", lambda s: attention(s, output=s.y, kv_splits=2),
     r"output 'y' has shape \(2, 48\), expected \(2, 256\)"),
    ("attention-split-grid", lambda s: attention(s, grid_dim=3, kv_splits=2),
     r"makes 6 tasks; expected 2 KV heads times 2 KV splits times a number of request chunks"),
    ("silu-odd-width", lambda s: s.mpk.silu_mul_layer(at(s, (2, 33), "gu33"), s.y, 1, BLOCK),
     "input 'gu33' has 33 columns; expected an even"),
    ("silu-output-shape", lambda s: s.mpk.silu_mul_layer(s.x, s.y, 1, BLOCK),
     r"output 'y' has shape \(2, 48\), expected \(2, 16\)"),
    ("silu-linear-input-width", lambda s: s.mpk.silu_mul_linear_with_residual_layer(s.x, s.w, s.y, s.y, 1, BLOCK),
     r"input 'x' has shape \(2, 32\), expected \(2, 64\)"),
    ("allreduce-output-shape", lambda s: s.mpk.allreduce_layer(s.x, s.y, 1, BLOCK),
     r"output 'y' has shape \(2, 48\), expected \(2, 32\)"),
    ("argmax-output-dtype", lambda s: s.mpk.argmax_layer(s.y, new(s, (2,), "tok"), 1, BLOCK),
     "output 'tok' has dtype float32, expected one of int64"),
    ("argmax-grid", lambda s: s.mpk.argmax_layer(s.y, new(s, (2,), "tok", torch.int64), 7, BLOCK),
     r"makes 7 tasks; this layer takes 1 to 6 \(48 logits in blocks of 8\)"),
]


@pytest.mark.parametrize("action,message", [pytest.param(a, m, id=i) for i, a, m in LAYER_ERRORS])
def test_bad_input_raises_value_error(action: Callable, message: str):
    s = setup()
    ops_before = len(s.mpk.ops)
    with pytest.raises(ValueError, match=message):
        action(s)
    assert len(s.mpk.ops) == ops_before, "a rejected layer must not be added"


def test_allreduce_across_ranks_needs_symmetric_input():
    mpk = PersistentKernel(world_size=2, num_workers=4, max_batch=BATCH, max_seq_len=32)
    x = mpk.new_tensor((BATCH, 32), torch.float32, "partial")
    with pytest.raises(ValueError, match="input 'partial' must be an nvshmem_tensor when world_size > 1"):
        mpk.allreduce_layer(x, mpk.new_tensor((BATCH, 32), torch.float32, "sum"), 1, BLOCK)


@pytest.mark.parametrize("kwargs,message", [
    (dict(meta_tensors={"step": torch.zeros(4), "tokens": torch.zeros(5, 16)}),
     r"meta tensor 'tokens' has shape \(5, 16\), expected \(4, max_seq_len\)"),
    (dict(meta_tensors={"step": torch.zeros(4), "tokens": torch.zeros(4, 16)}, max_batch=8),
     r"max_batch=8 disagrees with meta tensor 'step' of shape \(4,\) \(dim 0 is 4\)"),
    (dict(meta_tensors={"step": torch.zeros(4), "tokens": torch.zeros(4, 16)}, max_seq_len=32),
     r"max_seq_len=32 disagrees with meta tensor 'tokens' of shape \(4, 16\) \(dim 1 is 16\)"),
    (dict(meta_tensors={"step": torch.zeros(4, 1), "tokens": torch.zeros(4, 16)}),
     r"meta tensor 'step' must be \[batch\], got shape \(4, 1\)"),
    (dict(meta_tensors={"step": torch.zeros(4), "tokens": torch.zeros(4)}),
     r"meta tensor 'tokens' must be \[batch, max_seq_len\], got \(4,\)"),
    (dict(meta_tensors={"steps": torch.zeros(4)}, max_batch=4, max_seq_len=8),
     r"unknown meta tensors \['steps'\]; expected 'step' and 'tokens'"),
    (dict(max_seq_len=16), "give max_batch or the meta tensor 'step' it is read from"),
    (dict(max_batch=4), "give max_seq_len or the meta tensor 'tokens' it is read from"),
    (dict(max_batch=0, max_seq_len=16), "max_batch must be positive, got 0"),
    (dict(max_batch=4, max_seq_len=16, page_size=12), "page_size must be a power of two, got 12"),
    (dict(max_batch=4, max_seq_len=16, num_workers=0), "num_workers must be at least 1, got 0"),
    (dict(max_batch=4, max_seq_len=16, world_size=2, mpi_rank=2), r"mpi_rank 2 must be in \[0, world_size=2\)"),
    (dict(max_batch=4, max_seq_len=16, num_remote_schedulers=1), "num_remote_schedulers > 0 needs world_size > 1"),
    (dict(max_batch=4, max_seq_len=16, num_local_schedulers=-1), "scheduler counts must be non-negative"),
])
def test_bad_kernel_arguments_raise(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        PersistentKernel(**kwargs)


def test_meta_tensors_set_batch_and_length():
    mpk = PersistentKernel(meta_tensors=[torch.zeros(4), torch.zeros(4, 24)], page_size=16)
    assert (mpk.max_batch, mpk.max_seq_len, mpk.max_blocks_per_seq) == (4, 24, 2)
    assert mpk.block_tables.shape == (4, 2)


def test_compile_with_no_layers_raises():
    with pytest.raises(ValueError, match="nothing to compile: add layers first"):
        setup().mpk.compile()


def test_compile_with_mixed_block_dims_raises():
    s = setup()
    s.mpk.linear_layer(s.x, s.w, s.y, 1, (128, 1, 1))
    s.mpk.silu_mul_layer(s.y, s.mpk.new_tensor((BATCH, 24), torch.float32, "act"), 1, (256, 1, 1))
    with pytest.raises(ValueError, match=r"all layers must share one block_dim .* \[\(128, 1, 1\), \(256, 1, 1\)\]"):
        s.mpk.compile()


def test_compile_with_unknown_policy_raises():
    mpk = PersistentKernel(num_workers=4, max_batch=BATCH, max_seq_len=32, schedule="fastest")
    mpk.linear_layer(mpk.attach_input(torch.randn(BATCH, 32), "x"), mpk.attach_input(torch.randn(16, 32), "w"),
                     mpk.new_tensor((BATCH, 16), torch.float32, "y"), 1, BLOCK)
    with pytest.raises(ValueError, match=r"unknown schedule policy 'fastest'; choose one of \['earliest_finish', "
                                         r"'round_robin'\]"):
        mpk.compile()


def test_reference_executor_rejects_missing_inputs_and_unknown_order():
    mpk = PersistentKernel(num_workers=4, max_batch=BATCH, max_seq_len=32)
    mpk.linear_layer(mpk.attach_input(torch.randn(BATCH, 32), "x"), mpk.attach_input(torch.randn(16, 32), "w"),
                     mpk.new_tensor((BATCH, 16), torch.float32, "y"), 1, BLOCK)
    plan = mpk.compile()
    with pytest.raises(ValueError, match=r"no tensor given for plan inputs \[.*'w'.*\]"):
        ReferenceExecutor(plan, {"x": torch.zeros(BATCH, 32)})
    inputs = {n: torch.zeros(h.shape, dtype=h.dtype) for n, h in mpk.tensors.items() if n != "y"}
    with pytest.raises(ValueError, match=r"unknown order 'backwards'; choose one of \('schedule', 'random', "):
        ReferenceExecutor(plan, inputs).run_step(BATCH, order="backwards")


# unsupported models -------------------------------------------------------------------------------

SUPPORTED_LIST = (r"supported: architectures Qwen3ForCausalLM, LlamaForCausalLM, Qwen3MoeForCausalLM; SiLU MLP, "
                  r"dense, or mixture of experts for Qwen3MoeForCausalLM with every layer sparse \(decoder_sparse_step "
                  r"1, no mlp_only_layers\), softmax top-k routing and no shared experts \(opt-in under vLLM\); full "
                  r"attention \(no sliding window\); head_dim in \(64, 128\); RoPE types \('default', 'llama3'\); "
                  r"no biases")


def qwen3(**changes) -> dict:
    config = copy.deepcopy(load_config("qwen3-0.6b"))
    config.update(changes)
    return config


def llama(**changes) -> dict:
    return {**copy.deepcopy(TINY_LLAMA), **changes}


@pytest.mark.parametrize("config,reason", [
    (qwen3(num_experts=8, num_experts_per_tok=2), "mixture-of-experts layers on Qwen3ForCausalLM are not supported"),
    (llama(num_local_experts=8), "mixture-of-experts layers on LlamaForCausalLM are not supported"),
    (qwen3(n_routed_experts=64), "mixture-of-experts layers on Qwen3ForCausalLM are not supported"),
    (qwen3(use_sliding_window=True, sliding_window=4096), "sliding-window attention is not supported"),
    (llama(sliding_window=4096), "sliding-window attention is not supported"),
    (qwen3(architectures=["MistralForCausalLM"]), r"architecture \['MistralForCausalLM'\] is not supported"),
    (qwen3(architectures=[]), "architecture missing is not supported"),
    (qwen3(head_dim=96), "head_dim 96 is not supported"),
    (llama(head_dim=None, hidden_size=576), "head_dim 96 is not supported"),
    (llama(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
     "RoPE scaling type 'yarn' is not supported"),
    (qwen3(rope_scaling={"type": "yarn", "factor": 4.0}), "RoPE scaling type 'yarn' is not supported"),
    (qwen3(rope_scaling=None, rope_parameters={"rope_type": "yarn", "factor": 4.0}),
     "RoPE scaling type 'yarn' is not supported"),
    (qwen3(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (qwen3(attention_bias=True), "attention or MLP biases are not supported"),
    (llama(mlp_bias=True), "attention or MLP biases are not supported"),
    (qwen3(num_key_value_heads=5), "16 attention heads do not group over 5 KV heads"),
    (llama(partial_rotary_factor=0.5), "partial rotary embeddings are not supported"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_unsupported_model_config_raises(config: dict, reason: str):
    with pytest.raises(UnsupportedModelError, match=reason) as info:
        ModelSpec.from_hf_config(config)
    assert isinstance(info.value, ValueError)
    assert info.value.reason in str(info.value)
    assert re.search(SUPPORTED_LIST, str(info.value)), str(info.value)


def test_supported_variants_are_accepted():
    spec = ModelSpec.from_hf_config(llama())
    assert (spec.head_dim, spec.num_kv_heads, spec.rope_scaling["rope_type"]) == (64, 2, "llama3")
    assert ModelSpec.from_hf_config(qwen3(use_sliding_window=False, sliding_window=4096)).qk_norm
    assert ModelSpec.from_hf_config(llama(head_dim=None, hidden_size=384)).head_dim == 64


def test_model_dir_without_config_and_zero_layers_raise(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        ModelSpec.from_dir(tmp_path)
    with pytest.raises(ValueError, match="--layers must be at least 1, got 0"):
        ModelSpec.from_hf_config(llama()).with_layers(0)


def test_rejected_layer_leaves_the_kernel_usable():
    """A layer that raises adds nothing: fixing the call and compiling works. (The argmax layer
    declares its partial-result tensors itself; a rejected one must not leave them behind.)"""
    s = setup()
    with pytest.raises(ValueError, match="output 'bad' has dtype float32"):
        s.mpk.argmax_layer(s.y, new(s, (2,), "bad"), 1, BLOCK)
    with pytest.raises(ValueError, match="block_dim"):
        s.mpk.argmax_layer(s.y, new(s, (2,), "tok", torch.int64), 1, (64, 1, 1))
    mpk = PersistentKernel(num_workers=4, max_batch=BATCH, max_seq_len=32)
    logits = mpk.attach_input(torch.randn(BATCH, 48), "logits")
    tok = mpk.new_tensor((BATCH,), torch.int64, "tok")
    with pytest.raises(ValueError, match="grid_dim"):
        mpk.argmax_layer(logits, tok, 100, BLOCK)
    mpk.argmax_layer(logits, tok, 3, BLOCK)
    plan = mpk.compile()
    assert len(plan.tasks) == 4
    assert not any(name.startswith("argmax_0.") and h not in (plan.ops[0].outputs.values())
                   for name, h in mpk.tensors.items())
    s = setup()  # split-KV attention declares its partials and arrival counts
    before = set(s.mpk.tensors)
    with pytest.raises(ValueError, match="output 'y' has shape"):
        attention(s, output=s.y, kv_splits=2)
    assert set(s.mpk.tensors) == before
    attention(s, kv_splits=2)
    assert set(s.mpk.tensors) - before == {"attention_0.partial", "attention_0.arrivals"}


@pytest.mark.parametrize("config,message", [
    ([qwen3()], "a model config must be a JSON object of Hugging Face config keys, got list"),
    ({k: v for k, v in llama().items() if k != "vocab_size"}, "config has no 'vocab_size'; it must hold a positive"),
    (llama(num_key_value_heads=0), "config key 'num_key_value_heads' must be a positive integer, got 0"),
    (llama(num_attention_heads=-6), "config key 'num_attention_heads' must be a positive integer, got -6"),
    (llama(head_dim=0), "config key 'head_dim' must be a positive integer, got 0"),
    (llama(intermediate_size=1.5), "config key 'intermediate_size' must be a positive integer, got 1.5"),
    (llama(hidden_size="384"), "config key 'hidden_size' must be a positive integer, got '384'"),
    (llama(rms_norm_eps=0), "config key 'rms_norm_eps' must be a positive number, got 0"),
    (llama(max_position_embeddings=0), "config key 'max_position_embeddings' must be a positive integer"),
    (llama(rope_scaling="llama3"), "config key 'rope_scaling' must be an object or null, got 'llama3'"),
    (llama(rope_scaling={"rope_type": "llama3"}), "llama3 rope_scaling needs 'factor' as a positive number "
                                                  r"\(it is missing\); it needs factor, low_freq_factor"),
    (llama(rope_scaling={**TINY_LLAMA["rope_scaling"], "original_max_position_embeddings": None}),
     "needs 'original_max_position_embeddings' as a positive number"),
    (llama(rope_scaling={**TINY_LLAMA["rope_scaling"], "low_freq_factor": 4.0}),
     r"'low_freq_factor' \(4.0\) must be below 'high_freq_factor' \(4.0\)"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_malformed_model_config_names_the_key(config, message: str):
    with pytest.raises(ModelConfigError, match=message):
        ModelSpec.from_hf_config(config)


# tensors the kernel reads, its watchdog, and what adding layers does ---------------------------------

def test_strided_weights_are_refused_and_strided_kv_caches_taken():
    """A linear task streams its weight rows densely: a transposed view would be read wrong."""
    s = setup()
    transposed = s.mpk.attach_input(torch.randn(32, 48).t(), "w_t")
    with pytest.raises(ValueError, match=r"linear_layer 'linear_0': weight 'w_t' is not contiguous \(strides "
                                         r"\(1, 48\) for shape \(48, 32\)\); .* attach tensor.contiguous\(\)"):
        s.mpk.linear_layer(s.x, transposed, s.y, 1, BLOCK)
    assert not s.mpk.ops
    every_other = s.mpk.attach_input(torch.randn(2, 64)[:, ::2], "x_strided")
    with pytest.raises(ValueError, match="input 'x_strided' is not contiguous"):
        s.mpk.linear_layer(every_other, s.w, s.y, 1, BLOCK)
    # vLLM's cache is a permuted view ([blocks, heads, page, 2*head_dim] over [blocks, page, heads, ...]);
    # the attention task reads it through its strides.
    paged = s.mpk.attach_input(torch.zeros(4, 16, 2, 128).permute(0, 2, 1, 3), "paged")
    attention(s, kv_cache=paged)
    assert len(s.mpk.ops) == 1


def test_inputs_on_another_device_are_refused():
    s = setup()
    with pytest.raises(ValueError, match=r"attach_input\('w_meta'\): the tensor is on meta, the kernel's other "
                                         r"inputs on cpu; move it there"):
        s.mpk.attach_input(torch.empty(48, 32, device="meta"), "w_meta")
    assert "w_meta" not in s.mpk.tensors


@pytest.mark.parametrize("timeout_s", [0, 1e-12, MIN_TIMEOUT_S / 2, -1.0, 1e12, float("nan"), float("inf"), True, "2"])
def test_timeout_outside_its_range_is_refused(timeout_s):
    """1e-12 s is positive but 0 ns on the GPU's timer: every wait would time out at once."""
    with pytest.raises(ValueError, match=rf"timeout_s must be {re.escape(TIMEOUT_RANGE)}, got "):
        PersistentKernel(max_batch=1, max_seq_len=16, timeout_s=timeout_s)


def test_timeout_range_ends_are_taken():
    assert PersistentKernel(max_batch=1, max_seq_len=16, timeout_s=MAX_TIMEOUT_S).timeout_s == MAX_TIMEOUT_S
    assert PersistentKernel(max_batch=1, max_seq_len=16, timeout_s=MIN_TIMEOUT_S).timeout_s == MIN_TIMEOUT_S
    assert PersistentKernel(max_batch=1, max_seq_len=16).timeout_s == DEFAULT_TIMEOUT_S


def test_layers_added_after_a_run_rebuild_the_executor():
    """The executor ran the old graph; the next run compiles and runs the one with the new layer."""
    mpk = PersistentKernel(num_workers=4, max_batch=BATCH, max_seq_len=32)
    x = mpk.attach_input(torch.randn(BATCH, 32), "x")
    y = mpk.new_tensor((BATCH, 16), torch.float32, "y")
    mpk.linear_layer(x, mpk.attach_input(torch.randn(16, 32), "w"), y, 1, BLOCK)
    mpk()
    first = mpk.executor()
    act = mpk.new_tensor((BATCH, 8), torch.float32, "act")
    mpk.silu_mul_layer(y, act, 1, BLOCK)
    mpk()
    rebuilt = mpk.executor()
    assert rebuilt is not first and [op.kind for op in rebuilt.plan.ops] == ["linear", "silu_mul"]
    gate, up = rebuilt.tensors["y"].float().split(8, dim=1)
    torch.testing.assert_close(rebuilt.tensors["act"], torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_batch=2.5, max_seq_len=16), "max_batch must be an int, got 2.5"),
    (dict(max_batch=2, max_seq_len="16"), "max_seq_len must be an int, got '16'"),
    (dict(max_batch=2, max_seq_len=16, page_size=16.0), "page_size must be an int, got 16.0"),
    (dict(max_batch=2, max_seq_len=16, num_workers=True), "num_workers must be an int, got True"),
])
def test_kernel_sizes_must_be_ints(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        PersistentKernel(**kwargs)
