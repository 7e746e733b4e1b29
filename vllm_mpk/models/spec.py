"""Model shapes read from a Hugging Face ``config.json``, and the line between what the
megakernel supports and what it refuses.

Mixture of experts (Qwen3-MoE, every layer sparse, no shared experts) is planned and runs on the
CPU reference executor; under vLLM it is served through the megakernel only when opted in
(``integration/options.py:MOE_OPT_IN``). Its weights are vLLM 0.26's fused-MoE parameters
(``models/weights.py``), bound in place by their vLLM names:

    model.layers.{i}.mlp.gate.weight                           [E, H]      router
    model.layers.{i}.mlp.experts.routed_experts.w13_weight     [E, 2I, H]  gate rows, then up rows
    model.layers.{i}.mlp.experts.routed_experts.w2_weight      [E, H, I]   down projection

with ``I = moe_intermediate_size``. A Hugging Face checkpoint stores them per expert ``e``:
``w13[e] = cat(mlp.experts.{e}.gate_proj.weight, mlp.experts.{e}.up_proj.weight)`` and
``w2[e] = mlp.experts.{e}.down_proj.weight``; the router keeps its name. (``transformers`` 5 holds
them in memory as ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj``, the w13/w2 layout.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "LlamaForCausalLM", "Qwen3MoeForCausalLM")
MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM",)
QK_NORM_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
SHARED_EXPERT_KEYS = ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts")
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
DEFAULT_MAX_POSITIONS = 4096  # a config that does not say how long its sequences may be
# Above these a config is not a model anyone serves, and planning it would only exhaust memory
# (its tiles grow with these sizes; not with the positions, which nothing in a plan materialises);
# the largest real models stay far below.
SIZE_CEILINGS = {"hidden_size": 1 << 16, "intermediate_size": 1 << 20, "moe_intermediate_size": 1 << 20,
                 "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024,
                 "vocab_size": 1 << 22, "num_experts": 4096, "num_local_experts": 4096}
SUPPORT_SUMMARY = (
    f"supported: architectures {', '.join(SUPPORTED_ARCHITECTURES)}; SiLU MLP, dense, or mixture of experts "
    f"for {', '.join(MOE_ARCHITECTURES)} with every layer sparse (decoder_sparse_step 1, no mlp_only_layers), "
    f"softmax top-k routing and no shared experts (opt-in under vLLM); full attention (no sliding window); "
    f"head_dim in {SUPPORTED_HEAD_DIMS}; RoPE types {SUPPORTED_ROPE_TYPES}; no biases"
)


class ModelConfigError(ValueError):
    """A config that is not a well-formed Hugging Face config; the message names the key and what it
    must hold."""


class UnsupportedModelError(ValueError):
    """The model cannot run through the megakernel; the message says why and what is supported."""

    def __init__(self, reason: str):
        super().__init__(f"{reason} ({SUPPORT_SUMMARY})")
        self.reason = reason


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_id: int | None = None
    # mixture of experts (0 experts: a dense MLP); every layer is sparse, each token takes
    # ``num_experts_per_tok`` of ``num_experts`` experts of width ``moe_intermediate_size``
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1

    @property
    def qk_norm(self) -> bool:
        return self.architecture in QK_NORM_ARCHITECTURES

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def qkv_width(self) -> int:
        return (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim

    def with_layers(self, num_layers: int) -> ModelSpec:
        if not 1 <= num_layers:
            raise ValueError(f"--layers must be at least 1, got {num_layers}")
        return replace(self, num_layers=min(num_layers, self.num_layers))

    def shard(self, world_size: int) -> ModelSpec:
        """The shapes one of ``world_size`` tensor-parallel ranks holds (Megatron-style: whole KV
        head groups, a slice of the MLP, a slice of the vocabulary). A MoE rank holds every expert,
        a slice of each expert's width, as vLLM's fused MoE without expert parallelism."""
        if world_size == 1:
            return self
        mlp = ("expert width", self.moe_intermediate_size) if self.is_moe else ("intermediate size",
                                                                               self.intermediate_size)
        for what, n in (("attention heads", self.num_q_heads), ("KV heads", self.num_kv_heads), mlp,
                        ("vocabulary", self.vocab_size)):
            if n % world_size:
                raise ValueError(f"tensor parallel size {world_size} does not divide the {what} ({n}); "
                                 f"choose a size that divides {self.num_kv_heads} KV heads")
        return replace(self, num_q_heads=self.num_q_heads // world_size,
                       num_kv_heads=self.num_kv_heads // world_size,
                       intermediate_size=self.intermediate_size // world_size if not self.is_moe
                       else self.intermediate_size,
                       moe_intermediate_size=self.moe_intermediate_size // world_size,
                       vocab_size=self.vocab_size // world_size)

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelSpec:
        """Read and check a config dict; raises ModelConfigError for a malformed config and
        UnsupportedModelError for what we do not run."""
        if not isinstance(config, Mapping):
            raise ModelConfigError(f"a model config must be a JSON object of Hugging Face config keys, "
                                   f"got {type(config).__name__}")
        archs = config.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(f"architecture {archs or 'missing'} is not supported")
        moe = _moe_fields(config, arch)
        if config.get("use_sliding_window") or (arch == "LlamaForCausalLM" and config.get("sliding_window")):
            raise UnsupportedModelError("sliding-window attention is not supported")
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act '{config['hidden_act']}' is not supported")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise UnsupportedModelError("attention or MLP biases are not supported")
        heads = _positive_int(config, "num_attention_heads")
        hidden = _positive_int(config, "hidden_size")
        head_dim = _positive_int(config, "head_dim", hidden // heads)
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise UnsupportedModelError(f"head_dim {head_dim} is not supported")
        kv_heads = _positive_int(config, "num_key_value_heads", heads)
        if heads % kv_heads:
            raise UnsupportedModelError(f"{heads} attention heads do not group over {kv_heads} KV heads")
        scaling = config.get("rope_scaling") or config.get("rope_parameters")
        if scaling is not None and not isinstance(scaling, Mapping):
            raise ModelConfigError(f"config key 'rope_scaling' must be an object or null, got {scaling!r}")
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(f"RoPE scaling type '{rope_type}' is not supported")
        if rope_type == "llama3":
            _check_llama3_scaling(scaling)
        if config.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModelError("partial rotary embeddings are not supported")
        eos = config.get("eos_token_id")
        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=_positive_int(config, "intermediate_size"),
            num_layers=_positive_int(config, "num_hidden_layers"),
            num_q_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=_positive_int(config, "vocab_size"),
            rms_norm_eps=_positive_number(config, "rms_norm_eps", 1e-6),
            rope_theta=_positive_number(config, "rope_theta", _positive_number(scaling or {}, "rope_theta", 10000.0)),
            rope_scaling=scaling if rope_type != "default" else None,
            max_position_embeddings=_positive_int(config, "max_position_embeddings", DEFAULT_MAX_POSITIONS),
            tie_word_embeddings=_flag(config, "tie_word_embeddings"),
            eos_token_id=eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None,
            **moe,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelSpec:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelConfigError(f"{model_dir} has no config.json; give a Hugging Face model directory")
        try:
            config = json.loads(path.read_text())
        except OSError as e:
            raise ModelConfigError(f"cannot read {path}: {e.strerror}; check its permissions") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelConfigError(f"{path} is not valid JSON ({e}); give a Hugging Face config.json") from e
        return cls.from_hf_config(config)


_MISSING = object()


def _moe_fields(config: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """The ModelSpec fields of a mixture-of-experts config (none for a dense one). Raises
    UnsupportedModelError for what the MoE layers do not run: experts on another architecture,
    shared experts, dense layers mixed in."""
    if arch not in MOE_ARCHITECTURES:
        if any(config.get(k) for k in MOE_KEYS):
            raise UnsupportedModelError(f"mixture-of-experts layers on {arch} are not supported")
        return {}
    if config.get("scoring_func", "softmax") != "softmax":
        raise UnsupportedModelError(f"router scoring '{config['scoring_func']}' is not supported (softmax top-k)")
    shared = [k for k in SHARED_EXPERT_KEYS if config.get(k)]
    if shared:
        raise UnsupportedModelError(f"shared experts ({', '.join(shared)}) are not supported")
    step = _positive_int(config, "decoder_sparse_step", 1)
    dense_layers = config.get("mlp_only_layers") or []
    if step != 1 or dense_layers:
        raise UnsupportedModelError(f"dense layers mixed in (decoder_sparse_step {step}, mlp_only_layers "
                                    f"{list(dense_layers)}) are not supported")
    # transformers 5 writes ``num_experts`` as ``num_local_experts`` (its attribute map) in to_dict()
    experts_key = "num_experts" if config.get("num_experts") is not None or "num_local_experts" not in config \
        else "num_local_experts"
    experts, top_k = _positive_int(config, experts_key), _positive_int(config, "num_experts_per_tok")
    if top_k > experts:
        raise ModelConfigError(f"config key 'num_experts_per_tok' ({top_k}) must be at most 'num_experts' "
                               f"({experts})")
    return {"num_experts": experts, "num_experts_per_tok": top_k,
            "moe_intermediate_size": _positive_int(config, "moe_intermediate_size"),
            "norm_topk_prob": _flag(config, "norm_topk_prob")}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(config: Mapping[str, Any], key: str, default: Any = _MISSING) -> int:
    """``config[key]`` as a positive int; ``default`` where the key is absent or null (none: required)."""
    value = config.get(key)
    if value is None:
        if default is _MISSING:
            raise ModelConfigError(f"config has no '{key}'; it must hold a positive integer")
        return default
    if not (_is_number(value) and value == int(value) and value >= 1):
        raise ModelConfigError(f"config key '{key}' must be a positive integer, got {value!r}")
    if value > SIZE_CEILINGS.get(key, value):
        raise ModelConfigError(f"config key '{key}' is {int(value)}, above {SIZE_CEILINGS[key]}: not a model's size")
    return int(value)


def _flag(config: Mapping[str, Any], key: str) -> bool:
    """``config[key]`` as a JSON boolean; false where absent or null. A string such as "no" would
    otherwise read as true."""
    value = config.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ModelConfigError(f"config key '{key}' must be true or false, got {value!r}")
    return value


def _positive_number(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key)
    if value is None:
        return default
    if not (_is_number(value) and value > 0):
        raise ModelConfigError(f"config key '{key}' must be a positive number, got {value!r}")
    return float(value)


def _check_llama3_scaling(scaling: Mapping[str, Any]) -> None:
    """Llama 3 RoPE scaling needs all of ``LLAMA3_ROPE_KEYS`` as positive numbers, the low
    frequency factor below the high one (``models/rope.py`` blends between them)."""
    for key in LLAMA3_ROPE_KEYS:
        value = scaling.get(key)
        if not (_is_number(value) and value > 0):
            got = "it is missing" if key not in scaling else f"got {value!r}"
            raise ModelConfigError(f"llama3 rope_scaling needs '{key}' as a positive number ({got}); it needs "
                                   f"{', '.join(LLAMA3_ROPE_KEYS)}")
    if scaling["low_freq_factor"] >= scaling["high_freq_factor"]:
        raise ModelConfigError(f"llama3 rope_scaling 'low_freq_factor' ({scaling['low_freq_factor']}) must be below "
                               f"'high_freq_factor' ({scaling['high_freq_factor']})")
