"""The `linmem` command line: thin adapters over the library, one function per command.

With --json every command prints exactly one JSON object on stdout (errors included, as
{"error": {"code", "message"}}); without it, output is for people.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, progress, prompts
from .errors import BadInput, EmptyMemory, LinmemError
from .itemfile import FORMATS, JSONL_SUFFIXES, read_items_as
from .log import check_id
from .memory import Memory, delete_memory, memories, open_memory, summaries
from .readers import BACKENDS
from .types import Answer


def main(argv: Sequence[str] | None = None) -> int:
    as_program = argv is None  # the console script, not a caller in its own process
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if "--json" in argv:  # a bad command line, too, is one JSON object (argparse's exit status 2)
        _raise_usage_errors(parser)
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        return _fail(argparse.Namespace(json=True), "usage", str(e), status=2)
    args.as_program = as_program
    _quiet_libraries()
    progress.log_lines(True)  # long work off a terminal says how far it is, now and then
    try:
        result = args.run(args)
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        sys.stdout.flush()
    except LinmemError as e:
        return _fail(args, e.code, str(e))
    except KeyboardInterrupt:
        return _fail(args, "interrupted", "interrupted", status=130)  # 128 + SIGINT, as shells report
    except BrokenPipeError:
        # Whoever read the output stopped early (`linmem show NAME | head`): end quietly, as Unix
        # tools do, and keep Python from failing again as it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
    except Exception as e:
        if not args.json:
            raise
        traceback.print_exc()  # a bug: the details go to stderr, the promised JSON object to stdout
        return _fail(args, "internal", f"internal error: {type(e).__name__}: {e}")
    finally:
        _close_opened()
        progress.log_lines(False)  # main() also runs in-process: leave the setting as it was
    return 0


# The memories this command opened: closed when it ends, as when the process exits (main() also
# runs in-process, in tests and from other programs).
_opened: list[Memory] = []


def _open(name: str, home: Path | None, *, create: bool = False) -> Memory:
    memory = open_memory(name, home=home, create=create)
    _opened.append(memory)
    return memory


def _close_opened() -> None:
    while _opened:
        _opened.pop().close()


class _UsageError(Exception):
    """A command line argparse refused, raised instead of printing the usage and exiting."""


def _raise_usage_errors(parser: argparse.ArgumentParser) -> None:
    """Make `parser` and every subcommand's parser raise `_UsageError` where they would exit."""

    def error(message: str) -> NoReturn:
        raise _UsageError(f"{parser.prog}: {message} ({parser.format_usage().strip()})")

    parser.error = error  # type: ignore[method-assign]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _raise_usage_errors(sub)


def _fail(args: argparse.Namespace, code: str, message: str, *, status: int = 1) -> int:
    # A lone surrogate (a file name that is not UTF-8) would make printing the error fail.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": code, "message": message}}, ensure_ascii=False))
    else:
        print(f"linmem: error: {_shown(message)}", file=sys.stderr)
    return status


def _say(message: str) -> None:
    """A note for the person at the terminal (stderr: stdout stays the command's result)."""
    print(_shown(message), file=sys.stderr)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# C0 and C1 control characters other than newline and tab: an ESC or a NUL from a model's answer
