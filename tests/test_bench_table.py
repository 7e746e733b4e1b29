"""``vllm-mpk bench`` without a GPU: the RESULTS.md table drawn from JSON rows, the section
rewrite, the command's arguments, the engine arguments, a worker process that fails and an
interrupted run."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import pytest

from vllm_mpk import cli
from vllm_mpk.bench import runner, worker
from vllm_mpk.bench.runner import gpu_lanes, run_engine, run_engines, worker_command
from vllm_mpk.bench.table import END, START, latest_rows, read_rows, render, replace_section
from vllm_mpk.bench.worker import FAST_COMPILATION, EngineConfig, configs_from_json, engine_kwargs, model_dir

HANG_BOUND_S = 300  # only a run that hangs gets near it: the waits of these tests end on events

COMMON = {"gpu": "NVIDIA H100 80GB HBM3", "prompt_len": 128, "new_tokens": 257, "repeats": 3,
          "compilation": "mode 0, FULL_DECODE_ONLY", "engine_s": 40.0, "process_s": 60.0, "graph_tokens": [1],
          "kv_blocks": 25000}


def row(model: str, impl: str, batch: int, tpot: float, forward: float | None, lm_head: float | None,
        run: str = "2026-11-27T10:00:00Z") -> dict:
    return {"model": model, "impl": impl, "batch": batch, "tpot_ms": tpot, "tpot_samples_ms": [tpot] * 3,
            "forward_ms": forward, "lm_head_ms": lm_head, "run": run, **COMMON}


ROWS = [
    row("qwen3-0.6b", "vllm", 1, 9.0, 9.0, 9.0, run="2026-11-26T09:00:00Z"),  # an older run: not drawn
    row("qwen3-0.6b", "vllm", 1, 1.60, 0.90, 0.10),
    row("qwen3-0.6b", "mpk", 1, 1.20, 0.50, 0.10),
    row("qwen3-0.6b", "vllm", 8, 1.80, 1.20, 0.20),
    row("qwen3-0.6b", "mpk", 8, 2.00, 1.40, 0.20),
    row("qwen3-8b", "vllm", 1, 6.70, 6.00, 0.30),
    {"model": "qwen3-8b", "impl": "mpk", "batch": 1, "error": "exit 1: MpkFallbackError: no",
     "run": "2026-11-27T10:00:00Z"},
]


def table_cells(markdown: str, model: str, batch: int) -> list[str]:
    (line,) = [ln for ln in markdown.splitlines() if ln.startswith(f"| {model} | {batch} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def floor_row(batch: int, tpot: float, **extra: object) -> dict:
    """A floor engine's row with its stock engine's KV cache size."""
    return {**row("qwen3-0.6b", "floor", batch, tpot, 0.05, 0.10), "kv_blocks": 25000, **extra}


def test_latest_run_per_model_is_drawn() -> None:
    latest = latest_rows(ROWS)
    assert all(r["run"] == "2026-11-27T10:00:00Z" for r in latest) and len(latest) == len(ROWS) - 1


def test_a_run_of_fewer_batches_replaces_only_those() -> None:
    older = [row("qwen3-0.6b", impl, 16, t, 1.7, 0.1, run="2026-11-26T09:00:00Z") for impl, t in (("vllm", 1.9),
                                                                                                   ("mpk", 2.1))]
    md = render(ROWS + older)
    assert table_cells(md, "qwen3-0.6b", 16)[2:5] == ["1.90", "2.10", "0.90×"]  # the older run's bs16 pair
    assert table_cells(md, "qwen3-0.6b", 1)[2] == "1.60"  # bs1 from the newer run


def test_a_floor_without_the_stock_kv_cache_size_is_not_drawn() -> None:
    """A floor whose KV cache is not its stock engine's size (one layer's cache of all the free
    memory, or a row from before the size was recorded) leaves the floor columns empty."""
    own_pool = floor_row(1, 0.80, kv_blocks=1_016_181)
    md = render([*ROWS, own_pool, floor_row(8, 1.50)])
    assert table_cells(md, "qwen3-0.6b", 1)[11:13] == ["—", "—"]
    assert table_cells(md, "qwen3-0.6b", 8)[11:13] == ["1.50", "1.20×"]
    unrecorded = {k: v for k, v in floor_row(1, 0.80).items() if k != "kv_blocks"}
    md = render([*ROWS, unrecorded, floor_row(8, 1.50)])
    assert table_cells(md, "qwen3-0.6b", 1)[11:13] == ["—", "—"]
    assert table_cells(md, "qwen3-0.6b", 8)[11:13] == ["1.50", "1.20×"]


def test_tensor_parallel_rows_are_their_own_lines_with_their_own_latest_run() -> None:
    tp2 = [{**row("qwen3-8b", impl, 1, tpot, tpot - 0.5, 0.3, run="2026-11-28T10:00:00Z"), "tp": 2}
           for impl, tpot in (("vllm", 4.0), ("mpk", 3.2))]
    md = render(ROWS + tp2)
    assert table_cells(md, "qwen3-8b TP2", 1)[:5] == ["qwen3-8b TP2", "1", "4.00", "3.20", "1.25×"]
    assert table_cells(md, "qwen3-8b", 1)[2] == "6.70"  # the one-GPU line keeps its own (older) run


def test_table_has_ratios_overhead_and_ceiling() -> None:
    md = render(ROWS)
    assert table_cells(md, "qwen3-0.6b", 1) == ["qwen3-0.6b", "1", "1.60", "1.20", "1.33×", "0.90", "0.50", "1.67×",
                                                "0.10", "0.60 (38%)", "0.60 (50%)", "—", "—", "H100 80GB HBM3"]
    assert table_cells(md, "qwen3-0.6b", 8)[4] == "0.90×"  # slower is shown as such
    # the failed mpk engine leaves dashes in its columns and a line under the table
    assert table_cells(md, "qwen3-8b", 1) == ["qwen3-8b", "1", "6.70", "—", "—", "6.00", "—", "—", "0.30",
                                              "0.40 (6%)", "—", "—", "—", "H100 80GB HBM3"]
    assert "- qwen3-8b mpk batch 1: exit 1: MpkFallbackError: no" in md
    assert "NVIDIA H100 80GB HBM3" in md and "2026-11-27T10:00:00Z" in md and "9.00" not in md
    # without floor rows the note gives the time outside the forward and says it is no bound
    assert "0.40–0.60 ms (6%–38% of it)" in md and "was not run here" in md


def test_a_megakernel_running_its_own_lm_head_is_compared_forward_and_lm_head() -> None:
    """With logits_in_kernel the mpk forward holds the lm_head and its compute_logits does almost
    nothing: the forward ratio compares forward + lm_head, and each overhead subtracts its own."""
    rows = [row("qwen3-0.6b", "vllm", 1, 1.60, 0.90, 0.10, run="2026-11-29T10:00:00Z"),
            row("qwen3-0.6b", "mpk", 1, 1.20, 0.60, 0.0, run="2026-11-29T10:00:00Z")]
    cells = table_cells(render(rows), "qwen3-0.6b", 1)
    assert cells[5:11] == ["0.90", "0.60", "1.67×", "0.10 / 0.00", "0.60 (38%)", "0.60 (50%)"]


def test_floor_rows_give_the_ceiling() -> None:
    """The floor engine's TPOT (stock with one decoder layer) bounds what any forward can gain."""
    md = render([*ROWS, floor_row(1, 0.80), floor_row(8, 1.50)])
    assert table_cells(md, "qwen3-0.6b", 1)[11:13] == ["0.80", "2.00×"]
    assert table_cells(md, "qwen3-0.6b", 8)[11:13] == ["1.50", "1.20×"]
    assert table_cells(md, "qwen3-8b", 1)[11:13] == ["—", "—"]  # no floor engine for this model
    assert "is 0.80–1.50 ms, 50%–83% of stock TPOT" in md
    assert "qwen3-0.6b at batch 8" in md and "below 1.50 ms (ceiling 1.20×)" in md
    assert "| qwen3-0.6b floor |" not in md and "floor batch" not in md  # floor rows are columns, not lines


