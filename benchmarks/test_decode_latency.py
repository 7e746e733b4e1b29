"""pytest-benchmark: one decode step (embedding to greedy token) of the megakernel and of the same
model in plain PyTorch, both replayed from CUDA graphs on the same weights, KV cache and inputs.
``extra_info`` carries the CUDA-event median and the weight bandwidth it implies.

    python -m pytest benchmarks/test_decode_latency.py --benchmark-columns=median,min,max

Stock vLLM's forward is not in this suite yet (it needs vLLM on the GPU host; see RESULTS.md).
"""

from __future__ import annotations

import pytest
import torch

from vllm_mpk.demo import gpu_model, weight_bytes
from vllm_mpk.graph.step_state import step_inputs
from vllm_mpk.models.catalog import resolve_model
from vllm_mpk.models.torch_decode import TorchDecodeStep
from vllm_mpk.models.weights import random_weights
from vllm_mpk.runtime.timing import graph_replay_us

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MODELS = ["qwen3-0.6b", "qwen3-1.7b", "llama-3.2-1b", "qwen3-8b", "llama-3.1-8b"]
CONTEXT = 128


@pytest.fixture(scope="module", params=MODELS)
def model_weights(request):
    spec = resolve_model(request.param).spec
    weights = random_weights(spec, device="cuda")
    yield spec, weights
    del weights
    torch.cuda.empty_cache()


@pytest.mark.parametrize("impl", ["megakernel", "torch"])
@pytest.mark.parametrize("batch", [1, 8, 16])
def test_decode_step(benchmark, model_weights, batch, impl):
    spec, weights = model_weights
    model, weights, caches, blocks = gpu_model(spec, weights, batch, CONTEXT + 8 * batch + 2)
    for cache in caches:
        cache.normal_()
    step = torch.tensor([CONTEXT + 7 * b for b in range(batch)])
    tokens = torch.randint(0, spec.vocab_size, (batch, blocks.shape[1] * 16))
    inputs = {k: v.cuda() for k, v in step_inputs(step, tokens, blocks, 16).as_dict().items()}
    if impl == "megakernel":
        for name, value in inputs.items():
            model.kernel.step_buffers[name].copy_(value)
        kernel = model.kernel.executor()
        run = lambda: kernel.launch(batch)  # noqa: E731
    else:
        baseline = TorchDecodeStep(spec, weights, caches, model.kernel.attached["rope.cos_sin_cache"],
                                   blocks.shape[1] * 16)
        run = lambda: baseline(inputs)  # noqa: E731
    median_us = graph_replay_us(run)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()

    def replay() -> None:
        graph.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(replay, rounds=50, warmup_rounds=5)
    benchmark.extra_info.update(model=spec.architecture, hidden=spec.hidden_size, batch=batch, impl=impl,
                                event_median_us=median_us, gpu=torch.cuda.get_device_name(),
                                weight_tbps=weight_bytes(spec, weights) / median_us / 1e6)
