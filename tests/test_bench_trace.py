"""``vllm_mpk.bench.trace`` on a tiny synthetic profiler trace: steps from vLLM's annotations,
GPU busy time by group, idle gaps with the engine thread's activity, and the CLI entry."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from vllm_mpk import cli
from vllm_mpk.bench.trace import (
    analyze,
    analyze_file,
    cpu_during,
    cpu_tree,
    format_report,
    short,
    spans,
    step_label,
    trace_files,
)

ENGINE, GPU = {"pid": 100, "tid": 1}, {"pid": 0, "tid": 7}


def x(name: str, cat: str, ts: float, dur: float, where: dict, corr: int | None = None) -> dict:
    event = {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, **where}
    if corr is not None:
        event["args"] = {"correlation": corr}
    return event


def launch(name: str, ts: float, corr: int) -> dict:
    return x(name, "cuda_runtime", ts, 5, ENGINE, corr)


def kernel(name: str, ts: float, dur: float, corr: int, cat: str = "kernel") -> dict:
    return x(name, cat, ts, dur, GPU, corr)


DECODE = "execute_context_0(0)_generation_2(2)"
EVENTS = [
    # step 0: a prefill (not a decode step)
    x("execute_context_2(8)_generation_0(0)", "user_annotation", 0, 50, ENGINE),
    launch("cudaLaunchKernel", 10, 1), kernel("ampere_bf16_s16816gemm_bf16", 20, 200, 1),
    # step 1: H2D inputs, the graph (megakernel + one more kernel), lm_head GEMM, sampler, D2H copy
    x(DECODE, "user_annotation", 300, 100, ENGINE),
    launch("cudaMemcpyAsync", 310, 9), kernel("Memcpy HtoD (Pinned -> Device)", 340, 5, 9, "gpu_memcpy"),
    launch("cudaGraphLaunch", 320, 2), kernel("megakernel", 350, 1000, 2), kernel("void graph_tail<4>()", 1350, 50, 2),
    x("aten::mm", "cpu_op", 420, 10, ENGINE), launch("cudaLaunchKernel", 422, 3), kernel("nvjet_tst_gemm", 1400, 100, 3),
    launch("cuLaunchKernel", 440, 4), kernel("_gumbel_sample_kernel", 1500, 20, 4),
    launch("cudaMemcpyAsync", 450, 5), kernel("Memcpy DtoH (Device -> Pinned)", 1520, 5, 5, "gpu_memcpy"),
    # the engine thread schedules, then step 2 copies its inputs on the CPU while the GPU idles 175 us
    x("/v/vllm/v1/core/sched/scheduler.py(300): schedule", "python_function", 1400, 145, ENGINE),
    x(DECODE, "user_annotation", 1550, 300, ENGINE),
    x("aten::copy_", "cpu_op", 1560, 130, ENGINE),
    launch("cudaGraphLaunch", 1690, 6), kernel("megakernel", 1700, 1000, 6),
    x("aten::mm", "cpu_op", 1900, 10, ENGINE), launch("cudaLaunchKernel", 1902, 7), kernel("nvjet_tst_gemm", 2700, 100, 7),
    launch("cudaMemcpyAsync", 1950, 8), kernel("Memcpy DtoH (Device -> Pinned)", 2800, 5, 8, "gpu_memcpy"),
    # noise the analysis must skip: GPU-side annotations, flow and metadata events, another thread
    x(DECODE, "gpu_user_annotation", 350, 1175, GPU),
    {"ph": "s", "name": "ac2g", "cat": "ac2g", "ts": 320, "id": 2, **ENGINE},
    {"ph": "M", "name": "process_name", "pid": 100, "args": {"name": "python"}},
    x("aten::empty", "cpu_op", 1600, 50, {"pid": 100, "tid": 2}),
]


def test_steps_groups_and_gaps() -> None:
    report = analyze(EVENTS, gap_us=20)
    assert report.thread == "100/1" and not report.warnings
    prefill, first, second = report.steps
    assert (prefill.label, prefill.decode) == ("prefill 2 (8 tok)", False)
    assert [s.label for s in report.decode] == ["decode 2", "decode 2"]
    # step 1's GPU window runs from its first activity (the H2D copy) to step 2's megakernel
    assert (first.start, first.end, first.busy) == (340, 1700, 1180) and first.idle == 180
    assert first.groups == {"memcpy H2D": 5, "megakernel": 1000, "graph": 50, "lm_head": 100, "sampler": 20,
                            "memcpy D2H": 5}
    (gap,) = first.gaps  # the 5 us gap before the megakernel is under the threshold
    assert (gap.start, gap.end, gap.before, gap.after) == (1525, 1700, "Memcpy DtoH (Device -> Pinned)", "megakernel")
    # nothing spans the whole gap; step 2's annotation covers 150 of its 175 us, aten::copy_ 130 of them
    assert gap.cpu == (DECODE, "aten::copy_") and gap.cover == pytest.approx(130 / 175)
    assert (second.period, second.busy, second.gaps) == (1105, 1105, [])
    assert second.groups == {"megakernel": 1000, "lm_head": 100, "memcpy D2H": 5}
    assert first.cpu_period == 1250 and second.cpu_period is None
    assert first.graph_launches == first.graph_launches_traced == 1
    assert first.api["cudaMemcpyAsync"] == 10 and first.api_calls["cudaMemcpyAsync"] == 2
    # the 120 us gap after the prefill belongs to the prefill step
    assert [g.us for g in prefill.gaps] == [120]


def test_report_text() -> None:
    text = format_report(analyze(EVENTS, gap_us=20, source="t.json"))
    assert text.startswith("t.json: 2 decode steps of 3 (engine thread 100/1)")
    assert "GPU period 1.232 (CPU 1.250), busy 1.143, idle 0.090 of which 0.087 in 0.5 gaps > 20 us" in text
    assert "busy by group: megakernel 1.000, graph 0.025, lm_head 0.100, sampler 0.010" in text
    assert "0.087 (1) execute_context_0(0)_generation_2(2) > aten::copy_" in text
    assert "graph: graph_tail<4>() 0.025" in text
    assert ("175 us idle after Memcpy DtoH (Device -> Pinned), before megakernel; CPU: "
            "execute_context_0(0)_generation_2(2) > aten::copy_ (74% of it)") in text


def test_untraced_graph_replays_and_no_steps_are_flagged() -> None:
    events = [e for e in EVENTS if not (e.get("name") == "megakernel" and e["args"]["correlation"] == 6)]
    assert "1 of 2 cudaGraphLaunch calls have no GPU activity" in analyze(events).warnings[0]
    assert "nothing to analyze" in analyze([x("aten::mm", "cpu_op", 0, 1, ENGINE)]).warnings[0]


def test_graph_launches_mark_steps_without_annotations() -> None:
    report = analyze([e for e in EVENTS if e.get("cat") != "user_annotation"])  # the H2D copy launched before
    # the first graph launch belongs to no step
    assert [(s.label, s.start) for s in report.steps] == [("graph launch", 350), ("graph launch", 1700)]


def test_an_annotation_that_crosses_python_frames_keeps_its_span() -> None:
    """record_function's annotation starts inside its ``__enter__`` frames and outlives them."""
    frames = [x("work.py(3): work", "python_function", 0, 1000, ENGINE),
              x("profiler.py(854): __enter__", "python_function", 10, 30, ENGINE),
              x("<built-in method _record_function_enter_new at 0x7f00>", "python_function", 15, 15, ENGINE),
              x(DECODE, "user_annotation", 20, 880, ENGINE), x("aten::mm", "cpu_op", 100, 400, ENGINE),
              x("profiler.py(860): __exit__", "python_function", 850, 100, ENGINE)]
    (work,) = cpu_tree(spans(frames))
    assert [(n.name[:10], n.start, n.end) for n in work.children] == [
        ("profiler.p", 10, 20), (DECODE[:10], 20, 850), ("profiler.p", 850, 950)]
    assert cpu_during([work], 200, 400) == (("work.py(3): work", DECODE, "aten::mm"), 1.0)


