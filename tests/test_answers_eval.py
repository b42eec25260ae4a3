"""The LoCoMo answers table (`table = "locomo_answers"`): per-system controllers, per-system limits,
snapshot builds recorded apart from the questions, costs, paired differences, the judge beside F1;
with tiny random-weights models on generated data."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from datagen import locomo

from linmem.cli import main
from linmem.errors import BadInput
from linmem.evals.config import load_config
from linmem.evals.metrics import paired_difference
from linmem.evals.run import PREFILLS, RESULTS, run_eval
from linmem.evals.tasks import load_task

CONFIG = """
title = "answers"
table = "locomo_answers"
compare = [["reader → answer", "embedding → answer"]]

[[tasks]]
name = "locomo"
path = "{path}"
conversations = ["conv-0", "conv-1"]
per_category = 2

[[systems]]
name = "reader → answer"
model = "tiny:qwen3.5"
max_new_tokens = 6
agent = {{ policy = "single-shot", controller = "tiny:qwen3", max_new_tokens = 8 }}

[[systems]]
name = "reader, direct"
model = "tiny:qwen3.5"
max_new_tokens = 6
agent = false

[[systems]]
name = "embedding → answer"
backend = "embedding"
embedder = "hash"

[[systems]]
name = "reader, stateless"
model = "tiny:qwen3.5"
max_new_tokens = 6
stateless = true
limit = 2
agent = false

[agent]
policy = "single-shot"
controller = "tiny:qwen3"
max_new_tokens = 8

