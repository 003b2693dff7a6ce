"""The planner on hand-made skeletons with known sizes, and on the full-size configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from devicemap.devices import CPU, DISK, Device
from devicemap.errors import DoesNotFit, PinError, PlanError, PlanMismatch, UnknownDevice
from devicemap.model.checkpoint import ModelSource
from devicemap.model.skeleton import Block, Skeleton
from devicemap.plan.options import PlanOptions
from devicemap.plan.planner import (
    PLAN_FORMAT,
    Plan,
    default_context,
    make_plan,
    plan,
    plan_fingerprint,
)

CONFIGS = Path(__file__).parent / "data" / "configs"
GPU0, GPU1, GPU2 = Device("cuda", 0), Device("cuda", 1), Device("cuda", 2)
GIB = 2**30


def block(name: str, nbytes: int, *, kv: int = 0, act: int = 0, window: int | None = None) -> Block:
    params = (f"{name}.weight",) if nbytes else ()
    return Block(name, params, nbytes, True, kv, window, act)


def skeleton_of(
    blocks: list[Block],
    *,
    tied: tuple[tuple[str, ...], ...] = (),
    output: str | None = None,
    logits: int = 0,
    max_positions: int | None = None,
    dtype: torch.dtype = torch.float32,
    name: str = "toy",
    fingerprint: str = "f" * 64,
) -> Skeleton:
    """A synthetic Skeleton: the planner reads only blocks, ties and the scalars."""
    source = ModelSource(name, Path("config.json"), Path("."), (), None)
    return Skeleton(
        torch.nn.Module(), None, source, dtype, tuple(blocks), "forward", tied, output, logits,
        max_positions, fingerprint,
    )  # fmt: skip


def layers(count: int, nbytes: int = 100, **costs: int) -> list[Block]:
    return [block(f"model.layers.{i}", nbytes, **costs) for i in range(count)]  # type: ignore[arg-type]


def decoder(count: int = 4, *, tie: bool = False) -> Skeleton:
    """embed (100 B), `count` layers (100 B, KV 1 B/token, act 2 B/token), norm (10 B), head."""
    blocks = [
        block("model.embed_tokens", 100, act=1),
        *layers(count, kv=1, act=2),
        block("model.norm", 10, act=1),
        block("lm_head", 0 if tie else 100, act=1),
    ]
    tied = (("model.embed_tokens", "lm_head"),) if tie else ()
    return skeleton_of(blocks, tied=tied, output="lm_head", logits=4)


def opts(context: int = 10, **kwargs: object) -> PlanOptions:
    return PlanOptions(context=context, **kwargs)  # type: ignore[arg-type]


# --- exact maps -----------------------------------------------------------------


def test_sequential_fills_each_gpu_in_order():
    sk = skeleton_of(layers(4))
    p = make_plan(sk, {GPU0: 250, GPU1: 250, CPU: 1000}, opts(strategy="sequential"))
    assert p.device_map == {
        "model.layers.0": 0,
        "model.layers.1": 0,
        "model.layers.2": 1,
        "model.layers.3": 1,
    }
    assert p.exec_map == p.device_map
    assert [(u.device, u.weights, u.free) for u in p.devices] == [
        (GPU0, 200, 50),
        (GPU1, 200, 50),
        (CPU, 0, 1000),
    ]


def test_sequential_leaves_later_gpus_empty_when_the_first_holds_all():
    sk = skeleton_of(layers(4))
    p = make_plan(sk, {GPU0: 1000, GPU1: 1000}, opts(strategy="sequential"))
    assert set(p.device_map.values()) == {0}


def test_balanced_splits_in_proportion_to_budgets():
    sk = skeleton_of(layers(8))
    p = make_plan(sk, {GPU0: 1000, GPU1: 3000}, opts(strategy="balanced"))
    assert list(p.device_map.values()) == [0, 0, 1, 1, 1, 1, 1, 1]
    even = make_plan(sk, {GPU0: 1000, GPU1: 1000, GPU2: 1000}, opts(strategy="balanced"))
    assert list(even.device_map.values()) == [0, 0, 0, 1, 1, 2, 2, 2]  # split at midpoints


def test_balanced_low_0_keeps_gpu0_empty_when_the_others_hold_everything():
    sk = skeleton_of(layers(4))
    p = make_plan(sk, {GPU0: 1000, GPU1: 1000, GPU2: 1000}, opts(strategy="balanced_low_0"))
    assert list(p.device_map.values()) == [1, 1, 2, 2]
    assert p.usage(0).weights == 0


def test_balanced_low_0_gives_gpu0_only_what_the_others_cannot_hold():
    sk = skeleton_of(layers(6))
    p = make_plan(sk, {GPU0: 1000, GPU1: 250, GPU2: 250}, opts(strategy="balanced_low_0"))
    assert list(p.device_map.values()) == [0, 0, 1, 1, 2, 2]


def test_balanced_falls_back_to_sequential_when_the_gpus_are_full():
    sk = skeleton_of(layers(6))
    budgets = {GPU0: 250, GPU1: 250, CPU: 1000}
    balanced = make_plan(sk, budgets, opts(strategy="balanced", offload_exec="cpu"))
    sequential = make_plan(sk, budgets, opts(strategy="sequential", offload_exec="cpu"))
    assert balanced.device_map == sequential.device_map
    assert list(balanced.device_map.values()) == [0, 0, 1, 1, "cpu", "cpu"]


def test_device_map_keys_follow_execution_order_and_use_accelerate_values():
    sk = skeleton_of([block("b", 100), block("a", 100), block("c", 100)])
    budgets = {GPU1: 100, Device("mps"): 100, CPU: 100}
    p = make_plan(sk, budgets, opts(strategy="sequential", offload_exec="cpu"))
    assert list(p.device_map) == ["b", "a", "c"]
    assert p.device_map == {"b": 1, "a": "mps", "c": "cpu"}


# --- offload and the reserves ---------------------------------------------------


def test_offloaded_blocks_execute_on_gpu0_which_holds_their_kv_and_staging():
    sk = skeleton_of(layers(4, kv=1, act=3))
    p = make_plan(sk, {GPU0: 350, CPU: 150, DISK: 1000}, opts(context=10, strategy="sequential"))
    # GPU0: one layer (100) + KV of all 4 layers (4 x 1 B x 10 tokens) + workspace
    # (3 B x 10 tokens) + staging (2 x 100) = 370 > 350, so it holds none; cpu takes one.
    assert p.device_map == {
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "disk",
        "model.layers.3": "disk",
    }
    assert set(p.exec_map.values()) == {0}
    gpu = p.usage(0)
    assert (gpu.weights, gpu.kv_cache, gpu.workspace, gpu.staging) == (0, 40, 30, 200)
    assert (p.usage("cpu").used, p.usage("disk").used) == (100, 300)


def test_gpu_holds_what_fits_after_the_reserve_for_offloaded_blocks():
    sk = skeleton_of(layers(6, kv=1, act=3))
    p = make_plan(sk, {GPU0: 600, CPU: 1000}, opts(context=10, strategy="sequential"))
    # 3 layers (300) + KV 6 x 10 + workspace 30 + staging 200 = 590 <= 600
    assert list(p.device_map.values()) == [0, 0, 0, "cpu", "cpu", "cpu"]
    assert p.usage(0).used == 590


def test_offload_exec_cpu_runs_offloaded_blocks_on_the_cpu_without_staging():
    sk = skeleton_of(layers(4, kv=1, act=3))
    budgets = {GPU0: 250, CPU: 200, DISK: 1000}
    p = make_plan(sk, budgets, opts(context=10, strategy="sequential", offload_exec="cpu"))
    assert p.device_map == {
        "model.layers.0": 0,
        "model.layers.1": 0,
        "model.layers.2": "cpu",
        "model.layers.3": "disk",
    }
    assert p.exec_map == {**p.device_map, "model.layers.3": "cpu"}
    cpu = p.usage("cpu")
    assert (cpu.weights, cpu.kv_cache, cpu.workspace, cpu.staging) == (100, 20, 30, 0)
    assert p.usage(0).kv_cache == 20
    assert p.usage("disk").used == 100  # disk holds weights only


def test_no_gpu_means_everything_executes_on_the_cpu():
    sk = skeleton_of(layers(3, kv=1))
    p = make_plan(sk, {CPU: 220, DISK: 1000}, opts(context=10, strategy="sequential"))
    assert list(p.device_map.values()) == ["cpu", "disk", "disk"]
    assert set(p.exec_map.values()) == {"cpu"}
    assert p.usage("cpu").kv_cache == 30


def test_kv_cache_respects_sliding_windows_and_batch():
    sk = skeleton_of([block("full", 10, kv=2), block("window", 10, kv=2, window=4)])
    p = make_plan(sk, {GPU0: 10_000}, opts(context=10, batch=3))
    assert p.usage(0).kv_cache == 2 * 10 * 3 + 2 * 4 * 3


def test_workspace_is_the_largest_block_at_the_prefill_length():
    sk = skeleton_of([block("a", 10, act=5), block("b", 10, act=7)])
    assert make_plan(sk, {GPU0: 10_000}, opts(context=10, batch=2)).usage(0).workspace == 140
    chunked = make_plan(sk, {GPU0: 10_000}, opts(context=10, batch=2, prefill=4))
    assert chunked.usage(0).workspace == 7 * 4 * 2


def test_logits_count_on_the_lm_heads_execution_device():
    sk = decoder(2)
    budgets = {GPU0: 10_000, GPU1: 10_000}
    p = make_plan(sk, budgets, opts(context=10, batch=2, strategy="sequential"))
    assert p.usage(0).logits == 4 * 1 * 2  # generate: the last token's logits
    every = make_plan(sk, budgets, opts(context=10, batch=2, strategy="sequential", logits="all"))
    assert every.usage(0).logits == 4 * 10 * 2
    pinned = make_plan(sk, budgets, opts(context=10, strategy="sequential", pins={"lm_head": GPU1}))
    assert (pinned.usage(0).logits, pinned.usage(1).logits) == (0, 4)


def test_max_context_is_the_longest_that_fits_this_placement():
    sk = skeleton_of([block("l", 100, kv=2, act=1)], max_positions=1000)
    p = make_plan(sk, {GPU0: 400}, opts(context=10))
    # 100 + 2 B x c + 1 B x c <= 400  ->  c = 100
    assert p.max_context == 100
    roomy = make_plan(sk, {GPU0: 10**6}, opts(context=10))
    assert roomy.max_context == 1000  # capped at the model's positions


# --- pins and ties ------------------------------------------------------------


def test_pins_force_blocks_and_prefixes_onto_devices():
    sk = decoder(4)
    budgets = {GPU0: 10_000, GPU1: 10_000, CPU: 10_000}
    p = make_plan(
        sk, budgets, opts(strategy="sequential", pins={"lm_head": GPU1, "model.layers": CPU})
    )
    assert p.device_map["lm_head"] == 1
    assert [p.device_map[f"model.layers.{i}"] for i in range(4)] == ["cpu"] * 4
    assert p.device_map["model.embed_tokens"] == 0
    assert "pin lm_head -> cuda:1: lm_head" in p.explain()


def test_most_specific_pin_wins_and_a_pin_inside_a_block_moves_the_block():
    blocks = [
        Block(f"layers.{i}", (f"layers.{i}.mlp.weight",), 100, True, 0, None, 0) for i in range(3)
    ]
    sk = skeleton_of(blocks)
    pins = {"layers": CPU, "layers.1": GPU1, "layers.2.mlp": GPU0}
    p = make_plan(sk, {GPU0: 1000, GPU1: 1000, CPU: 1000}, opts(pins=pins))
    assert p.device_map == {"layers.0": "cpu", "layers.1": 1, "layers.2": 0}


def test_bad_pins_are_all_listed_with_close_names():
    sk = decoder(2)
    pins = {"lm_haed": GPU0, "model.layerz": GPU0, "model.norm": GPU1, "model.layers.0.nope": CPU}
    with pytest.raises(PinError) as err:
        make_plan(sk, {GPU0: 10_000, CPU: 10_000}, opts(pins=pins))
    message = str(err.value)
    assert "'lm_haed'" in message and "'lm_head'" in message
    assert "'model.layerz'" in message and "'model.layers'" in message
    assert "'model.norm' -> cuda:1: cuda:1 has no budget" in message
    assert "'model.layers.0.nope'" in message


def test_pin_with_an_unreadable_device_is_a_pin_error():
    sk = decoder(2)
    with pytest.raises(PinError, match="lm_head='gpu:x'"):
        plan(sk, max_memory={0: 10_000}, pins={"lm_head": "gpu:x", "model.norm": 0})


def test_tied_blocks_share_the_device_of_the_first_one():
    sk = decoder(4, tie=True)
    options = opts(context=10, strategy="sequential", offload_exec="cpu")
    p = make_plan(sk, {GPU0: 230, CPU: 10_000}, options)
    # embed + head: 100 B + workspace 10 + logits 4; a layer more would need 234 B
    assert p.device_map["lm_head"] == p.device_map["model.embed_tokens"] == 0
    assert p.device_map["model.layers.0"] == "cpu"
    assert "tied: model.embed_tokens, lm_head share weights" in p.explain()


def test_a_pin_on_one_tied_block_moves_the_whole_group():
    sk = decoder(4, tie=True)
    p = make_plan(sk, {GPU0: 10_000, CPU: 10_000}, opts(pins={"lm_head": CPU}))
    assert p.device_map["lm_head"] == p.device_map["model.embed_tokens"] == "cpu"


def test_conflicting_pins_in_a_tied_group_are_an_error():
    sk = decoder(2, tie=True)
    pins = {"lm_head": CPU, "model.embed_tokens": GPU0}
    with pytest.raises(PinError, match=r"tied blocks .*pinned to different devices"):
        make_plan(sk, {GPU0: 10_000, CPU: 10_000}, opts(pins=pins))


# --- when it does not fit ---------------------------------------------------------


def test_does_not_fit_says_by_how_much_and_what_would_fit():
    sk = skeleton_of(layers(100, nbytes=GIB, kv=1000), max_positions=10_000)
    with pytest.raises(DoesNotFit) as err:
        make_plan(sk, {GPU0: 40 * GIB, CPU: 40 * GIB}, opts(context=8192, batch=2))
    exc = err.value
    need = 100 * GIB + 100 * 1000 * 8192 * 2
    assert exc.shortfall == need - 80 * GIB
    assert "100.00 GiB" in str(exc) and "80.00 GiB" in str(exc)
    assert "--dtype bfloat16 instead of float32" in exc.suggestions[0]
    assert any(s.startswith("add --max-memory disk=") for s in exc.suggestions)
    assert any("--max-memory cpu=" in s for s in exc.suggestions)
    for text in exc.suggestions:
        assert text in str(exc)


def test_suggested_cpu_budget_is_checked_in_placement_order():
    # budgets without cpu: the suggested cpu budget must fit with cpu placed before disk
    sk = skeleton_of(layers(100, nbytes=GIB, kv=1000), max_positions=10_000)
    budgets = {GPU0: 40 * GIB, DISK: 10 * GIB}
    with pytest.raises(DoesNotFit) as err:
        make_plan(sk, budgets, opts(context=1024))
    (cpu,) = [s for s in err.value.suggestions if s.startswith("add --max-memory cpu=")]
    gib = int(cpu.removeprefix("add --max-memory cpu=").split("GiB")[0])
    fitted = make_plan(sk, {**budgets, CPU: gib * GIB}, opts(context=1024))
    assert [u.device for u in fitted.devices] == [GPU0, CPU, DISK]
    with pytest.raises(DoesNotFit):
        make_plan(sk, {**budgets, CPU: (gib - 1) * GIB}, opts(context=1024))


def test_does_not_fit_suggests_the_context_and_batch_that_fit():
    sk = skeleton_of(layers(2, kv=10), max_positions=1000)
    with pytest.raises(DoesNotFit) as err:
        make_plan(sk, {GPU0: 600}, opts(context=100, batch=2, strategy="sequential"))
    # weights 200 + KV 2 x 10 B x c x b <= 600: c = 10 at batch 2; batch 1 at c=100 fails
    assert "--context 10 instead of 100" in err.value.suggestions
    assert not any(s.startswith("--batch") for s in err.value.suggestions)
    with pytest.raises(DoesNotFit) as err:
        make_plan(sk, {GPU0: 600}, opts(context=10, batch=5, strategy="sequential"))
    assert "--batch 2 instead of 5" in err.value.suggestions


def test_the_exec_gpu_too_small_for_its_reserves_suggests_cpu_execution():
    sk = skeleton_of(layers(4, kv=1))
    with pytest.raises(DoesNotFit) as err:
        make_plan(sk, {GPU0: 50, CPU: 1000}, opts(context=10, strategy="sequential"))
    assert err.value.shortfall > 0
    assert any(s.startswith("--offload-exec cpu") for s in err.value.suggestions)


def test_pins_that_overflow_a_device_do_not_fit():
    sk = decoder(2)
    with pytest.raises(DoesNotFit, match="cuda:0 must hold"):
        make_plan(sk, {GPU0: 150, CPU: 10_000}, opts(pins={"model.layers": GPU0}))


# --- options and wrapper ----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "budgets", "match"),
    [
        (opts(context=0), {GPU0: 10_000}, "context must be a positive"),
        (opts(batch=0), {GPU0: 10_000}, "batch must be a positive"),
        (opts(strategy="fastest"), {GPU0: 10_000}, "unknown strategy 'fastest'"),
        (opts(offload_exec="tpu"), {GPU0: 10_000}, "unknown offload_exec"),
        (opts(), {}, "no device has a budget"),
        (opts(), {DISK: 10_000}, "only disk has a budget"),
        (opts(context=2000), {GPU0: 10_000}, "context 2000 is longer than toy supports"),
    ],
)
def test_bad_options_are_plan_errors(options, budgets, match):
    sk = skeleton_of(layers(2), max_positions=1024)
    with pytest.raises(PlanError, match=match):
        make_plan(sk, budgets, options)


def test_same_input_gives_the_same_plan():
    sk = decoder(6, tie=True)
    budgets = {GPU0: 300, GPU1: 300, CPU: 400, DISK: 10_000}
    first = make_plan(sk, budgets, opts(strategy="balanced"))
    assert make_plan(sk, dict(reversed(budgets.items())), opts(strategy="balanced")) == first


def test_plan_wrapper_resolves_budgets_and_pins():
    sk = decoder(2)
    p = plan(sk, max_memory={"cuda:0": "1KiB", "cpu": "1MB"}, context=8, pins={"lm_head": "cpu"})
    assert p.options.context == 8 and p.options.pins == {"lm_head": CPU}
    assert [u.budget for u in p.devices] == [1024, 10**6]
    assert p.device_map["lm_head"] == "cpu"
    with pytest.raises(UnknownDevice):
        plan(sk, max_memory={"tpu": "1GiB"})
    with pytest.raises(PlanError, match="already built at float32"):
        plan(sk, max_memory={0: 10_000}, dtype="bfloat16")


def test_default_context_is_4096_or_the_models_limit():
    assert default_context(skeleton_of(layers(1), max_positions=2048)) == 2048
    assert default_context(skeleton_of(layers(1), max_positions=131072)) == 4096
    assert default_context(skeleton_of(layers(1))) == 4096


# --- explain and JSON ---------------------------------------------------------


def test_explain_compresses_layer_ranges_and_says_why():
    sk = decoder(8)
    p = make_plan(sk, {GPU0: 620, CPU: 10_000}, opts(context=10, strategy="sequential"))
    text = p.explain()
    assert "cuda:0: model.embed_tokens, model.layers.0-1 (300 B weights) + KV" in text
    assert "cpu: model.layers.2-7, model.norm, lm_head (710 B weights)" in text
    assert "model.layers.2 (100 B) did not fit in what cuda:0 had left" in text
    assert "stored on cpu execute on cuda:0 (streamed in)" in text


def test_json_round_trip(tmp_path):
    sk = decoder(4, tie=True)
    p = make_plan(sk, {GPU0: 400, CPU: 150, DISK: 10_000}, opts(pins={"model.norm": CPU}))
    assert set(p.device_map.values()) == {0, "cpu", "disk"}
    path = tmp_path / "plan.json"
    p.save(path)
    assert Plan.load(path) == p
    data = json.loads(path.read_text())
    assert data["format"] == PLAN_FORMAT and data["fingerprint"] == plan_fingerprint(sk)
    assert data["dtype"] == "float32" and data["options"]["pins"] == {"model.norm": "cpu"}
    for entry in data["devices"]:
        assert entry["used"] + entry["free"] == entry["budget"]
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="is not JSON"):
        Plan.load(tmp_path / "bad.json")
    sk = decoder(2)
    data = make_plan(sk, {GPU0: 10_000}, opts()).to_json()
    (tmp_path / "old.json").write_text(json.dumps({**data, "format": 0}))
    with pytest.raises(PlanMismatch, match="plan format 0"):
        Plan.load(tmp_path / "old.json")
    (tmp_path / "cut.json").write_text(
        json.dumps({k: v for k, v in data.items() if k != "devices"})
    )
    with pytest.raises(PlanError, match="damaged plan file"):
        Plan.load(tmp_path / "cut.json")


def test_check_rejects_a_plan_for_another_model_or_dtype():
    sk = decoder(2)
    p = make_plan(sk, {GPU0: 10_000}, opts())
    p.check(sk)
    other = skeleton_of(layers(2), name="other", fingerprint="0" * 64)
    with pytest.raises(PlanMismatch, match=r"made for toy \(float32\), not for other"):
        p.check(other)
    with pytest.raises(PlanMismatch):
        p.check(skeleton_of(layers(2), dtype=torch.bfloat16))


# --- full-size configs, built on meta (needs devicemap.model.skeleton) -----------------


@pytest.fixture(scope="module")
def skeletons():
    from devicemap.model.skeleton import build_skeleton

    cache: dict[str, Skeleton] = {}

    def get(name: str) -> Skeleton:
        if name not in cache:
            cache[name] = build_skeleton(CONFIGS / name / "config.json")
        return cache[name]

    return get


def test_llama_3_70b_done_when_placement(skeletons):
    sk = skeletons("llama-3-70b")
    budgets = {GPU0: 40 * GIB, GPU1: 40 * GIB, CPU: 64 * GIB}
    p = make_plan(sk, budgets, opts(context=8192))
    assert len(p.device_map) == len(sk.blocks)
    for usage in p.devices:
        assert 0 <= usage.used <= usage.budget
    assert p.usage(0).kv_cache > 0 and p.usage(1).kv_cache > 0
    assert p.usage(0).workspace > 0 and p.usage(0).staging > 0
    # every layer's KV: 80 layers x 8 kv heads x 128 x 2 (k, v) x 2 B x 8192 tokens
    assert sum(u.kv_cache for u in p.devices) == 80 * 8 * 128 * 2 * 2 * 8192
    assert p.max_context == 8192


@pytest.mark.parametrize(
    "name",
    ["llama-3.1-8b", "mixtral-8x7b", "phi-3-mini-4k", "qwen2.5-72b", "llava-1.5-7b"],
)
def test_full_size_configs_plan_within_budget(skeletons, name):
    sk = skeletons(name)
    weights = sum(b.nbytes for b in sk.blocks)
    budgets = {GPU0: weights // 3, GPU1: weights // 3, CPU: weights // 2, DISK: weights}
    p = make_plan(sk, budgets, opts(context=min(4096, sk.max_positions or 4096)))
    assert list(p.device_map) == [b.name for b in sk.blocks]
    assert sum(u.weights for u in p.devices) == weights
    assert all(u.used <= u.budget for u in p.devices)
    assert p.usage(0).kv_cache > 0


def test_phi3_sliding_window_caps_the_kv_cache(skeletons):
    sk = skeletons("phi-3-mini-4k")
    p = make_plan(sk, {GPU0: 100 * GIB}, opts(context=4096))
    windows = {b.kv_window for b in sk.blocks if b.kv_bytes_per_token}
    expected = sum(b.kv_bytes_per_token * min(4096, b.kv_window or 4096) for b in sk.blocks)
    assert windows and p.usage(0).kv_cache == expected


def test_llava_vision_tower_pin(skeletons):
    sk = skeletons("llava-1.5-7b")
    pins = {"model.vision_tower": GPU1, "lm_head": GPU0}
    p = make_plan(sk, {GPU0: 20 * GIB, GPU1: 20 * GIB}, opts(context=2048, pins=pins))
    tower = [name for name in p.device_map if name.startswith("model.vision_tower")]
    assert tower and all(p.device_map[name] == 1 for name in tower)
    assert p.device_map["lm_head"] == 0


def test_tiny_qwen2_tied_embeddings_stay_together(tiny_models):
    from devicemap.model.skeleton import build_skeleton

    sk = build_skeleton(tiny_models["qwen2"])
    assert ("model.embed_tokens", "lm_head") in sk.tied
    layer = next(b.nbytes for b in sk.blocks if b.name == "model.layers.0")
    budgets = {GPU0: 6 * layer, GPU1: 3 * layer, CPU: 10 * layer}
    p = plan(sk, max_memory=budgets, context=64, strategy="sequential", pins={"lm_head": "cpu"})
    assert p.device_map["model.embed_tokens"] == p.device_map["lm_head"] == "cpu"
    assert p.exec_map["lm_head"] == 0 and p.usage(0).logits == sk.logits_bytes_per_token
    assert p.device_map["model.layers.0"] == 0
    assert sum(u.weights for u in p.devices) == sum(b.nbytes for b in sk.blocks)
