"""Issue 10: bad input that used to crash. Each case goes through a real front end (the CLI's
`main` with --json, the HTTP app, the MCP server) and must come back as one clear error, with
nothing written.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient
from mcp import Client
from test_http import error

from linmem.cli import main
from linmem.itemfile import stored_bytes
from linmem.memory import memories, open_memory
from linmem.service.core import MAX_ITEM_BYTES, Service
from linmem.service.http import create_app
from linmem.service.mcp import build_server
from linmem.state import RAM
from linmem.types import Item

TOO_BIG = 2**63  # one past SQLite's largest INTEGER
HUGE_INT = "1" * 5000  # past Python's int-string limit of 4,300 digits
DEEP_ARRAYS = "[" * 5000 + "]" * 5000
DEEP_OBJECTS = '{"a":' * 5000 + "1" + "}" * 5000

# (JSON text of an item, what the error must say): each a value json.loads accepts or chokes on.
BAD_ITEMS = [
    pytest.param(
        r'{"text": "a", "meta": {"x": "\ud800"}}', "item meta.x is not valid Unicode", id="meta-value"
    ),
    pytest.param(
        r'{"text": "a", "meta": {"\udfff": 1}}', "item meta key is not valid Unicode", id="meta-key"
    ),
    pytest.param(r'{"text": "a", "source": "cam\ud800"}', "item source is not valid Unicode", id="source"),
    pytest.param(r'{"text": "a", "time": "\udc00"}', "item time is not valid Unicode", id="time"),
    pytest.param(f'{{"text": "a", "clip": {TOO_BIG}}}', "item clip must be at most", id="clip-2^63"),
    pytest.param(f'{{"text": "a", "clip": {HUGE_INT}}}', "more than 4300 digits", id="int-5000-digits"),
    pytest.param(
        f'{{"text": "a", "meta": {{"n": {HUGE_INT}}}}}', "more than 4300 digits", id="meta-int-digits"
    ),
    pytest.param(f'{{"text": "a", "meta": {{"d": {DEEP_ARRAYS}}}}}', "nested too deeply", id="deep-arrays"),
    pytest.param(f'{{"text": "a", "meta": {DEEP_OBJECTS}}}', "nested too deeply", id="deep-objects"),
    pytest.param('{"text": "a", "meta": {"x": NaN}}', "item meta.x holds nan", id="nan"),
    pytest.param('{"text": "a", "meta": {"x": [1, -Infinity]}}', "item meta.x[1] holds -inf", id="infinity"),
    pytest.param(
        '{"text": "a", "meta": {"n": -9223372036854775809}}', "outside the 64-bit range", id="meta-int"
    ),
    pytest.param('{"text": "a", "meta": []}', "item meta must be an object", id="meta-list"),
]


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    """`linmem ARGV --json` in-process: its exit status and its one JSON object."""
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, f"--json must print exactly one JSON object, got: {out!r}"
    return code, json.loads(lines[0])


def cli_error(capsys: pytest.CaptureFixture[str], code: str, *argv: str) -> str:
    status, out = cli(capsys, *argv)
    assert status == 1 and set(out) == {"error"} and out["error"]["code"] == code, out
    return str(out["error"]["message"])


@pytest.fixture
def app(linmem_home: Path) -> Iterator[TestClient]:
    """The HTTP app with its default limits over this test's home."""
    service = Service(linmem_home, ram_budget=RAM.limit)
    with TestClient(create_app(service, token=None), raise_server_exceptions=False) as client:
        yield client


def post_raw(app: TestClient, name: str, body: str | bytes) -> Any:
    data = body.encode("utf-8") if isinstance(body, str) else body
    return app.post(f"/v1/memories/{name}/items", content=data, headers={"Content-Type": "application/json"})


def items_in(app: TestClient, name: str) -> int:
    return int(app.get(f"/v1/memories/{name}").json()["items"])


# Values json.loads accepts (or fails on) that the log cannot store


@pytest.mark.parametrize(("line", "says"), BAD_ITEMS)
def test_a_bad_jsonl_line_names_file_line_and_field(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, line: str, says: str
) -> None:
    f = tmp_path / "day.jsonl"
    f.write_text('{"text": "fine"}\n\n' + line + "\n", encoding="utf-8")
    message = cli_error(capsys, "bad_input", "write", "day", str(f))
    assert message.startswith(f"{f}:3: ") and says in message, message
    assert memories() == []


@pytest.mark.parametrize(("line", "says"), BAD_ITEMS)
def test_a_bad_item_over_http_is_422_naming_index_and_field(app: TestClient, line: str, says: str) -> None:
    assert app.post("/v1/memories", json={"name": "m"}).status_code == 201
    message = error(post_raw(app, "m", '{"items": [{"text": "fine"}, ' + line + "]}"), 422, "bad_input")
    if "digits" in says or "deeply" in says:  # the whole body failed to parse, before any item
        assert message.startswith("the request body is invalid JSON") and says in message, message
    else:
        assert message.startswith("items[1]: ") and says in message, message
    assert items_in(app, "m") == 0


