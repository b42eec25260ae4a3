"""What some tests need from the machine, skipped (or, where CI requires it, failed) with the reason."""

from __future__ import annotations

import os
from types import ModuleType

import pytest


def llama_cpp() -> ModuleType:
    """The llama.cpp binding, if installed and able to run on this CPU. `LINMEM_REQUIRE_GGUF`
    (set by CI) turns a skip into a failure, so the GGUF tests cannot vanish unnoticed."""
    module = pytest.importorskip("llama_cpp")
    from linmem.engines.llama import unusable

    problem = unusable()
    if problem:
        if os.environ.get("LINMEM_REQUIRE_GGUF"):
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem, allow_module_level=True)
    return module