def test_floor_near_or_above_stock_says_the_host_step_sets_tpot() -> None:
    """Where stock TPOT is within 10% of the floor (or below it, the host step varying between
    processes), the note names those rows instead of promising a bound."""
    md = render([*ROWS, floor_row(1, 0.80), floor_row(8, 1.90)])  # stock TPOT at bs8 is 1.80
    assert table_cells(md, "qwen3-0.6b", 8)[11:13] == ["1.90", "0.95×"]
    assert "within 10% of the floor or below it for qwen3-0.6b at batch 8:" in md
    assert "qwen3-0.6b at batch 1:" not in md and "varies between engine processes" in md
    assert "no forward, however fast" not in md


def test_engine_settings_are_noted_when_recorded() -> None:
    assert "Engine settings" not in render(ROWS)
    rows = [{**r, "async_scheduling": r["impl"] == "vllm", "attention_backend": "FLASH_ATTN"} for r in ROWS]
    assert ("Engine settings: vllm: async scheduling on, attention FLASH_ATTN; mpk: async scheduling off, "
            "attention FLASH_ATTN.") in render(rows)


def test_missing_forward_time_is_a_dash() -> None:
    md = render([row("llama-3.2-1b", "vllm", 16, 1.7, None, None), row("llama-3.2-1b", "mpk", 16, 1.5, None, None)])
    assert table_cells(md, "llama-3.2-1b", 16)[2:6] == ["1.70", "1.50", "1.13×", "—"]
    assert "not measured" in md


