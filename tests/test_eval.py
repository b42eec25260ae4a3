"""`linmem eval`: configs, the resumable runner, reports and plots, on generated data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datagen import locomo, m3bench
from openai_server import OpenAIServer

from linmem import prompts
from linmem.cli import main
from linmem.errors import BadInput
from linmem.evals.config import load_config
from linmem.evals.run import RESULTS, run_eval, tokens_under_budget
from linmem.memory import memories, open_memory


def write_config(folder: Path, text: str, name: str = "exp.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / RESULTS).read_text().splitlines() if x.strip()]


@pytest.fixture
def locomo_file(tmp_path: Path) -> Path:
    return locomo(tmp_path / "locomo.json")


RETRIEVAL = """
title = "retrieval"
table = "locomo_retrieval"
[[tasks]]
name = "locomo"
path = "{path}"
mode = "retrieval"
[[systems]]
name = "hash"
backend = "embedding"
embedder = "hash"
[run]
k = [1, 3]
"""


def test_runs_resume_and_report(tmp_path: Path, locomo_file: Path) -> None:
    config = load_config(write_config(tmp_path, RETRIEVAL.format(path=locomo_file)))
    out = tmp_path / "out"
    first = run_eval(config, out=out)
    records = lines(out)
    assert first.written == len(records) == 18 + 3  # every evidence question, adversarial included
    assert {r["kind"] for r in records} == {"retrieval"}
    assert all(
        set(r["metrics"]) == {"hit@1", "hit@3", "recall@1", "recall@3", "near_hit", "mrr"} for r in records
    )
    again = run_eval(config, out=out)
    assert (again.written, again.skipped) == (0, 21)
    # A crash mid-write leaves a torn last line: it is ignored and the lost records are redone.
    kept = (out / RESULTS).read_text().splitlines()[:-3]
    (out / RESULTS).write_text("\n".join(kept) + '\n{"task": "locomo", "sys')
    resumed = run_eval(config, out=out)
    assert resumed.written == 3 and resumed.skipped == 18
    report = (out / "report.md").read_text()
    assert "## LoCoMo session retrieval: hash" in report and "| cats 1-4 |" in report
    assert "(21)" in report or "(18)" in report  # every cell carries its n
    assert '[[systems]]\nname = "hash"' in report  # the exact config closes the report
    assert (out / "latency_vs_memory.png").stat().st_size > 1000


def test_scores_match_a_direct_computation(tmp_path: Path, locomo_file: Path) -> None:
    from linmem.evals import metrics
    from linmem.evals.tasks import load_task

    config = load_config(write_config(tmp_path, RETRIEVAL.format(path=locomo_file)))
    out = tmp_path / "out"
    run_eval(config, out=out)
    task = load_task("locomo", path=str(locomo_file), mode="retrieval")
    by_id = {e.id: e for e in task}
    for r in lines(out):
        gold = by_id[r["id"]].gold_clips
        assert r["gold_clips"] == list(gold)
        assert r["metrics"]["mrr"] == metrics.reciprocal_rank(r["clips"], gold)
        assert r["metrics"]["hit@3"] == metrics.exact_hit(r["clips"], gold, 3)


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (
            lambda t: t.replace('table = "locomo_retrieval"', 'table = "locomo_retrieval"\ncolour = "red"'),
            r"exp.toml: unknown key 'colour'",
        ),
        (
            lambda t: t.replace('embedder = "hash"', 'embedder = "hash"\nbatch = 3'),
            r"systems\[0\]: unknown key 'batch'",
        ),
        (
            lambda t: t.replace('mode = "retrieval"', 'mode = "retrieval"\nshuffle = true'),
            r"unknown option 'shuffle'",
        ),
        (lambda t: t.replace("k = [1, 3]", "k = [1, 3]\nworkers = 2"), r"\[run\]: unknown key 'workers'"),
        (lambda t: t + "\n[[[", r"invalid TOML"),
    ],
)
def test_bad_configs_write_nothing(tmp_path: Path, locomo_file: Path, edit, pattern: str) -> None:
    path = write_config(tmp_path, edit(RETRIEVAL.format(path=locomo_file)))
    out = tmp_path / "out"
    with pytest.raises(BadInput, match=pattern):
        run_eval(load_config(path), out=out)
    assert not (out / RESULTS).exists()


QA = """
title = "qa"
table = "main_qa"
[[tasks]]
label = "Robot"
name = "m3bench"
annotations = "{annotations}"
memory_dir = "{captions}"
[[systems]]
name = "Embedding"
backend = "embedding"
embedder = "hash"
[[systems]]
name = "LM"
model = "openai:{url}#memory"
[agent]
controller = "openai:{url}#controller"
[judge]
model = "openai:{url}#judge"
[run]
concurrency = 4
"""


def scripted(answer: str = "In the left cupboard."):
    def chat(body: dict) -> dict:
        messages = body["messages"]
        system = messages[0]["content"]
        if system == prompts.JUDGE_SYSTEM:
            fields = messages[-1]["content"].split("Input:")[-1]
            gold = fields.split("ground_truth_answer:")[1].split("agent_answer:")[0]
            agent = fields.split("agent_answer:")[1]
            return {"content": "Yes" if "cupboard" in gold and "cupboard" in agent else "No"}
        if system == prompts.MEMORY_SYSTEM:
            return {"content": "Alice put the mug in the left cupboard (CLIP 0)."}
        if len(messages) <= 2:
            return {"content": "Action: [Search]\nContent: Where was the red mug put?"}
        return {"content": f"Action: [Answer]\nContent: {answer}"}

    return chat


def test_m3bench_qa_with_controller_and_judge(tmp_path: Path) -> None:
    annotations, captions = m3bench(tmp_path)
    with OpenAIServer(chat=scripted()) as server:
        text = QA.format(annotations=annotations, captions=captions, url=server.url)
        config = load_config(write_config(tmp_path, text))
        out = tmp_path / "out"
        outcome = run_eval(config, out=out)
    records = lines(out)
    assert outcome.written == len(records) == 2 * 6 and outcome.failed == 0
    for r in records:
        assert r["prediction"] == "In the left cupboard."
        assert r["trace"]["searches"] == 1 and r["trace"]["rounds"] == 2
        assert r["metrics"]["judge"] == (1.0 if "mug" in r["question"] else 0.0)
    report = (out / "report.md").read_text()
    assert "| Embedding | 33.3 (6) |" in report and "| LM | 33.3 (6) |" in report
    assert (
        "### Robot by question type" in report
        and "| Multi-Evidence Reasoning | 100.0 (2) | 100.0 (2) |" in report
    )
    # Robot questions read only the clips before them: each video's memory grew to before_clip 5.
    home = out / "home"
    names = memories(home)
    assert len(names) == 2
    assert [i.clip for i in open_memory(names[0], home=home).items()] == [0, 1, 2, 3, 4, 5]


def test_controller_that_never_answers_is_recorded_wrong(tmp_path: Path) -> None:
    annotations, captions = m3bench(tmp_path, videos=1)
    with OpenAIServer(chat=lambda body: {"content": "Action: [Search]\nContent: more?"}) as server:
        text = QA.format(annotations=annotations, captions=captions, url=server.url)
        text = text.replace('[judge]\nmodel = "openai:' + server.url + '#judge"\n', "")
        out = tmp_path / "out"
        run_eval(load_config(write_config(tmp_path, text)), out=out)
    records = lines(out)
    assert len(records) == 6
    assert all(r["prediction"] is None and r["metrics"]["answered"] == 0.0 for r in records)
    assert all(r["metrics"]["f1"] == 0.0 for r in records)


def test_bad_memory_files_fail_before_any_result(tmp_path: Path) -> None:
    annotations, captions = m3bench(tmp_path, videos=2)
    (captions / "kitchen_01.jsonl").write_text(
        '{"clip": 0, "start": 0, "end": 30, "caption": "ok"}\n{"clip": 1,\n'
    )
    text = QA.format(annotations=annotations, captions=captions, url="http://127.0.0.1:9/v1")
    out = tmp_path / "out"
    with pytest.raises(BadInput, match=r"kitchen_01.jsonl:2"):
        run_eval(load_config(write_config(tmp_path, text)), out=out)
    assert not (out / RESULTS).exists()
    data = json.loads(annotations.read_text())
    del data["kitchen_00"]["qa_list"][1]["answer"]
    annotations.write_text(json.dumps(data))
    with pytest.raises(BadInput, match=r"robot.json.*kitchen_00_Q02.*'answer'"):
        run_eval(load_config(write_config(tmp_path, text)), out=out)
    assert not (out / RESULTS).exists()


def test_memory_budget_caps_the_context(tmp_path: Path, locomo_file: Path) -> None:
    from linmem.engines import load_engine

    engine = load_engine("tiny:qwen3")
    budget = 2 * 2**20
    cap = tokens_under_budget(engine, budget)
    sizes = []
    for n in (cap, cap + 64):
        cache = engine.new_cache()
        engine.advance(cache, [65] * n)
        tensors, _ = engine.cache_to_tensors(cache)
        sizes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
    assert sizes[0] <= budget < sizes[1]
    # The hybrid holds a constant state plus one attention layer's keys and values: 4x the tokens.
    assert tokens_under_budget(load_engine("tiny:qwen3.5"), budget) > 3 * cap

    text = f"""
