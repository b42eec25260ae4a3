"""Text for the log's full-text index, and safe FTS5 queries built from a user's question.

The index is SQLite FTS5 with the ``porter unicode61 remove_diacritics 2`` tokenizer: Unicode
word splitting, case and diacritics folded ("Café" finds "cafe"), English suffixes stemmed
("hiking" finds "hike"). Two things it does not do well on its own are handled here:

- Scripts written without spaces (Chinese, Japanese kana and kanji) would be one token per run
  of characters, so a question could only match a whole run. Their characters are indexed one
  by one (`document`), and a query asks for each adjacent pair as a phrase, which is how
  bigram indexes for those scripts rank.
- A question is not an FTS5 query: ``"``, ``*``, ``NEAR``, ``AND``, ``col:`` and parentheses
  are syntax. `match` never passes the user's text through as syntax: every term is a quoted
  string, so whatever the user typed is searched for as words, and nothing else.

Common English function words are dropped from queries (never from documents): BM25 gives them
almost no weight anyway, and their long posting lists are what make an OR query slow.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import unicodedata

# The log's tokenizer (`linmem.log` builds its index with it). Changing it is a schema change.
TOKENIZER = "porter unicode61 remove_diacritics 2"

# Characters indexed one by one: CJK ideographs (with extensions and compatibility forms),
# hiragana, katakana, and the CJK symbols block.
_SPACELESS = (
    "\u3040-\u30ff"  # hiragana, katakana
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\U00020000-\U0003134f"  # CJK extensions B to G
)
_SPACELESS_RE = re.compile(f"[{_SPACELESS}]")
_SPACELESS_RUN_RE = re.compile(f"[{_SPACELESS}]+")
# A term as unicode61 sees one: letters, digits and marks of any script.
_WORD_RE = re.compile(r"[^\W_]+")

# Queries keep at most this many distinct terms (the first ones). A 100 kB paste would otherwise
# become thousands of OR-ed terms, each a posting list to read.
MAX_TERMS = 64

# English function words and question words: facts of the language, chosen for search (a word
# such as "first" or "last" that can carry meaning stays).
STOPWORDS = frozenset(
    """a an and are as at be been being but by can could did do does doing done for from had has
    have having he her here hers him his how i if in into is it its itself just me my of on or
    our ours she so some such than that the their theirs them then there these they this those
    to too us was we were what when where which who whom whose why will with would you your
    yours about also any am because both each few more most no nor not only other own same
    should very s t d ll m re ve""".split()
)


def document(text: str) -> str:
    """The text the index stores for an item: `text` with spaceless-script characters apart."""
    if not _SPACELESS_RE.search(text):
        return text
    return _SPACELESS_RE.sub(lambda m: f" {m.group(0)} ", text)


def terms(query: str) -> list[str]:
    """The query's search terms, in order, each once: words without the stopwords (all words if
    they are all stopwords), and adjacent pairs of spaceless-script characters."""
    folded = unicodedata.normalize("NFKC", query).casefold()
    found: list[str] = []
    plain: list[str] = []
    for word in _WORD_RE.findall(folded):
        for piece in _split_spaceless(word):
            if _SPACELESS_RE.match(piece):
                found += _pairs(piece)
            else:
                plain.append(piece)
    content = [w for w in plain if w not in STOPWORDS]
    found += content if content else plain
    return list(dict.fromkeys(found))[:MAX_TERMS]


def match(query: str) -> str | None:
    """An FTS5 MATCH expression for `query`: its terms as quoted strings joined by OR; None when
    the query has no terms (empty, punctuation only, emoji only)."""
    quoted = [_quote(t) for t in terms(query)]
    return " OR ".join(quoted) if quoted else None


def tokens(texts: list[str]) -> list[list[str]]:
    """Each text as the index's tokens, in order: FTS5's own tokenizer, run on a scratch table
    in memory, so the result is exactly what the log's index holds for that text ("Hiking"
    gives ["hike"], "don't" gives ["don", "t"])."""
    if not texts:
        return []
    with _scratch_lock:
        db = _scratch()
        db.execute("BEGIN")
        try:
            db.executemany("INSERT INTO scratch (rowid, text) VALUES (?, ?)", enumerate(texts, 1))
            found = db.execute("SELECT doc, term FROM scratch_terms ORDER BY doc, offset").fetchall()
        finally:
            db.execute("ROLLBACK")  # the table stays empty
    out: list[list[str]] = [[] for _ in texts]
    for doc, term in found:
        out[doc - 1].append(term)
    return out


_scratch_lock = threading.Lock()
_scratch_db: list[sqlite3.Connection] = []  # one connection, made at first use


def _scratch() -> sqlite3.Connection:
    if not _scratch_db:
        db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        db.execute(f"CREATE VIRTUAL TABLE scratch USING fts5(text, tokenize='{TOKENIZER}')")
        db.execute("CREATE VIRTUAL TABLE scratch_terms USING fts5vocab(scratch, instance)")
        _scratch_db.append(db)
    return _scratch_db[0]


def _split_spaceless(word: str) -> list[str]:
    """`word` cut into runs of spaceless-script characters and runs of everything else."""
    if not _SPACELESS_RE.search(word):
        return [word]
    pieces: list[str] = []
    last = 0
    for m in _SPACELESS_RUN_RE.finditer(word):
        if m.start() > last:
            pieces.append(word[last : m.start()])
        pieces.append(m.group(0))
        last = m.end()
    if last < len(word):
        pieces.append(word[last:])
    return pieces


def _pairs(run: str) -> list[str]:
    """A spaceless run as the phrases the index can match: adjacent character pairs, or the one
    character of a run of one. A phrase is written with spaces: "北 京" is 北 followed by 京."""
    if len(run) == 1:
        return [run]
    return [f"{a} {b}" for a, b in zip(run, run[1:], strict=False)]


def _quote(term: str) -> str:
    # Inside an FTS5 string only '"' is special, and it is escaped by doubling.
    return '"' + term.replace('"', '""') + '"'


__all__ = ["MAX_TERMS", "STOPWORDS", "TOKENIZER", "document", "match", "terms", "tokens"]
