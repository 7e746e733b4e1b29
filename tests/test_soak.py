"""``vllm-mpk soak`` against a fake ``vllm`` (a server answering /health and /v1/completions, and a
``bench serve`` writing vLLM-shaped results): the load cycles until the minutes are up, streams are
dropped part-way, the greedy comparison runs on the soaked server, and each way a soak can fail
is reported by ``problems``."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import assert_one_line_usage_error
from vllm_mpk import cli
from vllm_mpk.bench import soak as soak_module
from vllm_mpk.bench.greedy_compare import Comparison, Divergence
from vllm_mpk.bench.soak import SoakReport, SoakSettings, problems, soak
from vllm_mpk.bench.vllm_tools import MPK
from vllm_mpk.cli import main
from vllm_mpk.integration.plugin import READY_MESSAGE

# Greedy "model": the next token is a function of the whole sequence, so a restart from any prefix
# continues as the first run did, for both impls (unless FAKE_VLLM_MODE is "diverge": mpk adds 1).
FAKE_VLLM = """\
    import http.server, json, os, sys, time
    args = sys.argv[1:]
    mode = os.environ.get("FAKE_VLLM_MODE", "ok")
    def opt(name):
        return args[args.index(name) + 1]
    if args[0] == "serve":
        impl = opt("--model-impl")
        if impl == "mpk":
            print({ready!r}, flush=True)
            if mode == "off":
                print("WARNING --model-impl mpk: the megakernel is off, vLLM's stock layers serve every batch: x",
                      flush=True)
        def next_token(seq):
            return (sum(seq) * 31 + len(seq)) % 1000 + (1 if mode == "diverge" and impl == "mpk" else 0)
        class Api(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass
            def do_GET(self):
                self.send_response(200 if self.path == "/health" else 404)
                self.end_headers()
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                seq, tokens, tops = list(body["prompt"]), [], []
                for _ in range(body["max_tokens"]):
                    t = next_token(seq)
                    tokens.append(t)
                    tops.append({{f"token_id:{{t}}": -0.5, f"token_id:{{t + 1}}": -2.0}})
                    seq.append(t)
                self.send_response(200)
                self.end_headers()
                if body.get("stream"):
                    try:
                        for t in tokens:
                            self.wfile.write(f"data: {{t}}\\n\\n".encode())
                            self.wfile.flush()
                            time.sleep(0.01)
                    except OSError:
                        pass  # the client dropped the stream
                    return
                choice = {{"token_ids": tokens, "logprobs": {{"top_logprobs": tops}} if body.get("logprobs") else None}}
                self.wfile.write(json.dumps({{"choices": [choice]}}).encode())
        http.server.ThreadingHTTPServer(("127.0.0.1", int(opt("--port"))), Api).serve_forever()
    elif args[:2] == ["bench", "serve"]:
        n = int(opt("--num-prompts"))
        failed = 2 if mode == "fail_requests" else 0
        json.dump({{"completed": n - failed, "failed": failed, "p50_tpot_ms": 1.5}}, open(opt("--result-filename"), "w"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "vllm"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(FAKE_VLLM).format(ready=READY_MESSAGE + ": 28 layers"))
    script.chmod(0o755)
    smi = bin_dir / "nvidia-smi"  # the GPU's used memory, flat
    smi.write_text("#!/bin/sh\necho 70000\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # The fake needs no weights; writing 0.6B random ones would be most of the test's time.
    monkeypatch.setattr(soak_module, "prepare_checkpoint",
                        lambda settings, root: soak_module.prepare_model_dir(settings.model, root))


def run(tmp_path: Path) -> SoakReport:
    settings = SoakSettings(minutes=0, concurrencies=(1, 2), check_prompts=3, check_tokens=6,
                            memory_every_s=0.05, drop_every_s=0.2, port=free_port(), server_start_s=60,
                            timeout_s=60)
    return soak(settings, tmp_path / "logs", on_line=lambda line: None)


def test_a_clean_soak_passes_and_records_what_it_did(tmp_path: Path, fake_vllm: None) -> None:
    report = run(tmp_path)
    assert problems(report, 256) == [], report
    assert [(r["cycle"], r["concurrency"]) for r in report.runs][:2] == [(0, 1), (0, 2)]
    assert all(r["completed"] == 16 and r["failed"] == 0 for r in report.runs)
    assert report.ready and report.alive_at_end and report.drops >= 1 and not report.drop_errors
    assert {r["cycle"] for r in report.runs} >= {0, 1} and len(report.memory_mib) >= 2
    assert list(report.comparisons) == ["with logprobs", "without logprobs"]
    for name, comparison in report.comparisons.items():
        comparison = Comparison.from_json(comparison)
        assert comparison.steps == 3 * 6 and not comparison.mismatches, name
    assert Comparison.from_json(report.comparisons["with logprobs"]).logprob_steps == 3 * 6
    assert (tmp_path / "logs" / "soak.json").is_file()


@pytest.mark.parametrize("mode, expected", [
    ("fail_requests", "requests failed"),
    ("off", "server log: WARNING --model-impl mpk: the megakernel is off"),
    ("diverge", "greedy tokens with logprobs against stock's"),
    ("diverge", "greedy tokens without logprobs against stock's"),
])
def test_each_way_a_soak_fails_is_reported(tmp_path: Path, fake_vllm: None, monkeypatch: pytest.MonkeyPatch,
                                           mode: str, expected: str) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", mode)
    found = problems(run(tmp_path), 256)
    assert any(expected in p for p in found), found


def test_memory_is_judged_after_the_first_cycle_only() -> None:
    report = SoakReport(settings={}, runs=[{"concurrency": 1, "completed": 16, "failed": 0}], ready=True,
                        alive_at_end=True, warm_s=10.0,
                        memory_mib=[(0.0, 1000.0), (5.0, 70000.0), (10.0, 70100.0), (20.0, 70150.0)])
    assert problems(report, 256) == []
    report.memory_mib.append((30.0, 70500.0))
    assert problems(report, 256) == ["GPU memory moved 400 MiB after the first cycle (70100 to 70500; "
                                     "at most 256 allowed)"]
    report.memory_mib = [(0.0, 1000.0), (20.0, 70150.0)]  # one sample after the first cycle measures nothing
    assert problems(report, 256) == ["GPU memory was sampled 1 time(s) after the first cycle: run longer, or "
                                     "check that nvidia-smi answers"]


def test_a_near_tie_passes_and_a_real_divergence_fails() -> None:
    base = dict(settings={}, runs=[{"concurrency": 1, "completed": 16, "failed": 0}], ready=True, alive_at_end=True,
                warm_s=1.0, memory_mib=[(2.0, 100.0), (3.0, 100.0)])
    tie = Comparison(steps=100, near_ties=[Divergence(0, 3, 5, 6, 0.01)]).to_json()
    assert problems(SoakReport(**base, comparisons={"with logprobs": tie}), 256) == []
    wrong = Comparison(steps=100, mismatches=[Divergence(0, 3, 5, 6, None)]).to_json()
    found = problems(SoakReport(**base, comparisons={"with logprobs": tie, "without logprobs": wrong}), 256)
    assert len(found) == 1 and "without logprobs" in found[0] and "not make it a near tie" in found[0], found


def test_no_runs_no_ready_line_and_a_dead_server_are_problems() -> None:
    found = problems(SoakReport(settings={}), 256)
    assert found == ["no vllm bench serve run finished", "the server's log has no megakernel ready line",
                     "the server did not answer /health after the load"]


@pytest.mark.parametrize("argv, message", [
    (["--range-ratio", "1"], "--range-ratio: expected a number of at least 0 and at most 0.99, got 1"),
    (["--minutes", "0"], "--minutes: expected a number above 0, got 0"),
    (["--concurrencies", "0"], "--concurrencies: expected an integer of at least 1, got 0"),
    (["--mpk-options", "{"], "--mpk-options: expected a JSON object of mpk options"),
    (["--mpk-options", '{"greedy": true}'], "unknown additional_config[\"mpk\"] keys ['greedy']"),
])
def test_cli_bad_arguments_are_one_line_and_exit_2(argv: list[str], message: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_line_usage_error(["soak", *argv], message, capsys)


def test_cli_takes_fixed_lengths(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "bench_unavailable_reason", lambda: "torch sees no CUDA device")
    assert main(["soak", "--range-ratio", "0"]) == 2  # parsed; then no GPU here
    assert "runs vLLM on a GPU" in capsys.readouterr().err


def test_cli_refuses_an_unknown_model_and_says_it_needs_a_gpu(capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["soak", "--model", "nope"]) == 2
    assert "no shipped config named 'nope'" in capsys.readouterr().err
    monkeypatch.setattr(cli, "bench_unavailable_reason", lambda: "torch sees no CUDA device")
    assert main(["soak", "--minutes", "1"]) == 2
    assert "vllm-mpk soak runs vLLM on a GPU: torch sees no CUDA device" in capsys.readouterr().err


def test_the_server_runs_vllms_defaults_and_the_plugins(vllm_parser) -> None:
    from vllm.entrypoints.openai.cli_args import make_arg_parser

    command = soak_module.server_command("vllm", Path("/m"), MPK, 8001)
    assert command[:2] == ["vllm", "serve"]
    args = vllm_parser(make_arg_parser).parse_args(command[2:])
    defaults = vllm_parser(make_arg_parser).parse_args(["/m"])
    changed = {k for k, v in vars(args).items() if vars(defaults).get(k) != v}
    assert changed == {"model_impl", "port"} and (args.model_impl, args.port) == ("mpk", 8001)
    opted = soak_module.server_command("vllm", Path("/m"), MPK, 8001, {"greedy_argmax": True})
    assert vllm_parser(make_arg_parser).parse_args(opted[2:]).additional_config == {"mpk": {"greedy_argmax": True}}
    assert "--additional-config" not in soak_module.server_command("vllm", Path("/m"), "vllm", 8001,
                                                                   {"greedy_argmax": True})  # stock takes none


def test_the_load_parses_with_vllm_bench_serve(vllm_parser) -> None:
    from vllm.benchmarks.serve import add_cli_args

    settings = SoakSettings(range_ratio=0.5, seed=3, port=8123)
    args = vllm_parser(add_cli_args).parse_args(soak_module.load_args(settings, Path("/m"), 64, 2, Path("/r.json")))
    assert (args.dataset_name, float(args.random_range_ratio), args.seed, args.max_concurrency) == ("random", 0.5, 5, 64)
    assert (args.num_prompts, args.random_input_len, args.port, args.result_filename) == (256, 1024, 8123, "/r.json")
