"""M3-Agent memory graphs (`VideoGraph` pickles) read safely, and their text as M3-Agent shows it.

The released graphs are pickles of ``mmagent.videograph.VideoGraph`` (some web graphs name the
module ``videograph``). Importing ``mmagent`` pulls in GPU face and voice models, and unpickling
runs whatever a pickle names, so `load_graph` uses a restricted unpickler instead: the graph
classes map to the inert local `Graph` and `Node`, a few data-only builtins are allowed, numpy
array and scalar reconstruction (embedding vectors, never needed for text) yields an inert
`Dropped` placeholder without running numpy, and anything else is refused with `BadInput`.
No foreign module is imported and no foreign code runs.

`graph_clip_lines` is M3-Agent's text translation: face and voice tags that "Equivalence:"
lines tie together become one ``<character_k>``, the equivalence lines themselves are dropped,
and each clip keeps its episodic and semantic lines in insertion order.
"""

from __future__ import annotations

import io
import pickle
import re
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

from ..errors import BadInput

GRAPH_MODULES = ("mmagent.videograph", "videograph")
TEXT_TYPES = ("episodic", "semantic")

_EQUIVALENCE_RE = re.compile(r"\s*equivalence\s*:", re.IGNORECASE)
_ENTITY_TAG_RE = re.compile(r"<\s*(face|voice)_(\d+)\s*>", re.IGNORECASE)
_ENTITY_WORD_RE = re.compile(r"\b(face|voice)_(\d+)\b", re.IGNORECASE)
_NODE_TYPE_OF_TAG = {"face": "img", "voice": "voice"}


class Node:
    """Stands in for ``VideoGraph.Node``."""

    id: int
    type: str  # img (a face), voice, episodic or semantic
    embeddings: list[Any]
    metadata: dict[str, Any]  # "contents": [text or face crops...], "timestamp": clip id (text nodes)


_Nodes: TypeAlias = dict[int, Node]


class Graph:
    """Stands in for ``VideoGraph``: unpickling fills its attributes and nothing else happens.

    The attributes are whatever the pickle holds; those annotated are the ones M3-Agent writes
    (a graph from another version may lack some, so readers use them defensively).
    """

    Node = Node
    nodes: _Nodes
    edges: dict[tuple[int, int], float]
    text_nodes: list[int]
    text_nodes_by_clip: dict[int, list[int]]


class Dropped:
    """Placeholder for numpy data (embedding vectors and scalars): its state is discarded."""

    def __setstate__(self, state: Any) -> None:
        pass


def _dropped(*args: Any) -> Dropped:
    return Dropped()


def _nested_class(owner: Any, name: Any) -> type[Node]:
    # Protocols 2 and 3 pickle the nested class as getattr(VideoGraph, "Node"); that one lookup
    # is all getattr may do here.
    if owner is Graph and name == "Node":
        return Node
    raise BadInput(f"refused getattr({getattr(owner, '__name__', type(owner).__name__)}, {name!r})")


def _latin1(text: Any, encoding: str = "latin1") -> bytes:
    # Protocol 2 pickles bytes as _codecs.encode(text, "latin1").
    if not isinstance(text, str) or encoding != "latin1":
        raise BadInput(f"refused _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


_GRAPH_CLASSES: dict[str, type] = {"VideoGraph": Graph, "VideoGraph.Node": Node}
_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "int"): int,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "getattr"): _nested_class,
    ("collections", "defaultdict"): defaultdict,
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): _latin1,
    ("numpy", "ndarray"): Dropped,
    ("numpy", "dtype"): _dropped,
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _dropped
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = _dropped
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _dropped


