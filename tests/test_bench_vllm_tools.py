"""``vllm-mpk bench-vllm`` on the CPU: the offline tokenizer, the command lines under vLLM 0.26's
own parsers, its result files, the tables, and the runner end to end against a fake ``vllm``."""

from __future__ import annotations

import http.server
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import assert_one_line_usage_error
from vllm_mpk.bench import vllm_tools
from vllm_mpk.bench.offline_tokenizer import offline_tokenizer, prepare_model_dir
from vllm_mpk.bench.vllm_tools import (
    Settings,
    bench_serve_args,
    latency_args,
    latency_result,
    mpk_args,
    serve_args,
    serve_result,
)
from vllm_mpk.bench.vllm_tools_table import MARKERS, render, update_results
from vllm_mpk.bench.worker import mpk_engine_options
from vllm_mpk.cli import main
from vllm_mpk.integration.options import MpkOptions
from vllm_mpk.integration.plugin import READY_MESSAGE
from vllm_mpk.models.catalog import shipped_config

# Shaped like vLLM 0.26's files: vllm/benchmarks/latency.py main() writes avg_latency, latencies and
# percentiles (a dict of the percentages 10..99, integer keys that JSON makes strings);
# vllm/benchmarks/serve.py benchmark() and main() write the run's setup, the throughputs and, per
# --percentile-metrics and --metric-percentiles, mean_/median_/std_/p<N>_<metric>_ms.
LATENCY_JSON = {"avg_latency": 2.05, "latencies": [2.0, 2.1, 2.05],
                "percentiles": {"10": 2.0, "25": 2.02, "50": 2.04, "75": 2.08, "90": 2.09, "99": 2.1}}
SERVE_JSON = {
    "date": "20261207-050000", "endpoint_type": "vllm", "backend": "vllm", "label": None, "model_id": "m",
    "tokenizer_id": "m", "num_prompts": 16, "request_rate": "inf", "burstiness": 1.0, "max_concurrency": 4,
    "duration": 10.0, "completed": 16, "failed": 0, "total_input_tokens": 16384, "total_output_tokens": 4096,
    "request_throughput": 1.6, "request_goodput": None, "output_throughput": 409.6, "total_token_throughput": 2048.0,
    "max_output_tokens_per_s": 500.0, "max_concurrent_requests": 4, "rtfx": 0.0,
    **{f"{stat}_{m}_ms": 1.0 for stat in ("mean", "median", "std") for m in ("ttft", "tpot", "itl")},
    "p50_ttft_ms": 30.0, "p99_ttft_ms": 60.0, "p50_tpot_ms": 5.0, "p99_tpot_ms": 6.0,
    "p50_itl_ms": 5.0, "p99_itl_ms": 9.0,
}
MODEL = "qwen3-0.6b"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_model_dir(MODEL, tmp_path_factory.mktemp("models"))


# the tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_has_the_model_vocabulary_and_round_trips(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    config = shipped_config(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.vocab_size == len(tokenizer) == config["vocab_size"]
    assert tokenizer.eos_token_id == config["eos_token_id"]
    ids = [random.Random(0).randrange(config["vocab_size"]) for _ in range(500)]
    assert tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False) == ids
    assert (model_dir / "config.json").is_file()


def test_tokenizer_takes_the_first_of_several_eos_ids_and_refuses_one_outside_the_vocabulary() -> None:
    assert offline_tokenizer({"vocab_size": 50, "eos_token_id": [7, 8]}).eos_token_id == 7
    assert offline_tokenizer({"vocab_size": 50}).eos_token is None
    with pytest.raises(ValueError, match="outside the vocabulary of 50"):
        offline_tokenizer({"vocab_size": 50, "eos_token_id": 50})


def test_vllm_random_dataset_samples_prompts_of_the_asked_length(model_dir: Path) -> None:
    from vllm.benchmarks.datasets import RandomDataset
    from vllm.tokenizers import get_tokenizer

    tokenizer = get_tokenizer(str(model_dir))  # as vllm bench serve loads it
    assert tokenizer.vocab_size == shipped_config(MODEL)["vocab_size"]
    requests = RandomDataset(random_seed=0).sample(tokenizer, num_requests=4, input_len=128, output_len=16,
                                                   range_ratio=0.0)
    assert len(requests) == 4
    for r in requests:
        assert r.prompt_len == 128 and r.expected_output_len == 16
        assert len(tokenizer.encode(r.prompt, add_special_tokens=False)) == 128


