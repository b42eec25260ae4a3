"""`linmem bench`: its pieces run and its arithmetic is right. Speed itself is not asserted here:
the bench measures it and refuses to report it when exactness fails."""

from __future__ import annotations

import json
import random

import pytest

from linmem import bench
from linmem.serving import sglang_command, shell, vllm_command


def test_full_size_arithmetic() -> None:
    rows = {r["model"]: r for r in bench.full_size_table()}
    qwen3 = rows["Qwen3-30B-A3B"]
    assert qwen3["state_bytes"] == 0 and qwen3["bytes_per_token"] == 48 * 2 * 4 * 128 * 2 == 98304
    assert qwen3["total_131k_bytes"] == 12 * 2**30 and qwen3["tokens_in_2GiB"] == 21845
    kimi = rows["Kimi-Linear-48B-A3B"]
    assert kimi["bytes_per_token"] == 7 * (512 + 64) * 2 == 8064
    assert kimi["state_bytes"] == 20 * (32 * 128 * 128 * 4 + 3 * 32 * 128 * 4 * 2)
    small = rows["Qwen3.5-0.8B"]
    assert small["bytes_per_token"] == 6 * 2 * 2 * 256 * 2
    # The paper's 2x claim at full scale: the linear model holds far more under one budget.
    assert kimi["tokens_in_2GiB"] > 2 * qwen3["tokens_in_2GiB"]


@pytest.mark.parametrize("arch", list(bench.ARCHS))
def test_one_memory_is_exact_and_measured(arch: str, tmp_path) -> None:
    items = bench._memory_items(900, seed=3)
    memory = bench._build_memory(tmp_path, f"b-{arch}", items)
    row, append, size = bench._one_memory(memory, arch, bench.ARCHS[arch], random.Random(0))
    assert row["exact"] is True and row["speedup"] and row["speedup"] > 0
    assert 700 <= row["memory_tokens"] <= 1300
    assert row["query_tokens"] < 64  # a cached read runs only the question
    assert append["added_tokens"] >= bench.APPEND_TOKENS and append["append_s"] > 0
    assert size["state_bytes"] > 0 and size["disk_bytes"] >= size["state_bytes"]
    # The first read builds the snapshot: it costs more than a warm one.
    assert row["first_read_ttft_s"] > row["cached_ttft_s"]
    memory.close()
    if arch == "kimi-linear":  # the plots, from these rows (one architecture is enough)
        import matplotlib.image

        r = {"machine": {"threads": 1}, "reads": [row | {"arch": arch}], "bytes": [size | {"arch": arch}]}
        for png in bench._plots(r, tmp_path / "plots"):
            assert matplotlib.image.imread(png).shape[0] > 100


def test_targets_report_met_and_missed() -> None:
    result = {
        "reads": [{"arch": "qwen3.5", "target_tokens": 16384, "speedup": 61.0}],
        "appends": [
            {"arch": "qwen3.5", "target_tokens": 1024, "append_s": 0.1},
            {"arch": "qwen3.5", "target_tokens": 32768, "append_s": 0.2},
        ],
        "rss": {"qwen3.5": {"ratio": 1.1}, "kimi-linear": {"ratio": 1.6}},
        "budget": {"tokens": {"qwen3.5": 9000, "kimi-linear": 8000, "qwen3": 4000}},
        "kernels": {"kda": {"speedup": 12.0, "roofline_fraction": 0.3}, "gdn": {"speedup": None}},
    }
    t = bench.targets(result)
    assert t["cached_read_50x_at_16k"] == {"value": 61.0, "met": True}
    assert t["append_500_at_32k_vs_1k_le_1.3x"] == {"value": 2.0, "met": False}
    assert t["prefill_peak_rss_ratio_le_1.5"] == {"value": 1.6, "met": False}
    assert t["linear_holds_2x_softmax_under_budget"] == {"value": 2.0, "met": True}
    assert t["kda_kernel_10x_reference"]["met"] and not t["kda_kernel_40pct_roofline"]["met"]
    assert t["gdn_kernel_2x_reference"] == {"value": None, "met": False}


