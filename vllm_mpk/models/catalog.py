"""The model configs shipped in ``vllm_mpk/configs/`` and how a ``--model`` argument names a
model: a directory holding a Hugging Face ``config.json`` (and maybe safetensors weights), or the
name of a shipped config such as ``qwen3-0.6b``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vllm_mpk.models.spec import ModelConfigError, ModelSpec

DEFAULT_MODEL = "qwen3-0.6b"


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
