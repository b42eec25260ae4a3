"""Reports: results.jsonl -> a markdown report with the paper's table layouts, and PNG plots.

Every cell carries its n, and the report ends with the exact config that produced it.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import subprocess
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .. import __version__
from .config import Config

Cell = tuple[float, int]  # mean, n


def write_report(config: Config, out: Path, *, status: str = "") -> Path:
    """Write OUT/report.md (and plots) from OUT/results.jsonl; returns the report path. `status`
    is said first (a partial report says it was interrupted)."""
    from .run import load_records

    records = load_records(out)
    body = render_tables(config, records, out)
    plots = write_plots(config, records, out)
    parts = [
        f"# {config.title}",
        f"**{status}**" if status else "",
        _stand_ins(config),
        config.description,
        _provenance(config, records),
        body,
        *(f"![{p.stem}]({p.name})" for p in plots),
        _changes(config),
        "## Config\n\n```toml\n" + config.text.strip() + "\n```",
    ]
    path = out / "report.md"
    path.write_text("\n\n".join(p for p in parts if p) + "\n", encoding="utf-8")
    return path


def _stand_ins(config: Config) -> str:
    if not config.stand_ins:
        return ""
    lines = "\n".join(f"> - {n}" for n in config.stand_ins)
    head = "> **Offline smoke run: stand-ins, not the real models or data.** The numbers are noise."
    return f"{head}\n>\n{lines}"


def _changes(config: Config) -> str:
    if not config.changes:
        return ""
    lines = "\n".join(f"- {c}" for c in config.changes)
    return f"## Run with changes to the config below\n\n{lines}"


def _provenance(config: Config, records: list[dict[str, Any]]) -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=config.path.parent,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    errors = sum(1 for r in records if r.get("error"))
    return (
        f"linmem {__version__}{' @ ' + commit if commit else ''}, {when}. {len(records)} results"
        f" ({errors} could not be read: context overflow or empty memory, counted as misses). "
        f"Config: `{config.path.name}`. Cells are mean (n)."
    )


def mean_of(records: Iterable[dict[str, Any]], metric: str) -> Cell | None:
    values = [r["metrics"][metric] for r in records if metric in r.get("metrics", {})]
    if not values:
        return None
    return sum(values) / len(values), len(values)


def _pct(cell: Cell | None) -> str:
    return "–" if cell is None else f"{100 * cell[0]:.1f} ({cell[1]})"


def _dec(cell: Cell | None) -> str:
    return "–" if cell is None else f"{cell[0]:.3f} ({cell[1]})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _select(records: list[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    return [r for r in records if all(r.get(k) == v for k, v in where.items())]


def _qa_metric(config: Config) -> str:
    return "judge" if config.judge else "f1"


def _group(r: dict[str, Any]) -> str:
    return r["types"][0] if r.get("types") else ""


def _group_value(group: str) -> float:
    m = re.search(r"[-\d.]+$", group)
    return float(m.group()) if m else math.inf


def render_tables(config: Config, records: list[dict[str, Any]], out: Path | None = None) -> str:
    if config.table == "locomo_answers":
        return _locomo_answers(config, records, out)
    render: Callable[[Config, list[dict[str, Any]]], str] = {
        "main_qa": _main_qa,
        "memory_format": _memory_format,
        "hit_vs_context": _hit_vs_context,
        "summarization": _summarization,
        "linear_models": _linear_models,
        "scalability": _scalability,
        "locomo_qa": _locomo_qa,
        "locomo_retrieval": _locomo_retrieval,
    }[config.table]
    return render(config, records)


def _systems(config: Config) -> list[str]:
    return [s.name for s in config.systems]


def _labels(config: Config) -> list[str]:
    return [t.label for t in config.tasks]


def _main_qa(config: Config, records: list[dict[str, Any]]) -> str:
    metric = _qa_metric(config)
    name = "judge accuracy %" if metric == "judge" else "token F1 %"
    rows = [
        [s, *(_pct(mean_of(_select(records, task=t, system=s), metric)) for t in _labels(config))]
        for s in _systems(config)
    ]
    parts = [f"## End-to-end QA ({name})", _table(["Memory backend", *_labels(config)], rows)]
    parts.append(_breakdown(config, records, metric))
    return "\n\n".join(parts)


def _breakdown(config: Config, records: list[dict[str, Any]], metric: str) -> str:
    """Per question type: a multi-label question counts toward each of its types."""
    parts = []
    for t in _labels(config):
        types = sorted({ty for r in _select(records, task=t) for ty in r.get("types", [])})
        if not types:
            continue
        rows = []
        for ty in types:
            cells = [
                _pct(mean_of([r for r in _select(records, task=t, system=s) if ty in r["types"]], metric))
                for s in _systems(config)
            ]
            rows.append([ty, *cells])
        parts.append(f"### {t} by question type\n\n" + _table(["Type", *_systems(config)], rows))
    return "\n\n".join(parts)


def _memory_format(config: Config, records: list[dict[str, Any]]) -> str:
    metric = _qa_metric(config)
    rows = [
        [t, *(_pct(mean_of(_select(records, task=t, system=s), metric)) for s in _systems(config))]
        for t in _labels(config)
    ]
    return "## Raw captions vs structured memory (accuracy %)\n\n" + _table(
        ["Memory format", *_systems(config)], rows
    )


def _hit_vs_context(config: Config, records: list[dict[str, Any]]) -> str:
    k = 5 if 5 in config.k else max(config.k)
    groups = sorted({_group(r) for r in records}, key=_group_value)
    header = ["Context"] + [f"{t} {s}" for t in _labels(config) for s in _systems(config)]
    rows = []
    for g in groups:
        cells = [
            _pct(mean_of([r for r in _select(records, task=t, system=s) if _group(r) == g], f"hit@{k}"))
            for t in _labels(config)
            for s in _systems(config)
        ]
        rows.append([g.removeprefix("N="), *cells])
    return f"## Exact Hit@{k} vs context length (candidate clips)\n\n" + _table(header, rows)


def _summarization(config: Config, records: list[dict[str, Any]]) -> str:
    header = ["Model", "Accuracy %", "Keyword recall %"] + (["Judge %"] if config.judge else [])
    rows = []
    for s in _systems(config):
        sel = _select(records, system=s)
        row = [s, _pct(mean_of(sel, "keyword_accuracy")), _pct(mean_of(sel, "keyword_recall"))]
        rows.append(row + ([_pct(mean_of(sel, "judge"))] if config.judge else []))
    return "## Summarisation (keyword verification)\n\n" + _table(header, rows)


def _linear_models(config: Config, records: list[dict[str, Any]]) -> str:
    top = max(config.k)
    header = ["Model", f"ExactHit@{top}", f"NearHit@{top}", "MRR"] + [f"R@{k}" for k in config.k if k > 1]
    rows = []
    for s in _systems(config):
        sel = _select(records, system=s)
        cells = [_pct(mean_of(sel, f"hit@{top}")), _pct(mean_of(sel, "near_hit")), _dec(mean_of(sel, "mrr"))]
        cells += [_pct(mean_of(sel, f"recall@{k}")) for k in config.k if k > 1]
        rows.append([s, *cells])
    return "## Clip retrieval by memory model\n\n" + _table(header, rows)


def _scalability(config: Config, records: list[dict[str, Any]]) -> str:
    metric = "judge" if config.judge else "keyword_accuracy"
    groups = sorted({_group(r) for r in records}, key=_group_value)
    rows = []
    for g in groups:
        cells = []
        for s in _systems(config):
            sel = [r for r in _select(records, system=s) if _group(r) == g]
            over = sum(1 for r in sel if r.get("error"))
            cells.append(_pct(mean_of(sel, metric)) + (f", {over} over budget" if over else ""))
        rows.append([g.removeprefix("budget="), *cells])
    largest = []
    for s in _systems(config):
        read = [
            r["tokens"]["memory"]
            for r in _select(records, system=s)
            if not r.get("error") and r.get("tokens")
        ]
        read = [x for x in read if x]
        largest.append(f"{max(read):,}" if read else "–")
    rows.append(["**largest memory read (tokens)**", *largest])
    return "## Context-length scalability (NIAH accuracy % by memory budget in tokens)\n\n" + _table(
        ["Budget", *_systems(config)], rows
    )


def _locomo_qa(config: Config, records: list[dict[str, Any]]) -> str:
    metric = _qa_metric(config)
    cats = [f"category {n}" for n in (1, 2, 3, 4)]
    header = ["System", *(c.replace("category ", "cat ") for c in cats), "cats 1-4", "cat 5 (adversarial)"]
    rows = []
    for s in _systems(config):
        sel = _select(records, system=s)
        per = [_pct(mean_of([r for r in sel if c in r["types"]], metric)) for c in cats]
        main = _pct(mean_of([r for r in sel if "category 5" not in r["types"]], metric))
        adv = _pct(mean_of([r for r in sel if "category 5" in r["types"]], metric))
        rows.append([s, *per, main, adv])
    name = "LLM-judge accuracy %" if metric == "judge" else "token F1 % (LoCoMo's definition per category)"
    return f"## LoCoMo QA ({name})\n\n" + _table(header, rows)


# The seed's comparison on LoCoMo: answers, their costs, and paired differences

_CATS = tuple(f"category {n}" for n in (1, 2, 3, 4))
# LoCoMo F1 at or above this counts as right when the judge's verdicts are set beside it.
F1_RIGHT = 0.5


def _answer_model(r: dict[str, Any]) -> str:
    return str(r.get("controller") or r.get("model") or "–")


def _costs(config: Config, records: list[dict[str, Any]], out: Path | None) -> dict[str, dict[str, float]]:
    """Per system: questions, tokens run per question (reader and controller, the snapshot build
    apart), seconds per question read, and the snapshot builds' tokens and seconds divided
    among the system's questions."""
    from .run import load_prefills

    builds = _builds(load_prefills(out) if out is not None else [])
    keeps = {s.name for s in config.systems if not s.options.get("stateless")}
    costs = {}
    for s in _systems(config):
        sel = [r for r in _select(records, system=s) if not r.get("error")]
        if not sel:
            continue
        n = len(sel)
        read = (
            {(r["task"], r.get("source"), m) for r in sel for m in _built_by(r.get("model"))}
            if s in keeps
            else set()
        )
        built = [builds[k] for k in read if k in builds]
        tokens = [
            (r.get("tokens") or {}).get("processed", 0)
            + (r.get("controller_tokens") or {}).get("processed", 0)
            for r in sel
        ]
        costs[s] = {
            "n": n,
            "tokens": sum(tokens) / n,
            "read_s": sum((r.get("timings") or {}).get("total_s") or 0.0 for r in sel) / n,
            "prefill_tokens": sum(p["tokens"] for p in built) / n,
            "prefill_s": sum(p["seconds"] for p in built) / n,
            "rounds": sum(r.get("rounds") or 0 for r in sel) / n,
        }
    return costs


