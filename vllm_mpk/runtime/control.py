"""The megakernel's control block and error codes (mirror ``enum Control`` and ``enum ErrorCode``
in ``csrc/runtime/events.cuh``)."""

from __future__ import annotations

EPOCH, DONE, ERROR, ERR_WORKER, ERR_TASK, ERR_EVENT, ERR_SEEN, ERR_WANTED = range(8)
WORDS = 8
TIMEOUT, PEER_TIMEOUT, COPY_TIMEOUT = 1, 2, 3
ERROR_NAMES = {TIMEOUT: "timeout waiting on an event",
               PEER_TIMEOUT: "timeout waiting for the other tensor-parallel ranks",
               COPY_TIMEOUT: "timeout waiting for a bulk copy into shared memory"}


class MegakernelError(RuntimeError):
    """The kernel stopped itself (watchdog); the message names the task and event that stalled."""
