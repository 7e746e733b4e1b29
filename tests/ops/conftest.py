"""Parametrises each op module's ``test_matches_torch`` over its ``OP_TESTS`` cases and every
execution order of the reference executor."""

from __future__ import annotations

import pytest

from tests.helpers import ORDERS


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if {"op_test", "case"} <= set(metafunc.fixturenames):
        op_tests = metafunc.module.OP_TESTS
        metafunc.parametrize("op_test,case", [pytest.param(t, c, id=f"{t.kind}-{c['id']}")
                                              for t in op_tests for c in t.cases])
        metafunc.parametrize("order", ORDERS)
