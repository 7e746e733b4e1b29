"""Run ``vllm_mpk.bench.worker`` once per engine (or once per model, side by side), each in a
fresh process (and process group, so the engine cores it spawns go with it), and collect the rows.

Every row gets the run's id (UTC start time; the table pairs stock and mpk from one run, hence one
card) and the seconds its process took. A process that fails or times out leaves an error row
per engine and batch it did not measure, holding the last line of its log, and the run goes on to
the next process.

On a machine with several GPUs the engines can run in lanes (``gpu_lanes``: one
``CUDA_VISIBLE_DEVICES`` value each): one model's engines run in turn on one lane, so its stock,
mpk and floor numbers still come from one card, while other models run on the other lanes. A
floor engine after its model's stock engine gets the stock engine's KV cache size in blocks.

With ``rounds`` > 1 a model's engines run that many times in turn (stock, mpk, floor, stock, ...),
each in a fresh process, and every row records its round: vLLM's host step, which sets the small
models' TPOT, moves by more between processes than the engines differ. ``side_by_side`` runs a
model's engines in one process instead (``worker.run``: all started, each on an equal share of
``gpu_memory_utilization``, their TPOT repeats interleaved), so that the host's drift falls on
each alike.

An interrupted run (Ctrl-C, or SIGTERM as ``timeout`` sends) kills the process group of every
engine still running and starts no other: an engine core left behind would hold its GPU's memory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vllm_mpk.bench.table import FLOOR, STOCK
from vllm_mpk.bench.worker import EngineConfig, error_row
from vllm_mpk.runtime import nvshmem

Row = dict[str, Any]

_running: set[subprocess.Popen[bytes]] = set()  # worker processes of this run, killed if it is interrupted
_running_lock = threading.Lock()


def run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def log_tail(path: Path, lines: int = 1) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(text[-lines:]) or "(empty log)"


def worker_command(cfgs: Sequence[EngineConfig], rows_file: Path) -> list[str]:
    configs = json.dumps([asdict(c) for c in cfgs])
    return [sys.executable, "-m", "vllm_mpk.bench.worker", configs, "--rows", str(rows_file)]


def run_engine(cfgs: Sequence[EngineConfig], log: Path, timeout_s: float, devices: str | None = None) -> list[Row]:
    """The rows of one worker process running the engines of ``cfgs`` (on ``devices``, a
    ``CUDA_VISIBLE_DEVICES`` value, if given); error rows for the batches it did not finish."""
    with tempfile.TemporaryDirectory() as tmp, log.open("w") as out:
        rows_file = Path(tmp) / "rows.jsonl"
        start = time.perf_counter()
        env = {**os.environ, **nvshmem.ENVIRONMENT}  # NVLink multicast off from the start
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices
        with _running_lock:
            proc = subprocess.Popen(worker_command(cfgs, rows_file), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=env)
            _running.add(proc)
        try:
            rc: int | str = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = f"timed out after {timeout_s:.0f} s"
        finally:
            with_group_killed(proc)
            with _running_lock:
                _running.discard(proc)
        seconds = time.perf_counter() - start
        rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    done = {(r["impl"], r["batch"]) for r in rows}
    error = f"exit {rc}: {log_tail(log)} (log: {log})"
    rows += [error_row(c, b, error) for c in cfgs for b in c.batches if (c.impl, b) not in done]
    return [{**r, "process_s": seconds} for r in rows]


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker's process group (the worker and the engine core it spawned)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def with_group_killed(proc: subprocess.Popen[bytes]) -> None:
    """Kill what is left of the worker's process group (a hung worker, an orphaned engine core)."""
    kill_group(proc)
    proc.wait()


def kill_running_workers() -> None:
    with _running_lock:
        for proc in _running:
            kill_group(proc)


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """In the main thread, let SIGTERM raise SystemExit (so the run's cleanup runs) instead of
    ending the process on the spot."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:  # None: a handler installed outside Python, which signal.signal cannot put back
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def gpu_lanes(gpus: Sequence[str], tensor_parallel_size: int) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` values of the lanes ``gpus`` make for engines of
    ``tensor_parallel_size`` GPUs each (left-over GPUs stay idle)."""
    if len(gpus) < tensor_parallel_size:
        raise ValueError(f"{len(gpus)} GPUs cannot hold an engine of tensor-parallel size {tensor_parallel_size}")
    n = tensor_parallel_size
    return [",".join(gpus[i:i + n]) for i in range(0, len(gpus) - n + 1, n)]


