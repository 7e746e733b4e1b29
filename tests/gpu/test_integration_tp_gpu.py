"""``--tensor-parallel-size N --model-impl mpk`` in a real vLLM (marked gpu; needs N GPUs and
NVSHMEM; N = 2, and 4 where four GPUs are seen). Each engine runs in its own subprocess on a
2-layer random checkpoint; greedy tokens of ``model_impl="mpk"`` follow ``model_impl="vllm"`` at
the same TP size until the first step where they differ, which must be a near tie in stock's
top-two logprobs (a random checkpoint's logits are nearly flat, and the megakernel sums the ranks'
parts in another order than NCCL). `vllm serve` at TP=2 answers completions with stock's tokens,
compared teacher-forced (tests/vllm_serve.py). A stall on every rank fails its request and leaves
the engine serving on the stock layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.vllm_serve import serve_and_compare
from vllm_mpk.bench.greedy_compare import Greedy
from vllm_mpk.codegen.toolchain import has_nvshmem
from vllm_mpk.models.catalog import shipped_config
from vllm_mpk.models.spec import ModelSpec
from vllm_mpk.models.weights import random_weights, save_checkpoint
from vllm_mpk.runtime import nvshmem

_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("vllm_plugin_installed"),
              pytest.mark.skipif(_GPUS < 2, reason=f"needs 2 GPUs, torch sees {_GPUS}"),
              pytest.mark.skipif(not has_nvshmem(), reason="NVSHMEM is not installed")]

REPO = Path(__file__).resolve().parents[2]
STEPS, NEAR_TIE = 32, 0.1  # nats between stock's top two where a different pick is a tie, not an error

ENGINE = r"""
import json, sys
args = json.load(open(sys.argv[1]))
sys.path.insert(0, args["repo"])
from vllm import LLM, SamplingParams
llm = LLM(model=args["model"], model_impl=args["impl"], tensor_parallel_size=args["tp"], skip_tokenizer_init=True,
          dtype="bfloat16", seed=0, max_model_len=512, gpu_memory_utilization=0.35, enforce_eager=args["eager"],
          compilation_config=None if args["eager"] else {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"},
          additional_config={"mpk": args["mpk"]},
          worker_extension_cls="vllm_mpk.bench.step_timer.StepTimer")
params = SamplingParams(temperature=0.0, max_tokens=args["steps"], logprobs=5, ignore_eos=True, detokenize=False)
results = llm.generate([{"prompt_token_ids": p} for p in args["prompts"]], params, use_tqdm=False)
out = {"tokens": [list(r.outputs[0].token_ids) for r in results],
       "logprobs": [[{str(t): lp.logprob for t, lp in s.items()} for s in r.outputs[0].logprobs] for r in results]}
if args["stall"]:  # every rank's first event can never fire: that request fails, then every rank serves on stock
    import torch
    def break_first_event(model):
        with torch.inference_mode():
            for kernel in model._mpk.kernels.values():
                kernel.triggers[0].add_(1 << 20)
    llm.apply_model(break_first_event)
    stalled = llm.generate([{"prompt_token_ids": args["prompts"][0]}], SamplingParams(
        temperature=0.0, max_tokens=4, ignore_eos=True, detokenize=False), use_tqdm=False)[0].outputs[0]
    out["stall"] = {"finish_reason": stalled.finish_reason, "tokens": list(stalled.token_ids)}
    out["stopped_workers"] = llm.collective_rpc("bench_mpk_state")
    results = llm.generate([{"prompt_token_ids": p} for p in args["prompts"]], params, use_tqdm=False)
    out["tokens"] = [list(r.outputs[0].token_ids) for r in results]  # the engine that stopped, on stock
if args["impl"] == "mpk":
    out["workers"] = llm.collective_rpc("bench_mpk_state")  # one per rank (a method name: nothing to pickle)
json.dump(out, open(args["out"], "w"))
"""


@pytest.fixture(scope="module", params=["qwen3-0.6b", "llama-3.2-1b"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = {**shipped_config(request.param), "num_hidden_layers": 2, "torch_dtype": "bfloat16"}
    spec = ModelSpec.from_hf_config(config)
    path = tmp_path_factory.mktemp(request.param)
    (path / "config.json").write_text(json.dumps(config))
    save_checkpoint(spec, random_weights(spec, seed=1), path)
    return path


def prompts(model: Path) -> list[list[int]]:
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (int(n),), generator=gen).tolist() for n in (9, 40, 17, 100)]


def run_engine(tmp: Path, model: Path, impl: str, eager: bool, tp: int = 2,
               stall: bool = False) -> tuple[dict[str, Any], str]:
    """One engine in a subprocess: every prompt's greedy tokens. ``stall`` (non-strict, watchdog
    1 s): afterwards, break an event of every rank's megakernels, record how the next request
    ends, and take the tokens again from the engine that stopped."""
    out = tmp / f"{impl}-{eager}.json"
    mpk = {"max_batch": 8, "tensor_parallel": True, **({"timeout_s": 1.0} if stall else {"strict": True})}
    args = dict(model=str(model), impl=impl, tp=tp, eager=eager, steps=STEPS, prompts=prompts(model), repo=str(REPO),
                out=str(out), mpk=mpk, stall=stall)
    (tmp / f"{impl}-{eager}.args.json").write_text(json.dumps(args))
    # NVLink multicast off in NCCL, torch and NVSHMEM from the start (vLLM's NCCL groups come first);
    # apply_model pickles its function
    env = {**os.environ, **nvshmem.ENVIRONMENT, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    proc = subprocess.run([sys.executable, "-c", ENGINE, str(tmp / f"{impl}-{eager}.args.json")],
                          capture_output=True, text=True, timeout=900, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return json.loads(out.read_text()), log


@pytest.fixture(scope="module")
def stock_tp(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, Any]]:
    """Stock vLLM's greedy run of a checkpoint at a TP size, eager or with FULL decode graphs, made
    once per module (the greedy and the serve tests compare against the same one)."""
    runs: dict[tuple[Path, bool, int], dict[str, Any]] = {}

    def get(checkpoint: Path, eager: bool, tp: int = 2) -> dict[str, Any]:
        if (checkpoint, eager, tp) not in runs:
            runs[checkpoint, eager, tp] = run_engine(tmp_path_factory.mktemp("stock"), checkpoint, "vllm", eager,
                                                     tp)[0]
        return runs[checkpoint, eager, tp]

    return get


@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.skipif(_GPUS < 4, reason=f"needs 4 GPUs, "
                                                                                                 f"torch sees {_GPUS}"))])
@pytest.mark.parametrize("eager", [False, True], ids=["cuda-graphs", "eager"])
def test_tp_greedy_tokens_follow_stock_at_the_same_tp(checkpoint: Path, tmp_path: Path, eager: bool, tp: int,
                                                      stock_tp) -> None:
    stock = stock_tp(checkpoint, eager, tp)
    ours, log = run_engine(tmp_path, checkpoint, "mpk", eager, tp)
    assert "megakernel ready" in log
    assert len(ours["workers"]) == tp
    for worker in ours["workers"]:
        assert worker["class"].startswith("Mpk") and worker["built"] and worker["disabled"] is None
        assert worker["steps"] > 0
    compared, ties = follows_stock(ours["tokens"], stock)
    print(f"{checkpoint.name} TP={tp} {'eager' if eager else 'graphs'}: {compared} steps compared, {ties} near ties")


def follows_stock(tokens: list[list[int]], stock: dict[str, Any]) -> tuple[int, int]:
    """Each request's tokens equal stock's up to the first difference, which must be a near tie in
    stock's logprobs (nothing after it is comparable); returns the steps compared and the ties."""
    compared = ties = 0
    for got, want, logprobs in zip(tokens, stock["tokens"], stock["logprobs"], strict=True):
        first = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
        compared += len(want) if first is None else first + 1
        if first is not None:
            top2 = sorted(logprobs[first].values(), reverse=True)[:2]
            assert top2[0] - top2[1] < NEAR_TIE, f"step {first}: picked {got[first]}, stock {want[first]} " \
                                                 f"with a margin of {top2[0] - top2[1]:.3f} nats"
            ties += 1
    assert compared >= len(stock["tokens"])  # at least every request's first decoded token
    return compared, ties


