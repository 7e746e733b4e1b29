"""Model Runner V2's per-model state for the MPK classes: the stock one, minus the attention
metadata that no kernel of a megakernel step reads.

Model Runner V2 (``v1/worker/gpu/model_runner.py``) builds the attention backend's metadata every
step (``model_state.prepare_attn``: FlashAttention's scheduler metadata, a device launch and host
work) before it replays the FULL CUDA graph of a decode batch. When that graph holds the
megakernel's launch, nothing in it reads that metadata: the megakernel reads the token ids,
positions, sequence lengths, block tables and slot mapping that the runner wrote into its
persistent buffers earlier in the step (``prepare_inputs`` and the runner's own ``prepare_attn``).
The metadata is otherwise only read by a speculative drafter, which the megakernel never runs
with. Skipping it saves 0.15-0.27 ms of the host's step (the five shipped models, H100, bench
rows' ``host_attn_metadata``), where the host sets a small model's TPOT. For the same steps it
gives the model runner a sampler that takes all-greedy batches by one argmax
(``greedy_sampler.py``), and arms the megakernel's logits for its ``compute_logits``
(``kernel_logits.py``): this is the one place that knows, before a replay, that the replayed graph
holds a megakernel launch.

Only an MPK model asks for this class, so ``self.model`` always has its ``MpkRuntime``.

vLLM asks the model for this class (``model_states/__init__.py``: ``init_model_state`` uses the
model's ``get_model_state_cls()`` when it has one). The supported architectures would otherwise
get ``DefaultModelState`` (they are neither encoder-decoder nor hybrid), so this subclasses it.
"""

from __future__ import annotations

from typing import Any

from vllm.config import CUDAGraphMode
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from vllm_mpk.integration.greedy_sampler import GreedyDecodeSampler


class MpkModelState(DefaultModelState):
    def prepare_attn(self, input_batch: Any, cudagraph_mode: CUDAGraphMode, *args: Any,
                     for_capture: bool = False, **kwargs: Any) -> dict[str, Any] | None:
        runtime = self.model._mpk
        if (not for_capture and cudagraph_mode == CUDAGraphMode.FULL
                and input_batch.num_tokens_after_padding in runtime.megakernel_graphs):
            runtime.arm_logits(input_batch)  # this step's compute_logits takes the megakernel's
            return None
        runtime.step_logits.arm(None)
        return super().prepare_attn(input_batch, cudagraph_mode, *args, for_capture=for_capture, **kwargs)

    def custom_sampler(self, sampler: Any) -> tuple[Any, Any] | None:
        runtime = self.model._mpk
        if not runtime.options.greedy_argmax or self.vllm_config.speculative_config is not None:
            return None  # the megakernel never runs with a drafter: vLLM keeps its rejection sampler
        return GreedyDecodeSampler(sampler, runtime.megakernel_graphs, self.max_num_reqs, self.device), None