def test_section_is_replaced_in_place_or_appended() -> None:
    doc = f"# Results\n\nbefore\n\n{START}\nold table\n{END}\n\nafter\n"
    new = replace_section(doc, "new table")
    assert new == f"# Results\n\nbefore\n\n{START}\nnew table\n{END}\n\nafter\n"
    appended = replace_section("# Results\n\ntext\n", "body")
    assert appended.startswith("# Results\n\ntext\n\n## ") and appended.endswith(f"{START}\nbody\n{END}\n")
    assert replace_section(appended, "body 2").count(START) == 1


def test_bench_arguments_parse() -> None:
    args = cli.build_parser().parse_args(["bench", "--models", "Qwen3-0.6B", "llama-3.1-8b", "--batches", "1", "8",
                                          "--impls", "mpk", "--timeout", "120", "--vllm-compile"])
    assert args.models == ["qwen3-0.6b", "llama-3.1-8b"] and args.batches == [1, 8] and args.impls == ["mpk"]
    assert args.timeout == 120 and args.vllm_compile and not args.table_only
    defaults = cli.build_parser().parse_args(["bench"])
    assert defaults.models is None  # cmd_bench then takes single_gpu_models()
    assert defaults.batches == [1, 8, 16] and defaults.impls == ["vllm", "mpk", "floor"]
    assert defaults.results == Path("benchmarks/RESULTS.md") and defaults.gpu_memory_utilization == 0.85
    assert defaults.rounds == 1
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--impls", "transformers"])


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_bench_table_only_redraws_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows, results = tmp_path / "rows.jsonl", tmp_path / "RESULTS.md"
    write_rows(rows, ROWS)
    results.write_text("# Results\n\nkept\n")
    assert cli.main(["bench", "--table-only", "--rows", str(rows), "--results", str(results)]) == 0
    text = results.read_text()
    assert text.startswith("# Results\n\nkept\n") and "| qwen3-0.6b | 1 | 1.60 | 1.20 | 1.33× |" in text
    assert "| qwen3-0.6b | 1 |" in capsys.readouterr().out


def test_bench_runs_one_engine_per_model_and_impl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[EngineConfig] = []

    def fake_run_engines(configs: list[EngineConfig], rows_path: Path, *args: object, **kwargs: object) -> list[dict]:
        assert kwargs["rounds"] == 3
        seen.extend(configs)
        new = [row(c.model, c.impl, b, 2.0, 1.0, 0.1) for c in seen for b in c.batches]
        write_rows(rows_path, new)
        return new

    monkeypatch.setattr(cli, "bench_unavailable_reason", lambda: None)
    monkeypatch.setattr(cli, "run_engines", fake_run_engines)
    results = tmp_path / "RESULTS.md"
    assert cli.main(["bench", "--models", "qwen3-0.6b", "qwen3-8b", "--batches", "1", "16", "--repeats", "5",
                     "--rounds", "3", "--rows", str(tmp_path / "r.jsonl"), "--results", str(results)]) == 0
    assert [(c.model, c.impl) for c in seen] == [(m, i) for m in ("qwen3-0.6b", "qwen3-8b")
                                                 for i in ("vllm", "mpk", "floor")]
    assert all(c.batches == (1, 16) and c.repeats == 5 and not c.vllm_compile for c in seen)
    assert "| qwen3-8b | 16 | 2.00 | 2.00 | 1.00× |" in results.read_text()


