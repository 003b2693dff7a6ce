"""When a model does not fit: by how much, and which single changes were checked to fit.

Each suggestion (a smaller dtype, context or batch, offloaded blocks run on the CPU,
a disk or larger cpu budget) is tried with the placer itself, so only changes that
really produce a plan are offered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..devices import CPU, DISK, Device, format_size
from ..errors import DoesNotFit
from ..model.config import dtype_name
from ..model.skeleton import Skeleton
from .options import PlanOptions
from .place import (
    Fill,
    Layout,
    Placement,
    is_media,
    kv_bytes,
    list_names,
    media_bytes,
    pin_covers,
    place,
)

_GIB = 2**30


def does_not_fit(placed: Placement) -> DoesNotFit:
    """The error for a failed placement: what is short, by how much, and checked fixes."""
    lay, fill = placed.layout, placed.fill
    sk, opts = lay.skeleton, lay.options
    weights = sum(b.nbytes for b in sk.blocks)
    kv = sum(kv_bytes(b, opts.context, opts.batch) for b in sk.blocks)
    text = max((b.act_bytes_per_token for b in sk.blocks if not is_media(b)), default=0)
    media = max((media_bytes(b, opts) for b in sk.blocks), default=0)
    workspace = max(text * lay.tokens, media)
    logits = sk.logits_bytes_per_token * opts.logits_tokens() * opts.batch if sk.output_block else 0
    need, have = weights + kv + workspace + logits, sum(lay.budgets.values())
    budgets = ", ".join(f"{d} {format_size(b)}" for d, b in lay.budgets.items())
    if need > have:
        short = need - have
        what = (
            f"it needs at least {format_size(need)} (weights {format_size(weights)}, KV cache"
            f" {format_size(kv)} for context {opts.context} x batch {opts.batch}, workspace"
            f" {format_size(workspace)}, logits {format_size(logits)}) but the budgets total"
            f" {format_size(have)} ({budgets}): {format_size(short)} short"
        )
    elif fill.failed is not None:
        unit = lay.units[lay.free[fill.failed]]
        name = list_names([sk.blocks[i].name for i in unit.blocks])
        short = unit.weights
        what = (
            f"the budgets total {format_size(have)} ({budgets}), but {name}"
            f" ({format_size(unit.weights)}) fits on no device after the blocks before it and"
            " the runtime reserves (KV cache, workspace, staging) each device must keep"
        )
    else:
        device = fill.over[0]
        load = fill.loads[device]
        short = load.total(lay.tokens) - lay.budgets[device]
        what = (
            f"{device} must hold {format_size(load.total(lay.tokens))} (weights pinned or kept"
            f" there {format_size(load.weights)}, KV cache {format_size(load.kv)}, workspace"
            f" {format_size(load.workspace(lay.tokens))}, logits {format_size(load.logits)},"
            f" staging {format_size(2 * load.stage)}) but its budget is"
            f" {format_size(lay.budgets[device])}: {format_size(short)} short"
        )
    suggestions = _suggestions(lay)
    if fill.failed is None and need <= have:
        suggestions = (*_expert_suggestions(lay, fill.over[0]), *suggestions)
    advice = "; or ".join(suggestions) if suggestions else "give the devices larger budgets"
    return DoesNotFit(
        f"{sk.source.name} does not fit: {what}. To make it fit: {advice}",
        shortfall=short,
        suggestions=suggestions,
    )


def _fits(skeleton: Skeleton, budgets: Mapping[Device, int], options: PlanOptions) -> Fill | None:
    ordered = dict(sorted(budgets.items(), key=lambda item: item[0].sort_key))  # as make_plan
    fill = place(skeleton, ordered, options).fill
    return fill if fill.ok else None


def _suggestions(lay: Layout) -> tuple[str, ...]:
    """Changes that were checked to make the plan fit, each on its own."""
    sk, budgets, opts = lay.skeleton, dict(lay.budgets), lay.options
    found: list[str] = []
    half = _rescaled(sk, torch.bfloat16)
    if half is not None and _fits(half, budgets, opts):
        found.append(
            f"--dtype bfloat16 instead of {dtype_name(sk.dtype)} (weights"
            f" {format_size(sum(b.nbytes for b in half.blocks))})"
        )
    context = largest(1, opts.context - 1, lambda c: _fits(sk, budgets, _at(opts, context=c)))
    if context:
        found.append(f"--context {context} instead of {opts.context}")
    batch = largest(1, opts.batch - 1, lambda b: _fits(sk, budgets, _at(opts, batch=b)))
    if batch:
        found.append(f"--batch {batch} instead of {opts.batch}")
    cpu_exec = _at(opts, offload_exec="cpu")
    if lay.host.is_gpu and CPU in budgets and _fits(sk, budgets, cpu_exec):
        found.append("--offload-exec cpu (run offloaded blocks on the CPU)")
    found += _memory_suggestions(lay)
    return tuple(found)


def _expert_suggestions(lay: Layout, device: Device) -> list[str]:
    """Routed experts pinned to an over-full `device`: how many layers' experts do fit."""
    sk, opts = lay.skeleton, lay.options
    pinned = [b for b in sk.blocks if b.experts and _pinned_to(opts, b) == device]
    if not pinned:
        return []
    covering = {
        p for p, d in opts.pins.items() if d == device and any(pin_covers(p, b) for b in pinned)
    }
    rest = {p: d for p, d in opts.pins.items() if p not in covering}
    ordered = dict(sorted(lay.budgets.items(), key=lambda item: item[0].sort_key))
    unpinned = place(sk, ordered, _at(opts, pins=rest))  # the automatic policy
    if not unpinned.fill.ok:
        return []
    there = [
        b.layer or b.name
        for b, d in zip(sk.blocks, unpinned.stored, strict=True)
        if b.experts and d == device
    ]
    pins = ", ".join(sorted(covering))
    if not there:
        return [
            f"the routed experts of no layer fit on {device} beside the dense parts and the"
            f" KV cache: drop the pin {pins}"
        ]
    return [
        f"the routed experts of {len(there)} layers ({list_names(there)}) fit on {device}"
        f" beside every layer's dense part and the KV cache, not the {len(pinned)} pinned"
        f" there ({pins}): drop the pin and the planner puts those there"
    ]