def processes(engines: Sequence[EngineConfig], side_by_side: bool) -> list[list[EngineConfig]]:
    """A model's engines per worker process, in the order they run: each alone, or all in one; a
    floor engine after its stock engine either way."""
    in_turn = sorted(engines, key=lambda c: c.impl == FLOOR)
    return [in_turn] if side_by_side else [[c] for c in in_turn]


def sized_floors(cfgs: list[EngineConfig], blocks: int | None) -> tuple[list[EngineConfig], list[EngineConfig]]:
    """``cfgs`` that can run, a floor engine given ``blocks`` (the KV cache size a stock engine of
    an earlier process reported) unless a stock engine runs beside it (the worker then gives it
    that one's), and the floor engines that cannot: no size, and no stock engine beside them."""
    beside = any(c.impl == STOCK for c in cfgs)
    cfgs = [replace(c, kv_blocks=blocks) if c.impl == FLOOR and c.kv_blocks is None and not beside else c
            for c in cfgs]
    unsized = [c for c in cfgs if c.impl == FLOOR and c.kv_blocks is None and not beside]
    return [c for c in cfgs if c not in unsized], unsized


def memory_shares(cfgs: list[EngineConfig]) -> list[EngineConfig]:
    """Engines of one process on equal shares of their ``gpu_memory_utilization``."""
    return [replace(c, gpu_memory_utilization=c.gpu_memory_utilization / len(cfgs)) for c in cfgs]


def run_engines(configs: Iterable[EngineConfig], rows_path: Path, log_dir: Path, timeout_s: float,
                on_rows: Callable[[list[Row]], None] = lambda rows: None,
                lanes: Sequence[str | None] = (None,), rounds: int = 1, side_by_side: bool = False) -> list[Row]:
    """Run every engine ``rounds`` times, one model's in turn (or ``side_by_side`` in one process)
    on one lane, the lanes side by side; append each process's rows to ``rows_path`` as they come."""
    run = run_id()
    log_dir.mkdir(parents=True, exist_ok=True)
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    by_model: dict[str, list[EngineConfig]] = {}
    for cfg in configs:
        by_model.setdefault(cfg.label, []).append(cfg)
    waiting = list(by_model.values())
    all_rows: list[Row] = []
    lock = threading.Lock()
    stop = threading.Event()

    def lane(devices: str | None) -> None:
        while True:
            with lock:
                if not waiting or stop.is_set():
                    return
                group = waiting.pop(0)
            blocks: int | None = None
            for round_, cfgs in ((r, p) for r in range(rounds) for p in processes(group, side_by_side)):
                if stop.is_set():
                    return
                sized, unsized = sized_floors(cfgs, blocks)
                rows = [error_row(c, b, "not run: the floor engine takes its stock engine's KV cache size, and no "
                                        "stock engine of this model reported one in this run (add --impls vllm)")
                        for c in unsized for b in c.batches]
                if sized:
                    name = f"{sized[0].label.replace(' ', '-')}-{'+'.join(c.impl for c in sized)}"
                    log = log_dir / f"{name}{f'-round{round_}' if rounds > 1 else ''}.log"
                    rows += run_engine(memory_shares(sized), log, timeout_s, devices)  # one engine: all of it
                rows = [{**r, "run": run, **({"round": round_} if rounds > 1 else {})} for r in rows]
                blocks = next((r["kv_blocks"] for r in rows if r["impl"] == STOCK and r.get("kv_blocks")), blocks)
                with lock:
                    with rows_path.open("a") as f:
                        f.writelines(json.dumps(r) + "\n" for r in rows)
                    on_rows(rows)
                    all_rows.extend(rows)

    # Lanes report their end through events: an interrupted Thread.join can mark a running thread
    # as stopped (CPython 3.11), and this wait must outlast every engine a lane may still start.
    finished = [threading.Event() for _ in lanes]

    def lane_then_finish(devices: str | None, done: threading.Event) -> None:
        try:
            lane(devices)
        finally:
            done.set()

    threads = [threading.Thread(target=lane_then_finish, args=lane_done) for lane_done in zip(lanes, finished)]
    with sigterm_as_exit():
        try:
            for t in threads:
                t.start()
            for done in finished:
                done.wait()
        except BaseException:  # Ctrl-C or SIGTERM: no engine outlives the run, and no other starts
            stop.set()
            while not all(done.is_set() for done in finished):  # a lane may start one before it sees stop
                kill_running_workers()
                for done in finished:
                    done.wait(timeout=0.2)
            raise
    for t in threads:
        t.join()
    return all_rows
