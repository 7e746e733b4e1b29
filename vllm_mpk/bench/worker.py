"""vLLM engines of one model (one per ``model_impl``) in this process: TPOT and model-forward time
per batch size, one JSON row per engine and batch appended to a file as soon as it is measured.

    python -m vllm_mpk.bench.worker '{"model": "qwen3-0.6b", "impl": "mpk"}' --rows rows.jsonl
    python -m vllm_mpk.bench.worker '[{"model": "qwen3-0.6b", "impl": "vllm", "gpu_memory_utilization": 0.42},
                                      {"model": "qwen3-0.6b", "impl": "mpk", "gpu_memory_utilization": 0.42}]' ...

Several engines run side by side: all started first, each on its share of the GPU's memory, then
their TPOT samples and timed generations interleaved (one sample or generation each in turn, the
order alternating), so a drift of the host's speed over the minutes of a run, which moves the
small models' TPOT by more than the engines differ, falls on each engine alike. An engine that
fails to start stops the process (its memory may be held); one whose measurement is refused
(mpk that never built its megakernel) gets an error row and the others go on.

Weights are vLLM's dummy weights (``load_format="dummy"``) for a directory holding only the
shipped config.json. For each batch: ``batch`` prompts of ``prompt_len`` token ids, greedy, EOS
ignored. TPOT = (time to generate ``new_tokens`` - time to generate 1) / (new_tokens - 1), median
of ``repeats``; then ``TIMED_GENERATIONS`` more generations of ``new_tokens`` with ``StepTimer``
on give the median GPU time of the decode step's graph replay (``forward_ms``) and of
``compute_logits`` (``lm_head_ms``), and the host's phases. The ``floor`` engine is stock vLLM
with the model cut to one decoder layer: its TPOT is the step that vLLM's own work leaves
(scheduling, inputs, lm_head, sampling, one layer), which no faster forward gets under. Every row
also says whether the engine scheduled asynchronously and which attention backend it ran
(``StepTimer.bench_engine_info``). With ``profile_dir`` set, the
largest batch is then profiled (``vllm_mpk.bench.profiling``). Run by ``vllm_mpk.bench.runner``
in a fresh process per engine (or per model, side by side), because GPU memory is not reliably
freed between engines started one after another in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vllm_mpk.bench.profiling import engine_profile_dir, profile_engine, profile_passes, profiler_config
from vllm_mpk.bench.step_timer import HOST_PARTS, HOST_PHASES
from vllm_mpk.bench.table import FLOOR, MPK, STOCK, model_label
from vllm_mpk.integration.options import opt_ins
from vllm_mpk.models.catalog import shipped_config
from vllm_mpk.models.spec import ModelSpec

FAST_COMPILATION = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}  # no torch.compile; FULL decode graphs
STEP_TIMER = "vllm_mpk.bench.step_timer.StepTimer"
TIMED_GENERATIONS = 3  # step-timer generations per engine and batch: the host's phases move between generations
HOST_TIMES = (*HOST_PHASES, "host_period", *(key for key, _, _ in HOST_PARTS))  # StepTimer's, on the host's clock
IMPLS = (STOCK, MPK, FLOOR)


@dataclass(frozen=True)
class EngineConfig:
    """What one worker measures. ``vllm_compile``: vLLM's default compilation (torch.compile and
    FULL_AND_PIECEWISE graphs, a slower start) instead of ``FAST_COMPILATION``. ``profile_dir``:
    profile the largest batch afterwards, ``profile_tokens`` new tokens without Python stacks and
    ``profile_stack_tokens`` with them (0: no such pass), traces under
    ``profile_dir/<model>-<impl>/``. ``kv_blocks``: the KV cache's size in blocks instead of what
    the free memory holds; the floor engine takes the stock engine's count, since one decoder
    layer's cache would otherwise hold ~30x the tokens and vLLM's block pool would not be the one
    the stock engine schedules from."""

    model: str  # a shipped config name, e.g. "qwen3-0.6b"
    impl: str  # vLLM's model_impl, "vllm" (stock) or "mpk"; or "floor": stock with one decoder layer
    batches: tuple[int, ...] = (1, 8, 16)
    prompt_len: int = 128
    new_tokens: int = 257
    repeats: int = 7  # TPOT repeats: one host hiccup (up to ~0.3 s in a 257-token generation) moves a repeat by 1 ms
    gpu_memory_utilization: float = 0.85
    vllm_compile: bool = False
    profile_dir: str | None = None
    profile_tokens: int = 24
    profile_stack_tokens: int = 12
    tensor_parallel_size: int = 1
    kv_blocks: int | None = None
    mpk_options: tuple[tuple[str, Any], ...] = ()  # more additional_config["mpk"] entries for the mpk engine

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EngineConfig:
        """From ``dataclasses.asdict`` of one, through JSON (``batches`` comes back a list, and
        ``mpk_options`` a list of lists)."""
        return cls(**{**raw, "batches": tuple(raw.get("batches", cls.batches)),
                      "mpk_options": tuple(tuple(kv) for kv in raw.get("mpk_options", ()))})

    @property
    def compilation(self) -> str:
        return "vLLM default" if self.vllm_compile else "mode 0, FULL_DECODE_ONLY"

    @property
    def label(self) -> str:
        """The model as the table and the log names show it: ``qwen3-8b`` or ``qwen3-8b TP2``."""
        return model_label(self.model, self.tensor_parallel_size)


def configs_from_json(text: str) -> list[EngineConfig]:
    """One ``EngineConfig`` (a JSON object) or several (a JSON list of them)."""
    raw = json.loads(text)
    return [EngineConfig.from_dict(c) for c in (raw if isinstance(raw, list) else [raw])]


def error_row(cfg: EngineConfig, batch: int, error: str) -> dict[str, Any]:
    """The row of an engine and batch that was not measured, saying why."""
    return {"model": cfg.model, "impl": cfg.impl, "batch": batch, "tp": cfg.tensor_parallel_size, "error": error}


def model_dir(name: str, root: Path, layers: int | None = None) -> Path:
    """A directory holding only the shipped config.json (``layers``: that many decoder layers):
    vLLM loads it with dummy weights."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    config = shipped_config(name)
    (d / "config.json").write_text(json.dumps(config if layers is None else {**config, "num_hidden_layers": layers}))
    return d


