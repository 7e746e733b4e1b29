"""``vllm-mpk bench-vllm``: stock vLLM and ``--model-impl mpk`` measured by vLLM's own tools,
``vllm bench latency`` and ``vllm bench serve`` against ``vllm serve``, in vLLM's default
settings, each engine in a process of its own on one card.

Models are directories holding a shipped config.json and the offline tokenizer
(``vllm_mpk.bench.offline_tokenizer``), run with vLLM's dummy weights. The mpk engine is strict
(it fails rather than silently running vLLM's layers), plans decode batches up to the largest the
benchmark makes (at most ``MAX_LINEAR_BATCH``), opts in to the megakernel's MoE path for a
mixture-of-experts model (what is measured is the megakernel), and takes ``mpk_options`` on top
(e.g. the host-step opt-ins). vLLM takes any ``--model-impl`` string, so
an mpk engine whose log never says a megakernel was ready (the plugin not installed for the
Python that runs ``vllm``) gives error rows, not stock's numbers under mpk's name. Repeats are
interleaved between the impls (vllm, mpk, vllm, mpk, ...) so that a drift of the host's speed
falls on both.

Every process (a ``vllm bench latency``, a ``vllm serve``, a ``vllm bench serve``) runs in a
process group of its own that is killed when it ends, times out, or the run is interrupted
(Ctrl-C, or SIGTERM as ``timeout`` sends): an engine core left behind would hold the GPU's
memory. A process that fails or times out leaves an error row holding the last line of its log,
and the run goes on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from vllm_mpk.bench.offline_tokenizer import prepare_model_dir
from vllm_mpk.bench.runner import Row, log_tail, run_id, sigterm_as_exit, with_group_killed
from vllm_mpk.bench.table import MPK, STOCK
from vllm_mpk.bench.worker import mpk_engine_options
from vllm_mpk.codegen.ops.linear import MAX_LINEAR_BATCH
from vllm_mpk.integration.plugin import READY_MESSAGE
from vllm_mpk.runtime import nvshmem

IMPLS = (STOCK, MPK)
PERCENTILE_METRICS = ("ttft", "tpot", "itl")
PERCENTILES = (50, 99)
SERVE_METRICS = tuple(f"p{p}_{m}_ms" for m in PERCENTILE_METRICS for p in PERCENTILES) + ("output_throughput",)
MODEL_DIR = "$MODEL_DIR"  # the model directory as the recorded commands show it


@dataclass(frozen=True)
class Settings:
    """What one run measures, and its limits."""

    models: tuple[str, ...]  # shipped config names
    impls: tuple[str, ...] = IMPLS
    batches: tuple[int, ...] = (1, 8, 16, 32)
    input_lens: tuple[int, ...] = (128, 2048)
    output_len: int = 256
    concurrencies: tuple[int, ...] = (1, 4, 16, 64)
    serve_input_len: int = 1024
    serve_output_len: int = 256
    prompts_per_concurrency: int = 4  # --num-prompts = this × the concurrency (at least 16)
    serve_temperature: float | None = None  # vllm bench serve --temperature; None: the server's default (1.0 here)
    mpk_options: tuple[tuple[str, object], ...] = ()  # more additional_config["mpk"] entries for the mpk engine
    repeats: int = 3
    num_iters: int | None = None  # vllm bench latency --num-iters and --num-iters-warmup; None: vLLM's (30, 10)
    num_iters_warmup: int | None = None
    port: int = 8321
    timeout_s: float = 900.0  # per vllm bench latency or vllm bench serve process
    server_start_s: float = 900.0  # until vllm serve answers /health


def vllm_executable() -> str:
    """``vllm`` on PATH, else the one installed beside this Python."""
    return shutil.which("vllm") or str(Path(sys.executable).parent / "vllm")


def mpk_args(impl: str, max_batch: int, options: Mapping[str, object] | None = None) -> list[str]:
    """The engine's ``--model-impl`` and, for mpk, its options: strict, planned to ``max_batch``,
    and ``options`` on top."""
    args = ["--model-impl", impl]
    if impl == MPK:
        mpk = {"max_batch": min(max_batch, MAX_LINEAR_BATCH), "strict": True, **(options or {})}
        args += ["--additional-config", json.dumps({"mpk": mpk}, separators=(",", ":"))]
    return args


def latency_args(model_dir: str, impl: str, batch: int, input_len: int, output_len: int, output_json: str,
                 num_iters: int | None = None, num_iters_warmup: int | None = None,
                 options: Mapping[str, object] | None = None) -> list[str]:
    """The arguments of ``vllm bench latency`` (after ``bench latency``); its iteration counts only
    where given."""
    iters = [*(["--num-iters", str(num_iters)] if num_iters else []),
             *(["--num-iters-warmup", str(num_iters_warmup)] if num_iters_warmup is not None else [])]
    return ["--model", model_dir, "--load-format", "dummy", *mpk_args(impl, batch, options), "--batch-size", str(batch),
            "--input-len", str(input_len), "--output-len", str(output_len), *iters, "--output-json", output_json]


def serve_args(model_dir: str, impl: str, port: int, max_concurrency: int,
               options: Mapping[str, object] | None = None) -> list[str]:
    """The arguments of ``vllm serve``."""
    return [model_dir, "--load-format", "dummy", *mpk_args(impl, max_concurrency, options), "--port", str(port)]


def num_prompts(per_concurrency: int, concurrency: int) -> int:
    """``vllm bench serve --num-prompts``: enough for every client to send several, at least 16."""
    return max(16, per_concurrency * concurrency)


def bench_serve_args(model_dir: str, port: int, input_len: int, output_len: int, concurrency: int, prompts: int,
                     result_file: str, temperature: float | None = None) -> list[str]:
    """The arguments of ``vllm bench serve`` (after ``bench serve``). EOS is ignored so every
    request makes ``output_len`` tokens, as dummy weights would otherwise end them anywhere. Without
    ``temperature`` the requests carry none and the server's default applies (1.0 for a checkpoint
    without a generation config, as here)."""
    return ["--backend", "vllm", "--model", model_dir, "--port", str(port), "--dataset-name", "random",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len), "--ignore-eos",
            "--max-concurrency", str(concurrency), "--num-prompts", str(prompts),
            "--percentile-metrics", ",".join(PERCENTILE_METRICS),
            "--metric-percentiles", ",".join(map(str, PERCENTILES)),
            "--save-result", "--result-filename", result_file,
            *(["--temperature", str(temperature)] if temperature is not None else [])]


def shown(command: Sequence[str], model_dir: str) -> str:
    """``command`` as a shell line, ``vllm`` by name and the model directory as ``$MODEL_DIR``."""
    words = ["vllm", *command[1:]]
    return " ".join(MODEL_DIR if w == model_dir else f"'{w}'" if "{" in w else w for w in words)


# vLLM's result files --------------------------------------------------------------------------


def latency_result(path: Path) -> Row:
    """From ``vllm bench latency --output-json``: the median and mean seconds of one batch's
    generation over its iterations (``percentiles`` keys become strings in JSON)."""
    raw = json.loads(path.read_text())
    return {"latency_s": raw["percentiles"]["50"], "mean_latency_s": raw["avg_latency"]}


def serve_result(path: Path) -> Row:
    """From ``vllm bench serve --save-result``: TTFT, TPOT, ITL percentiles (ms) and output tokens/s;
    failed requests are an error."""
    raw = json.loads(path.read_text())
    if raw.get("failed"):
        raise ValueError(f"{raw['failed']} of {raw['failed'] + raw['completed']} requests failed")
    missing = [k for k in SERVE_METRICS if k not in raw]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    return {k: raw[k] for k in SERVE_METRICS}


# processes ------------------------------------------------------------------------------------


def start(command: Sequence[str], out: IO[str]) -> subprocess.Popen[bytes]:
    """``command`` in a process group of its own (NVLink multicast off), output to ``out``."""
    return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **nvshmem.ENVIRONMENT})


def group_members(pgid: int) -> list[int]:
    """The processes of group ``pgid`` still running (zombies, which hold no GPU memory, aside)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            members.append(int(stat.parent.name))
    return members


