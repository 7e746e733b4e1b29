"""Compiled plans and their task tables, kept in the JIT cache so that a restart compiles nothing.

Compiling a plan (lowering, event wiring, scheduling, validation) and building its task table
take seconds per batch size; both are deterministic. So the vLLM integration stores, for each plan
it compiles, what a launch reads of it (``PlanCounts`` and the record layout) under the plan's
key, and the GPU runtime stores each task table it builds under the plan's key, the bound
tensors' geometry and the prefetch policy. A restart with the same declaration restores the plan
deferred (``Plan.deferred``: its tasks are compiled only if something reads them) and loads its
table, so neither lowering nor table building runs::

    <cache root>/<vllm_mpk version>/plans/<key>.plan.json   <key>.plan.json.rec
    <cache root>/<vllm_mpk version>/plans/<key>.table.npy   <key>.table.npy.rec

A plan's key covers its declaration (every tensor's name, shape, dtype and role; every op's kind,
name, attributes, operands and grid; the workers and the schedule policy), the vllm_mpk version
and the source of the packages that compile plans and tables (``COMPILER_PACKAGES``), so an edit
to the compiler misses the cache. A table's key adds what the argument words read of the bound
tensors (strides and 16-byte alignment; their shapes and dtypes are the plan's, checked at
binding) and the prefetch policy. The KV caches' block count is in neither: nothing compiled
depends on it (``integration/plan_reuse.py``).

Entries follow the JIT cache's trust rules (``cache_trust``): the folders and files must be the
user's and not writable by others, and each file's size and sha256, recorded beside it (``.rec``)
when it was written, are checked before it is read. An entry that fails is compiled again and
overwritten; nothing read back is executable (JSON and ``.npy`` without pickles).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vllm_mpk.codegen import cache_trust
from vllm_mpk.codegen.cache_trust import CacheError
from vllm_mpk.codegen.jit import cache_root, package_version
from vllm_mpk.codegen.tables import PrefetchPolicy, RecordLayout
from vllm_mpk.graph.ir import Op, TensorHandle
from vllm_mpk.graph.plan import Plan, PlanCounts

if TYPE_CHECKING:  # typing only: the code generator does not depend on the API
    from vllm_mpk.api import PersistentKernel

logger = logging.getLogger("vllm.mpk")

COMPILER_PACKAGES = ("graph", "codegen")  # under vllm_mpk/: their code decides a plan and its task table
FOLDER = "plans"
RECORD_SUFFIX = ".rec"
ALIGNMENT = 16  # bytes: the alignment the argument words check of a bound tensor


@functools.cache
def compiler_hash() -> str:
    """sha256 of the vllm_mpk version and every source file of ``COMPILER_PACKAGES``."""
    root = Path(__file__).parents[1]
    h = hashlib.sha256(package_version().encode())
    for package in COMPILER_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _handle(t: TensorHandle) -> list[Any]:
    return [t.name, list(t.shape), str(t.dtype), t.role.value]


def _op(op: Op) -> list[Any]:
    return [op.index, op.kind, op.name, repr(sorted(op.attrs.items())), list(op.grid_dim), list(op.block_dim),
            sorted((r, h.name) for r, h in op.inputs.items()), sorted((r, h.name) for r, h in op.outputs.items())]


def plan_key(tensors: Mapping[str, TensorHandle], ops: list[Op], num_workers: int, policy: str) -> str:
    """The key of the plan that compiling this declaration gives."""
    declaration = [compiler_hash(), num_workers, policy, [_handle(t) for t in tensors.values()], [_op(op) for op in ops]]
    return hashlib.sha256(json.dumps(declaration).encode()).hexdigest()


def kernel_key(kernel: PersistentKernel) -> str:
    """``plan_key`` of a declared ``PersistentKernel``."""
    return plan_key(kernel.tensors, kernel.ops, kernel.num_workers, kernel.schedule)


def table_key(plan_key_: str, tensors: Mapping[str, torch.Tensor], names: list[str], prefetch: PrefetchPolicy) -> str:
    """The key of a task table of plan ``plan_key_`` bound to ``tensors`` (``names``: the plan's)."""
    geometry = [[tensors[n].stride(), tensors[n].data_ptr() % ALIGNMENT == 0] for n in names]
    return hashlib.sha256(json.dumps([plan_key_, geometry, repr(prefetch)]).encode()).hexdigest()


# --- the folder and its files -------------------------------------------------------------------

def _folder(create: bool) -> Path | None:
    """The trusted ``plans`` folder (the configured cache, else the private one, as for kernels);
    None where neither is usable (the cache is then skipped, not an error)."""
    for root in (cache_root(), cache_trust.private_root()):
        folder = root / package_version() / FOLDER
        chain = [root, folder.parent, folder]
        problem = cache_trust.first_distrusted(chain)
        if problem is None and create:
            try:
                cache_trust.make_private_dirs(folder)
            except CacheError as e:
                problem = str(e)
            else:
                problem = cache_trust.first_distrusted(chain)
        if problem is None:
            return folder
    return None


def _record_of(data: bytes) -> dict[str, int | str]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _read(name: str) -> bytes | None:
    """The checked contents of ``name``, or None: absent, untrusted, or failing its record."""
    folder = _folder(create=False)
    if folder is None:
        return None
    path, rec = folder / name, folder / (name + RECORD_SUFFIX)
    problem = cache_trust.first_distrusted([path, rec])
    if problem is not None:
        cache_trust.warn_once(f"not reading the plan cache entry {path}: {problem}")
        return None
    try:
        data, record = path.read_bytes(), json.loads(rec.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("plan cache entry %s cannot be read (%s); compiling it again", path, e)
        return None
    if record != _record_of(data):
        logger.warning("plan cache entry %s differs from its record %s (size and sha256); compiling it again",
                       path, rec)
        return None
    return data


def _write(name: str, data: bytes) -> None:
    """Write ``name``, then its record: a reader finds both, or a mismatch, never a record alone."""
    folder = _folder(create=True)
    if folder is None:
        return
    try:
        cache_trust.write_private(folder / name, data)
        cache_trust.write_private(folder / (name + RECORD_SUFFIX), json.dumps(_record_of(data)).encode())
    except OSError as e:
        logger.debug("not storing %s in the plan cache: %s", name, e)


# --- plans and tables ---------------------------------------------------------------------------

def _plan_file(key: str) -> str:
    return f"{key}.plan.json"


def _record(key: str) -> dict[str, Any] | None:
    data = _read(_plan_file(key))
    if data is None:
        return None
    try:
        record = json.loads(data)
        return {"counts": PlanCounts(tuple(record["queue_lens"]), tuple(record["trigger_counts"])),
                "layout": RecordLayout(*record["layout"])}
    except (ValueError, KeyError, TypeError):
        return None


def cached_counts(kernel: PersistentKernel) -> PlanCounts | None:
    """The counts of the declared ``kernel``'s plan, where the cache holds it."""
    record = _record(kernel_key(kernel))
    return None if record is None else record["counts"]


def restore(kernel: PersistentKernel) -> Plan | None:
    """The declared ``kernel``'s plan, deferred, where the cache holds it."""
    key = kernel_key(kernel)
    record = _record(key)
    if record is None:
        return None
    plan = Plan.deferred(kernel.tensors, kernel.ops, kernel.schedule, record["counts"])
    plan.key = key
    return plan


def store(kernel: PersistentKernel, plan: Plan, layout: RecordLayout) -> None:
    """Keep what a launch reads of ``plan``, compiled from the declared ``kernel``, with its record
    ``layout``; ``plan`` takes the key, so that the runtime stores its task tables too."""
    plan.key = kernel_key(kernel)
    counts = plan.counts
    record = {"queue_lens": list(counts.queue_lens), "trigger_counts": list(counts.trigger_counts),
              "layout": [layout.max_waits, layout.max_signals, layout.num_args]}
    _write(_plan_file(plan.key), json.dumps(record).encode())


def cached_layout(plan: Plan) -> RecordLayout | None:
    """The record layout stored with ``plan`` (by its key), where the cache holds it."""
    record = None if plan.key is None else _record(plan.key)
    return None if record is None else record["layout"]


def task_table(plan: Plan, tensors: Mapping[str, torch.Tensor], prefetch: PrefetchPolicy,
               build: Callable[[], np.ndarray]) -> np.ndarray:
    """The task table of ``plan`` bound to ``tensors`` under ``prefetch``: from the cache where
    the plan has a key and the cache holds the table, else ``build()`` (stored where it has one)."""
    if plan.key is None:
        return build()
    name = f"{table_key(plan.key, tensors, list(plan.tensors), prefetch)}.table.npy"
    data = _read(name)
    if data is not None:
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError:
            pass
    table = build()
    out = io.BytesIO()
    np.save(out, table, allow_pickle=False)
    _write(name, out.getvalue())
    return table
