"""Options of the vLLM integration, from ``--additional-config '{"mpk": {...}}'``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from vllm_mpk.api import SUPPORTED_BLOCK_DIMS
from vllm_mpk.codegen.ops.linear import MAX_LINEAR_BATCH
from vllm_mpk.graph.schedule import POLICIES
from vllm_mpk.models.decoder import DecodeOptions, valid_kv_splits
from vllm_mpk.models.spec import ModelSpec
from vllm_mpk.runtime.watchdog import DEFAULT_TIMEOUT_S, TIMEOUT_RANGE, check_timeout_s

BLOCK_DIMS = tuple(x for x, _, _ in SUPPORTED_BLOCK_DIMS)
MOE_OPT_IN = ("mixture-of-experts models are opt-in while the megakernel's MoE path has not yet run under vLLM on a GPU: "
              "pass --additional-config '{\"mpk\": {\"moe\": true}}' to serve them through the megakernel")
TP_OPT_IN = ("tensor parallelism is opt-in while the megakernel's step is slower than stock vLLM's there (two "
             "all-reduce stages per layer; benchmarks/RESULTS.md, 'Where we are behind'): pass --additional-config "
             "'{\"mpk\": {\"tensor_parallel\": true}}' to serve it through the megakernel")


class MpkOptionsError(ValueError):
    """An ``additional_config["mpk"]`` entry is unknown or has a bad value; the message says which."""


@dataclass(frozen=True)
class MpkOptions:
    """``max_batch``: the most requests one megakernel step decodes, at most the rows a GPU linear
    tile stages (``codegen/ops/linear.py:MAX_LINEAR_BATCH``); larger decode batches run vLLM's stock
    layers (capped at ``--max-num-seqs``).
    ``num_workers``: persistent workers (one per SM); default every SM of the GPU.
    ``block_dim``: threads per worker, 128 or 256.
    ``schedule``: static placement policy of tasks on workers.
    ``timeout_s``: the watchdog bound on any wait inside the kernel (``runtime/watchdog.py``).
    ``kv_splits``: tasks per KV head and request that share its history (split KV; 1: one task);
    null (default): auto, chosen per plan batch size (``models/decoder.py:auto_kv_splits``: 2 while
    the TP-local KV heads x batch x 4 fit in the workers, else 1); an integer forces it everywhere.
    ``profile``: record per-task timestamps on every step (see ``MpkDecodeMixin.mpk_write_profile``).
    ``strict``: refuse to fall back: raise where the megakernel cannot run a batch it is meant for
    (unsupported model, KV-cache layout, build failure). Prefill, mixed batches and decode batches
    above ``max_batch`` always run the stock layers; that is routing, not a fallback.
    ``moe``: serve mixture-of-experts models (Qwen3-MoE) through the megakernel; off, they run on
    vLLM's own layers (``MOE_OPT_IN``).
    ``tensor_parallel``: serve ``--tensor-parallel-size`` > 1 through the megakernel; off, such an
    engine runs vLLM's own layers (``TP_OPT_IN``).
    ``logits_in_kernel``: the megakernel also runs the lm_head, and vLLM's ``compute_logits`` takes
    its logits on steps that replay a megakernel graph (``integration/kernel_logits.py``; with FULL
    decode graphs, one GPU, no LoRA, unscaled logits); false
    (default): the plans end at the final RMSNorm and vLLM's lm_head runs on every step.
    ``greedy_argmax``: steps that replay a megakernel graph with every request greedy and no
    sampling feature in use take their tokens by one argmax instead of vLLM's sampler
    (``integration/greedy_sampler.py``); false (default): vLLM's sampler on every step.
    Both are opt-in while they have not yet run under vLLM on a GPU."""

    max_batch: int = DecodeOptions.max_batch
    num_workers: int | None = None
    block_dim: int = DecodeOptions.block_dim
    schedule: str = DecodeOptions.schedule
    timeout_s: float = DEFAULT_TIMEOUT_S
    kv_splits: int | None = DecodeOptions.kv_splits
    profile: bool = False
    strict: bool = False
    moe: bool = False
    tensor_parallel: bool = False
    logits_in_kernel: bool = False
    greedy_argmax: bool = False

    @classmethod
    def from_dict(cls, raw: Any) -> MpkOptions:
        """Validate ``raw`` (the ``"mpk"`` entry); raises MpkOptionsError naming the bad key and what
        it may hold (as constructing MpkOptions does)."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise MpkOptionsError(f'additional_config["mpk"] must be a JSON object, got {type(raw).__name__}')
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise MpkOptionsError(f'unknown additional_config["mpk"] keys {unknown}; known keys: {known}')
        return cls(**raw)

    def decode_options(self, *, batch: int, max_seq_len: int, page_size: int, num_workers: int, world_size: int,
                       rank: int, logits: bool) -> DecodeOptions:
        """The plan options of one batch size's megakernel under vLLM: these options, vLLM's
        geometry (pages, workers, ranks), and a plan that ends at the final RMSNorm (vLLM's
        ``compute_logits`` and sampler take the hidden state), with the lm_head's logits beside it
        where ``logits``."""
        return DecodeOptions(max_batch=batch, max_seq_len=max_seq_len, page_size=page_size, num_workers=num_workers,
                             block_dim=self.block_dim, schedule=self.schedule, kv_splits=self.kv_splits,
                             world_size=world_size, rank=rank, final="logits" if logits else "hidden")

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> MpkOptions:
        extra = getattr(vllm_config, "additional_config", None) or {}
        return cls.from_dict(extra.get("mpk") if isinstance(extra, Mapping) else None)

    def __post_init__(self) -> None:
        def bad(key: str, expected: str) -> MpkOptionsError:
            return MpkOptionsError(f'additional_config["mpk"]["{key}"] must be {expected}, got {getattr(self, key)!r}')

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.max_batch) or not 1 <= self.max_batch <= MAX_LINEAR_BATCH:
            raise bad("max_batch", f"a positive integer, at most {MAX_LINEAR_BATCH} (the rows a GPU linear tile "
                                   f"stages)")
        if self.num_workers is not None and (not is_int(self.num_workers) or self.num_workers < 1):
            raise bad("num_workers", "a positive integer or null (every SM)")
        if self.block_dim not in BLOCK_DIMS or not is_int(self.block_dim):
            raise bad("block_dim", f"one of {BLOCK_DIMS}")
        if not isinstance(self.schedule, str) or self.schedule not in POLICIES:
            raise bad("schedule", f"one of {sorted(POLICIES)}")
        if not valid_kv_splits(self.kv_splits):
            raise bad("kv_splits", "a positive integer or null (auto: 2 at small decode batches, else 1)")
        try:
            check_timeout_s(self.timeout_s)
        except ValueError:
            raise bad("timeout_s", TIMEOUT_RANGE) from None
        for key in ("profile", "strict", "moe", "tensor_parallel", "logits_in_kernel", "greedy_argmax"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "true or false")

    def missing_opt_in(self, spec: ModelSpec, tensor_parallel_size: int) -> str | None:
        """The opt-in ``spec`` on ``tensor_parallel_size`` GPUs needs and these options lack (its
        message), or None; ``opt_ins`` gives the options that supply them."""
        if spec.is_moe and not self.moe:
            return MOE_OPT_IN
        if tensor_parallel_size > 1 and not self.tensor_parallel:
            return TP_OPT_IN
        return None


def opt_ins(spec: ModelSpec, tensor_parallel_size: int = 1) -> dict[str, bool]:
    """The options without which the megakernel does not serve ``spec`` on ``tensor_parallel_size``
    GPUs (a benchmark that measures the megakernel passes them): the MoE opt-in for a
    mixture-of-experts model, the tensor-parallel one above one GPU."""
    return {**({"moe": True} if spec.is_moe else {}), **({"tensor_parallel": True} if tensor_parallel_size > 1 else {})}


def plan_batches(max_batch: int) -> tuple[int, ...]:
    """The batch sizes that get a plan of their own: powers of two below ``max_batch``, and
    ``max_batch``. A decode batch runs the smallest that holds it (vLLM pads FULL-graph batches
    to its capture sizes, powers of two by default), so batch 1 does not pay for the attention
    tasks, input staging and schedule of a batch-8 plan."""
    sizes = {max_batch}
    b = 1
    while b < max_batch:
        sizes.add(b)
        b *= 2
    return tuple(sorted(sizes))
