"""``vllm-mpk``: plan a model's decode step, check it against ``transformers``, run the main job,
benchmark it under vLLM.

Exit codes: 0 success; 1 a check failed; 2 bad arguments, an unknown, malformed or unsupported
model, or a path that is not built yet (the GPU runtime). Bad input is reported as one line,
``vllm-mpk: error: <what to change>``, on stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import torch

from vllm_mpk.bench.offline_tokenizer import prepare_model_dir
from vllm_mpk.bench.profiling import analyze_profiles, engine_profile_dir
from vllm_mpk.bench.runner import Row, gpu_lanes, run_engines
from vllm_mpk.bench.soak import SoakSettings, problems, soak
from vllm_mpk.bench.table import read_rows, update_results
from vllm_mpk.bench.trace import analyze_file, format_report, trace_files
from vllm_mpk.bench.vllm_tools import IMPLS as VLLM_TOOL_IMPLS
from vllm_mpk.bench.vllm_tools import Settings as VllmToolSettings
from vllm_mpk.bench.vllm_tools import run as run_vllm_tools
from vllm_mpk.bench.vllm_tools_table import ROW_KEYS as TOOL_ROW_KEYS
from vllm_mpk.bench.vllm_tools_table import update_results as update_tool_results
from vllm_mpk.bench.worker import IMPLS, EngineConfig
from vllm_mpk.check import CheckResult, check_model
from vllm_mpk.codegen.ops.linear import MAX_LINEAR_BATCH
from vllm_mpk.graph.schedule import POLICIES
from vllm_mpk.graph.step_state import step_inputs
from vllm_mpk.models import DecodeModel, DecodeOptions, ModelSpec, build_decoder
from vllm_mpk.models.catalog import (
    DEFAULT_MODEL,
    ResolvedModel,
    resolve_model,
    shipped_config,
    single_gpu_models,
)
from vllm_mpk.models.kv_cache import allocate_kv_caches
from vllm_mpk.models.weights import expected_shapes, load_checkpoint, random_weights

EXIT_OK, EXIT_FAILED, EXIT_UNAVAILABLE = 0, 1, 2
GENERATE_CHECK_LAYERS = 2
HOPPER = (9, 0)


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit code 2 (as are the core's ValueErrors)."""


def report(message: str) -> int:
    """Print a problem the user can fix as one line on stderr; the exit code of bad input."""
    print(f"vllm-mpk: error: {message}", file=sys.stderr)
    return EXIT_UNAVAILABLE


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (no usage block), like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(report(message))


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high`` (no upper bound when None)."""
    bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {value}")
        return value

    return parse


def power_of_two(text: str) -> int:
    """An argparse type: a positive power of two (KV cache pages)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"expected a power of two such as 16 (vLLM's page size), got {text!r}")
    return value


