"""The vLLM plugin on a CPU: entry point discovery, ``model_impl="mpk"`` resolving to MPK classes
(and nothing else changing), unsupported models falling back with one warning, options, the
decode-batch predicate, the KV-cache layout check, and ``vllm serve --help`` with the plugin."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from vllm_mpk.integration import plugin
from vllm_mpk.integration.binding import (
    UnsupportedMetadata,
    decode_batch,
    kv_layout_problem,
    same_buffers,
    widen_rows,
)
from vllm_mpk.integration.options import MpkOptions, MpkOptionsError
from vllm_mpk.models.kv_cache import allocate_kv_caches
from vllm_mpk.models.spec import ModelSpec

pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1000, "rms_norm_eps": 1e-6, "max_position_embeddings": 512,
        "hidden_act": "silu", "torch_dtype": "bfloat16"}
CONFIGS = {
    "qwen3": {**TINY, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 64,
              "tie_word_embeddings": True, "rope_theta": 1000000.0},
    "llama": {**TINY, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False,
              "rope_theta": 500000.0},
    # head_dim 96: a Llama the megakernel does not run
    "llama-hd96": {**TINY, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 384},
    "qwen3-moe": {**TINY, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "head_dim": 64,
                  "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128},
}
# shared experts: a MoE design the megakernel does not run, opted in or not
CONFIGS["qwen3-moe-shared"] = {**CONFIGS["qwen3-moe"], "shared_expert_intermediate_size": 256}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for name, config in CONFIGS.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
        out[name] = root / name
    return out


@pytest.fixture
def mpk_log() -> Iterator[list[logging.LogRecord]]:
    """Records of the plugin's logger ("vllm.mpk" does not propagate past vLLM's own logger)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("vllm.mpk")
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)


def model_config(path: Path, impl: str, **engine: Any) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(path), model_impl=impl, skip_tokenizer_init=True, **engine).create_model_config()


def resolve(mc: Any) -> tuple[type, str]:
    return mc.registry.resolve_model_cls(mc.architectures, mc)


# entry point and registration -----------------------------------------------------------------


def test_entry_point_is_discovered() -> None:
    from importlib.metadata import PackageNotFoundError, distribution

    from tests.helpers import plugin_missing

    try:
        distribution("vllm_mpk")
    except PackageNotFoundError:
        pytest.skip("vllm_mpk is not pip-installed in this environment (pip install -e .)")
    assert plugin_missing() is None


def test_a_missing_plugin_is_named_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from tests.helpers import plugin_missing

    assert plugin_missing() is None or "not installed" in plugin_missing()
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    assert plugin_missing() == (f"vllm_mpk's vLLM plugin is not installed for {sys.executable}: "
                                f"run `{sys.executable} -m pip install -e .`")


def test_register_twice_is_harmless() -> None:
    from vllm.config.scheduler import SchedulerConfig
    from vllm.model_executor.models.registry import _ModelRegistry

    plugin.register()
    first = (_ModelRegistry.resolve_model_cls, _ModelRegistry.inspect_model_cls, SchedulerConfig.get_scheduler_cls)
    plugin.register()
    assert (_ModelRegistry.resolve_model_cls, _ModelRegistry.inspect_model_cls,
            SchedulerConfig.get_scheduler_cls) == first
    for method in first:
        assert getattr(method, plugin.WRAPPED_MARK)
        assert not getattr(method.__wrapped__, plugin.WRAPPED_MARK, False)  # wrapped exactly once