def test_tp2_stall_fails_its_request_and_every_rank_serves_on_stock(checkpoint: Path, tmp_path: Path,
                                                                    stock_tp) -> None:
    """A stall on every rank (an event that never fires, watchdog 1 s): the request fails with
    finish reason "error" and none of the stopped steps' tokens; every rank then turns its
    megakernel off at the same step (their collective reset pairs up), logs one warning, and the
    engine's tokens follow stock TP=2's again."""
    stock = stock_tp(checkpoint, False)
    ours, log = run_engine(tmp_path, checkpoint, "mpk", False, stall=True)
    assert ours["stall"]["finish_reason"] == "error" and len(ours["stall"]["tokens"]) <= 1, ours["stall"]
    assert log.count("stopped on its watchdog") == 2 and "timeout waiting on an event" in log, log[-6000:]
    for stopped, worker in zip(ours["stopped_workers"], ours["workers"], strict=True):
        assert "watchdog" in (worker["disabled"] or "") and worker["steps"] == stopped["steps"]
    compared, ties = follows_stock(ours["tokens"], stock)
    print(f"{checkpoint.name} TP=2 on stock after a stall: {compared} steps compared, {ties} near ties")


def test_tp2_vllm_serve_on_loopback(checkpoint: Path, tmp_path: Path, stock_tp) -> None:
    """`vllm serve --tensor-parallel-size 2 --model-impl mpk` answers completions with stock TP=2's
    greedy tokens (near ties aside) and streams what it returns in one piece."""
    stock = stock_tp(checkpoint, False)
    first = Greedy.from_json({"tokens": stock["tokens"][0], "logprobs": stock["logprobs"][0]})
    served = serve_and_compare(checkpoint, tmp_path, prompts(checkpoint)[0], first,
                               ("--tensor-parallel-size", "2"), env={**os.environ, **nvshmem.ENVIRONMENT},
                               mpk={"tensor_parallel": True})
    print(f"{checkpoint.name} TP=2 vllm serve: {served.comparison.summary()}")
    served.check()
