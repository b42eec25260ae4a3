"""The `linmem` command line, run in-process and as a real console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import needs
import pytest

from linmem.cli import build_parser, main
from linmem.demo import sample_path
from linmem.memory import memories, open_memory


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    code = main(list(argv) + ["--json"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, f"--json must print exactly one JSON object, got: {out!r}"
    return code, json.loads(lines[0])


@pytest.fixture
def items_file(tmp_path: Path) -> Path:
    f = tmp_path / "day.jsonl"
    shutil.copy(sample_path(), f)
    return f


def test_write_ask_show_forget(capsys, items_file, tmp_path) -> None:
    code, out = run(capsys, "write", "day", str(items_file))
    assert code == 0 and out["written"] == 66 and out["ids"][:2] == [1, 2]
    notes = tmp_path / "notes.txt"
    notes.write_text("Alice's passport is in the blue folder.\n\nBob is allergic to peanuts.\n")
    code, out = run(capsys, "write", "day", str(notes))
    assert out["written"] == 2 and out["items"] == 68

    code, out = run(capsys, "ask", "day", "Where did Bob put his car keys?", "--backend", "embedding")
    assert code == 0
    assert {"answer", "clips", "model", "tokens", "timings"} <= out.keys()
    assert {"memory", "processed", "cached"} <= out["tokens"].keys() and "total_s" in out["timings"]
    assert out["clips"][0] == 6 and "top drawer" in out["answer"]

    code, out = run(capsys, "rank", "day", "standing desk", "--backend", "embedding", "-k", "2")
    assert len(out["clips"]) == 2 and set(out["clips"]) <= {9, 16, 17}  # the desk clips
    code, out = run(capsys, "rank", "day", "standing desk", "-k", "2")  # the hybrid reader by default
    assert out["model"] == "bm25+st:all-MiniLM-L6-v2" and set(out["clips"]) <= {9, 16, 17}
    assert out["hits"][0]["lines"] and 0 < out["hits"][0]["score"] <= 1

    code, out = run(capsys, "show", "day", "--limit", "3")
    assert out["items"] == 68 and out["clips"] == 22 and len(out["list"]) == 3
    assert any(k.startswith("embeddings") for k in out["caches"])

    code, out = run(capsys, "forget", "day", "67", "68", "999")
    assert out["forgotten"] == 2 and out["items"] == 66
    code, out = run(capsys, "list")
    assert out["memories"] == [{"name": "day", "items": 66}]
    code, out = run(capsys, "forget", "day", "--all")
    assert out["items"] == 0 and not (open_memory("day").cache_dir).exists()
    code, out = run(capsys, "delete", "day")
    assert memories() == []


def test_lm_reader_cached_and_stateless(capsys, items_file) -> None:
    run(capsys, "write", "day", str(items_file))
    base = ["ask", "day", "What did Alice cook?", "--model", "tiny:qwen3.5", "--max-new-tokens", "8"]
    _, first = run(capsys, *base)
    _, second = run(capsys, *base)
    _, stateless = run(capsys, *base, "--stateless")
    assert first["answer"] == second["answer"] == stateless["answer"]
    assert any("random weights" in n for n in first["notes"])
    # A new process finds the snapshot on disk and processes only the question.
    assert "snapshot: loaded from disk" in second["notes"]
    # The memory came from disk; the instruction after it is redone once per process (~150 tokens).
    assert second["tokens"]["cached"] == second["tokens"]["memory"]
    assert stateless["tokens"]["processed"] == first["tokens"]["processed"]
    assert second["tokens"]["processed"] + second["tokens"]["cached"] == stateless["tokens"]["processed"]
    assert second["tokens"]["processed"] < 250


def test_errors_are_clear_and_write_nothing(capsys, tmp_path) -> None:
    open_memory("kitchen", create=True)
    code, out = run(capsys, "ask", "garden", "q?")
    assert code == 1 and out["error"]["code"] == "no_such_memory"
    assert "existing: kitchen" in out["error"]["message"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "clip": 1}\n{"text": "broken"\n')
    code, out = run(capsys, "write", "garden", str(bad))
    assert code == 1 and "bad.jsonl:2: invalid JSON" in out["error"]["message"]
    assert "garden" not in memories()

    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "fine"}\n')
    code, out = run(capsys, "write", "kitchen", str(good), str(bad))
    assert code == 1 and open_memory("kitchen").state().count == 0

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    code, out = run(capsys, "write", "kitchen", str(latin1))
    assert code == 1 and "latin1.txt:1: not UTF-8" in out["error"]["message"]

    code, out = run(capsys, "write", "pantry", str(tmp_path / "missing.jsonl"))
    assert code == 1 and out["error"]["code"] == "bad_input"
    assert "missing.jsonl: cannot read (No such file or directory)" in out["error"]["message"]
    assert "pantry" not in memories()

    code, out = run(capsys, "write", "../escape", str(good))
    assert code == 1 and out["error"]["code"] == "bad_name"

    code, out = run(capsys, "ask", "kitchen", "q?", "--model", "tiny:qwen3")
    assert out["error"]["code"] == "empty_memory"
    run(capsys, "write", "kitchen", str(good))
    code, out = run(capsys, "ask", "kitchen", "q?", "--model", "llama:7b")
    assert out["error"]["code"] == "unknown_spec" and "hf:REPO_OR_PATH" in out["error"]["message"]
    code, out = run(capsys, "ask", "kitchen", "q?", "--model", "hf:someone/uncached-model")
    assert out["error"]["code"] == "model_unavailable" and "tiny:qwen3.5" in out["error"]["message"]
    code, out = run(
        capsys, "ask", "kitchen", "why? " * 300, "--model", "tiny:qwen3", "--context-length", "512"
    )
    assert out["error"]["code"] == "context_overflow"


def test_human_errors_go_to_stderr(capsys) -> None:
    assert main(["show", "nothing-here"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("linmem: error: no memory named 'nothing-here'")


def test_every_command_has_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {"write", "ask", "rank", "show", "list", "forget", "delete", "demo"}
    for name, sp in sub.choices.items():
        assert sp.format_help().startswith(f"usage: linmem {name}")


def test_console_script_prints_one_json_object(linmem_home, items_file) -> None:
    exe = shutil.which("linmem", path=str(Path(sys.executable).parent)) or "linmem"
    env = dict(os.environ, LINMEM_HOME=str(linmem_home))
    subprocess.run([exe, "write", "day", str(items_file)], check=True, env=env, capture_output=True)
    out = subprocess.run(
        [exe, "ask", "day", "Who visits on Saturday?", "--model", "tiny:kimi-linear", "--json"],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    assert len(out.strip().splitlines()) == 1
    assert json.loads(out)["model"] == "tiny:kimi-linear"


def test_demo_runs_both_readers(capsys) -> None:
    code, out = run(capsys, "demo", "--model", "tiny:qwen3.5")
    assert code == 0 and out["items"] == 66
    assert [a["clips"][0] for a in out["embedding"]] == [6, 10, 11]
    assert len(out["lm"]) == 3
    second = out["lm"][1]["tokens"]
    assert second["cached"] > second["memory"] and second["processed"] < 64


def _no_local_models(monkeypatch, tmp_path) -> Path:
    for var in ("LINMEM_MODELS", "OLLAMA_MODELS", "HF_HUB_CACHE"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    return tmp_path / "LINMEM_MODELS"


def test_demo_without_default_model_explains(capsys, monkeypatch, tmp_path) -> None:
    _no_local_models(monkeypatch, tmp_path)
    code = main(["demo"])
    out = capsys.readouterr().out
    assert code == 0
    assert "hf download Qwen/Qwen3.5-0.8B" in out and "linmem demo --model tiny:qwen3.5" in out
    assert "top drawer" in out  # the embedding reader still answered
    assert "ollama pull" in out and "get-models" in out


def test_demo_falls_back_to_a_local_gguf(capsys, monkeypatch, tmp_path) -> None:
    needs.llama_cpp()
    pytest.importorskip("gguf")
    from tinygguf import build_gguf

    build_gguf(_no_local_models(monkeypatch, tmp_path) / "tiny-qwen35.gguf", "qwen35")
    code = main(["demo"])
    out = capsys.readouterr().out
    assert code == 0 and "using the local GGUF gguf:tiny-qwen35" in out
    assert "== LM reader (gguf:tiny-qwen35, linear hybrid attention) ==" in out
    assert out.count("\nA: ") == 3
