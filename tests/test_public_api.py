"""The public API is what `linmem.__all__` lists, and modules keep out of each other's insides.

Private modules are named `_x` (linmem._spec, linmem._http, linmem.engines._gguf ...). A private
name (`_x`) may be used inside its own package folder only; across packages a module uses public
names. The few exceptions below are other projects' private names that have no public form.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import linmem

SRC = Path(linmem.__file__).parent

PUBLIC = [
    "Answer", "BadInput", "BadName", "ContextOverflow", "EmptyMemory", "EngineError", "Hit", "Item",
    "LinmemError", "Memory", "ModelUnavailable", "NoSuchMemory", "Timings", "Tokens", "UnknownSpec",
    "default_home", "delete_memory", "memories", "open", "open_memory", "parse_clips", "read_items",
]  # fmt: skip

# (file, attribute): other projects' private names used on purpose, and why.
ALLOWED = {
    ("cli.py", "_actions"): "argparse has no public way to list a parser's subcommands",
    ("cli.py", "_SubParsersAction"): "the type of those subcommand actions",
    ("service/mcp.py", "_lowlevel_server"): "the MCP SDK exposes its low-level server only so",
    ("log.py", "_close_if_idle"): "a Log closing another Log: same class, same module",
    ("readers/embedding.py", "_vectors"): "a VectorIndex reading another VectorIndex: same class",
    ("cli.py", "_exit"): "os._exit: a stopped server's process ends without waiting on abandoned reads",
}


def test_public_names_are_pinned() -> None:
    assert sorted(linmem.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(linmem, name) is not None


def test_import_loads_no_model_library() -> None:
    libraries = ("torch", "transformers", "llama_cpp")
    code = f"import sys, linmem; print(sorted(m for m in {libraries!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _violations(root: Path = SRC) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                # `from .x import _name` is private to x's package; reaching another package's is not.
                crosses = node.level > 1 or (node.level == 0 and (node.module or "").startswith("linmem"))
                for alias in node.names:
                    if crosses and _private(alias.name) and not _private_module(node, alias.name):
                        found.append(f"{rel}:{node.lineno}: imports {alias.name} from {node.module}")
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                if (rel, node.attr) not in ALLOWED:
                    found.append(f"{rel}:{node.lineno}: reads {ast.unparse(owner)}.{node.attr}")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_module(node: ast.ImportFrom, name: str) -> bool:
    """`from .. import _spec`: a private module of linmem itself, meant for its packages."""
    return node.module is None


def test_no_module_reaches_into_another_modules_private_names() -> None:
    assert _violations() == []


def test_the_check_catches_a_reach(tmp_path: Path) -> None:
    """The check itself, on a small package that does both wrong things."""
    (tmp_path / "readers").mkdir()
    (tmp_path / "bench.py").write_text("def f(reader):\n    return reader._store.current()\n")
    (tmp_path / "readers" / "x.py").write_text("from ..engines.hf import _device\nfrom .. import _spec\n")
    assert _violations(tmp_path) == [
        "bench.py:2: reads reader._store",
        "readers/x.py:1: imports _device from engines.hf",
    ]