# or a caption would drive the terminal. Shown as escapes; what is stored stays as written.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _shown(text: str) -> str:
    """`text` safe to print on a terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _quiet_libraries() -> None:
    # transformers announces every pure-PyTorch kernel fallback; that is expected on CPU.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="linmem",
        description="Long-term memory for LLM agents, read by a linear-attention language model.",
    )
    p.add_argument("--version", action="version", version=f"linmem {__version__}")
    # --home and --json go before the command or after it. The command's copies default to
    # SUPPRESS, so that one left out after the command keeps what was given before it.
    common = argparse.ArgumentParser(add_help=False)
    for parser, home, as_json in ((p, None, False), (common, argparse.SUPPRESS, argparse.SUPPRESS)):
        parser.add_argument(
            "--home",
            type=Path,
            default=home,
            help="memory home folder (default: $LINMEM_HOME or the user data dir)",
        )
        parser.add_argument(
            "--json", action="store_true", default=as_json, help="print exactly one JSON object on stdout"
        )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], Any], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=help, description=help)
        sp.set_defaults(run=run)
        return sp

    w = command("write", cmd_write, "write items from JSONL or text files into a memory (created if new)")
    w.add_argument("name")
    w.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="JSONL (.jsonl), JSON (.json: an array of items) or text (one item per paragraph); "
        "- for stdin. Content that is wholly item objects is read as items whatever the suffix",
    )
    w.add_argument(
        "--format", choices=FORMATS, help="read every FILE in this format (text: store JSON as text)"
    )

    _ingest_command(command)
    _structure_command(command)

    for name, run, what in (
        ("ask", cmd_ask, "answer a question from a memory"),
        ("rank", cmd_rank, "rank the clips of a memory by relevance to a query"),
    ):
        a = command(name, run, what)
        a.add_argument("name")
        a.add_argument(
            "query",
            metavar="QUESTION" if name == "ask" else "QUERY",
            help="the text, or - to read it from stdin",
        )
        _reader_options(a, default="lm" if name == "ask" else "hybrid", top_k=name == "ask")
        if name == "rank":
            a.add_argument("-k", "--top-k", dest="k", type=int, default=5, help="how many clips (default 5)")

    g = command("agent", cmd_agent, "answer a question with a controller model that searches the memory")
    g.add_argument("name")
    g.add_argument("query", metavar="QUESTION")
    g.add_argument("--controller", help="controller model spec: openai:URL#MODEL, hf:REPO_OR_PATH, tiny:NAME")
    g.add_argument(
        "--policy",
        choices=["m3", "single-shot"],
        default="m3",
        help="m3: M3-Agent's search-or-answer loop (default); single-shot: one search, then one answer",
    )
    g.add_argument("--rounds", type=int, default=5, help="most controller replies for m3 (default 5)")
    g.add_argument(
        "--controller-max-tokens",
        type=int,
        default=prompts.CONTROLLER_MAX_TOKENS,
        metavar="N",
        help=f"most tokens per controller reply (default {prompts.CONTROLLER_MAX_TOKENS}); "
        "a reply also ends at the end of its Content: line",
    )
    g.add_argument(
        "--controller-stateless",
        action="store_true",
        help="re-read the whole dialogue every round (the reference; by default a local controller "
        "keeps its state between rounds and gives the same replies)",
    )
    _reader_options(g)

    s = command("show", cmd_show, "show a memory's items and statistics")
    s.add_argument("name")
    s.add_argument("--limit", type=int, default=50, help="items to list (default 50; 0 for all)")

    command("list", cmd_list, "list memories")

    f = command("forget", cmd_forget, "delete items from a memory, or all of them")
    f.add_argument("name")
    f.add_argument("ids", nargs="*", type=int, metavar="ITEM_ID")
    f.add_argument("--all", action="store_true", help="delete every item and every cache of the memory")
    f.add_argument("--yes", "-y", action="store_true", help="with --all: do not ask first on a terminal")

    d = command("delete", cmd_delete, "delete a memory entirely")
    d.add_argument("name")
    d.add_argument("--yes", "-y", action="store_true", help="do not ask first on a terminal")

    _tool_commands(command)

    demo = command("demo", cmd_demo, "write a sample memory and answer questions with both readers")
    demo.add_argument("--model", help="LM reader model spec (default hf:Qwen/Qwen3.5-0.8B)")
    return p


Command = Callable[[str, Callable[[argparse.Namespace], Any], str], argparse.ArgumentParser]


def _ingest_command(command: Command) -> None:
    i = command("ingest", cmd_ingest, "caption videos clip by clip into a memory (resumable)")
    i.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="video file, directory of clips named 0.mp4, 1.mp4, ..., or captions .jsonl",
    )
    i.add_argument("--memory", required=True, metavar="NAME", help="memory to write to (created if new)")
    i.add_argument("--clip-seconds", type=float, default=30.0, help="clip length (default 30)")
    i.add_argument("--fps", type=float, default=1.0, help="frames sampled per second (default 1)")
    i.add_argument("--max-frames", type=int, default=8, help="most frames per clip (default 8)")
    i.add_argument("--frame-size", type=int, default=448, help="longer side of a frame, pixels (default 448)")
    i.add_argument(
        "--captioner", help="VLM spec: hf:REPO_OR_PATH, openai:URL#MODEL (default hf:Qwen/Qwen3.5-0.8B)"
    )
    i.add_argument(
        "--transcriber", help="speech to text: openai:URL#MODEL (/audio/transcriptions); off by default"
    )
    i.add_argument("--max-new-tokens", type=int, default=256, help="caption length limit (default 256)")


def _structure_command(command: Command) -> None:
    st = command(
        "structure",
        cmd_structure,
        "extract M3-Agent-style structured memory (events, facts, characters) from a memory of captions",
    )
    st.add_argument("name", help="memory of clip captions (e.g. from linmem ingest)")
    st.add_argument(
        "--model", required=True, help="chat model spec: openai:URL#MODEL, hf:REPO_OR_PATH, tiny:NAME"
    )
    st.add_argument(
        "--into", metavar="NAME", help="empty memory for the structured lines (default NAME-structured)"
    )
    st.add_argument(
        "--export", type=Path, metavar="DIR", help="also write each source's graph as DIR/<source>.json"
    )
    st.add_argument(
        "--retries", type=int, default=2, help="extra tries for a clip whose answer cannot be parsed"
    )


def _tool_commands(command: Command) -> None:
    """eval, bench, serve and mcp: the commands that run the library as a tool or a server."""
    e = command(
        "eval", cmd_eval, "run an experiment config (a table of the paper), resumably, and write its report"
    )
    e.add_argument("config", type=Path, metavar="CONFIG")
    e.add_argument("--limit", type=int, help="run the first N examples of each task (in the task's order)")
    e.add_argument(
        "--out", type=Path, help="results folder (default eval-out/<config name>, or <config name>-offline)"
    )
    e.add_argument(
        "--offline",
        action="store_true",
        help="swap every remote model for a local stand-in (tiny models, hash embedder): a smoke run",
    )
    e.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. systems.0.model=tiny:qwen3.5 (repeatable)",
    )
    e.add_argument(
        "--unset",
        action="append",
        default=[],
        metavar="KEY",
        help="remove a config value, e.g. tasks.0.per_category to lift a subset (repeatable)",
    )

    b = command(
        "bench", cmd_bench, "measure reads, writes, bytes and kernels on this machine (one JSON line last)"
    )
    b.add_argument("--quick", action="store_true", help="memories of 1k and 4k tokens only (under 2 minutes)")
    b.add_argument("--out", type=Path, help="folder for the PNG plots (default bench-out)")
    b.add_argument(
        "--targets", action="store_true", help="also judge the project's own targets (table and JSON)"
    )
    b.add_argument(
        "--embedding",
        action="store_true",
        help="the first embedding of a memory of 20,000 short lines (--quick: 2,000; --items N) and "
        "what its speed depends on: threads, batch size, padding",
    )
    b.add_argument(
        "--endpoint", metavar="URL#MODEL", help="time reads against a live OpenAI-compatible server"
    )
    b.add_argument(
        "--search",
        action="store_true",
        help="the hybrid reader and full-text index at 100,000 items (--quick: 5,000): search "
        "latency, index build, write cost, RAM",
    )
    b.add_argument(
        "--items", type=int, help="with --search or --embedding: how many items (default 100,000; 20,000)"
    )
    b.add_argument(
        "--agent",
        metavar="CONTROLLER",
        help="the M3 agent with this controller spec (e.g. gguf:qwen2.5-coder-1.5b) run with and "
        "without its kept state: identical traces, controller tokens run per question",
    )
    b.add_argument("--backend", choices=BACKENDS, default="hybrid", help="with --agent: the memory reader")
    b.add_argument("--questions", type=int, default=5, help="with --agent: how many questions (default 5)")
    b.add_argument(
        "--engine",
        metavar="SPEC",
        help="gguf:PATH: the llama.cpp engine against llama.cpp itself; hf:PATH: the transformers "
        "engine against this machine's bandwidth and matmul rate (threads: $LINMEM_THREADS)",
    )

    sv = command("serve", cmd_serve, "serve the HTTP API (FastAPI; OpenAPI spec at /openapi.json)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    sv.add_argument("--token-file", type=Path, help="file holding the bearer token (else $LINMEM_API_KEY)")
    sv.add_argument("--ram-budget-mb", type=int, default=2048, help="RAM for state snapshots (default 2048)")
    _allow_options(sv)

    mc = command(
        "mcp", cmd_mcp, "run the MCP server (tools: memory_write, memory_query, memory_search, memory_list)"
    )
    mc.add_argument(
        "--transport", choices=["stdio", "http"], default="stdio", help="stdio (default) or streamable HTTP"
    )
    mc.add_argument("--host", default="127.0.0.1", help="address for --transport http (default 127.0.0.1)")
    mc.add_argument("--port", type=int, default=8766, help="port for --transport http (default 8766)")
    mc.add_argument(
        "--token-file", type=Path, help="bearer token file for --transport http (else $LINMEM_API_KEY)"
    )
    _allow_options(mc, defaults=False)


def _allow_options(a: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """What a server's clients may choose: a request never names a model or URL of its own."""
    if defaults:
        a.add_argument("--model", metavar="SPEC", help="the LM requests use by default (Qwen3.5-0.8B)")
        a.add_argument("--embedder", metavar="SPEC", help="the embedder requests use by default (MiniLM)")
    more = "(repeatable; the tiny models and hash:DIM embedders always may)"
    a.add_argument("--allow-model", action="append", default=[], metavar="SPEC",
                   help=f"another LM spec requests may choose {more}")  # fmt: skip
    a.add_argument("--allow-embedder", action="append", default=[], metavar="SPEC",
                   help=f"another embedder spec requests may choose {more}")  # fmt: skip


