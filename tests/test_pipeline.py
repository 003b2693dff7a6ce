"""Pipeline stages over torch.distributed: one plan over several ranks, each rank loading
only its stage, generation in lockstep equal to one process; faults end every rank.

The multi-rank tests start 2 or 3 local processes over gloo on 127.0.0.1 (tests/ranks.py
sets the environment torchrun would), and one runs the real `torchrun --standalone`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

from devicemap.devices import CPU, parse_device
from devicemap.errors import DoesNotFit, PlanError
from devicemap.model.skeleton import build_skeleton
from devicemap.plan.options import PlanOptions
from devicemap.plan.planner import Plan, RankBudgets, plan_from_json
from devicemap.plan.stages import plan_ranks, units_of
from pipeline_worker import MICRO, outputs
from ranks import PYTHON, Ranks, free_port, launch
from test_generate import byte_tokenizer
from tiny import make_tiny, make_tiny_chat

WORKER = str(Path(__file__).parent / "pipeline_worker.py")
CONFIGS = Path(__file__).parent / "data" / "configs"
DEVICEMAP = [PYTHON, "-m", "devicemap"]


def cpu(size: int) -> RankBudgets:
    return RankBudgets({CPU: size})


# --- planning (pure) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "ranks"), [("llama", 2), ("llama", 3), ("mixtral", 3), ("gpt2", 4)]
)
def test_stages_are_contiguous_and_cover_the_model(
    tiny_models: dict[str, Path], arch: str, ranks: int
) -> None:
    skeleton = build_skeleton(tiny_models[arch])
    stages = plan_ranks(skeleton, [cpu(64 << 20)] * ranks, PlanOptions(context=64))
    holders = [p.stage.holders for p in stages.plans if p.stage]
    assert all(h == holders[0] for h in holders)  # every rank agrees who holds what
    order = [holders[0][b.name] for b in skeleton.blocks]
    assert order == sorted(order) and set(order) == set(range(ranks))  # contiguous, all used
    layers = [u for u in units_of(skeleton) if u.layer]
    for rank, plan in enumerate(stages.plans):
        assert plan.stage is not None and plan.stage.rank == rank
        mine = [u for u in layers if holders[0][skeleton.blocks[u.blocks[0]].name] == rank]
        assert mine, f"rank {rank} holds no layer"
        # it loads its own blocks, the weightless rotary tables, and nothing else but ties
        extra = set(plan.device_map) - {n for n, r in holders[0].items() if r == rank}
        tied = {n for group in skeleton.tied for n in group}
        assert all(n in tied or n.endswith("rotary_emb") for n in extra), extra
        assert set(plan.stage.remote).isdisjoint(plan.device_map)
    assert stages.plans[0].stage and stages.plans[0].stage.entry is None
    assert stages.plans[-1].stage and stages.plans[-1].stage.head == skeleton.output_block


def test_a_tied_lm_head_is_loaded_with_its_embedding_on_the_last_rank(
    tiny_models: dict[str, Path],
) -> None:
    skeleton = build_skeleton(tiny_models["gpt2"])  # transformer.wte is tied to lm_head
    first, last = plan_ranks(skeleton, [cpu(64 << 20)] * 2, PlanOptions(context=64)).plans
    assert "transformer.wte" in first.device_map and "lm_head" not in first.device_map
    assert {"transformer.wte", "lm_head"} <= set(last.device_map)
    assert first.stage and first.stage.remote["lm_head"] == "logits"


def test_cuts_follow_each_ranks_memory(tiny_models: dict[str, Path]) -> None:
    skeleton = build_skeleton(tiny_models["llama"])  # 4 layers of 145 KiB
    even = plan_ranks(skeleton, [cpu(10 << 20), cpu(10 << 20)], PlanOptions(context=64))
    uneven = plan_ranks(skeleton, [cpu(4 << 20), cpu(12 << 20)], PlanOptions(context=64))

    def layers(plans: tuple[Plan, ...]) -> list[int]:
        return [sum(n.startswith("model.layers.") for n in p.device_map) for p in plans]

    assert layers(even.plans) == [2, 2]
    assert layers(uneven.plans) == [1, 3]


def test_seventy_b_over_four_ranks_what_if() -> None:
    skeleton = build_skeleton(CONFIGS / "llama-3-70b")
    ranks = [RankBudgets({parse_device(0): 24 << 30, CPU: 64 << 30})] * 4
    stages = plan_ranks(skeleton, ranks, PlanOptions(context=4096))
    text = stages.explain()
    assert "stage 0 (rank 0): model.embed_tokens, model.rotary_emb, model.layers.0-" in text
    assert "model.norm, lm_head" in text.splitlines()[4]
    # 8192 hidden x bf16: 16 KiB per token per hop; 128256 vocab x bf16 of logits
    assert "the hidden states, 16.00 KiB per token per sequence per hop (3 hops" in text
    assert "250.50 KiB per sequence per step" in text
    for plan in stages.plans:
        assert all(u.used <= u.budget for u in plan.devices)
        assert 19 <= sum(n.startswith("model.layers.") for n in plan.device_map) <= 21


def test_a_rank_that_cannot_hold_its_stage_is_named(tiny_models: dict[str, Path]) -> None:
    skeleton = build_skeleton(tiny_models["llama"])
    with pytest.raises(
        DoesNotFit,
        match=r"^rank 1 \(stage model\.layers\.3, model\.norm, lm_head\): .* does not fit",
    ):
        plan_ranks(skeleton, [cpu(10 << 20), cpu(200 << 10)], PlanOptions(context=64))


def test_what_cannot_be_cut(tiny_models: dict[str, Path]) -> None:
    llama = build_skeleton(tiny_models["llama"])
    with pytest.raises(PlanError, match="has 4 layers, fewer than the 5 ranks"):
        plan_ranks(llama, [cpu(10 << 20)] * 5, PlanOptions(context=64))
    with pytest.raises(PlanError, match="encoder-decoder"):
        plan_ranks(build_skeleton(tiny_models["t5"]), [cpu(10 << 20)] * 2, PlanOptions(context=64))


def test_pins_apply_on_the_rank_that_holds_the_block(tiny_models: dict[str, Path]) -> None:
    skeleton = build_skeleton(tiny_models["llama"])
    ranks = [RankBudgets({parse_device(0): 10 << 20, CPU: 10 << 20})] * 2
    pins = {"lm_head": CPU, "model.layers.0": CPU}
    first, last = plan_ranks(skeleton, ranks, PlanOptions(context=64, pins=pins)).plans
    assert first.device_map["model.layers.0"] == "cpu" and last.device_map["lm_head"] == "cpu"
    assert first.options.pins == {"model.layers.0": CPU}  # each rank keeps its own pins
    with pytest.raises(PlanError, match=r"pins name no module of .*'model\.layer\.9'"):
        plan_ranks(skeleton, ranks, PlanOptions(context=64, pins={"model.layer.9": CPU}))


def test_a_stage_plan_round_trips_through_json(tiny_models: dict[str, Path]) -> None:
    skeleton = build_skeleton(tiny_models["mixtral"])
    stages = plan_ranks(skeleton, [cpu(64 << 20)] * 3, PlanOptions(context=64))
    for plan in stages.plans:
        assert plan_from_json(json.loads(json.dumps(plan.to_json()))) == plan
    damaged = stages.plans[1].to_json()
    damaged["stage"]["remote"]["model.layers.0"] = "teleport"
    with pytest.raises(PlanError, match=r"stage\.remote"):
        plan_from_json(damaged)


# --- the plan command's what-ifs -----------------------------------------------------------


def devicemap(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DEVICEMAP, *args], capture_output=True, text=True, timeout=120, **kwargs
    )


def test_plan_ranks_what_if_explains_stages_and_bytes() -> None:
    budgets = ["--max-memory", "0=24GiB", "--max-memory", "cpu=64GiB"]
    result = devicemap("plan", str(CONFIGS / "llama-3-70b"), "--ranks", "4", *budgets, "--explain")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("rank 3:") >= 1 and "stage 3 (rank 3):" in out
    assert "per generated token (batch 1): 48.00 KiB of hidden states" in out
    data = json.loads(
        devicemap("plan", str(CONFIGS / "llama-3-70b"), "--ranks", "4", *budgets, "--json").stdout
    )
    assert data["ranks"] == 4 and [s["rank"] for s in data["stages"]] == [0, 1, 2, 3]
    assert data["stages"][3]["blocks"][-2:] == ["model.norm", "lm_head"]


def test_plan_rank_budgets_file(tmp_path: Path) -> None:
    file = tmp_path / "ranks.json"
    file.write_text(json.dumps([{"0": "24GiB", "cpu": "64GiB"}, {"0": "80GiB", "cpu": "64GiB"}]))
    result = devicemap("plan", str(CONFIGS / "llama-3-70b"), "--rank-budgets", str(file), "--json")
    assert result.returncode == 0, result.stderr
    small, big = (len(s["blocks"]) for s in json.loads(result.stdout)["stages"])
    assert big > small  # the 80 GiB GPU takes the larger share
    file.write_text('[{"cpu": "lots"}]')
    bad = devicemap("plan", str(CONFIGS / "llama-3-70b"), "--rank-budgets", str(file))
    assert bad.returncode == 1 and bad.stderr.startswith(f"error: --rank-budgets {file}: rank 0")
    both = devicemap(
        "plan", str(CONFIGS / "llama-3-70b"), "--ranks", "2", "--rank-budgets", str(file)
    )
    assert both.returncode == 1 and "not both" in both.stderr
    target = tmp_path / "p.json"
    saved = devicemap("plan", str(CONFIGS / "llama-3-70b"), "--ranks", "2", "--save", str(target))
    assert saved.returncode == 1 and "error: --save writes a plan for one process" in saved.stderr
    assert not target.exists()


# --- several ranks over gloo -----------------------------------------------------------------


def reference(directory: Path) -> dict[str, Any]:
    """One process, plain transformers: what pipeline_worker's ranks compute (as lists)."""
    model = tf.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        micro = [
            model.generate(torch.tensor(p), max_new_tokens=8, do_sample=False).tolist()
            for p in MICRO
        ]
    return {**outputs(model), "micro": micro}