# command lines under vLLM's own parsers ---------------------------------------------------------


def test_latency_arguments_parse_with_vllm_bench_latency(vllm_parser) -> None:
    from vllm.benchmarks.latency import add_cli_args

    args = vllm_parser(add_cli_args).parse_args(latency_args("/m", "mpk", 64, 2048, 256, "/o.json"))
    assert (args.model, args.load_format, args.model_impl) == ("/m", "dummy", "mpk")
    assert (args.batch_size, args.input_len, args.output_len, args.output_json) == (64, 2048, 256, "/o.json")
    assert args.additional_config == {"mpk": {"max_batch": 32, "strict": True}}  # the largest plan there is
    stock = vllm_parser(add_cli_args).parse_args(latency_args("/m", "vllm", 8, 128, 256, "/o.json"))
    assert stock.model_impl == "vllm" and not stock.additional_config
    assert (stock.num_iters, stock.num_iters_warmup) == (30, 10)  # vLLM's, unless given
    fewer = vllm_parser(add_cli_args).parse_args(latency_args("/m", "vllm", 8, 128, 256, "/o.json", 5, 0))
    assert (fewer.num_iters, fewer.num_iters_warmup) == (5, 0)


def test_server_arguments_parse_with_vllm_serve(vllm_parser) -> None:
    from vllm.entrypoints.openai.cli_args import make_arg_parser

    args = vllm_parser(make_arg_parser).parse_args(serve_args("/m", "mpk", 8123, 16))
    assert (args.model_tag, args.load_format, args.model_impl, args.port) == ("/m", "dummy", "mpk", 8123)
    assert args.additional_config == {"mpk": {"max_batch": 16, "strict": True}}
    opted = vllm_parser(make_arg_parser).parse_args(serve_args("/m", "mpk", 8123, 16, {"greedy_argmax": True}))
    assert opted.additional_config == {"mpk": {"max_batch": 16, "strict": True, "greedy_argmax": True}}


def test_the_mpk_engine_opts_in_to_moe_and_takes_more_options() -> None:
    """What is measured is the megakernel: a MoE model's mpk engine opts in to its MoE path."""
    assert mpk_engine_options("qwen3-0.6b") == {}
    assert mpk_engine_options("qwen3-30b-a3b") == {"moe": True}
    both = mpk_engine_options("qwen3-30b-a3b", (("logits_in_kernel", True),))
    options = json.loads(mpk_args("mpk", 64, both)[-1])["mpk"]
    assert options == {"max_batch": 32, "strict": True, "moe": True, "logits_in_kernel": True}
    assert MpkOptions.from_dict(options).moe  # options the plugin takes


def test_bench_serve_arguments_parse_with_vllm_bench_serve(vllm_parser) -> None:
    from vllm.benchmarks.serve import add_cli_args

    args = vllm_parser(add_cli_args).parse_args(bench_serve_args("/m", 8123, 1024, 256, 4, 16, "/r.json"))
    assert (args.backend, args.model, args.port, args.dataset_name) == ("vllm", "/m", 8123, "random")
    assert (args.random_input_len, args.random_output_len, args.max_concurrency, args.num_prompts) == (1024, 256, 4, 16)
    assert args.ignore_eos and args.save_result and args.result_filename == "/r.json"
    assert (args.percentile_metrics, args.metric_percentiles) == ("ttft,tpot,itl", "50,99")
    assert args.temperature is None  # the server's default
    greedy = vllm_parser(add_cli_args).parse_args(bench_serve_args("/m", 8123, 1024, 256, 4, 16, "/r.json", 0.0))
    assert greedy.temperature == 0.0


# vLLM's result files ---------------------------------------------------------------------------


