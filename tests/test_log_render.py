"""The item log (durable, append-only, versioned) and the one memory-text layout."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from linmem import render
from linmem.errors import BadInput, BadName, NoSuchMemory
from linmem.itemfile import read_items
from linmem.log import Log
from linmem.memory import check_name, delete_memory, memories, open_memory
from linmem.types import Item


def test_append_assigns_ids_and_bumps_version(tmp_path) -> None:
    log = Log(tmp_path / "log.sqlite", create=True)
    assert log.state().count == 0
    a = log.append([Item("one", clip=0), Item("two", clip=0, meta={"who": "Alice"})])
    b = log.append([Item("three", clip=1, time="00:30-01:00", source="v1")])
    assert [i.id for i in a + b] == [1, 2, 3]
    s = log.state()
    assert (s.version, s.epoch, s.last_id, s.count) == (2, 0, 3, 3)
    assert log.items(after_id=1)[0].meta == {"who": "Alice"}
    assert [i.text for i in log.items(ids=[3, 1])] == ["one", "three"]


def test_delete_starts_new_epoch_and_ids_are_never_reused(tmp_path) -> None:
    log = Log(tmp_path / "log.sqlite", create=True)
    log.append([Item(str(i)) for i in range(5)])
    assert log.delete([5, 2, 99]) == 2
    s = log.state()
    assert (s.epoch, s.count, s.last_id) == (1, 3, 4)
    assert log.delete([]) == 0 and log.state().epoch == 1
    (new,) = log.append([Item("after")])
    assert new.id == 6


def test_append_is_all_or_nothing(tmp_path) -> None:
    log = Log(tmp_path / "log.sqlite", create=True)
    with pytest.raises(BadInput, match="clip must be an integer"):
        log.append([Item("fine"), Item("bad", clip="7")])  # type: ignore[arg-type]
    assert log.state().count == 0


def test_log_survives_process_restart(tmp_path) -> None:
    path = tmp_path / "log.sqlite"
    script = textwrap.dedent(
        f"""
        from linmem.log import Log
        from linmem.types import Item
        Log({str(path)!r}, create=True).append([Item("written by another process", clip=4, time="02:00")])
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    (item,) = Log(path).items()
    assert (item.text, item.clip, item.time, item.id) == ("written by another process", 4, "02:00", 1)


def test_layout_exact() -> None:
    items = [
        Item("Alice puts the mug away.", clip=12, time="06:00-06:30", source="kitchen_22"),
        Item("Bob asks where   the mug is.", clip=12, time="06:10", source="kitchen_22"),
        Item("Same time, no prefix.", clip=12, time="06:00-06:30", source="kitchen_22"),
        Item("Bob opens the cupboard.", clip=13, time="06:30-07:00", source="kitchen_22"),
        Item("Another video.", clip=0, time="00:00-00:30", source="office_01"),
        Item("A note\nwith two lines.", time="2024-05-01 09:00"),
    ]
    assert render.render(items) == (
        "[CLIP 12 | 06:00-06:30 | kitchen_22]\n"
        "Alice puts the mug away.\n"
        "(06:10) Bob asks where the mug is.\n"
        "Same time, no prefix.\n"
        "\n[CLIP 13 | 06:30-07:00]\n"
        "Bob opens the cupboard.\n"
        "\n[CLIP 0 | 00:00-00:30 | office_01]\n"
        "Another video.\n"
        "\n[NOTE | 2024-05-01 09:00]\n"
        "A note with two lines.\n"
    )