@pytest.mark.parametrize(
    ("arch", "size"), [("llama", 2), ("mixtral", 3), ("gpt2", 2), ("mistral", 3)]
)
def test_ranks_compute_what_one_process_computes(
    tiny_models: dict[str, Path], tmp_path: Path, arch: str, size: int
) -> None:
    model = tiny_models[arch]
    argv = [[PYTHON, WORKER, str(model), str(tmp_path)]] * size
    results = launch(argv, tmp_path, timeout=60)
    for r in results:
        assert r.returncode == 0, f"rank {r.rank}:\n{r.stderr[-3000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(size)]
    expected = reference(model)
    for got in ranks:  # every rank: the same logits (bit for bit) and tokens as one process
        assert torch.equal(torch.tensor(got["logits"]), torch.tensor(expected["logits"]))
        assert got["greedy"] == expected["greedy"]
        assert got["sampled"] == expected["sampled"]
        assert got["micro"] == expected["micro"]  # micro-batches side by side, each its own
    # each rank materialises only its own blocks; together they hold every weight
    names = {n for n, _ in tf.AutoModelForCausalLM.from_pretrained(model).named_parameters()}
    held: set[str] = set()
    for got in ranks:
        loaded = got["loaded"]
        assert got["real"], got["rank"]
        for name in got["real"]:
            assert any(name == b or name.startswith(b + ".") for b in loaded), name
        assert len(got["real"]) < len(names)  # not the whole model
        held |= set(got["real"])
    experts = {n for n in names if ".experts." in n}  # kept as per-expert checkpoint pieces
    assert names - experts <= held


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc/self/statm")
def test_each_rank_holds_its_share_of_the_model_in_memory(tmp_path: Path) -> None:
    # 6 layers of ~10 MB (fp32): a model whose weights stand out from torch's own memory
    big = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
               num_attention_heads=8, num_key_value_heads=8)  # fmt: skip
    model = make_tiny("llama", tmp_path / "model", shard_size="20MB", **big)
    whole = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    argv = [[PYTHON, WORKER, str(model), str(tmp_path), "--mode", "memory"]] * 2
    for r in launch(argv, tmp_path, timeout=60):
        assert r.returncode == 0, r.stderr[-3000:]
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert 0.35 * whole < got["weights"] < 0.65 * whole  # about half the weights each
        # resident memory grew by this rank's weights (read in), not by the whole model's
        assert 0.8 * got["weights"] < got["grown"] < got["weights"] + 0.2 * whole, got


