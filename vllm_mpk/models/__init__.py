"""Graph builders for supported model families."""

from vllm_mpk.models.decoder import (
    DecodeModel,
    DecodeOptions,
    auto_kv_splits,
    build_decoder,
    plan_kv_splits,
)
from vllm_mpk.models.spec import ModelSpec, UnsupportedModelError

__all__ = ["DecodeModel", "DecodeOptions", "ModelSpec", "UnsupportedModelError", "auto_kv_splits", "build_decoder",
           "plan_kv_splits"]
