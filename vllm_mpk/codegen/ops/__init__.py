"""The CUDA side of each op family, keyed by op kind: one emitter per file, named like the op's
lowering (``graph/ops/<op>.py``) and task body (``csrc/tasks/<op>.cuh``)."""

from vllm_mpk.codegen.ops.allreduce import AllReduceEmitter
from vllm_mpk.codegen.ops.argmax import ArgmaxEmitter
from vllm_mpk.codegen.ops.attention import AttentionEmitter
from vllm_mpk.codegen.ops.base import ArgLayout, CudaTask, Target, TaskEmitter, UnsupportedOnGPU, uses_nvshmem
from vllm_mpk.codegen.ops.begin_step import BeginStepEmitter
from vllm_mpk.codegen.ops.embed import EmbedEmitter
from vllm_mpk.codegen.ops.linear import LinearEmitter
from vllm_mpk.codegen.ops.moe import MoEDownEmitter, MoEGateUpEmitter, MoETopKEmitter
from vllm_mpk.codegen.ops.rmsnorm import RMSNormEmitter

FAMILIES: tuple[TaskEmitter, ...] = (AllReduceEmitter(), ArgmaxEmitter(), AttentionEmitter(), BeginStepEmitter(),
                                     EmbedEmitter(), LinearEmitter(), RMSNormEmitter(), MoETopKEmitter(),
                                     MoEGateUpEmitter(), MoEDownEmitter())
EMITTERS: dict[str, TaskEmitter] = {kind: family for family in FAMILIES for kind in family.kinds}

__all__ = ["EMITTERS", "FAMILIES", "ArgLayout", "CudaTask", "Target", "TaskEmitter", "UnsupportedOnGPU",
           "uses_nvshmem"]
