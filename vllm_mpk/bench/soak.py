"""``vllm-mpk soak``: ``vllm serve --model-impl mpk`` under ``vllm bench serve`` for a set time, as a
deployment runs it: vLLM's and the plugin's default settings, a random checkpoint at realistic
scale (normal(0, 0.02) weights, so that greedy tokens mean something), prompts of random lengths,
concurrency cycling up to 64 so that decode batches cross ``max_batch`` both ways, and a client
that drops its stream part-way, over and over.

It records every ``vllm bench serve`` run's completed and failed requests, the GPU's memory over
time, the clients dropped, and the server's own warnings; then it compares the soaked server's
greedy tokens with stock vLLM's on the same checkpoint, teacher-forced (``greedy_compare``), once
asking for top logprobs (vLLM's sampler) and once without (the requests whose greedy megakernel
steps are sampled by argmax, ``integration/greedy_sampler.py``). Stock runs first, briefly, for its
tokens and top logprobs. The soak passes when no request failed, the
memory stayed flat after the first cycle, the megakernel was ready and never turned off, the
server still answers, and every divergence from stock is a near tie (``problems``).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vllm_mpk.bench.greedy_compare import Comparison, Greedy, compare_teacher_forced
from vllm_mpk.bench.offline_tokenizer import prepare_model_dir
from vllm_mpk.bench.runner import sigterm_as_exit
from vllm_mpk.bench.vllm_tools import (
    MPK,
    STOCK,
    bench_serve_args,
    healthy,
    num_prompts,
    run_process,
    start,
    stop,
    vllm_executable,
    wait_healthy,
)
from vllm_mpk.integration.plugin import OFF_MESSAGE, READY_MESSAGE, STOPPED_MESSAGE

OFF_MESSAGES = (OFF_MESSAGE, STOPPED_MESSAGE)  # the plugin's warnings a soak's server log must not hold
# What a request to the server can raise: transport errors, and replies of another shape than vLLM's.
REQUEST_ERRORS = (OSError, http.client.HTTPException, ValueError, KeyError, TypeError, IndexError, AttributeError)
CANDIDATES = 5  # top logprobs per step of stock's reference: a near tie's token is among them
# How the soaked server is asked for the compared tokens: with stock's candidates as logprobs (vLLM's
# sampler on every step), and without (greedy megakernel steps sampled by argmax).
COMPARISONS = {"with logprobs": CANDIDATES, "without logprobs": None}


@dataclass(frozen=True)
class SoakSettings:
    model: str = "qwen3-0.6b"  # a shipped config name
    minutes: float = 15.0  # of load on the mpk server (the last cycle runs to its end)
    concurrencies: tuple[int, ...] = (1, 4, 16, 64)  # vllm bench serve --max-concurrency, cycled
    input_len: int = 1024
    output_len: int = 256
    range_ratio: float = 0.5  # --random-range-ratio: lengths drawn from [(1 - r) L, (1 + r) L]
    prompts_per_concurrency: int = 4  # --num-prompts = this × the concurrency (at least 16)
    check_prompts: int = 8  # greedy requests compared with stock's after the load
    check_tokens: int = 64
    memory_every_s: float = 10.0
    flat_mib: float = 256.0  # most the GPU's used memory may move after the first cycle
    drop_every_s: float = 2.0  # a client opens a stream and drops it after its first chunks
    port: int = 8321
    seed: int = 0
    timeout_s: float = 900.0  # per vllm bench serve process
    server_start_s: float = 900.0
    mpk_options: dict[str, Any] = field(default_factory=dict)  # additional_config["mpk"]; empty: the defaults


@dataclass
class SoakReport:
    settings: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)  # one per vllm bench serve
    memory_mib: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the load, MiB used)
    warm_s: float | None = None  # when the first cycle ended: memory before it is not judged
    drops: int = 0  # streams dropped part-way
    drop_errors: list[str] = field(default_factory=list)  # what a dropping client met other than its stream
    # Comparison.to_json() of the soaked server against stock, by how it was asked (COMPARISONS)
    comparisons: dict[str, dict[str, Any]] = field(default_factory=dict)
    ready: bool = False
    off_lines: list[str] = field(default_factory=list)
    alive_at_end: bool = False
    errors: list[str] = field(default_factory=list)  # what kept a step from running

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def settled_memory(self) -> list[float]:
        """The GPU memory samples (MiB) taken after the first cycle, the ones the soak judges."""
        return [mib for t, mib in self.memory_mib if self.warm_s is not None and t >= self.warm_s]


def problems(report: SoakReport, flat_mib: float) -> list[str]:
    """What makes the soak fail; empty when it passed."""
    out = list(report.errors)
    failed = sum(r.get("failed", 0) for r in report.runs)
    if failed:
        out.append(f"{failed} of {sum(r.get('failed', 0) + r.get('completed', 0) for r in report.runs)} "
                   "requests failed")
    out += [f"vllm bench serve at concurrency {r['concurrency']}: {r['error']}" for r in report.runs if "error" in r]
    if not report.runs:
        out.append("no vllm bench serve run finished")
    settled = report.settled_memory()
    if report.runs and len(settled) < 2:
        out.append(f"GPU memory was sampled {len(settled)} time(s) after the first cycle: run longer, or check that "
                   "nvidia-smi answers")
    elif settled and max(settled) - min(settled) > flat_mib:
        out.append(f"GPU memory moved {max(settled) - min(settled):.0f} MiB after the first cycle "
                   f"({min(settled):.0f} to {max(settled):.0f}; at most {flat_mib:.0f} allowed)")
    if not report.ready:
        out.append("the server's log has no megakernel ready line")
    out += [f"server log: {line}" for line in report.off_lines]
    if not report.alive_at_end:
        out.append("the server did not answer /health after the load")
    out += report.drop_errors[:3]
    for name, comparison in report.comparisons.items():
        try:
            Comparison.from_json(comparison).check()
        except AssertionError as e:
            out.append(f"greedy tokens {name} against stock's: {e}")
    return out


# the server ---------------------------------------------------------------------------------------


def server_command(vllm: str, model_dir: Path, impl: str, port: int, mpk_options: dict[str, Any] | None = None) -> list[str]:
    """``vllm serve`` in vLLM's default settings; the mpk engine with the plugin's defaults, or
    with ``mpk_options`` (``additional_config["mpk"]``) where given."""
    extra = ["--additional-config", json.dumps({"mpk": mpk_options})] if mpk_options and impl == MPK else []
    return [vllm, "serve", str(model_dir), "--model-impl", impl, "--port", str(port), *extra]


def complete(port: int, model_dir: Path, prompts: Sequence[list[int]], max_tokens: Sequence[int],
             logprobs: int | None = None) -> list[Greedy]:
    """Greedy completions of ``prompts``, sent at once (the server batches them), EOS ignored."""
    def one(prompt: list[int], n: int) -> Greedy:
        body = {"model": str(model_dir), "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        if logprobs is not None:
            body |= {"logprobs": logprobs, "return_tokens_as_token_ids": True}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as reply:
            choice = json.loads(reply.read())["choices"][0]
        steps = None if logprobs is None else [{int(token.split(":", 1)[1]): lp for token, lp in top.items()}
                                               for top in choice["logprobs"]["top_logprobs"]]
        return Greedy(list(choice["token_ids"]), steps)

    with ThreadPoolExecutor(max(1, len(prompts))) as pool:
        return list(pool.map(one, prompts, max_tokens))


def check_prompts(settings: SoakSettings, vocab: int) -> list[list[int]]:
    """Fixed prompts of 16 to 143 token ids (seeded), the same for stock and mpk."""
    rng = random.Random(settings.seed)
    return [[rng.randrange(vocab) for _ in range(rng.randrange(16, 144))] for _ in range(settings.check_prompts)]


# what runs beside the load ------------------------------------------------------------------------


class Every(threading.Thread):
    """Calls ``action`` every ``interval_s`` until stopped (daemon: never outlives the run)."""

    def __init__(self, interval_s: float, action: Callable[[], None]):
        super().__init__(daemon=True)
        self.interval_s, self.action, self.halt = interval_s, action, threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.action()
            self.halt.wait(self.interval_s)

    def stop(self) -> None:
        self.halt.set()
        self.join()


def gpu_memory_mib() -> float | None:
    """Memory used on the first visible GPU, as nvidia-smi reports it; None where it cannot."""
    index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    try:
        out = subprocess.run(["nvidia-smi", "-i", index, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return float(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def drop_a_stream(port: int, model_dir: Path, prompt: list[int]) -> str | None:
    """Open a streamed completion, read its first chunk, and close the connection under it; None
    when that went as a dropping client expects, else what it met."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        body = {"model": str(model_dir), "prompt": prompt, "max_tokens": 512, "temperature": 0, "ignore_eos": True,
                "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        if reply.status != 200:
            return f"a streamed completion got HTTP {reply.status}"
        if not reply.readline():
            return "a streamed completion ended before its first chunk"
        return None
    except (OSError, http.client.HTTPException) as e:
        return f"a streamed completion failed: {type(e).__name__}: {e}"
    finally:
        conn.close()  # the drop: the server must cancel the request and keep serving


