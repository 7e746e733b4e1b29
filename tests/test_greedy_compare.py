"""The teacher-forced greedy comparison (vllm_mpk/bench/greedy_compare.py) against a fake engine.

Its tolerances come from a CPU measurement on the integration tests' 4-layer random checkpoints
(seed 1), four of their bs8 prompts, 64 steps teacher-forced on float32 ``transformers``' greedy
tokens: ``transformers`` in bf16 against the megakernel's plan on the reference executor in bf16
(``vllm_mpk.check.run_teacher_forced``), two bf16 implementations with different reduction orders,
as stock vLLM and the megakernel are. Per 256 steps:

    model          |chosen logprob diff| max, p99, median   greedy flips   largest top-two gap at a flip
    qwen3-0.6b     0.040, 0.027, 0.007                      13             0.031
    llama-3.2-1b   0.101, 0.096, 0.017                      20             0.078

The logits are nearly flat over the vocabulary (std 0.65 and 0.9; the top token leads the mean by
3 and 4 nats): the top two are within 0.1 nats at about 40% of the steps.
"""

from __future__ import annotations

import json

import pytest

from vllm_mpk.bench.greedy_compare import Comparison, Greedy, compare_teacher_forced

STEPS = 12
TIE, CLEAR = 0.05, 1.0  # stock's top-two gaps
OFF_PATH = 999  # what the fake engine emits once it has left stock's path


def stock_run(prompts: list[list[int]], ties: set[tuple[int, int]]) -> list[Greedy]:
    """Stock's token at step s of request i is 100 i + s, its runner-up that + 50; the gap is TIE at
    (i, s) in ``ties``, else CLEAR."""
    out = []
    for i in range(len(prompts)):
        tokens = [100 * i + s for s in range(STEPS)]
        logprobs = [{t: -1.0, t + 50: -1.0 - (TIE if (i, s) in ties else CLEAR)} for s, t in enumerate(tokens)]
        out.append(Greedy(tokens, logprobs))
    return out


class FakeEngine:
    """Follows stock's tokens, except at ``flips`` ((request, step) -> token) when its input is
    stock's own prefix; after a flip it goes off on a path of its own, as a real engine would.
    Reports stock's logprob of each token it chooses, plus ``logprob_error``."""

    def __init__(self, prompts: list[list[int]], stock: list[Greedy], flips: dict[tuple[int, int], int],
                 logprob_error: float = 0.01, logprobs: bool = True) -> None:
        self.prompts, self.stock, self.flips = prompts, stock, flips
        self.logprob_error, self.logprobs = logprob_error, logprobs
        self.calls: list[list[tuple[int, int]]] = []  # (request, first step) of each continuation asked

    def __call__(self, batch: list[list[int]], max_tokens: list[int]) -> list[Greedy]:
        outs, call = [], []
        for seq, n in zip(batch, max_tokens, strict=True):
            i = next(i for i, p in enumerate(self.prompts) if seq[:len(p)] == p)
            start = len(seq) - len(self.prompts[i])
            assert seq[len(self.prompts[i]):] == self.stock[i].tokens[:start], "restarted off stock's path"
            assert start + n == STEPS
            call.append((i, start))
            tokens, logprobs, off = [], [], False
            for step in range(start, STEPS):
                want = self.stock[i].tokens[step]
                token = OFF_PATH if off else self.flips.get((i, step), want)
                off = token != want
                tokens.append(token)
                logprobs.append({token: self.stock[i].logprobs[step].get(token, -5.0) + self.logprob_error})
            outs.append(Greedy(tokens, logprobs if self.logprobs else None))
        self.calls.append(call)
        return outs


PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]


def compare(ties: set[tuple[int, int]], flips: dict[tuple[int, int], int], **engine) -> tuple[Comparison, FakeEngine]:
    stock = stock_run(PROMPTS, ties)
    fake = FakeEngine(PROMPTS, stock, flips, **engine)
    return compare_teacher_forced(PROMPTS, stock, fake), fake


