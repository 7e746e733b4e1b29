"""`vllm serve --model-impl mpk` on loopback, compared with stock vLLM's greedy tokens (used by the
GPU integration tests, one GPU and tensor-parallel): completions teacher-forced on stock's tokens
(vllm_mpk/bench/greedy_compare.py), then one streamed completion against the same request in one piece."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_mpk.bench.greedy_compare import Comparison, Greedy, compare_teacher_forced

STREAM_TOKENS = 16


@dataclass
class Served:
    comparison: Comparison
    streamed: list[int]  # the streamed completion's tokens
    whole: list[int]  # the same request's tokens in one reply
    log: str

    def check(self) -> None:
        self.comparison.check()
        assert self.streamed == self.whole, f"streamed {self.streamed}, non-streaming {self.whole}"
        assert "megakernel ready" in self.log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict[str, Any]) -> bytes:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=120).read()


def wait_healthy(server: subprocess.Popen[bytes], port: int, log_path: Path, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert server.poll() is None, log_path.read_text()[-6000:]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            assert time.monotonic() < deadline, "vllm serve did not become healthy"
            time.sleep(2)


def serve_and_compare(checkpoint: Path, tmp_path: Path, prompt: list[int], stock: Greedy,
                      extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                      mpk: dict[str, Any] | None = None) -> Served:
    """Start `vllm serve` on ``checkpoint`` (strict mpk with ``mpk`` on top, FULL decode graphs,
    ``extra_args``), compare
    its greedy completions of ``prompt`` with ``stock`` and stream one, then stop the server."""
    port = free_port()
    # vLLM's CLI through this interpreter: its `vllm` script may live elsewhere (or belong to another Python).
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(checkpoint), "--model-impl", "mpk",
           "--host", "127.0.0.1", "--port", str(port), "--skip-tokenizer-init", "--dtype", "bfloat16",
           "--max-model-len", "512", "--gpu-memory-utilization", "0.35", "-cc.mode=0",
           "-cc.cudagraph_mode=FULL_DECODE_ONLY", "--additional-config", json.dumps({"mpk": {"strict": True, **(mpk or {})}}),
           *extra_args]
    request = {"model": str(checkpoint), "temperature": 0, "ignore_eos": True, "return_token_ids": True}

    def complete(batch: list[list[int]], max_tokens: list[int]) -> list[Greedy]:
        replies = [json.loads(post(port, {**request, "prompt": tokens, "max_tokens": n}))
                   for tokens, n in zip(batch, max_tokens, strict=True)]
        return [Greedy(r["choices"][0]["token_ids"]) for r in replies]

    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        server = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env or dict(os.environ))
        try:
            wait_healthy(server, port, log_path)
            comparison = compare_teacher_forced([prompt], [stock], complete)
            streamed: list[int] = []
            for line in post(port, {**request, "prompt": prompt, "max_tokens": STREAM_TOKENS,
                                    "stream": True}).decode().splitlines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    streamed += json.loads(line[len("data: "):])["choices"][0].get("token_ids") or []
            whole = complete([prompt], [STREAM_TOKENS])[0].tokens
        finally:
            server.terminate()
            server.wait(timeout=120)
    return Served(comparison, streamed, whole, log_path.read_text())
