"""The megakernel on a Hopper GPU: each task body against torch on fresh random inputs, whole decode
steps against ``transformers`` (teacher-forced, near-ties counted), determinism, CUDA-graph
capture, and the watchdog. Skipped where torch sees no CUDA device."""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.helpers import model_spec, seed_of
from tests.ops import all_op_tests
from tests.ops.harness import BF16, check_outputs
from vllm_mpk.check import check_model
from vllm_mpk.codegen.tables import PrefetchPolicy
from vllm_mpk.codegen.tasks import UnsupportedOnGPU
from vllm_mpk.demo import gpu_model
from vllm_mpk.graph.ir import Role
from vllm_mpk.graph.step_state import step_inputs
from vllm_mpk.models.weights import random_weights
from vllm_mpk.runtime import control
from vllm_mpk.runtime.control import MegakernelError
from vllm_mpk.runtime.megakernel import Megakernel, build_kernels

pytestmark = pytest.mark.gpu
OP_TESTS = all_op_tests()

GPU_TOLERANCE = {BF16: dict(rtol=2e-2, atol=2e-2), torch.float32: dict(rtol=2e-2, atol=2e-2),
                 torch.int64: dict(rtol=0, atol=0), torch.int32: dict(rtol=0, atol=0)}
# The CPU cases' reduction dims are small; the GPU's linear tiles need multiples of 256, so the
# linear kinds get cases of their own: one chunk, several, and a short last chunk (2304 at bs16).
LINEAR_GPU_CASES = [
    dict(id="gpu-b1-k256-n48", batch=1, k=256, n=48, grid=3, dtype=BF16),
    dict(id="gpu-b5-k1024-n100", batch=5, k=1024, n=100, grid=7, dtype=BF16),
    dict(id="gpu-b16-k2304-n200-n9", batch=16, k=2304, n=200, grid=13, dtype=BF16, num_tokens=9),
    dict(id="gpu-b8-k4096-n1000-f32-out", batch=8, k=4096, n=1000, grid=5, dtype=BF16, out_dtype=torch.float32),
]
LINEAR_KINDS = ("linear", "linear_with_residual", "rmsnorm_linear", "rmsnorm_linear_silu_mul", "silu_mul_linear",
                "silu_mul_linear_with_residual")
CASES = [pytest.param(t, c, id=f"{t.kind}-{c['id']}") for t in OP_TESTS for c in t.cases
         if t.kind not in LINEAR_KINDS]
CASES += [pytest.param(t, {k: v for k, v in c.items() if k != "out_dtype" or t.kind in ("linear", "rmsnorm_linear")},
                       id=f"{t.kind}-{c['id']}") for t in OP_TESTS if t.kind in LINEAR_KINDS for c in LINEAR_GPU_CASES]
# Qwen3-0.6B's gate/up projection as the decoder tiles it: 132 tiles of 16 or 24 output columns
# (32 or 48 weight rows: gate and up rows share a tensor-core group where a tile's width is 24).
CASES += [pytest.param(t, dict(id="gpu-b8-k1024-n3072-g132", batch=8, k=1024, n=3072, grid=132, dtype=BF16),
                       id=f"{t.kind}-gpu-b8-k1024-n3072-g132") for t in OP_TESTS if t.kind == "rmsnorm_linear_silu_mul"]


def on_gpu(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cuda() for k, v in inputs.items()}


def build_case(op_test, case):
    """A CPU test case in bf16 (where it has a dtype), with the GPU test's seed."""
    case = {**case, **({"dtype": BF16} if "dtype" in case else {})}
    return op_test.build(case, torch.Generator().manual_seed(seed_of(f"gpu-{op_test.kind}-{case['id']}")))


@pytest.fixture(scope="module")
def task_kernels(request: pytest.FixtureRequest) -> None:
    """Compile the kernels of every selected task-body case at once (nvcc runs as subprocesses), so
    each test loads its kernel from the build cache: one after another the builds took most of this
    file's ten minutes."""
    selected = [item.callspec.params for item in request.session.items
                if getattr(item, "originalname", None) == "test_task_body_matches_torch"]

    def build(params) -> None:
        built = build_case(params["op_test"], params["case"])
        if built.all_reduce is None:
            # Any failure (an unsupported shape, a build error, VLLM_MPK_NO_BUILD with a warm
            # cache) is the test's own to skip, report or get past: it builds again by itself.
            with contextlib.suppress(Exception):
                build_kernels([(built.mpk.compile(), built.inputs)])

    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(build, selected))


