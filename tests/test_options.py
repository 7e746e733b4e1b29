"""``additional_config["mpk"]``: every bad value is an MpkOptionsError naming the key and what it
may hold, the bounds being the kernel's own (the rows a GPU linear tile stages, the watchdog's)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from vllm_mpk.codegen.ops.linear import MAX_LINEAR_BATCH
from vllm_mpk.integration.options import MpkOptions, MpkOptionsError
from vllm_mpk.runtime.watchdog import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S, MIN_TIMEOUT_S, TIMEOUT_RANGE


@pytest.mark.parametrize("raw,match", [
    ({"max_batch": MAX_LINEAR_BATCH + 1},
     rf'\["max_batch"\] must be a positive integer, at most {MAX_LINEAR_BATCH} .* got {MAX_LINEAR_BATCH + 1}'),
    ({"max_batch": 100000}, rf'\["max_batch"\] must be a positive integer, at most {MAX_LINEAR_BATCH}'),
    ({"max_batch": 8.0}, r'\["max_batch"\] must be a positive integer'),
    ({"timeout_s": 1e12}, rf'\["timeout_s"\] must be {re.escape(TIMEOUT_RANGE)}, got '),
    ({"timeout_s": 1e-12}, rf'\["timeout_s"\] must be {re.escape(TIMEOUT_RANGE)}, got 1e-12'),
    ({"timeout_s": float("nan")}, rf'\["timeout_s"\] must be {re.escape(TIMEOUT_RANGE)}'),
    ({"timeout_s": "2"}, rf'\["timeout_s"\] must be {re.escape(TIMEOUT_RANGE)}'),
    ({"schedule": ["earliest_finish"]}, r'\["schedule"\] must be one of'),
    ({"block_dim": 256.0}, r'\["block_dim"\] must be one of \(128, 256\)'),
    ({"num_workers": 0}, r'\["num_workers"\] must be a positive integer or null'),
    ({"profile": 1}, r'\["profile"\] must be true or false'),
])
def test_bad_values_name_the_key_and_the_range(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(MpkOptionsError, match=match):
        MpkOptions.from_dict(raw)


def test_options_built_directly_are_checked_too() -> None:
    with pytest.raises(MpkOptionsError, match=r'\["timeout_s"\]'):
        MpkOptions(timeout_s=0)
    with pytest.raises(MpkOptionsError, match=r'\["max_batch"\]'):
        MpkOptions(max_batch=MAX_LINEAR_BATCH * 2)


def test_the_ends_of_each_range_are_taken() -> None:
    options = MpkOptions.from_dict({"max_batch": MAX_LINEAR_BATCH, "timeout_s": MAX_TIMEOUT_S, "kv_splits": 1})
    assert (options.max_batch, options.timeout_s, options.kv_splits) == (MAX_LINEAR_BATCH, MAX_TIMEOUT_S, 1)
    assert MpkOptions.from_dict({"max_batch": 1, "timeout_s": MIN_TIMEOUT_S}).timeout_s == MIN_TIMEOUT_S
    assert MpkOptions.from_dict(None).timeout_s == DEFAULT_TIMEOUT_S
