"""M3-Agent memory graphs (`VideoGraph` pickles) read safely, and their text as M3-Agent shows it.

The released graphs are pickles of ``mmagent.videograph.VideoGraph`` (some web graphs name the
module ``videograph``). Importing ``mmagent`` pulls in GPU face and voice models, and unpickling
runs whatever a pickle names, so `load_graph` uses a restricted unpickler instead: the graph
classes map to inert stand-ins, a few data-only builtins are allowed, numpy array and scalar
reconstruction (embedding vectors, never needed for text) yields an inert `Dropped` placeholder
without running numpy, and anything else is refused with `BadInput`. No foreign module is
imported and no foreign code runs.

Nothing a pickle can name outlives its load or can be changed by it: the stand-in classes are
made afresh for each load and refuse attributes set on them (a pickle's BUILD opcode applied to a
class object would otherwise set class attributes for the rest of the process), the functions are
wrapped so that nothing can be set on them, and the builtin types are immutable. What the pickle
built is then checked to be plain data, and its stand-in objects become linmem's `Graph` and
`Node`, which are never handed to a pickle.

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
from functools import partial
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


class _Frozen(type):
    """Metaclass of the stand-in graph classes. A pickle may instantiate them and fill the
    instances, but state applied to the class itself (BUILD on a class object, which would
    otherwise `setattr` on it) and attribute assignment are refused."""

    def __setstate__(cls, state: Any) -> None:
        raise BadInput(
            f"refused to set state on class {cls.__qualname__}: a graph pickle may only fill instances"
        )

    def __setattr__(cls, name: str, value: Any) -> None:
        raise BadInput(
            f"refused to set {name!r} on class {cls.__qualname__}: a graph pickle may only fill instances"
        )

    def __delattr__(cls, name: str) -> None:
        raise BadInput(f"refused to delete {name!r} from class {cls.__qualname__}")


class _Callable:
    """A function a pickle may name. A plain function has a writable ``__dict__`` and
    ``__defaults__`` that BUILD could change for every later load; this wrapper has no attribute
    dictionary and refuses state."""

    __slots__ = ("_call", "_name")

    def __init__(self, name: str, call: Callable[..., Any]) -> None:
        self._name = name
        self._call = call

    @property
    def name(self) -> str:
        return self._name

    def __call__(self, *args: Any) -> Any:
        return self._call(*args)

    def __setstate__(self, state: Any) -> None:
        raise BadInput(f"refused to set state on {self._name}: a graph pickle may only fill instances")


def _dropped(*args: Any) -> Dropped:
    return Dropped()


def _nested_class(graph_class: type, node_class: type, owner: Any, name: Any) -> type:
    # Protocols 2 and 3 pickle the nested class as getattr(VideoGraph, "Node"); that one lookup
    # is all getattr may do here.
    if owner is graph_class and name == "Node":
        return node_class
    raise BadInput(f"refused getattr({getattr(owner, '__name__', type(owner).__name__)}, {name!r})")


def _latin1(text: Any, encoding: str = "latin1") -> bytes:
    # Protocol 2 pickles bytes as _codecs.encode(text, "latin1").
    if not isinstance(text, str) or encoding != "latin1":
        raise BadInput(f"refused _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


_DROP = _Callable("numpy reconstruction", _dropped)
# The builtin types are immutable (setting an attribute on them raises TypeError), so they can be
# handed out as they are; functions go out wrapped.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "int"): int,
    ("builtins", "bytearray"): bytearray,
    ("collections", "defaultdict"): defaultdict,
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): _Callable("_codecs.encode", _latin1),
    ("numpy", "ndarray"): _DROP,  # only ever an argument of _reconstruct, which ignores it
    ("numpy", "dtype"): _DROP,
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _DROP
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = _DROP
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _DROP

# What a checked graph may hold besides containers and graph objects.
_ATOMS: frozenset[type] = frozenset({str, bytes, bytearray, int, float, bool, type(None), Dropped})
_SEQUENCES: frozenset[type] = frozenset({list, tuple, set, frozenset})
_MAPPINGS: frozenset[type] = frozenset({dict, OrderedDict, defaultdict})
_FACTORIES = (None, list, dict, set, frozenset, int, OrderedDict)  # a defaultdict's default_factory


class _GraphUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        # Fresh stand-ins for every load, so even a way around `_Frozen` could not reach the next load.
        graph = _Frozen("VideoGraph", (), {"__module__": __name__, "__qualname__": "VideoGraph"})
        node = _Frozen("Node", (), {"__module__": __name__, "__qualname__": "VideoGraph.Node"})
        self.stand_ins: dict[type, type] = {graph: Graph, node: Node}
        self._classes = {"VideoGraph": graph, "VideoGraph.Node": node}
        self._getattr = _Callable("builtins.getattr", partial(_nested_class, graph, node))

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocol-2 pickles name builtins the Python 2 way
            module = "builtins"
        if module in GRAPH_MODULES and name in self._classes:
            return self._classes[name]
        if (module, name) == ("builtins", "getattr"):
            return self._getattr
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
        unpickler = _GraphUnpickler(io.BytesIO(data))
        graph = unpickler.load()
        _adopt(graph, unpickler.stand_ins)
    except BadInput as e:
        raise BadInput(f"{path}: {e}") from None
    except Exception as e:  # a corrupt pickle can fail in many ways; all mean "unreadable"
        raise BadInput(f"{path}: not a readable memory-graph pickle ({type(e).__name__}: {e})") from None
    if not isinstance(graph, Graph):
        raise BadInput(f"{path}: expected a pickled VideoGraph, found {type(graph).__name__}")
    if not isinstance(getattr(graph, "nodes", None), dict):
        raise BadInput(f"{path}: the VideoGraph has no 'nodes' dictionary")
    return graph


def _adopt(root: Any, stand_ins: dict[type, type]) -> None:
    """Check that everything `root` reaches is data, and turn this load's stand-in objects into
    `Graph` and `Node` objects in place (their attributes are the instance's own, nothing else)."""
    seen: set[int] = set()
    todo = [root]
    while todo:  # a loop, not recursion: a pickle can nest deeper than the recursion limit
        obj = todo.pop()
        kind = type(obj)
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        todo.extend(part for part in _parts(obj, kind, stand_ins) if type(part) not in _ATOMS)
        if kind in stand_ins:
            obj.__class__ = stand_ins[kind]


def _parts(obj: Any, kind: type, stand_ins: dict[type, type]) -> Iterable[Any]:
    if kind in _ATOMS:
        return ()
    if kind in _SEQUENCES:
        return obj
    if kind in _MAPPINGS:
        if getattr(obj, "default_factory", None) not in _FACTORIES:
            raise BadInput(f"refused a defaultdict of {obj.default_factory!r} in the memory graph")
        if getattr(obj, "__dict__", None):  # an OrderedDict can carry attributes; a graph's never do
            raise BadInput(f"refused a {kind.__name__} with attributes in the memory graph")
        return [*obj.keys(), *obj.values()]
    if kind in stand_ins:
        attrs = vars(obj)
        if not all(type(name) is str for name in attrs):
            raise BadInput(f"refused a {kind.__qualname__} with an attribute name that is not text")
        return attrs.values()
    raise BadInput(
        f"refused {_described(obj)} in the memory graph: it may only hold data "
        "(numbers, text, bytes, containers, graph nodes)"
    )


def _described(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__qualname__}"
    if isinstance(obj, _Callable):
        return f"the function {obj.name}"
    return f"a {type(obj).__qualname__} object"


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