def number_in(low: float, high: float = math.inf, low_included: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number above ``low`` (or from it) and at most ``high``."""
    bounds = (f"of at least {low:g}" if low_included else f"above {low:g}") + \
        (f" and at most {high:g}" if high < math.inf else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text!r}") from None
        if not ((low <= value if low_included else low < value) and value <= high and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text}")
        return value

    return parse


POSITIVE = int_in(1)
BATCH = int_in(1, MAX_LINEAR_BATCH)  # the rows a GPU linear tile stages


def mpk_options(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object of the plugin's options, checked as vLLM would check them."""
    from vllm_mpk.integration.options import MpkOptions, MpkOptionsError

    try:
        raw = json.loads(text)
        MpkOptions.from_dict(raw)
    except (json.JSONDecodeError, MpkOptionsError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object of mpk options: {e}") from None
    return raw or {}


def add_benchmark_mpk_options(parser: argparse.ArgumentParser, opt_ins: str, example: str) -> None:
    """A benchmark's ``--mpk-options``: entries of its mpk engine's additional_config["mpk"] on top
    of those it sets itself (strict, planned to the largest batch, and ``opt_ins``)."""
    parser.add_argument("--mpk-options", type=mpk_options, default={}, metavar="JSON",
                        help='more of the mpk engine\'s additional_config["mpk"] (it is strict and planned to the '
                             f'largest batch; {opt_ins}), e.g. \'{example}\'')


def check_positions(model: ResolvedModel, positions: int, what: str) -> None:
    """Sequences no longer than the model was trained for (its ``max_position_embeddings``)."""
    limit = model.spec.max_position_embeddings
    if positions > limit:
        raise CliError(f"{what}: sequences of {positions} tokens exceed the {limit} positions {model.name} takes "
                       f"(its max_position_embeddings); lower it")


# plan -------------------------------------------------------------------------------------------


def meta_decoder(spec: ModelSpec, options: DecodeOptions) -> DecodeModel:
    """Build the plan of ``options.rank`` over shape-only (``meta``) weights and KV caches, in
    that rank's TP-local shapes: nothing is allocated."""
    local = spec.shard(options.world_size)
    weights = {n: torch.empty(s, dtype=torch.bfloat16, device="meta") for n, s in expected_shapes(local).items()}
    num_blocks = options.max_batch * -(-options.max_seq_len // options.page_size)
    caches = allocate_kv_caches(local, num_blocks, options.page_size, device="meta")
    return build_decoder(spec, weights, caches, options)


def plan_header(model: ResolvedModel, decoder: DecodeModel, auto_splits: bool) -> str:
    spec, o = decoder.spec, decoder.options
    return (f"plan {model.name}: {spec.architecture}, {spec.num_layers} of {model.spec.num_layers} layers, "
            f"max batch {o.max_batch}, max seq len {o.max_seq_len}, page size {o.page_size}, "
            f"{o.num_workers} workers, schedule {o.schedule}, kv splits {decoder.kv_splits}"
            f"{' (auto)' if auto_splits else ''} (weights and KV caches not materialised)")


def run_plan(model: ResolvedModel, layers: int | None, options: DecodeOptions) -> None:
    """Print the plan of every tensor-parallel rank (one plan when ``world_size`` is 1)."""
    spec = model.spec.with_layers(layers) if layers is not None else model.spec
    for rank in range(options.world_size):
        decoder = meta_decoder(spec, replace(options, rank=rank))
        if rank == 0:
            print(plan_header(model, decoder, options.kv_splits is None))
        if options.world_size > 1:
            print(f"\nrank {rank} of {options.world_size}:")
        print(decoder.plan.summary())


def cmd_plan(args: argparse.Namespace) -> int:
    options = DecodeOptions(max_batch=args.max_batch, max_seq_len=args.max_seq_len, page_size=args.page_size,
                            num_workers=args.num_workers, schedule=args.schedule,
                            world_size=args.tensor_parallel_size, kv_splits=args.kv_splits,
                            multi_step=args.multi_step)
    model = resolve_model(args.model)
    check_positions(model, args.max_seq_len, "--max-seq-len")
    pages = -(-args.max_seq_len // args.page_size)
    if args.kv_splits is not None and args.kv_splits > pages:
        raise CliError(f"--kv-splits {args.kv_splits} is more than the {pages} pages of a sequence of "
                       f"--max-seq-len {args.max_seq_len}; give at most {pages}")
    run_plan(model, args.layers, options)
    return EXIT_OK


# check ------------------------------------------------------------------------------------------


def prompt_lengths(batch: int, seed: int) -> list[int]:
    """Ragged lengths 14 apart, so most prompts end past a 16-token page boundary (5, 19, 33 ...)."""
    return [5 + seed % 3 + 14 * i for i in range(batch)]


def check_weights_for(model: ResolvedModel, spec: ModelSpec, seed: int) -> tuple[dict[str, torch.Tensor], str]:
    """The checkpoint's weights when the model directory has safetensors, else random ones."""
    if model.directory is not None:
        weights = load_checkpoint(spec, model.directory)
        if weights is not None:
            return weights, f"checkpoint weights from {model.directory}"
    return random_weights(spec, seed=seed), f"random bf16 weights (seed {seed})"


def print_check(result: CheckResult, exact: bool) -> None:
    mode = "float32 intermediates (--exact)" if exact else "bf16"
    print(f"logits: relative L2 error {result.rel_error:.2e}, tolerance {result.tolerance:.2e} ({mode})")
    for b, (ref, ours) in enumerate(zip(result.reference_tokens, result.tokens)):
        print(f"request {b}  transformers: {' '.join(map(str, ref))}")
        print(f"{'':11}mpk:          {' '.join(map(str, ours))}")
    print(f"greedy mismatches: {result.mismatches} (near ties, not counted: {result.near_ties})")
    print("PASS" if result.passed else "FAIL")


def run_check(model: ResolvedModel, layers: int, batch: int, new_tokens: int, exact: bool, seed: int,
              device: str = "cpu") -> bool:
    if device == "cuda" and exact:
        raise CliError("--exact is a mode of the CPU reference executor; drop it with --device cuda")
    lengths = prompt_lengths(batch, seed)
    check_positions(model, max(lengths) + new_tokens, "--batch with --new-tokens")
    spec = model.spec.with_layers(layers)
    weights, source = check_weights_for(model, spec, seed)
    runner = "the megakernel on the GPU" if device == "cuda" else "CPU reference executor"
    print(f"check {model.name}: {spec.architecture}, {spec.num_layers} of {model.spec.num_layers} layers, "
          f"{source}; {runner} vs transformers")
    print(f"prompts of {', '.join(map(str, lengths))} tokens, {new_tokens} new tokens each, pages of 16 tokens")
    result = check_model(spec, weights, lengths, new_tokens, exact=exact, seed=seed, device=device)
    print_check(result, exact)
    return result.passed


def cmd_check(args: argparse.Namespace) -> int:
    if args.device == "cuda" and (reason := hopper_unavailable_reason()) is not None:
        print(f"vllm-mpk check --device cuda: {reason}; use --device cpu", file=sys.stderr)
        return EXIT_UNAVAILABLE
    model = resolve_model(args.model)
    passed = run_check(model, args.layers, args.batch, args.new_tokens, args.exact, args.seed, args.device)
    return EXIT_OK if passed else EXIT_FAILED


# generate ---------------------------------------------------------------------------------------


def hopper_unavailable_reason() -> str | None:
    """None when a Hopper (sm_90) GPU is visible, else why the GPU path cannot run here."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != HOPPER:
        return f"{torch.cuda.get_device_name()} is sm_{major}{minor}; the megakernel targets Hopper (sm_90)"
    return None


def cmd_generate(args: argparse.Namespace) -> int:
    model = resolve_model(args.model)
    check_positions(model, args.prompt_len + args.new_tokens, "--prompt-len plus --new-tokens")
    run_plan(model, None, DecodeOptions())
    reason = hopper_unavailable_reason()
    if reason is None:
        from vllm_mpk.demo import run_demo

        weights, source = check_weights_for(model, model.spec, args.seed)
        print(f"\ngenerating with {source} on the GPU")
        agreed = run_demo(model.spec, weights, args.batch, args.prompt_len, args.new_tokens, args.seed)
        del weights
        torch.cuda.empty_cache()  # the vLLM engines below are other processes sizing free memory
        served = generate_in_vllm(model, args)
        return EXIT_OK if agreed and served else EXIT_FAILED
    print()
    passed = run_check(model, GENERATE_CHECK_LAYERS, args.batch, args.new_tokens, False, args.seed)
    print(f"\nGPU execution skipped: {reason}. Ran the plan and the CPU check "
          f"({GENERATE_CHECK_LAYERS} layers) only.")
    return EXIT_OK if passed else EXIT_FAILED


def generate_in_vllm(model: ResolvedModel, args: argparse.Namespace) -> bool:
    """The same model generating in vLLM with ``--model-impl mpk`` next to stock vLLM (one engine
    per process, vLLM's dummy weights for a shipped config), where vLLM is installed; False if an
    engine failed."""
    if model.directory is not None or (reason := bench_unavailable_reason()) is not None:
        why = "it runs shipped configs (vLLM's dummy weights)" if model.directory is not None else reason
        print(f"\nvLLM with --model-impl mpk skipped: {why}")
        return True
    print(f"\n{model.name} generating in vLLM 0.26, --model-impl mpk next to stock (one engine per process):")
    runs = Path(tempfile.mkdtemp(prefix="vllm_mpk_generate_"))
    configs = [EngineConfig(model.name, impl, (args.batch,), args.prompt_len, args.new_tokens, repeats=1,
                            gpu_memory_utilization=0.8) for impl in ("vllm", "mpk")]
    rows = run_engines(configs, runs / "rows.jsonl", runs, timeout_s=900, on_rows=print_rows)
    return not any("error" in r for r in rows)


# profile ----------------------------------------------------------------------------------------


def cmd_profile(args: argparse.Namespace) -> int:
    """One profiled decode step on the GPU: a Perfetto trace (one track per SM) and a per-op summary."""
    if (reason := hopper_unavailable_reason()) is not None:
        print(f"vllm-mpk profile runs the megakernel: {reason}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    from vllm_mpk.demo import gpu_model
    from vllm_mpk.runtime.profiler import profile_step

    model = resolve_model(args.model)
    max_seq = args.context + 2
    check_positions(model, max_seq, "--context")
    spec = model.spec.with_layers(args.layers) if args.layers else model.spec
    weights, source = check_weights_for(model, spec, args.seed)
    decode_model, _, caches, blocks = gpu_model(spec, weights, args.batch, max_seq)
    for cache in caches:
        cache.normal_()  # a KV history to attend over
    step = torch.full((args.batch,), args.context)
    tokens = torch.randint(0, spec.vocab_size, (args.batch, max_seq))
    for name, value in step_inputs(step, tokens, blocks, 16).as_dict().items():
        decode_model.kernel.step_buffers[name].copy_(value)
    inputs = {**decode_model.kernel.attached, **decode_model.kernel.step_buffers}
    print(f"profile {model.name} ({source}), batch {args.batch}, {args.context} tokens of context")
    print(profile_step(decode_model.plan, inputs, args.batch, args.trace))
    print(f"trace: {args.trace} (open in ui.perfetto.dev)")
    return EXIT_OK


# bench ------------------------------------------------------------------------------------------


def bench_unavailable_reason() -> str | None:
    """None when vLLM can run here, else why not."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not importable"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def print_rows(rows: list[Row]) -> None:
    for r in rows:
        head = f"{r['model']} {r['impl']} batch {r['batch']}:"
        if "error" in r:
            print(f"{head} FAILED {r['error']}", flush=True)
            continue
        forward = "n/a" if r["forward_ms"] is None else f"{r['forward_ms']:.3f} ms"
        print(f"{head} TPOT {r['tpot_ms']:.3f} ms, forward {forward} (engine start {r['engine_s']:.0f} s, "
              f"process {r['process_s']:.0f} s; async scheduling {r.get('async_scheduling')}, attention "
              f"{r.get('attention_backend')})", flush=True)


def analyze_traces(paths: Sequence[str], gap_us: float) -> int:
    """``--analyze-trace``: the report of every trace named or found under a folder named."""
    try:
        files = trace_files(paths)
    except FileNotFoundError as e:
        raise CliError(str(e)) from e
    if not files:
        raise CliError(f"no *.pt.trace.json[.gz] under {' '.join(paths)}")
    print("\n\n".join(format_report(analyze_file(f, gap_us)) for f in files))
    return EXIT_OK


def check_bench_files(rows: Path, results: Path, table_only: bool) -> None:
    """``--rows`` and ``--results`` are files (or, but for the rows of ``--table-only``, to be), the
    results in a folder that exists."""
    for flag, path in (("--rows", rows), ("--results", results)):
        if path.is_dir():
            raise CliError(f"{flag} {path} is a folder; give a file")
    if table_only and not rows.is_file():
        raise CliError(f"--rows {rows} does not exist; --table-only draws the table from it")
    if not results.parent.is_dir():
        raise CliError(f"--results {results}: there is no folder {results.parent}")


def writable_folder(path: Path | None, flag: str) -> None:
    """``path`` (a folder a run writes into) exists or is created, and can be written; None passes."""
    if path is None:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"{flag} {path}: cannot create it ({e.strerror}); give a folder you can write") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise CliError(f"{flag} {path}: not writable; give a folder you can write")


def bench_models(names: list[str] | None) -> list[str]:
    """The bench commands' ``--models``: the names given, else every shipped config that fits one
    GPU; each checked to be a shipped config (UnknownModelError, exit 2) before anything starts."""
    models = names or single_gpu_models()
    for model in models:
        shipped_config(model)
    return models


def cmd_bench(args: argparse.Namespace) -> int:
    """Run one engine per (model, impl) in its own process, append the rows to ``--rows`` and
    rewrite the table in ``--results`` from every row there (each model's latest run). With
    ``--profile-dir``, each engine then profiles its largest batch and the traces are analyzed;
    ``--analyze-trace`` only analyzes traces."""
    if args.analyze_trace:
        return analyze_traces(args.analyze_trace, args.gap_us)
    check_bench_files(args.rows, args.results, args.table_only)
    args.models = bench_models(args.models)
    if not 2 <= args.profile_tokens <= args.new_tokens or not 0 <= args.profile_stack_tokens <= args.new_tokens:
        raise CliError("--profile-tokens must be 2 to --new-tokens, --profile-stack-tokens 0 to --new-tokens")
    try:
        lanes: list[str | None] = [None] if args.gpus is None else list(gpu_lanes(args.gpus, args.tensor_parallel_size))
    except ValueError as e:
        raise CliError(f"--gpus: {e}") from e
    rows: list[Row] = []
    if not args.table_only:
        writable_folder(args.log_dir, "--log-dir")
        if (reason := bench_unavailable_reason()) is not None:
            print(f"vllm-mpk bench runs vLLM on a GPU: {reason} (--table-only redraws the table)", file=sys.stderr)
            return EXIT_UNAVAILABLE
        profile_dir = None if args.profile_dir is None else str(args.profile_dir.expanduser().resolve())
        configs = [EngineConfig(model, impl, tuple(args.batches), args.prompt_len, args.new_tokens, args.repeats,
                                args.gpu_memory_utilization, args.vllm_compile, profile_dir=profile_dir,
                                profile_tokens=args.profile_tokens, profile_stack_tokens=args.profile_stack_tokens,
                                tensor_parallel_size=args.tensor_parallel_size,
                                mpk_options=tuple(args.mpk_options.items()))
                   for model in args.models for impl in args.impls]
        log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="vllm_mpk_bench_"))
        together = "a model's engines side by side in one process" if args.side_by_side else "one engine a process"
        print(f"{len(configs)} engines, {args.rounds} round(s), {together}, {len(lanes)} lane(s); logs in {log_dir}",
              flush=True)
        rows = run_engines(configs, args.rows, log_dir, args.timeout, on_rows=print_rows, lanes=lanes,
                           rounds=args.rounds, side_by_side=args.side_by_side)
        if profile_dir is not None:
            print(f"\nprofiles in {profile_dir} (<trace>.analysis.txt: every step and gap)\n"
                  + analyze_profiles([engine_profile_dir(profile_dir, c.model, c.impl) for c in configs], args.gap_us),
                  flush=True)
    print(update_results(args.results, read_rows(args.rows)))
    print(f"\nrewrote the vLLM section of {args.results} from {args.rows}")
    return EXIT_FAILED if any("error" in r for r in rows) else EXIT_OK


# bench-vllm -------------------------------------------------------------------------------------


def print_tool_row(row: Row) -> None:
    setting = " ".join(f"{k} {row[k]}" for k in ("batch", "input_len", "concurrency") if k in row)
    values = row.get("error") or ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                           if k.endswith(("_s", "_ms", "throughput")))
    print(f"{row['bench']} {row['model']} {row['impl']} {setting} repeat {row['repeat']}: {values}", flush=True)


def cmd_bench_vllm(args: argparse.Namespace) -> int:
    """vLLM's own ``bench latency`` and ``bench serve``, stock and mpk, each engine in its own
    process; rows appended to ``--rows``, the section of ``--results`` redrawn from the latest run."""
    models = bench_models(args.models)
    if args.prepare_models is not None:
        for model in models:
            try:
                print(prepare_model_dir(model, args.prepare_models))
            except OSError as e:
                raise CliError(f"--prepare-models {args.prepare_models}: cannot write {e.filename} ({e.strerror})") from e
        return EXIT_OK
    check_bench_files(args.rows, args.results, args.table_only)
    rows: list[Row] = []
    if not args.table_only:
        writable_folder(args.log_dir, "--log-dir")
        writable_folder(args.model_root, "--model-root")
        if (reason := bench_unavailable_reason()) is not None:
            print(f"vllm-mpk bench-vllm runs vLLM on a GPU: {reason} (--table-only redraws the table)",
                  file=sys.stderr)
            return EXIT_UNAVAILABLE
        settings = VllmToolSettings(
            models=tuple(models), impls=tuple(args.impls), batches=tuple(args.batches),
            input_lens=tuple(args.input_lens), output_len=args.output_len, concurrencies=tuple(args.concurrencies),
            serve_input_len=args.serve_input_len, serve_output_len=args.serve_output_len,
            prompts_per_concurrency=args.prompts_per_concurrency, serve_temperature=args.serve_temperature,
            mpk_options=tuple(args.mpk_options.items()),
            repeats=args.repeats, num_iters=args.num_iters,
            num_iters_warmup=args.num_iters_warmup, port=args.port,
            timeout_s=args.timeout, server_start_s=args.server_timeout)
        log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="vllm_mpk_bench_vllm_"))
        model_root = args.model_root or log_dir / "models"
        print(f"{', '.join(args.benches)} for {', '.join(models)}; logs and vLLM's result files in {log_dir}",
              flush=True)
        rows = run_vllm_tools(settings, args.benches, args.rows, log_dir, model_root, on_row=print_tool_row)
    print(update_tool_results(args.results, read_rows(args.rows, TOOL_ROW_KEYS)))
    print(f"\nrewrote the vLLM tools section of {args.results} from {args.rows}")
    return EXIT_FAILED if any("error" in r for r in rows) else EXIT_OK


