"""`linmem eval`: configs, the resumable runner, reports and plots, on generated data."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
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
            r"systems\.0: unknown key 'batch'",
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
    # --limit 2: the task's first two examples (both of context 4), for each system.
    assert code == 0 and result["written"] == 2 * 2 and result["failed"] == 0
    report = (out / "report.md").read_text()
    assert "| Context | LoCoMo Embed. | LoCoMo LM |" in report
    assert "| 4 |" in report and "| 8 |" not in report
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


# --- interrupts ----------------------------------------------------------------------------------

NIAH = """
title = "niah"
table = "scalability"
[[tasks]]
name = "niah"
base = "locomo"
path = "{path}"
budgets = [32000, 48000, 64000]
per_budget = 20
chars_per_token = 1.0
[[systems]]
name = "Kimi"
model = "openai:http://127.0.0.1:9/v1#kimi"
max_new_tokens = 4
"""


def start_eval(*args: str) -> subprocess.Popen[str]:
    """`linmem eval ARGS` in a child process, as a shell's foreground job: SIGINT raises
    KeyboardInterrupt there (a background job of a script would inherit it ignored)."""
    start = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from linmem.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", start, "eval", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def interrupt_after_results(proc: subprocess.Popen[str], out: Path, timeout: float = 180) -> float:
    """SIGINT `proc` once its first result is in the journal; the seconds it took to exit."""
    deadline = time.monotonic() + timeout
    while not ((out / RESULTS).is_file() and (out / RESULTS).read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no result came"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    proc.wait(timeout=60)
    return time.monotonic() - sent


def test_interrupt_stops_keeps_results_and_resumes(tmp_path: Path, capsys) -> None:
    """Ctrl-C on a local model's run (each example a prefill of thousands of tokens) stops it at
    once: exit 130, whole journal lines, a partial report; the rerun goes on from there."""
    path = write_config(tmp_path, NIAH.format(path=locomo(tmp_path / "locomo.json", conversations=6)))
    out = tmp_path / "out"
    proc = start_eval(str(path), "--offline", "--out", str(out))
    took = interrupt_after_results(proc, out)
    _, err = proc.communicate()
    assert proc.returncode == 130, err
    assert took < 10, f"took {took:.1f} s to stop"
    kept = lines(out)  # every line parses: nothing torn
    total = 3 * 20
    assert 1 <= len(kept) < total
    report = (out / "report.md").read_text()
    assert f"Interrupted: {len(kept)} of" in report and "rerun to resume" in report
    assert "interrupted" in err
    code = main(["eval", str(path), "--offline", "--out", str(out), "--limit", str(len(kept) + 1), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and (result["skipped"], result["written"]) == (len(kept), 1)
    assert "Interrupted" not in (out / "report.md").read_text()


def test_interrupt_leaves_remote_reads_behind(tmp_path: Path) -> None:
    """With remote models the run reads in threads; Ctrl-C while reads are in flight (here, held
    by the server) exits within seconds instead of waiting for them."""
    release = threading.Event()
    calls: list[int] = []

    def slow(body: dict) -> dict:
        calls.append(1)
        if len(calls) > 2:
            release.wait(60)
        return {"content": "I do not know."}

    with OpenAIServer(chat=slow) as server:
        text = f"""
