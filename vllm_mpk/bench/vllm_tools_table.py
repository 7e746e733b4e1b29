"""The markdown of ``vllm-mpk bench-vllm``'s section of benchmarks/RESULTS.md, from its rows
(``vllm_mpk.bench.vllm_tools``). Pure functions: no GPU, no vLLM.

The section shows each benchmark's latest run: per model and setting, the median over the run's repeats of
stock vLLM and of ``--model-impl mpk``, each one's spread (min–max over the repeats), their ratio
and whether the spreads are apart (the difference is larger than the repeats move), then every
command the run used, so that anyone can run them again.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from pathlib import Path

from vllm_mpk.bench.runner import Row
from vllm_mpk.bench.table import MPK, STOCK, write_section

MARKERS = ("<!-- vllm-tools:start -->", "<!-- vllm-tools:end -->")
ROW_KEYS = ("run", "card", "commit", "bench", "model", "impl", "repeat")  # in every row bench-vllm writes
HEADING = "## vLLM's own benchmarks: stock vs `--model-impl mpk`"
SERVE_METRICS = (("p50_ttft_ms", "TTFT p50 (ms)"), ("p99_ttft_ms", "TTFT p99 (ms)"),
                 ("p50_tpot_ms", "TPOT p50 (ms)"), ("p99_tpot_ms", "TPOT p99 (ms)"),
                 ("p50_itl_ms", "ITL p50 (ms)"), ("p99_itl_ms", "ITL p99 (ms)"),
                 ("output_throughput", "output tokens/s"))
COLUMNS = ("vLLM", "vLLM spread", "mpk", "mpk spread", "mpk / vLLM", "apart")
METHOD = ("vLLM's default settings, each engine in its own process, repeats interleaved between the impls. "
          "Medians over the repeats; spread: min–max over them; apart: the spreads (of two or more repeats) do not overlap.")
PREPARE = ("`vllm-mpk bench-vllm --prepare-models DIR` writes `DIR/<model>` (the shipped config.json and a "
           "tokenizer of the model's vocabulary); `MODEL_DIR=DIR/<model>`. Weights are vLLM's dummy weights.")


def latest_run(rows: Iterable[Row]) -> list[Row]:
    """The rows of the latest run (run ids sort by time)."""
    rows = list(rows)
    last = max((r["run"] for r in rows), default=None)
    return [r for r in rows if r["run"] == last]


def number(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"


def cells(stock: list[float], mpk: list[float]) -> list[str]:
    """Medians, spreads, ratio and whether the spreads are apart; ``n/a`` where an impl has no
    value (or, for apart, fewer than two)."""
    def spread(values: list[float]) -> str:
        return f"{number(min(values))}–{number(max(values))}" if values else "n/a"

    mid = [statistics.median(v) if v else None for v in (stock, mpk)]
    ratio = f"{mid[1] / mid[0]:.3f}" if None not in mid and mid[0] else "n/a"
    apart = ("n/a" if min(len(stock), len(mpk)) < 2  # one value has no spread to compare
             else "yes" if max(stock) < min(mpk) or max(mpk) < min(stock) else "no")
    return [number(mid[0]) if mid[0] is not None else "n/a", spread(stock),
            number(mid[1]) if mid[1] is not None else "n/a", spread(mpk), ratio, apart]


def values(rows: list[Row], impl: str, key: str) -> list[float]:
    return [r[key] for r in rows if r["impl"] == impl and "error" not in r]


def table(rows: list[Row], setting: Callable[[Row], tuple], heads: tuple[str, ...],
          metrics: tuple[tuple[str, str], ...]) -> list[str]:
    """One line per setting (in first-seen order) and metric."""
    metric_head = ("metric",) if len(metrics) > 1 else ()
    head = (*heads, *metric_head, *COLUMNS)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault(setting(r), []).append(r)
    for key, group in groups.items():
        for metric, name in metrics:
            label = (name,) if metric_head else ()
            line = [*map(str, key), *label, *cells(values(group, STOCK, metric), values(group, MPK, metric))]
            lines.append("| " + " | ".join(line) + " |")
    return lines


def failures(rows: list[Row], setting: Callable[[Row], tuple]) -> list[str]:
    return [f"- {r['impl']} {' '.join(map(str, setting(r)))} repeat {r['repeat']}: {r['error']}"
            for r in rows if "error" in r]


def commands(rows: list[Row], keys: tuple[str, ...]) -> list[str]:
    """Every distinct command the rows ran, in order, in a collapsed shell block."""
    seen = list(dict.fromkeys(r[k] for r in rows for k in keys if k in r))
    return ["<details><summary>commands</summary>", "", "```bash", *seen, "```", "", "</details>"]


def latency_section(rows: list[Row]) -> list[str]:
    def setting(r: Row) -> tuple:
        return r["model"], r["batch"], r["input_len"]

    output = rows[0]["output_len"]
    return [f"### `vllm bench latency`: seconds to generate {output} tokens per request (median of vLLM's "
            "iterations)", "", stamp(rows), "", *table(rows, setting, ("model", "batch", "input"), (("latency_s", "latency (s)"),)),
            "", *failures(rows, setting), *commands(rows, ("command",))]


def serve_section(rows: list[Row]) -> list[str]:
    def setting(r: Row) -> tuple:
        return r["model"], r["concurrency"]

    first = rows[0]
    t = first.get("temperature")
    sampling = "the server's default temperature (1.0)" if t is None else f"temperature {t:g}"
    return [f"### `vllm bench serve`: random dataset, {first['input_len']} input and {first['output_len']} output "
            f"tokens per request, {sampling}", "", stamp(rows), "", *table(rows, setting, ("model", "concurrency"), SERVE_METRICS), "",
            *start_table(rows), *failures(rows, setting), *commands(rows, ("server_command", "command"))]


def start_table(rows: list[Row]) -> list[str]:
    """Seconds from ``vllm serve`` to its first healthy answer, per server in repeat order: the
    first start on a machine pays the cold caches (torch.compile's; for mpk, nvcc's), later ones
    restart from them."""
    starts: dict[tuple[str, str], dict[int, float]] = {}
    for r in rows:
        if "server_start_s" in r:
            starts.setdefault((r["model"], r["impl"]), {})[r["repeat"]] = r["server_start_s"]
    if not starts:
        return []
    lines = ["Server start, seconds from `vllm serve` to its first healthy answer, by repeat (the first start "
             "on a machine builds its caches):", "", "| model | impl | start (s) by repeat |", "|---|---|---|"]
    lines += [f"| {model} | {impl} | {', '.join(number(by[k]) for k in sorted(by))} |"
              for (model, impl), by in starts.items()]
    return [*lines, ""]


def stamp(rows: list[Row]) -> str:
    """The card, run, commit and repeats of one benchmark's rows."""
    first = rows[0]
    repeats = max(r["repeat"] for r in rows) + 1
    return f"Card: {first['card']}. Run {first['run']}, commit {first['commit']}, {repeats} repeat(s) per setting."


def render(rows: Iterable[Row]) -> str:
    """The section's markdown: each benchmark's latest run in ``rows``."""
    rows = list(rows)
    sections = []
    for bench, section in (("latency", latency_section), ("serve", serve_section)):
        picked = latest_run(r for r in rows if r["bench"] == bench)
        if picked:
            sections += ["", *section(picked)]
    if not sections:
        return "No run yet: `vllm-mpk bench-vllm` on a Hopper GPU fills this section."
    return "\n".join([METHOD, "", PREPARE, *sections])


def update_results(results: Path, rows: Iterable[Row]) -> str:
    """Rewrite the section of ``results`` (created if missing) from ``rows``; returns the body."""
    body = render(rows)
    write_section(results, body, MARKERS, HEADING)
    return body
