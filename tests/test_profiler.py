"""The profiler's decoding of per-task timestamps, on a made-up timeline (no GPU needed)."""

from __future__ import annotations

import json

import torch

from tests.helpers import TINY_LLAMA, meta_weights
from vllm_mpk.models import DecodeOptions, ModelSpec, build_decoder
from vllm_mpk.models.kv_cache import allocate_kv_caches
from vllm_mpk.runtime.profiler import summary, task_spans, write_trace


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
    shares = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()[2:]}
    assert set(shares) == {op.kind for op in plan.ops}
    assert abs(sum(shares.values()) - 100) < 0.5
