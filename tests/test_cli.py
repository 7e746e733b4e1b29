"""Smoke tests of the ``vllm-mpk`` command line, the shipped model catalog and the vLLM plugin."""

from __future__ import annotations

import gzip
import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

from vllm_mpk.cli import main
from vllm_mpk.codegen.ops.linear import MAX_LINEAR_BATCH
from vllm_mpk.integration import plugin
from vllm_mpk.models.catalog import (
    UnknownModelError,
    resolve_model,
    shipped_config,
    shipped_models,
    single_gpu_models,
)

# The layers of one decode step (see vllm_mpk/models/decoder.py).
DECODER_OP_KINDS = ("embed", "rmsnorm_linear", "attention", "linear_with_residual", "rmsnorm_linear_silu_mul",
                    "argmax")


def test_plan_summary_names_every_op_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "qwen3-0.6b", "--layers", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 of 28 layers" in out
    rows = {line.split()[0] for line in out.splitlines() if line.strip()}
    for kind in DECODER_OP_KINDS:
        assert kind in rows, f"plan summary has no row for '{kind}':\n{out}"


def test_plan_shows_split_kv_and_multi_step(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "llama-3.2-1b", "--layers", "2", "--kv-splits", "4", "--multi-step"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["begin_step"][:2] == ["1", "1"]  # one layer, one task
    assert rows["attention"][:2] == ["2", str(2 * 8 * 8 * 4)]  # 2 layers x 8 KV heads x 8 requests x 4 splits
    assert rows["total"][0] == "14"  # no merge layer: the last split of each request merges
    assert rows["linear_with_residual"][2] == "4"  # each o_proj and down_proj waits on one event
    assert main(["plan", "--model", "qwen3-0.6b", "--multi-step", "--tensor-parallel-size", "2"]) == 2


def test_plan_kv_splits_default_is_auto_per_batch(capsys: pytest.CaptureFixture[str]) -> None:
    def attention_row(*args: str) -> tuple[str, list[str]]:
        assert main(["plan", "--model", "qwen3-0.6b", "--layers", "2", *args]) == 0
        out = capsys.readouterr().out
        rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
        return out.splitlines()[0], rows["attention"]

    header, row = attention_row("--max-batch", "4")  # 8 KV heads x 4 requests x 4 <= 132 workers: 2 splits
    assert "kv splits 2 (auto)" in header and row[:2] == ["2", str(2 * 8 * 4 * 2)]
    header, row = attention_row()  # batch 8: 1
    assert "kv splits 1 (auto)" in header and row[:2] == ["2", str(2 * 8 * 8)]
    header, row = attention_row("--max-batch", "4", "--kv-splits", "1")  # an explicit count wins
    assert "kv splits 1 (weights" in header and "(auto)" not in header
    assert row[:2] == ["2", str(2 * 8 * 4)]
    assert main(["plan", "--model", "qwen3-0.6b", "--kv-splits", "0"]) == 2
    assert capsys.readouterr().err == "vllm-mpk: error: argument --kv-splits: expected an integer of at least 1, got 0\n"


def test_check_unknown_model_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err
    assert "qwen3-0.6b" in err  # the message lists what can be given instead


def test_check_on_cuda_without_a_gpu_says_why(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["check", "--device", "cuda"]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err


def test_generate_on_hopper_runs_the_gpu_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a Hopper GPU, generate hands the model to the demo and passes on its verdict."""
    import vllm_mpk.cli
    import vllm_mpk.demo

    calls, engines = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(vllm_mpk.demo, "run_demo", lambda spec, weights, *args: calls.append((spec, args)) or False)
    monkeypatch.setattr(vllm_mpk.cli, "run_engines", lambda configs, *a, **k: engines.extend(configs) or [])
    assert main(["generate", "--model", "qwen3-0.6b", "--batch", "2", "--new-tokens", "5"]) == 1
    (spec, args), = calls
    assert spec.hidden_size == 1024 and args == (2, 128, 5, 0)
    # Then the same model in vLLM: --model-impl mpk next to stock, at the same batch.
    assert [(c.model, c.impl, c.batches, c.new_tokens) for c in engines] == [
        ("qwen3-0.6b", "vllm", (2,), 5), ("qwen3-0.6b", "mpk", (2,), 5)]


def test_catalog_resolves_names_and_directories(tmp_path) -> None:
    assert shipped_models() == ["llama-3.1-70b", "llama-3.1-8b", "llama-3.2-1b", "qwen3-0.6b", "qwen3-1.7b",
                                "qwen3-30b-a3b", "qwen3-32b", "qwen3-8b"]
    assert single_gpu_models() == ["llama-3.1-8b", "llama-3.2-1b", "qwen3-0.6b", "qwen3-1.7b", "qwen3-8b"]
    (tmp_path / "config.json").write_text(json.dumps(shipped_config("llama-3.2-1b")))
    from_dir, by_name = resolve_model(str(tmp_path)), resolve_model("Llama-3.2-1B")
    assert from_dir.spec == by_name.spec and from_dir.directory == tmp_path and by_name.directory is None
    with pytest.raises(UnknownModelError):
        resolve_model("gpt2")


def test_plugin_register_is_idempotent() -> None:
    plugin.register()
    plugin.register()
    try:
        entry_points = importlib.metadata.entry_points(group="vllm.general_plugins")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        pytest.skip("vllm_mpk is not installed")
    if not any(ep.value.startswith("vllm_mpk.") for ep in entry_points):
        pytest.skip("vllm_mpk is not installed (pip install -e .)")
    (ep,) = [ep for ep in entry_points if ep.name == "mpk"]
    assert ep.load() is plugin.register


# bad input: one line on stderr, exit 2 ------------------------------------------------------------

def llama_config(**changes: object) -> dict:
    config = shipped_config("llama-3.2-1b")
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    return config


def without_rope_factor() -> dict:
    config = llama_config()
    del config["rope_scaling"]["factor"]
    return config


# (id, config.json text for --model, or None for a shipped model; arguments; what the line must say)
BAD_INPUT: list[tuple[str, str | None, list[str], str]] = [
    ("config-missing-key", json.dumps(llama_config(hidden_size=None)), ["plan"],
     "config has no 'hidden_size'; it must hold a positive integer"),
    ("config-zero-kv-heads", json.dumps(llama_config(num_key_value_heads=0)), ["plan"],
     "config key 'num_key_value_heads' must be a positive integer, got 0"),
    ("config-negative-layers", json.dumps(llama_config(num_hidden_layers=-2)), ["plan"],
     "config key 'num_hidden_layers' must be a positive integer, got -2"),
    ("config-absurd-hidden-size", json.dumps(llama_config(hidden_size=2 ** 30)), ["plan"],
     "config key 'hidden_size' is 1073741824, above 65536: not a model's size"),
    ("config-absurd-vocabulary", json.dumps(llama_config(vocab_size=2 ** 40)), ["check"],
     "config key 'vocab_size' is 1099511627776, above 4194304"),
    ("config-flag-as-string", json.dumps(llama_config(tie_word_embeddings="no")), ["plan"],
     "config key 'tie_word_embeddings' must be true or false, got 'no'"),
    ("config-json-list", "[1, 2]", ["plan"], "a model config must be a JSON object of Hugging Face config keys, got list"),
    ("config-bad-json", "{", ["check"], "is not valid JSON"),
    ("config-not-utf8", "\udcff", ["plan"], "is not valid JSON"),
    ("config-llama3-rope-without-factor", json.dumps(without_rope_factor()), ["plan"],
     "llama3 rope_scaling needs 'factor' as a positive number (it is missing)"),
    ("page-size-zero", None, ["plan", "--page-size", "0"], "argument --page-size: expected a power of two"),
    ("page-size-not-power-of-two", None, ["plan", "--page-size", "12"], "argument --page-size: expected a power of two"),
    ("tensor-parallel-zero", None, ["plan", "--tensor-parallel-size", "0"],
     "argument --tensor-parallel-size: expected an integer of at least 1, got 0"),
    ("max-batch-negative", None, ["plan", "--max-batch", "-4"], "argument --max-batch: expected an integer from 1 to"),
    ("max-batch-beyond-gpu-tiles", None, ["plan", "--max-batch", str(MAX_LINEAR_BATCH + 1)],
     f"argument --max-batch: expected an integer from 1 to {MAX_LINEAR_BATCH}, got {MAX_LINEAR_BATCH + 1}"),
    ("max-batch-huge", None, ["plan", "--max-batch", "100000"], f"from 1 to {MAX_LINEAR_BATCH}, got 100000"),
    ("max-batch-not-a-number", None, ["plan", "--max-batch", "eight"], "expected an integer from 1 to"),
    ("max-seq-len-float", None, ["plan", "--max-seq-len", "1e9"], "argument --max-seq-len: expected an integer"),
    ("max-seq-len-beyond-positions", None, ["plan", "--max-seq-len", "1000000000"],
     "--max-seq-len: sequences of 1000000000 tokens exceed the 40960 positions qwen3-0.6b takes"),
    ("kv-splits-beyond-pages", None, ["plan", "--max-seq-len", "64", "--kv-splits", "5"],
     "--kv-splits 5 is more than the 4 pages of a sequence"),
    ("layers-zero", None, ["plan", "--layers", "0"], "argument --layers: expected an integer of at least 1, got 0"),
    ("workers-zero", None, ["plan", "--num-workers", "0"], "argument --num-workers"),
    ("unknown-model", None, ["plan", "--model", "gpt-17"], "unknown model 'gpt-17'"),
    ("check-batch-zero", None, ["check", "--batch", "0"], "argument --batch: expected an integer from 1 to"),
    ("check-new-tokens-beyond-positions", None, ["check", "--new-tokens", "50000"],
     "exceed the 40960 positions qwen3-0.6b takes"),
    ("generate-prompt-len-zero", None, ["generate", "--prompt-len", "0"], "argument --prompt-len"),
    ("profile-context-negative", None, ["profile", "--context", "-1"], "argument --context"),
    ("bench-batches-zero", None, ["bench", "--batches", "0"], "argument --batches: expected an integer of at least 1"),
    ("bench-timeout-nan", None, ["bench", "--timeout", "nan"], "argument --timeout: expected a number above 0"),
    ("bench-memory-share", None, ["bench", "--gpu-memory-utilization", "1.5"], "above 0 and at most 1, got 1.5"),
    ("unknown-option", None, ["plan", "--max-batches", "4"], "unrecognized arguments: --max-batches 4"),
]


@pytest.mark.parametrize("config,argv,message", [pytest.param(c, a, m, id=i) for i, c, a, m in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys: pytest.CaptureFixture[str], config: str | None,
                                          argv: list[str], message: str) -> None:
    if config is not None:
        (tmp_path / "config.json").write_bytes(config.encode("utf-8", "surrogateescape"))
        argv = [*argv, "--model", str(tmp_path)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = captured.err
    assert line.startswith("vllm-mpk: error: ") and line.count("\n") == 1, line
    assert message in line


def test_a_model_path_that_is_a_file_or_unreadable_says_so(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(llama_config()))
    assert main(["plan", "--model", str(config)]) == 2
    assert "is a file; give the directory that holds config.json" in capsys.readouterr().err

    def unreadable(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", unreadable)
    assert main(["plan", "--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"vllm-mpk: error: cannot read {config}: Permission denied; check its permissions\n"


def test_a_failed_check_is_exit_1_not_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 1 keeps meaning: the check ran and failed."""
    import vllm_mpk.cli

    monkeypatch.setattr(vllm_mpk.cli, "run_check", lambda *args: False)
    assert main(["check", "--layers", "1"]) == 1


def test_plan_materialises_nothing_that_grows_with_max_seq_len(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """A trillion positions: a RoPE table or KV cache of that length could not be allocated."""
    positions = 2 ** 40
    (tmp_path / "config.json").write_text(json.dumps(llama_config(max_position_embeddings=positions)))
    assert main(["plan", "--model", str(tmp_path), "--layers", "1", "--max-seq-len", str(positions)]) == 0
    assert f"max seq len {positions}" in capsys.readouterr().out


BENCH_ROW = {"run": "2026-01-01T00:00:00Z", "model": "qwen3-0.6b", "impl": "vllm", "batch": 1, "tpot_ms": 5.0}
TOOL_ROW = {"run": "2026-01-01T00:00:00Z", "card": "H100", "commit": "abc", "bench": "latency", "model": "qwen3-0.6b",
            "impl": "vllm", "repeat": 0, "batch": 1, "input_len": 128}


@pytest.mark.parametrize("command,good", [("bench", BENCH_ROW), ("bench-vllm", TOOL_ROW)], ids=["bench", "bench-vllm"])
@pytest.mark.parametrize("bad,message", [
    pytest.param("{\"run\": ", "line 2 is not JSON", id="cut-short"),
    pytest.param("[1, 2]", "line 2 is not a row (a JSON object)", id="list"),
    pytest.param("{}", "line 2 is not a row of this command (it has no ", id="empty"),
    pytest.param("\udcff", "is not UTF-8 text", id="binary"),
])
def test_a_rows_file_that_is_not_this_commands_is_one_line(tmp_path, capsys: pytest.CaptureFixture[str], command: str,
                                                           good: dict, bad: str, message: str) -> None:
    """A hand-edited rows file, or another command's (``bench --rows benchmarks/vllm_tools.jsonl``)."""
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(f"{json.dumps(good)}\n{bad}\n".encode("utf-8", "surrogateescape"))
    assert main([command, "--table-only", "--rows", str(rows), "--results", str(tmp_path / "R.md")]) == 2
    line = capsys.readouterr().err
    assert line.startswith(f"vllm-mpk: error: {rows}") and line.count("\n") == 1, line
    assert message in line


@pytest.mark.parametrize("command,row,missing", [
    pytest.param("bench", {**TOOL_ROW, "bench": "serve", "batch": None}, "'batch'", id="bench-given-serve-rows"),
    pytest.param("bench-vllm", BENCH_ROW, "'bench', 'card', 'commit', 'repeat'", id="bench-vllm-given-bench-rows"),
])
def test_the_other_bench_commands_rows_are_refused(tmp_path, capsys: pytest.CaptureFixture[str], command: str, row: dict,
                                                   missing: str) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
    assert main([command, "--table-only", "--rows", str(rows), "--results", str(tmp_path / "R.md")]) == 2
    assert f"line 1 is not a row of this command (it has no {missing})" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    pytest.param(b"not json", "is not a Chrome trace (Expecting value", id="not-json"),
    pytest.param(gzip.compress(b'{"traceEvents": []}')[:-9], "is not a Chrome trace (Compressed file ended", id="cut-gzip"),
    pytest.param(b"\x1f\x8bnot gzip", "is not a Chrome trace (Unknown compression method)", id="bad-gzip"),
    pytest.param(b"42", "is not a Chrome trace (a JSON int, not a traceEvents object or list)", id="a-number"),
])
def test_a_trace_that_cannot_be_read_is_one_line(tmp_path, capsys: pytest.CaptureFixture[str], content: bytes,
                                                 message: str) -> None:
    trace = tmp_path / "x.pt.trace.json"
    trace.write_bytes(content)
    assert main(["bench", "--analyze-trace", str(trace)]) == 2
    line = capsys.readouterr().err
    assert line.startswith(f"vllm-mpk: error: {trace} {message}") and line.count("\n") == 1, line


def test_model_directories_that_cannot_be_written_are_one_line(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    assert main(["bench-vllm", "--models", "qwen3-0.6b", "--prepare-models", str(tmp_path / "file")]) == 2
    line = capsys.readouterr().err
    assert line.startswith(f"vllm-mpk: error: --prepare-models {tmp_path / 'file'}: cannot write ") and line.count("\n") == 1


def test_bench_files_that_cannot_be_read_or_written_are_one_line(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    rows, missing, results = tmp_path / "rows.jsonl", tmp_path / "none.jsonl", tmp_path / "no" / "R.md"
    rows.write_text("")
    for argv, message in (
            (["--rows", str(tmp_path)], f"--rows {tmp_path} is a folder; give a file"),
            (["--rows", str(missing)], f"--rows {missing} does not exist; --table-only draws the table from it"),
            (["--rows", str(rows), "--results", str(results)], f"--results {results}: there is no folder {results.parent}")):
        assert main(["bench", "--table-only", *argv]) == 2
        assert capsys.readouterr().err == f"vllm-mpk: error: {message}\n"
