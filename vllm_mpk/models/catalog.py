"""The model configs shipped in ``vllm_mpk/configs/`` and how a ``--model`` argument names a
model: a directory holding a Hugging Face ``config.json`` (and maybe safetensors weights), or the
name of a shipped config such as ``qwen3-0.6b``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vllm_mpk.models.spec import ModelConfigError, ModelSpec
from vllm_mpk.models.weights import expected_shapes

DEFAULT_MODEL = "qwen3-0.6b"
ONE_GPU_WEIGHT_BYTES = 40 << 30  # bf16 weights that leave an 80 GB card room for KV cache and a second engine


class UnknownModelError(ValueError):
    """``--model`` is neither a model directory nor the name of a shipped config."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    spec: ModelSpec
    directory: Path | None  # None for a shipped config: there are no weights to load


def shipped_models() -> list[str]:
    """Names of the configs shipped with the package, e.g. ``["llama-3.1-8b", ..., "qwen3-8b"]``."""
    folder = resources.files("vllm_mpk") / "configs"
    return sorted(f.name.removesuffix(".json") for f in folder.iterdir() if f.name.endswith(".json"))


def single_gpu_models() -> list[str]:
    """The shipped configs whose bf16 weights fit one GPU with room to spare (the others, e.g.
    ``llama-3.1-70b``, are shipped to be planned and run with tensor parallelism)."""
    return [name for name in shipped_models() if weight_bytes(ModelSpec.from_hf_config(shipped_config(name)))
            <= ONE_GPU_WEIGHT_BYTES]


def weight_bytes(spec: ModelSpec) -> int:
    """Bytes of the model's bf16 weights (the embedding and an untied lm_head included)."""
    return 2 * sum(math.prod(shape) for shape in expected_shapes(spec).values())


def shipped_config(name: str) -> dict:
    """The Hugging Face config dict of a shipped model; raises UnknownModelError."""
    if name not in shipped_models():
        raise UnknownModelError(f"no shipped config named '{name}'; shipped: {', '.join(shipped_models())}")
    return json.loads((resources.files("vllm_mpk") / "configs" / f"{name}.json").read_text())


def resolve_model(model: str) -> ResolvedModel:
    """Resolve ``--model``. Raises UnknownModelError for a name that is neither, ModelConfigError
    for a file, a directory without a readable, well-formed ``config.json``, and
    UnsupportedModelError for a model we do not run."""
    path = Path(model).expanduser()
    if path.is_dir():
        return ResolvedModel(path.name, ModelSpec.from_dir(path), path)
    if path.is_file():
        raise ModelConfigError(f"--model {model} is a file; give the directory that holds config.json")
    name = model.lower()
    if name in shipped_models():
        return ResolvedModel(name, ModelSpec.from_hf_config(shipped_config(name)), None)
    raise UnknownModelError(f"unknown model '{model}': give a directory with a config.json or one of the "
                            f"shipped configs: {', '.join(shipped_models())}")