def _reader_options(a: argparse.ArgumentParser, default: str = "lm", *, top_k: bool = True) -> None:
    a.add_argument("--backend", choices=BACKENDS, default=default, help=f"reader (default {default})")
    a.add_argument(
        "--model",
        help="LM spec: hf:REPO_OR_PATH, gguf:PATH_OR_NAME, openai:URL#MODEL, tiny:NAME (default "
        "hf:Qwen/Qwen3.5-0.8B); for the hybrid reader, the re-ranking LM (with --rerank lm)",
    )
    a.add_argument(
        "--embedder", help="embedding spec: st:NAME_OR_PATH or openai:URL#MODEL (default all-MiniLM-L6-v2)"
    )
    a.add_argument(
        "--stateless", action="store_true", help="re-read the whole memory instead of using the snapshot"
    )
    a.add_argument("--max-new-tokens", type=int, help="answer length limit for the LM reader (default 256)")
    a.add_argument("--context-length", type=int, help="cap the LM reader's context (default: the model's)")
    a.add_argument(
        "--overflow",
        choices=["error", "window"],
        help="memory longer than the context: stop (default) or read in windows",
    )
    if top_k:  # rank's own -k/--top-k says how many clips it returns
        a.add_argument("--top-k", type=int, help="clips the embedding or hybrid reader returns (default 3)")
    a.add_argument(
        "--rerank", choices=["lm"], help="hybrid reader: let the LM (--model) re-rank its best clips"
    )
    a.add_argument(
        "--rerank-depth", type=int, help="hybrid reader: how many clips the LM re-ranks (default 20)"
    )
    a.add_argument("--threshold", type=float, help="minimum cosine for the embedding reader (default 0.0)")