class _GraphUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocol-2 pickles name builtins the Python 2 way
            module = "builtins"
        if module in GRAPH_MODULES and name in _GRAPH_CLASSES:
            return _GRAPH_CLASSES[name]
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise BadInput(
            f"refused to load {module}.{name}: a memory graph may only hold VideoGraph data "
            f"({', '.join(m + '.VideoGraph' for m in GRAPH_MODULES)}, plain containers, numpy arrays)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise BadInput("refused a persistent id: memory graphs have none")


def load_graph(path: str | Path) -> Graph:
    """Read a VideoGraph pickle into a `Graph` without importing or running foreign code."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadInput(f"{path}: cannot read the memory graph ({e.strerror or e})") from None
    try:
        graph = _GraphUnpickler(io.BytesIO(data)).load()
    except BadInput as e:
        raise BadInput(f"{path}: {e}") from None
    except Exception as e:  # a corrupt pickle can fail in many ways; all mean "unreadable"
        raise BadInput(f"{path}: not a readable memory-graph pickle ({type(e).__name__}: {e})") from None
    if not isinstance(graph, Graph):
        raise BadInput(f"{path}: expected a pickled VideoGraph, found {type(graph).__name__}")
    if not isinstance(getattr(graph, "nodes", None), dict):
        raise BadInput(f"{path}: the VideoGraph has no 'nodes' dictionary")
    return graph


def character_mappings(graph: Graph) -> dict[str, str]:
    """``{"face_3": "character_0", "voice_7": "character_0", ...}`` recomputed from the graph.

    Union-find over the entity tags of every "Equivalence:" semantic line (tags that name no face
    or voice node of the graph are ignored, as in M3-Agent). Characters are numbered by first
    appearance in those lines, then the remaining face and voice nodes in node order, so the
    numbering is deterministic (M3-Agent's depends on set iteration order).
    """
    nodes = _nodes(graph)
    parent: dict[str, str] = {}

    def find(tag: str) -> str:
        parent.setdefault(tag, tag)
        while parent[tag] != tag:
            parent[tag] = parent[parent[tag]]
            tag = parent[tag]
        return tag

    for node in _text_nodes(graph):
        text = _content(node)
        if getattr(node, "type", None) != "semantic" or text is None or not _EQUIVALENCE_RE.match(text):
            continue
        tags = [t for t in _entity_tags(text) if _is_entity(nodes, t)]
        for tag in tags[1:]:
            root_a, root_b = find(tags[0]), find(tag)
            if root_a != root_b:
                parent[root_b] = root_a
    ordered = list(parent)
    for node_id, node in nodes.items():
        prefix = {"img": "face", "voice": "voice"}.get(getattr(node, "type", None) or "")
        if prefix and f"{prefix}_{node_id}" not in parent:
            ordered.append(f"{prefix}_{node_id}")
    names: dict[str, str] = {}
    mapping: dict[str, str] = {}
    for tag in ordered:
        root = find(tag)
        names.setdefault(root, f"character_{len(names)}")
        mapping[tag] = names[root]
    return mapping


def translate(text: str, mapping: dict[str, str]) -> str:
    """`text` with every ``face_i`` / ``voice_j`` of `mapping` (tagged or bare) replaced by its character."""

    def swap(m: re.Match[str]) -> str:
        return mapping.get(f"{m.group(1).lower()}_{m.group(2)}", m.group(0))

    return _ENTITY_WORD_RE.sub(swap, text)


def graph_clip_lines(graph: Graph) -> dict[int, list[tuple[str, str]]]:
    """Clip id -> ``[(kind, line)]`` in insertion order, kind "episodic" or "semantic", lines
    translated to character ids, equivalence lines dropped; clips in ascending order."""
    mapping = character_mappings(graph)
    out: dict[int, list[tuple[str, str]]] = {}
    for clip, node in _nodes_by_clip(graph):
        text = _content(node)
        kind = getattr(node, "type", None)
        if text is None or kind not in TEXT_TYPES or _EQUIVALENCE_RE.match(text):
            continue
        line = " ".join(translate(text, mapping).split())
        if line:
            out.setdefault(clip, []).append((str(kind), line))
    return dict(sorted(out.items()))


def _nodes(graph: Graph) -> dict[Any, Any]:
    nodes = getattr(graph, "nodes", None)
    return nodes if isinstance(nodes, dict) else {}


def _text_nodes(graph: Graph) -> Iterator[Any]:
    nodes = _nodes(graph)
    order = getattr(graph, "text_nodes", None)
    ids: Iterable[Any] = order if isinstance(order, list) else nodes.keys()
    for node_id in ids:
        node = nodes.get(node_id)
        if getattr(node, "type", None) in TEXT_TYPES:
            yield node


def _nodes_by_clip(graph: Graph) -> Iterator[tuple[int, Any]]:
    """(clip, text node) pairs: from ``text_nodes_by_clip`` when the graph has it, else from each
    text node's ``metadata["timestamp"]`` (its clip id)."""
    nodes = _nodes(graph)
    by_clip = getattr(graph, "text_nodes_by_clip", None)
    if isinstance(by_clip, dict):
        for clip, ids in by_clip.items():
            for node_id in ids if isinstance(ids, list) else ():
                if node_id in nodes:
                    yield _clip_id(clip), nodes[node_id]
        return
    for node in _text_nodes(graph):
        metadata = getattr(node, "metadata", None)
        clip = metadata.get("timestamp") if isinstance(metadata, dict) else None
        if clip is not None:
            yield _clip_id(clip), node


def _clip_id(value: Any) -> int:
    try:
        clip = int(value)
    except (TypeError, ValueError):
        raise BadInput(f"memory graph clip id {value!r} is not an integer") from None
    if clip < 0:
        raise BadInput(f"memory graph clip id {clip} is negative")
    return clip


def _content(node: Any) -> str | None:
    metadata = getattr(node, "metadata", None)
    contents = metadata.get("contents") if isinstance(metadata, dict) else None
    if isinstance(contents, list) and contents and isinstance(contents[0], str):
        return contents[0]
    return None


def _entity_tags(text: str) -> list[str]:
    return list(dict.fromkeys(f"{m.group(1).lower()}_{m.group(2)}" for m in _ENTITY_TAG_RE.finditer(text)))


def _is_entity(nodes: dict[Any, Any], tag: str) -> bool:
    prefix, _, number = tag.partition("_")
    node = nodes.get(int(number))
    return node is not None and getattr(node, "type", None) == _NODE_TYPE_OF_TAG[prefix]