def test_mismatched_versions_are_refused_on_every_rank(tmp_path: Path, tiny_models) -> None:
    argv = [[PYTHON, WORKER, str(tiny_models["llama"]), str(tmp_path), "--mode", "agree"]] * 3
    for r in launch(argv, tmp_path, timeout=60):
        assert r.returncode == 0, r.stderr
    for rank in range(3):
        error = json.loads((tmp_path / f"rank{rank}.json").read_text())["error"]
        assert error.startswith("the ranks did not start alike: rank 1 has devicemap version '0.1'")
        assert "rank 2" not in error  # rank 2 has rank 0's


# --- the CLI under several ranks -------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat(tmp_path_factory.mktemp("pipe") / "llama", byte_tokenizer())


RUN = ["run", "-p", "The capital of France is", "--raw", "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def single_run(chat_model: Path) -> str:
    """What one process prints for RUN."""
    single = devicemap(*RUN, str(chat_model))
    assert single.returncode == 0, single.stderr
    assert single.stdout.strip()
    return single.stdout


def test_run_over_two_ranks_prints_what_one_process_prints(
    chat_model: Path, single_run: str, tmp_path: Path
) -> None:
    results = launch([[*DEVICEMAP, *RUN, str(chat_model)]] * 2, tmp_path, timeout=60)
    assert [r.returncode for r in results] == [0, 0], results[1].stderr
    assert results[0].stdout == single_run
    assert results[1].stdout == ""  # rank 0 prints
    assert "rank 1 of 2:" in results[1].stderr


def test_run_json_per_rank_lists_its_blocks(chat_model: Path, tmp_path: Path) -> None:
    argv = [[*DEVICEMAP, *RUN, str(chat_model), "--json"]] * 3
    results = launch(argv, tmp_path, timeout=60)
    assert [r.returncode for r in results] == [0, 0, 0], results[2].stderr
    data = [json.loads(r.stdout) for r in results]
    assert [d["rank"] for d in data] == [0, 1, 2]
    assert len({d["reply"] for d in data}) == 1
    assert [s["blocks"] for s in data[0]["stages"]] == [d["blocks"] for d in data]
    assert data[0]["blocks"][0] == "model.embed_tokens" and data[2]["blocks"][-1] == "lm_head"
    assert "model.layers.0" not in data[1]["blocks"] and "lm_head" not in data[1]["blocks"]


def test_plan_json_over_ranks_each_rank_its_own_and_rank_0_every_rank(
    chat_model: Path, tmp_path: Path
) -> None:
    argv = [[*DEVICEMAP, "plan", str(chat_model), "--json"]] * 2  # budgets: what is free
    results = launch(argv, tmp_path, timeout=60)
    assert [r.returncode for r in results] == [0, 0], results[1].stderr
    first, second = (json.loads(r.stdout) for r in results)
    assert (first["rank"], second["rank"]) == (0, 1)
    assert [s["blocks"] for s in first["stages"]] == [first["blocks"], second["blocks"]]
    assert "stages" not in second and second["plan"]["stage"]["rank"] == 1
    # two ranks on one machine share what is free there, rather than each counting all of it
    alone = json.loads(devicemap("plan", str(chat_model), "--json").stdout)

    def cpu(plan: dict[str, Any]) -> int:
        return next(d["budget"] for d in plan["devices"] if d["device"] == "cpu")

    for rank, got in enumerate((first, second)):
        assert 0.4 < cpu(got["plan"]) / cpu(alone) < 0.6
        assert any(f"is local rank {rank} of 2 on its machine" in r for r in got["plan"]["reasons"])


def test_ranks_on_one_machine_share_its_gpus_ram_and_disk(monkeypatch) -> None:
    from devicemap.cli.ranked import machine_share
    from devicemap.devices import DISK

    def share(gpus: int, size: int, local: int, given=frozenset()) -> dict[str, int]:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(size))
        monkeypatch.setenv("LOCAL_RANK", str(local))
        here = RankBudgets({parse_device(i): 12 for i in range(gpus)} | {CPU: 100, DISK: 900})
        return {str(d): n for d, n in machine_share(here, set(given), local).sizes.items()}

    assert share(4, 2, 1) == {"cuda:1": 12, "cuda:3": 12, "cpu": 50, "disk": 450}
    assert share(2, 3, 0) == {"cuda:0": 6, "cpu": 33, "disk": 300}  # cuda:0 has 2 ranks
    assert share(2, 3, 1) == {"cuda:1": 12, "cpu": 33, "disk": 300}
    assert share(1, 1, 0) == {"cuda:0": 12, "cpu": 100, "disk": 900}  # one rank: all of it
    # sizes --max-memory gives stay; the measured cuda:0 is shared by both local ranks
    given = {CPU, parse_device(1)}
    assert share(2, 2, 0, given) == {"cuda:0": 6, "cuda:1": 12, "cpu": 100, "disk": 450}


