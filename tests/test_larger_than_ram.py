"""Models larger than RAM (issue 11): the disk tier's cache policy keeps a resident set in
the page cache and streams the rest through it, dropping each streamed block once it has
run, so cyclic access does not evict what was meant to stay."""

from __future__ import annotations

import json
import os
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import devicemap
from cgroup import memory_cgroup, run_in, why_not
from devicemap.model.skeleton import Block, build_skeleton
from devicemap.plan.planner import MemoryWarning, disk_split, plan_from_json
from tiny import make_tiny

MIB = 2**20


def block(name: str, mib: int) -> Block:
    return Block(name, (), mib * MIB, True, 0, None, 0)


def test_all_disk_blocks_stay_when_they_fit_and_none_without_a_limit() -> None:
    blocks = [block(f"b{i}", 100) for i in range(10)]
    assert disk_split(blocks, None) == ()
    assert disk_split(blocks, 10 * 100 * MIB + 300 * MIB) == ()  # all + a 3-block window


def test_the_fewest_blocks_are_streamed_spread_through_the_order() -> None:
    blocks = [block(f"b{i}", 100) for i in range(10)]
    streamed = disk_split(blocks, 700 * MIB)  # window 300 MiB: 4 blocks may stay
    assert len(streamed) == 6
    kept = [b.name for b in blocks if b.name not in streamed]
    assert len(kept) == 4 and kept != ["b0", "b1", "b2", "b3"]  # spread, not a prefix
    assert disk_split(blocks, 0) == tuple(b.name for b in blocks)  # no room: all streamed


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny("llama", tmp_path_factory.mktemp("ltr") / "llama", num_hidden_layers=8)


ON_DISK = {"model.layers": "disk"}  # every decoder layer


def test_the_plan_records_and_explains_the_split(llama: Path) -> None:
    budgets = {"cpu": "64MiB", "disk": "1GiB"}
    skeleton = build_skeleton(llama)
    disk = [b for b in skeleton.blocks if b.name.startswith("model.layers.")]
    cache = 3 * disk[0].nbytes + (64 << 20) + 2 * disk[0].nbytes  # window + two blocks
    plan = devicemap.plan(
        skeleton, max_memory=budgets, offload_exec="cpu", page_cache=cache, pins=ON_DISK
    )
    assert plan.streamed and set(plan.streamed) < {b.name for b in disk}
    line = next(r for r in plan.reasons if "resident (" in r)
    assert f"{len(plan.streamed)} streamed" in line and "read per token" in line
    assert "resident" in plan.explain()
    again = plan_from_json(json.loads(json.dumps(plan.to_json())))
    assert again.streamed == plan.streamed and again.options.page_cache == cache


def test_the_page_cache_left_after_the_plans_cpu_tier_is_the_default(
    llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from devicemap import devices

    monkeypatch.setattr(devices, "cpu_memory", lambda: (100 * MIB, 200 * MIB))
    budgets = {"cpu": "10MiB", "disk": "1GiB"}
    plan = devicemap.plan(llama, max_memory=budgets, offload_exec="cpu", context=64)
    on_cpu = next(u.used for u in plan.devices if str(u.device) == "cpu")
    assert 0 < on_cpu <= 10 * MIB
    assert plan.options.page_cache == int(100 * MIB * 0.9) - on_cpu
    # a cpu budget far above what the plan puts there (layers pinned to disk) does not
    # shrink the page cache: the budget is a cap, not what is used
    pins = {f"model.layers.{i}": "disk" for i in range(4)}
    roomy = {"cpu": "80MiB", "disk": "1GiB"}
    pinned = devicemap.plan(llama, max_memory=roomy, pins=pins, offload_exec="cpu", context=64)
    used = next(u.used for u in pinned.devices if str(u.device) == "cpu")
    assert used < 10 * MIB and pinned.options.page_cache == int(100 * MIB * 0.9) - used
    assert not pinned.streamed
    too_much = r"cpu budget \(1.00 GiB\) is more than .* \(100.00 MiB free"
    with pytest.warns(MemoryWarning, match=too_much):
        devicemap.plan(llama, max_memory={"cpu": "1GiB", "disk": "1GiB"}, offload_exec="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within what is free: no warning
        devicemap.plan(llama, max_memory=budgets, offload_exec="cpu", context=64)


def test_streamed_blocks_give_the_same_tokens_and_are_dropped(llama: Path) -> None:
    budgets = {"cpu": "64MiB", "disk": "1GiB"}
    plan = devicemap.plan(llama, max_memory=budgets, offload_exec="cpu", page_cache=0, pins=ON_DISK)
    assert plan.streamed  # nothing may stay: every disk block streamed
    ids = torch.tensor([[1, 5, 17, 42]])
    expected = _greedy(_reference(llama), ids)
    model = devicemap.load(llama, plan=plan, progress=False)
    try:
        assert torch.equal(_greedy(model, ids), expected)
        prefetcher = next(o for o in _offloads(model) if hasattr(o, "dropped"))
        assert set(prefetcher.dropped) == set(plan.streamed)
    finally:
        devicemap.release(model)


def _reference(path: Path) -> Any:
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path).eval()


def _greedy(model: Any, ids: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = model.generate(ids, max_new_tokens=4, do_sample=False)
    return out


def _offloads(model: Any) -> list[Any]:
    from devicemap.run.dispatch import _STATE

    return list(model.__dict__[_STATE].offloads)


# --- twice the cgroup's memory --------------------------------------------------------

_IN_CGROUP = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import torch
    import devicemap

    def read_bytes():
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])

    model = devicemap.load(sys.argv[1], max_memory={"cpu": "64MiB", "disk": "8GiB"},
                           offload_exec="cpu", context=64, progress=False)
    plan = model.devicemap_plan
    ids = torch.tensor([[1, 5, 17, 42]])
    tokens, reads = [], []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        for _ in range(4):
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
            before = read_bytes()
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            reads.append(read_bytes() - before)
    print(json.dumps({"tokens": tokens, "reads": reads, "streamed": list(plan.streamed),
                      "page_cache": plan.options.page_cache}))
    """
)

_LIMIT = 640 * MIB


@pytest.mark.skipif(why_not() is not None, reason=str(why_not()))
def test_a_model_twice_the_cgroups_memory_gives_the_same_tokens(tmp_path: Path) -> None:
    path = make_tiny(
        "llama", tmp_path / "big", hidden_size=1024, intermediate_size=2048,
        num_hidden_layers=44, num_attention_heads=16, num_key_value_heads=16, vocab_size=8000,
        shard_size="200MB",
    )  # fmt: skip
    files = sorted(path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    assert size >= 2 * _LIMIT
    ids = torch.tensor([[1, 5, 17, 42]])
    expected = _greedy(_reference(path), ids)[0, 4:].tolist()
    skeleton = build_skeleton(path)
    nbytes = {b.name: b.nbytes for b in skeleton.blocks}
    for file in files:  # cold: the child reads what it needs into its own cgroup
        fd = os.open(file, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    with memory_cgroup(_LIMIT) as group:
        done = run_in(group, _IN_CGROUP, [str(path)], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tokens"] == expected  # the same greedy tokens as the model in RAM
    streamed = sum(nbytes[n] for n in result["streamed"])
    assert result["streamed"] and len(result["streamed"]) < 44  # some stay resident
    reads = sorted(result["reads"])[1:-1]  # the middle two of four steps
    assert all(r <= 1.5 * streamed for r in reads), (reads, streamed)
