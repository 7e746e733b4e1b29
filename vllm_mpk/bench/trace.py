"""Where a vLLM decode step's time goes, read from a PyTorch profiler trace of the engine core
(the Chrome trace JSON ``torch.profiler`` exports, gzipped or not). Pure Python: no torch, no GPU.

Steps. vLLM's GPU worker wraps each ``execute_model`` in a profiler annotation named
``execute_context_<reqs>(<tokens>)_generation_<reqs>(<tokens>)`` (``Worker.annotate_profile``); a
step is whatever the engine thread launches from one annotation's start to the next one's. That
includes the step's sampling and output copy, which run after ``execute_model`` returns
(``sample_tokens``), and, with async scheduling, the scheduling of the following step. A trace
without those annotations falls back to one step per ``cudaGraphLaunch``.

Each GPU activity (kernel, memcpy, memset) belongs to the step whose CPU window holds the CUDA
call that launched it (CUPTI's correlation id links the two; kernels replayed from a CUDA graph
carry the id of their ``cudaGraphLaunch``). A step's GPU window runs from the start of its first
GPU activity to the start of the next step's: its length is the step's period on the GPU, the
TPOT of a steady decode. Within it: busy time (the union of all activity) by group, and idle
time; every idle gap longer than ``gap_us`` is listed with the activities around it and what the
engine thread was doing meanwhile: the innermost CPU event (torch op, CUDA call, annotation, or
Python function when the trace has Python stacks) spanning the whole gap, then, level by level,
the child event that covered at least half of it.

Groups of GPU activity: ``megakernel`` (kernels named so), ``graph`` (other kernels replayed from
a CUDA graph), ``lm_head`` (GEMM kernels outside a graph: ``compute_logits`` in a decode step),
``sampler`` and ``inputs`` (vLLM's sampling and input-preparation kernels, by name), memcpy by
direction, memset, ``other``.
"""

from __future__ import annotations

import gzip
import json
import re
import statistics
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GPU_CATS = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
LAUNCH_CATS = frozenset({"cuda_runtime", "cuda_driver"})
CPU_CATS = frozenset({"cpu_op", "user_annotation", "python_function"}) | LAUNCH_CATS
CAT_ALIASES = {"memcpy": "gpu_memcpy", "memset": "gpu_memset", "runtime": "cuda_runtime", "driver": "cuda_driver"}
STEP_RE = re.compile(r"^execute_(?:\d+_)?context_(\d+)\((?:sq)?(\d+)[^)]*\)_generation_(\d+)\((?:sq)?(\d+)")
PYTHON_RE = re.compile(r"^(.*?)\((\d+)\): (.+)$")
ADDRESS_RE = re.compile(r" at 0x[0-9a-f]+")  # "<built-in method sum of Tensor object at 0x7f...>"
GROUPS = ("megakernel", "graph", "lm_head", "sampler", "inputs", "memcpy D2H", "memcpy H2D", "memcpy D2D",
          "memset", "other")
NAME_GROUPS = (
    ("lm_head", re.compile(r"gemm|gemv|nvjet|cutlass|xmma|cublas|splitk", re.I)),
    ("sampler", re.compile(r"sampl|gumbel|temperature|penalt|bincount|min_p|top_?k|top_?p|logprob|softmax|argmax|"
                           r"bias_kernel|bad_words|grammar|nans", re.I)),
    ("inputs", re.compile(r"prepare|block_table|slot_mapping|post_update|combine_sampled|expand_idx|apply_write|"
                          r"num_computed|num_sampled|seq_lens|rope_positions", re.I)),
)
US_PER_MS = 1000.0


@dataclass(frozen=True)
class Span:
    """One complete ("X") trace event; times in microseconds."""

    name: str
    cat: str
    start: float
    end: float
    pid: Any
    tid: Any
    corr: int | None = None


@dataclass
class Node:
    """A CPU event in its thread's nesting tree."""

    name: str
    start: float
    end: float
    children: list[Node] = field(default_factory=list)


@dataclass(frozen=True)
class Gap:
    start: float
    end: float
    before: str  # the GPU activity that ended last before the gap
    after: str  # the one that starts it
    cpu: tuple[str, ...]  # the engine thread meanwhile: outer to inner event names
    cover: float  # share of the gap the innermost of ``cpu`` covers

    @property
    def us(self) -> float:
        return self.end - self.start


