"""Every op family has its test module under ``tests/ops`` with cases."""

from __future__ import annotations

from tests.ops import all_op_tests
from vllm_mpk.graph.ops import REGISTRY


def test_every_op_kind_has_cases() -> None:
    op_tests = all_op_tests()
    assert sorted(t.kind for t in op_tests) == sorted(REGISTRY)
    assert all(t.cases for t in op_tests)