[judge]
model = "tiny:qwen3"
max_new_tokens = 4
"""


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = locomo(tmp_path / "locomo.json", conversations=3)
    raw = json.loads(path.read_text())
    for i, sample in enumerate(raw):
        sample["sample_id"] = f"conv-{i}"
    path.write_text(json.dumps(raw))
    return path


def records(out: Path, name: str = RESULTS) -> list[dict]:
    return [json.loads(x) for x in (out / name).read_text().splitlines() if x.strip()]


def test_the_answers_table_runs_each_system_its_own_way(tmp_path: Path, data: Path) -> None:
    config = load_config(_write(tmp_path, CONFIG.format(path=data)))
    out = tmp_path / "out"
    run_eval(config, out=out)
    got = records(out)
    task = load_task("locomo", path=str(data), conversations=["conv-0", "conv-1"], per_category=2)
    ids = [e.id for e in task]
    by = {s.name: [r for r in got if r["system"] == s.name] for s in config.systems}
    assert [r["id"] for r in by["reader, direct"]] == ids
    assert [r["id"] for r in by["reader, stateless"]] == ids[:2]  # its own limit
    # The shared [agent] reaches systems without their own; `agent = false` and an own table win.
    assert all(r["controller"] == "tiny:qwen3" and "trace" in r for r in by["embedding → answer"])
    assert all("trace" not in r for r in by["reader, direct"] + by["reader, stateless"])
    assert all(r["trace"]["turns"][-1]["tokens"]["generated"] <= 8 for r in by["reader → answer"])
    # The snapshot of each conversation is built once, before its questions, for the one model.
    # So are the hash embedder's vectors, once for both of the readers that search them.
    builds = records(out, PREFILLS)
    assert sorted((b["model"], b["source"]) for b in builds) == [
        (m, c) for m in ("hash:256", "tiny:qwen3.5") for c in ("conv-0", "conv-1")
    ]
    assert all(b["tokens"] > 0 for b in builds)
    lm_builds = [b for b in builds if b["model"] == "tiny:qwen3.5"]
    assert all(r["tokens"]["processed"] < min(b["tokens"] for b in lm_builds) for r in by["reader, direct"])
    assert all(r["tokens"]["processed"] < 20 for r in by["embedding → answer"])  # the question only
    # A rerun redoes nothing and builds nothing.
    again = run_eval(config, out=out)
    assert (again.written, again.skipped) == (0, len(got)) and len(records(out, PREFILLS)) == 4


def test_the_report_gives_costs_differences_and_the_judge_from_the_records(
    tmp_path: Path, data: Path
) -> None:
    config = load_config(_write(tmp_path, CONFIG.format(path=data)))
    out = tmp_path / "out"
    run_eval(config, out=out)
    report = (out / "report.md").read_text()
    got = records(out)
    # Amortised snapshot seconds: the builds of the conversations a system read, over its questions.
    builds = records(out, PREFILLS)
    for system, model in (("reader, direct", "tiny:qwen3.5"), ("embedding → answer", "hash:256")):
        mine = [r for r in got if r["system"] == system]
        amortised = sum(b["seconds"] for b in builds if b["model"] == model) / len(mine)
        row = _row(report, system, "## Cost per question")
        assert row[5] == f"{amortised:.2f}" and row[1] == str(len(mine)), system
    assert _row(report, "reader, stateless", "## Cost per question")[3] == "0"  # it keeps nothing
    # The paired difference is over the questions both answered, categories 1-4.
    f1 = {
        s: {r["id"]: r["metrics"]["f1"] for r in got if r["system"] == s and "category 5" not in r["types"]}
        for s in ("reader → answer", "embedding → answer")
    }
    both = sorted(f1["reader → answer"])
    est = paired_difference(
        [f1["reader → answer"][i] for i in both], [f1["embedding → answer"][i] for i in both]
    )
    assert f"{100 * est.mean:+.1f} points" in report and f"{est.n} paired questions" in report
    # The judge sits beside F1, with how often the two disagree.
    judged = [r for r in got if r["system"] == "reader, direct"]
    disagree = sum((r["metrics"]["judge"] >= 0.5) != (r["metrics"]["f1"] >= 0.5) for r in judged)
    cells = _row(report, "reader, direct", "## LoCoMo QA")
    assert cells[-1] == f"{100 * disagree / len(judged):.1f} ({len(judged)})"
    assert (out / "accuracy_vs_seconds.png").stat().st_size > 1000


def _row(report: str, system: str, section: str) -> list[str]:
    part = report[report.index(section) :]
    line = next(x for x in part.splitlines() if x.startswith(f"| {system} |"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (
            lambda t: t.replace('"embedding → answer"]]', '"nobody"]]'),
            r"compare names 'nobody', which is not a system of this config",
        ),
        (
            lambda t: t.replace('"embedding → answer"]]', '"embedding → answer", "reader, direct"]]'),
            r"compare must be a list of \[system, system\]",
        ),
        (
            lambda t: t.replace("limit = 2", "limit = 0"),
            r"systems\.3\.limit must be a positive integer, found 0",
        ),
        (lambda t: t.replace("agent = false", 'agent = "m3"'), r"systems\.1\.agent must be a table"),
        (
            lambda t: t.replace("max_new_tokens = 8 }", "max_new_tokens = 8, colour = 1 }"),
            r"systems\.0\.agent: unknown key 'colour'",
        ),
        (lambda t: t.replace('["conv-0", "conv-1"]', '["conv-9"]'), r"no conversation 'conv-9'"),
        (
            lambda t: t.replace("per_category = 2", "per_category = 0"),
            r"per_category must be a positive integer",
        ),
    ],
)
def test_bad_answers_configs_fail_before_any_result(tmp_path: Path, data: Path, edit, pattern: str) -> None:
    path = _write(tmp_path, edit(CONFIG.format(path=data)))
    out = tmp_path / "out"
    with pytest.raises(BadInput, match=pattern):
        run_eval(load_config(path), out=out)
    assert not (out / RESULTS).exists()


def test_unset_lifts_a_subset(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, CONFIG.format(path=data))
    config = load_config(path, unset=["tasks.0.conversations", "tasks.0.per_category"])
    assert "conversations" not in config.tasks[0].options and "--unset tasks.0.per_category" in config.changes
    # List entries go too, each index as the config is written, whatever order they are given.
    names = [s.name for s in load_config(path).systems]
    kept = load_config(path, unset=["systems.1", "systems.3"])
    assert [s.name for s in kept.systems] == [names[0], names[2]] and kept.compare
    assert [s.name for s in load_config(path, unset=["compare.0", "systems.2"]).systems] == names[:2] + names[
        3:
    ]
    with pytest.raises(BadInput, match=r"--unset systems.9: the config has no such key"):
        load_config(path, unset=["systems.9"])
    with pytest.raises(BadInput, match=r"--unset tasks.0.colour: the config has no such key"):
        load_config(path, unset=["tasks.0.colour"])
    code = main(["eval", str(path), "--unset", "tasks.0.nope", "--out", str(tmp_path / "o")])
    assert code != 0 and "no such key" in capsys.readouterr().err


def test_locomo_subsets_keep_the_first_questions_of_each_category(data: Path) -> None:
    full = load_task("locomo", path=str(data))
    sub = load_task("locomo", path=str(data), conversations=["conv-2"], per_category=1)
    expected, seen = [], set()
    for e in full:
        if e.source == "conv-2" and e.meta["category"] not in seen:
            seen.add(e.meta["category"])
            expected.append(e.id)
    assert [e.id for e in sub] == expected and len(expected) == len(seen) > 1


def test_paired_difference_is_the_mean_difference_with_a_bootstrap_interval() -> None:
    rng = random.Random()
    a = [rng.random() for _ in range(401)]
    b = [x - 0.1 + rng.gauss(0, 0.2) for x in a]
    est = paired_difference(a, b)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(diffs) / len(diffs)
    sd = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5
    half = 1.96 * sd / len(diffs) ** 0.5
    assert est.mean == pytest.approx(mean) and est.n == 401
    assert est.low == pytest.approx(mean - half, abs=0.2 * half)
    assert est.high == pytest.approx(mean + half, abs=0.2 * half)
    assert paired_difference(a, b, seed=3) == paired_difference(a, b, seed=3)
    same = paired_difference([0.5] * 7, [0.25] * 7)
    assert (same.mean, same.low, same.high) == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0], [1.0, 0.0])


def _write(folder: Path, text: str) -> Path:
    path = folder / "answers.toml"
    path.write_text(text)
    assert re.search(r"table = \"locomo_answers\"", text)
    return path
