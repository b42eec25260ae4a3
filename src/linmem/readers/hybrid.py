"""The hybrid reader: lexical (BM25 over the log's full-text index) and dense (embedding cosine)
search fused, the fast reader agents search with by default.

Both halves score every unit (a clip, or an item without a clip) of the memory:

- lexical: the item lines ranked by BM25 over the log's FTS5 index (from its in-RAM copy,
  `linmem.readers.bm25`, which gives `Log.search`'s answer faster); a unit scores its
  best line plus `second_line` times its second best, so a clip where the question's words meet
  twice (a question and its answer, two turns apart) outranks one with a single mention;
- dense: the cosine of the query with the unit's best line, from the vectors the embedding
  reader also uses (one `VectorIndex` per memory and embedder, shared).

Each half is divided by its best unit's score and the two are added with weights
`lexical_weight` and 1 - `lexical_weight`. That weighted sum beat reciprocal-rank fusion on the
LoCoMo dev conversations at every weight tried, and so did these aggregations over the whole-clip
text, the sum of a clip's lines, and the mean of its top lines (the README's retrieval table
gives the figures and the command). The two defaults were chosen there by leave-one-conversation-out
cross-validation, which picked the same `second_line` on every fold.

With `rerank="lm"` the LM reader (`model`) reads the `rerank_depth` best clips and ranks them;
its order replaces theirs, and clips it leaves out keep the hybrid order after those it names.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np

from ..embedders import DEFAULT_EMBEDDER, Embedder
from ..errors import BadInput
from ..types import Hit, Item
from .bm25 import LexicalIndex
from .embedding import DEFAULT_TOP_K, EmbeddingReader, _Units, _Vectors, _Work

if TYPE_CHECKING:
    from ..memory import Memory

LEXICAL_WEIGHT = 0.6
SECOND_LINE = 0.25
# Lines the lexical half reads, best first. Lines past it score 0: their BM25 is below that of
# the thousandth line, too low to lift a unit into any answer's top.
LEXICAL_LINES = 1000
RERANK_DEPTH = 20
# Lines from which the dense half scores with int8 first (`linmem.readers.int8`), or None for
# never. Off by default: at 100,000 items `linmem bench --search` measured it slower than the
# exact product (p50 25.8 against 21.3 ms, 1 thread), because its proven bound is loose enough
# to leave many candidates to score exactly again.
QUANTIZE_FROM: int | None = None
RERANKERS = ("lm",)


class HybridReader(EmbeddingReader):
    """Answers with the units that score best on lexical and dense search fused (see the module
    docstring). `read` returns the best `top_k` units with their lines verbatim, `rank` the best
    `k` clip ids; hits carry the fused score, from 0 to 1.

    `embedder` is the dense half (an embedder spec, or a local sentence-transformers folder as
    ``st:/path``); it is loaded at the first read.
    """

    def __init__(
        self,
        memory: Memory,
        *,
        embedder: str | Embedder | None = None,
        top_k: int = DEFAULT_TOP_K,
        lexical_weight: float = LEXICAL_WEIGHT,
        second_line: float = SECOND_LINE,
        rerank: str | None = None,
        model: str | None = None,
        rerank_depth: int = RERANK_DEPTH,
    ) -> None:
        super().__init__(memory, embedder=embedder, top_k=top_k)
        for name, value in (("lexical_weight", lexical_weight), ("second_line", second_line)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise BadInput(f"{name} must be a number from 0 to 1, found {value!r}")
            if not 0 <= value <= 1:
                raise BadInput(f"{name} must be a number from 0 to 1, found {value}")
        if rerank is not None and rerank not in RERANKERS:
            raise BadInput(f"rerank must be one of {', '.join(RERANKERS)} or null, found {rerank!r}")
        if model is not None and rerank is None:
            raise BadInput("model is the re-ranking LM: it needs rerank='lm'")
        if isinstance(rerank_depth, bool) or not isinstance(rerank_depth, int) or rerank_depth < 1:
            raise BadInput(f"rerank_depth must be a positive integer, found {rerank_depth!r}")
        self.lexical_weight = float(lexical_weight)
        self.second_line = float(second_line)
        self.rerank = rerank
        self.rerank_model = model
        self.rerank_depth = rerank_depth
        self._lexicon = LexicalIndex.shared(memory.log.path)

    def __repr__(self) -> str:
        rerank = f", rerank={self.rerank!r}" if self.rerank else ""
        return f"HybridReader({self.memory.name!r}, embedder={self.model_id!r}{rerank})"

    @property
    def model_id(self) -> str:
        dense = self._embedder.id if self._embedder is not None else self._spec or DEFAULT_EMBEDDER
        return f"bm25+{dense}"

    def _prepare(self) -> None:
        # Called once the memory is known not to be empty (see EmbeddingReader._answers).
        self._lexicon.sync(self.memory.log)

    def _search(
        self,
        vectors: _Vectors,
        query: str,
        q: np.ndarray,
        k: int,
        *,
        clips_only: bool,
        exclude: frozenset[int],
    ) -> tuple[list[tuple[Hit, list[Item]]], _Work]:
        units = vectors.units()
        lexical = self._lexical(vectors, units, query)
        eligible = np.ones(len(units.clip), dtype=bool)
        if clips_only:
            eligible &= units.clip >= 0
        if exclude:
            eligible &= ~np.isin(units.clip, list(exclude))
        need = max(k, self.rerank_depth) if self.rerank else k
        dense = self._dense(vectors, units, q, lexical=lexical, eligible=eligible, need=need)
        scores = fuse(lexical, dense, self.lexical_weight)
        order = np.lexsort((units.first_id, units.sort_clip, -scores))
        order = order[eligible[order]]
        work = _Work()
        if self.rerank is not None:
            order, work = self._reranked(query, vectors, units, order, k)
        return [self._hit(vectors, units, int(u), float(scores[u])) for u in order[:k]], work

    def _dense(
        self,
        vectors: _Vectors,
        units: _Units,
        q: np.ndarray,
        *,
        lexical: np.ndarray,
        eligible: np.ndarray,
        need: int,
    ) -> np.ndarray:
        """Each unit's best-line cosine: exact for every unit that can reach the top `need`
        eligible units, and for the best unit (the dense half's divisor); an upper bound on the
        top `need`'s rivals elsewhere (see `linmem.readers.int8`). Exact everywhere below
        `QUANTIZE_FROM` lines (always, by default)."""
        matrix = vectors.matrix()
        fast = vectors.int8() if QUANTIZE_FROM is not None and len(matrix) >= QUANTIZE_FROM else None
        line, bound = (matrix @ q, 0.0) if fast is None else fast.scores(matrix, q)
        dense = np.full(len(units.clip), -np.inf, dtype=np.float32)
        np.maximum.at(dense, units.unit_of_row, line)
        if bound == 0.0:
            return dense
        exact = np.zeros(len(dense), dtype=bool)
        # The best unit is among those within twice the bound of the best estimate.
        self._rescore(
            vectors, units, q, dense, exact, chosen=np.flatnonzero(dense >= dense.max() - 2 * bound)
        )
        top = float(dense.max())
        if top <= 0:
            return dense  # the dense half adds nothing to any score (see `fuse`)
        slack = np.where(exact, 0.0, (1 - self.lexical_weight) * bound / top)
        fused = fuse(lexical, dense, self.lexical_weight)
        lower = np.where(eligible, fused - slack, -np.inf)
        if eligible.sum() > need:
            threshold = np.partition(lower, len(lower) - need)[len(lower) - need]
            rivals = eligible & ~exact & (fused + slack >= threshold)
        else:
            rivals = eligible & ~exact
        self._rescore(vectors, units, q, dense, exact, chosen=np.flatnonzero(rivals))
        return dense

    @staticmethod
    def _rescore(
        vectors: _Vectors,
        units: _Units,
        q: np.ndarray,
        dense: np.ndarray,
        exact: np.ndarray,
        *,
        chosen: np.ndarray,
    ) -> None:
        """Replace the estimates of the `chosen` units by exact float32 cosines."""
        chosen = chosen[~exact[chosen]]
        if not len(chosen):
            return
        rows = units.rows_of_units(chosen)
        matrix = vectors.matrix()
        # Past a third of the rows, one product over all of them is cheaper than gathering.
        cos = matrix[rows] @ q if 3 * len(rows) < len(matrix) else (matrix @ q)[rows]
        dense[chosen] = -np.inf
        np.maximum.at(dense, units.unit_of_row[rows], cos)
        exact[chosen] = True

    def _lexical(self, vectors: _Vectors, units: _Units, query: str) -> np.ndarray:
        """Each unit's lexical score: its best line's BM25 plus `second_line` times its second's."""
        ids, scores = self._lexicon.search_arrays(self.memory.log, query, LEXICAL_LINES)
        rows = vectors.rows_of(ids)
        keep = rows >= 0  # an item written after the vectors were synced: the next read has it
        unit, scores = units.unit_of_row[rows[keep]], scores[keep]
        best = np.zeros(len(units.clip), dtype=np.float64)
        second = np.zeros(len(units.clip), dtype=np.float64)
        # Hits come best first, so a unit's first hit is its best line and its next its second.
        _, first = np.unique(unit, return_index=True)
        best[unit[first]] = scores[first]
        rest = np.ones(len(unit), dtype=bool)
        rest[first] = False
        _, first_of_rest = np.unique(unit[rest], return_index=True)
        second[unit[rest][first_of_rest]] = scores[rest][first_of_rest]
        return best + self.second_line * second

    def _reranked(
        self, query: str, vectors: _Vectors, units: _Units, order: np.ndarray, k: int
    ) -> tuple[np.ndarray, _Work]:
        """`order` with its first `rerank_depth` clips in the order the LM ranks them."""
        clipped = [int(u) for u in order if units.clip[u] >= 0][: self.rerank_depth]
        if len(clipped) < 2:
            return order, _Work()
        start = time.perf_counter()
        reader = self.memory.reader("lm", model=self.rerank_model)
        items = sorted((vectors.items[r] for u in clipped for r in units.rows[u]), key=lambda i: i.id or 0)
        ranked, gen = reader.rank_among(query, items, len(clipped))
        unit_of_clip = {int(units.clip[u]): u for u in clipped}
        named = [unit_of_clip[c] for c in dict.fromkeys(ranked) if c in unit_of_clip]
        taken = set(named)
        new = named + [u for u in clipped if u not in taken]
        slots = iter(new)
        chosen = set(clipped)
        reordered = np.array([next(slots) if int(u) in chosen else int(u) for u in order], dtype=order.dtype)
        note = (
            f"re-ranked the best {len(clipped)} clips with {reader.model_id} ({len(named)} named): "
            f"{gen.processed} tokens read in {time.perf_counter() - start:.2f} s"
        )
        return reordered, _Work(notes=(note,))


def fuse(lexical: np.ndarray, dense: np.ndarray, weight: float) -> np.ndarray:
    """`weight` * lexical / its best + (1 - `weight`) * dense / its best, per unit. A half whose
    best score is not positive (no line shares a word with the query) adds nothing."""
    top_lexical = float(lexical.max()) if len(lexical) else 0.0
    top_dense = float(dense.max()) if len(dense) else 0.0
    fused = np.zeros(len(lexical), dtype=np.float64)
    if top_lexical > 0:
        fused += weight * (lexical / top_lexical)
    if top_dense > 0:
        fused += (1 - weight) * (dense.astype(np.float64) / top_dense)
    return fused


__all__ = ["LEXICAL_LINES", "LEXICAL_WEIGHT", "RERANK_DEPTH", "SECOND_LINE", "HybridReader", "fuse"]
