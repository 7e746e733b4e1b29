"""The all-reduce (``graph/ops/allreduce.py``): a copy on one rank; with two, a fake peer's tiles
added through the executor's all-reduce hook."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.helpers import plan_inputs
from tests.ops import harness
from tests.ops.harness import BF16, BLOCK, F32, FLOAT_TOL, Built, OpTest, all_rows, kernel, randn
from vllm_mpk.graph.ir import box_slices


def build_allreduce(c: dict, gen: torch.Generator) -> Built:
    """World size 1 is a copy. With two ranks a linear layer writes the symmetric buffer and a fake
    peer adds its own tile: the executor's all-reduce hook gets each tile's box."""
    b, width, dt, world = c["batch"], c["n"], c["dtype"], c.get("world_size", 1)
    n = c.get("num_tokens", b)
    mpk = kernel(b, world_size=world)
    out = mpk.new_tensor((b, width), dt, "out")
    if world == 1:
        x = randn((b, width), gen, dt)
        mpk.allreduce_layer(mpk.attach_input(x, "x"), out, c["grid"], BLOCK)
        return Built(mpk, plan_inputs(mpk), n, {"out": all_rows(n, x)})
    x, w, peer = randn((b, 64), gen, dt), randn((width, 64), gen, dt, 0.125), randn((b, width), gen, dt)
    partial = mpk.new_tensor((b, width), dt, "partial", io_category="nvshmem_tensor")
    mpk.linear_layer(mpk.attach_input(x, "x"), mpk.attach_input(w, "w"), partial, 1, BLOCK)
    mpk.allreduce_layer(partial, out, c["grid"], BLOCK)

    def all_reduce(name: str, box: tuple, value: torch.Tensor) -> torch.Tensor:
        assert name == "partial"
        return value + peer[box_slices(box)].float()

    want = F.linear(x.float(), w.float()).to(dt).float() + peer.float()
    return Built(mpk, plan_inputs(mpk), n, {"out": all_rows(n, want.to(dt))}, all_reduce=all_reduce)


ALLREDUCE_CASES = [
    dict(id="b1-n64", batch=1, n=64, grid=8, dtype=F32),
    dict(id="b5-n100-partial-tile", batch=5, n=100, grid=13, dtype=BF16),
    dict(id="b16-world2-n10", batch=16, n=40, grid=3, dtype=F32, world_size=2, num_tokens=10),
]


OP_TESTS = [OpTest("allreduce", build_allreduce, ALLREDUCE_CASES, FLOAT_TOL)]
test_matches_torch = harness.test_matches_torch