# soak -------------------------------------------------------------------------------------------


def cmd_soak(args: argparse.Namespace) -> int:
    """``vllm serve --model-impl mpk`` under load for ``--minutes``, then its greedy tokens against
    stock's; exit 0 when the soak passed (``bench/soak.py:problems``), 1 when it did not."""
    (model,) = bench_models([args.model])
    writable_folder(args.log_dir, "--log-dir")
    if (reason := bench_unavailable_reason()) is not None:
        print(f"vllm-mpk soak runs vLLM on a GPU: {reason}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    settings = SoakSettings(model=model, minutes=args.minutes, concurrencies=tuple(args.concurrencies),
                            input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio,
                            flat_mib=args.flat_mib, port=args.port, seed=args.seed, mpk_options=args.mpk_options)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="vllm_mpk_soak_"))
    print(f"soak of {model}: {args.minutes:g} minutes of load; logs, vLLM's result files and soak.json in {log_dir}",
          flush=True)
    report = soak(settings, log_dir, on_line=lambda line: print(line, flush=True))
    runs = report.runs
    done = sum(r.get("completed", 0) for r in runs)
    settled = report.settled_memory()
    print(f"\n{len(runs)} vllm bench serve runs, {done} requests completed, "
          f"{sum(r.get('failed', 0) for r in runs)} failed; {report.drops} streams dropped part-way")
    if settled:
        print(f"GPU memory after the first cycle: {min(settled):.0f} to {max(settled):.0f} MiB")
    from vllm_mpk.bench.greedy_compare import Comparison

    for name, comparison in report.comparisons.items():
        print(f"greedy tokens {name} against stock's: {Comparison.from_json(comparison).summary()}")
    found = problems(report, settings.flat_mib)
    for problem in found:
        print(f"FAILED: {problem}")
    print("soak passed" if not found else f"soak failed ({len(found)} problems)")
    return EXIT_FAILED if found else EXIT_OK