@pytest.mark.parametrize("op_test,case", CASES)
def test_task_body_matches_torch(op_test, case, task_kernels):
    """The same cases as the CPU tests, in bf16 where the case has a dtype, on the GPU."""
    built = build_case(op_test, case)
    plan = built.mpk.compile()
    if built.all_reduce is not None:
        pytest.skip("a multi-rank all-reduce runs one process per GPU: tests/gpu/test_tensor_parallel_gpu.py")
    try:
        mk = Megakernel(plan, on_gpu(built.inputs))
    except UnsupportedOnGPU as e:
        pytest.skip(f"not a GPU shape: {e}")
    for name, handle in plan.tensors.items():  # poison what the kernel should write (counters start at 0)
        if handle.role is not Role.INPUT and name not in plan.counters:
            mk.tensors[name].fill_(float("nan") if handle.dtype.is_floating_point else -1)
    mk.run_step(built.num_tokens)
    check_outputs(built, {k: v.cpu() for k, v in mk.tensors.items()}, GPU_TOLERANCE, "megakernel")
    if plan.counters:  # split KV: the counts are back at 0, and another step merges to the same bits
        assert not any(mk.tensors[name].any() for name in plan.counters)
        first = {name: mk.tensors[name][rows].clone() for name, (rows, _) in built.expected.items()}
        mk.run_step(built.num_tokens)
        assert all(torch.equal(mk.tensors[name][built.expected[name][0]], v) for name, v in first.items())


PROMPTS = {"bs1": [7], "bs4": [5, 17, 33, 3], "bs5": [9, 16, 31, 2, 40], "bs16": [3 + 5 * i for i in range(16)]}
DECODE_CASES = [("qwen3-0.6b", b) for b in PROMPTS] + [("llama-3.2-1b", "bs4"), ("llama-3.2-1b", "bs16"),
                                                       ("qwen3-8b", "bs4"), ("llama-3.1-8b", "bs5")]


@pytest.mark.parametrize("name,batch", DECODE_CASES, ids=[f"{n}-{b}" for n, b in DECODE_CASES])
def test_decode_matches_transformers(name, batch):
    """32 teacher-forced steps after ragged prompts crossing page boundaries: logits within bf16
    tolerance and the same greedy token wherever the reference's top-two margin is not a near-tie."""
    spec = model_spec(name, 2)
    result = check_model(spec, random_weights(spec, seed=seed_of(name)), PROMPTS[batch], 32, device="cuda")
    print(f"{name} {batch}: rel err {result.rel_error:.2e}, near-ties {result.near_ties}")
    assert result.rel_error <= result.tolerance
    assert result.mismatches == 0


@pytest.fixture(scope="module")
def small_step():
    """A two-layer Qwen3-0.6B decode step on the GPU with a KV history, built once."""
    spec = model_spec("qwen3-0.6b", 2)
    model, _, caches, blocks = gpu_model(spec, random_weights(spec, device="cuda"), 4, 64)
    for c in caches:
        c.normal_()
    step = torch.tensor([40, 17, 33, 2])
    tokens = torch.randint(0, spec.vocab_size, (4, 64))
    inputs = {k: v.cuda() for k, v in step_inputs(step, tokens, blocks, 16).as_dict().items()}
    return model, {**model.kernel.attached, **inputs}


def test_same_inputs_give_bit_identical_outputs(small_step):
    model, tensors = small_step
    mk = Megakernel(model.plan, tensors)
    mk.run_step(4)
    first = mk.tensors["logits"].clone()
    mk.tensors["logits"].fill_(float("nan"))
    mk.run_step(4)
    assert torch.equal(mk.tensors["logits"], first)


def test_launch_replays_from_a_cuda_graph(small_step):
    model, tensors = small_step
    mk = Megakernel(model.plan, tensors)
    mk.run_step(4)
    eager = mk.tensors["logits"].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mk.launch(4)
    for _ in range(3):
        mk.tensors["logits"].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        mk.check()
        assert torch.equal(mk.tensors["logits"], eager)


@pytest.mark.parametrize("cap_kib, ahead, kind_caps, landed", [
    (0, 0, (), False), (96, 2, (), False), (192, 3, (), False), (32, 1, (), False),
    (48, 1, (("rmsnorm_linear_silu_mul", 0),), False), (48, 1, (), True), (96, 2, (), True)])
def test_prefetch_policies_leave_the_outputs_bit_identical(small_step, cap_kib, ahead, kind_caps, landed):
    """An L2 prefetch is only a hint: any policy (none, further ahead, more bytes, a cap per op
    kind, asked when the task before has its weights) gives the same logits as the default, set on
    a loaded kernel without a rebuild."""
    model, tensors = small_step
    mk = Megakernel(model.plan, tensors)
    mk.run_step(4)
    default = mk.tensors["logits"].clone()
    mk.set_prefetch(PrefetchPolicy(cap_kib * 1024, ahead, kind_caps, landed))
    mk.tensors["logits"].fill_(float("nan"))
    mk.run_step(4)
    assert torch.equal(mk.tensors["logits"], default)