def _builds(prefills: list[dict[str, Any]]) -> dict[tuple[Any, Any, Any], dict[str, Any]]:
    """The recorded builds by what they built: (task, source, model or embedder id)."""
    return {(p["task"], p["source"], p["model"]): p for p in prefills}


def _built_by(model: Any) -> set[str]:
    """The ids under which what a reader of `model` reads was built: itself, and for the hybrid
    reader (``bm25+EMBEDDER``) its embedder's vectors."""
    if not isinstance(model, str):
        return set()
    return {model, model.removeprefix("bm25+")}


def _locomo_answers(config: Config, records: list[dict[str, Any]], out: Path | None) -> str:
    rows = []
    for s in _systems(config):
        sel = _select(records, system=s)
        models = sorted({_answer_model(r) for r in sel}) or ["–"]
        per = [_pct(mean_of([r for r in sel if c in r["types"]], "f1")) for c in _CATS]
        main = [r for r in sel if "category 5" not in r["types"]]
        row = [s, ", ".join(models), *per, _pct(mean_of(main, "f1"))]
        row.append(_pct(mean_of([r for r in sel if "category 5" in r["types"]], "f1")))
        row.append(_pct(mean_of(sel, "answered")))
        if config.judge:
            judged = [r for r in sel if "judge" in r.get("metrics", {})]
            disagree = [
                float((r["metrics"]["judge"] >= 0.5) != (r["metrics"]["f1"] >= F1_RIGHT)) for r in judged
            ]
            row += [
                _pct(mean_of(judged, "judge")),
                _pct((sum(disagree) / len(disagree), len(disagree)) if disagree else None),
            ]
        rows.append(row)
    header = [
        "System",
        "Answer model",
        *(c.replace("category ", "F1 cat ") for c in _CATS),
        "F1 cats 1-4",
        "cat 5 (abstains)",
        "answered",
    ]
    if config.judge:
        header += ["judge %", "judge ≠ F1 %"]
    parts = [
        "## LoCoMo QA: answers (% , LoCoMo's F1 per category; category 5 scores abstaining)",
        _table(header, rows),
    ]
    if config.judge:
        parts.append(
            f"judge ≠ F1: the share of answers where the judge's verdict and F1 ≥ {F1_RIGHT} disagree "
            "(judge: M3-Bench's prompt, with a local model; report it beside F1, not instead)."
        )
    costs = _costs(config, records, out)
    if costs:
        cost_rows = [
            [
                s,
                str(int(c["n"])),
                f"{c['tokens']:,.0f}",
                f"{c['prefill_tokens']:,.0f}",
                f"{c['read_s']:.2f}",
                f"{c['prefill_s']:.2f}",
                f"{c['read_s'] + c['prefill_s']:.2f}",
                f"{c['rounds']:.1f}" if c["rounds"] else "–",
            ]
            for s, c in costs.items()
        ]
        parts += [
            "## Cost per question",
            _table(
                [
                    "System",
                    "n",
                    "tokens run per question",
                    "built once: tokens, amortised",
                    "s per question",
                    "built once: s, amortised",
                    "s total",
                    "controller rounds",
                ],
                cost_rows,
            ),
            "Per question: what one question ran (its reads, the answer model's prompt). Built once: the "
            "LM reader's snapshot of the conversation, or the embeddings of its turns, made before the "
            "questions and divided among the questions read from it.",
        ]
    parts += _stateless_checks(config, records)
    diffs = []
    for a, b in config.compare:
        est = _paired(records, a, b)
        if est is not None:
            diffs.append(
                f"- {a} − {b}: F1 cats 1-4 {100 * est.mean:+.1f} points, 95% bootstrap interval "
                f"[{100 * (est.low or 0):+.1f}, {100 * (est.high or 0):+.1f}], {est.n} paired questions"
            )
    if diffs:
        parts += ["## Paired differences", "\n".join(diffs)]
    return "\n\n".join(parts)