def _pinned_to(options: PlanOptions, block: Any) -> Device | None:
    """The device a pin puts `block` on (the longest matching pin wins, as in place)."""
    matches = [(len(p), d) for p, d in options.pins.items() if pin_covers(p, block)]
    return max(matches, key=lambda m: m[0])[1] if matches else None


def _memory_suggestions(lay: Layout) -> list[str]:
    sk, budgets, opts = lay.skeleton, dict(lay.budgets), lay.options
    found: list[str] = []
    weights = sum(b.nbytes for b in sk.blocks)
    if DISK not in budgets:
        fill = _fits(sk, {**budgets, DISK: weights}, opts)
        if fill is not None:
            on_disk = fill.loads[DISK].weights
            found.append(f"add --max-memory disk={_ceil_gib(on_disk)}GiB")
    base = budgets.get(CPU, 0)
    top = base + weights + sum(kv_bytes(b, opts.context, opts.batch) for b in sk.blocks)
    top += sum(b.act_bytes_per_token for b in sk.blocks[:1]) * lay.tokens + 2 * _GIB
    gib = _smallest(
        _ceil_gib(base), _ceil_gib(top), lambda n: _fits(sk, {**budgets, CPU: n * _GIB}, opts)
    )
    if gib is not None:
        flag = f"--max-memory cpu={gib}GiB"
        found.append(
            f"raise the cpu budget to {gib}GiB ({flag})" if CPU in budgets else f"add {flag}"
        )
    return found


def _rescaled(skeleton: Skeleton, dtype: torch.dtype) -> Skeleton | None:
    """The skeleton at a smaller floating dtype (sizes scaled), or None if not smaller."""
    old, new = skeleton.dtype.itemsize, dtype.itemsize
    if not skeleton.dtype.is_floating_point or new >= old:
        return None
    blocks = tuple(
        dataclasses.replace(
            b,
            nbytes=b.nbytes * new // old,
            kv_bytes_per_token=b.kv_bytes_per_token * new // old,
            state_bytes=b.state_bytes * new // old,
            act_bytes_per_token=b.act_bytes_per_token * new // old,
        )
        for b in skeleton.blocks
    )
    return dataclasses.replace(skeleton, blocks=blocks, dtype=dtype)


def _at(options: PlanOptions, **changes: Any) -> PlanOptions:
    return dataclasses.replace(options, **changes)


def largest(low: int, high: int, ok: Callable[[int], object]) -> int | None:
    """Largest n in [low, high] with ok(n), for ok monotone (true below some n); None if none."""
    if high < low or not ok(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if ok(middle) else (low, middle - 1)
    return low


def _smallest(low: int, high: int, ok: Callable[[int], object]) -> int | None:
    """Smallest n in [low, high] with ok(n), for ok monotone (false below some n)."""
    if high < low or not ok(high):
        return None
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if ok(middle) else (middle + 1, high)
    return low


def _ceil_gib(nbytes: int) -> int:
    return max(1, -(-nbytes // _GIB))
