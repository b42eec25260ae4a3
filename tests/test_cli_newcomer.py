"""What a new user meets first on the command line: input read as meant, output safe to print,
clear refusals, and commands that say what they did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from linmem.cli import main
from linmem.memory import open_memory


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict, str]:
    code = main(list(argv) + ["--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def text(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def console(*argv: str, stdin: str | None = None, **kw) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("linmem")
    return subprocess.run([str(exe), *argv], input=stdin, capture_output=True, text=True, check=False, **kw)


# -- write: JSON is read as items, whatever the file is called ------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "fmt"),
    [
        ("notes.json", '{"text": "a", "clip": 1}\n{"text": "b"}\n', "jsonl"),  # JSON Lines under .json
        ("notes.json", '[{"text": "a", "clip": 1},\n {"text": "b"}]', "json"),
        ("notes.txt", '{"text": "a", "clip": 1}\n\n{"text": "b"}\n', "jsonl"),
        ("notes", '  [{"text": "a", "clip": 1}, {"text": "b"}]\n', "json"),
    ],
)
def test_json_content_is_read_as_items(capsys, tmp_path, name, content, fmt) -> None:
    f = tmp_path / name
    f.write_text(content)
    code, out, err = run(capsys, "write", "notes", str(f))
    assert code == 0 and out["written"] == 2
    items = open_memory("notes").items()
    assert [(i.text, i.clip) for i in items] == [("a", 1), ("b", None)]
    assert (f"read as {fmt}" in err) == (f.suffix != ".json")  # a surprise only where the suffix says text


def test_json_on_stdin_is_read_as_items(linmem_home) -> None:
    done = console("write", "notes", "-", stdin='{"text": "piped in", "time": "09:00"}\n')
    assert done.returncode == 0, done.stderr
    assert "wrote 1 item to notes (id 1)" in done.stdout
    (item,) = open_memory("notes", home=linmem_home).items()
    assert (item.text, item.time) == ("piped in", "09:00")


def test_format_text_keeps_json_as_text(capsys, tmp_path) -> None:
    f = tmp_path / "raw.txt"
    f.write_text('{"text": "a"}\n')
    run(capsys, "write", "raw", str(f), "--format", "text")
    assert [i.text for i in open_memory("raw").items()] == ['{"text": "a"}']


def test_broken_json_items_are_refused_with_the_line_and_a_hint(capsys, tmp_path) -> None:
    f = tmp_path / "items.txt"
    f.write_text('{"text": "a"}\n{"text": "b"}\n{"txt": "c"}\n')
    code, out, _ = run(capsys, "write", "broken", str(f))
    assert code == 1 and out["error"]["code"] == "bad_input"
    assert f"{f}:3: unknown field 'txt'" in out["error"]["message"]
    assert "--format text" in out["error"]["message"]
    code, out, _ = run(capsys, "list")
    assert "broken" not in [m["name"] for m in out["memories"]]  # nothing written, no memory made


def test_text_that_merely_starts_with_a_bracket_stays_text(capsys, tmp_path) -> None:
    f = tmp_path / "todo.txt"
    f.write_text("[draft] call the plumber\n\n{not json} either\n")
    code, out, _ = run(capsys, "write", "todo", str(f))
    assert code == 0 and [i.text for i in open_memory("todo").items()] == [
        "[draft] call the plumber",
        "{not json} either",
    ]


# -- display ------------------------------------------------------------------------------------


def test_control_bytes_are_escaped_on_display_and_kept_in_the_memory(capsys, tmp_path) -> None:
    f = tmp_path / "odd.jsonl"
    f.write_text(json.dumps({"text": "red\u001b[31m alert\u0000 and\nsecond line", "clip": 0}) + "\n")
    main(["write", "odd", str(f)])
    capsys.readouterr()
    code, out, _ = text(capsys, "show", "odd")
    assert code == 0 and "\x1b" not in out and "\x00" not in out
    assert "red\\x1b[31m alert\\x00 and" in out
    # A multi-line item keeps its column: the second line starts under the first's text.
    first = next(line for line in out.splitlines() if "alert" in line)
    second = next(line for line in out.splitlines() if "second line" in line)
    assert second.index("second line") == first.index("red")
    assert open_memory("odd").items()[0].text.startswith("red\u001b[31m")  # stored as written
    code, out, err = text(capsys, "rank", "odd", "alert", "--embedder", "hash:32")
    assert "\x1b" not in out + err and "\\x1b" in out


def test_show_lists_caches_with_sizes_and_plural_counts(capsys, tmp_path) -> None:
    f = tmp_path / "one.txt"
    f.write_text("just one\n")
    code, out, _ = text(capsys, "write", "one", str(f))
    assert "wrote 1 item to one (id 1)" in out
    text(capsys, "rank", "one", "one", "--embedder", "hash:32")
    code, out, _ = text(capsys, "show", "one")
    assert "{" not in out  # no Python dict
    assert "caches: 1 file, " in out and "KiB" in out and "sources: (none)" in out
    code, out, _ = text(capsys, "list")
    assert "one\t1 item\n" in out


def test_output_cut_short_by_the_reader_ends_quietly(linmem_home, tmp_path) -> None:
    f = tmp_path / "many.txt"
    f.write_text("".join(f"note {i}\n\n" for i in range(3000)))
    assert console("write", "many", str(f)).returncode == 0
    exe = Path(sys.executable).with_name("linmem")
    show = subprocess.Popen(
        [str(exe), "show", "many", "--limit", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert show.stdout is not None and show.stdout.readline().startswith(b"memory: many")
    show.stdout.close()  # like `| head -1`
    _, err = show.communicate(timeout=60)
    assert show.returncode == 141 and b"Traceback" not in err and b"BrokenPipe" not in err


# -- rank ---------------------------------------------------------------------------------------


def test_rank_prints_scores_and_lines_and_top_k_is_k(capsys, tmp_path) -> None:
    f = tmp_path / "clips.jsonl"
    lines = ["Alice puts the keys in the drawer", "Bob waters the fern", "Alice looks for her keys"]
    f.write_text("".join(json.dumps({"text": t, "clip": i}) + "\n" for i, t in enumerate(lines)))
    main(["write", "clips", str(f)])
    capsys.readouterr()
    code, out, _ = text(capsys, "rank", "clips", "keys", "--embedder", "hash:32", "--top-k", "1")
    rows = out.strip().splitlines()
    assert len(rows) == 1
    clip, score, line = rows[0].split("\t")
    assert clip in ("clip 0", "clip 2") and 0 < float(score) <= 1 and "keys" in line
    code, out, _ = run(capsys, "rank", "clips", "keys", "--embedder", "hash:32", "-k", "2")
    assert len(out["clips"]) == 2


def test_rank_on_a_memory_without_clips_says_why(capsys, tmp_path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("Alice's keys are in the drawer.\n")
    main(["write", "notes", str(f)])
    capsys.readouterr()
    code, out, _ = text(capsys, "rank", "notes", "keys", "--embedder", "hash:32")
    assert code == 0 and "no item of notes has a clip id" in out and "linmem ask" in out


# -- questions from stdin -----------------------------------------------------------------------


def test_a_question_on_stdin(linmem_home, tmp_path) -> None:
    f = tmp_path / "clips.jsonl"
    f.write_text(json.dumps({"text": "Alice puts the keys in the drawer", "clip": 4}) + "\n")
    console("write", "day", str(f))
    question = "Where are the keys? " + "Please answer briefly. " * 200_000  # 4.6 MB: past ARG_MAX
    done = console("rank", "day", "-", "--embedder", "hash:32", "--json", stdin=question)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["clips"] == [4]
    done = console(
        "ask", "day", "-", "--backend", "embedding", "--embedder", "hash:32", "--json", stdin="  \n"
    )
    assert done.returncode == 1 and "question read from stdin is empty" in done.stdout


# -- forget and delete --------------------------------------------------------------------------


def test_forget_unknown_ids_warns_or_refuses(capsys, tmp_path) -> None:
    f = tmp_path / "three.txt"
    f.write_text("a\n\nb\n\nc\n")
    main(["write", "three", str(f)])
    capsys.readouterr()
    code, out, _ = run(capsys, "forget", "three", "99")
    assert code == 1 and "three has no item 99: nothing forgotten" in out["error"]["message"]
    code, out, err = run(capsys, "forget", "three", "2", "99")
    assert code == 0 and out["forgotten"] == 1 and out["missing"] == [99]
    assert "warning: three has no item 99" in err
    code, out, _ = text(capsys, "forget", "three", "1")
    assert out == "forgot 1 item from three\n"


def test_delete_asks_first_on_a_terminal(linmem_home, tmp_path) -> None:
    # A real terminal: the child's stdin is a pseudo-terminal, so it asks; "n" keeps the memory.
    import pty

    f = tmp_path / "keep.txt"
    f.write_text("a\n")
    console("write", "keep", str(f))
    exe = str(Path(sys.executable).with_name("linmem"))
    for answer, kept in ((b"n\n", True), (b"y\n", False)):
        leader, follower = pty.openpty()
        child = subprocess.Popen(
            [exe, "delete", "keep"], stdin=follower, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        os.close(follower)
        os.write(leader, answer)  # waits in the terminal until the question reads it
        out, err = child.communicate(timeout=60)
        os.close(leader)
        assert b"delete memory keep and its 1 item? [y/N]" in err
        assert ("keep" in console("list").stdout) == kept
        assert (b"cancelled" in err) == kept
    console("write", "keep", str(f))
    assert console("delete", "keep", "--yes").returncode == 0  # --yes: no question
    assert "keep" not in console("list").stdout


# -- flags and early refusals -------------------------------------------------------------------


def test_global_flags_go_before_the_command_too(linmem_home, tmp_path) -> None:
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    for argv in (["--home", str(a_file), "list"], ["list", "--home", str(a_file)]):
        done = console(*argv)
        assert done.returncode == 1 and "is a file, not a folder" in done.stderr
    done = console("--json", "list")
    assert done.returncode == 0 and json.loads(done.stdout) == {"memories": []}
    done = console("--json", "forget", "notes", "abc")
    assert done.returncode == 2 and json.loads(done.stdout)["error"]["code"] == "usage"


def test_bad_specs_and_empty_memories_are_refused_before_any_model_loads(linmem_home, tmp_path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("a\n")
    console("write", "a", str(f))
    open_memory("empty", home=linmem_home, create=True).close()
    cases = [
        (["ask", "a", "q", "--model", "tiny:qwen35"], "unknown tiny model 'qwen35'"),
        (["ask", "a", "q", "--model", "hf:/nonexistent/dir"], "model folder /nonexistent/dir does not exist"),
        (["ask", "empty", "q", "--model", "tiny:qwen3.5"], "memory 'empty' is empty"),
    ]
    # Each is refused before torch is imported (seconds, on a busy machine a minute).
    check = "import sys, linmem.cli as c; c.main(sys.argv[1:]); print('torch' in sys.modules)"
    env = os.environ | {"LINMEM_HOME": str(linmem_home)}
    for argv, message in cases:
        done = subprocess.run(
            [sys.executable, "-c", check, *argv], capture_output=True, text=True, env=env, check=False
        )
        assert message in done.stderr and "hf download" not in done.stderr, done.stderr
        assert done.stdout.strip() == "False", done.stderr


def test_ingest_of_memory_items_points_to_write(capsys, tmp_path) -> None:
    f = tmp_path / "items.jsonl"
    f.write_text('{"text": "a note"}\n')
    code, out, _ = run(capsys, "ingest", str(f), "--memory", "video")
    assert code == 1 and "linmem write" in out["error"]["message"] and f"{f}:1" in out["error"]["message"]


def test_ingest_summary_names_the_memory(capsys, tmp_path) -> None:
    f = tmp_path / "cam.jsonl"
    f.write_text('{"clip": 0, "caption": "Alice enters."}\n{"clip": 1, "caption": "Bob leaves."}\n')
    code, out, _ = text(capsys, "ingest", str(f), "--memory", "video")
    assert code == 0 and "cam (captions): 2 clips, 2 written to video, 0 already there" in out


# -- progress -----------------------------------------------------------------------------------


def test_progress_lines_off_a_terminal(monkeypatch) -> None:
    import io

    from linmem import progress

    stream = io.StringIO()
    monkeypatch.setattr(progress, "QUIET_S", 0.0)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    progress.log_lines(False)
    task = progress.Task("reading the memory", 1000, "tok", stream)
    task.step(250)
    assert stream.getvalue() == ""  # lines only where the program asked for them
    progress.log_lines(True)
    try:
        task.step(250)
        task.step(500)
    finally:
        progress.log_lines(False)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("reading the memory: 500/1000 tok (50%), ") and "left" in lines[0]
    assert lines[1].startswith("reading the memory: 1000/1000 tok (100%)") and "left" not in lines[1]


def test_quick_work_shows_nothing(monkeypatch) -> None:
    import io

    from linmem import progress

    stream = io.StringIO()
    progress.log_lines(True)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    try:
        task = progress.Task("quick", 10, "it", stream)
        for _ in range(10):
            task.step()
    finally:
        progress.log_lines(False)
    assert stream.getvalue() == ""  # all within QUIET_S


def test_a_long_prefill_reports_its_tokens(linmem_home, tmp_path) -> None:
    # The real command, off a terminal, with the quiet spell and the interval shortened.
    f = tmp_path / "notes.txt"
    f.write_text("".join(f"Note {i}: the blue folder holds item {i}.\n\n" for i in range(60)))
    console("write", "notes", str(f))
    code = (
        "import sys; from linmem import progress, cli; progress.QUIET_S = 0; progress.LOG_EVERY_S = 0; "
        "sys.exit(cli.main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "ask",
            "notes",
            "Where is item 7?",
            "--model",
            "tiny:qwen3",
            "--max-new-tokens",
            "2",
        ],
        capture_output=True,
        text=True,
        env=os.environ | {"LINMEM_HOME": str(linmem_home)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("reading the memory: ")]
    assert lines and lines[-1].startswith("reading the memory: ") and "(100%)" in lines[-1]
    assert any(line.startswith("reading the question: ") for line in done.stderr.splitlines())