def _stateless_checks(config: Config, records: list[dict[str, Any]]) -> list[str]:
    """Each stateless LM system against the snapshot system of the same model and settings: the
    answers (greedy, so they must be the same) and the seconds per question on the same ids."""
    lines = []
    for ref in config.systems:
        if ref.backend != "lm" or not ref.options.get("stateless"):
            continue
        same = {k: v for k, v in ref.options.items() if k != "stateless"}
        twins = [
            s
            for s in config.systems
            if s.backend == "lm"
            and not s.options.get("stateless")
            and (s.options, s.agent) == (same, ref.agent)
        ]
        if not twins:
            continue
        full = {r["id"]: r for r in _select(records, system=ref.name) if not r.get("error")}
        snap = {r["id"]: r for r in _select(records, system=twins[0].name) if not r.get("error")}
        both = sorted(set(full) & set(snap))
        if not both:
            continue
        agree = sum(full[i]["prediction"] == snap[i]["prediction"] for i in both)
        t_full = sum(full[i]["timings"]["total_s"] for i in both) / len(both)
        t_snap = sum(snap[i]["timings"]["total_s"] for i in both) / len(both)
        lines.append(
            f"- {ref.name} against {twins[0].name}: the same answer on {agree} of {len(both)} questions; "
            f"{t_full:.1f} s against {t_snap:.2f} s per question ({t_full / max(t_snap, 1e-9):.0f}x)"
        )
    return ["## Snapshot read against stateless read", "\n".join(lines)] if lines else []