def test_results_are_read_from_vllm_shaped_files(tmp_path: Path) -> None:
    (tmp_path / "l.json").write_text(json.dumps(LATENCY_JSON))
    assert latency_result(tmp_path / "l.json") == {"latency_s": 2.04, "mean_latency_s": 2.05}
    (tmp_path / "s.json").write_text(json.dumps(SERVE_JSON))
    assert serve_result(tmp_path / "s.json") == {
        "p50_ttft_ms": 30.0, "p99_ttft_ms": 60.0, "p50_tpot_ms": 5.0, "p99_tpot_ms": 6.0,
        "p50_itl_ms": 5.0, "p99_itl_ms": 9.0, "output_throughput": 409.6}


def test_failed_requests_or_missing_percentiles_are_errors(tmp_path: Path) -> None:
    (tmp_path / "f.json").write_text(json.dumps({**SERVE_JSON, "failed": 2, "completed": 14}))
    with pytest.raises(ValueError, match="2 of 16 requests failed"):
        serve_result(tmp_path / "f.json")
    (tmp_path / "m.json").write_text(json.dumps({k: v for k, v in SERVE_JSON.items() if k != "p99_itl_ms"}))
    with pytest.raises(ValueError, match="lacks p99_itl_ms"):
        serve_result(tmp_path / "m.json")


# tables ----------------------------------------------------------------------------------------

STAMP = {"run": "2026-12-07T05:00:00Z", "card": "NVIDIA H100 80GB HBM3", "commit": "abc1234"}


def latency_row(impl: str, repeat: int, seconds: float, **extra) -> dict:
    return {"bench": "latency", "model": MODEL, "impl": impl, "batch": 8, "input_len": 128, "output_len": 256,
            "repeat": repeat, "command": f"vllm bench latency --model-impl {impl}", "latency_s": seconds,
            **STAMP, **extra}


def serve_row(impl: str, repeat: int, tpot: float) -> dict:
    metrics = {k: SERVE_JSON[k] for k in vllm_tools.SERVE_METRICS}
    return {"bench": "serve", "model": MODEL, "impl": impl, "concurrency": 4, "input_len": 1024, "output_len": 256,
            "repeat": repeat, "server_command": f"vllm serve $MODEL_DIR --model-impl {impl}",
            "command": "vllm bench serve --max-concurrency 4", **metrics, "p50_tpot_ms": tpot, **STAMP}


def test_render_gives_medians_spreads_ratio_and_the_commands() -> None:
    rows = [latency_row("vllm", 0, 2.0), latency_row("mpk", 0, 1.0), latency_row("vllm", 1, 2.2),
            latency_row("mpk", 1, 1.2), latency_row("vllm", 2, 2.1), latency_row("mpk", 2, 1.1),
            serve_row("vllm", 0, 5.0), serve_row("mpk", 0, 4.0), serve_row("vllm", 1, 5.0), serve_row("mpk", 1, 5.5)]
    text = render([{**r, "run": "2026-01-01T00:00:00Z", "latency_s": 777.0} for r in rows[:2]] + rows)
    assert "| qwen3-0.6b | 8 | 128 | 2.1 | 2–2.2 | 1.1 | 1–1.2 | 0.524 | yes |" in text
    assert "| qwen3-0.6b | 4 | TPOT p50 (ms) | 5 | 5–5 | 4.75 | 4–5.5 | 0.950 | no |" in text
    assert "777" not in text  # an older run's rows are not drawn
    assert "NVIDIA H100 80GB HBM3" in text and "abc1234" in text and "3 repeat(s)" in text
    for command in ("vllm bench latency --model-impl mpk", "vllm serve $MODEL_DIR --model-impl vllm",
                    "vllm bench serve --max-concurrency 4"):
        assert command in text


def test_render_gives_each_servers_start_by_repeat() -> None:
    rows = [{**serve_row(impl, repeat, 5.0), "server_start_s": start}
            for impl, repeat, start in (("vllm", 0, 61.0), ("mpk", 0, 92.5), ("vllm", 1, 30.0), ("mpk", 1, 31.2))]
    text = render(rows + [serve_row("mpk", 2, 5.0)])  # a server that never got healthy has no start
    assert "| qwen3-0.6b | vllm | 61, 30 |" in text and "| qwen3-0.6b | mpk | 92.5, 31.2 |" in text