def test_identical_tokens_take_one_batched_call() -> None:
    result, fake = compare(set(), {})
    result.check()
    assert (result.steps, result.near_ties, result.mismatches) == (3 * STEPS, [], [])
    assert fake.calls == [[(0, 0), (1, 0), (2, 0)]]
    assert result.max_logprob_diff == pytest.approx(0.01) and result.logprob_steps == 3 * STEPS


def test_two_near_ties_are_counted_and_restarted_together() -> None:
    result, fake = compare({(0, 3), (2, 5)}, {(0, 3): 50 + 3, (2, 5): 200 + 5 + 50})
    result.check()
    print(result.summary())
    assert result.steps == 3 * STEPS and not result.mismatches
    assert [(d.request, d.step, d.gap) for d in result.near_ties] == [(0, 3, pytest.approx(TIE)),
                                                                      (2, 5, pytest.approx(TIE))]
    assert fake.calls == [[(0, 0), (1, 0), (2, 0)], [(0, 4), (2, 6)]]


def test_near_ties_in_a_row_and_at_the_last_step() -> None:
    ties = {(1, 0), (1, 1), (1, STEPS - 1)}
    result, fake = compare(ties, {(i, s): 100 * i + s + 50 for i, s in ties})
    result.check()
    assert len(result.near_ties) == 3 and result.steps == 3 * STEPS
    assert fake.calls == [[(0, 0), (1, 0), (2, 0)], [(1, 1)], [(1, 2)]]  # nothing left after the last step


def test_a_flip_that_is_not_a_near_tie_fails() -> None:
    result, _ = compare(set(), {(1, 4): 100 + 4 + 50})
    assert [(d.request, d.step, d.gap) for d in result.mismatches] == [(1, 4, pytest.approx(CLEAR))]
    assert result.steps == 3 * STEPS  # the comparison went on past it
    with pytest.raises(AssertionError, match="(?s)do not make it a near tie.*MISMATCH: request 1 step 4"):
        result.check()


def test_a_token_outside_stocks_candidates_fails() -> None:
    result, _ = compare({(0, 2)}, {(0, 2): 7})
    assert result.mismatches[0].gap is None
    with pytest.raises(AssertionError, match="not among stock's candidates"):
        result.check()


def test_too_many_near_ties_fail() -> None:
    ties = {(0, s) for s in range(0, STEPS, 2)} | {(1, s) for s in range(0, STEPS, 2)}
    result, _ = compare(ties, {(i, s): 100 * i + s + 50 for i, s in ties})
    assert not result.mismatches and len(result.near_ties) == STEPS
    with pytest.raises(AssertionError, match="near ties"):
        result.check()
    result.check(max_tie_fraction=0.5)


def test_logprobs_beyond_tolerance_fail_and_are_skipped_without_logprobs() -> None:
    result, _ = compare(set(), {}, logprob_error=0.5)
    assert result.max_logprob_diff == pytest.approx(0.5)
    with pytest.raises(AssertionError, match="logprobs differ"):
        result.check()
    result.check(logprob_tolerance=None)
    result, _ = compare({(2, 1)}, {(2, 1): 200 + 1 + 50}, logprob_error=0.5, logprobs=False)
    assert result.max_logprob_diff is None and len(result.near_ties) == 1
    result.check()


def test_json_round_trip() -> None:
    result, _ = compare({(0, 3)}, {(0, 3): 53, (1, 2): 7})
    assert Comparison.from_json(json.loads(json.dumps(result.to_json()))) == result
    stock = stock_run(PROMPTS, set())[0]
    as_json = {"tokens": stock.tokens, "logprobs": [{str(t): lp for t, lp in s.items()} for s in stock.logprobs]}
    assert Greedy.from_json(json.loads(json.dumps(as_json))) == stock
