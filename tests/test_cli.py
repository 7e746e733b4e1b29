"""Smoke tests of the ``vllm-mpk`` command line, the shipped model catalog and the vLLM plugin."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch

from vllm_mpk.cli import main
from vllm_mpk.integration import plugin
from vllm_mpk.models.catalog import UnknownModelError, resolve_model, shipped_config, shipped_models

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
    assert "kv_splits must be a positive int or None" in capsys.readouterr().err


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
    assert shipped_models() == ["llama-3.1-8b", "llama-3.2-1b", "qwen3-0.6b", "qwen3-1.7b", "qwen3-8b"]
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