def _paired(records: list[dict[str, Any]], a: str, b: str) -> Any:
    from .metrics import paired_difference

    def scores(system: str) -> dict[tuple[str, str], float]:
        return {
            (r["task"], r["id"]): r["metrics"]["f1"]
            for r in _select(records, system=system)
            if "category 5" not in r["types"] and "f1" in r.get("metrics", {})
        }

    sa, sb = scores(a), scores(b)
    both = sorted(set(sa) & set(sb))
    if len(both) < 2:
        return None
    return paired_difference([sa[k] for k in both], [sb[k] for k in both])


def _locomo_retrieval(config: Config, records: list[dict[str, Any]]) -> str:
    cats = sorted({ty for r in records for ty in r.get("types", []) if ty.startswith("category")})
    parts = []
    for s in _systems(config):
        header = ["Category", *(f"Hit@{k}" for k in config.k), "MRR"]
        rows = []
        for label, sel in [(c, [r for r in _select(records, system=s) if c in r["types"]]) for c in cats] + [
            ("cats 1-4", [r for r in _select(records, system=s) if "category 5" not in r["types"]])
        ]:
            cells = [_pct(mean_of(sel, f"hit@{k}")) for k in config.k] + [_dec(mean_of(sel, "mrr"))]
            rows.append([label, *cells])
        parts.append(f"## LoCoMo session retrieval: {s}\n\n" + _table(header, rows))
    return "\n\n".join(parts)


