"""Code generation for the GPU, on the CPU: the task table the megakernel reads, the C++ record
struct emitted to match it, the headers it includes, and (with nvcc, no GPU needed) a compile of
the whole Qwen3-8B decode plan for sm_90a, so a codegen or csrc/ break fails CI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO, load_config
from vllm_mpk.api import PersistentKernel
from vllm_mpk.codegen import source
from vllm_mpk.codegen.jit import JitSpec, compile_only
from vllm_mpk.codegen.ops import EMITTERS, FAMILIES, ArgLayout
from vllm_mpk.codegen.ops.linear import LINEAR_MODES
from vllm_mpk.codegen.tables import (
    HEADER_WORDS,
    PREFETCH_CAP_BYTES,
    PrefetchPolicy,
    RecordLayout,
    Variants,
    all_args,
    plan_variants,
    record_layout,
    tensor_ids,
)
from vllm_mpk.codegen.tasks import UnsupportedOnGPU
from vllm_mpk.codegen.toolchain import ToolchainError, find_nvcc, nvcc_version
from vllm_mpk.graph.ir import Role
from vllm_mpk.graph.ops import REGISTRY
from vllm_mpk.graph.plan import Plan
from vllm_mpk.models import DecodeOptions, ModelSpec, build_decoder
from vllm_mpk.models.kv_cache import allocate_kv_caches
from vllm_mpk.models.weights import expected_shapes
from vllm_mpk.runtime.megakernel import kernel_spec, kernel_table

# Word offsets inside a record (tables.py's layout); waits/signals/args start where the header ends.
OPCODE, VARIANT, TASK, PF_TENSOR, PF_OFFSET16, PF_LEN16 = range(HEADER_WORDS)


@dataclass
class Generated:
    plan: Plan
    tensors: dict[str, torch.Tensor]
    spec: JitSpec
    table: np.ndarray
    layout: RecordLayout
    variants: Variants

    def waits(self, row: np.ndarray) -> np.ndarray:
        return row[HEADER_WORDS:HEADER_WORDS + self.layout.max_waits]

    def signals(self, row: np.ndarray) -> np.ndarray:
        s0 = HEADER_WORDS + self.layout.max_waits
        return row[s0:s0 + self.layout.max_signals]

    def args(self, row: np.ndarray) -> np.ndarray:
        return row[HEADER_WORDS + self.layout.max_waits + self.layout.max_signals:]

    def records(self):
        """(worker, position in queue, task, record row) for every queued task."""
        for worker, queue in enumerate(self.plan.queues):
            for i, tid in enumerate(queue):
                yield worker, i, self.plan.tasks[tid], self.table[worker, i]


def meta_bound(plan: Plan, attached: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The attached tensors, plus shape-only tensors for the step inputs and the intermediates
    (what ``Megakernel`` allocates on the GPU; codegen reads only shapes and strides)."""
    return {**attached, **{name: torch.empty(h.shape, dtype=h.dtype, device="meta")
                           for name, h in plan.tensors.items() if name not in attached}}


def generated(plan: Plan, tensors: dict[str, torch.Tensor]) -> Generated:
    spec, table = kernel_spec(plan, tensors)
    threads = plan.ops[0].block_dim[0]
    layout = record_layout(plan, all_args(plan, tensors))
    return Generated(plan, tensors, spec, table, layout, plan_variants(plan, threads))


