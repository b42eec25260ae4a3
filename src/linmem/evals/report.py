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


def write_report(config: Config, out: Path) -> Path:
    """Write OUT/report.md (and plots) from OUT/results.jsonl; returns the report path."""
    from .run import load_records

    records = load_records(out)
    body = render_tables(config, records)
    plots = write_plots(config, records, out)
    parts = [
        f"# {config.title}",
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


def render_tables(config: Config, records: list[dict[str, Any]]) -> str:
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
        metric = (
            f"hit@{5 if 5 in config.k else max(config.k)}"
            if config.table == "hit_vs_context"
            else ("judge" if config.judge else "keyword_accuracy")
        )
        fig, ax = plt.subplots(figsize=(6, 4))
        for t in _labels(config):
            for s in _systems(config):
                points = _curve([r for r in _select(records, task=t, system=s)], metric)
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(
                        xs,
                        [100 * y for y in ys],
                        marker="o",
                        label=f"{t} {s}" if len(config.tasks) > 1 else s,
                    )
        ax.set_xlabel("candidate clips" if config.table == "hit_vs_context" else "memory budget (tokens)")
        ax.set_ylabel(f"{metric} %")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        paths.append(_save(fig, out / "accuracy_vs_context.png", plt))
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in _systems(config):
        pts = [
            (r["tokens"]["memory"], r["timings"]["total_s"])
            for r in _select(records, system=s)
            if r.get("tokens") and r["tokens"].get("memory") and r.get("timings")
        ]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, s=8, label=s)
            if min(ys) > 0 and max(ys) / min(ys) > 100:
                ax.set_yscale("log")
    ax.set_xlabel("memory tokens")
    ax.set_ylabel("seconds per read")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "latency_vs_memory.png", plt))
    return paths


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