def add_soak_parser(sub: argparse._SubParsersAction) -> None:
    d = SoakSettings()
    s = sub.add_parser("soak", help="vllm serve --model-impl mpk under vllm bench serve for a set time (random "
                       "lengths, concurrency cycling, dropped streams), then its greedy tokens against stock's")
    s.add_argument("--model", type=str.lower, default=d.model, help=f"a shipped config name (default {d.model})")
    s.add_argument("--minutes", type=number_in(0), default=d.minutes,
                   help=f"of load, at least two cycles of --concurrencies (default {d.minutes:g})")
    s.add_argument("--concurrencies", nargs="+", type=POSITIVE, default=list(d.concurrencies),
                   help="vllm bench serve --max-concurrency values, cycled")
    s.add_argument("--input-len", type=POSITIVE, default=d.input_len, help="vllm bench serve --random-input-len")
    s.add_argument("--output-len", type=POSITIVE, default=d.output_len, help="vllm bench serve --random-output-len")
    s.add_argument("--range-ratio", type=number_in(0, 0.99, low_included=True), default=d.range_ratio,
                   help="vllm bench serve --random-range-ratio: lengths vary by this fraction either way")
    s.add_argument("--flat-mib", type=number_in(0), default=d.flat_mib,
                   help="most the GPU's used memory may move after the first cycle, in MiB")
    s.add_argument("--port", type=int_in(1, 65535), default=d.port, help="vllm serve's port")
    s.add_argument("--seed", type=int, default=d.seed, help="seeds the weights, prompts and datasets")
    s.add_argument("--mpk-options", type=mpk_options, default={}, metavar="JSON",
                   help='the mpk server\'s additional_config["mpk"], e.g. \'{"greedy_argmax": true}\' '
                        "(default: the plugin's defaults)")
    s.add_argument("--log-dir", type=Path, default=None, help="logs and results (default a new temp folder)")
    s.set_defaults(func=cmd_soak)


