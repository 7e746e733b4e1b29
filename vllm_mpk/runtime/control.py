"""The megakernel's control block (mirrors ``enum Control`` in ``csrc/runtime/worker.cuh``)."""

from __future__ import annotations

EPOCH, DONE, ERROR, ERR_WORKER, ERR_TASK, ERR_EVENT, ERR_SEEN, ERR_WANTED = range(8)
WORDS = 8
ERROR_NAMES = {1: "timeout waiting on an event", 2: "timeout waiting for the other tensor-parallel ranks"}
PEER_TIMEOUT = 2


class MegakernelError(RuntimeError):
    """The kernel stopped itself (watchdog); the message names the task and event that stalled."""