# the run ------------------------------------------------------------------------------------------


def prepare_checkpoint(settings: SoakSettings, root: Path) -> Path:
    """``root/<model>``: the shipped config, its offline tokenizer and random bf16 weights."""
    from vllm_mpk.models.catalog import shipped_config
    from vllm_mpk.models.spec import ModelSpec
    from vllm_mpk.models.weights import random_weights, save_checkpoint

    directory = prepare_model_dir(settings.model, root)
    if not any(directory.glob("*.safetensors")):
        spec = ModelSpec.from_hf_config(shipped_config(settings.model))
        save_checkpoint(spec, random_weights(spec, seed=settings.seed + 1), directory)
    return directory


def load_args(settings: SoakSettings, model_dir: Path, concurrency: int, cycle: int, result: Path) -> list[str]:
    """``vllm bench serve``'s arguments for one run of the load: bench-vllm's, with prompt and output
    lengths drawn around their means and a dataset seed of the cycle's own."""
    prompts = num_prompts(settings.prompts_per_concurrency, concurrency)
    return [*bench_serve_args(str(model_dir), settings.port, settings.input_len, settings.output_len, concurrency,
                              prompts, str(result)),
            "--random-range-ratio", str(settings.range_ratio), "--seed", str(settings.seed + cycle)]


