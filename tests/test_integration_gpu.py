"""``--model-impl mpk`` in a real vLLM on a Hopper GPU (marked gpu; skipped without CUDA).

Each engine runs in a subprocess of its own (GPU memory and vLLM's process-wide state are freed
when it exits), on a random checkpoint at realistic scale (normal(0, 0.02) weights saved as
safetensors). Greedy tokens of ``model_impl="mpk"`` are compared with ``model_impl="vllm"`` on the
same weights, teacher-forced (vllm_mpk/bench/greedy_compare.py): stock runs first; the mpk engine generates
from the same prompts, and after each step where its token differs (which must be a near tie in
stock's top logprobs) that request restarts from the prompt plus stock's tokens through that
step, until every step is compared. Near ties are counted and printed (``-s`` or ``-rA``), and so
is the largest difference of the chosen token's logprob. Such a random checkpoint's logits are
nearly flat over the vocabulary: stock's top two are within 0.1 nats at about 40% of the steps,
so a flip may pick stock's third or fourth token: each step keeps stock's top CANDIDATES logprobs.

Startup is kept short with ``-cc.mode=0 -cc.cudagraph_mode=FULL_DECODE_ONLY`` (FULL decode graphs,
no torch.compile); ``enforce_eager`` runs count the megakernel steps launched from Python.
"""

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
from vllm_mpk.bench.greedy_compare import NEAR_TIE, Comparison, Greedy
from vllm_mpk.models.catalog import shipped_config
from vllm_mpk.models.spec import ModelSpec
from vllm_mpk.models.weights import random_weights, save_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("vllm_plugin_installed")]

STEPS = 64
LAYERS = 4
MODELS = ("qwen3-0.6b", "llama-3.2-1b")
MOE_MODEL, MOE_LAYERS = "qwen3-30b-a3b", 2
CANDIDATES = 5  # logprobs per step: a near tie's token is among them (vllm_mpk/bench/greedy_compare.py)
REPO = Path(__file__).resolve().parents[1]
FAST = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}

ENGINE = r"""
import json, sys
from dataclasses import asdict
import torch
args = json.load(open(sys.argv[1]))
sys.path.insert(0, args["repo"])
from vllm_mpk.bench.greedy_compare import Greedy, compare_teacher_forced
from vllm import LLM, SamplingParams
llm = LLM(model=args["model"], model_impl=args["impl"], skip_tokenizer_init=True, dtype="bfloat16", seed=0,
          max_model_len=512, gpu_memory_utilization=0.35, enforce_eager=args["eager"],
          compilation_config=None if args["eager"] or args["compilation"] is None else args["compilation"],
          load_format=args["load_format"], attention_backend=args["attention_backend"],
          kv_cache_dtype=args["kv_cache_dtype"], additional_config={"mpk": args["mpk"]})

def as_greedy(result):
    out = result.outputs[0]
    return Greedy(list(out.token_ids), [{t: lp.logprob for t, lp in step.items()} for step in out.logprobs])

def greedy(prompts, max_tokens):
    params = [SamplingParams(temperature=0.0, max_tokens=n, logprobs=args["candidates"], ignore_eos=True, detokenize=False)
              for n in max_tokens]
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [as_greedy(r) for r in results]

def staggered(prompts, max_tokens):
    # Continuous batching: request i joins at engine step 3 * i and leaves after its own length,
    # so decode batches grow, shrink and mix with other requests' prefills.
    engine, done, step = llm.llm_engine, {}, 0
    while len(done) < len(prompts):
        for i, (p, n) in enumerate(zip(prompts, max_tokens)):
            if 3 * i == step:
                engine.add_request(str(i), {"prompt_token_ids": p}, SamplingParams(
                    temperature=0.0, max_tokens=n, logprobs=args["candidates"], ignore_eos=True, detokenize=False))
        for r in engine.step():
            if r.finished:
                done[int(r.request_id)] = as_greedy(r)
        step += 1
    return [done[i] for i in range(len(prompts))]

out = {}
for name, prompts in args["batches"].items():
    if args["staggered"]:  # each request alone first, then all of them joining and leaving
        alone = [greedy([p], [n])[0] for p, n in zip(prompts, args["staggered"])]
        calls = iter([staggered])
        first_then_plain = lambda ps, ns: next(calls, greedy)(ps, ns)
        out[name] = compare_teacher_forced(prompts, alone, first_then_plain, args["near_tie"]).to_json()
    elif args["stock"] is None:
        out[name] = [asdict(g) for g in greedy(prompts, [args["steps"]] * len(prompts))]
    else:  # teacher-forced on stock's tokens: the first call runs the whole batch, restarts follow
        stock = [Greedy.from_json(r) for r in args["stock"][name]]
        out[name] = compare_teacher_forced(prompts, stock, greedy, args["near_tie"]).to_json()
if args["stall"]:  # an event no task will ever reach: that step's request fails, later ones run on stock
    def break_first_event(model):  # 2^20 more signals per launch than any task sends
        with torch.inference_mode():  # vLLM made the megakernel's tensors under inference mode
            for kernel in model._mpk.kernels.values():
                kernel.triggers[0].add_(1 << 20)
    llm.apply_model(break_first_event)
    stalled = llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(
        temperature=0.0, max_tokens=4, ignore_eos=True, detokenize=False), use_tqdm=False)[0].outputs[0]
    out["stall"] = {"finish_reason": stalled.finish_reason, "tokens": list(stalled.token_ids)}
    out["mpk_stopped"] = llm.apply_model(lambda m: {"steps": m._mpk.steps, "disabled": m._mpk.disabled})
    stock = [Greedy.from_json(r) for r in args["stock"][name]]
    out["after"] = compare_teacher_forced(prompts, stock, greedy, args["near_tie"]).to_json()
if args["argmax"]:  # the same batches without logprobs: greedy megakernel steps sampled by argmax
    plain = SamplingParams(temperature=0.0, max_tokens=args["steps"], ignore_eos=True, detokenize=False)
    llm.reset_prefix_cache()  # the prompts prefill as in the first run, not from its cached blocks
    out["argmax"] = {name: [list(r.outputs[0].token_ids) for r in llm.generate(
        [{"prompt_token_ids": p} for p in prompts], plain, use_tqdm=False)] for name, prompts in args["batches"].items()}
    out["argmax_steps"] = llm.collective_rpc(lambda worker: getattr(worker.model_runner.sampler, "argmax_steps", None))
if args["impl"] == "mpk":
    out["mpk"] = llm.apply_model(lambda m: {"class": type(m).__name__, "steps": getattr(m, "_mpk", None) and m._mpk.steps,
                                            "disabled": getattr(m, "_mpk", None) and m._mpk.disabled})
json.dump(out, open(args["out"], "w"))
"""