title = "qa"
table = "locomo_qa"
[[tasks]]
name = "locomo"
path = "{locomo(tmp_path / "locomo.json")}"
[[systems]]
name = "LM"
model = "openai:{server.url}#memory"
[run]
concurrency = 4
batch = 1
"""
        out = tmp_path / "out"
        proc = start_eval(str(write_config(tmp_path, text)), "--out", str(out))
        try:
            took = interrupt_after_results(proc, out)
            _, err = proc.communicate()
        finally:
            release.set()
    assert proc.returncode == 130, err
    assert took < 10, f"took {took:.1f} s to stop"
    assert 1 <= len(lines(out)) <= 2 and "Interrupted" in (out / "report.md").read_text()


# --- config values and paths ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "systems.5.model=tiny:qwen3",
            r"--set systems.5.model: systems is a list of 1 entries, .* found '5'",
        ),
        ("systems.x.name=a", r"expected an index from 0 to 0, found 'x'"),
        ("run.k=5", r"run.k must be a non-empty list of positive integers, e.g. \[1, 5, 10\], found 5"),
        ("run.batch=0", r"run.batch must be a positive integer, found 0"),
        ('systems.0.top_k="3"', r"systems.0.top_k must be a positive integer, found '3'"),
        ("systems.0.stateless=yes", r"systems.0.stateless must be true or false, found 'yes'"),
        ("agent.rounds=-1", r"agent.rounds must be a positive integer, found -1"),
        ("title.x=1", r"--set title.x: title is the value 'retrieval', expected a table or a list"),
        ("run=3", r"run must be a table, found 3"),
    ],
)
def test_bad_overrides_fail_before_any_work(
    tmp_path: Path, locomo_file: Path, capsys, setting, message
) -> None:
    path = write_config(tmp_path, RETRIEVAL.format(path=locomo_file))
    out = tmp_path / "out"
    assert main(["eval", str(path), "--set", setting, "--out", str(out), "--json"]) == 1
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["code"] == "bad_input" and re.search(message, error["message"]), error
    assert not out.exists()


def test_limit_must_be_positive(tmp_path: Path, locomo_file: Path, capsys) -> None:
    path = write_config(tmp_path, RETRIEVAL.format(path=locomo_file))
    assert main(["eval", str(path), "--limit", "0", "--out", str(tmp_path / "out"), "--json"]) == 1
    assert "--limit must be a positive integer, found 0" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_relative_paths_from_the_shell_resolve_against_the_working_directory(
    tmp_path: Path, monkeypatch
) -> None:
    configs, work = tmp_path / "configs", tmp_path / "work"
    configs.mkdir(), work.mkdir()
    path = write_config(configs, RETRIEVAL.format(path="${LINMEM_DATA}/locomo.json"))
    monkeypatch.chdir(work)
    monkeypatch.setenv("LINMEM_DATA", "../data")
    assert load_config(path).tasks[0].options["path"] == str(tmp_path / "data" / "locomo.json")
    # --set values are typed in the shell too; a path written in the file is the file's own.
    config = load_config(path, ["tasks.0.path=mine/locomo.json"])
    assert config.tasks[0].options["path"] == str(work / "mine" / "locomo.json")
    path.write_text(RETRIEVAL.format(path="data/locomo.json"))
    assert load_config(path).tasks[0].options["path"] == str(configs / "data" / "locomo.json")


def test_progress_lines_when_stderr_is_not_a_terminal(
    tmp_path: Path, locomo_file: Path, capsys, monkeypatch
) -> None:
    from linmem import progress

    monkeypatch.setattr(progress, "QUIET_S", 0.0)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # one line a result, not one each 30 s
    path = write_config(tmp_path, RETRIEVAL.format(path=locomo_file))
    assert main(["eval", str(path), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^eval: 21/21 results \(100%\)", err, re.MULTILINE), err


def test_latency_plot_points_for_agents_that_never_read(tmp_path: Path, locomo_file: Path) -> None:
    """A controller that answers at once leaves `tokens.memory` null: the latency plot takes
    each memory's size from its build, and puts each memory's first read apart."""
    from linmem.evals.report import latency_points
    from linmem.evals.run import load_prefills

    text = f"""
title = "qa"
table = "locomo_qa"
[[tasks]]
name = "locomo"
path = "{locomo_file}"
[[systems]]
name = "hash"
backend = "embedding"
embedder = "hash"
[agent]
controller = "openai:{{url}}#controller"
"""
    with OpenAIServer(chat=lambda body: {"content": "Action: [Answer]\nContent: Lisbon"}) as server:
        out = tmp_path / "out"
        run_eval(load_config(write_config(tmp_path, text.replace("{url}", server.url))), out=out)
    records = lines(out)
    assert all(r["tokens"]["memory"] is None for r in records)
    cold, warm = latency_points(records, load_prefills(out))["hash"]
    assert len(cold) == 3 and len(cold) + len(warm) == len(records)  # one first read per conversation
    sizes = {p["source"]: p["tokens"] for p in load_prefills(out)}
    assert sorted(x for x, _ in cold) == sorted(sizes.values())