def test_a_mismatched_checkpoint_is_refused_at_start_up(chat_model: Path, tmp_path: Path) -> None:
    other = make_tiny_chat(tmp_path / "other", byte_tokenizer(), seed=7)  # same shapes
    argv = [[*DEVICEMAP, *RUN, str(chat_model)], [*DEVICEMAP, *RUN, str(other)]]
    results = launch(argv, tmp_path, timeout=60)
    for r in results:
        assert r.returncode == 1
        assert "error: the ranks did not start alike: rank 1 has weights" in r.stderr
    assert all("loaded in" not in r.stderr for r in results)  # before any weight is read


def test_chat_over_ranks_answers_as_one_process(chat_model: Path, tmp_path: Path) -> None:
    messages = b"hi there\n/reset\nwhat now?\n/help\nand then?\n"
    chat = ["chat", str(chat_model), "--max-new-tokens", "6"]
    single = devicemap(*chat, input=messages.decode())
    assert single.returncode == 0, single.stderr
    with Ranks([[*DEVICEMAP, *chat]] * 2, tmp_path, timeout=60, stdin=messages) as ranks:
        results = ranks.wait(timeout=120)
    assert [r.returncode for r in results] == [0, 0], results[1].stderr
    assert results[0].stdout == single.stdout and single.stdout.count("\n") == 3
    assert results[1].stdout == ""