def test_bench_refuses_unknown_models_and_missing_gpu(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--models", "gpt2"]) == 2
    assert "no shipped config named 'gpt2'" in capsys.readouterr().err
    monkeypatch.setattr(cli, "bench_unavailable_reason", lambda: "torch sees no CUDA device")
    assert cli.main(["bench", "--models", "qwen3-0.6b"]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err


def test_engine_kwargs() -> None:
    stock = engine_kwargs(EngineConfig("qwen3-0.6b", "vllm", batches=(1, 8, 16)), Path("/m"))
    assert stock["model"] == "/m" and stock["load_format"] == "dummy" and stock["max_num_seqs"] == 16
    assert stock["compilation_config"] == FAST_COMPILATION and "additional_config" not in stock
    assert stock["max_model_len"] == 128 + 257 + 16
    mpk = engine_kwargs(EngineConfig("qwen3-0.6b", "mpk", batches=(1, 8), vllm_compile=True), Path("/m"))
    assert mpk["additional_config"] == {"mpk": {"max_batch": 8, "strict": True}}
    assert "compilation_config" not in mpk and mpk["model_impl"] == "mpk"
    assert stock["tensor_parallel_size"] == 1
    tp = engine_kwargs(EngineConfig("qwen3-8b", "mpk", tensor_parallel_size=2), Path("/m"))
    assert tp["tensor_parallel_size"] == 2 and tp["additional_config"]["mpk"]["tensor_parallel"]  # measures the megakernel
    assert "tensor_parallel" not in engine_kwargs(EngineConfig("qwen3-8b", "mpk"), Path("/m"))["additional_config"]["mpk"]
    cfg = EngineConfig("qwen3-8b", "mpk", batches=(1, 16), repeats=5, mpk_options=(("greedy_argmax", True),))
    assert configs_from_json(worker_command([cfg], Path("r.jsonl"))[3]) == [cfg]
    assert engine_kwargs(cfg, Path("/m"))["additional_config"] == {"mpk": {"max_batch": 16, "strict": True,
                                                                           "greedy_argmax": True}}
    moe = engine_kwargs(EngineConfig("qwen3-30b-a3b", "mpk", batches=(1, 8)), Path("/m"))
    assert moe["additional_config"] == {"mpk": {"max_batch": 8, "strict": True, "moe": True}}  # measures the megakernel
    floor = engine_kwargs(EngineConfig("qwen3-0.6b", "floor"), Path("/m"))
    assert floor["model_impl"] == "vllm" and "additional_config" not in floor
    assert "num_gpu_blocks_override" not in floor
    sized = engine_kwargs(EngineConfig("qwen3-0.6b", "floor", kv_blocks=25000), Path("/m"))
    assert sized["num_gpu_blocks_override"] == 25000


def test_model_dir_keeps_the_shipped_config_or_cuts_its_layers(tmp_path: Path) -> None:
    full = json.loads((model_dir("qwen3-0.6b", tmp_path / "a") / "config.json").read_text())
    one = json.loads((model_dir("qwen3-0.6b", tmp_path / "b", layers=1) / "config.json").read_text())
    assert full["num_hidden_layers"] == 28 and one["num_hidden_layers"] == 1
    assert {k: v for k, v in one.items() if k != "num_hidden_layers"} == \
        {k: v for k, v in full.items() if k != "num_hidden_layers"}


def test_a_failing_worker_leaves_error_rows(tmp_path: Path) -> None:
    rows = run_engine([EngineConfig("no-such-model", "vllm", batches=(1, 8))], tmp_path / "w.log", timeout_s=120)
    assert [(r["batch"], r["error"].split(":")[0]) for r in rows] == [(1, "exit 1"), (8, "exit 1")]
    assert "no shipped config named 'no-such-model'" in rows[0]["error"] and rows[0]["process_s"] > 0


def test_the_floor_runs_after_its_stock_engine_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[tuple[str, int | None]] = []

    def fake_run_engine(cfgs: list[EngineConfig], log: Path, timeout_s: float,
                        devices: str | None = None) -> list[dict]:
        (cfg,) = cfgs
        ran.append((cfg.impl, cfg.kv_blocks))
        return [{**row(cfg.model, cfg.impl, b, 1.0, 0.5, 0.1), "kv_blocks": 4321} for b in cfg.batches]

    monkeypatch.setattr(runner, "run_engine", fake_run_engine)
    configs = [EngineConfig("qwen3-0.6b", impl, batches=(1, 8)) for impl in ("floor", "vllm")]
    run_engines(configs, tmp_path / "r.jsonl", tmp_path / "logs", 10.0)
    assert ran == [("vllm", None), ("floor", 4321)]  # given first, run last, with stock's size
    ran.clear()
    rows = run_engines([EngineConfig("qwen3-0.6b", "floor", batches=(1, 8))], tmp_path / "r.jsonl", tmp_path / "logs",
                       10.0)
    assert ran == [] and [r["batch"] for r in rows] == [1, 8]
    assert all("no stock engine of this model reported one" in r["error"] for r in rows)


def test_gpu_lanes_group_gpus_by_tensor_parallel_size() -> None:
    assert gpu_lanes(["0", "1", "2", "3"], 1) == ["0", "1", "2", "3"]
    assert gpu_lanes(["0", "1", "2", "3"], 2) == ["0,1", "2,3"]
    assert gpu_lanes(["4", "5", "6"], 2) == ["4,5"]  # the odd one out stays idle
    with pytest.raises(ValueError, match="1 GPUs cannot hold an engine of tensor-parallel size 2"):
        gpu_lanes(["0"], 2)


def test_engines_run_in_lanes_one_model_per_lane(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each model's engines run in turn on one lane (stock and mpk on one card); lanes overlap:
    the first engine of each lane waits until the other lane's first engine runs too."""
    calls: list[tuple[str, str, str, str | None]] = []
    floor_blocks: dict[str, int | None] = {}
    lock = threading.Lock()
    both_lanes = threading.Barrier(2, timeout=HANG_BOUND_S)

    def fake_run_engine(cfgs: list[EngineConfig], log: Path, timeout_s: float,
                        devices: str | None = None) -> list[dict]:
        (cfg,) = cfgs
        with lock:
            calls.append(("start", cfg.model, cfg.impl, devices))
            if cfg.impl == "floor":
                floor_blocks[cfg.model] = cfg.kv_blocks
            first_of_its_lane = len(calls) <= 2
        if first_of_its_lane:
            both_lanes.wait()
        with lock:
            calls.append(("end", cfg.model, cfg.impl, devices))
        blocks = 1000 + len(cfg.model) if cfg.impl == "vllm" else 7
        return [{**row(cfg.model, cfg.impl, b, 1.0, 0.5, 0.1), "kv_blocks": blocks} for b in cfg.batches]

    monkeypatch.setattr(runner, "run_engine", fake_run_engine)
    models = ("qwen3-0.6b", "llama-3.2-1b", "qwen3-8b")
    configs = [EngineConfig(m, impl, batches=(1, 8)) for m in models for impl in ("vllm", "mpk", "floor")]
    rows = run_engines(configs, tmp_path / "r.jsonl", tmp_path / "logs", 10.0, lanes=["0", "1"])
    assert len(rows) == 18 and len(read_rows(tmp_path / "r.jsonl")) == 18
    assert len({r["run"] for r in rows}) == 1
    for m in models:
        assert len({d for _, model, _, d in calls if model == m}) == 1  # one lane per model
        starts = [impl for kind, model, impl, _ in calls if kind == "start" and model == m]
        assert starts == ["vllm", "mpk", "floor"]
        assert floor_blocks[m] == 1000 + len(m)  # the floor engine's KV cache is its stock engine's size
    assert [kind for kind, *_ in calls[:2]] == ["start", "start"]  # two lanes at once
    assert {d for *_, d in calls} == {"0", "1"}


def test_bench_gpus_make_lanes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    lanes: list[list] = []
    monkeypatch.setattr(cli, "bench_unavailable_reason", lambda: None)
    monkeypatch.setattr(cli, "run_engines", lambda configs, *a, **kw: lanes.append(kw["lanes"]) or [])
    common = ["bench", "--models", "qwen3-8b", "--rows", str(tmp_path / "r.jsonl"), "--results",
              str(tmp_path / "R.md")]
    assert cli.main(common) == 0 and cli.main([*common, "--gpus", "0", "1", "2", "3", "--tensor-parallel-size", "2"]) == 0
    assert lanes == [[None], ["0,1", "2,3"]]
    assert cli.main([*common, "--gpus", "0", "--tensor-parallel-size", "2"]) == 2
    assert "--gpus: 1 GPUs cannot hold an engine of tensor-parallel size 2" in capsys.readouterr().err


def test_rounds_run_a_models_engines_in_turn_each_in_its_own_log(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[tuple[str, str]] = []

    def fake_run_engine(cfgs: list[EngineConfig], log: Path, timeout_s: float,
                        devices: str | None = None) -> list[dict]:
        (cfg,) = cfgs
        ran.append((cfg.impl, log.name))
        return [row(cfg.model, cfg.impl, b, 1.0, 0.5, 0.1) for b in cfg.batches]

    monkeypatch.setattr(runner, "run_engine", fake_run_engine)
    configs = [EngineConfig("qwen3-0.6b", impl, batches=(1,)) for impl in ("vllm", "mpk", "floor")]
    rows = run_engines(configs, tmp_path / "r.jsonl", tmp_path / "logs", 10.0, rounds=2)
    assert [impl for impl, _ in ran] == ["vllm", "mpk", "floor", "vllm", "mpk", "floor"]
    assert len({log for _, log in ran}) == 6
    assert [r["round"] for r in rows] == [0, 0, 0, 1, 1, 1] and len({r["run"] for r in rows}) == 1


def test_the_table_takes_each_times_median_over_an_engines_rounds() -> None:
    rounds = [{**row("qwen3-0.6b", "vllm", 1, tpot, fwd, 0.1), "round": i}
              for i, (tpot, fwd) in enumerate([(1.6, 1.0), (2.2, 1.1), (1.7, 0.9)])]
    rounds += [{**row("qwen3-0.6b", "mpk", 1, tpot, 0.5, 0.1), "round": i} for i, tpot in enumerate([1.2, 1.6, 1.3])]
    table = render(rounds)
    cells = table_cells(table, "qwen3-0.6b", 1)
    assert cells[2:8] == ["1.70", "1.30", "1.31×", "1.00", "0.50", "1.83×"]  # forward + lm_head: 1.1 / 0.6
    assert "Each engine in its own process, one model's in turn; 3 such rounds, each time the median" in table
    assert "Each engine in its own process, one model's in turn." in render(ROWS)


def test_host_bound_rows_are_named_with_their_host_and_gpu_steps() -> None:
    host = {"host_period_ms": 2.1, "host_output_wait_ms": 0.01}
    rows = [{**row("qwen3-0.6b", "vllm", 1, 2.4, 1.5, 0.1), **host, "host_period_ms": 2.6},
            {**row("qwen3-0.6b", "mpk", 1, 2.2, 1.2, 0.1), **host},
            {**row("qwen3-8b", "vllm", 1, 6.9, 6.6, 0.2), "host_period_ms": 6.9, "host_output_wait_ms": 4.0},
            {**row("qwen3-8b", "mpk", 1, 6.5, 6.2, 0.2), "host_period_ms": 6.5, "host_output_wait_ms": 3.9}]
    table = render(rows)
    assert "qwen3-0.6b batch 1: host step 2.10 ms (stock 2.60), GPU step 1.30 ms" in table
    assert "qwen3-8b batch 1: host" not in table  # its engine waited for the GPU: the kernel set the pace
    assert "Host-bound" not in render([{k: v for k, v in r.items() if not k.startswith("host_")} for r in rows])


def test_the_host_table_puts_stock_above_mpk_with_the_parts_some_row_has() -> None:
    parts = {"host_period_ms": 2.5, "host_execute_ms": 1.2, "host_sample_ms": 0.9, "host_output_wait_ms": 0.02}
    rows = [{**row("qwen3-0.6b", "mpk", 1, 2.2, 1.2, 0.1), **parts, "host_graph_launch_ms": 0.03},
            {**row("qwen3-0.6b", "vllm", 1, 2.4, 1.5, 0.1), **parts, "host_period_ms": 2.7,
             "host_graph_launch_ms": 0.31},
            row("qwen3-8b", "vllm", 1, 6.9, 6.6, 0.2)]  # from before the host was timed: no line
    table = render(rows)
    assert "| model | batch | impl | host step | execute_model | graph launch | sample_tokens | wait for GPU | GPU step |" \
        in table
    stock = table.index("| qwen3-0.6b | 1 | vllm | 2.70 | 1.20 | 0.31 | 0.90 | 0.02 | 1.60 |")
    assert stock < table.index("| qwen3-0.6b | 1 | mpk | 2.50 | 1.20 | 0.03 | 0.90 | 0.02 | 1.30 |")
    assert "| qwen3-8b | 1 | vllm |" not in table
    assert "host's step and its parts" not in render([r for r in rows if r["model"] == "qwen3-8b"])


def test_side_by_side_runs_a_models_engines_in_one_process_on_shares_of_the_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker process per model and round, its engines on equal shares of the memory budget,
    the floor last (the worker gives it the stock engine's KV cache size); the table says so."""
    ran: list[list[tuple[str, float, int | None]]] = []
    logs: list[str] = []

    def fake_run_engine(cfgs: list[EngineConfig], log: Path, timeout_s: float,
                        devices: str | None = None) -> list[dict]:
        ran.append([(c.impl, c.gpu_memory_utilization, c.kv_blocks) for c in cfgs])
        logs.append(log.name)
        return [{**row(c.model, c.impl, b, 1.0, 0.5, 0.1), "side_by_side": len(cfgs)} for c in cfgs for b in c.batches]

    monkeypatch.setattr(runner, "run_engine", fake_run_engine)
    configs = [EngineConfig("qwen3-0.6b", impl, batches=(1, 8), gpu_memory_utilization=0.9)
               for impl in ("floor", "vllm", "mpk")]
    rows = run_engines(configs, tmp_path / "r.jsonl", tmp_path / "logs", 10.0, rounds=2, side_by_side=True)
    assert ran == [[("vllm", pytest.approx(0.3), None), ("mpk", pytest.approx(0.3), None),
                    ("floor", pytest.approx(0.3), None)]] * 2
    assert logs == ["qwen3-0.6b-vllm+mpk+floor-round0.log", "qwen3-0.6b-vllm+mpk+floor-round1.log"]
    assert len(rows) == 12 and {r["round"] for r in rows} == {0, 1}
    assert "A model's engines side by side in one process" in render(rows)
    ran.clear()
    rows = run_engines([configs[0], configs[2]], tmp_path / "r.jsonl", tmp_path / "logs", 10.0, side_by_side=True)
    assert ran == [[("mpk", pytest.approx(0.9), None)]]  # a floor without its stock engine does not start or share
    assert all("no stock engine of this model reported one" in r["error"] for r in rows if r["impl"] == "floor")


def test_a_side_by_side_process_that_dies_leaves_error_rows_for_what_it_did_not_measure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker wrote stock's batch-1 row, then died: mpk's batch 1 and both engines' batch 8
    get error rows with the log's last line; the measured row stays as it is."""
    measured = json.dumps(row("qwen3-0.6b", "vllm", 1, 2.0, 1.5, 0.1))
    script = (f"import sys; open(sys.argv[1], 'a').write({measured!r} + '\\n'); "
              "print('engine core died'); sys.exit(3)")
    monkeypatch.setattr(runner, "worker_command", lambda cfgs, rows: [sys.executable, "-c", script, str(rows)])
    cfgs = [EngineConfig("qwen3-0.6b", impl, batches=(1, 8)) for impl in ("vllm", "mpk")]
    rows = run_engine(cfgs, tmp_path / "w.log", timeout_s=60)
    assert [(r["impl"], r["batch"], "error" in r) for r in rows] == [
        ("vllm", 1, False), ("vllm", 8, True), ("mpk", 1, True), ("mpk", 8, True)]
    assert all(r["error"].startswith("exit 3: engine core died") for r in rows if "error" in r)


def test_worker_takes_one_config_or_a_list() -> None:
    one = EngineConfig("qwen3-0.6b", "mpk", batches=(1, 8))
    two = [EngineConfig("qwen3-0.6b", "vllm", gpu_memory_utilization=0.4), one]
    assert configs_from_json(json.dumps(asdict(one))) == [one]
    assert configs_from_json(worker_command(two, Path("r.jsonl"))[3]) == two


def test_side_by_side_samples_take_turns_the_first_alternating(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(worker, "generate_s", lambda llm, prompts, tokens: calls.append((llm, tokens)) or 0.1 * tokens)
    samples = worker.tpot_samples_ms(["a", "b"], [], new_tokens=11, repeats=3)
    assert samples == [[pytest.approx(100.0)] * 3] * 2
    assert [llm for llm, tokens in calls if tokens == 11] == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-ups first


FAKE_WORKER = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # the engine core's stand-in
with open(sys.argv[1], "w") as ready:  # a FIFO the test reads: this engine and its core are running
    ready.write(f"{os.getpid()} {child.pid}\\n")
time.sleep(600)
"""

DRIVER = """
import signal, sys
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as at a terminal, though started in the background
from vllm_mpk.bench import runner, worker
from vllm_mpk.bench.worker import EngineConfig
worker, ready, root = sys.argv[1:]
runner.worker_command = lambda cfgs, rows: [sys.executable, worker, ready]
runner.run_engines([EngineConfig("qwen3-0.6b", impl, (1,)) for impl in ("vllm", "mpk", "floor")],
                   Path(root) / "rows.jsonl", Path(root) / "logs", timeout_s=600)
"""


def read_ready_line(ready: int, driver: subprocess.Popen[bytes]) -> str:
    """The first engine's line from the FIFO ``ready``, waiting on it and on the driver's output
    (whose end means the driver died first)."""
    text, output = b"", b""
    while not text.endswith(b"\n"):
        readable, _, _ = select.select([ready, driver.stdout], [], [], HANG_BOUND_S)
        assert readable, f"no engine started within {HANG_BOUND_S} s: {output.decode()}"
        if ready in readable:
            text += os.read(ready, 4096)
        elif not (chunk := os.read(driver.stdout.fileno(), 65536)):
            pytest.fail(f"the driver ended before an engine started:\n{output.decode()}")
        else:
            output += chunk  # a warning; the driver goes on
    return text.decode()


def wait_for_exits(pidfds: list[int]) -> list[int]:
    """Wait until every process exits (a pidfd turns readable then, zombie or reaped); the pidfds
    of those still running after HANG_BOUND_S."""
    running = list(pidfds)
    while running:
        readable, _, _ = select.select(running, [], [], HANG_BOUND_S)
        if not readable:
            break
        running = [fd for fd in running if fd not in readable]
    return running


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_run_leaves_no_engine_running(tmp_path: Path, sig: str) -> None:
    """Ctrl-C or ``timeout``'s SIGTERM on the bench: the running engine's whole process group dies
    and no further engine starts (an orphaned engine core would hold the GPU's memory). Each step
    waits on an event, never on a clock: the engine's line in a FIFO once it and its core run, the
    driver's exit, and pidfds of the engine's processes."""
    (tmp_path / "worker.py").write_text(FAKE_WORKER)
    (tmp_path / "driver.py").write_text(DRIVER)
    os.mkfifo(tmp_path / "ready")
    ready = os.open(tmp_path / "ready", os.O_RDONLY | os.O_NONBLOCK)
    holder = os.open(tmp_path / "ready", os.O_WRONLY)  # an engine closing its end is no end of file
    driver = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "worker.py"),
                               str(tmp_path / "ready"), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pidfds: list[int] = []
    try:
        started = [int(p) for p in read_ready_line(ready, driver).split()]
        assert len(started) == 2, f"{len(started) // 2} engines started at once"
        pidfds = [os.pidfd_open(p) for p in started]  # before the signal: these are the engine's processes
        driver.send_signal(getattr(signal, sig))
        driver.communicate(timeout=HANG_BOUND_S)
        running = wait_for_exits(pidfds)
        for fd in running:  # not to leak them into the rest of the test session
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        assert not running, f"processes of an engine outlived the run: {[started[pidfds.index(fd)] for fd in running]}"
        try:
            later = os.read(ready, 4096).decode()
        except BlockingIOError:  # nothing written since
            later = ""
        assert not later, f"another engine started after the signal: {later!r}"
        assert driver.returncode != 0
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for fd in (ready, holder, *pidfds):
            os.close(fd)


def test_sigterm_raises_exit_only_inside_the_run() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with runner.sigterm_as_exit():
        with pytest.raises(SystemExit) as stopped:
            signal.raise_signal(signal.SIGTERM)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
