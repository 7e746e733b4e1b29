"""The MPK model classes vLLM instantiates for ``--model-impl mpk``.

``mpk_class(Qwen3ForCausalLM)`` is ``MpkQwen3ForCausalLM(MpkDecodeMixin, Qwen3ForCausalLM)``: the
stock model, whose ``forward`` runs the megakernel for pure decode batches and delegates every
other batch to the stock ``forward`` (vLLM compiles only the inner ``Qwen3Model``, so the outer
forward is plain Python and the stock path stays intact).

What the megakernel returns: the final hidden state, as vLLM's contract has ``forward`` do, so
everything downstream (logits processors, every sampling parameter, logprobs, structured output)
stays vLLM's. ``forward`` returns a view of that output buffer, which the next step overwrites:
vLLM reads it (in ``compute_logits``, or in the copy a FULL graph makes) before it runs the next
forward, in stream order, as with the stock path's activations. Where vLLM's ``compute_logits``
is a plain projection, the plans also run the lm_head beside the final RMSNorm
(``DecodeOptions(final="logits")``), and ``compute_logits`` takes those logits on the steps that
replay a megakernel graph instead of launching its own GEMM (``integration/kernel_logits.py``).

When it is built: the plans are declared as vLLM constructs the model, and compiled, with nvcc
building their kernels, in the background while vLLM loads the weights, compiles and profiles
(``integration/early_build.py``). The megakernel is bound and loaded lazily, at the first pure
decode batch that runs outside CUDA graph capture: vLLM binds the KV cache after loading the
weights and, before capturing a FULL graph of a decode batch size, runs that batch once uncaptured;
the megakernel is built there (taking the early plans and joining their builds), so the graph
captures its launch. This also sees the weights of every load format (``--load-format dummy``
skips ``load_weights``), as they are in place by then.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from vllm.compilation.breakable_cudagraph import is_breakable_cudagraph_enabled
from vllm.config import CUDAGraphMode
from vllm.forward_context import ForwardContext, get_forward_context, is_forward_context_available

from vllm_mpk.integration import degrade
from vllm_mpk.integration.binding import (
    DecodeBatch,
    UnsupportedMetadata,
    attention_modules,
    decode_batch,
    decoder_layers,
    kv_layout_problem,
    module_weights,
    moe_layout_problem,
    rope_cache,
    same_buffers,
    step_buffers,
)
from vllm_mpk.integration.early_build import EarlyBuild, block_table_tokens, declare_plans, nvcc_builds_here
from vllm_mpk.integration.kernel_logits import StepLogits, logits_problem
from vllm_mpk.integration.memory import (
    Reservation,
    allocated_bytes,
    contents_bytes,
    declared_contents,
    megakernel_bytes,
)
from vllm_mpk.integration.options import MpkOptions, plan_batches
from vllm_mpk.integration.plan_reuse import difference, widen_kv_caches
from vllm_mpk.integration.plugin import OFF_MESSAGE, READY_MESSAGE, STOPPED_MESSAGE
from vllm_mpk.integration.tensor_parallel import (
    agree_on_build,
    bootstrap_nvshmem,
    moe_parallel_problem,
    tensor_parallel_problem,
    tp_rank_and_size,
    vocab_problem,
)
from vllm_mpk.models.decoder import DecodeLayers, DecodeOptions, declare_decoder
from vllm_mpk.models.spec import ModelSpec
from vllm_mpk.models.weights import EMBED
from vllm_mpk.runtime import control

logger = logging.getLogger("vllm.mpk")

_CLASSES: dict[type, type] = {}


class MpkFallbackError(RuntimeError):
    """Strict mode: the megakernel cannot run a batch it is meant for; the message says why."""


class MpkRuntime:
    """The megakernel of one model instance and its binding to vLLM's buffers. It holds no
    reference to the model (the model holds it); methods take the model as an argument."""

    def __init__(self, vllm_config: Any, spec: ModelSpec):
        self.vllm_config, self.spec = vllm_config, spec
        self.options = MpkOptions.from_vllm_config(vllm_config)
        max_num_seqs = getattr(getattr(vllm_config, "scheduler_config", None), "max_num_seqs", None)
        self.max_batch = min(self.options.max_batch, max_num_seqs or self.options.max_batch)
        self.disabled: str | None = None
        self.kernels: dict[int, Any] = {}  # plan batch size -> its megakernel (plan_batches)
        self.bound: dict[str, torch.Tensor] = {}
        self.hidden = ""  # the plans' final-norm output, named when built
        self.logits = ""  # the plans' lm_head output, named when built with one (``kernel_logits.py``)
        self.logits_off: str | None = "the model is not constructed yet"  # why the plans have no lm_head
        self.step_logits = StepLogits()
        self.steps = 0  # megakernel steps launched from Python (a replayed CUDA graph adds none)
        self.megakernel_graphs: set[int] = set()  # token counts whose FULL CUDA graph holds a megakernel launch
        self.stock_reasons: set[str] = set()  # why batches went to the stock layers, logged once each
        self.error_flags: torch.Tensor | None = None  # [plans] int32 in pinned host memory, kernel i's stop code
        self.guard = degrade.StepGuard(self)  # a stop fails its steps' requests (integration/degrade.py)
        self._layer_name: str | None = None
        self.reservation: Reservation | None = None
        self.estimated_bytes = 0  # the reservation's size, for the ready line
        self.early: EarlyBuild | None = None  # the plans compiled, and kernels built, while vLLM loads

    def reserve(self, model: torch.nn.Module, device: torch.device) -> None:
        """While vLLM constructs the model: declare the plans, hold the memory their build will
        allocate so that vLLM's profiling counts it (``integration/memory.py``), and start compiling
        them in the background (``integration/early_build.py``). Skipped where the megakernel
        cannot run anyway (the build then says why)."""
        if device.type == "meta" or self._environment_problem() is not None:
            return
        workers = self._num_workers(device)
        layers = self._declare_early(model, workers)
        if layers:
            self.estimated_bytes = sum(contents_bytes(declared_contents(d.kernel), workers, profile=self.options.profile)
                                       for d in layers.values())
            self.early = EarlyBuild(layers, kernels=device.type == "cuda" and nvcc_builds_here())
        else:
            world = tp_rank_and_size()[1]
            final = "hidden" if self.logits_off else "logits"
            self.estimated_bytes = sum(megakernel_bytes(self.spec, b, workers, profile=self.options.profile,
                                                        kv_splits=self.options.kv_splits, world_size=world, final=final)
                                       for b in plan_batches(self.max_batch))
        self.reservation = Reservation(self.estimated_bytes, device)

    def _declare_early(self, model: torch.nn.Module, workers: int) -> dict[int, DecodeLayers]:
        """The layers of each plan as ``_plan`` will declare them, with vLLM's page size and block
        table width (``declare_plans``). Empty, with a debug line, where that cannot be done here:
        ``_plan`` then declares them."""
        spec, vc = self.spec, self.vllm_config
        try:
            page = vc.cache_config.block_size
            options = {size: self._decode_options(size, block_table_tokens(vc, page), page, workers)
                       for size in plan_batches(self.max_batch)}
            return declare_plans(spec, options, module_weights(model, spec.shard(tp_rank_and_size()[1])),
                                 rope_cache(model, spec))
        except Exception as e:
            logger.debug("--model-impl mpk: the plans are declared at the first decode step: %s", e)
            return {}

    def _decode_options(self, size: int, max_seq_len: int, page: int, workers: int) -> DecodeOptions:
        rank, world = tp_rank_and_size()
        return self.options.decode_options(batch=size, max_seq_len=max_seq_len, page_size=page, num_workers=workers,
                                           world_size=world, rank=rank, logits=self.logits_off is None)

    def note_model(self, model: torch.nn.Module) -> None:
        """Once vLLM has constructed the model: whether the plans run the lm_head (``logits_off``)."""
        if not self.options.logits_in_kernel:
            self.logits_off = 'additional_config["mpk"]["logits_in_kernel"] is false'
        else:
            self.logits_off = logits_problem(model, self.vllm_config, self.spec.vocab_size, tp_rank_and_size()[1])

    def arm_logits(self, input_batch: Any) -> None:
        """Before a step that replays the FULL graph of ``input_batch.num_tokens_after_padding``,
        which holds a megakernel launch: its logits rows for the next ``compute_logits``."""
        rows = None
        if self.logits and self.kernels and input_batch.num_tokens == input_batch.num_reqs:
            kernel = self._kernel_for(input_batch.num_tokens_after_padding)
            rows = kernel.tensors[self.logits][:input_batch.num_reqs]
        self.step_logits.arm(rows)

    def _kernel_for(self, num_tokens: int) -> Any:
        """The smallest plan that holds ``num_tokens``."""
        return self.kernels[next(b for b in sorted(self.kernels) if b >= num_tokens)]

    def _release(self) -> None:
        if self.reservation is not None:
            self.reservation.release()
            self.reservation = None

    # routing ------------------------------------------------------------------------------------

    def fallback(self, reason: str) -> None:
        """Stop using the megakernel for this model instance, with one log line; strict raises."""
        if self.options.strict:
            raise MpkFallbackError(f"--model-impl mpk (strict): {reason}")
        self._release()
        if self.disabled is None:
            self.disabled = reason
            logger.warning(OFF_MESSAGE + ", vLLM's stock layers serve every batch: %s", reason)

    def decode(self, model: torch.nn.Module, input_ids: torch.Tensor | None, positions: torch.Tensor,
               extra: dict[str, Any]) -> torch.Tensor | None:
        """The final hidden states of a pure decode batch from the megakernel, or None to let
        the stock forward run this batch."""
        if self.disabled is not None:
            return None
        if input_ids is None or any(v is not None for v in extra.values()):
            given = sorted(k for k, v in extra.items() if v is not None) or ["inputs_embeds instead of input_ids"]
            return self._stock(f"steps that pass {', '.join(given)}")
        if not is_forward_context_available():
            return self._stock("calls outside vLLM's model runner (no forward context)")
        context = get_forward_context()
        if _breakable_piecewise(context):
            return self._stock("steps under breakable piecewise CUDA graphs (they capture the whole forward per token count)")
        if self._layer_name is None:
            self._layer_name = attention_modules(model)[0].layer_name
        try:
            batch = decode_batch(context.attn_metadata, self._layer_name, input_ids.shape[0])
        except UnsupportedMetadata as e:
            self.fallback(str(e))
            return None
        if batch is None:
            return self._stock("prefill, mixed and profiling batches")
        if batch.num_tokens > self.max_batch:
            return self._stock(f"decode batches above {self.max_batch} tokens (raise the mpk max_batch option)")
        if not self.kernels and not self._build(model, input_ids, positions, batch):
            return None
        current = {"input_ids": input_ids, "positions": positions, "seq_lens": batch.seq_lens,
                   "slot_mapping": batch.slot_mapping, "block_tables": batch.block_table}
        moved = same_buffers(self.bound, current)
        if moved is not None:
            self.fallback(f"vLLM's '{moved}' buffer moved since the megakernel was bound to it")
            return None
        kernel = self._kernel_for(batch.num_tokens)
        self._launch(kernel, batch)
        return kernel.tensors[self.hidden][:batch.num_tokens]

    def note_capture(self, tokens: torch.Tensor, launched: bool) -> None:
        """While a FULL CUDA graph is captured: remember whether the graph of ``tokens``' count
        holds a megakernel launch, forgetting it if a recapture went to the stock layers. Only such
        graphs replay without vLLM's attention metadata (``integration/model_state.py``). Model
        Runner V2 captures FULL graphs under ``cudagraph_runtime_mode`` NONE, the V1 runner under
        FULL; a PIECEWISE capture (breakable graphs) is another graph of that count, so it is left out."""
        if not _capturing(tokens) or not is_forward_context_available():
            return
        if get_forward_context().cudagraph_runtime_mode == CUDAGraphMode.PIECEWISE:
            return
        (self.megakernel_graphs.add if launched else self.megakernel_graphs.discard)(tokens.shape[-1])

    def _stock(self, reason: str) -> None:
        """Let vLLM's stock layers run this batch; say so once per distinct reason."""
        if reason not in self.stock_reasons:
            self.stock_reasons.add(reason)
            logger.info("--model-impl mpk: vLLM's stock layers run %s", reason)
        return None

    def _launch(self, kernel: Any, batch: DecodeBatch) -> None:
        launch = getattr(kernel, "launch", None)
        if launch is not None:
            launch(batch.num_reqs)  # asynchronous, on the current (possibly capturing) stream
        else:
            kernel.run_step(batch.num_reqs)
        self.steps += 1

    # building -----------------------------------------------------------------------------------

    def _build(self, model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
               batch: DecodeBatch) -> bool:
        """Build this rank's megakernels, or fall back. Under tensor parallelism every rank first
        builds what needs no peer, then all ranks agree (``agree_on_build``) before any NVSHMEM
        collective: all of them go on, or all of them fall back."""
        problem, planned = self._problem(input_ids), None
        if problem is None:
            self._release()  # just before the build's allocations take that memory back
            try:
                planned = self._plan(model, input_ids, positions, batch)
            except _Refused as e:
                problem = str(e)
            except Exception as e:  # a build failure must not take the server down
                logger.exception("--model-impl mpk: building the megakernel failed")
                problem = f"building the megakernel failed: {type(e).__name__}: {e}"
        problem = agree_on_build(problem)
        if problem is None:
            assert planned is not None
            try:
                self.kernels = self._load(planned)
                self.bound = planned.buffers
            except Exception as e:
                logger.exception("--model-impl mpk: loading the megakernel failed")
                problem = f"loading the megakernel failed: {type(e).__name__}: {e}"
        if problem is not None:
            self.fallback(problem)  # strict mode raises here
            return False
        return True

    def _problem(self, input_ids: torch.Tensor) -> str | None:
        """Why the megakernel cannot be built here at all, before any work."""
        if _capturing(input_ids):
            # Model Runner V2 warms every graph up uncaptured first; V1 only with cudagraph_num_of_warmups >= 1.
            return ("no uncaptured decode step ran before CUDA graph capture, so the megakernel was not built "
                    "(with VLLM_USE_V2_MODEL_RUNNER=0, set compilation_config cudagraph_num_of_warmups=1)")
        return self._environment_problem() or _cudagraph_problem(self.vllm_config)

    def _environment_problem(self) -> str | None:
        """What vLLM's configuration asks for that this megakernel does not do."""
        from vllm.distributed import get_pp_group

        vc = self.vllm_config
        world = tp_rank_and_size()[1]
        problem = self.options.missing_opt_in(self.spec, world) or tensor_parallel_problem(self.spec, world)
        if problem is not None:
            return problem
        if self.spec.is_moe:
            problem = moe_parallel_problem(getattr(vc, "parallel_config", None))
            if problem is not None:
                return problem
        if get_pp_group().world_size != 1:
            return "pipeline parallelism is not supported"
        if getattr(vc, "lora_config", None) is not None:
            return "LoRA adapters are not supported"
        if getattr(getattr(vc, "parallel_config", None), "decode_context_parallel_size", 1) != 1:
            return "decode context parallelism is not supported"
        if getattr(getattr(vc, "parallel_config", None), "distributed_executor_backend", None) == "ray":
            # Ray's workers call the model runner directly, past the Worker methods whose hooks keep
            # a stopped step's tokens from clients (integration/degrade.py).
            return "the Ray executor is not supported (use the default multiprocessing executor)"
        if getattr(vc, "speculative_config", None) is not None:
            # Verification batches are never pure decode, and EAGLE-3 needs auxiliary hidden
            # states from the forward, which the megakernel does not return.
            return "speculative decoding is not supported"
        return None

    def _num_workers(self, device: torch.device) -> int:
        if self.options.num_workers:
            return self.options.num_workers
        return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8

    def _plan(self, model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
              batch: DecodeBatch) -> _Planned:
        """One plan per size of ``plan_batches``, all bound to the same weights, KV cache and vLLM
        step buffers (each reads the first rows it needs), compiled on a GPU: everything a rank
        builds without its peers."""
        spec = self.spec
        world = tp_rank_and_size()[1]
        local = spec.shard(world)  # vLLM's TP-local shapes (this rank's heads, MLP and vocabulary slices)
        for i, (layer, attn) in enumerate(zip(decoder_layers(model), attention_modules(model))):
            problem = kv_layout_problem(attn, local)
            if problem is None and spec.is_moe:
                problem = moe_layout_problem(layer, spec, world)
            if problem is not None:
                raise _Refused(f"layer {i}: {problem}")
        weights = module_weights(model, local)
        dtypes = {str(w.dtype) for w in weights.values()}
        if dtypes != {"torch.bfloat16"}:
            raise _Refused(f"weights of dtype {sorted(dtypes)}; the megakernel reads bf16")
        problem = vocab_problem(spec, world, weights[EMBED].shape[0])
        if problem is not None:
            raise _Refused(problem)
        kv_caches = [attn.kv_cache for attn in attention_modules(model)]
        page = kv_caches[0].shape[2]
        device = input_ids.device
        workers = self._num_workers(device)
        rope = rope_cache(model, spec)
        early, self.early = self.early, None
        compiled = early.plans() if early is not None else {}
        plans, splits, missed = {}, {}, []
        for size in plan_batches(self.max_batch):
            buffers = step_buffers(input_ids, positions, batch, size)
            options = self._decode_options(size, buffers["block_tables"].shape[1] * page, page, workers)
            layers = declare_decoder(spec, weights, kv_caches, options, rope_cache=rope)
            plan = compiled.get(size)
            mismatch = None if early is None or plan is None else difference(early.layers[size], layers, plan)
            if plan is None or mismatch is not None:
                missed.append(f"batch {size}: {mismatch or 'not compiled at model load'}")
                plan = layers.kernel.compile()
            else:
                plan = widen_kv_caches(plan, layers)
            self.hidden = layers.hidden.name
            self.logits = layers.logits.name if layers.logits is not None else ""
            plans[size] = (plan, {**layers.kernel.attached, **buffers})
            splits[size] = layers.options.kv_splits  # the auto rule's choice per size, unless kv_splits forces one
        if early is not None and missed:
            # The early guess of vLLM's geometry missed: planning again cost time, and the
            # background builds were for other kernels.
            logger.info("--model-impl mpk: planning again at the first decode step (%s)", missed[0])
        built_early = not missed and early is not None and early.join_builds()
        if device.type == "cuda" and not built_early:
            from vllm_mpk.runtime.megakernel import build_kernels

            build_kernels(list(plans.values()))  # nvcc in parallel; each Megakernel loads its build
        return _Planned(plans, splits, buffers, device, workers,
                        f"KV cache {kv_caches[0].shape[0]} blocks of {page} "
                        f"({attention_modules(model)[0].attn_backend.get_name()})")

    def _load(self, planned: _Planned) -> dict[int, Any]:
        """The planned megakernels on the device: NVSHMEM's bootstrap, symmetric buffers and
        barriers under tensor parallelism (collective: every rank, after ``agree_on_build``)."""
        plans, spec = planned.plans, self.spec
        if planned.device.type == "cuda":
            from vllm_mpk.runtime.megakernel import Megakernel

            rank, world = tp_rank_and_size()
            if world > 1:  # the plans' all-reduce tiles exchange through NVSHMEM
                bootstrap_nvshmem(world, rank)
            # One host tensor holds every kernel's error word: a stop check reads them all at once.
            self.error_flags = torch.zeros(len(plans), dtype=torch.int32, pin_memory=True)
            kernels = {size: Megakernel(plan, tensors, timeout_s=self.options.timeout_s, profile=self.options.profile,
                                        error_flag=self.error_flags[i:i + 1])
                       for i, (size, (plan, tensors)) in enumerate(plans.items())}
        else:  # the CPU reference executor: same plans, same bindings, tile by tile (tests)
            from vllm_mpk.graph.reference import ReferenceExecutor

            kernels = {size: ReferenceExecutor(plan, tensors) for size, (plan, tensors) in plans.items()}
        logger.info(READY_MESSAGE + ": %d layers, decode batches of %s, %d workers, "
                    "KV splits %s%s, %s, %d tasks at batch %d, %.1f MiB of device memory (%.1f MiB estimated for "
                    "vLLM's budget)", spec.num_layers, "/".join(map(str, plans)), planned.workers,
                    "/".join(map(str, planned.splits.values())), " (auto)" if self.options.kv_splits is None else "",
                    planned.kv_cache, plans[self.max_batch][0].num_tasks, self.max_batch,
                    sum(map(allocated_bytes, kernels.values())) / 2**20, self.estimated_bytes / 2**20)
        return kernels

    def check_weights_in_place(self, model: torch.nn.Module) -> None:
        """After a weight reload: vLLM loads into the existing parameters, so a built megakernel
        (and the CUDA graphs around it, which keep its buffers) stays valid. A reload that
        reallocated a parameter would leave it reading freed memory: raise instead."""
        if not self.kernels:
            return
        kernel = self.kernels[max(self.kernels)]  # every plan binds the same weights
        for name, t in module_weights(model, self.spec).items():
            bound = kernel.tensors.get(name)
            if bound is not None and bound.data_ptr() != t.data_ptr():
                raise RuntimeError(f"--model-impl mpk: reloading weights moved '{name}', which the megakernel "
                                   "reads in place; restart the server to rebuild it")

    # watchdog -----------------------------------------------------------------------------------

    def stop_raised(self) -> bool:
        """Whether a launch stopped on its watchdog: the error words the kernels write to pinned
        host memory as they stop (no CUDA call, so it costs nothing per step; final for a step
        once the host has waited for that step's GPU work)."""
        return self.error_flags is not None and bool(self.error_flags.numpy().any())

    def degrade(self) -> None:
        """After a stop, on every tensor-parallel rank at the same step: one warning naming what
        stopped (from the control blocks), the kernels reset, and every later batch on the stock
        layers (strict mode raises instead)."""
        stops = []
        for kernel in self.kernels.values():
            words = kernel.control.tolist()  # after the launches on this stream: the words are final
            if words[control.ERROR]:
                stops.append(kernel.describe_stop(words))
        what = "; ".join(stops) or "another tensor-parallel rank's megakernel stopped"
        if self.options.strict:
            raise MpkFallbackError(f"--model-impl mpk (strict): {what}")
        for kernel in self.kernels.values():
            kernel.reset()
        self.disabled = f"{STOPPED_MESSAGE}: {what}"
        self.megakernel_graphs.clear()
        logger.warning("--model-impl mpk: %s. The requests of the steps it ran failed; vLLM's stock layers serve "
                       "every batch from now on", self.disabled)