@pytest.mark.parametrize(
    ("load", "threads", "spread", "own", "why"),
    [
        (0.1, 2, 1.1, 0.0, None),  # idle
        (0.4, 2, 1.2, 0.0, None),  # what an idle machine's own chores add
        (0.9, 1, 1.2, 0.0, None),  # one other job and one thread timed: a core each
        (1.9, 2, 1.2, 0.0, "load average 1.90 on 2 cores"),  # one other job on a 2-thread run
        (2.6, 1, 1.2, 0.0, "load average 2.60 on 2 cores"),  # the issue's: an eval on both cores
        (2.1, 2, 1.2, 2.0, None),  # after a run: its own threads are the load
        (0.1, 1, 3.5, 0.0, "varied 3.5x"),  # the probe saw work the load average missed
        (None, 1, None, 0.0, None),  # no figures (no getloadavg): no verdict
    ],
)
def test_a_busy_machine_is_told_from_its_load(
    load: float | None, threads: int, spread: float | None, own: float, why: str | None
) -> None:
    reason = bench.busy(load, 2, threads, spread, own=own)
    assert (reason is None) == (why is None)
    assert why is None or (reason is not None and why in reason)


def test_load_check_measures_and_warns() -> None:
    check = bench.load_check(1)
    assert check["cores"] >= 1 and check["threads"] == 1 and check["probe_spread"] >= 1.0
    said: list[str] = []
    bench._warn_if_busy(check | {"load_1m": 9.0, "probe_spread": 1.0}, "before", said.append)
    assert said and said[0].startswith(
        "WARNING: this machine is busy before the benchmark (load average 9.00"
    )
    said.clear()
    bench._warn_if_busy(check | {"load_1m": 0.0, "probe_spread": 1.0}, "after", said.append)
    assert said == []


def _result() -> dict:
    """A run's figures as the measuring sections return them (their own tests run those): the
    tables, targets and JSON line are built from them here, without minutes of tiny models."""
    at = {"target_tokens": 1024, "memory_tokens": 1100}
    read = {
        "query_tokens": 42,
        "stateless_ttft_s": 0.02,
        "cached_ttft_s": 0.004,
        "first_read_ttft_s": 0.03,
        "speedup": 5.0,
        "exact": True,
    }
    append = {"added_tokens": 520, "append_s": 0.03, "linear_layers_s": 0.01, "attention_layers_s": 0.01}
    reads = [at | read | {"arch": a, "cached_read_s": 0.01} for a in bench.ARCHS]
    reads.append({"arch": "embedding", "target_tokens": 1024, "read_s": 0.008})
    appends = [at | append | {"arch": a} for a in bench.ARCHS]
    sizes = [at | {"arch": a, "state_bytes": 9, "disk_bytes": 10} for a in bench.ARCHS]
    budget = {
        "budget_mb": 16,
        "tokens": dict.fromkeys(bench.ARCHS, 1000),
        "context": dict.fromkeys(bench.ARCHS, 2048),
    }
    rss = {a: {"tokens": [1024, 4096], "peak_rss_bytes": [2**28, 2**28], "ratio": 1.0} for a in bench.LINEAR}
    check = bench.load_check(1)
    return {
        "bench": "linmem",
        "quick": True,
        "machine": {"cpu": "x", "cores": check["cores"], "torch": "t", "threads": 1, "python": "3"},
        "load": {"before": check, "after": check, "busy": True, "warning": "before: a test"},
        "reads": reads,
        "appends": appends,
        "bytes": sizes,
        "full_size": bench.full_size_table(),
        "budget": budget,
        "rss": rss,
        "kernels": {"error": "not measured here"},
    }


