"""Every shipped experiment config runs end to end offline (`linmem eval --offline`), with the
data a newcomer has: LoCoMo and the M3-Bench annotations laid out as $LINMEM_DATA expects, but
no clip captions or memory graphs, which `--offline` stands in for. The numbers are noise; the
plumbing is real."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from datagen import locomo, m3bench

from linmem.cli import main

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))
# The generated LoCoMo file has no conv-30, which these configs' subsets name.
SHRINK = {
    "locomo-answers.toml": ["--unset", "tasks.0.conversations"],
    "locomo-agent.toml": ["--unset", "tasks.0.conversations"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    locomo(root / "locomo" / "locomo-dev.json")
    # The annotations without the captions: as in ../shared/data, and for anyone without the hub.
    annotations, captions = m3bench(root / "m3bench", videos=2, clips=8)
    for f in captions.iterdir():
        f.unlink()
    captions.rmdir()
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
    assert "Offline smoke run" in report and "--offline: LM readers replaced" in report
    m3bench_config = "m3bench" in config.read_text()
    assert ("stand-in data for task" in report) == m3bench_config
    # A table names what ran: a swapped system's row or column says its stand-in.
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for name in {r["system"] for r in records}:
        assert name in report
        assert "→" not in name or name.endswith("(offline)")
    assert (out / "latency_vs_memory.png").is_file()
    # Stand-in readers answer in a few tokens of noise, never a real model's budget (a ranking
    # read writes clip numbers, under its own bound).
    answers = [r for r in records if r.get("tokens") and "rounds" not in r and r["kind"] != "retrieval"]
    assert all(r["tokens"]["generated"] <= 32 for r in answers)


def test_offline_needs_no_data_at_all(tmp_path: Path, monkeypatch, capsys) -> None:
    """Without $LINMEM_DATA, --offline stands in for every file; the stand-in is the same on a
    rerun, which resumes."""
    monkeypatch.delenv("LINMEM_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    config = next(c for c in CONFIGS if c.name == "memory-format.toml")
    assert main(["eval", str(config), "--offline", "--limit", "1", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    out = Path(first["out"])
    assert out == Path("eval-out/memory-format-offline")  # never the real run's folder
    assert first["written"] == 3  # one question, three memory formats (captions, graph, structured)
    report = (out / "report.md").read_text()
    assert report.count("stand-in data for task") == 3
    assert "Kimi-Linear-48B-A3B → tiny:qwen3.5, controller tiny:qwen3 (offline)" in report
    assert main(["eval", str(config), "--offline", "--limit", "1", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["written"], again["skipped"]) == (0, 3)
