"""One op of a model's decoder layer alone in a megakernel on every SM: from the profiler, its
task time (gate open to signal, median over its tiles) and stage time (first gate opening to
last signal: its length on a step's critical path), and the bytes it streams over the stage. The
micro-benchmark that found v9's attention cost, for the linear tiles (how they grow from bs1 to
bs16; what double-buffering costs the small models). L2 is overwritten before each launch, as a
decode step finds it.

    python benchmarks/task_bench.py --models qwen3-0.6b llama-3.1-8b --ops qkv gate_up --batches 1 8 16

A variant's tree: ``PYTHONPATH=<tree> python <tree>/benchmarks/task_bench.py ...`` beside main.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from statistics import median

import torch

from vllm_mpk import PersistentKernel
from vllm_mpk.graph.plan import Plan
from vllm_mpk.models.catalog import resolve_model
from vllm_mpk.models.decoder import linear_grid
from vllm_mpk.models.spec import ModelSpec

BLOCK = (256, 1, 1)
AddOp = Callable[[PersistentKernel, Callable[..., object], ModelSpec, int], None]


def _qkv(mpk: PersistentKernel, tensor: Callable[..., object], s: ModelSpec, w: int) -> None:
    mpk.rmsnorm_linear_layer(tensor("x", s.hidden_size), tensor("norm", None, s.hidden_size),
                             tensor("w", s.qkv_width, s.hidden_size), mpk.new_tensor((mpk.max_batch, s.qkv_width),
                                                                                     torch.bfloat16, "out"),
                             linear_grid(s.qkv_width, w), BLOCK, name="qkv_proj")


def _o_proj(mpk: PersistentKernel, tensor: Callable[..., object], s: ModelSpec, w: int) -> None:
    width = s.num_q_heads * s.head_dim
    mpk.linear_with_residual_layer(tensor("x", width), tensor("w", s.hidden_size, width), tensor("res", s.hidden_size),
                                   mpk.new_tensor((mpk.max_batch, s.hidden_size), torch.bfloat16, "out"),
                                   linear_grid(s.hidden_size, w), BLOCK, name="o_proj")


def _gate_up(mpk: PersistentKernel, tensor: Callable[..., object], s: ModelSpec, w: int) -> None:
    i = s.intermediate_size
    mpk.rmsnorm_linear_silu_mul_layer(tensor("x", s.hidden_size), tensor("norm", None, s.hidden_size),
                                      tensor("w", 2 * i, s.hidden_size),
                                      mpk.new_tensor((mpk.max_batch, i), torch.bfloat16, "out"),
                                      linear_grid(2 * i, w), BLOCK, name="gate_up_proj")


def _down(mpk: PersistentKernel, tensor: Callable[..., object], s: ModelSpec, w: int) -> None:
    i = s.intermediate_size
    mpk.linear_with_residual_layer(tensor("x", i), tensor("w", s.hidden_size, i), tensor("res", s.hidden_size),
                                   mpk.new_tensor((mpk.max_batch, s.hidden_size), torch.bfloat16, "out"),
                                   linear_grid(s.hidden_size, w), BLOCK, name="down_proj")


OPS: dict[str, AddOp] = {"qkv": _qkv, "o_proj": _o_proj, "gate_up": _gate_up, "down": _down}


def build_op(spec: ModelSpec, op: str, batch: int, workers: int, device: str) -> tuple[Plan, dict[str, torch.Tensor]]:
    """A plan holding only ``op`` at ``spec``'s shapes, with random inputs and weights on ``device``."""
    mpk = PersistentKernel(num_workers=workers, max_batch=batch, max_seq_len=16)

    def tensor(name: str, rows: int | None, cols: int | None = None):
        """An attached input: ``[batch, rows]`` activations, ``[rows, cols]`` weights, ``[cols]`` norms."""
        shape = (cols,) if rows is None else (batch, rows) if cols is None else (rows, cols)
        t = torch.randn(shape, device=device) * (1.0 if len(shape) == 1 or cols is None else cols ** -0.5)
        return mpk.attach_input(t.to(torch.bfloat16), name)

    OPS[op](mpk, tensor, spec, workers)
    return mpk.compile(), {**mpk.attached, **mpk.step_buffers}


def l2_evictor(device: str) -> Callable[[], None]:
    """Overwrites a buffer of twice the GPU's L2 cache, so the next launch finds none of its
    weights there (repeated launches of a small op such as o_proj would otherwise read them from
    L2: 3.6-3.9 TB/s for Llama-3.1-8B's on an H100)."""
    scratch = torch.empty(2 * torch.cuda.get_device_properties(device).L2_cache_size, dtype=torch.uint8,
                          device=device)
    return lambda: scratch.fill_(1)


def time_op(spec: ModelSpec, op: str, batch: int, workers: int) -> dict[str, float]:
    """Median task and stage time (µs) over ``launches`` profiled launches, and the stage's GB/s."""
    from vllm_mpk.runtime.megakernel import Megakernel
    from vllm_mpk.runtime.profiler import stage_ns, task_spans

    plan, tensors = build_op(spec, op, batch, workers, "cuda")
    kernel = Megakernel(plan, tensors, profile=True)
    evict = l2_evictor("cuda")
    tasks, stages = [], []
    for _ in range(20):
        evict()  # a step streams each weight once: none of it is in L2 when the op starts
        kernel.launch(batch)
        torch.cuda.synchronize()
        kernel.check()
        spans = task_spans(plan, kernel.profile)
        tasks.append(median(s.end_ns - s.start_ns for s in spans))
        stages.append(stage_ns(spans))
    stage_ns = median(stages)
    nbytes = sum(t.bytes for t in plan.tasks)
    return {"task_us": median(tasks) / 1e3, "stage_us": stage_ns / 1e3, "gbps": nbytes / stage_ns}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["qwen3-0.6b", "llama-3.1-8b"])
    p.add_argument("--ops", nargs="+", choices=sorted(OPS), default=sorted(OPS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16])
    p.add_argument("--workers", type=int, default=132)
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, {args.workers} workers")
    print(f"{'model':14} {'op':8} {'bs':>3} {'task us':>8} {'stage us':>9} {'GB/s':>7}")
    for m in args.models:
        spec = resolve_model(m).spec
        for op in args.ops:
            for b in args.batches:
                r = time_op(spec, op, b, args.workers)
                print(f"{m:14} {op:8} {b:>3} {r['task_us']:8.2f} {r['stage_us']:9.2f} {r['gbps']:7.0f}", flush=True)


if __name__ == "__main__":
    main()