def _capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream of ``t``'s device."""
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _cudagraph_problem(vllm_config: Any) -> str | None:
    """Why vLLM's CUDA graph mode (as resolved when the KV cache was bound) cannot replay a
    captured megakernel launch safely, or None. With ``cudagraph_mode=FULL`` (allowed with FA3)
    a batch of mixed prefill and decode tokens replays the FULL graph captured for its token count
    from a dummy batch of one token per request (``v1/worker/gpu/cudagraph_utils.py``:
    ``_init_candidates`` and ``_is_compatible`` ignore uniformity for mixed descriptors), so the
    megakernel captured there would run prefills."""
    mode = getattr(getattr(vllm_config, "compilation_config", None), "cudagraph_mode", None)
    if isinstance(mode, CUDAGraphMode) and mode.mixed_mode() == CUDAGraphMode.FULL:
        return (f"cudagraph_mode {mode.name} replays one graph for decode and mixed batches; use "
                "FULL_AND_PIECEWISE (the default) or FULL_DECODE_ONLY")
    return None


def _breakable_piecewise(context: ForwardContext) -> bool:
    """A PIECEWISE step under ``VLLM_USE_BREAKABLE_CUDAGRAPH=1``: vLLM captures the whole outer
    forward per token count (``compilation/breakable_cudagraph.py``, keyed by a BatchDescriptor
    that does not tell decode from mixed batches), so a megakernel launch captured there could be
    replayed for a prefill. Such steps run the stock layers."""
    return context.cudagraph_runtime_mode == CUDAGraphMode.PIECEWISE and is_breakable_cudagraph_enabled()


