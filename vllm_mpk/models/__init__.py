"""Graph builders for supported model families."""

from vllm_mpk.models.decoder import DecodeModel, DecodeOptions, build_decoder
from vllm_mpk.models.spec import ModelSpec, UnsupportedModelError

__all__ = ["DecodeModel", "DecodeOptions", "ModelSpec", "UnsupportedModelError", "build_decoder"]
