"""`devicemap bench` and the measuring behind it (devicemap.cli.measure)."""

from __future__ import annotations

import json
import mmap
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner, Result

from devicemap.cli.main import app
from devicemap.cli.measure import (
    MEASURES,
    BenchOptions,
    RssSampler,
    mapped_cpu_weights,
    time_generate,
)
from test_generate import byte_tokenizer
from tiny import build_tiny, make_tiny_chat

SPLIT = ["--max-memory", "cpu=600KB", "--max-memory", "disk=1GB"]
SMALL = ["--prompt-tokens", "16", "--new-tokens", "6", "--runs", "2"]
MiB = 2**20
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status")


def invoke(*args: Any) -> Result:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat(tmp_path_factory.mktemp("bench") / "llama", byte_tokenizer())


@linux_only
def test_bench_json_speeds_and_memory_per_device(llama: Path) -> None:
    result = invoke("bench", llama, *SMALL, *SPLIT, "--json")
    assert result.exit_code == 0
    out = json.loads(result.stdout)
    assert out["load_s"] > 0 and out["prefill_tok_s"] > 0 and out["decode_tok_s"] > 0
    assert len(out["prefill_s"]) == len(out["decode_s"]) == 2
    assert out["context"] == 16 + 6  # planned for exactly what the benchmark runs
    plan = json.loads(invoke("plan", llama, *SPLIT, "--context", 22, "--json").stdout)
    assert [d["device"] for d in out["devices"]] == [d["device"] for d in plan["devices"]]
    for measured, planned in zip(out["devices"], plan["devices"], strict=True):
        parts = ("weights", "kv_cache", "workspace", "logits", "staging")
        assert {k: measured["planned"][k] for k in parts} == {k: planned[k] for k in parts}
        assert measured["planned"]["total"] == sum(planned[k] for k in parts)
        assert isinstance(measured["peak"], int) and measured["peak"] >= 0
    by_device = {d["device"]: d for d in out["devices"]}
    assert by_device["cpu"]["measured"] == "RSS anon + mapped"
    assert by_device["disk"]["measured"] == "RSS file - cpu mapped"
    assert by_device["disk"]["planned"]["weights"] > 0
    assert by_device["disk"]["planned"]["kv_cache"] == 0


def test_bench_table(llama: Path) -> None:
    result = invoke("bench", llama, *SMALL, *SPLIT)
    assert result.exit_code == 0
    head, table = result.stdout.split("\n", 1)
    assert head.startswith(f"{llama}: load ") and "prefill" in head and "decode" in head
    assert "median of 2 runs" in result.stdout and "planned for context 22" in result.stdout
    assert "memory per device: planned vs peak" in table
    rows = {line.split()[0] for line in table.splitlines() if line.strip()}
    assert {"cpu", "disk"} <= rows
    labels = {"RSS anon + mapped", "RSS file - cpu mapped"}
    for label in labels if sys.platform.startswith("linux") else set():
        assert f"  {label}: {MEASURES[label]}\n" in result.stdout


def test_bench_refuses_bad_counts(llama: Path) -> None:
    result = invoke("bench", llama, "--new-tokens", 0, "--runs", 0)
    assert result.exit_code == 1
    assert result.stderr == "error: --new-tokens 0, --runs 0: each must be at least 1\n"


def test_bench_prompt_longer_than_the_context(llama: Path) -> None:
    result = invoke("bench", llama, "--prompt-tokens", 32, "--context", 16)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith(
        "error: prompt is 32 tokens, the plan holds 16"
    )


def test_bench_options_context() -> None:
    assert BenchOptions(prompt_tokens=100, new_tokens=28).context == 128
    assert BenchOptions() == BenchOptions(prompt_tokens=128, new_tokens=32, runs=3)


def test_time_generate_decodes_every_token_even_past_the_end_of_sequence() -> None:
    model = build_tiny("llama")
    model.generation_config.eos_token_id = 7
    ids = torch.full((1, 4), 7)  # a model that has only seen token 7 tends to say 7 again
    prefill_s, decode_s, decoded = time_generate(model, ids, 5)
    assert decoded == 4  # the tokens after the first, whatever they are
    assert prefill_s > 0 and decode_s > 0


@linux_only
def test_rss_sampler_sees_anonymous_and_file_pages(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"\1" * (24 * MiB))
    private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # fresh pages: malloc may reuse freed ones
    with (
        RssSampler() as rss,
        mmap.mmap(-1, 32 * MiB, flags=private) as anon,
        path.open("rb") as f,
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as file,
    ):
        for i in range(0, len(anon), 4096):
            anon[i] = 1  # written, so resident
        assert sum(file[i] for i in range(0, len(file), 4096)) == 24 * MiB // 4096  # read
        time.sleep(5 * RssSampler.interval_s)  # both held across a few samples
    assert (rss.growth("anon") or 0) >= 30 * MiB
    assert (rss.growth("file") or 0) >= 22 * MiB
    assert (rss.growth("total") or 0) >= 52 * MiB


@linux_only
def test_mapped_cpu_weights_counts_the_cpu_tier_file_pages(llama: Path) -> None:
    import devicemap

    model = devicemap.load(llama, max_memory={"cpu": "1GiB"}, progress=False)  # all in RAM
    plan = model.devicemap_plan
    weights = plan.usage("cpu").weights  # bytes: the checkpoint's own pages (same dtype)
    mapped = mapped_cpu_weights(model, plan)
    assert mapped is not None and weights * 0.95 <= mapped <= weights + (64 << 10)
    devicemap.release(model)
    budgets = {"cpu": "600KB", "disk": "1GB"}
    split = devicemap.load(llama, max_memory=budgets, context=22, progress=False)
    assert mapped_cpu_weights(split, split.devicemap_plan) == 0  # beside disk: ordinary RAM
    devicemap.release(split)