def test_a_body_that_is_not_utf8_is_422(app: TestClient) -> None:
    assert app.post("/v1/memories", json={"name": "m"}).status_code == 201
    message = error(post_raw(app, "m", b'{"items": [{"text": "caf\xe9"}]}'), 422, "bad_input")
    assert message.startswith("the request body is not UTF-8 (byte 0xe9"), message
    assert items_in(app, "m") == 0


def test_ids_and_cursors_past_64_bits_are_refused(
    capsys: pytest.CaptureFixture[str], app: TestClient
) -> None:
    assert app.post("/v1/memories", json={"name": "m"}).status_code == 201
    assert post_raw(app, "m", '{"items": [{"text": "keep me"}]}').status_code == 200
    base = "/v1/memories/m/items"
    for method, path in (
        ("GET", f"{base}?after={TOO_BIG}"),
        ("GET", f"{base}/{TOO_BIG}"),
        ("DELETE", f"{base}/{TOO_BIG}"),
    ):
        assert str(2**63 - 1) in error(app.request(method, path), 422, "bad_input")
    for path in (f"{base}?after={HUGE_INT}", f"{base}/{HUGE_INT}"):
        assert app.get(path).status_code == 422
    app.close()  # let go of the memory before the CLI opens it
    assert "item id must be an integer" in cli_error(capsys, "bad_input", "forget", "m", str(TOO_BIG))
    assert [i.text for i in open_memory("m").items()] == ["keep me"]


# JSON Lines: split on "\n" only, a byte order mark dropped


