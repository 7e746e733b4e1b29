"""What every op test shares: one tiny kernel per case, built by the op's ``build`` and compiled,
run by the reference executor and compared with what plain torch says.

Each ``tests/ops/test_<op>.py`` defines its families' ``OP_TESTS`` (builder, cases, tolerances)
and binds ``test_matches_torch``; ``conftest.py`` parametrises it over those cases and every
execution order. Sizes are awkward on purpose (batch 1, 5, 16; widths that leave a partial last
tile; sequence lengths on both sides of page boundaries) and every case draws its own random
inputs. The executor poisons intermediates with NaN before the step, so an output element that no
tile writes shows up as NaN. The torch definitions here are written independently of ``graph/ops``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tests.helpers import seed_of
from vllm_mpk.api import PersistentKernel
from vllm_mpk.graph.reference import ReferenceExecutor

BLOCK = (128, 1, 1)
WORKERS = 3  # odd, fewer than most grids: workers interleave tiles of several ops
EPS = 1e-6
F32, BF16 = torch.float32, torch.bfloat16
# float32 outputs agree to rounding; bfloat16 ones may differ by one unit in the last place (2**-8)
# where the float32 results fall on either side of a rounding boundary
FLOAT_TOL = {F32: dict(rtol=2e-5, atol=2e-5), BF16: dict(rtol=1.6e-2, atol=1e-2)}
EXACT = {torch.int64: dict(rtol=0, atol=0)}
INDEX_EXACT = {torch.int64: dict(rtol=0, atol=0), torch.int32: dict(rtol=0, atol=0)}


@dataclass
class Built:
    """A kernel with one layer (or a producer and the layer), its inputs and what torch says."""

    mpk: PersistentKernel
    inputs: dict[str, torch.Tensor]
    num_tokens: int
    expected: dict[str, tuple[list[int], torch.Tensor]]  # output -> (rows checked, their values)
    state: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # -> (after, may change)
    all_reduce: Callable | None = None


@dataclass
class OpTest:
    kind: str
    build: Callable[[dict, torch.Generator], Built]
    cases: list[dict]
    tolerance: dict[torch.dtype, dict[str, float]]


def randn(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(shape, generator=gen)).to(dtype)


def norm_weight(n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return (1 + 0.1 * torch.randn(n, generator=gen)).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight.float()


def kernel(batch: int, **kw) -> PersistentKernel:
    return PersistentKernel(num_workers=WORKERS, max_batch=batch, max_seq_len=kw.pop("max_seq_len", 64), **kw)


def all_rows(n: int, value: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    return list(range(n)), value[:n]


def check_outputs(built: Built, tensors: dict[str, torch.Tensor], tolerance: dict, where: str) -> None:
    for name, (rows, want) in built.expected.items():
        got = tensors[name][rows]
        assert got.dtype == want.dtype, f"{where}: {name} has dtype {got.dtype}, expected {want.dtype}"
        if got.is_floating_point():
            assert not got.isnan().any(), f"{where}: {name} has unwritten (NaN) elements in rows {rows}"
        torch.testing.assert_close(got, want, **tolerance[want.dtype], msg=lambda m: f"{where}: {name}: {m}")
    for name, (after, may_change) in built.state.items():
        got, before = tensors[name], built.inputs[name]
        assert torch.equal(got[~may_change], before[~may_change]), f"{where}: {name} changed outside the new slots"
        torch.testing.assert_close(got, after, **tolerance[after.dtype], msg=lambda m: f"{where}: {name}: {m}")


def test_matches_torch(op_test: OpTest, case: dict, order: str) -> None:
    """The case's kernel, run by the reference executor in ``order``, gives what torch says."""
    gen = torch.Generator().manual_seed(seed_of(f"{op_test.kind}-{case['id']}"))
    built = op_test.build(case, gen)
    plan = built.mpk.compile()
    assert {op.kind for op in plan.ops} >= {op_test.kind}
    for seed in (0, 1, 2) if order == "random" else (0,):
        executor = ReferenceExecutor(plan, {k: v.clone() for k, v in built.inputs.items()},
                                     all_reduce=built.all_reduce)
        executor.run_step(built.num_tokens, order=order, seed=seed)
        check_outputs(built, executor.tensors, op_test.tolerance, f"{order} order, seed {seed}")
