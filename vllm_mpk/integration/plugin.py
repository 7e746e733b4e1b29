"""vLLM ``general_plugins`` entry point (``mpk = vllm_mpk.integration.plugin:register``).

vLLM calls ``register()`` once in every process it starts (front end, engine core, each worker,
the model-inspection subprocess), and may call it again in the same process, so it must be
idempotent and cheap.

For now it only records that the plugin loaded. Routing ``--model-impl mpk`` to megakernel model
classes (wrapping vLLM's model-class resolution) is a later issue; until it lands, vLLM with this
plugin installed behaves exactly like stock vLLM.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Load the mpk plugin into this process; a second call does nothing."""
    global _registered
    if _registered:
        return
    _registered = True
    logger.debug("vllm_mpk plugin loaded (model routing not wired yet; vLLM's stock path is used)")