def test_vllm_loads_the_plugin_in_its_own_processes() -> None:
    """What vLLM does in each process it starts: load_general_plugins(); the registry is wrapped."""
    code = ("from vllm.plugins import load_general_plugins; load_general_plugins(); "
            "from vllm.model_executor.models.registry import _ModelRegistry as R; "
            "print(bool(getattr(R.resolve_model_cls, '_vllm_mpk_wrapped', False)))")
    env = {**os.environ, "VLLM_PLUGINS": "mpk"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


# resolution ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,stock", [("qwen3", "Qwen3ForCausalLM"), ("llama", "LlamaForCausalLM")])
def test_mpk_resolves_an_mpk_subclass_of_the_stock_class(model_dirs: dict[str, Path], name: str, stock: str,
                                                         mpk_log: list[logging.LogRecord]) -> None:
    from vllm.model_executor.model_loader.utils import get_model_architecture

    from vllm_mpk.integration.model import MpkDecodeMixin

    plugin.register()
    mc = model_config(model_dirs[name], "mpk")
    cls, arch = resolve(mc)
    assert arch == stock and mc.architecture == stock
    assert cls.__name__ == f"Mpk{stock}" and issubclass(cls, MpkDecodeMixin)
    assert cls.__mro__[2].__name__ == stock and cls.__mro__[2].__module__.startswith("vllm.model_executor.models")
    assert resolve(mc)[0] is cls  # one class per stock class
    assert get_model_architecture(mc) == (cls, stock)  # the loader's path (model_loader/utils.py)
    assert not [r for r in mpk_log if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("impl", ["vllm", "auto"])
def test_other_model_impls_are_untouched(model_dirs: dict[str, Path], impl: str) -> None:
    plugin.register()
    cls, arch = resolve(model_config(model_dirs["qwen3"], impl))
    assert cls.__name__ == "Qwen3ForCausalLM" and cls.__module__ == "vllm.model_executor.models.qwen3"


@pytest.mark.parametrize("name,why", [("llama-hd96", "head_dim 96"), ("qwen3-moe-shared", "shared experts")])
def test_unsupported_models_resolve_the_stock_class_with_one_warning(
        model_dirs: dict[str, Path], name: str, why: str, mpk_log: list[logging.LogRecord]) -> None:
    from vllm.model_executor.model_loader.utils import get_model_architecture

    plugin.register()
    plugin._reported.clear()
    mc = model_config(model_dirs[name], "mpk")  # ModelConfig.__post_init__ inspects: the warning
    cls, _ = resolve(mc)
    resolve(mc)
    get_model_architecture(mc)
    assert not cls.__name__.startswith("Mpk")
    assert cls.__name__ == CONFIGS[name]["architectures"][0]
    warnings = [r.getMessage() for r in mpk_log if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and why in warnings[0], warnings


def cpu_vllm_config(mc: Any, mpk: dict[str, Any]) -> Any:
    from vllm.config import DeviceConfig, VllmConfig

    return VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu"), additional_config={"mpk": mpk})


@pytest.mark.parametrize("mpk,routed", [({}, False), ({"moe": False}, False), ({"moe": True}, True)])
def test_moe_models_are_served_by_the_megakernel_only_when_opted_in(
        model_dirs: dict[str, Path], mpk: dict[str, Any], routed: bool, mpk_log: list[logging.LogRecord]) -> None:
    """The front end makes the ModelConfig before the VllmConfig that holds additional_config, so
    only a worker (loading under that VllmConfig) knows: it resolves the stock class with one
    warning that says how to opt in, or the MPK class."""
    from vllm.config import set_current_vllm_config

    plugin.register()
    plugin._reported.clear()
    mc = model_config(model_dirs["qwen3-moe"], "mpk")
    assert not [r for r in mpk_log if r.levelno >= logging.WARNING]
    with set_current_vllm_config(cpu_vllm_config(mc, mpk)):
        cls, _ = resolve(mc)
        resolve(mc)
    warnings = [r.getMessage() for r in mpk_log if r.levelno >= logging.WARNING]
    if routed:
        assert cls.__name__ == "MpkQwen3MoeForCausalLM" and not warnings
    else:
        assert cls.__name__ == "Qwen3MoeForCausalLM"
        assert len(warnings) == 1 and """--additional-config '{"mpk": {"moe": true}}'""" in warnings[0], warnings


def test_strict_mode_refuses_moe_that_is_not_opted_in(model_dirs: dict[str, Path]) -> None:
    from vllm.config import set_current_vllm_config

    from vllm_mpk.models.spec import UnsupportedModelError

    plugin.register()
    mc = model_config(model_dirs["qwen3-moe"], "mpk")
    with set_current_vllm_config(cpu_vllm_config(mc, {"strict": True})), \
            pytest.raises(UnsupportedModelError, match=r"strict mode: mixture-of-experts models are opt-in"):
        resolve(mc)


def test_float16_resolves_the_stock_class_with_one_warning(model_dirs: dict[str, Path],
                                                           mpk_log: list[logging.LogRecord]) -> None:
    plugin.register()
    plugin._reported.clear()
    mc = model_config(model_dirs["llama"], "mpk", dtype="float16")
    cls, _ = resolve(mc)
    resolve(mc)
    assert cls.__name__ == "LlamaForCausalLM"
    warnings = [r.getMessage() for r in mpk_log if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "float16" in warnings[0]


def test_strict_mode_refuses_an_unsupported_model_at_load(model_dirs: dict[str, Path]) -> None:
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config

    from vllm_mpk.models.spec import UnsupportedModelError

    plugin.register()
    mc = model_config(model_dirs["llama-hd96"], "mpk")
    vc = VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu"),
                    additional_config={"mpk": {"strict": True}})
    with set_current_vllm_config(vc), pytest.raises(UnsupportedModelError, match="strict"):
        resolve(mc)


# `vllm serve --help`, through the console script's entry function. Without a GPU vLLM cannot
# infer a device and its parser fails before printing anything, plugin or not, so on such hosts
# vLLM's CPU platform is put in place first (it only decides device defaults here).
SERVE_HELP = """
import sys, torch
if not torch.cuda.is_available():
    import vllm.platforms as p
    from vllm.platforms.cpu import CpuPlatform
    p._current_platform = CpuPlatform()
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", "serve", *sys.argv[1:]]
main()
"""


LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR) \d\d-\d\d ")


def serve_help(arg: str, plugins: str) -> str:
    out = subprocess.run([sys.executable, "-c", SERVE_HELP, arg], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "VLLM_PLUGINS": plugins})
    assert out.returncode == 0, out.stderr[-2000:]
    return "\n".join(line for line in out.stdout.splitlines() if not LOG_LINE.match(line))


def test_vllm_serve_help_parses_with_the_plugin() -> None:
    with_plugin = serve_help("--help", "mpk")
    assert with_plugin == serve_help("--help", "")  # VLLM_PLUGINS="" loads no plugin: stock vLLM
    assert "--model-impl" in serve_help("--help=model-impl", "mpk")


# options ------------------------------------------------------------------------------------------


def test_options_default_and_from_additional_config() -> None:
    assert MpkOptions.from_vllm_config(SimpleNamespace(additional_config={})) == MpkOptions()
    assert MpkOptions().kv_splits is None  # auto: chosen per plan batch size (models/decoder.py:auto_kv_splits)
    assert MpkOptions.from_dict({"kv_splits": None}).kv_splits is None
    assert MpkOptions.from_dict({"kv_splits": 1}).kv_splits == 1
    vc = SimpleNamespace(additional_config={"mpk": {"max_batch": 16, "num_workers": 66, "block_dim": 128,
                                                    "schedule": "round_robin", "timeout_s": 5, "profile": True,
                                                    "strict": True, "kv_splits": 4, "moe": True, "tensor_parallel": True,
                                                    "logits_in_kernel": True, "greedy_argmax": True},
                                           "other_plugin": {"x": 1}})
    o = MpkOptions.from_vllm_config(vc)
    assert (o.max_batch, o.num_workers, o.block_dim, o.schedule, o.timeout_s, o.profile, o.strict, o.kv_splits,
            o.moe, o.tensor_parallel, o.logits_in_kernel, o.greedy_argmax) == (16, 66, 128, "round_robin", 5, True,
                                                                               True, 4, True, True, True, True)
    assert not MpkOptions().logits_in_kernel and not MpkOptions().greedy_argmax  # opt-in until run on a GPU
    assert not MpkOptions().moe and not MpkOptions().tensor_parallel  # MoE and TP>1 are opt-in


@pytest.mark.parametrize("raw,match", [
    ({"max_batchs": 4}, r"unknown .*\['max_batchs'\].*known keys"),
    ({"max_batch": 0}, r'\["max_batch"\] must be a positive integer'),
    ({"max_batch": "8"}, r'\["max_batch"\] must be a positive integer'),
    ({"max_batch": True}, r'\["max_batch"\] must be a positive integer'),
    ({"num_workers": -1}, r'\["num_workers"\]'),
    ({"block_dim": 512}, r'\["block_dim"\] must be one of \(128, 256\)'),
    ({"schedule": "fastest"}, r'\["schedule"\] must be one of'),
    ({"timeout_s": 0}, r'\["timeout_s"\] must be a number of seconds from 0.001 to 3600, got 0'),
    ({"kv_splits": 0}, r'\["kv_splits"\] must be a positive integer or null \(auto.*got 0'),
    ({"kv_splits": -1}, r'\["kv_splits"\] must be a positive integer or null \(auto.*got -1'),
    ({"kv_splits": "2"}, r'\["kv_splits"\] must be a positive integer or null \(auto.*got \'2\''),
    ({"kv_splits": 2.0}, r'\["kv_splits"\] must be a positive integer or null'),
    ({"kv_splits": True}, r'\["kv_splits"\] must be a positive integer or null'),
    ({"strict": "yes"}, r'\["strict"\] must be true or false'),
    ({"moe": 1}, r'\["moe"\] must be true or false, got 1'),
    ({"greedy_argmax": "yes"}, r'\["greedy_argmax"\] must be true or false, got \'yes\''),
    ([1, 2], "must be a JSON object"),
])
def test_bad_options_name_the_key(raw: Any, match: str) -> None:
    with pytest.raises(MpkOptionsError, match=match):
        MpkOptions.from_dict(raw)


# decode batches and buffers ---------------------------------------------------------------------


def metadata(max_query_len: int, num_reqs: int, num_tokens: int | None = None, **fields: Any) -> SimpleNamespace:
    n = num_tokens or num_reqs
    base = dict(max_query_len=max_query_len, seq_lens=torch.ones(num_reqs, dtype=torch.int32),
                block_table=torch.zeros(num_reqs, 4, dtype=torch.int32), slot_mapping=torch.zeros(n, dtype=torch.int64))
    return SimpleNamespace(**{**base, **fields})


def test_decode_batch_predicate() -> None:
    layer = "model.layers.0.self_attn.attn"
    decode = decode_batch({layer: metadata(1, 3, 4)}, layer, 4)
    assert decode is not None and (decode.num_reqs, decode.num_tokens) == (3, 4)
    assert decode_batch(None, layer, 16) is None  # profiling / dummy run
    assert decode_batch([{layer: metadata(1, 2)}], layer, 2) is None  # micro-batches
    assert decode_batch({layer: metadata(7, 2, 8)}, layer, 8) is None  # prefill or mixed
    assert decode_batch({layer: metadata(4, 2, 8)}, layer, 8) is None  # speculative verification
    assert decode_batch({"other": metadata(1, 2)}, layer, 2) is None
    md = metadata(1, 2)
    del md.block_table, md.seq_lens
    with pytest.raises(UnsupportedMetadata, match=r"SimpleNamespace has no \['seq_lens', 'block_table'\]"):
        decode_batch({layer: md}, layer, 2)  # a backend without these fields (FlashInfer's)


def test_widen_rows_is_a_view_of_the_same_buffer() -> None:
    buf = torch.arange(32, dtype=torch.int32)
    wide = widen_rows(buf[:3], 8, "input_ids")
    assert wide.data_ptr() == buf.data_ptr() and wide.shape == (8,)
    assert wide.tolist() == list(range(8))
    table = torch.zeros(4, 6, dtype=torch.int32)
    wide = widen_rows(table[:1], 4, "block_table")
    assert wide.shape == (4, 6) and wide.stride() == table.stride()
    row = torch.zeros(2, 32, dtype=torch.int64)[0, :5]  # Model Runner V2's slot mapping of group 0
    assert widen_rows(row, 8, "slot_mapping").data_ptr() == row.data_ptr()
    with pytest.raises(ValueError, match="fewer than 9 rows"):
        widen_rows(table[:2], 9, "block_table")


def test_same_buffers_names_the_one_that_moved() -> None:
    a, b = torch.zeros(8), torch.zeros(8)
    assert same_buffers({"x": a[:8]}, {"x": a[:2]}) is None
    assert same_buffers({"x": a, "y": b}, {"x": a[:2], "y": torch.zeros(8)}) == "y"


# KV-cache layout --------------------------------------------------------------------------------

SPEC = ModelSpec.from_hf_config(CONFIGS["qwen3"])


def attention(cache: Any, backend: Any, kv_cache_dtype: str = "auto") -> SimpleNamespace:
    return SimpleNamespace(kv_cache=cache, attn_backend=backend, kv_cache_dtype=kv_cache_dtype)


def test_kv_layout_accepts_flash_attention_and_triton_layouts() -> None:
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    nhd = allocate_kv_caches(SPEC, 10)[0]  # physical [block, slot, head, K|V]
    hnd = torch.zeros(10, SPEC.num_kv_heads, 16, 2 * SPEC.head_dim, dtype=torch.bfloat16)
    for backend in (FlashAttentionBackend, TritonAttentionBackend):
        for cache in (nhd, hnd):
            assert kv_layout_problem(attention(cache, backend), SPEC) is None
    # --kv-cache-dtype bfloat16 on a bf16 model is the same cache as "auto"
    assert kv_layout_problem(attention(nhd, FlashAttentionBackend, "bfloat16"), SPEC) is None


def test_kv_layout_refusals_say_why() -> None:
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    good = allocate_kv_caches(SPEC, 10)[0]
    fa = FlashAttentionBackend
    assert "fp8" in kv_layout_problem(attention(good, fa, "fp8"), SPEC)
    assert "float16" in kv_layout_problem(attention(good.half(), fa), SPEC)
    five_d = SimpleNamespace(get_name=lambda: "SPLIT_KV", get_kv_cache_shape=lambda nb, bs, h, d: (nb, 2, bs, h, d))
    assert "SPLIT_KV KV cache layout" in kv_layout_problem(attention(good, five_d), SPEC)
    split = torch.zeros(10, SPEC.num_kv_heads, 16, 4 * SPEC.head_dim, dtype=torch.bfloat16)[..., ::2]
    assert "contiguous" in kv_layout_problem(attention(split, fa), SPEC)
    assert "shape" in kv_layout_problem(attention(torch.tensor([]), fa), SPEC)