def load_cycles(settings: SoakSettings, vllm: str, model_dir: Path, log_dir: Path, report: SoakReport,
                on_line: Callable[[str], None]) -> None:
    """``vllm bench serve`` at each concurrency in turn until the soak's minutes are up, at least
    two cycles: the first warms the server up, memory is judged over the rest."""
    deadline = time.monotonic() + settings.minutes * 60
    begin = time.monotonic()
    cycle = 0
    while cycle < 2 or time.monotonic() < deadline:
        for c in settings.concurrencies:
            name = f"soak-c{c}-{cycle}"
            result = log_dir / f"{name}.json"
            command = [vllm, "bench", "serve", *load_args(settings, model_dir, c, cycle, result)]
            run: dict[str, Any] = {"cycle": cycle, "concurrency": c, "at_s": round(time.monotonic() - begin, 1)}
            error = run_process(command, log_dir / f"{name}.log", settings.timeout_s)
            if error is None:
                raw = json.loads(result.read_text())
                run |= {k: raw.get(k, 0) for k in ("completed", "failed")} | {"p50_tpot_ms": raw.get("p50_tpot_ms")}
            else:
                run["error"] = error
            report.runs.append(run)
            on_line(f"cycle {cycle} concurrency {c}: " + (run.get("error") or
                    f"{run['completed']} completed, {run['failed']} failed, TPOT p50 {run['p50_tpot_ms']} ms"))
            if error is not None and not healthy(settings.port):
                report.errors.append(f"the mpk server stopped answering during cycle {cycle}")
                return
        cycle += 1
        if report.warm_s is None:
            report.warm_s = time.monotonic() - begin