def stop(proc: subprocess.Popen[bytes], within_s: float = 60.0) -> None:
    """Kill ``proc``'s process group and wait (a bounded time) until every member has ended, so
    that the next engine finds the GPU memory of this one's engine core free."""
    with_group_killed(proc)
    deadline = time.monotonic() + within_s
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def run_process(command: Sequence[str], log: Path, timeout_s: float) -> str | None:
    """Run ``command`` in its own process group, output to ``log``; None on success, else why
    not. The group is killed however this returns (an interrupt included)."""
    with log.open("w") as out:
        proc = start(command, out)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout_s:.0f} s: {log_tail(log)} (log: {log})"
        finally:
            stop(proc)
    return None if rc == 0 else f"exit {rc}: {log_tail(log)} (log: {log})"


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(proc: subprocess.Popen[bytes], port: int, timeout_s: float, log: Path,
                 poll_s: float = 1.0) -> str | None:
    """None once the server answers ``/health``; why not if it exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"vllm serve exited ({proc.returncode}) before it was healthy: {log_tail(log)} (log: {log})"
        if healthy(port):
            return None
        time.sleep(poll_s)
    return f"vllm serve not healthy after {timeout_s:.0f} s: {log_tail(log)} (log: {log})"


# the benchmarks -------------------------------------------------------------------------------


def latency_rows(settings: Settings, dirs: dict[str, Path], log_dir: Path,
                 on_row: Callable[[Row], None]) -> None:
    vllm = vllm_executable()
    for model in settings.models:
        for batch in settings.batches:
            for input_len in settings.input_lens:
                for repeat in range(settings.repeats):
                    for impl in settings.impls:
                        name = f"latency-{model}-{impl}-b{batch}-i{input_len}-r{repeat}"
                        out = log_dir / f"{name}.json"
                        command = [vllm, "bench", "latency", *latency_args(
                            str(dirs[model]), impl, batch, input_len, settings.output_len, str(out),
                            settings.num_iters, settings.num_iters_warmup, mpk_engine_options(model, settings.mpk_options))]
                        row: Row = {"bench": "latency", "model": model, "impl": impl, "batch": batch,
                                    "input_len": input_len, "output_len": settings.output_len, "repeat": repeat,
                                    "command": shown(command, str(dirs[model]))}
                        log = log_dir / f"{name}.log"
                        error = run_process(command, log, settings.timeout_s) or megakernel_missing(impl, log)
                        on_row({**row, **({"error": error} if error else result_or_error(latency_result, out))})


def result_or_error(parse: Callable[[Path], Row], path: Path) -> Row:
    try:
        return parse(path)
    except (OSError, ValueError, KeyError) as e:
        return {"error": f"unreadable result {path}: {e}"}


def serve_rows(settings: Settings, dirs: dict[str, Path], log_dir: Path, on_row: Callable[[Row], None]) -> None:
    vllm = vllm_executable()
    for model in settings.models:
        for repeat in range(settings.repeats):
            for impl in settings.impls:
                serve_one(settings, vllm, model, str(dirs[model]), impl, repeat, log_dir, on_row)


def serve_one(settings: Settings, vllm: str, model: str, model_dir: str, impl: str, repeat: int, log_dir: Path,
              on_row: Callable[[Row], None]) -> None:
    """One ``vllm serve`` of ``model`` and ``impl``, ``vllm bench serve`` at each concurrency, a
    row each."""
    name = f"serve-{model}-{impl}-r{repeat}"
    server = [vllm, "serve", *serve_args(model_dir, impl, settings.port, max(settings.concurrencies),
                                         mpk_engine_options(model, settings.mpk_options))]
    log = log_dir / f"{name}.log"
    rows = [{"bench": "serve", "model": model, "impl": impl, "concurrency": c, "input_len": settings.serve_input_len,
             "output_len": settings.serve_output_len, "temperature": settings.serve_temperature, "repeat": repeat,
             "server_command": shown(server, model_dir)}
            for c in settings.concurrencies]
    if healthy(settings.port):  # another server would answer for this one
        for row in rows:
            on_row({**row, "error": f"port {settings.port} already answers /health: stop that server or give --port"})
        return
    with log.open("w") as out:
        began = time.monotonic()
        proc = start(server, out)
        try:
            error = wait_healthy(proc, settings.port, settings.server_start_s, log)
            started = round(time.monotonic() - began, 1)  # the engine start a user waits for (nvcc builds included)
            for row in rows:
                if error is None:
                    row["server_start_s"] = started
                c = row["concurrency"]
                result = log_dir / f"{name}-c{c}.json"
                command = [vllm, "bench", "serve", *bench_serve_args(
                    model_dir, settings.port, settings.serve_input_len, settings.serve_output_len, c,
                    num_prompts(settings.prompts_per_concurrency, c), str(result), settings.serve_temperature)]
                row["command"] = shown(command, model_dir)
                if error is None:
                    failed = run_process(command, log_dir / f"{name}-c{c}.log", settings.timeout_s)
                    error = None if failed else megakernel_missing(impl, log)  # the rest would time stock too
                    failed = failed or error
                    on_row({**row, **({"error": failed} if failed else result_or_error(serve_result, result))})
                else:
                    on_row({**row, "error": error})
        finally:
            stop(proc)


def megakernel_missing(impl: str, log: Path) -> str | None:
    """None unless ``impl`` is mpk and its engine's log never says a megakernel was ready: then why
    its numbers are stock vLLM's."""
    if impl != MPK or READY_MESSAGE in log.read_text(errors="replace"):
        return None
    return (f"the mpk engine never readied a megakernel, so vLLM's own layers ran: install vllm_mpk for the Python "
            f"that runs {vllm_executable()} (that Python's -m pip) (log: {log})")


def card_name() -> str:
    """The GPU ``nvidia-smi`` names first (the card CUDA_VISIBLE_DEVICES leaves), or ``unknown``."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    index = int(visible) if visible.isdigit() and int(visible) < len(out) else 0
    return out[index].strip() if out else "unknown"


def commit() -> str:
    """The short commit of the checkout this package runs from, or ``unknown``."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run(settings: Settings, benches: Sequence[str], rows_path: Path, log_dir: Path, model_root: Path,
        on_row: Callable[[Row], None] = lambda row: None) -> list[Row]:
    """Run ``benches`` ("latency", "serve"), appending each row to ``rows_path`` as it comes;
    the rows, each with the run's id, card and commit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    dirs = {model: prepare_model_dir(model, model_root) for model in settings.models}
    stamp = {"run": run_id(), "card": card_name(), "commit": commit()}
    rows: list[Row] = []

    def record(row: Row) -> None:
        row = {**row, **stamp}
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        on_row(row)

    with sigterm_as_exit():  # SIGTERM unwinds through the finally blocks that kill the process groups
        if "latency" in benches:
            latency_rows(settings, dirs, log_dir, record)
        if "serve" in benches:
            serve_rows(settings, dirs, log_dir, record)
    return rows