def test_render_takes_each_benchmarks_latest_run() -> None:
    older = {"run": "2026-01-01T00:00:00Z", "card": "NVIDIA H200", "commit": "0ld0000"}
    text = render([{**serve_row("vllm", 0, 5.0), **older}, {**serve_row("mpk", 0, 4.0), **older},
                   latency_row("vllm", 0, 2.0), latency_row("mpk", 0, 1.0)])
    assert "| qwen3-0.6b | 4 | TPOT p50 (ms) | 5 | 5–5 | 4 | 4–4 | 0.800 | n/a |" in text  # one repeat: no spread
    assert "Card: NVIDIA H200. Run 2026-01-01T00:00:00Z, commit 0ld0000" in text.split("vllm bench serve")[1]
    assert "abc1234" in text.split("vllm bench serve")[0]
    assert render([]).startswith("No run yet")


def test_render_names_the_serve_runs_temperature() -> None:
    assert "256 output tokens per request, the server's default temperature (1.0)" in render(
        [serve_row("vllm", 0, 5.0), serve_row("mpk", 0, 4.0)])
    assert "256 output tokens per request, temperature 0" in render(
        [{**serve_row(impl, 0, 5.0), "temperature": 0.0} for impl in ("vllm", "mpk")])


def test_render_lists_failures_and_leaves_an_impl_without_values_na() -> None:
    text = render([latency_row("vllm", 0, 2.0), latency_row("mpk", 0, 0.0, error="exit 1: RuntimeError: boom")])
    assert "| qwen3-0.6b | 8 | 128 | 2 | 2–2 | n/a | n/a | n/a | n/a |" in text
    assert "- mpk qwen3-0.6b 8 128 repeat 0: exit 1: RuntimeError: boom" in text