def test_names() -> None:
    assert short("<built-in method sum of Tensor object at 0x7f862904cbe0>") == "<built-in method sum of Tensor object>"
    assert short("/x/vllm/v1/engine/core.py(617): step_with_batch_queue") == "core.py:step_with_batch_queue"
    assert short("void at::native::kernel<float>(int)") == "at::native::kernel<float>(int)"
    assert step_label("execute_8_context_0(sq0sk0sqsq0sqsk0)_generation_8(sq8sk1032sqsq8sqsk1032)") == ("decode 8", True)
    assert step_label("execute_context_1(128)_generation_7(7)") == ("mixed 1+7 (128+7 tok)", False)


def write(path: Path, events: list[dict], gz: bool) -> Path:
    data = json.dumps({"schemaVersion": 1, "traceEvents": events}).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_files_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engine = tmp_path / "qwen3-0.6b-mpk"
    engine.mkdir()
    gz = write(engine / "a_dp0.1.pt.trace.json.gz", EVENTS, gz=True)
    write(engine / "b_dp0.2.pt.trace.json", EVENTS, gz=False)
    (engine / "a.analysis.txt").write_text("not a trace")
    assert [p.name for p in trace_files([tmp_path])] == ["a_dp0.1.pt.trace.json.gz", "b_dp0.2.pt.trace.json"]
    assert len(analyze_file(gz).decode) == 2
    assert cli.main(["bench", "--analyze-trace", str(gz), "--gap-us", "150"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("a_dp0.1.pt.trace.json.gz: 2 decode steps") and "175 us idle" in out
    assert cli.main(["bench", "--analyze-trace", str(tmp_path / "missing.json")]) == 2
    assert "no trace file or folder" in capsys.readouterr().err
