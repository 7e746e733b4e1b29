"""vLLM ``general_plugins`` entry point (``mpk = vllm_mpk.integration.plugin:register``).

vLLM calls ``register()`` once in every process it starts (front end, engine core, each worker,
the model-inspection subprocess) and may call it again, so it is idempotent and cheap: it wraps
two methods of vLLM's model registry (``vllm/model_executor/models/registry.py``) and imports
nothing heavy until a model config asks for ``model_impl="mpk"``:

- ``_ModelRegistry.resolve_model_cls``: every class vLLM instantiates comes from here, through
  ``model_loader/utils.py:_get_model_architecture`` (the worker's ``initialize_model``, and
  ``get_model_cls`` in the front end). With ``model_impl == "mpk"`` the stock class vLLM resolves
  (the same one ``"vllm"`` gets) is replaced by its MPK subclass when the megakernel supports the
  model, and kept otherwise.
- ``_ModelRegistry.inspect_model_cls``: called from ``ModelConfig.__post_init__`` in the process
  that builds the config. Its answer (interface flags) is returned unchanged, because the MPK
  subclass only overrides ``forward`` and has the flags of its stock parent; the wrapper is where
  an unsupported model is reported, once, when the config is made rather than when a worker loads.
  What ``additional_config`` decides (the MoE opt-in) is not known there: the worker reports it.

It also wraps ``SchedulerConfig.get_scheduler_cls`` (``vllm/config/scheduler.py``), which the
engine core calls once to pick its scheduler: the class it returns gets the hooks through which
a megakernel stop fails the affected requests (``integration/degrade.py``). They act only on
outputs an MPK worker marked, so other models see no change.

Every other ``model_impl`` passes through untouched. The same routing is offered as a patch on
vLLM's source (``patches/``), which calls ``route_model_cls`` and ``report_model_impl`` below.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_mpk.integration.options import MpkOptions

MODEL_IMPL = "mpk"
WRAPPED_MARK = "_vllm_mpk_wrapped"
# The log line that shows a megakernel serves: vLLM takes any ``--model-impl`` string, so where this
# plugin is not installed for the Python that runs vLLM, ``mpk`` silently means vLLM's own layers.
READY_MESSAGE = "--model-impl mpk: megakernel ready"
# The warnings that the megakernel was turned off (a configuration it cannot serve, a failed build, a
# moved buffer) or stopped on its watchdog; a soak's log must hold neither.
OFF_MESSAGE = "--model-impl mpk: the megakernel is off"
STOPPED_MESSAGE = "the megakernel stopped on its watchdog"

# A child of vLLM's "vllm" logger, so these lines use vLLM's handler, format and
# VLLM_LOGGING_LEVEL (vLLM's logger does not propagate to the root logger).
logger = logging.getLogger("vllm.mpk")

_reported: set[tuple[str, str]] = set()


def register() -> None:
    """Route ``model_impl="mpk"`` through this plugin in this process; a second call does nothing."""
    from vllm.config.scheduler import SchedulerConfig
    from vllm.model_executor.models.registry import _ModelRegistry

    for cls, name, wrap in ((_ModelRegistry, "resolve_model_cls", _wrap_resolve),
                            (_ModelRegistry, "inspect_model_cls", _wrap_inspect),
                            (SchedulerConfig, "get_scheduler_cls", _wrap_scheduler_cls)):
        wrap_once(cls, name, wrap)


def wrap_once(cls: type, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace ``cls.name`` by ``wrap(cls.name)`` unless this package already wrapped it (marked
    with ``WRAPPED_MARK``), so that registering twice in a process wraps nothing twice."""
    current = getattr(cls, name)
    if getattr(current, WRAPPED_MARK, False):
        return
    wrapped = wrap(current)
    setattr(wrapped, WRAPPED_MARK, True)
    setattr(cls, name, wrapped)