# arguments --------------------------------------------------------------------------------------


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a directory with config.json, or a shipped config name (default {DEFAULT_MODEL})")


def add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=BATCH, default=3, help="requests decoded together (default 3)")
    p.add_argument("--new-tokens", type=POSITIVE, default=4, help="greedy tokens per request (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts and random weights (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="vllm-mpk", description="Compile a model's decode step into one "
                                     "persistent megakernel plan; check it; run it.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = DecodeOptions()
    p = sub.add_parser("plan", help="compile the decode plan (no weights allocated) and print its summary")
    add_model_arg(p)
    p.add_argument("--max-batch", type=BATCH, default=d.max_batch,
                   help=f"requests one step decodes, 1 to {MAX_LINEAR_BATCH} (default {d.max_batch})")
    p.add_argument("--max-seq-len", type=POSITIVE, default=d.max_seq_len,
                   help=f"up to the model's max_position_embeddings (default {d.max_seq_len})")
    p.add_argument("--num-workers", type=POSITIVE, default=d.num_workers, help="one per SM (132 on H100 SXM)")
    p.add_argument("--layers", type=POSITIVE, default=None, help="keep only the first N layers (default all)")
    p.add_argument("--page-size", type=power_of_two, default=d.page_size)
    p.add_argument("--schedule", choices=sorted(POLICIES), default=d.schedule)
    p.add_argument("--tensor-parallel-size", type=POSITIVE, default=1, help="print each of N ranks' plans (default 1)")
    p.add_argument("--kv-splits", type=POSITIVE, default=d.kv_splits,
                   help="attention tasks per KV head and request (split KV); default auto: 2 while KV heads x "
                        "max batch x 4 <= workers, else 1; a value forces it")
    p.add_argument("--multi-step", action="store_true", help="begin_step first: one launch decodes many steps")
    p.set_defaults(func=cmd_plan)
    c = sub.add_parser("check", help="run the plan on the CPU reference executor and compare with transformers")
    add_model_arg(c)
    c.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    c.add_argument("--layers", type=POSITIVE, default=2, help="keep only the first N layers (default 2)")
    c.add_argument("--exact", action="store_true", help="float32 intermediates; tolerance 1e-4 instead of 3e-2")
    add_check_args(c)
    c.set_defaults(func=cmd_check)
    g = sub.add_parser("generate", help="the main job: plan, check, and run on a Hopper GPU when there is one")
    add_model_arg(g)
    add_check_args(g)
    g.add_argument("--prompt-len", type=POSITIVE, default=128,
                   help="prompt tokens per request on the GPU (default 128)")
    g.set_defaults(func=cmd_generate)
    p = sub.add_parser("profile", help="profile one decode step of the megakernel (Hopper GPU)")
    add_model_arg(p)
    p.add_argument("--batch", type=BATCH, default=1)
    p.add_argument("--context", type=POSITIVE, default=128, help="tokens of KV history per request (default 128)")
    p.add_argument("--layers", type=POSITIVE, default=None, help="use only the first N layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", default="mpk_trace.json", help="where to write the trace (default mpk_trace.json)")
    p.set_defaults(func=cmd_profile)
    add_bench_parser(sub)
    add_bench_vllm_parser(sub)
    add_soak_parser(sub)
    return parser


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    d = EngineConfig("", "")
    b = sub.add_parser("bench", help="TPOT and forward time under vLLM, stock vs --model-impl mpk, each engine in "
                       "its own process; rewrites the table in RESULTS.md")
    b.add_argument("--models", nargs="+", type=str.lower,
                   help="shipped config names (default: every shipped config that fits one GPU)")
    b.add_argument("--batches", nargs="+", type=POSITIVE, default=list(d.batches))
    b.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS),
                   help="stock vLLM, --model-impl mpk, and floor: stock with one decoder layer (vLLM's per-step floor)")
    add_benchmark_mpk_options(b, 'a MoE model gets "moe": true, TP>1 "tensor_parallel": true', '{"greedy_argmax": true}')
    b.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"), help="markdown file to update")
    b.add_argument("--rows", type=Path, default=Path("benchmarks/vllm_bench.jsonl"),
                   help="JSON lines: new rows are appended, the table is drawn from all of them")
    b.add_argument("--table-only", action="store_true", help="redraw the table from --rows; run nothing")
    b.add_argument("--prompt-len", type=POSITIVE, default=d.prompt_len)
    b.add_argument("--new-tokens", type=int_in(2), default=d.new_tokens)
    b.add_argument("--repeats", type=POSITIVE, default=d.repeats)
    b.add_argument("--rounds", type=POSITIVE, default=1,
                   help="run each model's engines N times in turn, each in a fresh process (with --side-by-side: "
                        "N processes of all of them); the table takes each time's median over them (vLLM's host step "
                        "moves between processes; default 1)")
    b.add_argument("--side-by-side", action="store_true",
                   help="start a model's engines together in one process, each on an equal share of "
                        "--gpu-memory-utilization, and interleave their TPOT repeats, so that a drift of the host's "
                        "speed falls on stock and mpk alike (default: one engine after the other)")
    b.add_argument("--gpu-memory-utilization", type=number_in(0, 1), default=d.gpu_memory_utilization)
    b.add_argument("--vllm-compile", action="store_true",
                   help="vLLM's default compilation (torch.compile, FULL_AND_PIECEWISE) instead of mode 0 with "
                   "FULL_DECODE_ONLY graphs; slower start")
    b.add_argument("--tensor-parallel-size", type=POSITIVE, default=1, help="GPUs per engine (default 1)")
    b.add_argument("--gpus", nargs="+", default=None, metavar="ID",
                   help="run models side by side, one per group of --tensor-parallel-size of these GPUs (each "
                        "model's engines in turn on one group, so stock and mpk share a card); default: one at a time")
    b.add_argument("--timeout", type=number_in(0), default=300.0, help="seconds per engine process (default 300)")
    b.add_argument("--log-dir", type=Path, default=None, help="one log per engine (default a new temp folder)")
    b.add_argument("--profile-dir", type=Path, default=None,
                   help="after its measurements, each engine profiles its largest batch with vLLM's torch profiler "
                   "(CPU and CUDA); traces, vLLM's op table and their analysis go to DIR/<model>-<impl>/")
    b.add_argument("--profile-tokens", type=int, default=d.profile_tokens,
                   help=f"new tokens of the profiled pass without Python stacks (default {d.profile_tokens})")
    b.add_argument("--profile-stack-tokens", type=int, default=d.profile_stack_tokens,
                   help="new tokens of a second pass with Python stacks, which names the Python code running "
                   f"during GPU gaps but slows the CPU side; 0 skips it (default {d.profile_stack_tokens})")
    b.add_argument("--analyze-trace", nargs="+", metavar="PATH", default=None,
                   help="run nothing: per decode step, GPU time by group, idle gaps and the engine thread's "
                   "activity during each, for these profiler traces (or every *.pt.trace.json[.gz] under a folder)")
    b.add_argument("--gap-us", type=number_in(0), default=20.0, help="idle gaps listed from this length on (default 20)")
    b.set_defaults(func=cmd_bench)


