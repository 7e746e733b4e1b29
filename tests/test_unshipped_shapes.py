"""Dense shapes the project does not ship, made from public dimensions: a Qwen3-4B and a
Llama-3.2-3B shape. Nothing in planning or code generation may be tuned to the shipped configs:
these plan (validation included) through ``vllm-mpk plan`` like them, their tiles cover every
output column, and the generated megakernel compiles for sm_90a."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from tests.helpers import load_config, meta_weights
from vllm_mpk.cli import main
from vllm_mpk.codegen.jit import compile_only
from vllm_mpk.codegen.toolchain import ToolchainError, find_nvcc
from vllm_mpk.models import DecodeOptions, ModelSpec, build_decoder
from vllm_mpk.models.kv_cache import allocate_kv_caches
from vllm_mpk.runtime.megakernel import kernel_spec

SHAPES = {
    "qwen3-4b-shape": ("qwen3-1.7b", {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                                      "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}),
    "llama-3.2-3b-shape": ("llama-3.2-1b", {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                                            "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128}),
}


def config(name: str) -> dict:
    base, changes = SHAPES[name]
    return {**load_config(base), **changes}


def model_dir(name: str, root: Path) -> Path:
    path = root / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config(name)))
    return path


def plan_of(name: str, max_batch: int):
    spec = ModelSpec.from_hf_config(config(name))
    options = DecodeOptions(max_batch=max_batch)
    caches = allocate_kv_caches(spec, max_batch * -(-options.max_seq_len // options.page_size), options.page_size,
                                device="meta")
    return spec, build_decoder(spec, meta_weights(spec), caches, options)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_plan_command_plans_the_whole_model(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", str(model_dir(name, tmp_path)), "--max-batch", "8"]) == 0
    out = capsys.readouterr().out
    layers = SHAPES[name][1]["num_hidden_layers"]
    assert f"{layers} of {layers} layers" in out, out


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("max_batch", [1, 8])
def test_linear_tiles_cover_every_output_column_once(name: str, max_batch: int) -> None:
    spec, model = plan_of(name, max_batch)
    widths = {"qkv": (spec.num_q_heads + 2 * spec.num_kv_heads) * spec.head_dim, "hidden": spec.hidden_size,
              "gate_up": spec.intermediate_size}
    seen = {kind: 0 for kind in widths}
    tasks_of = defaultdict(list)
    for task in model.plan.tasks:
        tasks_of[task.op.index].append(task)
    for op in model.plan.ops:
        for role, handle in op.outputs.items():
            if "linear" not in op.kind or role != "output":
                continue
            tasks = tasks_of[op.index]
            columns = sorted(a.box[1] for t in tasks for a in t.writes if a.tensor == handle.name)
            covered = [c for lo, hi in columns for c in range(lo, hi)]
            assert covered == list(range(handle.shape[1])), f"{op.name}: tiles {columns} of {handle.shape[1]} columns"
            for kind, width in widths.items():
                seen[kind] += handle.shape[1] == width
    assert all(seen.values()), f"a projection of {name} was not found among the linear ops: {seen}"


def test_llama_3b_shape_megakernel_compiles_for_sm90a(tmp_path: Path) -> None:
    try:
        find_nvcc()
    except ToolchainError as err:
        pytest.skip(f"cannot prove the generated CUDA compiles: {err}")
    _, model = plan_of("llama-3.2-3b-shape", 8)
    plan = model.plan
    bound = {**model.kernel.attached, **{n: torch.empty(h.shape, dtype=h.dtype, device="meta")
                                         for n, h in plan.tensors.items() if n not in model.kernel.attached}}
    jit, _ = kernel_spec(plan, bound)
    so = compile_only(jit, tmp_path)
    assert so.is_file() and so.stat().st_size > 0