@pytest.fixture(scope="module")
def qwen3_8b() -> Generated:
    """All 36 layers of Qwen3-8B at max batch 8, weights and KV caches on the meta device."""
    spec = ModelSpec.from_hf_config(load_config("qwen3-8b"))
    options = DecodeOptions(max_batch=8)
    weights = {n: torch.empty(s, dtype=torch.bfloat16, device="meta") for n, s in expected_shapes(spec).items()}
    num_blocks = options.max_batch * -(-options.max_seq_len // options.page_size)
    caches = allocate_kv_caches(spec, num_blocks, options.page_size, device="meta")
    model = build_decoder(spec, weights, caches, options)
    assert len(model.plan.ops) == 5 * spec.num_layers + 3  # embed, 36 x 5 fused layers, lm_head, argmax
    return generated(model.plan, meta_bound(model.plan, model.kernel.attached))


# --- the task table -------------------------------------------------------------------------------


def test_table_shape_and_record_width(qwen3_8b: Generated) -> None:
    g = qwen3_8b
    plan, layout = g.plan, g.layout
    assert g.table.dtype == np.int32
    assert g.table.shape == (plan.num_workers, max(len(q) for q in plan.queues), layout.words)
    assert layout.words == HEADER_WORDS + layout.max_waits + layout.max_signals + layout.num_args
    assert layout.max_waits == max(1, max(len(t.wait_events) for t in plan.tasks))
    assert layout.max_signals == max(1, max(len(t.signal_events) for t in plan.tasks))
    assert layout.num_args == max(len(a) for a in all_args(plan, g.tensors))


def test_every_task_queued_once_with_padding_after(qwen3_8b: Generated) -> None:
    g = qwen3_8b
    ids = g.table[..., TASK]
    queued = ids[ids >= 0]
    assert sorted(queued.tolist()) == list(range(len(g.plan.tasks)))
    for worker, queue in enumerate(g.plan.queues):
        assert ids[worker, :len(queue)].tolist() == queue
        assert (g.table[worker, len(queue):] == -1).all(), f"worker {worker}: padding after its queue is not -1"


def test_record_header_names_op_and_variant(qwen3_8b: Generated) -> None:
    g = qwen3_8b
    for worker, i, task, row in g.records():
        assert row[OPCODE] == REGISTRY[task.op.kind].opcode, (worker, i, task)
        assert row[VARIANT] == g.variants.of_op[task.op.index], (worker, i, task)
        assert row[TASK] == task.id


def test_record_waits_and_signals_are_the_plans_events(qwen3_8b: Generated) -> None:
    g = qwen3_8b
    assert any(len(t.wait_events) for t in g.plan.tasks) and any(len(t.signal_events) for t in g.plan.tasks)
    for worker, i, task, row in g.records():
        waits, signals = g.waits(row), g.signals(row)
        assert tuple(waits[waits >= 0]) == task.wait_events, (worker, i, task)
        assert tuple(signals[signals >= 0]) == task.signal_events, (worker, i, task)
        assert (waits[len(task.wait_events):] == -1).all() and (signals[len(task.signal_events):] == -1).all()


def test_linear_argument_words_match_task_params(qwen3_8b: Generated) -> None:
    g = qwen3_8b
    ids = tensor_ids(g.plan)
    seen = 0
    for _, _, task, row in g.records():
        if task.op.kind not in LINEAR_MODES:
            continue
        seen += 1
        args = dict(zip(EMITTERS["linear"].args.words, g.args(row).tolist(), strict=False))
        assert (args["col_start"], args["col_end"]) == (task.params["col_start"], task.params["col_end"]), task
        assert args["weight"] == ids[task.op.inputs["weight"].name], task
        assert args["input"] == ids[task.op.inputs["input"].name], task
        assert args["output"] == ids[task.op.outputs["output"].name], task
        assert args["out_stride"] == task.op.outputs["output"].shape[1], task
    assert seen > 0


def test_linear_prefetch_covers_exactly_its_weight_rows(qwen3_8b: Generated) -> None:
    g = qwen3_8b
    ids = tensor_ids(g.plan)
    capped = 0
    for _, _, task, row in g.records():
        if task.op.kind not in LINEAR_MODES:
            assert tuple(row[[PF_TENSOR, PF_OFFSET16, PF_LEN16]]) == (-1, 0, 0), task
            continue
        w = task.op.inputs["weight"]
        k, c0, c1 = w.shape[1], task.params["col_start"], task.params["col_end"]
        rows_bytes = (c1 - c0) * k * w.dtype.itemsize
        assert row[PF_TENSOR] == ids[w.name], task
        assert row[PF_OFFSET16] * 16 == c0 * k * 2, task
        assert row[PF_LEN16] * 16 == min(rows_bytes, PREFETCH_CAP_BYTES), task
        capped += rows_bytes > PREFETCH_CAP_BYTES
    assert capped > 0  # the cap is exercised: Qwen3-8B's tiles are wider than it


def test_prefetch_policy_sets_the_cap_of_the_same_table(qwen3_8b: Generated) -> None:
    """Another cap changes only the prefetch lengths: the kernel built for the default policy runs it."""
    g = qwen3_8b
    table = kernel_table(g.plan, g.tensors, PrefetchPolicy(cap_bytes=32 * 1024, ahead=2))
    assert table.shape == g.table.shape
    lens, default_lens = table[..., PF_LEN16], g.table[..., PF_LEN16]
    assert (lens <= 2048).all() and (lens == np.minimum(default_lens, 2048)).all() and (lens == 2048).any()
    other = np.ones(table.shape[-1], dtype=bool)
    other[PF_LEN16] = False
    assert (table[..., other] == g.table[..., other]).all()
    assert not (kernel_table(g.plan, g.tensors, PrefetchPolicy(cap_bytes=0))[..., PF_LEN16] > 0).any()
    with pytest.raises(ValueError, match="non-negative multiples of 16"):
        PrefetchPolicy(cap_bytes=100)
    with pytest.raises(ValueError, match="non-negative multiples of 16"):
        PrefetchPolicy(kind_caps=(("rmsnorm_linear", 8),))
    with pytest.raises(ValueError, match="only linear tiles prefetch; \\['attention'\\]"):
        PrefetchPolicy(kind_caps=(("attention", 0),))
    with pytest.raises(ValueError, match="more than one cap"):
        PrefetchPolicy(kind_caps=(("linear", 0), ("linear", 1024)))
    assert PrefetchPolicy(kind_caps=(("rmsnorm_linear", 0), ("linear", 16))) == \
        PrefetchPolicy(kind_caps=(("linear", 16), ("rmsnorm_linear", 0)))


def test_a_kind_cap_changes_only_that_kinds_tiles(qwen3_8b: Generated) -> None:
    g = qwen3_8b
    policy = PrefetchPolicy(kind_caps=(("rmsnorm_linear_silu_mul", 0), ("rmsnorm_linear", 1024)))
    table = kernel_table(g.plan, g.tensors, policy)
    kinds = {"rmsnorm_linear_silu_mul": 0, "rmsnorm_linear": 0}
    for worker, i, task, row in g.records():
        length = table[worker, i, PF_LEN16]
        if task.op.kind == "rmsnorm_linear_silu_mul":
            assert length == 0, task
        elif task.op.kind == "rmsnorm_linear":
            assert length == min(row[PF_LEN16], 1024 // 16), task
        else:
            assert length == row[PF_LEN16], task
        kinds[task.op.kind] = kinds.get(task.op.kind, 0) + 1
    assert kinds["rmsnorm_linear_silu_mul"] > 0 and kinds["rmsnorm_linear"] > 0
    with pytest.raises(ValueError, match="ahead non-negative"):
        PrefetchPolicy(ahead=-1)


# --- the generated source -------------------------------------------------------------------------


def test_record_struct_matches_layout(qwen3_8b: Generated) -> None:
    g = qwen3_8b
    text = g.spec.sources["megakernel.cu"]
    sizes = re.findall(r"static_assert\(sizeof\(Record\) == (\d+) \* 4", text)
    assert sizes == [str(g.layout.words)]
    assert re.search(rf"kMaxWaits = {g.layout.max_waits};", text)
    assert re.search(rf"kMaxSignals = {g.layout.max_signals};", text)
    assert re.search(rf"int32_t args\[{g.layout.num_args}\];", text)
    assert f"int mpk_record_words() {{ return {g.layout.words}; }}" in text
    cases = re.findall(r"case (\d+): (if \(c\.inputs_ready\(\)\) )?(.+?)\(c\); break;", text)
    # Bodies that open their own input gate (to load weights first) run at once; the others after it.
    assert cases == [(str(i), "" if t.opens_gate else "if (c.inputs_ready()) ", t.call)
                     for i, t in enumerate(g.variants.tasks)]
    assert {t.call.split("<")[0] for t in g.variants.tasks if t.opens_gate} == {"mpk::linear_task", "mpk::attention_task"}


def test_generated_includes_resolve_in_csrc(qwen3_8b: Generated) -> None:
    assert qwen3_8b.spec.include_dirs == [source.csrc_dir().resolve()]
    for fname in ("megakernel.cu", "binding.cu"):
        for header in re.findall(r'#include "([^"]+)"', qwen3_8b.spec.sources[fname]):
            assert (source.csrc_dir() / header).is_file(), f"{fname} includes {header}, missing from csrc/"


# --- argument words: named once in codegen/ops/<op>.py, declared in C++ by the generated source ------


def test_argument_enums_are_generated_before_the_task_bodies(qwen3_8b: Generated) -> None:
    text = qwen3_8b.spec.sources["megakernel.cu"]
    for family in FAMILIES:
        struct = family.args.struct
        declared = re.findall(rf"struct {struct} {{\n  enum {{ ([^}}]*) }};\n}};", text)
        assert declared == [", ".join(ArgLayout.cpp_name(w) for w in family.args.words)], struct
        assert text.index(f"struct {struct} ") < text.index(f'#include "{family.header}"'), struct


def test_task_bodies_read_only_generated_argument_words() -> None:
    """No header declares an ``*Args`` enum of its own, and every ``XArgs::kWord`` a body reads is
    a word of X's Python layout (a name the generated enum does not have would not compile)."""
    words = {f.args.struct: {ArgLayout.cpp_name(w) for w in f.args.words} for f in FAMILIES}
    read: dict[str, set[str]] = {}
    for header in sorted((source.csrc_dir() / "tasks").glob("*.cuh")):
        text = header.read_text()
        assert not re.search(r"(struct|enum)\s+\w*Args\b", text), f"{header.name} declares an argument enum"
        for struct, name in re.findall(r"\b(\w+Args)::(k\w+)", text):
            read.setdefault(struct, set()).add(name)
    assert set(read) == set(words)
    for struct, names in read.items():
        assert names <= words[struct], (struct, sorted(names - words[struct]))
    for family in FAMILIES:
        assert f"{family.args.struct}::" in (source.csrc_dir() / family.header).read_text(), family.header


def test_argument_enums_compile_to_the_python_order(tmp_path: Path) -> None:
    try:
        nvcc = find_nvcc()
    except ToolchainError as err:
        pytest.skip(f"cannot compile the argument enums: {err}")
    enums = source.task_headers().split("#include")[0]
    checks = [f"static_assert(mpk::{f.args.struct}::{ArgLayout.cpp_name(w)} == {i}, \"{f.args.struct}.{w}\");"
              for f in FAMILIES for i, w in enumerate(f.args.words)]
    unit = tmp_path / "args.cu"
    unit.write_text(enums + "\n".join(checks) + "\n")
    out = subprocess.run([str(nvcc), "-std=c++17", "-c", str(unit), "-o", str(tmp_path / "args.o")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_arg_layout_packs_a_prefix_in_order() -> None:
    layout = ArgLayout("ExampleArgs", ("input", "col_start", "col_end", "world"))
    assert layout.pack({"col_start": 5, "input": 2, "col_end": 9}) == [2, 5, 9]
    assert layout.cpp() == "struct ExampleArgs {\n  enum { kInput, kColStart, kColEnd, kWorld };\n};"
    with pytest.raises(ValueError, match=r"ExampleArgs: got words \['input', 'world'\], expected the first 2"):
        layout.pack({"input": 2, "world": 4})
    with pytest.raises(ValueError, match="named twice"):
        ArgLayout("ExampleArgs", ("input", "input"))


def test_every_gpu_op_kind_has_one_emitter() -> None:
    served = [kind for family in FAMILIES for kind in family.kinds]
    assert len(served) == len(set(served)) and set(served) == set(EMITTERS)
    assert set(EMITTERS) == set(REGISTRY) - {"silu_mul"}  # silu_mul runs fused into a linear layer on the GPU


def test_qwen3_8b_megakernel_compiles_for_sm90a(qwen3_8b: Generated, tmp_path: Path) -> None:
    """The one slow test (tens of seconds to a few minutes): nvcc builds the full 36-layer plan."""
    try:
        nvcc = find_nvcc()
    except ToolchainError as err:
        pytest.skip(f"cannot prove the generated CUDA compiles: {err}")
    assert qwen3_8b.spec.arch == "sm_90a"
    start = time.perf_counter()
    so = compile_only(qwen3_8b.spec, tmp_path)
    seconds = time.perf_counter() - start
    assert so == tmp_path / f"{qwen3_8b.spec.name}.so" and so.is_file() and so.stat().st_size > 0
    print(f"\nnvcc ({nvcc_version(nvcc)}) compiled {qwen3_8b.spec.name} in {seconds:.1f} s")


def test_vllm_plan_with_its_own_logits_compiles_for_sm90a(tmp_path: Path) -> None:
    """The ending plans take under vLLM with logits_in_kernel: the final norm's hidden state and,
    beside it, the lm_head's logits in bf16 (integration/kernel_logits.py)."""
    try:
        find_nvcc()
    except ToolchainError as err:
        pytest.skip(f"cannot prove the generated CUDA compiles: {err}")
    spec = ModelSpec.from_hf_config(load_config("qwen3-0.6b")).with_layers(1)
    options = DecodeOptions(max_batch=4, max_seq_len=256, final="logits")
    weights = {n: torch.empty(s, dtype=torch.bfloat16, device="meta") for n, s in expected_shapes(spec).items()}
    caches = allocate_kv_caches(spec, 4 * 256 // options.page_size, options.page_size, device="meta")
    model = build_decoder(spec, weights, caches, options)
    assert model.tokens is None and model.hidden is not None
    assert model.plan.tensors[model.logits.name].dtype == torch.bfloat16
    g = generated(model.plan, meta_bound(model.plan, model.kernel.attached))
    lm_head = g.variants.tasks[g.variants.of_op[next(o.index for o in model.plan.ops if o.name == "lm_head")]]
    assert "kNorm" in lm_head.call and lm_head.call.endswith("__nv_bfloat16>")
    assert compile_only(g.spec, tmp_path).is_file()


# --- multi-step plans ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multi_step() -> Generated:
    """Two layers of Qwen3-0.6B with begin_step first (one launch decodes many steps) and split KV
    (two attention tasks per KV head and request), on meta tensors."""
    spec = ModelSpec.from_hf_config(load_config("qwen3-0.6b")).with_layers(2)
    options = DecodeOptions(max_batch=4, max_seq_len=256, multi_step=True, kv_splits=2)
    weights = {n: torch.empty(s, dtype=torch.bfloat16, device="meta") for n, s in expected_shapes(spec).items()}
    caches = allocate_kv_caches(spec, 4 * 256 // options.page_size, options.page_size, device="meta")
    model = build_decoder(spec, weights, caches, options)
    return generated(model.plan, meta_bound(model.plan, model.kernel.attached))


def test_attention_stages_history_before_its_gate_only_where_the_host_writes_the_step_inputs(
        qwen3_8b: Generated, multi_step: Generated) -> None:
    """The last template argument of attention_task (EARLY_STAGE): true in a single-step plan, whose
    block tables and sequence lengths the host wrote before the launch; false in a multi-step plan."""
    def early_flags(g: Generated) -> set[str]:
        return set(re.findall(r"mpk::attention_task<[^>]*, (true|false)>", g.spec.sources["megakernel.cu"]))

    assert early_flags(qwen3_8b) == {"true"}
    assert early_flags(multi_step) == {"false"}


def test_begin_step_waits_for_the_previous_steps_argmax(multi_step: Generated) -> None:
    """begin_step's record holds its carried wait as -(event + 2), for the event the argmax's final
    tile signals; every other record's waits are this step's (non-negative)."""
    g = multi_step
    (carried,) = [e for e in g.plan.events if e.lag]
    for _, _, task, row in g.records():
        waits = g.waits(row)
        if task.op.kind == "begin_step":
            assert waits.tolist()[:2] == [-(carried.id + 2), -1] and not task.wait_events
            assert row[OPCODE] == REGISTRY["begin_step"].opcode
        else:
            assert tuple(waits[waits >= 0]) == task.wait_events and (waits[len(task.wait_events):] == -1).all()
    assert {g.plan.tasks[t].op.kind for t in carried.producers} == {"argmax"}
    assert all(carried.id in g.plan.tasks[t].signal_events for t in carried.producers)


def test_split_attention_words_name_output_partials_and_arrivals(multi_step: Generated) -> None:
    """Every split tile has the output (the last of a request's splits to finish writes it), its
    split, the partials and the arrival counts."""
    g = multi_step
    ids = tensor_ids(g.plan)
    splits = set()
    for _, _, task, row in g.records():
        if task.op.kind != "attention":
            continue
        args = dict(zip(EMITTERS["attention"].args.words, g.args(row).tolist(), strict=False))
        outputs = task.op.outputs
        assert [args[n] for n in ("output", "partial", "arrivals")] == [ids[outputs[n].name] for n in
                                                                        ("output", "partial", "arrivals")], task
        assert (args["head"], args["split"]) == (task.params["kv_head"], task.params["split"]), task
        splits.add(args["split"])
    assert splits == {0, 1}


def test_begin_step_needs_contiguous_state_rows() -> None:
    tokens = torch.empty(4, 512, dtype=torch.int64, device="meta")[:, ::2]  # every other position
    mpk = PersistentKernel(num_workers=4, meta_tensors={"step": torch.empty(4, dtype=torch.int64, device="meta"),
                                                         "tokens": tokens})
    embed = mpk.attach_input(torch.empty(1024, 256, dtype=torch.bfloat16, device="meta"), "embed")
    x, out = mpk.new_tensor((4, 256), torch.bfloat16, "x"), mpk.new_tensor((4,), torch.int64, "next")
    mpk.begin_step_layer(out, 256)
    mpk.embed_layer(None, embed, x, grid_dim=4, block_dim=256)
    mpk.argmax_layer(x, out, grid_dim=4, block_dim=256)
    plan = mpk.compile()
    with pytest.raises(UnsupportedOnGPU, match=r"begin_step layer 'begin_step': \['tokens'\] must be contiguous"):
        kernel_spec(plan, meta_bound(plan, mpk.attached))


def test_multi_step_megakernel_compiles_for_sm90a(multi_step: Generated, tmp_path: Path) -> None:
    try:
        find_nvcc()
    except ToolchainError as err:
        pytest.skip(f"cannot prove the generated CUDA compiles: {err}")
    assert "mpk::begin_step_task<256>" in multi_step.spec.sources["megakernel.cu"]
    # split KV, and no KV staging before the gate: begin_step writes the step inputs in the kernel
    assert re.search(r"mpk::attention_task<[^>]*, 2, false>", multi_step.spec.sources["megakernel.cu"])
    assert compile_only(multi_step.spec, tmp_path).is_file()


# --- what the GPU cannot run ----------------------------------------------------------------------


def linear_plan(k: int, weight_dtype: torch.dtype, name: str = "layers.3.mlp.down_proj", batch: int = 8) -> Plan:
    """One linear layer [batch, k] x [64, k]^T on shape-only tensors."""
    mpk = PersistentKernel(num_workers=4, max_batch=batch, max_seq_len=32)
    x = mpk.attach_input(torch.empty(batch, k, dtype=torch.bfloat16, device="meta"), "x")
    w = mpk.attach_input(torch.empty(64, k, dtype=weight_dtype, device="meta"), f"{name}.weight")
    y = mpk.new_tensor((batch, 64), torch.bfloat16, "y")
    mpk.linear_layer(x, w, y, grid_dim=4, block_dim=256, name=name)
    return mpk.compile()


def test_supported_linear_generates() -> None:
    """The control for the two cases below: bf16 and a reduction dim of 512 are fine."""
    plan = linear_plan(512, torch.bfloat16)
    g = generated(plan, meta_bound(plan, {}))
    assert "mpk::linear_task<mpk::LinearMode::kPlain, 512, 8, 16, 256, __nv_bfloat16>" in g.spec.sources["megakernel.cu"]


@pytest.mark.parametrize(("k", "dtype", "batch", "message"), [
    (512, torch.float16, 8, r"linear layer 'layers\.3\.mlp\.down_proj': weight 'layers\.3\.mlp\.down_proj\.weight' "
                            r"is torch\.float16; the GPU kernels take torch\.bfloat16"),
    (320, torch.bfloat16, 8, r"linear layer 'layers\.3\.mlp\.down_proj': reduction dim 320 is not a multiple of 256"),
    (512, torch.bfloat16, 33, r"linear layer 'layers\.3\.mlp\.down_proj': batch 33 exceeds the 32 rows .*lower max_batch"),
], ids=["fp16-weight", "k-not-multiple-of-256", "batch-above-32"])
def test_unsupported_linear_names_the_layer(k: int, dtype: torch.dtype, batch: int, message: str) -> None:
    plan = linear_plan(k, dtype, batch=batch)
    with pytest.raises(UnsupportedOnGPU, match=message):
        kernel_spec(plan, meta_bound(plan, {}))


# --- where the CUDA sources are found -------------------------------------------------------------


def test_csrc_found_in_checkout_and_in_installed_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert source.csrc_dir() == REPO / "csrc" and source.CSRC == REPO / "csrc"
    packaged = tmp_path / "site-packages" / "vllm_mpk" / "_csrc"
    shutil.copytree(REPO / "csrc", packaged)
    monkeypatch.setattr(source, "CSRC_CANDIDATES", (tmp_path / "site-packages" / "csrc", packaged))
    assert source.csrc_dir.__wrapped__() == packaged
    monkeypatch.setattr(source, "CSRC_CANDIDATES", (tmp_path / "nowhere", tmp_path / "nor_here"))
    with pytest.raises(FileNotFoundError, match=r"runtime/launcher\.cuh.*nowhere.*nor_here.*Reinstall"):
        source.csrc_dir.__wrapped__()


def test_wheel_build_puts_csrc_in_the_package(tmp_path: Path) -> None:
    """setup.py's build_py copies csrc/ to vllm_mpk/_csrc/ (what a wheel holds), on a copy of the
    project so the checkout gets no build folders."""
    pytest.importorskip("setuptools")
    project = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "_csrc")
    project.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy2(REPO / name, project / name)
    for folder in ("csrc", "vllm_mpk"):
        shutil.copytree(REPO / folder, project / folder, ignore=ignore)
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")],
                         cwd=project, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    want = sorted(p.relative_to(REPO / "csrc").as_posix() for p in (REPO / "csrc").rglob("*") if p.is_file())
    got = sorted(p.relative_to(tmp_path / "lib" / "vllm_mpk" / "_csrc").as_posix()
                 for p in (tmp_path / "lib" / "vllm_mpk" / "_csrc").rglob("*") if p.is_file())
    assert got == want and any(name.endswith(".cuh") for name in got)
    assert (tmp_path / "lib" / "vllm_mpk" / "codegen" / "source.py").is_file()


def test_parallel_prebuild_compiles_what_megakernel_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """build_kernels describes intermediates with meta tensors; the source it compiles must be the
    one Megakernel generates from the allocated buffers, or every load would compile again."""
    from vllm_mpk.runtime import megakernel

    plan = linear_plan(512, torch.bfloat16)
    given = {n: torch.zeros(h.shape, dtype=h.dtype) for n, h in plan.tensors.items() if h.role is Role.INPUT}
    built: list[str] = []
    monkeypatch.setattr(JitSpec, "build", lambda spec: built.append(spec.content_hash()))
    megakernel.build_kernels([(plan, given), (plan, given)])
    loaded = kernel_spec(plan, megakernel.bind_tensors(plan, given, torch.device("cpu")))[0].content_hash()
    assert built == [loaded, loaded]
