"""vllm_mpk: decode-step megakernels for vLLM, and a builder API to compose them."""

from vllm_mpk.api import PersistentKernel

__version__ = "0.1.0"
__all__ = ["PersistentKernel", "__version__"]
