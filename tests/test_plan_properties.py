"""Property tests: for random skeletons, budgets, strategies and pins, every plan is valid.

Usage is recomputed here from device_map and exec_map alone, so the planner's own
accounting is checked, not trusted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from devicemap.devices import CPU, DISK, Device, parse_device
from devicemap.errors import DoesNotFit, PinError
from devicemap.model.skeleton import Skeleton
from devicemap.plan.options import PlanOptions
from devicemap.plan.place import kv_bytes, media_bytes
from devicemap.plan.planner import Plan, make_plan
from test_plan import block, skeleton_of

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Case:
    skeleton: Skeleton
    budgets: dict[Device, int]
    options: PlanOptions


@st.composite
def cases(draw: st.DrawFn) -> Case:
    count = draw(st.integers(1, 24))
    blocks = [
        dataclasses.replace(
            block(
                f"model.layers.{i}",
                draw(st.integers(0, 400)),
                kv=draw(st.integers(0, 4)),
                act=draw(st.integers(0, 4)),
                window=draw(st.sampled_from([None, None, 3, 8])),
            ),
            state_bytes=draw(st.sampled_from([0, 0, 0, 5, 30])),  # Mamba-like layers
            image_tokens=draw(st.sampled_from([0, 0, 0, 0, 6])),  # vision-tower layers
        )
        for i in range(count)
    ]
    names = [b.name for b in blocks]
    tied = tuple(
        tuple(sorted(set(draw(st.lists(st.sampled_from(names), min_size=2, max_size=3)))))
        for _ in range(draw(st.integers(0, 2)))
    )
    for j in range(draw(st.integers(0, 2))):  # loose tensors, each kept where its block runs
        anchor = draw(st.sampled_from(blocks)).name
        loose = block(f"loose_{j}", draw(st.integers(1, 60)))
        blocks.append(dataclasses.replace(loose, no_split=False, anchor=anchor))
    names = [b.name for b in blocks]
    output = draw(st.sampled_from([None, names[-1]]))
    sk = skeleton_of(blocks, tied=tied, output=output, logits=draw(st.integers(0, 8)))
    gpus = draw(st.integers(0, 3))
    devices = [Device("cuda", i) for i in range(gpus)]
    devices += [d for d in (CPU, DISK) if draw(st.booleans())]
    if not devices or devices == [DISK]:
        devices.insert(0, CPU)  # something must be able to execute
    total = sum(b.nbytes for b in blocks) + 400  # budgets around the model's size
    sizes = st.one_of(st.integers(0, total), st.integers(total // 2, 2 * total))
    budgets = {d: draw(sizes) for d in devices}
    pinned = draw(st.lists(st.sampled_from(names), max_size=2, unique=True))
    pins = {name: draw(st.sampled_from(devices)) for name in pinned}
    options = PlanOptions(
        context=draw(st.integers(1, 16)),
        batch=draw(st.integers(1, 3)),
        prefill=draw(st.sampled_from([None, 1, 4])),
        strategy=draw(st.sampled_from(["sequential", "balanced", "balanced_low_0"])),
        pins=pins,
        offload_exec=draw(st.sampled_from(["gpu", "cpu"])),
        logits=draw(st.sampled_from(["last", "all"])),
        images=draw(st.integers(0, 2)),
    )
    return Case(sk, dict(sorted(budgets.items(), key=lambda i: i[0].sort_key)), options)


def recomputed_usage(case: Case, p: Plan) -> dict[Device, int]:
    """Bytes per device from the maps alone, by the cost model in plan.py's docstring."""
    sk, opts = case.skeleton, case.options
    prefill = opts.context if opts.prefill is None else min(opts.prefill, opts.context)
    logits_tokens = 1 if opts.logits == "last" else prefill
    used = dict.fromkeys(case.budgets, 0)
    act = dict.fromkeys(case.budgets, 0)
    media = dict.fromkeys(case.budgets, 0)
    stage = dict.fromkeys(case.budgets, 0)
    for b in sk.blocks:
        stored, runs = parse_device(p.device_map[b.name]), parse_device(p.exec_map[b.name])
        used[stored] += b.nbytes
        window = opts.context if b.kv_window is None else min(opts.context, b.kv_window)
        used[runs] += (b.kv_bytes_per_token * window + b.state_bytes) * opts.batch
        if b.image_tokens:  # a vision block works on the images' patches, not the prompt
            tokens = b.image_tokens * opts.images * opts.batch
            media[runs] = max(media[runs], b.act_bytes_per_token * tokens)
        else:
            act[runs] = max(act[runs], b.act_bytes_per_token)
        if b.name == sk.output_block:
            used[runs] += sk.logits_bytes_per_token * logits_tokens * opts.batch
        if stored != runs and runs.is_gpu:
            stage[runs] = max(stage[runs], b.nbytes)
    workspace = {d: max(act[d] * prefill * opts.batch, media[d]) for d in used}
    return {d: used[d] + workspace[d] + 2 * stage[d] for d in used}


