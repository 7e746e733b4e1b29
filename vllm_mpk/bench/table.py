"""The vLLM comparison table of benchmarks/RESULTS.md, made from the rows ``vllm-mpk bench``
writes (JSON lines, see ``vllm_mpk.bench.worker``). Pure functions: no GPU, no vLLM.

For each model (and tensor-parallel size: ``qwen3-8b TP2``) the table uses the rows of the
latest run that measured it, so stock and mpk always come from the same run on the same card(s).
Per model and batch (milliseconds): TPOT and forward time of both impls and their ratios;
lm_head (``compute_logits``: vLLM's GEMV for stock; for mpk next to nothing where the megakernel
runs the lm_head itself, ``logits_in_kernel``, so both impls' ratios compare forward + lm_head);
overhead = TPOT - forward - lm_head, each impl's own, the step's time outside the model's GPU
work (scheduling, input preparation, sampling, host gaps between launches); the floor, TPOT of
stock vLLM with one decoder layer (``floor`` rows), and the ceiling, stock TPOT / floor: the TPOT
speed-up that even a forward taking no time could not pass. With asynchronous scheduling vLLM's
host work overlaps the GPU's, so the overhead column does not say how far TPOT can fall; the
floor does.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

Row = dict[str, Any]
START, END = "<!-- vllm-bench:start -->", "<!-- vllm-bench:end -->"
HEADING = "## vLLM time per output token: stock vs `--model-impl mpk`"
STOCK, MPK, FLOOR = "vllm", "mpk", "floor"
ROW_KEYS = ("run", "model", "impl", "batch")  # in every row vllm-mpk bench writes, error rows too
HOST_BOUND = 1.1  # stock TPOT within 10% of the floor: vLLM's own step sets TPOT
HOST_WAIT_BOUND_MS = 0.05  # the engine waited at most this long a step for the GPU's tokens: the host set the pace
COLUMNS = ("model", "batch", "TPOT vLLM", "TPOT mpk", "TPOT ×", "forward vLLM", "forward mpk", "forward ×",
           "lm_head", "overhead vLLM", "overhead mpk", "floor", "ceiling ×", "card")


def read_rows(path: Path, keys: Collection[str] = ROW_KEYS) -> list[Row]:
    """The rows of a JSON-lines file (none if it is absent), each holding ``keys``; ValueError naming
    the file and line otherwise (a hand-edited file, or another command's rows)."""
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): give a rows file") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}: line {number} is not JSON ({e}); remove or repair it") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} is not a row (a JSON object); remove it")
        if missing := sorted(set(keys) - row.keys()):
            raise ValueError(f"{path}: line {number} is not a row of this command (it has no "
                             f"{', '.join(map(repr, missing))}): give the rows file this command wrote")
        rows.append(row)
    return rows


def model_label(model: str, tensor_parallel_size: int) -> str:
    return model if tensor_parallel_size == 1 else f"{model} TP{tensor_parallel_size}"


def label(r: Row) -> str:
    """The row's model and tensor-parallel size (rows from before TP was recorded ran on one GPU)."""
    return model_label(r["model"], r.get("tp", 1))


def latest_rows(rows: Iterable[Row]) -> list[Row]:
    """The rows of each model and batch's latest run (run ids sort by time), in first-seen order: a
    run of fewer batches replaces only those, and stock and mpk of a line always share a run."""
    rows = list(rows)
    latest: dict[tuple[str, int], str] = {}
    for r in rows:
        key = (label(r), r["batch"])
        latest[key] = max(latest.get(key, r["run"]), r["run"])
    return [r for r in rows if r["run"] == latest[label(r), r["batch"]]]


def drawn(rows: list[Row]) -> list[Row]:
    """The rows the table uses: no error, and a floor row only where its KV cache had the same
    number of blocks as its stock engine's (the runner sizes it so; a floor with one decoder
    layer's cache of all the free memory holds ~30x the tokens and its host step ran slower)."""
    ok = [r for r in rows if "error" not in r]
    stock = keyed(r for r in ok if r["impl"] == STOCK)
    return [r for r in ok if r["impl"] != FLOOR or
            (r.get("kv_blocks") and r["kv_blocks"] == stock.get((label(r), r["batch"], STOCK), {}).get("kv_blocks"))]


def ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def ratio(num: float | None, den: float | None) -> str:
    return "—" if num is None or not den else f"{num / den:.2f}×"


def overhead_ms(r: Row | None, lm_head: float | None) -> float | None:
    if r is None or r.get("forward_ms") is None or lm_head is None:
        return None
    return r["tpot_ms"] - r["forward_ms"] - lm_head


def overhead_cell(r: Row | None, lm_head: float | None) -> str:
    over = overhead_ms(r, lm_head)
    return "—" if over is None or r is None else f"{over:.2f} ({over / r['tpot_ms']:.0%})"