@dataclass
class Step:
    index: int
    label: str  # from vLLM's annotation: "decode 8", "prefill 8 (1024 tok)", "mixed ..."; or "graph launch"
    decode: bool
    cpu_start: float
    cpu_period: float | None  # to the next step's annotation
    start: float  # GPU window
    end: float
    busy: float = 0.0
    groups: dict[str, float] = field(default_factory=dict)
    kernels: dict[str, float] = field(default_factory=dict)  # "group\tname" -> us
    gaps: list[Gap] = field(default_factory=list)
    api: dict[str, float] = field(default_factory=dict)  # CUDA API us on the engine thread in its CPU window
    api_calls: dict[str, int] = field(default_factory=dict)
    graph_launches: int = 0
    graph_launches_traced: int = 0

    @property
    def period(self) -> float:
        return self.end - self.start

    @property
    def idle(self) -> float:
        return self.period - self.busy


@dataclass
class Report:
    source: str
    thread: str  # the engine thread, "pid/tid"
    steps: list[Step]
    gap_us: float
    warnings: list[str] = field(default_factory=list)

    @property
    def decode(self) -> list[Step]:
        return [s for s in self.steps if s.decode]


# reading ----------------------------------------------------------------------------------------


def load_events(path: str | Path) -> list[dict[str, Any]]:
    """The trace events of a Chrome trace file (a ``traceEvents`` object or a bare list; gzip ok);
    ValueError naming the file when it is neither."""
    raw = Path(path).read_bytes()
    try:
        data = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    except (OSError, EOFError, ValueError) as e:  # a damaged gzip stream raises OSError or EOFError
        raise ValueError(f"{path} is not a Chrome trace ({e})") from None
    if isinstance(data, dict):
        return data.get("traceEvents", [])
    if not isinstance(data, list):
        raise ValueError(f"{path} is not a Chrome trace (a JSON {type(data).__name__}, not a traceEvents object or list)")
    return data


def spans(events: Iterable[dict[str, Any]]) -> list[Span]:
    out = []
    for ev in events:
        if ev.get("ph") != "X" or "ts" not in ev:
            continue
        cat = str(ev.get("cat", "")).lower()
        corr = (ev.get("args") or {}).get("correlation")
        start = float(ev["ts"])
        out.append(Span(str(ev.get("name", "")), CAT_ALIASES.get(cat, cat), start, start + float(ev.get("dur", 0.0)),
                        ev.get("pid"), ev.get("tid"), None if corr is None else int(corr)))
    return out


def is_graph_launch(name: str) -> bool:
    return "GraphLaunch" in name


def gpu_group(span: Span, graph_corrs: set[int]) -> str:
    if "megakernel" in span.name:
        return "megakernel"
    if span.cat == "gpu_memcpy":
        for direction in ("DtoH", "HtoD", "DtoD"):
            if direction in span.name:
                return f"memcpy {direction[0]}2{direction[-1]}"
        return "other"
    if span.cat == "gpu_memset":
        return "memset"
    if span.corr is not None and span.corr in graph_corrs:
        return "graph"
    return next((group for group, pattern in NAME_GROUPS if pattern.search(span.name)), "other")


def short(name: str, width: int = 70) -> str:
    """A readable event name: ``file.py:function`` for Python frames; kernels without ``void``."""
    m = PYTHON_RE.match(name)
    if m:
        name = f"{Path(m.group(1)).name}:{m.group(3)}"
    name = ADDRESS_RE.sub("", name.removeprefix("void "))
    return name if len(name) <= width else name[: width - 1] + "…"


def step_label(name: str) -> tuple[str, bool]:
    m = STEP_RE.match(name)
    if m is None:
        return name, True
    ctx_reqs, ctx_tokens, gen_reqs, gen_tokens = (int(g) for g in m.groups())
    if ctx_reqs == 0:
        return f"decode {gen_reqs}" + ("" if gen_tokens == gen_reqs else f" ({gen_tokens} tok)"), gen_reqs > 0
    if gen_reqs == 0:
        return f"prefill {ctx_reqs} ({ctx_tokens} tok)", False
    return f"mixed {ctx_reqs}+{gen_reqs} ({ctx_tokens}+{gen_tokens} tok)", False


# the engine thread's CPU events -----------------------------------------------------------------