def _wrap_resolve(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def resolve_model_cls(self: Any, architectures: Any, model_config: Any) -> tuple[type, str]:
        model_cls, arch = original(self, architectures, model_config)
        if getattr(model_config, "model_impl", None) == MODEL_IMPL:
            model_cls = route_model_cls(model_cls, arch, model_config)
        return model_cls, arch

    return resolve_model_cls


def _wrap_inspect(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def inspect_model_cls(self: Any, architectures: Any, model_config: Any) -> tuple[Any, str]:
        info, arch = original(self, architectures, model_config)
        if getattr(model_config, "model_impl", None) == MODEL_IMPL:
            report_model_impl(model_config, arch)
        return info, arch

    return inspect_model_cls


def _wrap_scheduler_cls(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def get_scheduler_cls(self: Any) -> type:
        from vllm_mpk.integration.degrade import install_scheduler_hooks

        scheduler_cls = original(self)
        install_scheduler_hooks(scheduler_cls)
        return scheduler_cls

    return get_scheduler_cls


def unsupported_reason(model_config: Any, arch: str, *, loaded: bool = True,
                       options: MpkOptions | None = None, tensor_parallel_size: int = 1) -> str | None:
    """Why the megakernel cannot serve this model config, or None when it can. Only the model
    config and the mpk options are read; parallelism, LoRA and the KV cache are checked by the
    worker when it builds. ``loaded=False`` skips what ``ModelConfig.__post_init__`` settles only
    after it inspects the architecture (the dtype and the checkpoint's quantization). ``options``:
    those of the VllmConfig the model is loaded under; None where there is none yet (the front end
    making the ModelConfig), which leaves out what they decide (whether MoE and, above one GPU,
    tensor parallelism are opted in)."""
    from vllm_mpk.models.spec import SUPPORT_SUMMARY, ModelSpec, UnsupportedModelError

    if getattr(model_config, "runner_type", "generate") != "generate":
        return f"runner '{model_config.runner_type}' is not supported; the megakernel serves text generation"
    if getattr(model_config, "convert_type", "none") != "none":
        return f"--convert {model_config.convert_type} is not supported"
    try:
        spec = ModelSpec.from_hf_config(model_config.hf_config.to_dict())
    except UnsupportedModelError as e:
        return str(e)
    if arch != spec.architecture:
        return f"vLLM resolved architecture {arch}, not {spec.architecture} ({SUPPORT_SUMMARY})"
    if not loaded:
        return None
    missing = None if options is None else options.missing_opt_in(spec, tensor_parallel_size)
    if missing is not None:
        return missing
    if getattr(model_config, "quantization", None):
        return f"quantized weights ({model_config.quantization}) are not supported; the megakernel reads bf16"
    dtype = getattr(model_config, "dtype", None)
    if dtype is not None and str(dtype) != "torch.bfloat16":
        return f"dtype {dtype} is not supported; the megakernel runs bf16 (pass --dtype bfloat16)"
    return None


def report_model_impl(model_config: Any, arch: str) -> None:
    """Warn, once per process and model, that ``--model-impl mpk`` falls back to vLLM's own
    implementation of ``arch``; called where the config is made."""
    reason = unsupported_reason(model_config, arch, loaded=False)
    if reason is not None:
        _report(model_config, arch, reason, logging.WARNING)


def route_model_cls(model_cls: type, arch: str, model_config: Any) -> type:
    """The class to instantiate for ``model_impl="mpk"``: the MPK subclass of ``model_cls`` when
    the megakernel supports the model, else ``model_cls`` itself. In a worker loading the model
    with ``{"mpk": {"strict": true}}`` an unsupported model raises UnsupportedModelError instead."""
    from vllm_mpk.integration.model import is_mpk_class, mpk_class

    if is_mpk_class(model_cls):
        return model_cls
    options, world = _current_options()
    early = unsupported_reason(model_config, arch, loaded=False)
    reason = early or unsupported_reason(model_config, arch, options=options, tensor_parallel_size=world)
    if reason is None:
        return mpk_class(model_cls)
    if options is not None and options.strict:
        from vllm_mpk.models.spec import UnsupportedModelError

        raise UnsupportedModelError(f"--model-impl mpk with strict mode: {reason}")
    # What the config alone shows was reported where the config was made (the front end), so a
    # worker only notes it; the dtype, quantization and options are known only now: warned.
    _report(model_config, arch, reason, logging.DEBUG if early else logging.WARNING)
    return model_cls


def _report(model_config: Any, arch: str, reason: str, level: int) -> None:
    key = (str(getattr(model_config, "model", "")), reason)
    if key in _reported:
        return
    if level >= logging.WARNING:
        _reported.add(key)
    logger.log(level, "--model-impl mpk: %s runs on vLLM's own implementation (no megakernel): %s", arch, reason)


def _current_options() -> tuple[MpkOptions | None, int]:
    """The mpk options and tensor-parallel size of the VllmConfig a worker loads the model under
    (None and 1 elsewhere)."""
    from vllm.config import get_current_vllm_config_or_none

    from vllm_mpk.integration.options import MpkOptions

    vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None:
        return None, 1
    world = getattr(getattr(vllm_config, "parallel_config", None), "tensor_parallel_size", 1)
    return MpkOptions.from_vllm_config(vllm_config), world
