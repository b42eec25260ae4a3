"""Every shipped experiment config runs end to end offline (`linmem eval --offline`), on
generated data laid out as $LINMEM_DATA expects. The numbers are noise; the plumbing is real."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from datagen import locomo, m3bench, structured
from test_tasks import write_graph

from linmem.cli import main

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))
# Sizes the generated data (and a 2-core CPU) can fill quickly, and its conversation names.
SHRINK = {
    "summarization.toml": ["--set", "tasks.0.n=3"],
    "locomo-answers.toml": ["--unset", "tasks.0.conversations"],
    "locomo-agent.toml": ["--unset", "tasks.0.conversations"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    locomo((root / "locomo").mkdir() or root / "locomo" / "locomo-dev.json")
    for split in ("robot", "web"):
        folder = root / "m3bench" / split
        annotations, captions = m3bench(folder, videos=2, clips=32, web=split == "web")
        annotations.rename(root / "m3bench" / f"{split}.json")
        (root / "m3bench" / "captions").mkdir(exist_ok=True)
        captions.rename(root / "m3bench" / "captions" / split)
    graphs = root / "m3bench" / "memory_graphs" / "robot"
    graphs.mkdir(parents=True)
    for vid in ("kitchen_00", "kitchen_01"):
        write_graph(graphs / f"{vid}.pkl")
    structured(root / "m3bench" / "structured" / "robot", videos=2, clips=32)
    return root


def test_every_table_has_a_config() -> None:
    import os

    from linmem.evals.config import TABLES, load_config

    os.environ.setdefault("LINMEM_DATA", "/nonexistent")
    tables = {load_config(c).table for c in CONFIGS}
    assert tables == set(TABLES)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_runs_offline(config: Path, data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LINMEM_DATA", str(data))
    out = tmp_path / "out"
    shrink = SHRINK.get(config.name, [])
    code = main(["eval", str(config), "--offline", "--limit", "2", "--out", str(out), "--json", *shrink])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, result
    assert result["written"] > 0 and result["failed"] == 0
    report = (out / "report.md").read_text()
    assert report.startswith("# ") and "## Config" in report
    assert re.search(r"\| [\d.]+ \(\d+\)", report)  # cells carry their n
    assert "--offline: LM readers replaced" in report
    assert (out / "latency_vs_memory.png").is_file()