def cpu_tree(events: Iterable[Span]) -> list[Node]:
    """The roots of one thread's nesting tree; siblings are disjoint and sorted by start. Events
    do not always nest: a ``record_function`` annotation starts inside the Python frames of its
    ``__enter__`` and outlives them. An open event that ends inside a later one is cut where the
    later one starts, so the annotation keeps its whole span and its children."""
    roots: list[Node] = []
    stack: list[Node] = []
    for s in sorted(events, key=lambda s: (s.start, -s.end)):
        while stack and stack[-1].end <= s.start:
            stack.pop()
        while stack and stack[-1].end < s.end:
            stack.pop().end = s.start
        node = Node(s.name, s.start, s.end)
        (stack[-1].children if stack else roots).append(node)
        stack.append(node)
    return roots


def overlapping(level: list[Node], a: float, b: float) -> list[tuple[Node, float]]:
    """Nodes of ``level`` overlapping [a, b] with their overlap, largest first."""
    i = max(bisect_right(level, a, key=lambda n: n.start) - 1, 0)
    found = []
    while i < len(level) and level[i].start < b:
        overlap = min(level[i].end, b) - max(level[i].start, a)
        if overlap > 0:
            found.append((level[i], overlap))
        i += 1
    return sorted(found, key=lambda no: -no[1])


def cpu_during(roots: list[Node], a: float, b: float) -> tuple[tuple[str, ...], float]:
    """What the thread did during [a, b]: the chain of events spanning all of it, extended by the
    child that covered at least half of it, level by level; and the share the last one covers."""
    path: list[Node] = []
    level = roots
    while True:  # events that contain the whole interval
        i = bisect_right(level, a, key=lambda n: n.start) - 1
        if i < 0 or level[i].end < b:
            break
        path.append(level[i])
        level = level[i].children
    cover = 1.0 if path else 0.0
    while True:  # then the dominant child, as long as it covers half the interval
        top = overlapping(level, a, b)
        if not top or top[0][1] < 0.5 * (b - a):
            break
        path.append(top[0][0])
        cover = top[0][1] / (b - a)
        level = top[0][0].children
    return tuple(n.name for n in path), cover


# analysis ---------------------------------------------------------------------------------------


def merged(gpu: Sequence[Span]) -> list[tuple[float, float, str, str]]:
    """The GPU's busy intervals (all streams): (start, end, first activity, activity ending last)."""
    out: list[list[Any]] = []
    for s in gpu:  # sorted by start
        if out and s.start <= out[-1][1]:
            if s.end > out[-1][1]:
                out[-1][1], out[-1][3] = s.end, s.name
        else:
            out.append([s.start, s.end, s.name, s.name])
    return [tuple(m) for m in out]  # type: ignore[misc]


def engine_thread(cpu: Sequence[Span]) -> tuple[tuple[Any, Any] | None, list[Span]]:
    """The thread that runs vLLM's steps and its step markers (annotations, or graph launches)."""
    for is_marker in (lambda s: s.cat == "user_annotation" and STEP_RE.match(s.name) is not None,
                      lambda s: s.cat in LAUNCH_CATS and is_graph_launch(s.name)):
        counts = Counter((s.pid, s.tid) for s in cpu if is_marker(s))
        if counts:
            thread = counts.most_common(1)[0][0]
            return thread, sorted((s for s in cpu if (s.pid, s.tid) == thread and is_marker(s)), key=lambda s: s.start)
    return None, []


def step_windows(gpu: Sequence[Span], markers: Sequence[Span], launches: dict[int, Span]) -> list[Step]:
    """One step per marker that launched GPU activity, its GPU window from its first activity to
    the next step's; activity goes to the step of its launch, or by timestamp if nothing links."""
    marker_ts = [m.start for m in markers]
    linked = any(g.corr in launches for g in gpu)
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for g in gpu:
        launch = launches.get(g.corr) if g.corr is not None else None
        i = bisect_right(marker_ts, launch.start if launch else g.start) - 1
        if i >= 0 and (launch is not None or not linked):
            first[i], last[i] = min(first.get(i, g.start), g.start), max(last.get(i, g.end), g.end)
    order = sorted(first, key=lambda i: first[i])
    steps = []
    for k, i in enumerate(order):
        label, decode = step_label(markers[i].name) if STEP_RE.match(markers[i].name) else ("graph launch", True)
        cpu_period = marker_ts[i + 1] - marker_ts[i] if i + 1 < len(markers) else None
        end = first[order[k + 1]] if k + 1 < len(order) else last[i]
        steps.append(Step(i, label, decode, marker_ts[i], cpu_period, first[i], end))
    return steps


