"""Greedy tokens of an engine against stock vLLM's, teacher-forced so that one near tie does not end
the comparison (pure: the GPU integration tests run it inside the engine's subprocess, with
``LLM.generate`` as the generator; ``tests/test_greedy_compare.py`` runs it with a fake one).

Stock vLLM runs first: its greedy token and its top few logprobs (the candidates) at every step. The engine under test
then generates from the same prompts, all requests in one batch. At the first step ``t`` where a
request's token differs from stock's, it must be a near tie: stock's candidates hold our token, less
than ``near_tie`` below stock's own; that request restarts from ``prompt + stock[:t + 1]`` for the
remaining steps, which are compared with ``stock[t + 1:]``: stock generated those from the very
same prefix. Restarts of several requests go through one generate call. A divergence that is not a
near tie is a mismatch; its request is restarted the same way, so all of them are counted.

Where stock reports a logprob for the token we chose (every agreeing step, and near ties), the two
logprobs are compared as well.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# nats. Measured on the CPU (tests/test_greedy_compare.py's docstring): two bf16 implementations of
# the integration tests' random checkpoints flip the greedy token at 5-8% of the steps, at top-two
# gaps up to 0.03 (qwen3-0.6b) and 0.08 (llama-3.2-1b, larger logits) in 256 steps; the GPU tests
# see 576 per model, hence about twice the largest gap seen.
NEAR_TIE = 0.15
# nats. Largest |our logprob - stock's| of the same token after the same prefix. The same
# measurement: up to 0.04 (qwen3-0.6b) and 0.10 (llama-3.2-1b); a wrong position, cache page or
# layer moves it by about the chosen token's lead over the mean logit, 3-4 nats.
LOGPROB_TOLERANCE = 0.25
MAX_TIE_FRACTION = 0.25  # near ties per compared step (5-8% measured); more: noisier than bf16


@dataclass
class Greedy:
    """One request's greedy continuation; ``logprobs`` per step: top candidates (token -> logprob),
    which hold the chosen token. Engines that report none (``vllm serve`` here) leave it ``None``."""

    tokens: list[int]
    logprobs: list[dict[int, float]] | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Greedy:
        """From ``{"tokens": [...], "logprobs": [{"token": logprob}, ...]}`` (JSON keys are strings)."""
        logprobs = data.get("logprobs")
        return cls(list(data["tokens"]),
                   None if logprobs is None else [{int(t): float(lp) for t, lp in s.items()} for s in logprobs])


# (prompts, max new tokens of each) -> their greedy continuations, in the same order.
Generate = Callable[[list[list[int]], list[int]], list[Greedy]]


@dataclass
class Divergence:
    request: int
    step: int
    ours: int
    stock: int
    gap: float | None  # stock's logprob of its token minus that of ours; None: ours not among stock's candidates

    def __str__(self) -> str:
        gap = "not among stock's candidates" if self.gap is None else f"gap {self.gap:.4f}"
        return f"request {self.request} step {self.step}: {self.ours} vs stock {self.stock} ({gap})"


@dataclass
class Comparison:
    near_tie: float = NEAR_TIE
    steps: int = 0  # steps compared, over all requests
    near_ties: list[Divergence] = field(default_factory=list)
    mismatches: list[Divergence] = field(default_factory=list)
    generate_calls: int = 0
    logprob_steps: int = 0  # steps where both logprobs of our token were known
    max_logprob_diff: float | None = None

    def summary(self) -> str:
        lp = "no logprobs" if self.max_logprob_diff is None else \
            f"max |logprob - stock's| {self.max_logprob_diff:.4f} over {self.logprob_steps} steps"
        ties = "".join(f"\n  near tie: {d}" for d in sorted(self.near_ties, key=lambda d: (d.request, d.step)))
        order = sorted(self.mismatches, key=lambda d: (d.request, d.step))
        bad = "".join(f"\n  MISMATCH: {d}" for d in order[:10])
        more = f"\n  ... {len(self.mismatches) - 10} more mismatches" if len(self.mismatches) > 10 else ""
        return (f"{self.steps} steps compared teacher-forced, {len(self.near_ties)} near ties (stock's gap to our token "
                f"< {self.near_tie}), {len(self.mismatches)} mismatches, {lp}, {self.generate_calls} generate calls"
                f"{ties}{bad}{more}")

    def check(self, *, max_tie_fraction: float = MAX_TIE_FRACTION,
              logprob_tolerance: float | None = LOGPROB_TOLERANCE) -> None:
        """Raise AssertionError (with the summary) unless every divergence is a near tie, near ties are
        at most ``max_tie_fraction`` of the steps and logprobs agree within ``logprob_tolerance``."""
        assert self.steps > 0, "nothing was compared"
        assert not self.mismatches, f"greedy tokens differ where stock's logprobs do not make it a near tie: {self.summary()}"
        assert len(self.near_ties) <= max_tie_fraction * self.steps, \
            f"more than {max_tie_fraction:.0%} of the steps are near ties: {self.summary()}"
        if logprob_tolerance is not None and self.max_logprob_diff is not None:
            assert self.max_logprob_diff <= logprob_tolerance, \
                f"logprobs differ from stock's by more than {logprob_tolerance} nats: {self.summary()}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Comparison:
        return cls(**{**data, "near_ties": [Divergence(**d) for d in data["near_ties"]],
                      "mismatches": [Divergence(**d) for d in data["mismatches"]]})


def compare_teacher_forced(prompts: Sequence[list[int]], stock: Sequence[Greedy], generate: Generate,
                           near_tie: float = NEAR_TIE) -> Comparison:
    """Compare ``generate``'s greedy tokens with ``stock``'s (which needs logprobs) at every step,
    restarting each request from stock's prefix after each divergence (module docstring)."""
    assert len(prompts) == len(stock) and all(s.logprobs is not None for s in stock), "stock needs logprobs"
    result = Comparison(near_tie)
    done = [0] * len(prompts)  # steps of each request compared so far
    pending = [i for i, s in enumerate(stock) if s.tokens]
    while pending:
        outs = generate([list(prompts[i]) + stock[i].tokens[:done[i]] for i in pending],
                        [len(stock[i].tokens) - done[i] for i in pending])
        result.generate_calls += 1
        assert len(outs) == len(pending), f"asked for {len(pending)} continuations, got {len(outs)}"
        for i, out in zip(pending, outs):
            want = stock[i].tokens[done[i]:]
            assert len(out.tokens) == len(want), \
                f"request {i}: asked for {len(want)} tokens after step {done[i]}, got {len(out.tokens)}"
            for j, (ours, theirs) in enumerate(zip(out.tokens, want)):
                step = done[i] + j
                candidates = stock[i].logprobs[step]
                if out.logprobs is not None and ours in candidates and ours in out.logprobs[j]:
                    diff = abs(out.logprobs[j][ours] - candidates[ours])
                    result.max_logprob_diff = max(diff, result.max_logprob_diff or 0.0)
                    result.logprob_steps += 1
                result.steps += 1
                if ours != theirs:
                    gap = candidates[theirs] - candidates[ours] if ours in candidates else None
                    tie = gap is not None and gap < near_tie
                    (result.near_ties if tie else result.mismatches).append(Divergence(i, step, ours, theirs, gap))
                    done[i] = step + 1
                    break
            else:
                done[i] = len(stock[i].tokens)
        pending = [i for i in pending if done[i] < len(stock[i].tokens)]
    return result
