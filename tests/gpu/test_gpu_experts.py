"""MoE on a real GPU (issue 15): dense parts and KV on cuda:0, routed experts in RAM computed
by the CPU, or copied into the GPU expert cache and computed on the GPU. Compared with the
plain model on cuda:0 (CPU and GPU matmuls round differently: close, not equal).

Skipped without CUDA (tests/gpu/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

import devicemap
from devicemap.model.skeleton import build_skeleton
from devicemap.run.experts import CACHE_ATTR
from test_moe import IDS, MOE, experts_of, tiny_moe


def split(arch: str, tmp_path: Path, slots: int) -> tuple[Any, Any]:
    path = tiny_moe(arch, tmp_path / arch)
    skeleton = build_skeleton(path)
    pins = {b.name: "cpu" for b in skeleton.blocks if b.experts}
    plan = devicemap.plan(
        skeleton, max_memory={0: "2GiB", "cpu": "2GiB"}, pins=pins, expert_cache=slots
    )
    assert set(experts_of(plan).values()) == {"cpu"}
    assert all(v == 0 for k, v in plan.device_map.items() if not k.endswith(".experts"))
    expected = getattr(tf, MOE[arch]).from_pretrained(path).eval().to("cuda:0")
    return devicemap.load(skeleton, plan=plan, progress=False), expected


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss"])
@pytest.mark.parametrize("slots", [0, 3])
def test_experts_in_ram_with_dense_parts_on_the_gpu(arch: str, slots: int, tmp_path: Path) -> None:
    model, expected = split(arch, tmp_path, slots)
    ids = IDS.to("cuda:0")
    try:
        caches = {id(m.__dict__[CACHE_ATTR][0]): m.__dict__[CACHE_ATTR][0]
                  for m in model.modules() if CACHE_ATTR in m.__dict__}  # fmt: skip
        assert len(caches) == (1 if slots else 0)
        with torch.no_grad():
            ours, theirs = model(ids).logits, expected(ids).logits
        assert ours.device.type == "cuda"
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)
        greedy: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False}
        assert torch.equal(model.generate(ids, **greedy), expected.generate(ids, **greedy))
        for cache in caches.values():
            assert cache.device.type == "cuda" and cache.stats.hits > 0, cache.stats
    finally:
        devicemap.release(model)
    assert not any(CACHE_ATTR in m.__dict__ for m in model.modules())