title = "niah"
table = "scalability"
[[tasks]]
name = "niah"
base = "locomo"
path = "{locomo_file}"
budgets = [1200, 4000]
per_budget = 2
chars_per_token = 1.0
[[systems]]
name = "softmax"
model = "tiny:qwen3"
memory_budget_mb = 2
max_new_tokens = 4
[[systems]]
name = "hybrid"
model = "tiny:qwen3.5"
memory_budget_mb = 2
max_new_tokens = 4
"""
    out = tmp_path / "out"
    run_eval(load_config(write_config(tmp_path, text)), out=out)
    records = lines(out)
    over = {(r["system"], r["types"][0]) for r in records if r.get("error")}
    assert over == {("softmax", "budget=4000")}
    report = (out / "report.md").read_text()
    assert "2 over budget" in report and "largest memory read (tokens)" in report
    assert (out / "accuracy_vs_context.png").is_file()


def test_hit_vs_context_with_both_readers_and_cli(tmp_path: Path, locomo_file: Path, capsys) -> None:
    text = f"""
title = "hit"
table = "hit_vs_context"
[[tasks]]
label = "LoCoMo"
name = "clip_retrieval"
base = "locomo"
path = "{locomo_file}"
contexts = [4, 8]
distractors = "mixed"
[[systems]]
name = "Embed."
backend = "embedding"
embedder = "hash"
[[systems]]
name = "LM"
model = "openai:http://127.0.0.1:9/v1#unused"
max_new_tokens = 16
"""
    path = write_config(tmp_path, text)
    out = tmp_path / "out"
    code = main(
        [
            "eval",
            str(path),
            "--limit",
            "2",
            "--out",
            str(out),
            "--set",
            'systems.1.model="tiny:qwen3.5"',
            "--json",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["written"] == 2 * 2 * 2 and result["failed"] == 0
    report = (out / "report.md").read_text()
    assert "| Context | LoCoMo Embed. | LoCoMo LM |" in report
    assert "| 4 |" in report and "| 8 |" in report
    assert (out / "accuracy_vs_context.png").stat().st_size > 1000
    assert main(["eval", str(path), "--set", "nonsense", "--json"]) == 1
    assert "expected dotted.key=value" in capsys.readouterr().out


def test_graph_with_unknown_classes_fails_before_any_result(tmp_path: Path) -> None:
    import pickle

    annotations, _ = m3bench(tmp_path, videos=1)
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    marker = tmp_path / "ran"
    # A pickle that would run a shell command if anything unpickled it naively.
    payload = pickle.dumps(
        type("Evil", (), {"__reduce__": lambda self: (__import__("os").system, (f"touch {marker}",))})()
    )
    (graphs / "kitchen_00.pkl").write_bytes(payload)
    text = f"""
title = "format"
table = "memory_format"
[[tasks]]
label = "Structured"
name = "m3bench"
annotations = "{annotations}"
memory = "graph"
memory_dir = "{graphs}"
[[systems]]
name = "Embedding"
backend = "embedding"
embedder = "hash"
"""
    out = tmp_path / "out"
    with pytest.raises(BadInput, match=r"kitchen_00.pkl.*refused to load (os|posix)\.system"):
        run_eval(load_config(write_config(tmp_path, text)), out=out)
    assert not (out / RESULTS).exists() and not marker.exists()
