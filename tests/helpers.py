"""Shared pieces of the CPU tests: model configs, weights that cost nothing, step inputs, and
running a plan through the reference executor."""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from vllm_mpk.api import PersistentKernel
from vllm_mpk.graph.ir import Role
from vllm_mpk.graph.plan import Plan
from vllm_mpk.graph.reference import ReferenceExecutor
from vllm_mpk.models.spec import ModelSpec
from vllm_mpk.models.weights import expected_shapes

REPO = Path(__file__).resolve().parents[1]
ORDERS = ("schedule", "random", "layers")


def plugin_missing() -> str | None:
    """Why a vLLM started by this Python would not load this package's plugin, or None. vLLM takes
    any ``model_impl`` string, so without the plugin ``"mpk"`` runs vLLM's own layers silently."""
    from importlib.metadata import entry_points

    found = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    if found.get("mpk") == "vllm_mpk.integration.plugin:register":
        return None
    return f"vllm_mpk's vLLM plugin is not installed for {sys.executable}: run `{sys.executable} -m pip install -e .`"


def config_paths() -> dict[str, Path]:
    """The model configs the project ships (``vllm_mpk/configs/*.json``), else ``../shared/models``."""
    shipped = sorted((REPO / "vllm_mpk" / "configs").glob("*.json"))
    if shipped:
        return {p.stem: p for p in shipped}
    return {p.parent.name: p for p in sorted((REPO.parent / "shared" / "models").glob("*/config.json"))}


def load_config(name: str) -> dict[str, Any]:
    return json.loads(config_paths()[name].read_text())


def model_spec(name: str, layers: int) -> ModelSpec:
    return ModelSpec.from_hf_config(load_config(name)).with_layers(layers)


def meta_weights(spec: ModelSpec, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Weights with the right shapes and no storage, for tests where values do not matter."""
    return {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape in expected_shapes(spec).items()}


def seed_of(text: str) -> int:
    """A stable seed per test case, so each case draws its own inputs and reruns reproduce them."""
    return zlib.crc32(text.encode())


def plan_inputs(mpk: PersistentKernel, given: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every input of the kernel's plan: its attached tensors, ``given`` step inputs, zeros for the rest."""
    out = {name: torch.zeros(h.shape, dtype=h.dtype) for name, h in mpk.tensors.items() if h.role is Role.INPUT}
    out.update(mpk.attached)
    out.update(given or {})
    return out


def run_plan(plan: Plan, inputs: dict[str, torch.Tensor], num_tokens: int, order: str, seed: int = 0,
             exact: bool = False) -> dict[str, torch.Tensor]:
    """One step of ``plan`` on clones of ``inputs`` (state updated in place stays the caller's own);
    returns every tensor of the step, inputs included, after it ran."""
    executor = ReferenceExecutor(plan, {k: v.clone() for k, v in inputs.items()}, exact=exact)
    executor.run_step(num_tokens, order=order, seed=seed)
    return executor.tensors


@contextmanager
def vllm_platform(platform: Any) -> Iterator[None]:
    """vLLM's current platform set to ``platform``, restored afterwards, also in the vLLM modules
    that bound the platform before (``from vllm.platforms import current_platform`` at import): an
    earlier test that imported them under the host's own platform must not decide their branches."""
    import vllm.platforms as platforms

    saved = platforms._current_platform

    def rebind(old: Any, new: Any) -> None:
        for module in list(sys.modules.values()):
            if old is not None and getattr(module, "__name__", "").startswith("vllm.") and \
                    getattr(module, "current_platform", None) is old:
                module.current_platform = new

    platforms._current_platform = platform
    rebind(saved, platform)
    try:
        yield
    finally:
        rebind(platform, saved)
        platforms._current_platform = saved


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads. The reference executor runs many small matmuls, which on
    a busy two-core machine are far slower with two OpenMP threads than with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Configs no shipped model has: other head counts and widths, Llama 3 RoPE scaling whose original
# context is short enough to change the angles of a few dozen positions, an untied Qwen3 whose
# head_dim is not hidden / heads.
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 384, "intermediate_size": 1024,
    "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64,
    "vocab_size": 1000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
    "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 32},
    "tie_word_embeddings": True, "hidden_act": "silu",
}
# Qwen3-30B-A3B shrunk to run in seconds: 16 experts, top 4, hidden 256, three layers
TINY_QWEN3_MOE = {**load_config("qwen3-30b-a3b"), "hidden_size": 256, "num_hidden_layers": 3,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000,
                  "max_position_embeddings": 256, "num_experts": 16, "num_experts_per_tok": 4,
                  "moe_intermediate_size": 96}
TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "hidden_size": 384, "intermediate_size": 768,
    "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 128,
    "vocab_size": 1000, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 256,
    "tie_word_embeddings": False, "hidden_act": "silu",
}


def assert_one_line_usage_error(argv: list[str], message: str, capsys: Any) -> None:
    """``vllm-mpk argv`` exits 2 with one line on stderr, naming the CLI and holding ``message``."""
    from vllm_mpk.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vllm-mpk: error: ") and message in err and err.count("\n") == 1, err