def test_update_results_rewrites_only_its_section(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Results\n\nkept\n\n{MARKERS[0]}\nold\n{MARKERS[1]}\n\nafter\n")
    update_results(results, [latency_row("vllm", 0, 2.0)])
    text = results.read_text()
    assert "old" not in text and "kept" in text and "after" in text and "| qwen3-0.6b | 8 | 128 | 2 |" in text


# the runner end to end, against a fake vllm ----------------------------------------------------

FAKE_VLLM = """\
    import http.server, json, os, subprocess, sys, time
    args = sys.argv[1:]
    mode = os.environ.get("FAKE_VLLM_MODE", "ok")
    def opt(name):
        return args[args.index(name) + 1]
    def note(pid):
        with open(os.environ["FAKE_VLLM_PIDS"], "a") as f:
            f.write(f"{{pid}}\\n")
    note(os.getpid())
    if "--model-impl" in args and opt("--model-impl") == "mpk" and mode != "no_plugin":
        print({ready!r}, flush=True)
    if args[:2] == ["bench", "latency"]:
        if mode == "hang":
            time.sleep(600)
        if mode == "fail":
            print("RuntimeError: the engine failed")
            sys.exit(1)
        seconds = {{"vllm": 2.0, "mpk": 1.5}}[opt("--model-impl")]
        out = dict({latency}, percentiles={{"50": seconds}})
        json.dump(out, open(opt("--output-json"), "w"))
    elif args[:2] == ["bench", "serve"]:
        json.dump({serve}, open(opt("--result-filename"), "w"))
    elif args[0] == "serve":
        note(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]).pid)  # an engine core
        if mode == "unhealthy":
            time.sleep(600)
        class Health(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/health" else 404)
                self.end_headers()
        http.server.HTTPServer(("127.0.0.1", int(opt("--port"))), Health).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """Running (not a zombie waiting for its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def all_gone(pid_file: Path) -> bool:
    """Every process the fake vllm noted has ended (the runner waits for a killed group's members)."""
    return not any(alive(int(pid)) for pid in pid_file.read_text().split())


@pytest.fixture
def fake_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``vllm`` first on PATH; the pids of its processes go to the returned file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "vllm"
    body = textwrap.dedent(FAKE_VLLM).format(latency=repr(LATENCY_JSON), serve=repr(SERVE_JSON),
                                              ready=READY_MESSAGE + ": 28 layers")
    script.write_text(f"#!{sys.executable}\n{body}")
    script.chmod(0o755)
    pids = tmp_path / "pids"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_VLLM_PIDS", str(pids))
    return pids


def settings(**changes) -> Settings:
    base = dict(models=(MODEL,), batches=(1,), input_lens=(128,), concurrencies=(1, 4), repeats=2,
                port=free_port(), timeout_s=60.0, server_start_s=60.0)
    return Settings(**{**base, **changes})


def run_fake(tmp_path: Path, benches: tuple[str, ...], s: Settings) -> list[dict]:
    return vllm_tools.run(s, benches, tmp_path / "rows.jsonl", tmp_path / "logs", tmp_path / "models")


def test_runner_interleaves_impls_and_reads_every_result(tmp_path: Path, fake_vllm: Path) -> None:
    rows = run_fake(tmp_path, ("latency", "serve"), settings())
    latency = [r for r in rows if r["bench"] == "latency"]
    assert [(r["impl"], r["repeat"]) for r in latency] == [("vllm", 0), ("mpk", 0), ("vllm", 1), ("mpk", 1)]
    assert [r["latency_s"] for r in latency] == [2.0, 1.5, 2.0, 1.5]
    serve = [r for r in rows if r["bench"] == "serve"]
    assert [(r["impl"], r["repeat"], r["concurrency"]) for r in serve] == [
        ("vllm", 0, 1), ("vllm", 0, 4), ("mpk", 0, 1), ("mpk", 0, 4),
        ("vllm", 1, 1), ("vllm", 1, 4), ("mpk", 1, 1), ("mpk", 1, 4)]
    assert all("error" not in r and r["output_throughput"] == 409.6 and r["server_start_s"] > 0 for r in serve)
    assert "--model $MODEL_DIR" in latency[1]["command"] and "--model-impl mpk" in latency[1]["command"]
    assert (tmp_path / "models" / MODEL / "tokenizer.json").is_file()
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == len(rows)
    assert all_gone(fake_vllm)  # servers and engine cores


def test_a_failing_or_hanging_process_is_an_error_row_and_the_run_goes_on(tmp_path: Path, fake_vllm: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", "fail")
    rows = run_fake(tmp_path, ("latency",), settings(repeats=1))
    assert [r["impl"] for r in rows] == ["vllm", "mpk"]
    assert all(r["error"].startswith("exit 1: RuntimeError: the engine failed") for r in rows)
    monkeypatch.setenv("FAKE_VLLM_MODE", "hang")
    rows = run_fake(tmp_path, ("latency",), settings(repeats=1, timeout_s=1.0))
    assert len(rows) == 2 and all(r["error"].startswith("timed out after 1 s") for r in rows)
    assert all_gone(fake_vllm)


def test_an_mpk_engine_that_never_readied_a_megakernel_gives_error_rows(tmp_path: Path, fake_vllm: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM takes ``--model-impl mpk`` without the plugin and runs its own layers: those numbers
    must not be reported as mpk's; the first serve bench tells, the later ones do not run."""
    monkeypatch.setenv("FAKE_VLLM_MODE", "no_plugin")
    rows = run_fake(tmp_path, ("latency", "serve"), settings(repeats=1))
    assert [(r["bench"], r["impl"], "error" in r) for r in rows] == [
        ("latency", "vllm", False), ("latency", "mpk", True),
        ("serve", "vllm", False), ("serve", "vllm", False), ("serve", "mpk", True), ("serve", "mpk", True)]
    assert all("never readied a megakernel" in r["error"] for r in rows if "error" in r)
    assert len(list((tmp_path / "logs").glob("serve-*-mpk-r0-c*.log"))) == 1  # concurrency 4 not run
    assert all_gone(fake_vllm)


def test_a_server_that_never_gets_healthy_fails_its_concurrencies(tmp_path: Path, fake_vllm: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", "unhealthy")
    rows = run_fake(tmp_path, ("serve",), settings(repeats=1, server_start_s=1.0))
    assert [(r["impl"], r["concurrency"]) for r in rows] == [("vllm", 1), ("vllm", 4), ("mpk", 1), ("mpk", 4)]
    assert all("vllm serve not healthy after 1 s" in r["error"] for r in rows)
    assert all_gone(fake_vllm)


def test_a_port_that_already_answers_starts_no_server(tmp_path: Path, fake_vllm: Path) -> None:
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

    other = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        rows = run_fake(tmp_path, ("serve",), settings(repeats=1, port=other.server_address[1]))
    finally:
        other.shutdown()
    assert len(rows) == 4 and all("already answers /health" in r["error"] for r in rows)
    assert not fake_vllm.exists()  # no vllm was started


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_kills_the_server_and_its_engine_core(tmp_path: Path, fake_vllm: Path,
                                                                 signum: int) -> None:
    # SIGINT as Ctrl-C at a terminal raises it, even where the test runs as a background job (which
    # starts with SIGINT ignored, and Python keeps an ignored SIGINT ignored).
    code = ("import signal, sys; from pathlib import Path; from vllm_mpk.bench import vllm_tools as t; "
            "signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"t.run(t.Settings(models=({MODEL!r},), repeats=1, port={free_port()}, server_start_s=600), "
            "('serve',), Path(sys.argv[1]) / 'rows.jsonl', Path(sys.argv[1]) / 'logs', Path(sys.argv[1]) / 'm')")
    env = {**os.environ, "FAKE_VLLM_MODE": "unhealthy",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    runner = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env)
    try:
        deadline = time.monotonic() + 120
        while len(fake_vllm.read_text().split() if fake_vllm.exists() else []) < 2:  # the server and its core
            assert runner.poll() is None and time.monotonic() < deadline, "the fake server never started"
            time.sleep(0.1)
        runner.send_signal(signum)
        assert runner.wait(timeout=60) != 0
    finally:
        runner.kill()
    assert all_gone(fake_vllm)


# the command line ------------------------------------------------------------------------------


def test_cli_prepares_model_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench-vllm", "--models", MODEL, "--prepare-models", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / MODEL)
    assert {p.name for p in (tmp_path / MODEL).iterdir()} >= {"config.json", "tokenizer.json"}


def test_cli_redraws_the_table_from_rows(tmp_path: Path) -> None:
    rows, results = tmp_path / "rows.jsonl", tmp_path / "RESULTS.md"
    rows.write_text(json.dumps(latency_row("vllm", 0, 2.0)) + "\n" + json.dumps(latency_row("mpk", 0, 1.0)) + "\n")
    assert main(["bench-vllm", "--table-only", "--rows", str(rows), "--results", str(results)]) == 0
    assert "| qwen3-0.6b | 8 | 128 | 2 | 2–2 | 1 | 1–1 | 0.500 | n/a |" in results.read_text()


@pytest.mark.parametrize("argv, message", [
    (["--models", "nope"], "no shipped config named 'nope'"),
    (["--concurrencies", "0"], "expected an integer of at least 1, got 0"),
    (["--benches", "throughput"], "invalid choice: 'throughput'"),
    (["--serve-temperature", "-1"], "expected a number of at least 0, got -1"),
    (["--mpk-options", '{"max_batch": 0}'], "--mpk-options: expected a JSON object of mpk options"),
    (["--table-only", "--rows", "/nonexistent/rows.jsonl"], "--rows /nonexistent/rows.jsonl does not exist"),
])
def test_cli_bad_arguments_are_one_line_and_exit_2(argv: list[str], message: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line_usage_error(["bench-vllm", *argv], message, capsys)


@pytest.mark.parametrize("command, flag", [(["bench-vllm", "--models", MODEL], "--log-dir"),
                                           (["bench-vllm", "--models", MODEL], "--model-root"),
                                           (["bench", "--models", MODEL], "--log-dir"), (["soak"], "--log-dir")])
def test_a_log_folder_that_cannot_be_written_is_one_line_before_anything_runs(
        command: list[str], flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    files = ["--rows", str(tmp_path / "rows.jsonl"), "--results", str(tmp_path / "RESULTS.md")]
    argv = [*command, *(files if command[0] != "soak" else []), flag, str(blocker / "logs")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"vllm-mpk: error: {flag} {blocker / 'logs'}: cannot create it (Not a directory); give a folder " \
                  "you can write\n"
