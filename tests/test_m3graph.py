"""Hostile M3-Agent graph pickles cannot change linmem for the loads that follow (issue 10).

A pickle's BUILD opcode applied to a class (or function) object sets attributes on it. If the
restricted unpickler handed out linmem's own classes, a pickle could, without running any code,
make every later graph of the process read lines it planted. The payloads here are written
opcode by opcode, the way an attacker would.
"""

from __future__ import annotations

import pickle
import sys
import types
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from linmem.errors import BadInput
from linmem.evals import m3graph
from linmem.evals.m3graph import Dropped, Graph, Node, graph_clip_lines, load_graph

CLEAN_LINES = {
    0: [("episodic", "<character_0> opens the fridge.")],
    1: [("semantic", "<character_0> likes milk.")],
}
VIDEOGRAPH = b"cmmagent.videograph\nVideoGraph\n"
NODE = b"cmmagent.videograph\nVideoGraph.Node\n"
NODE_BY_GETATTR = b"cbuiltins\ngetattr\n(" + VIDEOGRAPH + b"VNode\ntR"  # protocol 2's spelling
DTYPE = b"cnumpy\ndtype\n"  # a callable the loader allows: a numpy placeholder maker


def text(value: str) -> bytes:
    return b"V" + value.encode("raw_unicode_escape") + b"\n"


def pairs(**items: bytes) -> bytes:
    """A dict literal: EMPTY_DICT, then SETITEM for each key and (already encoded) value."""
    return b"}" + b"".join(text(k) + v + b"s" for k, v in items.items())


def set_on(target: bytes, **attrs: bytes) -> bytes:
    """Push `target`, BUILD it with state (None, attrs) — the slot-state form, applied with
    setattr — then pop it: what remains is only the side effect."""
    return target + b"(N" + pairs(**attrs) + b"tb0"


def injected_node() -> bytes:
    metadata = pairs(contents=b"(" + text("INJECTED: the butler did it.") + b"l", timestamp=b"I0\n")
    return NODE + b")\x81" + pairs(id=b"I0\n", type=text("episodic"), metadata=metadata) + b"b"


EMPTY_GRAPH = VIDEOGRAPH + b")\x81" + pairs(nodes=b"}") + b"b."  # a valid result after the payload

HOSTILE = {
    # Replace the graph's __setstate__ by a callable that discards state and plant class-level
    # nodes: every later graph then loads empty and reads the planted line instead.
    "graph class hijacked": set_on(VIDEOGRAPH, __setstate__=DTYPE, nodes=b"}I0\n" + injected_node() + b"s")
    + EMPTY_GRAPH,
    "node class attribute": set_on(NODE, injected=text("x"), type=text("episodic")) + EMPTY_GRAPH,
    "nested node class via getattr": set_on(NODE_BY_GETATTR, injected=text("x")) + EMPTY_GRAPH,
    "graph class dict state": VIDEOGRAPH + pairs(injected=text("x")) + b"b0" + EMPTY_GRAPH,
    "allowed function": DTYPE + pairs(injected=text("x")) + b"b0" + EMPTY_GRAPH,
    "allowed function defaults": set_on(b"c_codecs\nencode\n", __defaults__=b"(" + text("utf-8") + b"t")
    + EMPTY_GRAPH,
    "builtin type": set_on(b"cbuiltins\nlist\n", injected=text("x")) + EMPTY_GRAPH,
    "OrderedDict type": set_on(b"ccollections\nOrderedDict\n", injected=text("x")) + EMPTY_GRAPH,
}


def _state() -> dict[str, Any]:
    """What a pickle must not be able to change: linmem's graph classes and every function and
    class of the module, as attribute snapshots."""
    snapshot: dict[str, Any] = {}
    for name, obj in vars(m3graph).items():
        if isinstance(obj, type | types.FunctionType):
            snapshot[name] = (dict(vars(obj)), getattr(obj, "__defaults__", None))
    for kind in (list, dict, set, frozenset, int, bytearray, OrderedDict, defaultdict):
        snapshot[f"type {kind.__qualname__}"] = dict(vars(kind))
    return snapshot


BEFORE = _state()


@pytest.fixture(autouse=True)
def restore_classes() -> Iterator[None]:
    """Undo anything a payload managed to set, so a failure here cannot spread to other tests."""
    yield
    for name, obj in vars(m3graph).items():
        if isinstance(obj, type | types.FunctionType):
            attrs, defaults = BEFORE[name]
            for attr in set(vars(obj)) - set(attrs):
                delattr(obj, attr)
            if isinstance(obj, types.FunctionType):
                obj.__defaults__ = defaults


@contextmanager
def videograph_module() -> Iterator[type]:
    """M3-Agent's VideoGraph shape, importable as mmagent.videograph only while pickling."""

    class VideoGraph:
        class Node:
            def __init__(self, node_id: int, node_type: str) -> None:
                self.id, self.type = node_id, node_type
                self.embeddings: list[Any] = [[0.5, 0.25]]
                self.metadata: dict[str, Any] = {}

    VideoGraph.__module__ = VideoGraph.Node.__module__ = "mmagent.videograph"
    VideoGraph.__qualname__, VideoGraph.Node.__qualname__ = "VideoGraph", "VideoGraph.Node"
    package, module = types.ModuleType("mmagent"), types.ModuleType("mmagent.videograph")
    module.VideoGraph = VideoGraph  # type: ignore[attr-defined]
    package.videograph = module  # type: ignore[attr-defined]
    sys.modules.update({"mmagent": package, "mmagent.videograph": module})
    try:
        yield VideoGraph
    finally:
        del sys.modules["mmagent"], sys.modules["mmagent.videograph"]


