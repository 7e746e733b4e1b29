"""One test module per op family, ``test_<op>.py``, each with its ``OP_TESTS``."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def all_op_tests() -> list[Any]:
    """Every module's ``OP_TESTS`` (``harness.OpTest``), for checks that run all op families (the
    megakernel's GPU tests run the same cases)."""
    modules = [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)
               if m.name.startswith("test_")]
    return [t for module in modules for t in getattr(module, "OP_TESTS", ())]