def test_unsatisfiable_event_trips_the_watchdog(small_step):
    """The stop also raises the kernel's error word in pinned host memory (``stopped``, what
    vLLM's per-step poll reads), without any synchronisation by the host; ``reset`` lowers it. The
    word is the second of a shared tensor, as vLLM's runtime gives its plans, so its address
    inside the pinned allocation is the one the kernel writes."""
    model, tensors = small_step
    shared = torch.zeros(3, dtype=torch.int32, pin_memory=True)
    mk = Megakernel(model.plan, tensors, timeout_s=0.2, error_flag=shared[1:2])
    mk.run_step(4)
    assert not mk.stopped
    event = model.plan.tasks[-1].wait_events[0]
    mk.triggers[event] += 1  # one signal more than its producers will ever send
    mk.launch(4)
    deadline = time.monotonic() + 30
    while not mk.stopped and time.monotonic() < deadline:  # host memory only: no CUDA call
        time.sleep(0.01)
    assert mk.stopped, "the watchdog stop did not reach the host-mapped error word"
    assert control.ERROR_NAMES[int(mk.error_flag[0])] == "timeout waiting on an event"
    assert shared[0] == 0 and shared[2] == 0
    with pytest.raises(MegakernelError, match="waited on event"):
        mk.check()
    mk.triggers[event] -= 1
    mk.reset()
    assert not mk.stopped
    mk.run_step(4)
    assert not mk.tensors["logits"][:4].isnan().any()


def test_reset_after_a_stop_between_attention_splits(small_step):
    """A watchdog stop can fall between the split tasks of one (request, KV head): its arrivals
    counter is then left part-way and the next step's first finisher would merge too early.
    The stop here stalls the second layer's attention; its counters are then set to what one
    finished split leaves. ``reset()`` zeroes them: the next step equals a fresh kernel's."""
    model, tensors = small_step
    assert model.plan.counters, "the fixture's plan must split its attention (batch 4 on 132+ SMs)"
    fresh = Megakernel(model.plan, tensors)
    fresh.run_step(4)
    want = fresh.tensors["logits"].clone()
    mk = Megakernel(model.plan, tensors, timeout_s=0.2)
    second = next(t for t in model.plan.tasks if t.op.name == "layers.1.attention")
    event = second.wait_events[0]
    mk.triggers[event] += 1
    with pytest.raises(MegakernelError, match="waited on event"):
        mk.run_step(4)
    mk.triggers[event] -= 1
    for name in model.plan.counters:
        mk.tensors[name].fill_(1)
    mk.reset()
    mk.tensors["logits"].fill_(float("nan"))
    mk.run_step(4)
    assert torch.equal(mk.tensors["logits"], want)


def test_counters_and_epoch_wrap_around(small_step):
    """After ~2^31 launches the epoch and the counters wrap; waits compare modulo 2^32, so a
    kernel started just before the wrap keeps producing the same logits across it."""
    model, tensors = small_step
    fresh = Megakernel(model.plan, tensors)
    fresh.run_step(4)
    want = fresh.tensors["logits"].clone()
    mk = Megakernel(model.plan, tensors)
    epoch = 2**31 - 1  # the next launch's epoch + 1 is 2^31: past the int32 range
    wrapped = (mk.triggers.long() * epoch + 2**31) % 2**32 - 2**31
    mk.counters.copy_(wrapped.int())
    mk.control[control.EPOCH] = epoch
    for _ in range(3):
        mk.tensors["logits"].fill_(float("nan"))
        mk.run_step(4)
        assert torch.equal(mk.tensors["logits"], want)


@pytest.mark.parametrize("eos", [False, True], ids=["to-max-new-tokens", "eos"])
def test_one_multi_step_launch_generates_what_single_steps_do(eos: bool):
    """A multi-step plan decodes ragged prompts and their new tokens in one launch (begin_step
    moves the state on inside the kernel) and gives the single-step plan's sequences exactly: the
    tiles are the same, only the launches differ. With EOS one request stops early."""
    spec = model_spec("qwen3-0.6b", 2)
    weights = random_weights(spec, seed=seed_of("multi-step"))
    prompts = [[7, 300, 12, 5], list(range(1000, 1037)), [42], [9] * 17]  # 37 crosses two pages
    single, *_ = gpu_model(spec, weights, 4, 80)
    multi, *_ = gpu_model(spec, weights, 4, 80, multi_step=True)
    free = single.kernel.generate(prompts, 24, tokens_output=single.tokens)
    stop = free[0][len(prompts[0]) + 2] if eos else None
    want = single.kernel.generate(prompts, 24, tokens_output=single.tokens, eos_token_id=stop) if eos else free
    got = multi.kernel.generate(prompts, 24, tokens_output=multi.tokens, eos_token_id=stop)
    assert got == want
    if eos:
        assert len(got[0]) <= len(prompts[0]) + 3 < len(free[0])  # stopped at (or before) its third new token