def soak(settings: SoakSettings, log_dir: Path, on_line: Callable[[str], None] = print) -> SoakReport:
    """The whole soak (module docstring); the report is also written to ``log_dir/soak.json``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with sigterm_as_exit():  # SIGTERM unwinds through the finally blocks that stop the servers
        report = stock_then_mpk(settings, log_dir, on_line)
    (log_dir / "soak.json").write_text(json.dumps(report.to_json(), indent=1))
    return report


def stock_then_mpk(settings: SoakSettings, log_dir: Path, on_line: Callable[[str], None]) -> SoakReport:
    report = SoakReport(settings=asdict(settings))
    vllm = vllm_executable()
    model_dir = prepare_checkpoint(settings, log_dir / "models")
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = check_prompts(settings, vocab)
    stock = serve(settings, vllm, model_dir, STOCK, log_dir, report,
                  lambda: complete(settings.port, model_dir, prompts, [settings.check_tokens] * len(prompts),
                                   CANDIDATES))
    if stock is not None:
        def load_then_compare() -> Comparison:
            began = time.monotonic()

            def sample() -> None:
                if (mib := gpu_memory_mib()) is not None:
                    report.memory_mib.append((round(time.monotonic() - began, 1), mib))

            drop_rng = random.Random(settings.seed)

            def drop() -> None:  # a fresh prompt each time, so each drop also runs a prefill
                prompt = [drop_rng.randrange(vocab) for _ in range(256)]
                problem = drop_a_stream(settings.port, model_dir, prompt)
                report.drops += 1
                if problem is not None:
                    report.drop_errors.append(problem)

            memory, dropping = Every(settings.memory_every_s, sample), Every(settings.drop_every_s, drop)
            memory.start()
            dropping.start()
            try:
                load_cycles(settings, vllm, model_dir, log_dir, report, on_line)
            finally:
                dropping.stop()
                memory.stop()
            return {name: compare_teacher_forced(
                prompts, stock, lambda ps, ns, lp=logprobs: complete(settings.port, model_dir, ps, ns, lp)).to_json()
                for name, logprobs in COMPARISONS.items()}

        report.comparisons = serve(settings, vllm, model_dir, MPK, log_dir, report, load_then_compare) or {}
    return report


def serve(settings: SoakSettings, vllm: str, model_dir: Path, impl: str, log_dir: Path, report: SoakReport,
          work: Callable[[], Any]) -> Any:
    """Start ``vllm serve`` for ``impl``, run ``work`` against it, stop it; ``work``'s result, or
    None with the reason in ``report.errors``. For mpk, the server log's verdict lines go to the report."""
    log = log_dir / f"serve-{impl}.log"
    if healthy(settings.port):
        report.errors.append(f"port {settings.port} already answers /health: stop that server or give --port")
        return None
    with log.open("w") as out:
        proc = start(server_command(vllm, model_dir, impl, settings.port, settings.mpk_options), out)
        try:
            error = wait_healthy(proc, settings.port, settings.server_start_s, log)
            if error is not None:
                report.errors.append(f"{impl} server: {error}")
                return None
            try:
                return work()
            except (*REQUEST_ERRORS, AssertionError) as e:
                report.errors.append(f"{impl} server: {type(e).__name__}: {e} (log: {log})")
                return None
            finally:
                if impl == MPK:
                    report.alive_at_end = healthy(settings.port)
        finally:
            stop(proc)
            if impl == MPK:
                text = log.read_text(errors="replace")
                report.ready = READY_MESSAGE in text
                report.off_lines = [line.strip() for line in text.splitlines()
                                    if any(m in line for m in OFF_MESSAGES)][:5]