def _reader(args: argparse.Namespace) -> tuple[Memory, Any]:
    memory = _open(args.name, args.home)
    if memory.state().count == 0:  # said now, not after a model has taken a minute to load
        raise EmptyMemory.named(memory.name)
    top_k = getattr(args, "top_k", None)
    if args.backend == "embedding":
        options = {"embedder": args.embedder, "top_k": top_k, "threshold": args.threshold}
    elif args.backend == "hybrid":
        options = {
            "embedder": args.embedder,
            "top_k": top_k,
            "rerank": args.rerank,
            "model": args.model,
            "rerank_depth": args.rerank_depth,
        }
    else:
        options = {
            "model": args.model,
            "stateless": args.stateless or None,
            "max_new_tokens": args.max_new_tokens,
            "context_length": args.context_length,
            "overflow": args.overflow,
        }
    return memory, memory.reader(args.backend, **{k: v for k, v in options.items() if v is not None})


def cmd_write(args: argparse.Namespace) -> dict[str, Any]:
    batches = []
    for f in args.files:
        data = sys.stdin.buffer.read() if f == "-" else None
        path = Path("<stdin>" if f == "-" else f)
        items, fmt = read_items_as(path, args.format, data)
        if args.format is None and fmt != "text" and path.suffix.lower() not in (".json", *JSONL_SUFFIXES):
            _say(f"note: {path} holds JSON items: read as {fmt} (--format text stores the raw text)")
        batches.append(items)
    with _target(args.name, args.home) as memory:  # a memory made here goes again if the write fails
        written = memory.write([item for batch in batches for item in batch])
    if not args.json:
        ids = f"id {written[0].id}" if len(written) == 1 else f"ids {written[0].id}-{written[-1].id}"
        print(f"wrote {_plural(len(written), 'item')} to {memory.name} ({ids})")
    state = memory.state()
    return {
        "memory": memory.name,
        "written": len(written),
        "ids": [i.id for i in written],
        "items": state.count,
    }