def table_line(model: str, batch: int, stock: Row | None, mpk: Row | None, floor: Row | None = None) -> str:
    def get(r: Row | None, key: str) -> Any:
        return None if r is None else r.get(key)

    lm_s, lm_m = get(stock, "lm_head_ms"), get(mpk, "lm_head_ms")
    tpot_s, fwd_s, tpot_floor = get(stock, "tpot_ms"), get(stock, "forward_ms"), get(floor, "tpot_ms")
    gpu_s, gpu_m = (None if r is None else gpu_step_ms(r) for r in (stock, mpk))
    cells = [model, str(batch), ms(tpot_s), ms(get(mpk, "tpot_ms")), ratio(tpot_s, get(mpk, "tpot_ms")),
             ms(fwd_s), ms(get(mpk, "forward_ms")), ratio(gpu_s, gpu_m), lm_head_cell(lm_s, lm_m),
             overhead_cell(stock, lm_s), overhead_cell(mpk, lm_m), ms(tpot_floor), ratio(tpot_s, tpot_floor),
             (get(stock, "gpu") or get(mpk, "gpu") or "—").removeprefix("NVIDIA ")]
    return "| " + " | ".join(cells) + " |"


def lm_head_cell(stock: float | None, mpk: float | None) -> str:
    """Stock's lm_head, and mpk's after it where they differ (the megakernel ran its own)."""
    if stock is None or mpk is None or abs(stock - mpk) < 0.01:
        return ms(stock if stock is not None else mpk)
    return f"{ms(stock)} / {ms(mpk)}"


def distinct(rows: list[Row], key: str) -> str:
    return " / ".join(dict.fromkeys(str(r[key]) for r in rows if key in r))


MEDIAN_FIELDS = ("tpot_ms", "forward_ms", "lm_head_ms", "host_period_ms", "host_output_wait_ms")


def median_row(rows: list[Row]) -> Row:
    """One engine's rounds (``vllm-mpk bench --rounds``) as one row: each time the median over them."""
    merged = {**rows[-1], "rounds": len(rows)}
    for field in MEDIAN_FIELDS:
        values = [r[field] for r in rows if r.get(field) is not None]
        merged[field] = statistics.median(values) if values else None
    return merged