def write_plots(config: Config, records: list[dict[str, Any]], out: Path) -> list[Path]:
    """Accuracy vs context length (when the table has one) and latency vs memory size."""
    if not records:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if config.table in ("hit_vs_context", "scalability"):
        paths.append(_accuracy_vs_context(config, records, out, plt))
    paths.append(_latency_vs_memory(config, records, out, plt))
    if config.table == "locomo_answers":
        paths.append(_accuracy_vs_seconds(config, records, out, plt))
    return paths


def _accuracy_vs_context(config: Config, records: list[dict[str, Any]], out: Path, plt: Any) -> Path:
    if config.table == "hit_vs_context":
        metric = f"hit@{5 if 5 in config.k else max(config.k)}"
        title, shown = "Exact Hit@k vs context length", f"Exact Hit@{metric.removeprefix('hit@')} %"
        xlabel = "candidate clips"
    else:
        metric = "judge" if config.judge else "keyword_accuracy"
        shown = "judge accuracy %" if config.judge else "accuracy % (the answer's keywords)"
        title, xlabel = "NIAH accuracy vs memory size", "memory budget (tokens)"
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in _labels(config):
        for s in _systems(config):
            points = _curve(_select(records, task=t, system=s), metric)
            if points:
                xs, ys = zip(*points, strict=True)
                label = f"{t} {s}" if len(config.tasks) > 1 else s
                ax.plot(xs, [100 * y for y in ys], marker="o", label=label, clip_on=False)
    ax.set_ylim(0, 100)  # a rate: 100% is the top, whatever the points reach
    ax.set(title=title, xlabel=xlabel, ylabel=shown)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out / "accuracy_vs_context.png", plt)