def test_rendering_only_appends() -> None:
    items = [Item(f"line {i}", clip=i // 3, time=f"{i}") for i in range(20)]
    for n in range(1, 20):
        assert render.render(items).startswith(render.render(items[:n]))
        assert render.segments(items)[:n] == render.segments(items[:n])


@pytest.mark.parametrize(
    ("text", "clips"),
    [
        ("It is in CLIP 12.", [12]),
        ("See CLIP_4 and clip 7; also [CLIP 9 | 04:30-05:00].", [4, 7, 9]),
        ("clips 3, 5 and 8 mention it, clip12 too", [3, 5, 8, 12]),
        ("Clips 3-5 and CLIP 4 again", [3, 4, 5]),
        ("At 06:00-06:30 nothing; 12 people", []),
        ("Clip #2 or clip: 10", [2, 10]),
    ],
)
def test_parse_clips(text: str, clips: list[int]) -> None:
    assert render.parse_clips(text) == clips


def test_parse_ranking_tolerates_bare_numbers() -> None:
    assert render.parse_ranking("1. CLIP 4\n2. CLIP 2\n3. CLIP 99", valid=range(10)) == [4, 2]
    assert render.parse_ranking("The most relevant are 7, 3, then 12.", valid=[3, 7, 12]) == [7, 3, 12]
    assert render.parse_ranking("nothing relevant", valid=[1, 2]) == []


def test_memory_names_are_validated(linmem_home) -> None:
    for bad in ["", "../x", "a/b", "a\\b", ".hidden", "x" * 65, "a..b", "name with space", "é"]:
        with pytest.raises(BadName):
            open_memory(bad, create=True)
    assert check_name("kitchen_22.v1-a") == "kitchen_22.v1-a"
    assert not linmem_home.exists() or list(linmem_home.iterdir()) == []


def test_missing_memory_lists_existing() -> None:
    open_memory("alpha", create=True)
    open_memory("beta", create=True)
    with pytest.raises(NoSuchMemory, match="existing: alpha, beta"):
        open_memory("gamma")
    delete_memory("alpha")
    assert memories() == ["beta"]


def test_jsonl_bad_line_names_file_and_line(tmp_path) -> None:
    f = tmp_path / "items.jsonl"
    f.write_text('{"text": "ok", "clip": 0}\n\n{"text": "also ok"}\n{"text": "broken", }\n')
    with pytest.raises(BadInput, match=r"items.jsonl:4: invalid JSON"):
        read_items(f)
    f.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(BadInput, match=r"items.jsonl:2: unknown field 'txt'"):
        read_items(f)
    f.write_text('{"text": "ok", "clip": -1}\n')
    with pytest.raises(BadInput, match=r":1: item clip must be >= 0"):
        read_items(f)
    f.write_text('["not", "an", "object"]\n')
    with pytest.raises(BadInput, match="expected a JSON object, found list"):
        read_items(f)


def test_non_utf8_and_empty_files(tmp_path) -> None:
    f = tmp_path / "notes.txt"
    f.write_bytes(b"first paragraph\n\nsecond " + b"\xff\xfe bad")
    with pytest.raises(BadInput, match=r"notes.txt:3: not UTF-8 \(byte 0xff"):
        read_items(f)
    f.write_text("\n  \n\n")
    with pytest.raises(BadInput, match="no items found"):
        read_items(f)


def test_text_paragraphs_become_items(tmp_path) -> None:
    f = tmp_path / "notes.md"
    f.write_text("Alice likes tea.\nShe drinks it black.\n\n\nBob runs on Mondays.\n")
    assert [i.text for i in read_items(f)] == [
        "Alice likes tea.\nShe drinks it black.",
        "Bob runs on Mondays.",
    ]


def test_rendering_new_items_from_a_cursor_equals_full_render() -> None:
    import random

    rng = random.Random()
    items = [
        Item(
            f"line {i}",
            clip=rng.choice([None, rng.randint(0, 4)]),
            time=rng.choice([None, "00:00", f"{i:02d}:30"]),
            source=rng.choice([None, "a", "b"]),
        )
        for i in range(rng.randint(20, 60))
    ]
    full = render.segments(items)
    for _ in range(10):
        cut = rng.randint(0, len(items))
        head, cursor = render.advance(items[:cut])
        tail, _ = render.advance(items[cut:], render.Cursor.from_dict(cursor.to_dict()))
        assert head + tail == full


def test_a_schema_1_log_gains_its_identity_and_chain_once(tmp_path) -> None:
    """A log written by linmem before content-tied caches opens as before, gets a log id and the
    running hash of its items, and keeps both on every later open."""
    import sqlite3

    path = tmp_path / "log.sqlite"
    with sqlite3.connect(path) as db:  # the schema-1 layout, as earlier releases wrote it
        db.executescript(
            """
            CREATE TABLE items (id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT NOT NULL, clip INTEGER,
                time TEXT, source TEXT, meta TEXT NOT NULL DEFAULT '{}', written_at REAL NOT NULL);
            CREATE TABLE info (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
            INSERT INTO info VALUES ('schema', 1), ('version', 2), ('epoch', 0);
            INSERT INTO items (text, clip, meta, written_at) VALUES ('one', 0, '{}', 0), ('two', 1, '{}', 0);
            """
        )
    log = Log(path)
    before = log.state()
    assert [i.text for i in log.items()] == ["one", "two"] and before.version == 2
    log.append([Item("three", clip=2)])
    assert log.extends(before)
    log.close()
    again = Log(path)
    assert again.state().log_id == before.log_id and again.extends(before)
    # Deleting an item the old state covered re-chains the rest: it no longer matches.
    again.delete([1])
    assert not again.extends(before)