def keyed(rows: Iterable[Row]) -> dict[tuple[str, int, str], Row]:
    """Rows by (model label, batch, impl), an engine's rounds merged (``median_row``)."""
    groups: dict[tuple[str, int, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((label(r), r["batch"], r["impl"]), []).append(r)
    return {key: group[0] if len(group) == 1 else median_row(group) for key, group in groups.items()}


def overhead_note(ok: list[Row]) -> str:
    """How much of the step vLLM's own work takes: from the floor rows where measured (the TPOT
    stock vLLM keeps with one decoder layer), else the stock rows' time outside the forward."""
    by_key = keyed(ok)
    merged = list(by_key.values())
    pairs = [(r, by_key[label(r), r["batch"], STOCK]) for r in merged
             if r["impl"] == FLOOR and (label(r), r["batch"], STOCK) in by_key]
    if pairs:
        shares = [f["tpot_ms"] / s["tpot_ms"] for f, s in pairs]
        text = (f"vLLM's per-step floor (stock vLLM with one decoder layer: scheduling, inputs, lm_head, sampling, "
                f"one layer) is {min(f['tpot_ms'] for f, _ in pairs):.2f}–{max(f['tpot_ms'] for f, _ in pairs):.2f} "
                f"ms, {min(shares):.0%}–{max(shares):.0%} of stock TPOT.")
        bound = [(f, s) for f, s in pairs if s["tpot_ms"] <= HOST_BOUND * f["tpot_ms"]]
        if not bound:
            floor, stock = max(pairs, key=lambda fs: fs[0]["tpot_ms"] / fs[1]["tpot_ms"])
            return (f"{text} It bounds the gain most for {label(stock)} at batch {stock['batch']}: no forward, however "
                    f"fast, takes TPOT there below {floor['tpot_ms']:.2f} ms (ceiling "
                    f"{stock['tpot_ms'] / floor['tpot_ms']:.2f}×).")
        names = ", ".join(f"{label(s)} at batch {s['batch']}" for _, s in bound)
        text += (f" Stock TPOT is within {HOST_BOUND - 1:.0%} of the floor or below it for {names}: there vLLM's own "
                 f"step sets TPOT, not the forward, so a faster forward shows in the forward column and hardly in "
                 f"TPOT.")
        if any(f["tpot_ms"] > s["tpot_ms"] for f, s in bound):
            text += (" A floor above stock TPOT means the host step itself varies between engine processes by more "
                     "than the one-layer engine saves on the GPU.")
        return text
    stock_rows = [(r, overhead_ms(r, r.get("lm_head_ms"))) for r in merged if r["impl"] == STOCK]
    stock_rows = [(r, o) for r, o in stock_rows if o is not None]
    if not stock_rows:
        return "vLLM's per-step overhead was not measured (no stock row with a forward time)."
    shares = [o / r["tpot_ms"] for r, o in stock_rows]
    return (f"Stock TPOT exceeds its forward and lm_head by {min(o for _, o in stock_rows):.2f}–"
            f"{max(o for _, o in stock_rows):.2f} ms ({min(shares):.0%}–{max(shares):.0%} of it). With asynchronous "
            f"scheduling vLLM's host work overlaps the GPU's, so this is not how far TPOT can fall; the floor "
            f"engine (`--impls ... floor`) measures that, and was not run here.")


def gpu_step_ms(r: Row) -> float | None:
    """The GPU's part of a step: forward and lm_head."""
    return None if r.get("forward_ms") is None or r.get("lm_head_ms") is None else r["forward_ms"] + r["lm_head_ms"]


def host_note(ok: list[Row]) -> str | None:
    """The rows where mpk's engine hardly ever waited for the GPU (``host_output_wait_ms``, the
    step timer's host clock): there vLLM's host step sets TPOT, whatever the kernel's time. None
    where no row is host-bound or the rows predate the host timings."""
    by_key = keyed(ok)
    bound = [r for r in by_key.values() if r["impl"] == MPK and r.get("host_output_wait_ms") is not None
             and r["host_output_wait_ms"] <= HOST_WAIT_BOUND_MS and r.get("host_period_ms")
             and gpu_step_ms(r) is not None]
    if not bound:
        return None
    parts = []
    for r in bound:
        stock = by_key.get((label(r), r["batch"], STOCK)) or {}
        theirs = f" (stock {stock['host_period_ms']:.2f})" if stock.get("host_period_ms") else ""
        parts.append(f"{label(r)} batch {r['batch']}: host step {r['host_period_ms']:.2f} ms{theirs}, GPU step "
                     f"{gpu_step_ms(r):.2f} ms")
    generations = " / ".join(dict.fromkeys(str(r.get("timed_generations", 1)) for r in bound))
    return (f"Host-bound under mpk (the engine waited at most {HOST_WAIT_BOUND_MS} ms a step for the GPU's tokens; "
            f"medians over {generations} timed generation(s)): {'; '.join(parts)}. There vLLM's host step (input "
            "preparation and the graph launch, sampling, scheduling and output handling) sets TPOT and the GPU "
            "idles for the rest of it: the megakernel's shorter GPU step does not show in TPOT, only the host work "
            "it saves (one graph node to launch instead of one per kernel, and no attention metadata to build).")


# The host's step and its parts (``StepTimer``), as columns of ``host_table``; a column no row has is left out.
HOST_COLUMNS = (("host step", "host_period_ms"), ("execute_model", "host_execute_ms"),
                ("inputs", "host_prepare_inputs_ms"), ("tables, slots", "host_prepare_attn_ms"),
                ("attn metadata", "host_attn_metadata_ms"), ("graph launch", "host_graph_launch_ms"),
                ("sample_tokens", "host_sample_ms"), ("sample", "host_sample_call_ms"),
                ("compute_logits", "host_compute_logits_ms"), ("postprocess", "host_postprocess_ms"),
                ("wait for GPU", "host_output_wait_ms"))


def host_table(ok: list[Row]) -> list[str]:
    """Where each engine's host step goes, stock above mpk per model and batch, beside the GPU's
    step; no lines for rows from before the host was timed."""
    by_key = keyed(ok)
    timed = {key: r for key, r in by_key.items() if r.get("host_period_ms") is not None and r["impl"] in (STOCK, MPK)}
    if not timed:
        return []
    columns = [(name, key) for name, key in HOST_COLUMNS if any(r.get(key) is not None for r in timed.values())]
    lines = ["The host's step and its parts (medians on the host's clock; a part's median is over its own calls, so "
             "the parts need not add up), beside the GPU's step (forward + lm_head):", "",
             "| model | batch | impl | " + " | ".join(name for name, _ in columns) + " | GPU step |",
             "|" + "---|" * (len(columns) + 4)]
    for model in dict.fromkeys(m for m, _, _ in timed):
        for batch in sorted({b for m, b, _ in timed if m == model}):
            for impl in (STOCK, MPK):
                r = timed.get((model, batch, impl))
                if r is None:
                    continue
                lines.append(f"| {model} | {batch} | {impl} | " + " | ".join(ms(r.get(key)) for _, key in columns)
                             + f" | {ms(gpu_step_ms(r))} |")
    return lines


def method_note(rows: list[Row]) -> str:
    """How each run started its engines: one after the other, or side by side (``--side-by-side``)."""
    modes: dict[str, set[bool]] = {}
    for r in rows:
        modes.setdefault(r["run"], set()).add(r.get("side_by_side", 1) > 1)
    together = [run for run, side in modes.items() if True in side]
    apart = [run for run, side in modes.items() if False in side]
    side_by_side = ("a model's engines side by side in one process (each on an equal share of the GPU's memory), "
                    "their TPOT repeats interleaved")
    one_by_one = "each engine in its own process, one model's in turn"
    if not together:
        return one_by_one[0].upper() + one_by_one[1:]
    if not apart:
        return side_by_side[0].upper() + side_by_side[1:]
    return f"Runs {', '.join(together)}: {side_by_side}; runs {', '.join(apart)}: {one_by_one}"


def settings_note(ok: list[Row]) -> str | None:
    """Per impl, whether vLLM scheduled asynchronously (which hides most of its per-step work
    behind the GPU) and its attention backend; None for rows from before they were recorded."""
    parts = []
    for impl in (STOCK, MPK):
        rows = [r for r in ok if r["impl"] == impl and "async_scheduling" in r]
        if rows:
            scheduling = " / ".join(dict.fromkeys("on" if r["async_scheduling"] else "off" for r in rows))
            parts.append(f"{impl}: async scheduling {scheduling}, attention {distinct(rows, 'attention_backend')}")
    return "Engine settings: " + "; ".join(parts) + "." if parts else None


def render(rows: Iterable[Row]) -> str:
    """The markdown between the markers: settings, card and date, table, overhead note, failures."""
    rows = latest_rows(rows)
    ok = drawn(rows)
    if not rows:
        return "No vLLM benchmark rows yet: run `vllm-mpk bench` on a GPU."
    by_key = keyed(ok)
    rounds = sorted({r.get("rounds", 1) for r in by_key.values()})
    method = method_note(list(by_key.values()))
    if rounds != [1]:
        method += f"; {' / '.join(map(str, rounds))} such rounds, each time the median over them"
    lines = [f"Card: {distinct(ok, 'gpu') or '—'}; run {distinct(rows, 'run')}. Dummy weights (vLLM's "
             f"`load_format=\"dummy\"` on the shipped configs), prompts of {distinct(ok, 'prompt_len')} tokens, "
             f"{distinct(ok, 'new_tokens')} greedy tokens with EOS ignored, TPOT median of "
             f"{distinct(ok, 'repeats')}; compilation: {distinct(ok, 'compilation')}. {method}. "
             "Milliseconds.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for model in dict.fromkeys(label(r) for r in rows):
        for batch in sorted({r["batch"] for r in rows if label(r) == model}):
            lines.append(table_line(model, batch, *(by_key.get((model, batch, impl)) for impl in (STOCK, MPK, FLOOR))))
    settings, host, host_lines = settings_note(ok), host_note(ok), host_table(ok)
    lines += ["", overhead_note(ok), *(["", host] if host else []), *(["", *host_lines] if host_lines else []),
              *(["", settings] if settings else []), "",
              "forward: GPU time of the decode step's CUDA-graph replay (embedding to final norm; for mpk with "
              "`logits_in_kernel`, the lm_head too). lm_head: `compute_logits` (stock / mpk where they differ). "
              "forward ×: stock's forward + lm_head over mpk's. overhead = TPOT − forward − lm_head, each impl's own "
              "(share of that TPOT). floor: TPOT of stock "
              "vLLM with one decoder layer; ceiling: stock TPOT over the floor, the most any forward could gain."]
    failures = [f"- {label(r)} {r['impl']} batch {r['batch']}: {r['error']}" for r in rows if "error" in r]
    if failures:
        lines += ["", "Failed:", *failures]
    return "\n".join(lines)


def replace_section(document: str, body: str, markers: tuple[str, str] = (START, END), heading: str = HEADING) -> str:
    """``document`` with the text between the ``markers`` replaced by ``body``; the section
    (``heading`` and markers) is appended when the markers are missing."""
    start, end = markers
    section = f"{start}\n{body}\n{end}"
    if start in document and end in document.split(start, 1)[1]:
        head, rest = document.split(start, 1)
        return head + section + rest.split(end, 1)[1]
    return document.rstrip("\n") + f"\n\n{heading}\n\n{section}\n"


def write_section(results: Path, body: str, markers: tuple[str, str] = (START, END), heading: str = HEADING) -> None:
    """Put ``body`` between the ``markers`` of ``results`` (created if missing)."""
    document = results.read_text() if results.exists() else "# Results\n"
    results.write_text(replace_section(document, body, markers, heading))


def update_results(results: Path, rows: Iterable[Row]) -> str:
    """Rewrite the section of ``results`` (created if missing) from ``rows``; returns the body."""
    body = render(rows)
    write_section(results, body)
    return body