def spread(steps: Sequence[Step], a: float, b: float) -> Iterable[tuple[Step, float]]:
    """The steps whose GPU window overlaps [a, b), with the overlap (windows sorted, disjoint)."""
    k = max(bisect_right(steps, a, key=lambda s: s.start) - 1, 0)
    while k < len(steps) and steps[k].start < b:
        overlap = min(b, steps[k].end) - max(a, steps[k].start)
        if overlap > 0:
            yield steps[k], overlap
        k += 1


def analyze(events: Iterable[dict[str, Any]], gap_us: float = 20.0, source: str = "trace") -> Report:
    """Steps, their GPU time by group, their idle gaps and the engine thread's activity in each.
    Group times are cut at window boundaries; where activities overlap (several streams) they add
    up to more than the busy time, which counts the union."""
    everything = spans(events)
    gpu = sorted((s for s in everything if s.cat in GPU_CATS), key=lambda s: s.start)
    cpu = [s for s in everything if s.cat in CPU_CATS]
    thread, markers = engine_thread(cpu)
    if thread is None or not gpu:
        what = "no GPU activity" if not gpu else "no vLLM step annotation and no cudaGraphLaunch"
        return Report(source, "—", [], gap_us, [f"{what} in the trace: nothing to analyze"])
    launches = {s.corr: s for s in cpu if s.cat in LAUNCH_CATS and s.corr is not None}
    graph_corrs = {c for c, s in launches.items() if is_graph_launch(s.name)}
    steps = step_windows(gpu, markers, launches)
    report = Report(source, f"{thread[0]}/{thread[1]}", steps, gap_us)
    for g in gpu:
        group = gpu_group(g, graph_corrs)
        key = f"{group}\t{short(g.name)}"
        for step, overlap in spread(steps, g.start, g.end):
            step.groups[group] = step.groups.get(group, 0.0) + overlap
            step.kernels[key] = step.kernels.get(key, 0.0) + overlap
    busy = merged(gpu)
    for a, b, *_ in busy:
        for step, overlap in spread(steps, a, b):
            step.busy += overlap
    roots = cpu_tree(s for s in cpu if (s.pid, s.tid) == thread)
    for before, after in zip(busy, busy[1:]):
        a, b = before[1], after[0]
        k = bisect_right(steps, a, key=lambda s: s.start) - 1
        if b - a > gap_us and k >= 0 and a < steps[k].end:
            steps[k].gaps.append(Gap(a, b, before[3], after[2], *cpu_during(roots, a, b)))
    count_api(steps, [s for s in cpu if (s.pid, s.tid) == thread and s.cat in LAUNCH_CATS],
              [m.start for m in markers], {g.corr for g in gpu if g.corr in graph_corrs})
    untraced = sum(s.graph_launches - s.graph_launches_traced for s in steps)
    if untraced:
        report.warnings.append(
            f"{untraced} of {sum(s.graph_launches for s in steps)} cudaGraphLaunch calls have no GPU activity in the "
            "trace (CUPTI did not record the graph's kernels): their GPU time shows up as idle")
    if not any(g.corr in launches for g in gpu):
        report.warnings.append("no GPU activity carries a launch's correlation id: steps were split by GPU timestamp")
    if not report.decode:
        report.warnings.append("no decode step in the trace")
    return report


def count_api(steps: Sequence[Step], calls: Iterable[Span], marker_ts: Sequence[float], traced: set[int]) -> None:
    """CUDA API time and calls of the engine thread, per step's CPU window; graph launches and
    how many of them have GPU activity in the trace (``traced``: their correlation ids)."""
    by_index = {s.index: s for s in steps}
    for call in calls:
        step = by_index.get(bisect_right(marker_ts, call.start) - 1)
        if step is None:
            continue
        step.api[call.name] = step.api.get(call.name, 0.0) + call.end - call.start
        step.api_calls[call.name] = step.api_calls.get(call.name, 0) + 1
        if is_graph_launch(call.name):
            step.graph_launches += 1
            step.graph_launches_traced += call.corr in traced


# text -------------------------------------------------------------------------------------------


def ms(us: float) -> str:
    return f"{us / US_PER_MS:.3f}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def used_groups(steps: Sequence[Step]) -> list[str]:
    return [g for g in GROUPS if any(s.groups.get(g) for s in steps)]


def describe_cpu(gap: Gap) -> str:
    if not gap.cpu:
        return "no CPU event on the engine thread covers it"
    names = " > ".join(short(n, 60) for n in gap.cpu[-3:])
    return names if gap.cover >= 0.999 else f"{names} ({gap.cover:.0%} of it)"


def gap_key(gap: Gap) -> str:
    return " > ".join(short(n, 60) for n in gap.cpu[-2:]) if gap.cpu else "(no CPU event recorded)"