def add_bench_vllm_parser(sub: argparse._SubParsersAction) -> None:
    d = VllmToolSettings(models=())
    b = sub.add_parser("bench-vllm", help="vLLM's own bench latency and bench serve, stock vs --model-impl mpk, in "
                       "vLLM's default settings, each engine in its own process; rewrites their section of RESULTS.md")
    b.add_argument("--models", nargs="+", type=str.lower,
                   help="shipped config names (default: every shipped config that fits one GPU)")
    b.add_argument("--benches", nargs="+", choices=("latency", "serve"), default=["latency", "serve"])
    b.add_argument("--impls", nargs="+", choices=VLLM_TOOL_IMPLS, default=list(d.impls))
    b.add_argument("--batches", nargs="+", type=POSITIVE, default=list(d.batches),
                   help="vllm bench latency --batch-size values")
    b.add_argument("--input-lens", nargs="+", type=POSITIVE, default=list(d.input_lens),
                   help="vllm bench latency --input-len values")
    b.add_argument("--output-len", type=POSITIVE, default=d.output_len, help="vllm bench latency --output-len")
    b.add_argument("--num-iters", type=POSITIVE, default=d.num_iters,
                   help="vllm bench latency --num-iters (default vLLM's)")
    b.add_argument("--num-iters-warmup", type=int_in(0), default=d.num_iters_warmup,
                   help="vllm bench latency --num-iters-warmup (default vLLM's)")
    b.add_argument("--concurrencies", nargs="+", type=POSITIVE, default=list(d.concurrencies),
                   help="vllm bench serve --max-concurrency values")
    b.add_argument("--serve-input-len", type=POSITIVE, default=d.serve_input_len,
                   help="vllm bench serve --random-input-len")
    b.add_argument("--serve-output-len", type=POSITIVE, default=d.serve_output_len,
                   help="vllm bench serve --random-output-len")
    b.add_argument("--prompts-per-concurrency", type=POSITIVE, default=d.prompts_per_concurrency,
                   help="vllm bench serve --num-prompts is this times the concurrency, at least 16")
    add_benchmark_mpk_options(b, 'a MoE model gets "moe": true', '{"logits_in_kernel": true}')
    b.add_argument("--serve-temperature", type=number_in(0, low_included=True), default=d.serve_temperature,
                   help="vllm bench serve --temperature for every request (0: greedy); default: none sent, the "
                        "server's default applies (1.0 for these checkpoints)")
    b.add_argument("--repeats", type=POSITIVE, default=d.repeats,
                   help="runs of each setting, interleaved between the impls")
    b.add_argument("--port", type=int_in(1, 65535), default=d.port, help="vllm serve's port")
    b.add_argument("--timeout", type=number_in(0), default=d.timeout_s,
                   help="seconds per vllm bench latency or vllm bench serve process")
    b.add_argument("--server-timeout", type=number_in(0), default=d.server_start_s,
                   help="seconds vllm serve may take to answer /health")
    b.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"), help="markdown file to update")
    b.add_argument("--rows", type=Path, default=Path("benchmarks/vllm_tools.jsonl"),
                   help="JSON lines: new rows are appended, the section is drawn from the latest run")
    b.add_argument("--table-only", action="store_true", help="redraw the section from --rows; run nothing")
    b.add_argument("--log-dir", type=Path, default=None,
                   help="logs and vLLM's result files (default a new temp folder)")
    b.add_argument("--model-root", type=Path, default=None,
                   help="where the model directories are prepared (default LOG_DIR/models)")
    b.add_argument("--prepare-models", type=Path, default=None, metavar="DIR",
                   help="run nothing: write DIR/<model> (config.json and a tokenizer) for vLLM's tools and exit")
    b.set_defaults(func=cmd_bench_vllm)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a bad argument, reported already (ArgumentParser.error)
        return stop.code if isinstance(stop.code, int) else EXIT_UNAVAILABLE
    try:
        return args.func(args)
    except (CliError, ValueError) as e:  # the core raises ValueError for what the user can fix
        return report(str(e))


if __name__ == "__main__":
    sys.exit(main())