def completions(port: int, prompts: list[str], **options: Any) -> list[str]:
    """The /v1/completions texts of `prompts`, sent together (one thread each)."""
    import http.client
    import threading

    texts = [""] * len(prompts)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/v1/models")
    model = json.loads(conn.getresponse().read())["data"][0]["id"]
    conn.close()

    def ask(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body = {"model": model, "prompt": prompts[i], "max_tokens": 8, **options}
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        reply = json.loads(conn.getresponse().read())
        texts[i] = reply["choices"][0]["text"] if "choices" in reply else f"failed: {reply}"
        conn.close()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return texts


def test_serve_over_ranks_answers_as_one_process(chat_model: Path, tmp_path: Path) -> None:
    from live_server import Server

    prompts = ["The capital of", "Once upon a time", "1 2 3", "hello"]
    seeded = {"temperature": 0.9, "seed": 5}

    def one_by_one(port: int, **options: Any) -> list[str]:
        return [completions(port, [p], **options)[0] for p in prompts]

    single = Server(chat_model, "--max-batch", "4")
    try:
        expected = one_by_one(single.port, temperature=0), one_by_one(single.port, **seeded)
    finally:
        single.stop()
    port = str(free_port())
    serve = [*DEVICEMAP, "serve", str(chat_model), "--max-batch", "4", "--port", port]
    with Ranks([serve] * 2, tmp_path, timeout=60, env={"DEVICEMAP_API_KEY": ""}) as ranks:
        ranks.wait_for(0, "serving ")
        got = one_by_one(int(port), temperature=0), one_by_one(int(port), **seeded)
        # together: batched, rows joining and leaving, every rank taking rank 0's steps
        together = completions(int(port), prompts * 2, temperature=0)
        again = one_by_one(int(port), temperature=0)
        ranks.signal(0, signal.SIGTERM)  # rank 0 stops: the others follow it out
        results = ranks.wait(timeout=60)
    assert got == expected
    assert all(text and not text.startswith("failed") for text in got[0] + got[1]), got
    assert all(text and not text.startswith("failed") for text in together), together
    assert again == got[0]  # the batch left the ranks in step
    assert [r.returncode for r in results] == [0, 0], results[1].stderr
    assert "rank 1: serving rank 0's requests" in results[1].stderr


LONG = ["run", "-p", "hello", "--raw", "--max-new-tokens", "400"]


def test_a_killed_rank_makes_the_others_fail_fast(chat_model: Path, tmp_path: Path) -> None:
    argv = [[*DEVICEMAP, *LONG, str(chat_model)]] * 3
    with Ranks(argv, tmp_path, timeout=60) as ranks:
        ranks.wait_for(1, "loaded in")
        ranks.signal(1, signal.SIGKILL)
        start = time.monotonic()
        results = ranks.wait(timeout=60)
    assert time.monotonic() - start < 20  # not the 60 s timeout: the connection closed
    for r in (results[0], results[2]):
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr
    # each names rank 1: the rank it lost (rank 2 waiting for its hidden states), or where
    # the failure began (rank 0 lost rank 2; rank 2 broadcasting its logits to a dead rank)
    for r in (results[0], results[2]):
        assert "rank 1 did not" in r.stderr or "the failure began at rank 1 (" in r.stderr, r
    assert "rank 2: rank 2 did not" not in results[2].stderr


def test_a_hung_rank_makes_the_others_fail_within_the_timeout(
    chat_model: Path, tmp_path: Path
) -> None:
    argv = [[*DEVICEMAP, *LONG, str(chat_model)]] * 2
    with Ranks(argv, tmp_path, timeout=4) as ranks:
        ranks.wait_for(1, "loaded in")
        ranks.signal(1, signal.SIGSTOP)
        start = time.monotonic()
        ranks.procs[0].wait(timeout=60)
        took = time.monotonic() - start
        first = ranks.result(0)
    assert first.returncode == 1, first.stderr
    assert "rank 1 did not" in first.stderr and "within 4 s" in first.stderr
    assert took < 30


@pytest.mark.skipif(
    shutil.which("torchrun", path=str(Path(PYTHON).parent)) is None, reason="no torchrun"
)
def test_torchrun_standalone_run_equals_one_process(chat_model: Path, single_run: str) -> None:
    torchrun = str(Path(PYTHON).parent / "torchrun")
    both = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "devicemap",
            *RUN,
            str(chat_model),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert both.returncode == 0, both.stderr[-3000:]
    assert both.stdout == single_run


def test_bench_under_ranks_is_refused(chat_model: Path) -> None:
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1"}  # refused before joining any rank
    result = devicemap("bench", str(chat_model), env=env)
    assert result.returncode == 1 and "bench/pipeline.py" in result.stderr


def test_one_process_unless_torchrun_started_several(monkeypatch) -> None:
    from devicemap.errors import BadOption
    from devicemap.run import ranks

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not ranks.launched()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not ranks.launched()
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert ranks.launched() and ranks.world_size() == 3
    monkeypatch.setenv("WORLD_SIZE", "many")
    with pytest.raises(BadOption, match="WORLD_SIZE='many'"):
        ranks.launched()
    monkeypatch.setenv("DEVICEMAP_RANK_TIMEOUT", "-3")
    with pytest.raises(BadOption, match="DEVICEMAP_RANK_TIMEOUT='-3'"):
        ranks.rank_timeout()