class _Refused(Exception):
    """The megakernel cannot take this model instance; turned into a fallback by ``_build``."""


@dataclass
class _Planned:
    """What a rank builds before its peers agree: the plans by batch size with their bindings
    (compiled on a GPU), the split-KV choice per size, the largest plan's views of vLLM's step
    buffers, and what the ready line reports."""

    plans: dict[int, tuple[Any, dict[str, torch.Tensor]]]
    splits: dict[int, int]
    buffers: dict[str, torch.Tensor]
    device: torch.device
    workers: int
    kv_cache: str


class MpkDecodeMixin:
    """Put before a stock vLLM ``*ForCausalLM`` class by ``mpk_class``."""

    _mpk: MpkRuntime

    def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        spec = ModelSpec.from_hf_config(vllm_config.model_config.hf_config.to_dict())
        self._mpk = MpkRuntime(vllm_config, spec)
        self._mpk.note_model(self)
        degrade.install_worker_hooks()  # where the host waits for a step's output, a stop fails its requests
        # vLLM constructs the model inside load_model, whose allocations it counts as the model's.
        self._mpk.reserve(self, next(self.parameters()).device)  # type: ignore[attr-defined, arg-type]

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: Any = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        extra = {"intermediate_tensors": intermediate_tensors, "inputs_embeds": inputs_embeds, **kwargs}
        hidden = self._mpk.decode(self, input_ids, positions, extra)
        self._mpk.note_capture(positions, launched=hidden is not None)
        if hidden is not None:
            return hidden
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The megakernel's logits where the model state armed them for this step, else vLLM's."""
        logits = self._mpk.step_logits.take(hidden_states)
        return logits if logits is not None else super().compute_logits(hidden_states)  # type: ignore[misc]

    def get_model_state_cls(self) -> type:
        """Model Runner V2's per-model state: the stock one, skipping the attention metadata on
        steps that replay a megakernel graph."""
        from vllm_mpk.integration.model_state import MpkModelState

        return MpkModelState

    def load_weights(self, weights: Any) -> Any:
        loaded = super().load_weights(weights)
        self._mpk.check_weights_in_place(self)
        return loaded

    def mpk_write_profile(self, trace_path: str, batch_size: int | None = None) -> str:
        """With ``profile`` on: write the last step of the plan that runs decode batches of
        ``batch_size`` (default: the largest) as a Perfetto trace and return the per-op summary
        (e.g. through ``LLM.apply_model``)."""
        from vllm_mpk.runtime.profiler import summary, task_spans, write_trace

        kernels = self._mpk.kernels
        sizes = [b for b in sorted(kernels) if batch_size is None or b >= batch_size]
        kernel = kernels[sizes[0] if batch_size is not None else sizes[-1]] if sizes else None
        if kernel is None or getattr(kernel, "profile", None) is None:
            raise RuntimeError('no profiled megakernel step yet: set additional_config {"mpk": {"profile": true}} '
                               "and run a decode batch")
        torch.cuda.synchronize(kernel.device)
        spans = task_spans(kernel.plan, kernel.profile)
        write_trace(kernel.plan, spans, trace_path)
        return summary(kernel.plan, spans)


def is_mpk_class(cls: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, MpkDecodeMixin)


def mpk_class(stock_cls: type) -> type:
    """``Mpk<Name>(MpkDecodeMixin, stock_cls)``, made once per stock class."""
    if is_mpk_class(stock_cls):
        return stock_cls
    cls = _CLASSES.get(stock_cls)
    if cls is None:
        cls = type(f"Mpk{stock_cls.__name__}", (MpkDecodeMixin, stock_cls),
                   {"__module__": __name__, "__qualname__": f"Mpk{stock_cls.__name__}"})
        _CLASSES[stock_cls] = cls
    return cls