def step_lines(report: Report) -> list[str]:
    groups = used_groups(report.steps)
    head = f"{'step':>4} {'kind':<24} {'period':>7} {'busy':>7} {'idle':>7} | " + " ".join(f"{g:>10}" for g in groups)
    lines = [head + f" | gaps > {report.gap_us:.0f} us", "-" * len(head)]
    for s in report.steps:
        cells = " ".join(f"{ms(s.groups[g]) if s.groups.get(g) else '-':>10}" for g in groups)
        gaps = f"{len(s.gaps)} ({ms(sum(g.us for g in s.gaps))})" if s.gaps else "0"
        lines.append(f"{s.index:>4} {s.label[:24]:<24} {ms(s.period):>7} {ms(s.busy):>7} {ms(s.idle):>7} | {cells} "
                     f"| {gaps}")
        lines += [f"{'':>9}{g.us:7.0f} us idle after {short(g.before, 40)}, before {short(g.after, 40)}; CPU: "
                  f"{describe_cpu(g)}" for g in s.gaps]
    return lines


def summary_lines(report: Report, top: int = 6) -> list[str]:
    """Per decode step, medians (ms): period and GPU busy/idle, busy by group, idle in gaps by what
    the engine thread was doing (time per step, summed over steps / their number), CUDA API time."""
    steps = report.decode
    lines = [f"{report.source}: {len(steps)} decode steps of {len(report.steps)} (engine thread {report.thread})"]
    lines += [f"  warning: {w}" for w in report.warnings]
    if not steps:
        return lines
    n = len(steps)
    cpu_periods = [s.cpu_period for s in steps if s.cpu_period is not None]
    gap_total = [sum(g.us for g in s.gaps) for s in steps]
    lines.append(f"  per decode step, median ms: GPU period {ms(median([s.period for s in steps]))} (CPU "
                 f"{ms(median(cpu_periods))}), busy {ms(median([s.busy for s in steps]))}, idle "
                 f"{ms(median([s.idle for s in steps]))} of which {ms(median(gap_total))} in "
                 f"{median([len(s.gaps) for s in steps]):.1f} gaps > {report.gap_us:.0f} us")
    lines.append("  busy by group: " + ", ".join(f"{g} {ms(median([s.groups.get(g, 0.0) for s in steps]))}"
                                                 for g in used_groups(steps)))
    causes: dict[str, float] = defaultdict(float)
    counts: Counter[str] = Counter()
    for s in steps:
        for g in s.gaps:
            causes[gap_key(g)] += g.us
            counts[gap_key(g)] += 1
    if causes:
        lines.append("  idle in gaps by engine-thread activity (ms per step, gaps):")
        lines += [f"    {ms(us / n)} ({counts[key]}) {key}" for key, us in sorted(causes.items(), key=lambda kv: -kv[1])[:top]]
    api: dict[str, float] = defaultdict(float)
    calls: Counter[str] = Counter()
    for s in steps:
        for name, us in s.api.items():
            api[name] += us
            calls[name] += s.api_calls[name]
    if api:
        lines.append("  CUDA API on the engine thread per step (ms, calls): " + ", ".join(
            f"{name} {ms(us / n)} ({calls[name] / n:.1f})" for name, us in sorted(api.items(), key=lambda kv: -kv[1])[:top]))
    kernels: dict[str, float] = defaultdict(float)
    for s in steps:
        for key, us in s.kernels.items():
            kernels[key] += us
    by_group: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for key, us in sorted(kernels.items(), key=lambda kv: -kv[1]):
        group, name = key.split("\t", 1)
        by_group[group].append((name, us))
    lines.append("  GPU activity per step by group (ms):")
    lines += [f"    {g}: " + "; ".join(f"{name} {ms(us / n)}" for name, us in by_group[g][:3])
              for g in GROUPS if g in by_group]
    return lines


def format_report(report: Report, steps: bool = True) -> str:
    lines = summary_lines(report)
    if steps and report.steps:
        lines += ["", *step_lines(report)]
    return "\n".join(lines)


def analyze_file(path: str | Path, gap_us: float = 20.0) -> Report:
    return analyze(load_events(path), gap_us, source=Path(path).name)


def trace_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files named, and the profiler traces (``*.pt.trace.json[.gz]``) under the folders named."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*.pt.trace.json*") if q.name.endswith((".json", ".json.gz")))
        elif p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"no trace file or folder {p}")
    return found
