"""A tokenizer made from a model's config.json alone, so that vLLM's own tools (``vllm serve``,
``vllm bench serve`` with its random dataset, ``vllm bench latency``) run on a model directory
that holds no tokenizer and a host that cannot download one.

Every id of the model's ``vocab_size`` is one word (``w<id>``; ``eos`` at the config's first
``eos_token_id``, ``unk`` at id 0 otherwise), split on whitespace: text of such words encodes back
to the ids it was decoded from. The model's weights are vLLM's dummy ones, so what the words mean
does not matter; what matters is that prompt lengths in tokens are what the benchmark asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vllm_mpk.bench.worker import model_dir

EOS, UNK = "eos", "unk"


def eos_id(config: dict[str, Any]) -> int | None:
    """The config's end-of-sequence id (the first, where it lists several), or None."""
    eos = config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos


def vocabulary(vocab_size: int, eos: int | None) -> dict[str, int]:
    """One distinct word per id; ``unk`` takes id 0 unless the EOS token does (then id 1)."""
    unk = 1 if eos == 0 else 0
    words = {i: f"w{i}" for i in range(vocab_size)}
    words[unk] = UNK
    if eos is not None:
        words[eos] = EOS
    return {word: i for i, word in words.items()}


def offline_tokenizer(config: dict[str, Any]) -> PreTrainedTokenizerFast:
    """The tokenizer of exactly ``config["vocab_size"]`` tokens described above."""
    vocab_size = config["vocab_size"]
    eos = eos_id(config)
    if eos is not None and not 0 <= eos < vocab_size:
        raise ValueError(f"eos_token_id {eos} is outside the vocabulary of {vocab_size} tokens; fix config.json")
    core = Tokenizer(models.WordLevel(vocabulary(vocab_size, eos), unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token=UNK,
                                   **({"eos_token": EOS} if eos is not None else {}))


def write_tokenizer(directory: Path) -> None:
    """Save the offline tokenizer of ``directory/config.json`` into ``directory`` (where
    ``AutoTokenizer.from_pretrained`` finds it)."""
    config = json.loads((directory / "config.json").read_text())
    offline_tokenizer(config).save_pretrained(directory)


def prepare_model_dir(name: str, root: Path) -> Path:
    """``root/name``: the shipped config.json of ``name`` and its offline tokenizer."""
    directory = model_dir(name, root)
    write_tokenizer(directory)
    return directory
