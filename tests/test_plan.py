"""Plans of the shipped model configs (two layers, weights on the meta device): they validate,
their events are as fine-grained as each op kind allows, and both placement policies give
deadlock-free schedules."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from tests.helpers import config_paths, meta_weights, model_spec
from vllm_mpk.graph.ir import Op, Task
from vllm_mpk.graph.plan import Plan
from vllm_mpk.graph.schedule import POLICIES
from vllm_mpk.graph.validate import check_no_deadlock, validate
from vllm_mpk.models import DecodeOptions, auto_kv_splits, build_decoder, plan_kv_splits
from vllm_mpk.models.kv_cache import allocate_kv_caches
from vllm_mpk.models.weights import expected_shapes

LINEAR_KINDS = ("linear", "linear_with_residual", "rmsnorm_linear", "rmsnorm_linear_silu_mul")
WORKERS = (132, 7)  # one worker per H100 SM; and fewer workers than most grids


@pytest.fixture(scope="module", params=[(c, p, w) for c in sorted(config_paths()) for p in sorted(POLICIES)
                                        for w in WORKERS], ids=lambda p: f"{p[0]}-{p[1]}-w{p[2]}")
def plan(request) -> Plan:
    name, policy, workers = request.param
    spec = model_spec(name, 2)
    caches = allocate_kv_caches(spec, 8 * 32, 16, device="meta")
    options = DecodeOptions(max_batch=8, max_seq_len=512, num_workers=workers, schedule=policy)
    return build_decoder(spec, meta_weights(spec), caches, options).plan


def tasks_by_op(plan: Plan) -> dict[int, list[Task]]:
    out: dict[int, list[Task]] = defaultdict(list)
    for t in plan.tasks:
        out[t.op.index].append(t)
    return out


def writer_op(plan: Plan, tensor: str) -> Op:
    return next(op for op in plan.ops if any(h.name == tensor for h in op.outputs.values()))


def waited_producers(plan: Plan, task: Task) -> set[int]:
    return {p for e in task.wait_events for p in plan.events[e].producers}


def test_plan_validates(plan: Plan, request):
    validate(plan.tensors, plan.tasks, plan.events, plan.queues)
    check_no_deadlock(plan.tasks, plan.events, plan.queues)
    moe = model_spec(request.node.callspec.params["plan"][0], 2).is_moe
    mlp = {"moe_topk", "rmsnorm_moe_gate_up", "moe_down"} if moe else {"rmsnorm_linear_silu_mul"}
    assert {op.kind for op in plan.ops} == {"embed", "rmsnorm_linear", "attention", "linear_with_residual",
                                            "argmax", *mlp}
    assert sum(op.kind == "attention" for op in plan.ops) == 2


def test_task_count_is_sum_of_grids(plan: Plan):
    """One task per tile of ``grid_dim``, plus the argmax's final reduce."""
    argmax_ops = sum(op.kind == "argmax" for op in plan.ops)
    assert len(plan.tasks) == sum(op.num_tiles for op in plan.ops) + argmax_ops
    for op_index, tasks in tasks_by_op(plan).items():
        op = plan.ops[op_index]
        assert len(tasks) == op.num_tiles + (op.kind == "argmax"), op.name
    assert [t.id for t in plan.tasks] == list(range(len(plan.tasks)))


def test_every_task_placed_once(plan: Plan, request):
    workers = request.node.callspec.params["plan"][2]
    assert len(plan.queues) == workers
    assert sorted(t for q in plan.queues for t in q) == list(range(len(plan.tasks)))
    for w, queue in enumerate(plan.queues):
        assert all(plan.tasks[t].worker == w for t in queue)


def test_events_are_consistent(plan: Plan):
    for event in plan.events:
        assert event.trigger_count == len(event.producers) > 0
        assert len({plan.tasks[p].op.index for p in event.producers}) == 1, "an event counts tiles of one op"
        assert all(event.id in plan.tasks[p].signal_events for p in event.producers)
        assert all(event.id in plan.tasks[c].wait_events for c in event.consumers)
    for task in plan.tasks:
        assert not set(task.wait_events) & set(task.signal_events)
        assert all(task.id in plan.events[e].consumers for e in task.wait_events)


def head_columns(op: Op, head: int) -> list[tuple[int, int]]:
    """Columns of the QKV row that hold KV head ``head``'s queries, key and value."""
    nq, nkv, hd = op.attrs["num_q_heads"], op.attrs["num_kv_heads"], op.attrs["head_dim"]
    group = nq // nkv
    return [(head * group * hd, (head + 1) * group * hd), ((nq + head) * hd, (nq + head + 1) * hd),
            ((nq + nkv + head) * hd, (nq + nkv + head + 1) * hd)]


def test_attention_waits_only_for_its_heads_qkv_tiles(plan: Plan, request):
    workers = request.node.callspec.params["plan"][2]
    by_op = tasks_by_op(plan)
    for op in (op for op in plan.ops if op.kind == "attention"):
        qkv_op = writer_op(plan, op.inputs["input"].name)
        qkv_tasks = by_op[qkv_op.index]
        for task in by_op[op.index]:
            cols = head_columns(op, task.params["kv_head"])
            expected = {t.id for t in qkv_tasks
                        if any(t.params["col_start"] < c1 and c0 < t.params["col_end"] for c0, c1 in cols)}
            assert waited_producers(plan, task) == expected, task
            if workers == 132:  # qkv tiles narrower than a head group: a real subset of the projection
                assert len(expected) < len(qkv_tasks), task


