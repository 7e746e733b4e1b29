"""The registry of op families, keyed by layer kind (``"linear"`` for ``linear_layer``)."""

from vllm_mpk.graph.ops.allreduce import AllReduce
from vllm_mpk.graph.ops.argmax import Argmax
from vllm_mpk.graph.ops.attention import Attention
from vllm_mpk.graph.ops.base import Env, OpDef, Tile
from vllm_mpk.graph.ops.begin_step import BeginStep
from vllm_mpk.graph.ops.embed import Embed
from vllm_mpk.graph.ops.linear import (
    Linear,
    LinearWithResidual,
    RMSNormLinear,
    RMSNormLinearSiluMul,
    SiluMulLinear,
    SiluMulLinearWithResidual,
)
from vllm_mpk.graph.ops.moe_experts import MoEDown, RMSNormMoEGateUp
from vllm_mpk.graph.ops.moe_topk import MoETopK
from vllm_mpk.graph.ops.rmsnorm import RMSNorm
from vllm_mpk.graph.ops.silu_mul import SiluMul

REGISTRY: dict[str, OpDef] = {
    d.kind: d
    for d in (Embed(), RMSNorm(), Linear(), LinearWithResidual(), RMSNormLinear(), RMSNormLinearSiluMul(), Attention(),
              SiluMul(), SiluMulLinear(), SiluMulLinearWithResidual(), AllReduce(), Argmax(), BeginStep(),
              MoETopK(), RMSNormMoEGateUp(), MoEDown())
}

__all__ = ["REGISTRY", "Env", "OpDef", "Tile"]
