"""M3-Agent-style structured memory extracted from raw clip captions by a chat model.

This module owns the whole path from caption items to structured memory text:

- the extraction prompt and `parse_extraction`, a tolerant reader of the model's JSON answer;
- `extract`, the per-clip loop (clip order per source, each source with its own known-entity
  context), its retries and its JSON Lines cache, so that failures are recorded and retried on a
  rerun instead of being dropped;
- `build_graph`, the networkx graph of entity, episodic and semantic nodes, and `characters`, the
  union-find over equivalent entity tags that names each entity ``character_k``;
- the graph file (`save_graph`, `load_graph`) and M3-Agent's text translation of it
  (`render_json`, `graph_items`);
- `structure`, the whole job on a memory of captions: graphs saved beside its caches, and their
  lines written as a second memory that either reader can read.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import networkx as nx

from . import progress, prompts
from .engines.base import Engine
from .errors import BadInput, ContextOverflow, EngineError, LinmemError
from .journal import Appender
from .memory import Memory
from .types import Item
from .video.captions import line_items

FORMAT = "linmem-structured"
VERSION = 1
CLIP_SECONDS = 30
MAX_NEW_TOKENS = 1024
LINE_KINDS = ("episodic", "semantic")
# Bounds on the known-entity context of a prompt, so it stays short however long the video is.
MAX_ENTITIES = 40
MAX_FACTS = 3

# M3-Agent matches <([^<>]*_[^<>]*)>; this is narrower so that "<face_1, voice_2>" is not one tag.
TAG_RE = re.compile(r"<\s*([A-Za-z][A-Za-z0-9]*_\w+)\s*>")
_BARE_TAG_RE = re.compile(r"\s*<?\s*([A-Za-z][A-Za-z0-9]*_\w+)\s*>?\s*")
_EQUIVALENCE_RE = re.compile(r"\s*equivalences?\s*:", re.IGNORECASE)
_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)
_BULLET_RE = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")
_PERSON_RE = re.compile(r"<person_(\d+)>")

_KEYS = {
    "episodic": "episodic",
    "episodic_memory": "episodic",
    "episodic_memories": "episodic",
    "video_descriptions": "episodic",
    "video_description": "episodic",
    "semantic": "semantic",
    "semantic_memory": "semantic",
    "semantic_memories": "semantic",
    "high_level_conclusions": "semantic",
    "high_level_conclusion": "semantic",
    "equivalences": "equivalences",
    "equivalence": "equivalences",
}

Progress = Callable[[str, int, str], None]


@dataclass(frozen=True, slots=True)
class Extraction:
    """What the model said about one clip: lines whose people are entity tags, and tag pairs that
    name the same entity."""

    episodic: tuple[str, ...]
    semantic: tuple[str, ...]
    equivalences: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "episodic": list(self.episodic),
            "semantic": list(self.semantic),
            "equivalences": [list(pair) for pair in self.equivalences],
        }


def parse_extraction(text: str) -> Extraction:
    """The extraction in a model's answer, read tolerantly; `BadInput` when nothing usable is there.

    Accepts a ``<think>`` block, code fences and prose around the answer (the first balanced
    object that parses wins), a Python dict literal, M3-Agent's key names, lines given as one
    string, and "Equivalence: <a>, <b>" lines among the others (moved to the equivalences).
    """
    found = False
    for obj in _objects(_without_thinking(text)):
        groups = {_KEYS[k]: v for k, v in _normalized_keys(obj) if k in _KEYS}
        if not groups:
            continue
        found = True
        extraction = _extraction(groups)
        if extraction.episodic or extraction.semantic:
            return extraction
    if found:
        raise BadInput("the answer's JSON object has no episodic or semantic lines")
    raise BadInput(f'no JSON object with "episodic" or "semantic" lines in the answer: {_excerpt(text)}')


def _without_thinking(text: str) -> str:
    text = _THINK_RE.sub("", text)
    if "</think>" in text:  # the chat template opened the block
        text = text.rpartition("</think>")[2]
    return text.partition("<think>")[0]  # an unclosed block is all reasoning


def _objects(text: str) -> Iterator[dict[Any, Any]]:
    """Every balanced ``{...}`` of `text` that reads as a JSON object or a Python dict literal."""
    start = text.find("{")
    while start != -1:
        end = _balanced_end(text, start)
        if end is not None:
            obj = _read_object(text[start:end])
            if obj is not None:
                yield obj
        start = text.find("{", start + 1)


def _balanced_end(text: str, start: int) -> int | None:
    """The index just past the bracket that closes ``text[start]``, skipping quoted strings."""
    closing = {"{": "}", "[": "]"}
    stack: list[str] = []
    quote = ""
    escaped = False
    for i in range(start, len(text)):
        c = text[i]
        if quote:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c in closing:
            stack.append(closing[c])
        elif c in "}]":
            if not stack or stack.pop() != c:
                return None
            if not stack:
                return i + 1
    return None


def _read_object(chunk: str) -> dict[Any, Any] | None:
    try:
        obj = json.loads(chunk)
    except json.JSONDecodeError:
        try:
            obj = ast.literal_eval(chunk)  # a Python dict literal; never eval
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None
    return obj if isinstance(obj, dict) else None


def _normalized_keys(obj: dict[Any, Any]) -> Iterator[tuple[str, Any]]:
    for key, value in obj.items():
        yield re.sub(r"[\s-]+", "_", str(key).strip().lower()), value


def _extraction(groups: dict[str, Any]) -> Extraction:
    lines: dict[str, list[str]] = {kind: [] for kind in LINE_KINDS}
    pairs: list[tuple[str, str]] = []
    for kind in LINE_KINDS:
        for line in _lines(groups.get(kind)):
            if _EQUIVALENCE_RE.match(line):
                pairs += _pairs(tag_names(line))
            else:
                lines[kind].append(line)
    for entry in _entries(groups.get("equivalences")):
        pairs += _pairs(_entry_tags(entry))
    return Extraction(tuple(lines["episodic"]), tuple(lines["semantic"]), tuple(dict.fromkeys(pairs)))


def _lines(value: Any) -> list[str]:
    entries = value.splitlines() if isinstance(value, str) else value if isinstance(value, list) else []
    out = []
    for entry in entries:
        if isinstance(entry, str):
            line = TAG_RE.sub(_canonical_tag, " ".join(_BULLET_RE.sub("", entry).split()))
            if line:
                out.append(line)
    return out


def _entries(value: Any) -> list[Any]:
    if isinstance(value, str):
        return value.splitlines()
    if isinstance(value, dict):  # {"<a_1>": "<b_2>"}
        return [[k, v] for k, v in value.items()]
    return value if isinstance(value, list) else []


def _entry_tags(entry: Any) -> list[str]:
    if isinstance(entry, str):
        return tag_names(entry)
    if isinstance(entry, list | tuple):
        tags = []
        for part in entry:
            if isinstance(part, str):
                bare = _BARE_TAG_RE.fullmatch(part)
                tags += [_norm(bare.group(1))] if bare else tag_names(part)
        return tags
    return []


def _pairs(tags: list[str]) -> list[tuple[str, str]]:
    return [(f"<{tags[0]}>", f"<{t}>") for t in tags[1:] if t != tags[0]]


def _canonical_tag(m: re.Match[str]) -> str:
    return f"<{_norm(m.group(1))}>"


def _norm(name: str) -> str:
    return name.strip().lower()


def tag_names(text: str) -> list[str]:
    """The entity names tagged in `text` (``"<Face_3> waves"`` -> ``["face_3"]``), in order."""
    return [_norm(m.group(1)) for m in TAG_RE.finditer(text)]


def _excerpt(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[:limit] + "…")


class _UnionFind:
    """Disjoint sets of tags; each set's root is its earliest-added tag, so results are deterministic."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.rank: dict[str, int] = {}

    def add(self, tag: str) -> None:
        if tag not in self.parent:
            self.parent[tag] = tag
            self.rank[tag] = len(self.rank)

    def find(self, tag: str) -> str:
        self.add(tag)
        while self.parent[tag] != tag:
            self.parent[tag] = self.parent[self.parent[tag]]
            tag = self.parent[tag]
        return tag

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            first, second = (ra, rb) if self.rank[ra] < self.rank[rb] else (rb, ra)
            self.parent[second] = first


