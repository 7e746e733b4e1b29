"""The profiling pass of ``vllm-mpk bench --profile-dir DIR``: after an engine's measurements, a
few decode steps of its largest batch under vLLM's own torch profiler, as Chrome traces in
``DIR/<model>-<impl>/`` for ``vllm_mpk.bench.trace``.

vLLM 0.26 configures the profiler per engine with ``profiler_config`` (the ``VLLM_TORCH_PROFILER_DIR``
environment variable is gone): with ``profiler="torch"`` its GPU worker records CPU and CUDA
activity from ``LLM.start_profile(prefix)`` to ``LLM.stop_profile()`` and writes
``<prefix>_<rank suffix>.<ns>.pt.trace.json.gz`` there (``stop_profile`` returns once it is
written). Nothing is recorded, and nothing changes in the engine, before ``start_profile``.

Two passes over the same batch, one trace each:

- ``ops``: no Python stacks. Torch ops, CUDA API calls, vLLM's per-step annotation, every kernel
  and copy; the profiler's CPU cost stays small, so the GPU gaps are close to the real ones.
  vLLM also writes its table of ops by CUDA time, kept as ``<prefix>-ops.profiler_out_0.txt``.
- ``stack``: with the profiler's Python tracer, which names the Python function the engine thread
  ran during each gap (scheduling, input preparation, output processing). It slows the CPU side,
  so its gaps are longer than the real ones: read it for attribution, ``ops`` for durations.

vLLM builds its worker's profiler on the first ``start_profile`` and keeps it, settings and trace
name included; the bench worker extension (``StepTimer.bench_profiler_reset``) drops it before
each pass with that pass's settings.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_mpk.bench.trace import analyze_file, format_report, summary_lines

MAX_TRACE_BYTES = 20 * 2**20  # traces come back from the GPU host: keep them small
RECORD = "profile.json"


@dataclass(frozen=True)
class ProfilePass:
    name: str
    tokens: int  # new tokens per request: one prefill step, then tokens - 1 decode steps
    with_stack: bool


def profile_passes(tokens: int, stack_tokens: int) -> list[ProfilePass]:
    passes = [ProfilePass("ops", tokens, with_stack=False)]
    return passes + [ProfilePass("stack", stack_tokens, with_stack=True)] if stack_tokens > 0 else passes


def engine_profile_dir(root: str | Path, model: str, impl: str) -> Path:
    """Absolute, as vLLM's ``torch_profiler_dir`` must be."""
    return Path(root).expanduser().resolve() / f"{model}-{impl}"


def profiler_config(directory: Path) -> dict[str, Any]:
    """vLLM's ``profiler_config`` for an engine whose traces go to ``directory``."""
    return {"profiler": "torch", "torch_profiler_dir": str(directory), "torch_profiler_with_stack": False,
            "torch_profiler_use_gzip": True, "torch_profiler_record_shapes": False,
            "torch_profiler_dump_cuda_time_total": True}


def run_pass(llm: Any, directory: Path, prefix: str, p: ProfilePass,
             generate: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """One profiled generation; its record: what ``generate`` returned, the trace files and their
    sizes, or the error that stopped it."""
    record: dict[str, Any] = {"pass": p.name, "tokens": p.tokens, "with_stack": p.with_stack}
    name = f"{prefix}-{p.name}"
    try:
        llm.collective_rpc("bench_profiler_reset", args=(p.with_stack, not p.with_stack))
        llm.start_profile(profile_prefix=name)
        try:
            record.update(generate(p.tokens))
        finally:
            llm.stop_profile()
    except Exception as e:  # the rows are written already; keep them and say why this pass failed
        first = e.__context__  # what failed before stop_profile did, if it did
        record["error"] = f"{type(e).__name__}: {e}" + (f" (after {type(first).__name__}: {first})" if first else "")
    for table in directory.glob("profiler_out_*.txt"):
        table.replace(directory / f"{name}.{table.name}")
    traces = sorted(directory.glob(f"{name}_*.pt.trace.json*"))
    record["traces"] = {t.name: t.stat().st_size for t in traces}
    if not traces and "error" not in record:
        record["error"] = f"vLLM wrote no trace {name}_*.pt.trace.json* in {directory}"
    if any(size > MAX_TRACE_BYTES for size in record["traces"].values()):
        record["warning"] = f"trace over {MAX_TRACE_BYTES >> 20} MiB: profile fewer tokens"
    return record


def profile_engine(llm: Any, directory: Path, info: dict[str, Any], passes: Iterable[ProfilePass],
                   generate: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """Run the passes; write and return ``profile.json``: ``info`` (model, impl, batch, engine
    settings) and one record per pass."""
    directory.mkdir(parents=True, exist_ok=True)
    prefix = f"{info['model']}-{info['impl']}-b{info['batch']}"
    record = {**info, "passes": [run_pass(llm, directory, prefix, p, generate) for p in passes]}
    (directory / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return record


def analyze_profiles(directories: Iterable[Path], gap_us: float = 20.0) -> str:
    """For each engine folder: every trace its ``profile.json`` lists, analyzed into
    ``<trace>.analysis.txt`` (summary and steps); returns the summaries (and each pass's error)."""
    out: list[str] = []
    for directory in directories:
        path = directory / RECORD
        if not path.exists():
            out.append(f"{directory}: no {RECORD} (the engine did not reach its profiling pass; see its log)")
            continue
        record = json.loads(path.read_text())
        settings = ", ".join(f"{k} {record.get(k)}" for k in ("async_scheduling", "attention_backend", "model_runner"))
        out.append(f"== {record['model']} {record['impl']}, batch {record['batch']}: {settings}")
        for p in record["passes"]:
            out += [f"{p['pass']} pass: {p[key]}" for key in ("error", "warning") if key in p]
            for name in p.get("traces", {}):
                report = analyze_file(directory / name, gap_us)
                (directory / f"{name.split('.pt.trace')[0]}.analysis.txt").write_text(format_report(report) + "\n")
                out += [f"[{p['pass']} pass, {p['tokens']} tokens, forward {_ms(p.get('forward_ms'))} ms, "
                        f"lm_head {_ms(p.get('lm_head_ms'))} ms by CUDA events]", *summary_lines(report)]
    return "\n".join(out)


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"