def clean_graph(path: Path, protocol: int) -> Path:
    with videograph_module() as VideoGraph:
        g = VideoGraph()
        g.nodes, g.edges, g.text_nodes = {}, {}, []
        g.text_nodes_by_clip = defaultdict(list)
        for node_id, kind, line, clip in [
            (0, "img", "base64-face", None),
            (1, "episodic", "<face_0> opens the fridge.", 0),
            (2, "semantic", "<face_0> likes milk.", 1),
        ]:
            node = VideoGraph.Node(node_id, kind)  # type: ignore[attr-defined]
            node.metadata["contents"] = [line]
            if clip is not None:
                node.metadata["timestamp"] = clip
                g.text_nodes.append(node_id)
                g.text_nodes_by_clip[clip].append(node_id)
            g.nodes[node_id] = node
        path.write_bytes(pickle.dumps(g, protocol=protocol))
    return path


def test_the_handcrafted_pickles_are_well_formed(tmp_path: Path) -> None:
    # Each payload ends in an ordinary empty graph: without it the loader would refuse the
    # payloads for a trivial reason and the tests below would prove nothing.
    path = tmp_path / "empty.pkl"
    path.write_bytes(EMPTY_GRAPH)
    graph = load_graph(path)
    assert type(graph) is Graph and graph.nodes == {} and graph_clip_lines(graph) == {}


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("payload", list(HOSTILE), ids=list(HOSTILE))
def test_a_hostile_graph_cannot_change_later_loads(tmp_path: Path, payload: str, protocol: int) -> None:
    hostile = tmp_path / "hostile.pkl"
    hostile.write_bytes(HOSTILE[payload])
    try:
        load_graph(hostile)
        refusal = ""
    except BadInput as e:
        refusal = str(e)
    graph = load_graph(clean_graph(tmp_path / "clean.pkl", protocol))
    assert graph_clip_lines(graph) == CLEAN_LINES  # no planted line
    assert _state() == BEFORE
    assert not hasattr(Graph, "injected") and not hasattr(Node, "injected")
    assert refusal.startswith(f"{hostile}: refused") or refusal.startswith(f"{hostile}: not a readable")
    assert type(graph) is Graph and {type(n) for n in graph.nodes.values()} == {Node}
    assert vars(graph).keys() == {"nodes", "edges", "text_nodes", "text_nodes_by_clip"}


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (
            b"(lp0\n" + VIDEOGRAPH + b"a.",
            r"refused the class VideoGraph in the memory graph",
        ),  # a class as data
        (VIDEOGRAPH + b")\x81" + pairs(nodes=b"}I0\ncbuiltins\nlist\ns") + b"b.", r"refused the class list"),
        (
            VIDEOGRAPH + b")\x81" + pairs(nodes=b"}", extra=DTYPE) + b"b.",
            r"refused the function numpy reconstruction",
        ),
        (
            VIDEOGRAPH
            + b")\x81"
            + pairs(nodes=b"}", by=b"ccollections\ndefaultdict\n" + DTYPE + b"\x85R")
            + b"b.",
            r"refused a defaultdict of",
        ),
    ],
    ids=["class", "builtin type", "function", "defaultdict factory"],
)
def test_a_graph_holds_only_data(tmp_path: Path, data: bytes, pattern: str) -> None:
    path = tmp_path / "x.pkl"
    path.write_bytes(data)
    with pytest.raises(BadInput, match=pattern):
        load_graph(path)


def test_a_deeply_nested_pickle_is_checked_without_recursion(tmp_path: Path) -> None:
    depth = 200_000  # far past the recursion limit: the check walks the data with a loop
    path = tmp_path / "deep.pkl"
    path.write_bytes(b"]" * depth + b"a" * (depth - 1) + b".")
    with pytest.raises(BadInput, match=r"expected a pickled VideoGraph, found list"):
        load_graph(path)


def test_placeholders_and_shared_nodes_survive_the_check(tmp_path: Path) -> None:
    # The same node reached twice (a dict value and an edge key) becomes one linmem Node.
    node = NODE + b")\x81" + pairs(type=text("img")) + b"bp0\n"
    edges = b"}(I0\ng0\ntF1.0\ns"
    embeddings = b"(" + DTYPE + b"(tRl"
    data = VIDEOGRAPH + b")\x81" + pairs(nodes=b"}I0\n" + node + b"s", edges=edges, emb=embeddings) + b"b."
    path = tmp_path / "shared.pkl"
    path.write_bytes(data)
    graph = load_graph(path)
    ((key, weight),) = graph.edges.items()
    assert key[1] is graph.nodes[0] and type(key[1]) is Node and weight == 1.0
    assert [type(x) for x in vars(graph)["emb"]] == [Dropped]