def engine_kwargs(cfg: EngineConfig, directory: Path) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for ``cfg``. The mpk engine is strict (it raises rather
    than silently running vLLM's layers) and takes decode batches up to the largest measured."""
    kwargs: dict[str, Any] = dict(
        model=str(directory), model_impl="vllm" if cfg.impl == FLOOR else cfg.impl, load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=cfg.prompt_len + cfg.new_tokens + 16, max_num_seqs=max(cfg.batches),
        tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
        worker_extension_cls=STEP_TIMER)
    if not cfg.vllm_compile:
        kwargs["compilation_config"] = FAST_COMPILATION
    if cfg.profile_dir is not None:
        kwargs["profiler_config"] = profiler_config(engine_profile_dir(cfg.profile_dir, cfg.model, cfg.impl))
    if cfg.kv_blocks is not None:
        kwargs["num_gpu_blocks_override"] = cfg.kv_blocks
    if cfg.impl == "mpk":  # strict, planned to the largest batch, the model's opt-ins, then the given options
        kwargs["additional_config"] = {"mpk": {"max_batch": max(cfg.batches), "strict": True,
                                               **mpk_engine_options(cfg.model, cfg.mpk_options,
                                                                    cfg.tensor_parallel_size)}}
    return kwargs


def mpk_engine_options(model: str, extra: Sequence[tuple[str, Any]] = (),
                       tensor_parallel_size: int = 1) -> dict[str, Any]:
    """What a benchmark's mpk engine of the shipped ``model`` gets beyond its batch and strictness:
    the opt-ins without which the megakernel would not serve it (what is measured is the
    megakernel), then ``extra``."""
    return {**opt_ins(ModelSpec.from_hf_config(shipped_config(model)), tensor_parallel_size), **dict(extra)}


def token_prompts(batch: int, prompt_len: int, vocab: int) -> list[dict[str, list[int]]]:
    """Distinct token-id prompts, one per request (no tokenizer is loaded)."""
    return [{"prompt_token_ids": [(7 * b + 13 * i + 1) % vocab for i in range(prompt_len)]} for b in range(batch)]


def generate_s(llm: Any, prompts: list[dict[str, list[int]]], tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def turns(engines: int, i: int) -> list[int]:
    """The engines' order in round ``i`` of an interleaved measurement: the first alternates."""
    order = list(range(engines))
    return order if i % 2 == 0 else order[::-1]


def tpot_samples_ms(llms: Sequence[Any], prompts: list[dict[str, list[int]]], new_tokens: int,
                    repeats: int) -> list[list[float]]:
    """Per engine, ``repeats`` TPOT samples, ``(t(new_tokens) - t(1)) / (new_tokens - 1)``; the
    engines take turns sample by sample (``turns``)."""
    for llm in llms:
        generate_s(llm, prompts, new_tokens)  # warm-up
    samples: list[list[float]] = [[] for _ in llms]
    for i in range(repeats):
        for k in turns(len(llms), i):
            samples[k].append((generate_s(llms[k], prompts, new_tokens) - generate_s(llms[k], prompts, 1))
                              / (new_tokens - 1) * 1e3)
    return samples


def timed_generation(llm: Any, prompts: list[dict[str, list[int]]], new_tokens: int) -> dict[str, list[float]]:
    """``StepTimer``'s lists of one generation; empty where the model runner has no FULL-graph
    replay to time."""
    if not llm.collective_rpc("bench_timer_start")[0]:
        return {}
    try:
        generate_s(llm, prompts, new_tokens)
    finally:
        times = llm.collective_rpc("bench_timer_stop")[0]
    return times


def step_times_ms(llms: Sequence[Any], prompts: list[dict[str, list[int]]], new_tokens: int,
                  generations: int = 1) -> list[dict[str, Any]]:
    """Per engine, over ``generations`` timed generations (the engines taking turns, ``turns``):
    the median GPU time of the decode step's graph replay and of compute_logits, and the median
    step period on the GPU's timeline with its 90th percentile (a period well above the forward and
    lm_head is time the GPU waited for the host); also the means of the forward and the period,
    which TPOT (a mean over a generation) is to be read against where the steps' times spread; the
    medians of the host's phases (``HOST_TIMES``, see ``StepTimer``), which move with the host's
    speed from one generation to the next; None where nothing was timed."""
    merged: list[dict[str, list[float]]] = [{} for _ in llms]
    for i in range(generations):
        for k in turns(len(llms), i):
            for key, values in timed_generation(llms[k], prompts, new_tokens).items():
                merged[k].setdefault(key, []).extend(values)
    return [{**step_summary(times), "timed_generations": generations} for times in merged]


def step_summary(times: dict[str, list[float]]) -> dict[str, Any]:
    def summary(key: str, of: Callable[[list[float]], float]) -> float | None:
        return of(times[key]) if times.get(key) else None

    period = sorted(times.get("period", []))
    return {"forward_ms": summary("forward", statistics.median), "forward_mean_ms": summary("forward", statistics.mean),
            "lm_head_ms": summary("lm_head", statistics.median), "period_ms": summary("period", statistics.median),
            "period_mean_ms": summary("period", statistics.mean),
            "period_p90_ms": period[int(0.9 * (len(period) - 1))] if period else None,
            "graph_tokens": sorted({int(n) for n in times.get("graph_tokens", [])}) or None,
            **{f"{key}_ms": summary(key, statistics.median) for key in HOST_TIMES}}


@dataclass
class Engine:
    """A started engine of ``run`` and what it reported about itself."""

    cfg: EngineConfig
    llm: Any
    engine_s: float
    gpu: str
    info: dict[str, Any]


def start_engine(cfg: EngineConfig, root: Path, started: Sequence[Engine]) -> Engine:
    """Start ``cfg``'s engine; a floor engine without a KV cache size takes the size of a stock
    engine started before it in this process."""
    from vllm import LLM

    if cfg.impl == FLOOR and cfg.kv_blocks is None:
        stock = next((e for e in started if e.cfg.impl == STOCK), None)
        if stock is None or not stock.info.get("kv_blocks"):
            raise ValueError("the floor engine takes its stock engine's KV cache size: start a stock engine of "
                             "this model before it, or give kv_blocks")
        cfg = replace(cfg, kv_blocks=stock.info["kv_blocks"])
    start = time.perf_counter()
    llm = LLM(**engine_kwargs(cfg, model_dir(cfg.model, root / cfg.impl, layers=1 if cfg.impl == FLOOR else None)))
    engine_s = time.perf_counter() - start
    return Engine(cfg, llm, engine_s, llm.collective_rpc("bench_device_name")[0],
                  llm.collective_rpc("bench_engine_info")[0])


def run(cfgs: Sequence[EngineConfig], rows: Path) -> None:
    """Start every engine of ``cfgs`` (one model, the same batches), then measure each batch on
    all of them, their TPOT repeats interleaved; shut them all down at the end."""
    shared = {(c.model, c.batches, c.prompt_len, c.new_tokens, c.repeats, c.tensor_parallel_size) for c in cfgs}
    if len(shared) != 1:
        raise ValueError("engines side by side must share the model, batches, prompt length, new tokens, repeats "
                         "and tensor-parallel size: they are measured together")
    first = cfgs[0]
    vocab = shipped_config(first.model)["vocab_size"]  # an unknown name fails here, before vLLM loads
    with tempfile.TemporaryDirectory(prefix="vllm_mpk_bench_") as root, contextlib.ExitStack() as running:
        engines: list[Engine] = []
        for cfg in cfgs:
            engines.append(start_engine(cfg, Path(root), engines))
            running.callback(engines[-1].llm.llm_engine.engine_core.shutdown)
        for batch in first.batches:
            prompts = token_prompts(batch, first.prompt_len, vocab)
            llms = [e.llm for e in engines]
            samples = tpot_samples_ms(llms, prompts, first.new_tokens, first.repeats)
            times = step_times_ms(llms, prompts, first.new_tokens, TIMED_GENERATIONS)
            for engine, tpot, timed in zip(engines, samples, times, strict=True):
                write_row(rows, measured_row(engine, batch, tpot, timed, len(engines)))
        for engine in engines:
            if engine.cfg.profile_dir is not None:
                profile(engine.llm, engine.cfg, engine.info, vocab)


def measured_row(engine: Engine, batch: int, samples: list[float], times: dict[str, Any],
                 side_by_side: int) -> dict[str, Any]:
    """One engine's row for one batch: its TPOT samples and step times (``step_times_ms``)."""
    cfg, llm = engine.cfg, engine.llm
    state = llm.collective_rpc("bench_mpk_state")[0]
    if cfg.impl == "mpk" and not state["built"]:
        return error_row(cfg, batch, f"--model-impl mpk never built its megakernel, so this engine timed vLLM's "
                                     f"stock layers: {state}")
    return {"model": cfg.model, "impl": cfg.impl, "batch": batch, "tpot_ms": statistics.median(samples),
            "tpot_samples_ms": samples, **times, "model_class": state["class"], "gpu": engine.gpu,
            "engine_s": engine.engine_s, "prompt_len": cfg.prompt_len, "new_tokens": cfg.new_tokens,
            "repeats": cfg.repeats, "compilation": cfg.compilation, "tp": cfg.tensor_parallel_size,
            "async_scheduling": engine.info["async_scheduling"],
            "attention_backend": engine.info["attention_backend"], "kv_blocks": engine.info.get("kv_blocks"),
            "side_by_side": side_by_side}


def write_row(rows: Path, row: dict[str, Any]) -> None:
    with rows.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def profile(llm: Any, cfg: EngineConfig, info: dict[str, Any], vocab: int) -> None:
    """Profile the largest batch (``vllm_mpk.bench.profiling``); the CUDA-event timer runs too, so
    each pass also gives the forward and lm_head times it saw under the profiler."""
    batch = max(cfg.batches)
    prompts = token_prompts(batch, cfg.prompt_len, vocab)
    directory = engine_profile_dir(cfg.profile_dir or ".", cfg.model, cfg.impl)

    def generation(tokens: int) -> dict[str, Any]:
        (times,) = step_times_ms([llm], prompts, tokens)
        if times["graph_tokens"] is None:  # no timer in this model runner, so nothing ran yet
            times["generate_s"] = generate_s(llm, prompts, tokens)
        return times

    record = profile_engine(llm, directory, {"model": cfg.model, "impl": cfg.impl, "batch": batch,
                                             "prompt_len": cfg.prompt_len, **info},
                            profile_passes(cfg.profile_tokens, cfg.profile_stack_tokens), generation)
    print(json.dumps(record), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="EngineConfig as JSON, or a JSON list of them to run side by side")
    p.add_argument("--rows", type=Path, required=True, help="JSON lines file to append one row per batch to")
    args = p.parse_args()
    run(configs_from_json(args.config), args.rows)


if __name__ == "__main__":
    main()
