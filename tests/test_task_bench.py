"""``benchmarks/task_bench.py`` without a GPU: each op's one-op plan has the model's shapes and the
decoder's tiling, and computes what the layer computes (CPU reference executor)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from vllm_mpk.graph.reference import ReferenceExecutor
from vllm_mpk.models.catalog import resolve_model
from vllm_mpk.models.decoder import linear_grid

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "task_bench.py"
_spec = importlib.util.spec_from_file_location("task_bench", PATH)
assert _spec is not None and _spec.loader is not None
task_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task_bench)

KINDS = {"qkv": "rmsnorm_linear", "o_proj": "linear_with_residual", "gate_up": "rmsnorm_linear_silu_mul",
         "down": "linear_with_residual"}


@pytest.mark.parametrize("op", sorted(KINDS))
def test_one_op_plans_have_the_layer_shapes_and_tiling(op: str) -> None:
    spec = resolve_model("qwen3-0.6b").spec
    plan, tensors = task_bench.build_op(spec, op, batch=8, workers=132, device="cpu")
    (only,) = plan.ops
    assert only.kind == KINDS[op]
    columns = {"qkv": spec.qkv_width, "gate_up": 2 * spec.intermediate_size}.get(op, spec.hidden_size)
    assert only.num_tiles == linear_grid(columns, 132)
    assert tensors["w"].shape[0] == columns and tensors["x"].shape[0] == 8


def test_down_proj_plan_computes_the_layer() -> None:
    spec = resolve_model("qwen3-0.6b").spec
    plan, tensors = task_bench.build_op(spec, "down", batch=3, workers=16, device="cpu")
    executor = ReferenceExecutor(plan, tensors, exact=True)
    executor.run_step(3)
    x, w, res = (tensors[n].float() for n in ("x", "w", "res"))
    want = x @ w.T + res
    got = executor.tensors["out"][:3].float()
    assert float((got - want).norm() / want.norm()) < 1e-2
