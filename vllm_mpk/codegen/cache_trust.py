"""Trust checks for the JIT cache. Loading a cached ``.so`` runs its code in this process.

A cache path is trusted when the current user owns it and neither group nor others can write it.
Folders are created 0700, files 0600 (the ``.so`` 0700). The folders above the cache root are not
checked: the user chose the root, and a sticky ``/tmp`` is a fine parent.

An artifact is loaded only when its size and sha256 match the record made when it was built. The
check runs before dlopen, because dlopen of a truncated ``.so`` kills the process with SIGBUS. An
entry that fails the check is renamed aside (quarantined) rather than deleted, so a person can
still inspect it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger("vllm.mpk")

DIR_MODE = 0o700
FILE_MODE = 0o600
ARTIFACT_MODE = 0o700
_HASH_CHUNK = 1 << 20
_warned: set[str] = set()


class CacheError(RuntimeError):
    """No trusted cache folder, or one that cannot be written; the message says what to change."""


class CorruptArtifact(Exception):
    """A cached artifact fails its record (size, sha256) or does not import."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _owned_by_me(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid()


def distrust(path: Path) -> str | None:
    """Why ``path`` must not be trusted, naming what to change; None if it is fine or absent."""
    try:
        link, st = path.lstat(), path.stat()
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"{path} cannot be inspected ({err.strerror})"
    for owned in (link, st):  # a symlink's owner could point it elsewhere after this check
        if not _owned_by_me(owned):
            return (f"{path} is owned by uid {owned.st_uid}, not by you (uid {os.geteuid()}): remove it, "
                    f"or chown it to yourself if you trust its contents")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}): "
                f"run chmod go-w {path}")
    return None


def first_distrusted(paths: Iterable[Path]) -> str | None:
    return next((reason for reason in map(distrust, paths) if reason), None)


def private_root() -> Path:
    """The cache used when the configured one is not trusted: a folder of this user in the temp dir."""
    return Path(tempfile.gettempdir()) / f"vllm-mpk-{os.geteuid()}"


def unwritable(path: Path, err: OSError) -> CacheError:
    return CacheError(f"cannot create {path} ({err.strerror}): make {path.parent} writable by you, or set "
                      f"VLLM_MPK_CACHE_DIR to a folder you can write")


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents, each 0700 (a umask can only take bits away). A folder
    that another process creates first is kept as it is; the caller checks trust after this call."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue
        except OSError as err:
            raise unwritable(folder, err) from err


def write_private(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Write ``path`` atomically (a temp file of this thread's own renamed over it), created with ``mode``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb", opener=lambda name, flags: os.open(name, flags, mode)) as out:
        out.write(data)
    os.replace(tmp, path)


def artifact_record(path: Path) -> dict[str, int | str]:
    """Size and sha256 of a built artifact, for its entry's ``key.json``."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as data:
        while chunk := data.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def verify_artifact(path: Path, record: object) -> None:
    """Raise CorruptArtifact unless ``path`` matches ``record`` (FileNotFoundError if it is absent).
    The size is checked first: it catches a truncated file without reading it."""
    size = path.stat().st_size
    if not isinstance(record, dict) or not {"size", "sha256"} <= record.keys():
        raise CorruptArtifact(path, "key.json has no size/sha256 record of it (an older or interrupted build)")
    if size != record["size"]:
        raise CorruptArtifact(path, f"it is {size} bytes, the build recorded {record['size']} (truncated or replaced)")
    if artifact_record(path)["sha256"] != record["sha256"]:
        raise CorruptArtifact(path, "its sha256 differs from the one recorded at build time (changed on disk)")


def quarantine(entry: Path, reason: str) -> Path:
    """Rename a failed cache entry aside, to ``<entry>.bad-<ns timestamp>``, and say so."""
    aside = entry.with_name(f"{entry.name}.bad-{time.time_ns()}")
    entry.rename(aside)
    logger.warning("JIT cache entry %s failed its check (%s); moved it to %s and rebuilding", entry, reason, aside)
    return aside