def characters(graph: nx.Graph) -> dict[str, str]:
    """Entity tag -> ``character_k``: tags joined by equivalence edges are one character, numbered
    by the first appearance of any of its tags (clip order, then line order, then the equivalences)."""
    sets = _UnionFind()
    for tag in _entities_in_order(graph):
        sets.add(tag)
    for a, b, data in graph.edges(data=True):
        if data.get("kind") == "equivalence":
            sets.union(a, b)
    names: dict[str, str] = {}
    out = {}
    for tag in sets.parent:
        root = sets.find(tag)
        out[tag] = names.setdefault(root, f"character_{len(names)}")
    return out


def _entities_in_order(graph: nx.Graph) -> list[str]:
    entities = [(d["index"], n) for n, d in graph.nodes(data=True) if d.get("type") == "entity"]
    return [n for _, n in sorted(entities)]


def build_graph(source: str, model: str, clips: Iterable[tuple[int, Extraction]]) -> nx.Graph:
    """The graph of one source's extractions, given in clip order.

    Nodes: ``entity`` (id = the tag, e.g. ``"<person_1>"``; `index` = order of first appearance),
    ``episodic`` and ``semantic`` lines (id ``"<kind>:<clip>:<n>"``; `clip`, `text`, `order` =
    insertion order over the whole source). Edges: ``mentions`` from a line to every entity it
    tags, ``equivalence`` between two entities (with the clip that stated it).
    """
    graph = nx.Graph(source=source, model=model)
    order = 0
    entities: dict[str, None] = {}

    def entity(tag: str) -> str:
        if tag not in entities:
            graph.add_node(tag, type="entity", index=len(entities))
            entities[tag] = None
        return tag

    for clip, extraction in clips:
        pairs = [(_tag(a), _tag(b)) for a, b in extraction.equivalences]
        for kind, lines in (("episodic", extraction.episodic), ("semantic", extraction.semantic)):
            for n, text in enumerate(lines):
                if _EQUIVALENCE_RE.match(text):  # M3-Agent's line form of an equivalence
                    pairs += _pairs(tag_names(text))
                    continue
                node = f"{kind}:{clip}:{n}"
                graph.add_node(node, type=kind, clip=clip, text=text, order=order)
                order += 1
                for name in tag_names(text):
                    graph.add_edge(node, entity(f"<{name}>"), kind="mentions")
        for a, b in pairs:
            if a != b:
                graph.add_edge(entity(a), entity(b), kind="equivalence", clip=clip)
    return graph


