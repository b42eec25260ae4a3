"""The README's promises: its quickstart runs, and its commands exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from linmem.cli import build_parser

README = (Path(__file__).parent.parent / "README.md").read_text()


def _block_after(marker: str) -> str:
    rest = README.split(marker, 1)[1]
    return re.search(r"```(?:python|bash)\n(.*?)```", rest, re.S).group(1)


def test_quickstart_runs_and_is_short(linmem_home) -> None:
    code = _block_after("<!-- quickstart")
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = done.stdout
    # transformers' notices about the GPU kernel packages linmem hides on the CPU are dropped.
    assert "falling back to its reference" not in done.stderr, done.stderr
    search, first, second = out.splitlines()[:3]
    assert search == "('Alice puts the red mug in the left cupboard.',)"  # hybrid search, verbatim
    assert first.startswith("(0")  # the mug's clip ranks first
    assert "Tokens(memory=" in second
    assert (linmem_home / "robot-day" / "log.sqlite").is_file()


def test_readme_commands_exist() -> None:
    commands = set(re.findall(r"`linmem (\w+)", README))
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert commands <= set(sub.choices), commands - set(sub.choices)


def test_ci_runs_the_readme_test_command() -> None:
    test_command = _block_after("## Install, run, test").strip().splitlines()[-1]
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert test_command in ci
