"""Broken plans are caught: a missing event, a schedule that deadlocks, an intermediate written
twice or never (or both shared and by one task), a cycle. Where a check is bypassed, the reference
executor shows the damage."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TINY_LLAMA, plan_inputs, run_plan
from vllm_mpk.api import PersistentKernel
from vllm_mpk.graph.events import WriterIndex, wire_events
from vllm_mpk.graph.ir import Access, Op, Role, Task, TensorHandle
from vllm_mpk.graph.plan import Plan
from vllm_mpk.graph.reference import ReferenceExecutor
from vllm_mpk.graph.schedule import predecessors
from vllm_mpk.graph.step_state import contiguous_block_tables, step_inputs
from vllm_mpk.graph.validate import check_no_deadlock, validate
from vllm_mpk.models import DecodeModel, DecodeOptions, ModelSpec, build_decoder
from vllm_mpk.models.kv_cache import allocate_kv_caches
from vllm_mpk.models.weights import random_weights

BLOCK = (128, 1, 1)
BATCH, MAX_LEN, PAGE = 2, 40, 16


def tiny_model(workers: int = 8, kv_splits: int = 1) -> tuple[DecodeModel, dict[str, torch.Tensor]]:
    """A one-layer Llama decode step and inputs for it: two requests at positions 17 and 5, over a
    cache holding random history."""
    spec = ModelSpec.from_hf_config(TINY_LLAMA).with_layers(1)
    blocks = contiguous_block_tables(BATCH, MAX_LEN, PAGE)
    caches = allocate_kv_caches(spec, int(blocks.numel()), PAGE, dtype=torch.float32)
    caches[0].copy_(torch.randn(caches[0].shape, generator=torch.Generator().manual_seed(1)))
    options = DecodeOptions(max_batch=BATCH, max_seq_len=MAX_LEN, page_size=PAGE, num_workers=workers,
                            kv_splits=kv_splits)
    model = build_decoder(spec, random_weights(spec, dtype=torch.float32), caches, options)
    tokens = torch.randint(0, spec.vocab_size, (BATCH, MAX_LEN), generator=torch.Generator().manual_seed(2))
    step = step_inputs(torch.tensor([17, 5]), tokens, blocks, PAGE)
    return model, plan_inputs(model.kernel, step.as_dict())


def first_task(plan: Plan, kind: str) -> Task:
    return next(t for t in plan.tasks if t.op.kind == kind)


def drop_waits(plan: Plan, task: Task) -> None:
    """Make ``task`` wait on nothing, consistently on both sides of its events."""
    for e in task.wait_events:
        plan.events[e].consumers.remove(task.id)
    task.wait_events = ()


def validate_plan(plan: Plan) -> None:
    validate(plan.tensors, plan.tasks, plan.events, plan.queues)


@pytest.mark.parametrize("kind,tensor", [("attention", "layers.0.qkv"), ("linear_with_residual", "layers.0.attn"),
                                         ("argmax", "logits")])
def test_missing_event_is_caught(kind: str, tensor: str):
    model, _ = tiny_model()
    validate_plan(model.plan)
    drop_waits(model.plan, first_task(model.plan, kind))
    with pytest.raises(ValueError, match=rf"reads '{tensor}' .* no event orders the write before the read"):
        validate_plan(model.plan)


def test_readers_of_a_split_attention_output_wait_for_every_split():
    """With split KV whichever split tile of a request comes last writes its output (a shared
    write): o_proj waits for all of them, and without that wait validation fails."""
    model, _ = tiny_model(kv_splits=3)
    plan = model.plan
    validate_plan(plan)
    splits = {t.id for t in plan.tasks if t.op.kind == "attention"}
    assert len(splits) == 3 * BATCH * model.spec.num_kv_heads
    o_proj = first_task(plan, "linear_with_residual")
    assert {p for e in o_proj.wait_events for p in plan.events[e].producers} == splits
    drop_waits(plan, o_proj)
    with pytest.raises(ValueError, match=r"reads 'layers.0.attn' .* no event orders the write before the read"):
        validate_plan(plan)


def two_writers(first: Access, second: Access) -> tuple[dict[str, TensorHandle], list[Task]]:
    """Tasks 0 and 1 of one op write ``first`` and ``second`` of 'y' [4, 8]; task 2, of the next op,
    reads its rows 0-1."""
    ops = [Op(i, "test", f"op{i}", {}, {}, {}, (1, 1, 1), BLOCK) for i in range(2)]
    tasks = [Task(0, ops[0], 0, (), (first,), 0), Task(1, ops[0], 1, (), (second,), 0),
             Task(2, ops[1], 0, (Access("y", ((0, 2), (0, 8))),), (), 0)]
    return {"y": TensorHandle("y", (4, 8), torch.float32, Role.INTERMEDIATE)}, tasks


def rows_of_y(r0: int, r1: int, shared: bool = False) -> Access:
    return Access("y", ((r0, r1), (0, 8)), shared=shared)


def test_shared_writes_make_the_reader_wait_for_every_writer():
    tensors, tasks = two_writers(rows_of_y(0, 2, shared=True), rows_of_y(0, 4, shared=True))
    index = WriterIndex(tensors, tasks)
    assert index.writers(tasks[2], tasks[2].reads[0]) == {0, 1}
    assert index.writers(tasks[2], rows_of_y(2, 4)) == {1}  # only task 1 may write rows 2-3
    events = wire_events(tensors, tasks)
    assert [events[e].producers for e in tasks[2].wait_events] == [(0, 1)]
    validate(tensors, tasks, events, [[0, 1, 2]])


@pytest.mark.parametrize("first,second,how", [
    (rows_of_y(0, 2, shared=True), rows_of_y(1, 4), r"by task 1 \(op0\) and shared by task 0 \(op0\)"),
    (rows_of_y(0, 2), rows_of_y(1, 4, shared=True), r"shared by task 1 \(op0\) and task 0 alone"),
], ids=["shared-then-alone", "alone-then-shared"])
def test_a_box_written_shared_and_by_one_task_raises(first: Access, second: Access, how: str):
    with pytest.raises(ValueError, match=rf"tensor 'y' box .* is written {how}: every element needs exactly one "
                                         r"writer, or only shared writers"):
        WriterIndex(*two_writers(first, second))


def test_shared_writes_of_two_layers_to_one_box_raise():
    """Shared writers race only among the tiles of one layer (which the layer resolves); two layers
    writing one output tensor are still a double write."""
    tensors, tasks = two_writers(rows_of_y(0, 2, shared=True), rows_of_y(1, 4, shared=True))
    tasks[1] = Task(1, tasks[2].op, 1, (), tasks[1].writes, 0)
    with pytest.raises(ValueError, match=r"tensor 'y' box .* is written shared by task 1 \(op1\) and shared by "
                                         r"task 0 \(op0\)"):
        WriterIndex(tensors, tasks)


def test_missing_event_corrupts_the_result_in_random_order():
    """With the attention tile's wait removed, some event-respecting order runs it before the QKV
    tiles it reads: its output (and the logits) come out poisoned or wrong."""
    model, inputs = tiny_model()
    want = run_plan(model.plan, inputs, BATCH, "schedule")["logits"]
    for seed in range(3):  # the intact plan gives one answer in every order
        got = run_plan(model.plan, inputs, BATCH, "random", seed)["logits"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    drop_waits(model.plan, first_task(model.plan, "attention"))
    results = [run_plan(model.plan, inputs, BATCH, "random", seed)["logits"] for seed in range(5)]
    broken = [r for r in results if r.isnan().any() or not torch.allclose(r, want, rtol=1e-3, atol=1e-3)]
    assert broken, "no seed exposed the missing event"


def swap_dependent_pair(plan: Plan) -> tuple[int, int]:
    """On some worker, swap a task with a later task on the same worker that waits for it."""
    for queue in plan.queues:
        for j, consumer in enumerate(queue):
            before = predecessors(plan.tasks[consumer], plan.events)
            i = next((i for i in range(j) if queue[i] in before), None)
            if i is not None:
                queue[i], queue[j] = queue[j], queue[i]
                return queue[j], queue[i]
    raise AssertionError("no worker runs a producer and its consumer")


@pytest.mark.parametrize("workers", [1, 3, 8])
def test_swapped_dependent_tasks_deadlock(workers: int):
    model, inputs = tiny_model(workers)
    check_no_deadlock(model.plan.tasks, model.plan.events, model.plan.queues)
    producer, consumer = swap_dependent_pair(model.plan)
    with pytest.raises(ValueError, match="deadlocks after"):
        check_no_deadlock(model.plan.tasks, model.plan.events, model.plan.queues)
    with pytest.raises(ValueError, match="deadlocks after"):
        validate_plan(model.plan)
    with pytest.raises(RuntimeError, match="deadlocked"):
        ReferenceExecutor(model.plan, inputs).run_step(BATCH, order="schedule")


def test_task_missing_from_schedule_is_caught():
    model, _ = tiny_model(3)
    model.plan.queues[1].pop()
    with pytest.raises(ValueError, match="every task on exactly one worker"):
        validate_plan(model.plan)


def small_kernel() -> tuple[PersistentKernel, dict]:
    mpk = PersistentKernel(num_workers=4, max_batch=3, max_seq_len=16)
    x = mpk.attach_input(torch.randn(3, 32), "x")
    w = mpk.attach_input(torch.randn(48, 32), "w")
    return mpk, dict(x=x, w=w)


def test_double_written_intermediate_raises():
    mpk, t = small_kernel()
    y = mpk.new_tensor((3, 48), torch.float32, "y")
    mpk.linear_layer(t["x"], t["w"], y, 3, BLOCK, name="first")
    mpk.linear_layer(t["x"], t["w"], y, 1, BLOCK, name="second")
    with pytest.raises(ValueError, match=r"tensor 'y' .* written by task \d+ \(second\) and task \d+"):
        mpk.compile()


def test_one_layer_writing_one_tensor_twice_raises():
    mpk, t = small_kernel()
    out = mpk.new_tensor((3, 32), torch.float32, "out")
    mpk.rmsnorm_layer(t["x"], mpk.attach_input(torch.ones(32), "norm"), out, 1, BLOCK,
                      residual=t["x"], residual_output=out)
    with pytest.raises(ValueError, match="tensor 'out' .* every element needs exactly one writer"):
        mpk.compile()


def test_intermediate_never_written_raises():
    mpk, t = small_kernel()
    mpk.linear_layer(t["x"], t["w"], mpk.new_tensor((3, 48), torch.float32, "y"), 3, BLOCK)
    mpk.new_tensor((3, 8), torch.float32, "forgotten")
    with pytest.raises(ValueError, match="intermediate 'forgotten' is never written"):
        mpk.compile()


def test_read_of_unwritten_intermediate_raises():
    mpk, t = small_kernel()
    nowhere = mpk.new_tensor((3, 32), torch.float32, "nowhere")
    mpk.linear_layer(nowhere, t["w"], mpk.new_tensor((3, 48), torch.float32, "y"), 3, BLOCK)
    with pytest.raises(ValueError, match="intermediate 'nowhere' is never written"):
        mpk.compile()


def test_partly_unwritten_intermediate_is_caught():
    model, _ = tiny_model()
    embed = first_task(model.plan, "embed")
    embed.writes = ()
    with pytest.raises(ValueError, match=r"intermediate 'embed.out' has \d+ elements no task writes"):
        validate_plan(model.plan)


def test_cycle_raises():
    mpk, t = small_kernel()
    a, b = mpk.new_tensor((3, 32), torch.float32, "a"), mpk.new_tensor((3, 32), torch.float32, "b")
    w = mpk.attach_input(torch.randn(32, 32), "square")
    mpk.linear_layer(a, w, b, 2, BLOCK)
    mpk.linear_layer(b, w, a, 2, BLOCK)
    with pytest.raises(ValueError, match="cycle"):
        mpk.compile()
