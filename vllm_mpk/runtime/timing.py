"""Time GPU work the way decode runs it: captured once in a CUDA graph, replayed, median of many."""

from __future__ import annotations

from collections.abc import Callable

import torch


def graph_replay_us(fn: Callable[[], object], iters: int = 50, warmup: int = 5) -> float:
    """Median microseconds of one replay of ``fn`` captured in a CUDA graph (device events)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]