@pytest.mark.parametrize("asked", [False, True])
def test_targets_are_shown_only_when_asked(asked: bool, capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    from linmem.cli import build_parser

    assert build_parser().parse_args(["bench", "--quick", *(["--targets"] if asked else [])]).targets == asked
    result = bench.present(_result(), out=tmp_path, with_targets=asked)
    printed = capsys.readouterr().out
    assert ("targets (the project's own)" in printed) == asked
    line = json.loads(printed.strip().splitlines()[-1])  # the JSON line comes last
    assert ("targets" in line) == asked == ("targets" in result)
    assert set(line["load"]) == {"before", "after", "busy", "warning"}
    assert "WARNING: figures measured on a busy machine" in printed
    assert len(line["plots"]) == 2
    bench.present(_result(), with_targets=asked, echo=False)
    assert capsys.readouterr().out == ""


def test_embedding_bench_is_exact_and_measures_each_part() -> None:
    r = bench.run_embedding_bench(items=97, sample=40, batches=(16,), echo=False)
    assert r["items"] == 97 and r["exactness"]["exact"], r["exactness"]
    p = r["padding"]
    assert (
        1.0
        <= p["padded_per_token_sorted"]
        <= p["padded_per_token_sorted_per_call"]
        <= p["padded_per_token_unsorted"]
    )
    assert r["former"]["calls"] == 1 and r["former"]["lines_per_s"] > 0 and r["index"]["lines_per_s"] > 0
    assert r["index"]["threads"] == r["machine"]["threads"]
    assert {(x["batch"], x["sorted"]) for x in r["sweep"]} == {(16, True), (32, False)}
    assert r["load"]["after"]["threads"] == r["machine"]["threads"]
    json.dumps(r)


def test_endpoint_bench_against_a_loopback_server() -> None:
    from openai_server import OpenAIServer

    with OpenAIServer(chat=lambda body: {"content": "CLIP 0"}) as server:
        rows = bench.endpoint_bench(f"{server.url}#m", (256, 1024), lambda _m: None)
    assert [r["target_tokens"] for r in rows] == [256, 1024]
    for r in rows:
        cold, *warm = r["cached_tokens"]
        # The loopback server plays a prefix cache: later reads find the memory cached.
        assert all(w > cold + 100 for w in warm)


def test_serving_commands_are_the_readmes() -> None:
    from pathlib import Path

    vllm = vllm_command(
        "moonshotai/Kimi-Linear-48B-A3B-Instruct",
        tensor_parallel=4,
        max_model_len=262144,
        trust_remote_code=True,
    )
    assert vllm[:3] == ["vllm", "serve", "moonshotai/Kimi-Linear-48B-A3B-Instruct"]
    for flag in ("--enable-prefix-caching", "--enable-prompt-tokens-details", "--trust-remote-code"):
        assert flag in vllm
    assert vllm[vllm.index("--mamba-cache-mode") + 1] == "align"
    sglang = sglang_command("Qwen/Qwen3.5-0.8B", context_length=262144)
    assert sglang[sglang.index("--mamba-scheduler-strategy") + 1] == "extra_buffer"
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert shell(vllm_command("Qwen/Qwen3.5-0.8B", max_model_len=262144)) in readme
    assert shell(sglang) in readme


def test_search_bench_measures_every_part() -> None:
    from linmem.bench_search import run_search_bench

    r = run_search_bench(items=400, echo=False)
    assert r["items"] == 400 and r["index"]["indexed"] == 400 and r["index"]["problem"] is None
    s = r["search"]
    for key in ("p50_ms", "p95_ms", "lexical_p50_ms", "fts5_p50_ms", "dense_p50_ms", "int8_dense_p50_ms"):
        assert s[key] > 0, key
    assert s["p95_ms"] >= s["p50_ms"] and s["rss_mb_after"] > 0
    assert r["writes"]["ratio"] > 0 and r["query_embedding"]["p50_ms"] > 0
    # Scale targets are judged only at 100,000 items; the write ratio at any size.
    assert r["targets"]["search_p50_ms<=10"] is None and isinstance(r["targets"]["write_ratio<=1.2"], bool)


def test_agent_bench_runs_each_question_both_ways_and_compares_the_traces() -> None:
    from linmem.bench_agent import run_agent_bench

    result = run_agent_bench("tiny:qwen3", backend="embedding", questions=1, echo=False)
    (row,) = result["questions"]
    assert row["rounds"] == 5 and row["identical"]  # a random controller never answers
    assert row["kept_tokens"] < row["stateless_tokens"]
    assert result["ratio_all"] == row["stateless_tokens"] / row["kept_tokens"]
    assert result["target"].endswith(("met", "missed"))
    json.dumps(result)