def pinned_device(case: Case, name: str) -> Device | None:
    hits = [p for p in case.options.pins if name == p or name.startswith(p + ".")]
    return case.options.pins[max(hits, key=len)] if hits else None


def check_plan(case: Case, p: Plan) -> None:
    sk, names = case.skeleton, [b.name for b in case.skeleton.blocks]
    assert list(p.device_map) == names  # each block once, in execution order, never split
    assert list(p.exec_map) == names
    usage = recomputed_usage(case, p)
    for entry in p.devices:
        assert usage[entry.device] == entry.used <= entry.budget
    for group in sk.tied:
        assert len({p.device_map[name] for name in group}) == 1
    for b in sk.blocks:
        if b.anchor is not None:  # kept on the device its block executes on
            assert p.device_map[b.name] == p.exec_map[b.name] == p.exec_map[b.anchor]
    host = next((d for d in case.budgets if d.is_gpu), CPU)
    if case.options.offload_exec == "cpu" and CPU in case.budgets:
        host = CPU
    loose = {b.name for b in sk.blocks if b.anchor is not None}
    for name in names:
        stored, runs = parse_device(p.device_map[name]), parse_device(p.exec_map[name])
        assert runs == (stored if stored.is_gpu else host)
        assert name in loose or pinned_device(case, name) in (None, stored)
    order = list(case.budgets)
    tied = {name for group in sk.tied for name in group}
    tied |= loose | {b.anchor for b in sk.blocks if b.anchor is not None}
    free = [
        order.index(parse_device(p.device_map[name]))
        for name in names
        if pinned_device(case, name) is None and name not in tied
    ]
    assert free == sorted(free)  # each device holds one contiguous run of the unpinned blocks


@PROPERTY
@given(cases())
def test_every_plan_is_valid_and_deterministic(case: Case) -> None:
    try:
        p = make_plan(case.skeleton, case.budgets, case.options)
    except PinError:
        event("conflicting pins in a tied group")
        return
    except DoesNotFit as exc:
        event("does not fit")
        assert exc.shortfall > 0 and "does not fit" in str(exc)
        return
    event("planned" + (" with offload" if {"cpu", "disk"} & set(p.device_map.values()) else ""))
    check_plan(case, p)
    assert make_plan(case.skeleton, case.budgets, case.options) == p


@PROPERTY
@given(cases())
def test_a_model_that_fits_on_one_device_is_always_placed(case: Case) -> None:
    sk, opts = case.skeleton, case.options
    prefill = opts.context if opts.prefill is None else min(opts.prefill, opts.context)
    need = sum(b.nbytes + kv_bytes(b, opts.context, opts.batch) for b in sk.blocks)
    need += max(b.act_bytes_per_token for b in sk.blocks) * prefill * opts.batch
    need += max(media_bytes(b, opts) for b in sk.blocks)
    need += sk.logits_bytes_per_token * prefill * opts.batch
    roomy = {d: need for d in case.budgets}
    options = PlanOptions(
        context=opts.context, batch=opts.batch, prefill=opts.prefill, strategy=opts.strategy,
        offload_exec=opts.offload_exec, images=opts.images,
    )  # fmt: skip
    p = make_plan(sk, roomy, options)
    check_plan(Case(sk, roomy, options), p)
    first = next(iter(sorted(roomy, key=lambda d: d.sort_key)))
    if first.is_gpu and opts.strategy == "sequential":
        assert set(p.device_map.values()) == {first.map_value}