def test_jsonl_keeps_line_separators_inside_strings(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    texts = ["one\u2028two", "next\u0085line", "para\u2029graph", "form\x0cfeed", "group\x1dsep"]
    f = tmp_path / "odd.jsonl"
    body = "\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\r\n"
    f.write_bytes(body.encode("utf-8"))
    status, out = cli(capsys, "write", "odd", str(f))
    assert status == 0 and out["written"] == len(texts), out
    assert [i.text for i in open_memory("odd").items()] == texts


def test_jsonl_line_numbers_count_newlines_only(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_bytes('{"text": "a\u2028b"}\r\n{"text": "c\u0085d"}\n\n{"text": 7}\n'.encode())
    message = cli_error(capsys, "bad_input", "write", "bad", str(f))
    assert message.startswith(f"{f}:4: item text must be a non-empty string"), message
    assert memories() == []


def test_a_byte_order_mark_is_dropped(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    jsonl, text = tmp_path / "bom.jsonl", tmp_path / "bom.txt"
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    text.write_bytes(b"\xef\xbb\xbfopening paragraph\n\nclosing one\n")
    assert cli(capsys, "write", "bom", str(jsonl), str(text))[0] == 0
    texts = [i.text for i in open_memory("bom").items()]
    assert texts == ["first", "second", "opening paragraph", "closing one"]


def test_text_paragraphs_keep_unicode_separators(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_bytes("one\u2028line\r\nsame paragraph\r\n\r\nsecond\rstill second\r\rthird\n".encode())
    assert cli(capsys, "write", "notes", str(f))[0] == 0
    texts = [i.text for i in open_memory("notes").items()]
    assert texts == ["one\u2028line\nsame paragraph", "second\nstill second", "third"]


# The item size limit counts the whole item


def test_the_item_limit_counts_meta_source_and_time(app: TestClient) -> None:
    assert app.post("/v1/memories", json={"name": "m"}).status_code == 201
    huge_meta = {"text": "small", "meta": {"blob": "x" * 7_000_000}}
    message = error(app.post("/v1/memories/m/items", json={"items": [huge_meta]}), 413, "too_large")
    assert message.startswith("items[0]: the item is 7000") and f"limit of {MAX_ITEM_BYTES}" in message
    half = "é" * (MAX_ITEM_BYTES // 4)  # a quarter of the limit in characters, half of it in bytes
    for field in ("source", "time"):  # each half the limit, plus 2 bytes for the meta "{}"
        over = {"text": half, field: half}
        resp = app.post("/v1/memories/m/items", json={"items": [{"text": "ok"}, over]})
        assert error(resp, 413, "too_large").startswith(f"items[1]: the item is {MAX_ITEM_BYTES + 2} bytes")
    fits = {"text": half, "source": half[2:], "meta": {}}
    assert stored_bytes(Item(**fits)) == MAX_ITEM_BYTES - 2
    assert app.post("/v1/memories/m/items", json={"items": [fits]}).status_code == 200
    assert items_in(app, "m") == 1


def test_mcp_write_has_the_item_limit_and_64_bit_clips(linmem_home: Path) -> None:
    async def run() -> None:
        async with Client(build_server(Service(linmem_home, ram_budget=RAM.limit))) as client:
            big = [{"text": "small", "meta": {"blob": "x" * MAX_ITEM_BYTES}}]
            result = await client.call_tool("memory_write", {"memory": "m", "items": big})
            text = " ".join(getattr(c, "text", "") for c in result.content)
            assert result.is_error and "too_large: items[0]: the item is" in text, text
            clip = [{"text": "fine"}, {"text": "a", "clip": TOO_BIG}]
            result = await client.call_tool("memory_write", {"memory": "m", "items": clip})
            text = " ".join(getattr(c, "text", "") for c in result.content)
            assert result.is_error and "bad_input: items[1]: item clip must be at most" in text, text

    anyio.run(run)
    assert memories() == []


# MCP over stdio: text its JSON parser refuses must still get an answer


class RawStdio:
    """`python -m linmem mcp` driven with JSON-RPC lines written by hand (the SDK's client refuses
    to send a lone surrogate, so it cannot make these requests)."""

    def __init__(self, home: Path) -> None:
        argv = [sys.executable, "-m", "linmem", "mcp", "--home", str(home)]
        env = os.environ | {"LINMEM_MCP_MODEL": "hash:64"}
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode("utf-8") + b"\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float) -> dict[str, Any] | None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return json.loads(self.proc.stdout.readline()) if ready else None

    def call(self, id_: int, arguments: str, timeout: float) -> dict[str, Any] | None:
        self.send(
            f'{{"jsonrpc": "2.0", "id": {id_}, "method": "tools/call", '
            f'"params": {{"name": "memory_write", "arguments": {arguments}}}}}'
        )
        return self.reply(timeout)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_mcp_stdio_answers_a_lone_surrogate(tmp_path: Path) -> None:
    server = RawStdio(tmp_path / "home")
    try:
        hello = {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"},
        }
        server.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello}))
        assert server.reply(120) is not None, "the server did not start"
        server.send(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        good = server.call(2, '{"memory": "m", "items": [{"text": "fine"}]}', 60)
        assert good is not None and good["result"]["isError"] is False, good
        # The escape is written literally: the JSON text holds the six characters \ud800.
        bad = server.call(3, r'{"memory": "m", "items": [{"text": "a", "meta": {"x": "\ud800"}}]}', 20)
        assert bad is not None, "no reply to a tools/call holding a lone surrogate"
        assert bad["id"] == 3 and (bad.get("error") or bad["result"]["isError"]), bad
        assert "items[0]" in json.dumps(bad) and "surrogate" in json.dumps(bad), bad
    finally:
        server.close()
    assert [i.text for i in open_memory("m", home=tmp_path / "home").items()] == ["fine"]


# Damaged memories, many items, bad names, bad command lines


@pytest.mark.parametrize("damage", [b"", b"this is not a database" * 100], ids=["zero-bytes", "garbage"])
def test_a_damaged_log_spoils_only_its_memory(
    capsys: pytest.CaptureFixture[str], linmem_home: Path, damage: bytes
) -> None:
    open_memory("good", create=True).write(["one", "two"])
    (linmem_home / "bad").mkdir()
    (linmem_home / "bad" / "log.sqlite").write_bytes(damage)
    status, out = cli(capsys, "list")
    assert status == 0 and out["memories"][1] == {"name": "good", "items": 2}, out
    bad = out["memories"][0]
    assert bad["name"] == "bad" and bad["items"] is None and bad["error"]["code"] == "corrupt_memory"
    assert "log.sqlite" in cli_error(capsys, "corrupt_memory", "show", "bad")

    service = Service(linmem_home, ram_budget=RAM.limit)
    with TestClient(create_app(service, token=None), raise_server_exceptions=False) as app:
        listed = app.get("/v1/memories")
        assert listed.status_code == 200, listed.text
        assert {"name": "good", "items": 2} in listed.json()["memories"]
        assert "bad" in [m["name"] for m in listed.json()["memories"]]
        assert "log.sqlite" in error(app.get("/v1/memories/bad"), 500, "corrupt_memory")
    assert (linmem_home / "bad" / "log.sqlite").read_bytes() == damage  # left as found


def test_forget_all_past_the_sqlite_variable_limit(capsys: pytest.CaptureFixture[str]) -> None:
    memory = open_memory("many", create=True)
    memory.write([Item(text=f"item {i}", clip=i % 100) for i in range(40_000)])
    memory.close()
    status, out = cli(capsys, "forget", "many", "--all")
    assert status == 0 and out == {"memory": "many", "forgotten": 40_000, "missing": [], "items": 0}, out


@pytest.mark.parametrize("bad", ["CON", "nul", "a.", "COM1.txt"])
def test_device_names_are_refused(
    capsys: pytest.CaptureFixture[str], app: TestClient, tmp_path: Path, bad: str
) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("a note\n")
    assert "bad memory name" in cli_error(capsys, "bad_name", "write", bad, str(f))
    assert "bad memory name" in error(app.post("/v1/memories", json={"name": bad}), 400, "bad_name")
    assert memories() == []


def test_a_usage_error_with_json_is_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, says in (
        (["forget", "notes", "abc"], "invalid int value: 'abc'"),
        (["show"], "the following arguments are required: name"),
        (["nonsense"], "invalid choice: 'nonsense'"),
        (["list", "--colour"], "unrecognized arguments: --colour"),
    ):
        code, out = cli(capsys, *argv)
        assert code == 2 and out["error"]["code"] == "usage" and says in out["error"]["message"], out
        assert "usage: linmem" in out["error"]["message"]
    with pytest.raises(SystemExit) as exited:  # without --json argparse's own usage message stays
        main(["forget", "notes", "abc"])
    assert exited.value.code == 2 and "usage: linmem forget" in capsys.readouterr().err


def test_a_file_name_that_is_not_utf8_is_reported(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.jsonl")
    message = cli_error(capsys, "bad_input", "write", "m", missing)
    assert "caf\\udce9.jsonl: cannot read" in message, message


# A full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of its own (mounting needs root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small tmpfs to fill")
    argv = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)]
    made = subprocess.run(argv, check=False, capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        for _ in range(50):  # a log closed a moment ago may still hold the mount busy
            if subprocess.run(["umount", str(mount)], check=False, capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path, leave: int, name: str = "filler") -> None:
    """Take all but `leave` bytes of the disk's free space, with the file `name`."""
    st = os.statvfs(disk)
    with (disk / name).open("wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize - leave))


def leftovers(home: Path) -> list[str]:
    """Files a failed write or create must not leave behind."""
    patterns = (".creating-*", ".deleting-*", "*.tmp", "*-journal")
    return sorted(str(p.relative_to(home)) for pattern in patterns for p in home.rglob(pattern))


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    f = tmp_path / "big.jsonl"
    f.write_text("".join(json.dumps({"text": f"item {i} " + "x" * 200}) + "\n" for i in range(25_000)))
    return f


# 40 KB left: too little to create a memory; 300 KB: enough to create one, too little to fill it.
@pytest.mark.parametrize("leave", [40_000, 300_000], ids=["create-fails", "write-fails"])
def test_a_full_disk_leaves_no_new_memory(
    capsys: pytest.CaptureFixture[str], small_disk: Path, big_file: Path, leave: int
) -> None:
    home = small_disk / "home"
    open_memory("old", home=home, create=True).close()
    fill(small_disk, leave)
    message = cli_error(capsys, "disk_full", "write", "fresh", str(big_file), "--home", str(home))
    assert "the disk is full" in message
    assert memories(home) == ["old"] and not (home / "fresh").exists()
    assert leftovers(home) == []


def test_a_full_disk_keeps_an_existing_memory_as_it_was(
    capsys: pytest.CaptureFixture[str], small_disk: Path, big_file: Path
) -> None:
    home = small_disk / "home"
    memory = open_memory("old", home=home, create=True)
    memory.write(["kept"])
    memory.close()
    fill(small_disk, 200_000)
    assert "the disk is full" in cli_error(
        capsys, "disk_full", "write", "old", str(big_file), "--home", str(home)
    )
    assert [i.text for i in open_memory("old", home=home).items()] == ["kept"]
    assert leftovers(home) == []

    service = Service(home, ram_budget=RAM.limit)
    with TestClient(create_app(service, token=None), raise_server_exceptions=False) as app:
        items = [{"text": f"item {i} " + "x" * 200} for i in range(25_000)]
        assert "the disk is full" in error(
            app.post("/v1/memories/old/items", json={"items": items}), 507, "disk_full"
        )
        assert items_in(app, "old") == 1
        fill(small_disk, 20_000, "more")  # too little for a new log
        error(app.post("/v1/memories", json={"name": "fresh"}), 507, "disk_full")
        assert app.get("/v1/memories").json()["memories"] == [{"name": "old", "items": 1}]
    assert leftovers(home) == [] and not (home / "fresh").exists()


def test_a_disk_with_no_space_at_all_is_disk_full(
    capsys: pytest.CaptureFixture[str], small_disk: Path
) -> None:
    home = small_disk / "home"
    open_memory("old", home=home, create=True).close()
    fill(small_disk, 0)
    notes = small_disk.parent / "notes.txt"
    notes.write_text("a note\n")
    assert "the disk is full" in cli_error(
        capsys, "disk_full", "write", "old", str(notes), "--home", str(home)
    )
    assert "the disk is full" in cli_error(capsys, "disk_full", "show", "old", "--home", str(home))