def cmd_ingest(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from .video import Sampling, ingest

    sampling = Sampling(args.clip_seconds, args.fps, args.max_frames, args.frame_size)
    bar: Any = None

    def progress(n: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=n, unit="clip", desc="captioning", file=sys.stderr, disable=None)
        else:
            bar.update(n)

    try:
        with _target(args.memory, args.home) as memory:
            reports = ingest(
                memory,
                args.sources,
                captioner=args.captioner,
                transcriber=args.transcriber,
                sampling=sampling,
                max_new_tokens=args.max_new_tokens,
                progress=progress,
            )
    finally:
        if bar is not None:
            bar.close()
    if not args.json:
        for r in reports:
            print(
                f"{_shown(r.source)} ({r.kind}): {_plural(r.clips, 'clip')}, {r.written} written to "
                f"{memory.name}, {r.skipped} already there"
            )
    return {"memory": memory.name, "sources": [r.to_dict() for r in reports], "items": memory.state().count}


def cmd_structure(args: argparse.Namespace) -> dict[str, Any]:
    from .engines import load_engine
    from .structured import structure

    memory = _open(args.name, args.home)
    engine = load_engine(args.model)

    def progress(source: str, clip: int, outcome: str) -> None:
        if not args.json and not sys.stderr.isatty():  # a terminal shows the clips' bar instead
            _say(f"{source} clip {clip}: {outcome}")

    with _target(args.into or f"{args.name}-structured", args.home) as into:
        result = structure(memory, engine, into=into, export=args.export,
                           retries=args.retries, progress=progress)  # fmt: skip
    if not args.json:
        for source, info in result["sources"].items():
            print(f"{source}: {info['clips']} clips, {info['characters']} characters")
        print(f"wrote {result['written']} structured lines to {result['into']}")
    return result


@contextmanager
def _target(name: str, home: Path | None) -> Iterator[Memory]:
    """The memory a command writes to, created if new; if the command fails before writing
    anything to a memory it created, the empty memory is removed again."""
    created = name not in memories(home)
    memory = _open(name, home, create=True)
    try:
        yield memory
    except BaseException:
        if created and memory.state().count == 0:
            delete_memory(name, home=home)
        raise


def _query(args: argparse.Namespace) -> str:
    """The question as given, or read from stdin for "-" (a long one does not fit a command line)."""
    if args.query != "-":
        return str(args.query)
    text = sys.stdin.buffer.read().decode("utf-8", "replace").strip()
    if not text:
        raise BadInput("the question read from stdin is empty")
    return text


def cmd_ask(args: argparse.Namespace) -> dict[str, Any]:
    query = _query(args)
    _, reader = _reader(args)
    answer = reader.read(query)
    if not args.json:
        _print_answer(answer)
    return answer.to_dict()


def cmd_rank(args: argparse.Namespace) -> dict[str, Any]:
    query = _query(args)
    memory, reader = _reader(args)
    answer = reader.rank(query, args.k)
    if not args.json:
        if answer.hits:
            for h in answer.hits:
                lines = " / ".join(_shown(line).replace("\n", " / ") for line in h.lines)
                print(f"clip {h.clip}\t{h.score:.3f}\t{lines}")
        elif answer.clips:
            print("clips: " + ", ".join(str(c) for c in answer.clips))
        elif all(i.clip is None for i in memory.items()):
            print(
                f"clips: (none: no item of {memory.name} has a clip id, and rank orders clips; "
                f"linmem ask {memory.name} QUESTION answers from the items' text)"
            )
        else:
            print("clips: (none matched)")
        _print_footer(answer)
    return answer.to_dict()


def cmd_agent(args: argparse.Namespace) -> dict[str, Any]:
    from .agent import Agent, check_settings

    check_settings(args.policy, args.controller, args.rounds)  # before a reader loads its model
    query = _query(args)
    _, reader = _reader(args)
    agent = Agent(
        reader,
        controller=args.controller,
        policy=args.policy,
        rounds=args.rounds,
        max_new_tokens=args.controller_max_tokens,
        reuse_state=not args.controller_stateless,
    )
    trace = agent.run(query)
    if not args.json:
        print(_shown(trace.answer) if trace.answer is not None else "(no answer)")
        c, r = trace.controller_tokens, trace.reader_tokens
        invalid = sum(t.action == "invalid" for t in trace.turns)
        parts = [
            f"{trace.policy}",
            f"controller {trace.controller}",
            f"reader {trace.reader}",
            f"rounds {trace.rounds}"
            + (f" ({invalid} not in M3's format)" if invalid else "")
            + f", searches {trace.searches}",
            f"controller tokens: prompt {c.processed + c.cached} ({c.cached} from kept state), "
            f"completion {c.generated}",
            f"reader tokens: processed {r.processed}, cached {r.cached}",
            f"{trace.total_s:.2f} s",
        ]
        _say("[" + " | ".join(parts) + "]")
    return trace.to_dict()


def _print_answer(answer: Answer) -> None:
    print(_shown(answer.text))
    print()
    _print_footer(answer)


def _print_footer(a: Answer) -> None:
    t = a.tokens
    cited = ", ".join(str(c) for c in a.clips) or "none"
    _say(
        f"[{a.model} | clips: {cited} | tokens: memory {t.memory}, processed {t.processed}, "
        f"cached {t.cached}, generated {t.generated} | {a.timings.total_s:.2f} s]"
    )
    for note in a.notes:
        _say(f"note: {note}")


def cmd_show(args: argparse.Namespace) -> dict[str, Any]:
    memory = _open(args.name, args.home)
    items = memory.items()
    state = memory.state()
    caches = (
        sorted(p for p in memory.cache_dir.rglob("*") if p.is_file()) if memory.cache_dir.is_dir() else []
    )
    stats = {
        "memory": memory.name,
        "path": str(memory.path),
        "items": state.count,
        "clips": len({i.clip for i in items if i.clip is not None}),
        "sources": sorted({i.source for i in items if i.source}),
        "characters": sum(len(i.text) for i in items),
        "log_version": state.version,
        "epoch": state.epoch,
    }
    sizes = {str(p.relative_to(memory.cache_dir)): p.stat().st_size for p in caches}
    shown = items if args.limit == 0 else items[: args.limit]
    if not args.json:
        for k, v in stats.items():
            value = (", ".join(map(_shown, v)) or "(none)") if isinstance(v, list) else _shown(str(v))
            print(f"{k}: {value}")
        print(f"caches: {_plural(len(sizes), 'file')}, {_size(sum(sizes.values()))}")
        for name, size in sizes.items():
            print(f"  {_shown(name)}  {_size(size)}")
        print()
        indent = " " * 32  # where the text column starts: an item's later lines line up under it
        for i in shown:
            tag = f"clip {i.clip}" if i.clip is not None else "note"
            text = _shown(i.text).replace("\n", "\n" + indent)
            print(f"{i.id:>6}  {tag:<9} {_shown(i.time or ''):<13} {text}")
        if len(shown) < len(items):
            print(f"... {len(items) - len(shown)} more (--limit 0 shows all)")
    return stats | {"caches": sizes, "list": [i.to_dict() for i in shown]}


def cmd_list(args: argparse.Namespace) -> dict[str, Any]:
    rows = summaries(args.home)
    if not args.json:
        for r in rows:
            count = (
                _plural(r["items"], "item") if "error" not in r else f"unreadable: {r['error']['message']}"
            )
            print(f"{_shown(r['name'])}\t{count}")
        if not rows:
            print("no memories yet (linmem write NAME FILE, or linmem demo)")
    return {"memories": rows}


def cmd_forget(args: argparse.Namespace) -> dict[str, Any]:
    memory = _open(args.name, args.home)
    if args.all == bool(args.ids):
        raise BadInput("give item ids to forget, or --all (not both)")
    missing: list[int] = []
    if args.all:
        _confirm(args, f"forget all {_plural(memory.state().count, 'item')} of {memory.name}?")
        removed = memory.clear()
    else:
        ids = [check_id(i, "item id") for i in dict.fromkeys(args.ids)]
        present = {i.id for i in memory.items()}
        missing = [i for i in ids if i not in present]
        if len(missing) == len(ids):
            raise BadInput(
                f"{memory.name} has no item {_id_list(missing)}: nothing forgotten "
                f"(linmem show {memory.name} lists the ids)"
            )
        removed = memory.forget(args.ids)
        if missing:
            _say(f"warning: {memory.name} has no item {_id_list(missing)}")
    if not args.json:
        print(f"forgot {_plural(removed, 'item')} from {memory.name}")
    return {"memory": memory.name, "forgotten": removed, "missing": missing, "items": memory.state().count}


def _id_list(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids)


def _confirm(args: argparse.Namespace, question: str) -> None:
    """Ask before destroying data when a person is at a terminal; --yes (or no terminal: a
    script) goes ahead."""
    if args.yes or not sys.stdin.isatty():
        return
    sys.stderr.write(f"{question} [y/N] ")  # stderr: stdout holds only the command's result
    sys.stderr.flush()
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise LinmemError("cancelled: nothing changed")


def cmd_delete(args: argparse.Namespace) -> dict[str, Any]:
    memory = _open(args.name, args.home)
    _confirm(args, f"delete memory {memory.name} and its {_plural(memory.state().count, 'item')}?")
    memory.close()
    delete_memory(args.name, home=args.home)
    if not args.json:
        print(f"deleted memory {args.name}")
    return {"deleted": args.name}


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    import signal
    import threading

    from .evals.config import load_config
    from .evals.run import run_eval

    # Interrupting is how a run is stopped (what is done stays, a partial report is written, the
    # rerun resumes), so SIGINT must reach it: a job started with `&` by a script inherits SIGINT
    # ignored, and `kill -INT` would then do nothing.
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config = load_config(args.config, args.set, args.unset, offline=args.offline)
    # An offline run's noise never lands in (or resumes from) the real run's folder.
    out = args.out or Path("eval-out") / (args.config.stem + ("-offline" if args.offline else ""))
    if args.offline:
        from .evals.config import offline

        config = offline(config, data=out / "standin")  # stand-ins for data that is absent
    outcome = run_eval(config, out=out, limit=args.limit, echo=None if args.json else print)
    report = out / "report.md"
    if not args.json:
        print(f"report: {report}")
    return {
        "out": str(out),
        "report": str(report),
        "written": outcome.written,
        "skipped": outcome.skipped,
        "failed": outcome.failed,
    }


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    if args.agent:
        from .bench_agent import run_agent_bench

        return run_agent_bench(args.agent, backend=args.backend, questions=args.questions, echo=not args.json)
    if args.search:
        from .bench_search import run_search_bench

        return run_search_bench(items=args.items, quick=args.quick, echo=not args.json)
    if args.engine:
        from .bench_llama import run_llama_bench, run_roofline

        if args.engine.startswith(("hf:", "tiny:")):
            return run_roofline(args.engine, echo=not args.json)
        return run_llama_bench(args.engine, quick=args.quick, echo=not args.json)
    if args.embedding:
        from .bench import run_embedding_bench

        return run_embedding_bench(items=args.items, quick=args.quick, echo=not args.json)
    from .bench import run_bench

    out = args.out or Path("bench-out")
    return run_bench(
        quick=args.quick, out=out, endpoint=args.endpoint, with_targets=args.targets, echo=not args.json
    )


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    from .service.core import Allowed, require_serve_extra

    require_serve_extra("linmem serve", ("fastapi", "uvicorn"))
    from .service.http import serve

    allowed = Allowed.of(args.model, args.embedder, args.allow_model, args.allow_embedder)
    serve(home=args.home, host=args.host, port=args.port, token_file=args.token_file,
          ram_budget=args.ram_budget_mb * 2**20, allowed=allowed)  # fmt: skip
    return _stopped(args)


def cmd_mcp(args: argparse.Namespace) -> dict[str, Any]:
    from .service.core import require_serve_extra

    require_serve_extra("linmem mcp", ("mcp", "uvicorn") if args.transport == "http" else ("mcp",))
    from .service.mcp import run

    run(home=args.home, transport=args.transport, host=args.host, port=args.port, token_file=args.token_file,
        allow_models=args.allow_model, allow_embedders=args.allow_embedder)  # fmt: skip
    return _stopped(args)


def _stopped(args: argparse.Namespace) -> dict[str, Any]:
    """A stopped server's process ends here, at once: otherwise the interpreter would wait for the
    reads the stop abandoned and then take seconds tearing down torch. Nothing is lost: every
    write was committed before it was acknowledged. (Called in-process, as `main([...])`, or in
    another thread, the caller's program goes on: that returns.)"""
    import threading

    result = {"stopped": True}
    if not args.as_program or threading.current_thread() is not threading.main_thread():
        return result
    _close_opened()
    if args.json:
        print(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from .demo import run_demo

    return run_demo(home=args.home, model=args.model, echo=not args.json)


if __name__ == "__main__":
    raise SystemExit(main())