def random_checkpoint(name: str, layers: int, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shipped config cut to a few layers, with random weights saved as safetensors."""
    config = {**shipped_config(name), "num_hidden_layers": layers, "torch_dtype": "bfloat16"}
    spec = ModelSpec.from_hf_config(config)
    path = tmp_path_factory.mktemp(name)
    (path / "config.json").write_text(json.dumps(config))
    save_checkpoint(spec, random_weights(spec, seed=1), path)
    return path


@pytest.fixture(scope="module", params=MODELS)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_checkpoint(request.param, LAYERS, tmp_path_factory)


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3-30B-A3B's shapes (128 experts of width 768, 8 per token) in a few layers."""
    return random_checkpoint(MOE_MODEL, MOE_LAYERS, tmp_path_factory)


@pytest.fixture(scope="module")
def stock_greedy(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path, bool], dict[str, Any]]:
    """Stock vLLM's bs1 and bs8 greedy runs of a checkpoint, eager or with FULL decode graphs, on
    vLLM's attention backend or a given one, made once per module: several tests compare against
    the same ones (each engine start costs ~30 s)."""
    runs: dict[tuple[Path, bool, str | None], dict[str, Any]] = {}

    def get(checkpoint: Path, eager: bool, attention_backend: str | None = None) -> dict[str, Any]:
        key = (checkpoint, eager, attention_backend)
        if key not in runs:
            runs[key] = run_engine(tmp_path_factory.mktemp("stock"), checkpoint, "vllm", eager=eager,
                                   attention_backend=attention_backend)[0]
        return runs[key]

    return get


def stock_prompts(checkpoint: Path) -> list[list[int]]:
    """The bs1 prompt of ``run_engine``'s default batches (those ``stock_greedy`` ran)."""
    return prompts(json.loads((checkpoint / "config.json").read_text())["vocab_size"], 1, 1)


def prompts(vocab: int, batch: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(n),), generator=gen).tolist()
            for n in torch.randint(8, 120, (batch,), generator=gen)]