def test_linear_tiles_share_one_event(plan: Plan):
    """A linear layer reads its whole input row, so every tile waits on one event: all tiles of the
    op that wrote the input (the residual read is implied by it)."""
    by_op = tasks_by_op(plan)
    for op in (op for op in plan.ops if op.kind in LINEAR_KINDS):
        waits = {t.wait_events for t in by_op[op.index]}
        assert len(waits) == 1 and len(next(iter(waits))) == 1, f"{op.name} waits on {waits}"
        producer = writer_op(plan, op.inputs["input"].name)
        assert waited_producers(plan, by_op[op.index][0]) == {t.id for t in by_op[producer.index]}, op.name


def test_embed_waits_for_nothing_and_argmax_chunks_wait_for_their_logits(plan: Plan):
    by_op = tasks_by_op(plan)
    for op in plan.ops:
        tasks = by_op[op.index]
        if op.kind == "embed":
            assert all(t.wait_events == () for t in tasks)
        if op.kind != "argmax":
            continue
        lm_head = by_op[writer_op(plan, op.inputs["input"].name).index]
        *partials, reduce = tasks
        for t in partials:
            v0, v1 = t.params["vocab_start"], t.params["vocab_end"]
            expected = {p.id for p in lm_head if p.params["col_start"] < v1 and v0 < p.params["col_end"]}
            assert waited_producers(plan, t) == expected, t
        assert waited_producers(plan, reduce) == {t.id for t in partials}


def test_summary_names_every_op_kind(plan: Plan):
    summary = plan.summary()
    for kind in {op.kind for op in plan.ops}:
        assert kind in summary
    assert f"workers: {plan.num_workers}" in summary


# split KV: the default count per plan ------------------------------------------------------------


@pytest.mark.parametrize("batch,expected", [(1, 2), (2, 2), (4, 2), (8, 1), (16, 1)])
def test_auto_kv_splits_at_8_kv_heads_and_132_workers(batch: int, expected: int):
    """2 while the (request, KV head) pairs fill at most a quarter of the workers (8/16/32 of 132
    measured to gain on the H100), 1 from 64 (batch 8, measured to lose)."""
    assert auto_kv_splits(8, batch, 132) == expected
    assert plan_kv_splits(model_spec("qwen3-0.6b", 1), batch, 132, None) == expected  # 8 KV heads


def test_auto_kv_splits_boundary_and_explicit_value_wins():
    assert auto_kv_splits(1, 33, 132) == 2 and auto_kv_splits(1, 34, 132) == 1
    assert auto_kv_splits(3, 11, 132) == 2  # 132 == 132: at most a quarter
    assert auto_kv_splits(3, 12, 132) == 1
    assert auto_kv_splits(8, 1, 31) == 1 and auto_kv_splits(8, 1, 32) == 2
    spec = model_spec("qwen3-0.6b", 1)  # 8 KV heads
    for forced in (1, 2, 3, 4):
        assert plan_kv_splits(spec, 1, 132, forced) == forced
        assert plan_kv_splits(spec, 8, 132, forced) == forced


@pytest.mark.parametrize("value", [0, -1, "2", 2.0, True])
def test_decode_options_refuse_bad_kv_splits(value):
    with pytest.raises(ValueError, match=r"kv_splits must be a positive int or None \(auto\)"):
        DecodeOptions(kv_splits=value)


def attention_tiles(spec, batch: int, workers: int, kv_splits, world: int = 1) -> tuple[int, int]:
    """The built split count and the attention tiles per layer of rank 0's plan."""
    local = spec.shard(world)
    weights = {n: torch.empty(s, dtype=torch.bfloat16, device="meta") for n, s in expected_shapes(local).items()}
    caches = allocate_kv_caches(local, batch * 32, 16, device="meta")
    model = build_decoder(spec, weights, caches, DecodeOptions(max_batch=batch, max_seq_len=512, num_workers=workers,
                                                               kv_splits=kv_splits, world_size=world))
    attention = [op for op in model.plan.ops if op.kind == "attention"]
    return model.kv_splits, attention[0].num_tiles


@pytest.mark.parametrize("batch,world,kv_splits,expected", [
    (1, 1, None, 2), (2, 1, None, 2), (4, 1, None, 2), (8, 1, None, 1),
    (8, 2, None, 2),  # TP 2: 4 KV heads per rank, 4 x 8 x 4 = 128 <= 132
    (16, 2, None, 1),
    (1, 1, 1, 1), (8, 1, 2, 2), (8, 1, 4, 4),  # an explicit count wins
])
def test_built_plans_use_the_auto_rule(batch: int, world: int, kv_splits, expected: int):
    spec = model_spec("qwen3-0.6b", 1)  # 8 KV heads
    splits, tiles = attention_tiles(spec, batch, 132, kv_splits, world)
    assert splits == expected
    assert tiles == spec.shard(world).num_kv_heads * batch * expected
