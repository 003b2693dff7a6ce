"""The GPU expert cache's bookkeeping, on the CPU (issue 15): a fixed pool of slots filled
least-recently-used, the planner budgeting it, and a model computing from it exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import devicemap
from devicemap.errors import BadOption
from devicemap.model.skeleton import build_skeleton, is_experts
from devicemap.plan.planner import plan_from_json
from devicemap.run.expert_cache import ExpertCache, install, slot_bytes, uninstall
from devicemap.run.experts import CACHE_ATTR, EXPERTS_ATTR, ExpertWeights
from test_moe import CONFIGS, IDS, MOE, experts_of, tiny_moe

GIB = 2**30


def fake_experts(count: int = 6) -> ExpertWeights:
    """`count` experts of gate [4, 8], up [4, 8], down [8, 4], each filled with its index."""

    def full(shape: tuple[int, int], e: int) -> torch.Tensor:
        return torch.full(shape, float(e))

    return ExpertWeights({
        "gate_up_proj": [(full((4, 8), e), full((4, 8), e + 0.5)) for e in range(count)],
        "down_proj": [(full((8, 4), -e),) for e in range(count)],
    })  # fmt: skip


def test_a_hit_is_not_copied_again_and_the_least_recently_used_goes_first() -> None:
    source = fake_experts()
    cache = ExpertCache(torch.device("cpu"), slot_bytes(source), slots=3)
    held = cache.take("layer0", source, [0, 1])
    assert held is not None and cache.stats.misses == 2 and cache.stats.hits == 0
    assert torch.equal(held["gate_up_proj"][1][1], source.parts["gate_up_proj"][1][1])
    assert torch.equal(held["down_proj"][0][0], source.parts["down_proj"][0][0])
    copied = cache.stats.copied
    cache.take("layer0", source, [1, 2])  # 1 hits; 2 takes the third slot
    assert (cache.stats.hits, cache.stats.misses) == (1, 3)
    cache.take("layer0", source, [3])  # full: 0 is the least recently used
    assert not cache.holds("layer0", 0) and all(cache.holds("layer0", e) for e in (1, 2, 3))
    assert cache.stats.copied == copied + 2 * source.nbytes([0])
    again = cache.take("layer0", source, [3, 1])
    assert again is not None and torch.equal(again["down_proj"][3][0], torch.full((8, 4), -3.0))
    assert cache.stats.hit_rate == pytest.approx(3 / 7)


def test_a_step_never_evicts_its_own_experts_and_layers_share_the_pool() -> None:
    source = fake_experts()
    cache = ExpertCache(torch.device("cpu"), slot_bytes(source), slots=2)
    cache.take("layer0", source, [0])
    cache.take("layer1", source, [0])  # the same expert index of another layer: another slot
    assert cache.holds("layer0", 0) and cache.holds("layer1", 0)
    held = cache.take("layer1", source, [4, 5])  # both slots go, neither to the other
    assert held is not None
    assert torch.equal(held["gate_up_proj"][4][0], torch.full((4, 8), 4.0))
    assert torch.equal(held["gate_up_proj"][5][0], torch.full((4, 8), 5.0))
    assert cache.take("layer1", source, [0, 1, 2]) is None  # more than the pool: not cached
    assert cache.stats.uncached == 1


def test_a_slot_too_small_for_an_expert_is_refused() -> None:
    source = fake_experts()
    need = 2 * 256 + source.parts["down_proj"][0][0].numel() * 4  # aligned gate, up; down
    cache = ExpertCache(torch.device("cpu"), need - 1, slots=2)
    with pytest.raises(ValueError, match="slot"):
        cache.take("layer0", source, [0])


# --- planned -------------------------------------------------------------------------


def test_the_planner_budgets_the_pool_on_the_gpu() -> None:
    skeleton = build_skeleton(CONFIGS / "qwen3-30b-a3b", dtype="bfloat16")
    budgets = {0: "24GiB", "cpu": "64GiB"}
    plain = devicemap.plan(skeleton, max_memory=budgets)
    cached = devicemap.plan(skeleton, max_memory=budgets, expert_cache=64)
    expert = max(b.expert_bytes for b in skeleton.blocks if b.experts)  # 9 MiB in bf16
    pool = cached.usage(0).expert_cache
    assert 64 * expert <= pool <= 64 * (expert + 4096)
    on_gpu = [v for v in experts_of(cached).values() if v == 0]
    assert len(on_gpu) < len([v for v in experts_of(plain).values() if v == 0])
    assert cached.usage(0).used <= cached.usage(0).budget == plain.usage(0).budget
    assert "expert cache" in cached.explain() and "64 slots" in cached.explain()
    again = plan_from_json(cached.to_json())
    assert again.options.expert_cache == 64 and again.usage(0).expert_cache == pool


def test_no_pool_when_every_expert_fits_on_the_gpus() -> None:
    skeleton = build_skeleton(CONFIGS / "qwen3-30b-a3b", dtype="bfloat16")
    plan = devicemap.plan(skeleton, max_memory={0: "80GiB"}, expert_cache=64)
    assert plan.usage(0).expert_cache == 0 and set(experts_of(plan).values()) == {0}


def test_a_pool_larger_than_the_gpu_is_refused_with_the_slots_that_fit() -> None:
    skeleton = build_skeleton(CONFIGS / "qwen3-30b-a3b", dtype="bfloat16")
    with pytest.raises(BadOption, match=r"--expert-cache \d+ or fewer"):
        devicemap.plan(skeleton, max_memory={0: "1GiB", "cpu": "200GiB"}, expert_cache=1000)
    with pytest.raises(devicemap.DevicemapError, match="expert_cache must be 0 or more"):
        devicemap.plan(skeleton, max_memory={0: "24GiB", "cpu": "64GiB"}, expert_cache=-1)


# --- computed from the pool ------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_a_model_computing_from_the_pool_equals_transformers(arch: str, tmp_path: Path) -> None:
    # the pool on the CPU stands in for a GPU's: the same lookups, copies and matmuls
    import transformers as tf

    path = tiny_moe(arch, tmp_path / arch)
    skeleton = build_skeleton(path)
    pins = {b.name: "disk" for b in skeleton.blocks if b.experts}
    plan = devicemap.plan(
        skeleton, max_memory={"cpu": "1GiB", "disk": "1GiB"}, pins=pins, offload_exec="cpu"
    )
    expected = getattr(tf, MOE[arch]).from_pretrained(path).eval()
    model = devicemap.load(skeleton, plan=plan, progress=False)
    members = [(n, m) for n, m in model.named_modules() if is_experts(m)]
    # qwen3_moe's experts are the checkpoint's per-expert tensors; gpt_oss's are fused in it
    assert any(EXPERTS_ATTR in m.__dict__ for _, m in members) == (arch == "qwen3_moe")
    cache = install(members, torch.device("cpu"), slots=3)
    assert cache is not None
    try:
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, expected(IDS).logits)  # prefill: > 3 experts
            greedy: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False}
            assert torch.equal(model.generate(IDS, **greedy), expected.generate(IDS, **greedy))
        assert cache.stats.uncached >= 1  # the prefills, computed where the experts are
        assert cache.stats.misses > 0 and cache.stats.hits > 0  # decode steps reuse slots
    finally:
        uninstall(model)
        devicemap.release(model)
    assert not any(CACHE_ATTR in m.__dict__ for m in model.modules())