def run_engine(tmp: Path, model: Path, impl: str, *, eager: bool = False, load_format: str = "auto",
               kv_cache_dtype: str = "auto", mpk: dict[str, Any] | None = None, steps: int = STEPS,
               batches: dict[str, list[list[int]]] | None = None, stock: dict[str, Any] | None = None,
               compilation: dict[str, Any] | None = FAST, staggered: list[int] | None = None,
               stall: bool = False, attention_backend: str | None = None,
               argmax: bool = False) -> tuple[dict[str, Any], str]:
    """One engine in a subprocess. Without ``stock``: each batch's greedy tokens and top logprobs
    per request. With ``stock`` (an earlier run's output): each batch's teacher-forced Comparison
    against it, as JSON. ``staggered`` (tokens per request): the engine's own requests run alone,
    then joining and leaving a running batch, compared teacher-forced. ``compilation=None``: vLLM's
    default (torch.compile, FULL_AND_PIECEWISE graphs). ``stall``: afterwards, break an event of
    every megakernel, record how the next request ends, then compare the batches again on the
    engine that stopped (teacher-forced on ``stock``). ``attention_backend``: vLLM's
    ``--attention-backend`` (None: vLLM's choice, FLASH_ATTN on Hopper). ``argmax``: afterwards,
    each batch's tokens again without logprobs, and each worker's count of argmax-sampled steps."""
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    batches = batches or {"bs1": prompts(vocab, 1, 1), "bs8": prompts(vocab, 8, 8)}
    out = tmp / (f"{impl}-{eager}-{load_format}-{kv_cache_dtype}-{compilation is None}-{bool(staggered)}-{stall}-"
                 f"{attention_backend}.json")
    args = dict(model=str(model), impl=impl, eager=eager, compilation=compilation, load_format=load_format,
                attention_backend=attention_backend,
                kv_cache_dtype=kv_cache_dtype, mpk={"max_batch": 8, **(mpk or {})}, steps=steps, batches=batches,
                stock=None if stock is None else {name: stock[name] for name in batches}, near_tie=NEAR_TIE,
                staggered=staggered, stall=stall, argmax=argmax, candidates=CANDIDATES,
                repo=str(REPO), out=str(out))
    args_path = out.with_suffix(".args.json")  # stock's logprobs can outgrow one command-line argument
    args_path.write_text(json.dumps(args))
    env = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # for LLM.apply_model
    proc = subprocess.run([sys.executable, "-c", ENGINE, str(args_path)], capture_output=True, text=True,
                          timeout=900, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return json.loads(out.read_text()), log


def assert_matches_stock(ours: dict[str, Any], label: str) -> None:
    """Print every batch's teacher-forced comparison, then check each (vllm_mpk/bench/greedy_compare.py)."""
    results = {name: Comparison.from_json(ours[name]) for name in ("bs1", "bs8")}
    for name, result in results.items():
        print(f"{label} {name}: {result.summary()}")
    for name, result in results.items():
        try:
            result.check()
        except AssertionError as e:
            raise AssertionError(f"{label} {name}: {e}") from None


HOST_STEP = {"logits_in_kernel": True, "greedy_argmax": True}  # the opt-in host-step savings


@pytest.mark.parametrize("host_step", [{}, HOST_STEP], ids=["vllm-logits", "megakernel-logits"])
def test_greedy_tokens_match_stock_vllm(checkpoint: Path, tmp_path: Path, stock_greedy,
                                        host_step: dict[str, bool]) -> None:
    """FULL decode CUDA graphs around the megakernel's launch, batch 1 and 8, strict mode; with the
    megakernel's own lm_head, its logits and logprobs too (integration/kernel_logits.py)."""
    stock = stock_greedy(checkpoint, False)
    ours, log = run_engine(tmp_path, checkpoint, "mpk", mpk={"strict": True, **host_step}, stock=stock)
    assert ours["mpk"][0]["class"].startswith("Mpk") and ours["mpk"][0]["disabled"] is None
    assert ours["mpk"][0]["steps"] > 0  # warm-up and capture ran it; replays do not count
    assert "megakernel ready" in log
    assert_matches_stock(ours, f"{checkpoint.name} cuda graphs")


def test_greedy_steps_sampled_by_argmax_give_the_samplers_tokens(checkpoint: Path, tmp_path: Path) -> None:
    """The same engine and batches, first with logprobs (vLLM's sampler on every step), then
    without (megakernel steps sampled by one argmax, integration/greedy_sampler.py): the same
    forward gives the same tokens, and the argmax path did take steps."""
    ours, log = run_engine(tmp_path, checkpoint, "mpk", mpk={"strict": True, **HOST_STEP}, argmax=True)
    assert ours["mpk"][0]["disabled"] is None and "megakernel ready" in log
    for name in ("bs1", "bs8"):
        assert ours["argmax"][name] == [r["tokens"] for r in ours[name]], name
    assert all(n and n >= STEPS - 1 for n in ours["argmax_steps"]), ours["argmax_steps"]


def test_eager_decode_steps_run_the_megakernel(checkpoint: Path, tmp_path: Path, stock_greedy) -> None:
    stock = stock_greedy(checkpoint, True)
    ours, _ = run_engine(tmp_path, checkpoint, "mpk", eager=True, mpk={"strict": True}, stock=stock)
    # Every step after each batch's first (prefill) token is a pure decode step (restarts add more).
    assert ours["mpk"][0]["steps"] >= 2 * (STEPS - 1)
    assert_matches_stock(ours, f"{checkpoint.name} eager")


def test_requests_joining_and_leaving_decode_as_alone(checkpoint: Path, tmp_path: Path) -> None:
    """Continuous batching: eight requests of different lengths join a running batch three engine
    steps apart (their prefills mix with the others' decodes, which then run the megakernel at
    changing batch sizes) and give the tokens each gives alone on the same engine."""
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    lengths = [STEPS - 5 * i for i in range(8)]
    ours, log = run_engine(tmp_path, checkpoint, "mpk", mpk={"strict": True}, staggered=lengths,
                           batches={"bs8": prompts(vocab, 8, 5)})
    assert ours["mpk"][0]["disabled"] is None and "megakernel ready" in log
    result = Comparison.from_json(ours["bs8"])
    print(f"{checkpoint.name} staggered vs alone: {result.summary()}")
    result.check()


@pytest.mark.parametrize("host_step", [{}, HOST_STEP], ids=["vllm-logits", "megakernel-logits"])
def test_default_compile_mode_matches_stock(checkpoint: Path, tmp_path: Path, stock_greedy,
                                            host_step: dict[str, bool]) -> None:
    """vLLM's default compilation (torch.compile of the stock model, FULL_AND_PIECEWISE graphs):
    the megakernel is captured in the FULL decode graphs and prefill still runs compiled."""
    stock = stock_greedy(checkpoint, False)
    ours, log = run_engine(tmp_path, checkpoint, "mpk", mpk={"strict": True, **host_step}, stock=stock,
                           compilation=None)
    assert ours["mpk"][0]["disabled"] is None and "megakernel ready" in log
    assert_matches_stock(ours, f"{checkpoint.name} default compile")


def test_a_megakernel_stall_fails_its_request_and_the_engine_serves_on_stock(checkpoint: Path, tmp_path: Path,
                                                                             stock_greedy) -> None:
    """An event that can never fire trips the watchdog (timeout_s 1) on the first decode step of
    a request: that request finishes with finish reason "error" and none of the stopped steps'
    tokens (at most the prefill's), one warning names the stalled task and event, and the engine
    then serves every request on the stock layers (no more megakernel launches), with stock's
    tokens."""
    stock = stock_greedy(checkpoint, False)
    ours, log = run_engine(tmp_path, checkpoint, "mpk", mpk={"timeout_s": 1.0}, stall=True,
                           batches={"bs1": stock_prompts(checkpoint)}, stock=stock)
    stall = ours["stall"]
    assert stall["finish_reason"] == "error" and len(stall["tokens"]) <= 1, stall
    assert "timeout waiting on an event" in log and log.count("stopped on its watchdog") == 1, log[-6000:]
    # The engine turns the megakernel off at its next step (the after-run's first), on its own layers
    # from then on: a replayed launch would stall again (the event stays broken) and fail requests.
    assert "watchdog" in (ours["mpk"][0]["disabled"] or "")
    assert ours["mpk"][0]["steps"] == ours["mpk_stopped"][0]["steps"]  # and launches nothing from Python
    after = Comparison.from_json(ours["after"])
    print(f"{checkpoint.name} on stock after a stall: {after.summary()}")
    after.check()


def test_dummy_weights_are_read_in_place(checkpoint: Path, tmp_path: Path) -> None:
    """--load-format dummy never calls load_weights; the lazily built megakernel still binds the
    initialised parameters (near-flat logits: only the run and the absence of fallback count)."""
    ours, log = run_engine(tmp_path, checkpoint, "mpk", eager=True, load_format="dummy", mpk={"strict": True},
                           steps=8)
    assert ours["mpk"][0]["disabled"] is None and ours["mpk"][0]["steps"] > 0
    assert all(len(r["tokens"]) == 8 for r in ours["bs8"])


def test_fp8_kv_cache_falls_back_with_one_line(checkpoint: Path, tmp_path: Path) -> None:
    ours, log = run_engine(tmp_path, checkpoint, "mpk", kv_cache_dtype="fp8", steps=8)
    assert "fp8" in (ours["mpk"][0]["disabled"] or "")
    assert log.count("the megakernel is off") == 1, log[-4000:]
    assert all(len(r["tokens"]) == 8 for r in ours["bs8"])


def test_triton_attention_backend_matches_stock(checkpoint: Path, tmp_path: Path, stock_greedy) -> None:
    """TRITON_ATTN keeps FLASH_ATTN's packed K|V paged cache and its metadata fields: the megakernel
    serves it (strict) and gives the greedy tokens of stock vLLM on the same backend."""
    stock = stock_greedy(checkpoint, False, "TRITON_ATTN")
    ours, log = run_engine(tmp_path, checkpoint, "mpk", mpk={"strict": True}, stock=stock,
                           attention_backend="TRITON_ATTN")
    assert ours["mpk"][0]["disabled"] is None and ours["mpk"][0]["steps"] > 0 and "megakernel ready" in log
    assert_matches_stock(ours, f"{checkpoint.name} TRITON_ATTN")


def test_flashinfer_backend_falls_back_with_one_line(checkpoint: Path, tmp_path: Path, stock_greedy) -> None:
    """FlashInfer's metadata has no block table or sequence lengths to bind: the first decode step
    turns the megakernel off with one warning naming the backends it takes, nothing is launched,
    and the engine gives stock vLLM's tokens on FlashInfer."""
    stock = stock_greedy(checkpoint, False, "FLASHINFER")
    ours, log = run_engine(tmp_path, checkpoint, "mpk", stock=stock, attention_backend="FLASHINFER")
    assert "FLASH_ATTN" in (ours["mpk"][0]["disabled"] or "") and ours["mpk"][0]["steps"] == 0
    assert log.count("the megakernel is off") == 1, log[-4000:]
    assert_matches_stock(ours, f"{checkpoint.name} FLASHINFER")


def test_vllm_serve_on_loopback(checkpoint: Path, tmp_path: Path) -> None:
    """`vllm serve --model-impl mpk` answers completions with the tokens the LLM API gives, and
    streams the same tokens it returns in one piece."""
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    prompt = prompts(vocab, 1, 3)[0]
    stock, _ = run_engine(tmp_path, checkpoint, "vllm", batches={"one": [prompt]}, steps=16)
    served = serve_and_compare(checkpoint, tmp_path, prompt, Greedy.from_json(stock["one"][0]))
    print(f"{checkpoint.name} vllm serve: {served.comparison.summary()}")
    served.check()


# mixture of experts (opt-in) ----------------------------------------------------------------------


@pytest.mark.parametrize("eager", [False, True])
def test_moe_greedy_tokens_match_stock_vllm(moe_checkpoint: Path, tmp_path: Path, stock_greedy, eager: bool) -> None:
    """Opted in, the megakernel's MoE layers read vLLM's fused experts (Triton backend, vLLM's
    choice on Hopper) in place and give stock's greedy tokens, teacher-forced, batch 1 and 8,
    strict mode: in FULL decode graphs, and eager, where every decode step launches it."""
    stock = stock_greedy(moe_checkpoint, eager)
    ours, log = run_engine(tmp_path, moe_checkpoint, "mpk", eager=eager, mpk={"strict": True, "moe": True},
                           stock=stock)
    assert ours["mpk"][0]["class"] == "MpkQwen3MoeForCausalLM" and ours["mpk"][0]["disabled"] is None
    assert ours["mpk"][0]["steps"] >= (2 * (STEPS - 1) if eager else 1)
    assert "megakernel ready" in log
    assert_matches_stock(ours, f"{MOE_MODEL} {'eager' if eager else 'cuda graphs'}")


def test_moe_without_the_opt_in_runs_stock_vllm_with_one_warning(moe_checkpoint: Path, tmp_path: Path) -> None:
    from vllm_mpk.integration.options import MOE_OPT_IN

    ours, log = run_engine(tmp_path, moe_checkpoint, "mpk", steps=8)
    assert ours["mpk"][0] == {"class": "Qwen3MoeForCausalLM", "steps": None, "disabled": None}
    assert log.count(MOE_OPT_IN) == 1, log[-4000:]
    assert all(len(r["tokens"]) == 8 for r in ours["bs8"])