Points = list[tuple[int, float]]  # (memory tokens, seconds)


def latency_points(
    records: list[dict[str, Any]], prefills: list[dict[str, Any]]
) -> dict[str, tuple[Points, Points]]:
    """Per system, (memory tokens, seconds) of its first read of each memory (cold: caches still
    filling) and of its later reads. A record without the memory's size (an agent whose
    controller never searched) takes it from the memory's build in `prefills`; a record with
    neither is left out."""
    built = _builds(prefills)
    points: dict[str, tuple[Points, Points]] = {}
    seen: set[tuple[Any, ...]] = set()
    for r in records:
        size, seconds = _memory_tokens(r, built), (r.get("timings") or {}).get("total_s")
        if size is None or seconds is None:
            continue
        cold, warm = points.setdefault(r["system"], ([], []))
        key = (r["task"], r["system"], r.get("source"))
        (warm if key in seen else cold).append((size, seconds))
        seen.add(key)
    return points


def _latency_vs_memory(config: Config, records: list[dict[str, Any]], out: Path, plt: Any) -> Path:
    from .run import load_prefills

    points = latency_points(records, load_prefills(out))
    fig, ax = plt.subplots(figsize=(6, 4))
    ys_all: list[float] = []
    for i, s in enumerate(_systems(config)):
        colour = f"C{i % 10}"
        cold, warm = points.get(s, ([], []))
        for shown, filled, when in ((cold, False, "first read"), (warm, True, "later reads")):
            if shown:
                xs, ys = zip(*shown, strict=True)
                ys_all += ys
                face = colour if filled else "none"
                ax.scatter(xs, ys, s=14, facecolors=face, edgecolors=colour, label=f"{s}, {when}")
    if ys_all and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 100:
        ax.set_yscale("log")
    if not ys_all:
        ax.text(0.5, 0.5, "no record gives a memory size", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=7)
    ax.set(title="Read latency vs memory size", xlabel="memory tokens (the reader's own)")
    ax.set_ylabel("seconds per question" if any(r.get("trace") for r in records) else "seconds per read")
    ax.grid(alpha=0.3)
    return _save(fig, out / "latency_vs_memory.png", plt)


def _memory_tokens(r: dict[str, Any], built: dict[tuple[Any, Any, Any], dict[str, Any]]) -> int | None:
    size = (r.get("tokens") or {}).get("memory")
    if size:
        return int(size)
    for model in _built_by(r.get("model")):
        if (r["task"], r.get("source"), model) in built:
            return int(built[(r["task"], r.get("source"), model)]["tokens"])
    return None


def _accuracy_vs_seconds(config: Config, records: list[dict[str, Any]], out: Path, plt: Any) -> Path:
    """One point per system: F1 on categories 1-4 against seconds per question (amortised)."""
    costs = _costs(config, records, out)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for s, c in costs.items():
        f1 = mean_of([r for r in _select(records, system=s) if "category 5" not in r["types"]], "f1")
        if f1 is None:
            continue
        x, y = max(1e-3, c["read_s"] + c["prefill_s"]), 100 * f1[0]
        ax.scatter([x], [y], s=30)
        ax.annotate(s, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_ylim(0, 100)
    ax.set(
        title="Answer quality vs cost per question",
        xlabel="seconds per question (snapshot build amortised)",
        ylabel="LoCoMo F1 %, categories 1-4",
    )
    ax.grid(alpha=0.3)
    return _save(fig, out / "accuracy_vs_seconds.png", plt)


def _curve(records: list[dict[str, Any]], metric: str) -> list[tuple[float, float]]:
    by: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if metric in r.get("metrics", {}):
            by[_group(r)].append(r["metrics"][metric])
    return sorted((_group_value(g), sum(v) / len(v)) for g, v in by.items() if _group_value(g) != math.inf)


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