def _tag(text: str) -> str:
    """A tag in its canonical form (``" <Face_3>"`` -> ``"<face_3>"``)."""
    names = tag_names(text)
    return f"<{names[0]}>" if len(names) == 1 else text


def save_graph(graph: nx.Graph, path: str | Path) -> Path:
    """Write `graph` as node-link JSON under a small header, atomically (a temp file, then rename)."""
    path = Path(path)
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "source": graph.graph.get("source"),
        "model": graph.graph.get("model"),
        "graph": nx.node_link_data(graph, edges="edges"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_graph(path: str | Path) -> nx.Graph:
    """A graph written by `save_graph`; `BadInput` naming the file when it is not one."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise BadInput(f"{path}: cannot read the structured memory ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: not a structured memory file (not JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BadInput(f'{path}: not a structured memory file (expected "format": {FORMAT!r})')
    if doc.get("version") != VERSION:
        raise BadInput(
            f"{path}: structured memory version {doc.get('version')!r}, this linmem reads {VERSION}"
        )
    try:
        graph = nx.node_link_graph(doc["graph"], edges="edges")
    except (KeyError, TypeError, ValueError, AttributeError, nx.NetworkXError) as e:
        raise BadInput(f"{path}: malformed structured memory graph ({type(e).__name__}: {e})") from None
    problem = _graph_problem(graph)
    if problem:
        raise BadInput(f"{path}: malformed structured memory graph ({problem})")
    return graph


def _graph_problem(graph: nx.Graph) -> str | None:
    for node, data in graph.nodes(data=True):
        kind = data.get("type")
        if kind == "entity":
            if not _is_int(data.get("index")):
                return f"entity {node!r} has no integer 'index'"
        elif kind in LINE_KINDS:
            if not (
                _is_int(data.get("clip")) and _is_int(data.get("order")) and isinstance(data.get("text"), str)
            ):
                return f"line node {node!r} needs an integer 'clip' and 'order' and a string 'text'"
        else:
            return f"node {node!r} has unknown type {kind!r}"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def clip_lines(graph: nx.Graph) -> dict[int, list[tuple[str, str]]]:
    """Clip -> ``[(kind, line)]`` in insertion order, every tag rewritten to its ``<character_k>``
    (M3-Agent's translation; equivalences are edges here, never lines); clips ascending."""
    mapping = characters(graph)

    def swap(m: re.Match[str]) -> str:
        character = mapping.get(f"<{_norm(m.group(1))}>")
        return f"<{character}>" if character else m.group(0)

    lines = sorted(
        (d["clip"], d["order"], d["type"], d["text"])
        for _, d in graph.nodes(data=True)
        if d.get("type") in LINE_KINDS
    )
    out: dict[int, list[tuple[str, str]]] = {}
    for clip, _, kind, text in lines:
        out.setdefault(clip, []).append((kind, TAG_RE.sub(swap, text)))
    return out


def render_json(graph: nx.Graph) -> str:
    """``{"CLIP_k": [lines...]}`` sorted by clip, as M3-Agent shows memory to its controller."""
    clips = {f"CLIP_{clip}": [text for _, text in lines] for clip, lines in clip_lines(graph).items()}
    return json.dumps(clips, ensure_ascii=False)


def graph_items(graph: nx.Graph, source: str) -> list[Item]:
    """One item per translated line, in clip then insertion order, timed as 30-second clips."""
    return line_items(clip_lines(graph), source, CLIP_SECONDS)


def extract(
    items: Sequence[Item],
    engine: Engine,
    *,
    cache: str | Path,
    retries: int = 2,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: Progress | None = None,
) -> dict[str, nx.Graph]:
    """One structured-memory graph per source of the caption `items`, extracted clip by clip.

    Items of one clip are joined into its caption. Each source goes in clip order, and each prompt
    lists the entities its earlier clips introduced. A clip whose answer cannot be parsed (or whose
    request fails) is asked again up to `retries` more times. Every attempt is appended to the JSON
    Lines `cache`; a rerun reuses the successes of the same source, clip, caption and model.

    When a clip still fails, the rest of its source is not attempted (later prompts need its
    entities) and, once every source has been tried, `EngineError` lists the failed clips: no
    graph is returned, and the cache keeps the successes for the next run. `progress`, when
    given, is called after each clip with (source, clip, "cached" | "ok" | "failed").
    """
    if retries < 0:
        raise BadInput(f"retries must be >= 0, found {retries!r}")
    captions = _captions(items)
    store = _Cache(Path(cache))
    graphs: dict[str, nx.Graph] = {}
    failed: list[str] = []
    with store:
        run = _Extractor(engine, store, retries, max_new_tokens, progress)
        for source, clips in captions.items():
            done, failure = run.source(source, clips)
            if failure is None:
                graphs[source] = build_graph(source, engine.id, done)
            else:
                failed.append(failure)
    if failed:
        raise EngineError(
            f"structured extraction failed for {len(failed)} clip(s): {'; '.join(failed)}. "
            f"No graph was made; the successful clips are kept in {store.path}, rerun to retry the rest"
        )
    return graphs


def _captions(items: Sequence[Item]) -> dict[str, dict[int, str]]:
    """Source -> clip -> caption text (the texts of a clip's items joined by newlines), clips sorted."""
    out: dict[str, dict[int, list[str]]] = {}
    for item in items:
        if not item.source:
            raise BadInput(f"caption item {item.text[:60]!r} has no source (a video or conversation name)")
        if not _is_int(item.clip) or item.clip is None or item.clip < 0:
            raise BadInput(f"caption item of {item.source!r} needs a clip number >= 0, found {item.clip!r}")
        if not item.text.strip():
            raise BadInput(f"caption of {item.source!r} clip {item.clip} is empty")
        out.setdefault(item.source, {}).setdefault(item.clip, []).append(item.text.strip())
    if not out:
        raise BadInput("no caption items to extract structured memory from")
    return {s: {c: "\n".join(t) for c, t in sorted(clips.items())} for s, clips in out.items()}


@dataclass(frozen=True, slots=True)
class _Extractor:
    engine: Engine
    store: _Cache
    retries: int
    max_new_tokens: int
    progress: Progress | None

    def source(self, source: str, clips: dict[int, str]) -> tuple[list[tuple[int, Extraction]], str | None]:
        """The extractions of one source's clips, and a description of the failed clip (None if none)."""
        known = _Known()
        done: list[tuple[int, Extraction]] = []
        with progress.task(f"structure {source}", len(clips), "clip") as task:
            for position, (clip, caption) in enumerate(clips.items()):
                key = _Key(source, clip, hashlib.sha256(caption.encode("utf-8")).hexdigest(), self.engine.id)
                extraction = self.store.get(key)
                outcome, error = "cached", ""
                if extraction is None:
                    extraction, error = self.ask(
                        key, [{"role": "user", "content": known.prompt(clip, caption)}]
                    )
                    outcome = "ok" if extraction is not None else "failed"
                task.step(note=f"clip {clip}: {outcome}")
                if self.progress is not None:
                    self.progress(source, clip, outcome)
                if extraction is None:
                    skipped = len(clips) - position - 1
                    rest = f", {skipped} later clip(s) not attempted" if skipped else ""
                    return done, f"{source} clip {clip} ({error}){rest}"
                known.add(clip, extraction)
                done.append((clip, extraction))
            return done, None

    def ask(self, key: _Key, messages: list[dict[str, str]]) -> tuple[Extraction | None, str]:
        """Ask for one clip until an answer parses, recording every attempt; (extraction, last error)."""
        error = ""
        for attempt in range(self.retries + 1):
            reply = ""
            try:
                reply = self.engine.chat(messages, max_new_tokens=self.max_new_tokens, temperature=0.0).text
                extraction = parse_extraction(reply)
            except ContextOverflow as e:  # the same prompt will not fit next time either
                self.store.record(key, attempt, error=str(e))
                return None, str(e)
            except LinmemError as e:
                error = str(e)
                self.store.record(key, attempt, error=error, reply=reply)
                if isinstance(e, BadInput):
                    # Greedy decoding repeats itself on the same prompt: show the model what went wrong.
                    messages = [
                        *messages[:1],
                        {"role": "assistant", "content": reply},
                        {"role": "user", "content": prompts.EXTRACTION_RETRY.format(error=error)},
                    ]
                continue
            self.store.record(key, attempt, extraction=extraction)
            return extraction, ""
        return None, f"{self.retries + 1} attempt(s), last: {error}"


class _Known:
    """The entities a source's earlier clips introduced, as the next prompt lists them."""

    def __init__(self) -> None:
        self.sets = _UnionFind()
        self.facts: dict[str, list[tuple[int, str]]] = {}  # (when it was learnt, line)
        self.learnt = 0
        self.last_seen: dict[str, int] = {}
        self.next_person = 1

    def add(self, clip: int, extraction: Extraction) -> None:
        for line in (*extraction.episodic, *extraction.semantic):
            for name in tag_names(line):
                self._see(f"<{name}>", clip)
        for line in extraction.semantic:
            for tag in dict.fromkeys(f"<{n}>" for n in tag_names(line)):
                self.facts.setdefault(tag, []).append((self.learnt, line))
                self.learnt += 1
        for a, b in extraction.equivalences:
            self._see(a, clip)
            self._see(b, clip)
            self.sets.union(a, b)

    def _see(self, tag: str, clip: int) -> None:
        self.sets.add(tag)
        self.last_seen[tag] = clip
        person = _PERSON_RE.fullmatch(tag)
        if person:
            self.next_person = max(self.next_person, int(person.group(1)) + 1)

    def prompt(self, clip: int, caption: str) -> str:
        return prompts.EXTRACTION_PROMPT.format(
            entities=self.listing(), clip=clip, caption=caption, next_n=self.next_person
        )

    def listing(self) -> str:
        """One line per known entity (its equivalent tags together), most recently seen first,
        each with its latest few semantic lines."""
        groups: dict[str, list[str]] = {}
        for tag in self.sets.parent:
            groups.setdefault(self.sets.find(tag), []).append(tag)
        recent = sorted(groups.values(), key=lambda tags: -max(self.last_seen[t] for t in tags))
        lines = []
        for tags in recent[:MAX_ENTITIES]:
            learnt = sorted(f for t in tags for f in self.facts.get(t, []))
            facts = list(dict.fromkeys(line for _, line in learnt))[-MAX_FACTS:]
            lines.append(" = ".join(tags) + (": " + " | ".join(facts) if facts else ""))
        return "\n".join(lines) if lines else "(none yet)"


@dataclass(frozen=True, slots=True)
class _Key:
    source: str
    clip: int
    caption_sha256: str
    model: str


class _Cache:
    """The JSON Lines record of extraction attempts, one line per attempt.

    Each line: ``{"source", "clip", "caption_sha256", "model", "attempt", "ok", "error",
    "reply", "episodic", "semantic", "equivalences"}`` (``reply``, a failed answer's first
    characters, only on failures). Lines are appended, flushed and fsynced one by one (a
    `linmem.journal.Appender`); a torn last line (a crash mid-write) is skipped and cut off.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[_Key, Extraction] = {}
        self._journal: Appender | None = None
        if path.exists():
            self._read()

    def _read(self) -> None:
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise BadInput(f"{self.path}: cannot read the extraction cache ({e.strerror or e})") from None
        whole = data[: data.rfind(b"\n") + 1]  # a torn last line is skipped (the journal cuts it off)
        for number, line in enumerate(whole.decode("utf-8", errors="replace").splitlines(), start=1):
            if line.strip():
                try:
                    key, extraction = _cache_entry(json.loads(line))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise BadInput(f"{self.path}:{number}: not an extraction cache line ({e})") from None
                if extraction is not None:
                    self.done[key] = extraction

    def __enter__(self) -> _Cache:
        self._journal = Appender(self.path, fsync=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._journal is not None:
            self._journal.close()

    def get(self, key: _Key) -> Extraction | None:
        return self.done.get(key)

    def record(
        self,
        key: _Key,
        attempt: int,
        *,
        extraction: Extraction | None = None,
        error: str | None = None,
        reply: str | None = None,
    ) -> None:
        entry: dict[str, Any] = {
            "source": key.source,
            "clip": key.clip,
            "caption_sha256": key.caption_sha256,
            "model": key.model,
            "attempt": attempt,
            "ok": extraction is not None,
            "error": error,
            **(extraction or Extraction((), ())).to_dict(),
        }
        if reply is not None:
            entry["reply"] = reply[:2000]
        assert self._journal is not None, "record() inside `with cache:`"
        self._journal.write(entry)
        if extraction is not None:
            self.done[key] = extraction


def _cache_entry(entry: Any) -> tuple[_Key, Extraction | None]:
    if not isinstance(entry, dict):
        raise TypeError(f"expected an object, found {type(entry).__name__}")
    key = _Key(str(entry["source"]), int(entry["clip"]), str(entry["caption_sha256"]), str(entry["model"]))
    if entry["ok"] is not True:
        return key, None
    lines = {kind: entry[kind] for kind in LINE_KINDS}
    pairs = entry["equivalences"]
    if not all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in lines.values()):
        raise TypeError("episodic and semantic must be lists of strings")
    if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in pairs):
        raise TypeError("equivalences must be pairs of tags")
    return key, Extraction(
        tuple(lines["episodic"]), tuple(lines["semantic"]), tuple((a, b) for a, b in pairs)
    )


def structure(
    memory: Memory,
    engine: Engine,
    *,
    into: Memory,
    export: str | Path | None = None,
    retries: int = 2,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Extract structured memory from `memory`'s clip items and write its lines into `into`.

    `into` must be empty: the structured lines go in as one commit, all sources or none. Each
    source's graph is saved as ``<cache>/structured/<source>.json`` and, with `export`, as
    ``<export>/<source>.json`` (what ``memory = "structured"`` in an eval config reads). Items
    without a source count as one source named after the memory. The extraction cache lives in
    the memory's cache folder, so a rerun after a failure asks only for the missing clips.
    """
    present = into.state().count
    if present:
        raise BadInput(
            f"memory {into.name!r} already has {present} items; structured lines go into an empty "
            f"memory (delete it with `linmem delete {into.name}` or choose another with --into)"
        )
    items = [i if i.source else replace(i, source=memory.name) for i in memory.items() if i.clip is not None]
    if not items:
        raise BadInput(f"memory {memory.name!r} has no items with a clip number to structure")
    bad = sorted({str(i.source) for i in items if not _safe_stem(str(i.source))})
    if bad:
        raise BadInput(f"source names {bad[:3]} cannot name a graph file (no '/', '\\', '.', '..')")
    folder = memory.cache_dir / "structured"
    graphs = extract(
        items, engine, cache=folder / "extractions.jsonl", retries=retries,
        max_new_tokens=max_new_tokens, progress=progress,
    )  # fmt: skip
    files = []
    for source, graph in graphs.items():
        save_graph(graph, folder / f"{source}.json")
        if export is not None:
            files.append(str(save_graph(graph, Path(export) / f"{source}.json")))
    # The captions know their clips' real times (any clip length); graph files assume 30 s.
    times = {(i.source, i.clip): i.time for i in items if i.time}
    lines = [
        replace(line, time=times.get((source, line.clip), line.time))
        for source, graph in graphs.items()
        for line in graph_items(graph, source)
    ]
    written = into.write(lines)
    return {
        "memory": memory.name,
        "into": into.name,
        "model": engine.id,
        "sources": {s: {"clips": len(clip_lines(g)), "characters": len(set(characters(g).values()))}
                    for s, g in graphs.items()},
        "written": len(written),
        "exported": files,
    }  # fmt: skip


def _safe_stem(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


__all__ = [
    "Extraction",
    "build_graph",
    "characters",
    "clip_lines",
    "extract",
    "graph_items",
    "load_graph",
    "parse_extraction",
    "render_json",
    "save_graph",
    "structure",
    "tag_names",
]
