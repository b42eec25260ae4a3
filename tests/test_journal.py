"""The crash-safe JSON Lines journal shared by eval results and the structured-extraction cache."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from linmem.journal import Appender, repair


def test_a_torn_last_line_is_cut_and_the_next_record_starts_clean(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": 3, "b": "cut mid-wri')
    with Appender(path) as journal:
        journal.write({"a": 4})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"a": 1}, {"a": 2}, {"a": 4}]


def test_repair_leaves_whole_files_alone(tmp_path: Path) -> None:
    for content in (b"", b'{"a": 1}\n', b"only a torn line"):
        path = tmp_path / "j.jsonl"
        path.write_bytes(content)
        repair(path)
        assert path.read_bytes() == (b"" if content == b"only a torn line" else content)
    repair(tmp_path / "missing.jsonl")
    assert not (tmp_path / "missing.jsonl").exists()


def test_concurrent_writers_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "j.jsonl"
    journal = Appender(path, fsync=True)
    threads = [
        threading.Thread(
            target=lambda w=w: [journal.write({"w": w, "i": i, "pad": "x" * 500}) for i in range(50)]
        )
        for w in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    journal.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted((r["w"], r["i"]) for r in records) == [(w, i) for w in range(4) for i in range(50)]
