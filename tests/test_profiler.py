"""The profiler's decoding of per-task timestamps, on a made-up timeline (no GPU needed)."""

from __future__ import annotations

import json
import statistics

import torch

from tests.helpers import TINY_LLAMA, meta_weights
from vllm_mpk.models import DecodeOptions, ModelSpec, build_decoder
from vllm_mpk.models.kv_cache import allocate_kv_caches
from vllm_mpk.runtime.profiler import gate_gaps_ns, producers, summary, task_spans, write_trace


def test_spans_trace_and_summary_follow_the_timeline(tmp_path):
    spec = ModelSpec.from_hf_config(TINY_LLAMA)
    caches = allocate_kv_caches(spec, 8, 16, device="meta")
    plan = build_decoder(spec, meta_weights(spec), caches, DecodeOptions(max_batch=2, max_seq_len=64,
                                                                         num_workers=5)).plan
    max_tasks = max(map(len, plan.queues))
    profile = torch.zeros(plan.num_workers, max_tasks, 2, dtype=torch.int64)
    origin = 1_000_000
    for w, queue in enumerate(plan.queues):  # task i of worker w: waits 100 ns, runs 1000 + w ns
        t = origin + 50 * w
        for i in range(len(queue)):
            t += 100
            profile[w, i] = torch.tensor([t, t + 1000 + w])
            t += 1000 + w
    spans = task_spans(plan, profile)
    assert sorted(s.task for s in spans) == list(range(len(plan.tasks)))
    firsts = {s.worker: s for s in spans if s.task == plan.queues[s.worker][0]}
    assert all(s.wait_ns == 50 * s.worker for s in firsts.values())  # from the earliest start
    assert all(s.end_ns - s.start_ns == 1000 + s.worker for s in spans)
    assert all(s.wait_ns == 100 for s in spans if s.task not in {q[0] for q in plan.queues})

    path = tmp_path / "trace.json"
    write_trace(plan, spans, path)
    events = json.loads(path.read_text())["traceEvents"]
    assert len(events) == len(plan.tasks)
    assert {e["tid"] for e in events} == set(range(plan.num_workers))
    assert {e["cat"] for e in events} == {op.kind for op in plan.ops}

    text = summary(plan, spans)
    rows = {line.split()[0]: [float(v) if v != "-" else None for v in line.split()[1:]]
            for line in text.splitlines()[2:]}
    assert set(rows) == {op.kind for op in plan.ops}
    assert abs(sum(r[0] for r in rows.values()) - 100) < 0.5
    for kind, row in rows.items():  # the median task runs 1000 + its worker's index ns
        workers = sorted(s.worker for s in spans if s.kind == kind)
        assert row[4] == round(statistics.median(1000 + w for w in workers) / 1e3, 2)
        stages = [max(s.end_ns for s in spans if s.op == op.name) - min(s.start_ns for s in spans if s.op == op.name)
                  for op in plan.ops if op.kind == kind]
        assert row[5] == round(statistics.median(stages) / 1e3, 2) and row[5] >= row[4]
    assert rows["embed"][6] is None  # nothing before it
    argmax = [op for op in plan.ops if op.kind == "argmax"][0]
    assert argmax.name not in producers(plan)[argmax.name]  # its final tiles wait on its own partials
    gaps = gate_gaps_ns(plan, {op.name: [s for s in spans if s.op == op.name] for op in plan.ops})
    (attention,) = [op for op in plan.ops if op.kind == "attention"][:1]
    qkv = [op for op in plan.ops if op.index == attention.index - 1][0]
    assert gaps[attention.name] == (min(s.start_ns for s in spans if s.op == attention.name)
                                    - max(s.end_ns for s in spans if s.op == qkv.name))
