"""Pipeline stages: one plan over several ranks (torch.distributed processes, maybe on
several machines).

A pure function, like the planner: every rank's budgets arrive as bytes, so a what-if
plan for four workstations is the same code path as the plan four real ranks make after
exchanging their budgets (they all compute it and get the same result).

The model's blocks are cut into contiguous runs in execution order, one per rank, only
between decoder layers: what comes before the first layer (embeddings, a vision tower)
goes with rank 0, what comes after the last (final norm, LM head) with the last rank, and
each cut is where the running total of weights and KV cache is closest to the ranks'
shares of memory (their GPU and RAM budgets). Inside a rank its run is planned by
`make_plan` exactly as on one machine. A block without weights (rotary position tables)
is computed on every rank; a tensor tied across stages (GPT-2's embedding and LM head) is
loaded on both ranks that use it.

Each rank's Plan carries its `Stage`: which blocks other ranks hold (left on meta here),
and what run/pipeline.py does at each of them:

    "skip"    a decoder layer held elsewhere: a stand-in takes its place here, passes its
              input through and records its tokens in this rank's KV cache with one-wide
              keys, so cache lengths, masks and positions stay in step (no compute)
    "zeros"   a block before the first cut held by rank 0 (embeddings): its output is
              zeros here, so masks and positions are computed locally from real tensors
    "meta"    a block after the last layer held by the last rank (the final norm): runs
              on meta tensors (shapes only)
    "logits"  the LM head, held by the last rank: its output is the last rank's logits,
              broadcast, so every rank's `generate` picks the same next token
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..devices import DISK, Device, format_size
from ..errors import DoesNotFit, PlanError
from ..model.config import dtype_name
from ..model.memory import hidden_size
from ..model.skeleton import Block, Skeleton
from .options import PlanOptions
from .place import kv_bytes, list_names, pin_covers
from .planner import Plan, RankBudgets, make_plan, with_margins
from .stage import Role, Stage


@dataclass(frozen=True)
class Unit:
    """What a cut cannot divide: a decoder layer (all its MoE pieces), or one edge block."""

    module: str  # the module hooks go on: the layer ("model.layers.3") or the block
    blocks: tuple[int, ...]  # positions in skeleton.blocks
    layer: bool


def units_of(skeleton: Skeleton) -> list[Unit]:
    """The skeleton's blocks grouped into units, in execution order."""
    out: list[Unit] = []
    for i, block in enumerate(skeleton.blocks):
        module = block.layer or block.name
        attached = block.loose and out  # a loose tensor goes with the unit before it
        if out and (out[-1].module == module or attached):
            last = out[-1]
            out[-1] = dataclasses.replace(last, blocks=(*last.blocks, i))
            continue
        out.append(Unit(module, (i,), _is_layer(block)))
    return out


def _is_layer(block: Block) -> bool:
    return block.layer is not None or block.kv_bytes_per_token > 0 or block.state_bytes > 0


def check_pipelinable(skeleton: Skeleton, ranks: int) -> list[Unit]:
    """The units, or PlanError when the model cannot be cut into `ranks` stages."""
    name = skeleton.source.name
    if ranks < 1:
        raise PlanError(f"ranks must be 1 or more, not {ranks}")
    if getattr(skeleton.config, "is_encoder_decoder", False):
        raise PlanError(
            f"{name} is an encoder-decoder model: its decoder layers need the encoder's output"
            " as well as the previous layer's, which pipeline stages do not send yet; run it"
            " on one rank"
        )
    if skeleton.output_block is None:
        raise PlanError(
            f"{name} has no LM head: pipeline stages run generation, whose logits come from"
            " the last stage; run it on one rank"
        )
    units = units_of(skeleton)
    layers = [u for u in units if u.layer]
    if len(layers) < ranks:
        raise PlanError(
            f"{name} has {len(layers)} layers, fewer than the {ranks} ranks: every stage needs"
            f" at least one; use at most {len(layers)} ranks"
        )
    return units  # a block between two layers (a shared norm) goes with the layer before it


def cut(
    skeleton: Skeleton, capacities: Sequence[int], options: PlanOptions
) -> list[tuple[int, ...]]:
    """Block positions per rank: contiguous, at least one layer each, cut between layers
    where the running total of weights and KV is nearest each rank's share of capacity."""
    units = check_pipelinable(skeleton, len(capacities))
    weight = [
        sum(
            skeleton.blocks[i].nbytes + kv_bytes(skeleton.blocks[i], options.context, options.batch)
            for i in u.blocks
        )
        for u in units
    ]
    starts = [k for k, u in enumerate(units) if u.layer][1:]  # units a cut may come before
    total, share = sum(weight), sum(capacities) or len(capacities)
    before = [sum(weight[:k]) for k in range(len(units) + 1)]
    cuts: list[int] = []
    for r in range(len(capacities) - 1):
        target = total * sum(capacities[: r + 1]) / share
        low = starts.index(cuts[-1]) + 1 if cuts else 0
        high = len(starts) - (len(capacities) - 2 - r)  # leave a layer for each later rank
        best = min(starts[low:high], key=lambda k: (abs(before[k] - target), k))
        cuts.append(best)
    bounds = [0, *cuts, len(units)]
    return [
        tuple(i for u in units[bounds[r] : bounds[r + 1]] for i in u.blocks)
        for r in range(len(capacities))
    ]


def capacity(budgets: Mapping[Device, int]) -> int:
    """What a rank can hold at speed: its GPU and RAM budgets (disk only when that is all)."""
    fast = sum(size for device, size in budgets.items() if device != DISK)
    return fast or sum(budgets.values())


def stage_of(skeleton: Skeleton, owned: Sequence[tuple[int, ...]], rank: int) -> Stage:
    """Rank `rank`'s Stage, given every rank's block positions."""
    blocks = skeleton.blocks
    holder = {blocks[i].name: r for r, members in enumerate(owned) for i in members}
    local = local_blocks(skeleton, owned, rank)
    units = units_of(skeleton)
    mine = [u for u in units if any(blocks[i].name in local for i in u.blocks) and u.layer]
    first_layer = next(k for k, u in enumerate(units) if u.layer)
    remote: dict[str, Role] = {}
    for k, unit in enumerate(units):
        names = [blocks[i].name for i in unit.blocks]
        if all(n in local for n in names) or all(blocks[i].loose for i in unit.blocks):
            continue
        if skeleton.output_block in names:
            remote[unit.module] = "logits"
        elif k < first_layer:
            remote[unit.module] = "zeros"
        else:
            remote[unit.module] = "skip" if unit.layer else "meta"
    itemsize = skeleton.dtype.itemsize
    text = skeleton.config.get_text_config(decoder=True)
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    return Stage(
        rank=rank,
        ranks=len(owned),
        holders=holder,
        remote=remote,
        entry=mine[0].module if rank > 0 else None,
        exit=mine[-1].module if rank < len(owned) - 1 else None,
        head=skeleton.output_block if rank == len(owned) - 1 else None,
        hidden_bytes=hidden_size(skeleton.config) * itemsize,
        logits_bytes=vocab * itemsize,
    )


def local_blocks(skeleton: Skeleton, owned: Sequence[tuple[int, ...]], rank: int) -> set[str]:
    """The blocks rank `rank` loads: its own, those without weights (computed everywhere),
    and the partners of its tied blocks (the same tensor, loaded on both ranks)."""
    blocks = skeleton.blocks
    local = {blocks[i].name for i in owned[rank]}
    local |= {b.name for b in blocks if not b.params and not b.loose}
    sizes = {b.name: b.nbytes for b in blocks}
    for group in skeleton.tied:  # a block whose tensor is counted with its partner's
        if any(name in local and not sizes.get(name) for name in group):
            local |= set(group)
    return local


def sub_skeleton(skeleton: Skeleton, names: set[str]) -> Skeleton:
    """The skeleton restricted to `names` (order kept), for planning one rank's blocks."""
    blocks = tuple(b for b in skeleton.blocks if b.name in names)
    kept = (tuple(n for n in group if n in names) for group in skeleton.tied)
    tied = tuple(group for group in kept if len(group) > 1)
    output = skeleton.output_block if skeleton.output_block in names else None
    return dataclasses.replace(skeleton, blocks=blocks, tied=tied, output_block=output)


def rank_options(options: PlanOptions, skeleton: Skeleton) -> PlanOptions:
    """The options for one rank's blocks: only the pins that name one of them."""
    pins = {p: d for p, d in options.pins.items() if any(pin_covers(p, b) for b in skeleton.blocks)}
    return dataclasses.replace(options, pins=pins)


def unpinned(options: PlanOptions, skeleton: Skeleton) -> list[str]:
    """Pins that name no block of the model at all (the ranks' plans would drop them)."""
    return [p for p in options.pins if not any(pin_covers(p, b) for b in skeleton.blocks)]


def stage_lines(skeleton: Skeleton, stage: Stage, plans: Sequence[Any]) -> list[str]:
    """The explanation's stage lines: each rank's blocks and bytes, and what crosses."""
    lines = []
    units = units_of(skeleton)
    for r, p in enumerate(plans):
        held = [u.module for u in units if stage.holders[skeleton.blocks[u.blocks[0]].name] == r]
        weights = sum(b.nbytes for b in skeleton.blocks if b.name in p.device_map)
        where = ", ".join(f"{u.device} {format_size(u.used)}" for u in p.devices if u.used)
        lines.append(
            f"stage {r} (rank {r}): {list_names(held)}: {format_size(weights)} of weights;"
            f" uses {where or 'nothing'}"
        )
    ranks = stage.ranks
    if ranks > 1:
        per_hop = stage.hidden_bytes
        lines.append(
            f"between stages: the hidden states, {format_size(per_hop)} per token per sequence"
            f" per hop ({ranks - 1} hops; a prefill of T tokens sends T x that); every rank"
            " recomputes masks and positions itself"
        )
        lines.append(
            f"from the last stage: the next token's logits, {format_size(stage.logits_bytes)}"
            f" per sequence per step, broadcast to the {ranks - 1} other ranks so every"
            " rank's generate picks the same token"
        )
        lines.append(
            f"per generated token (batch 1): {format_size(per_hop * (ranks - 1))} of hidden"
            f" states + {format_size(stage.logits_bytes * (ranks - 1))} of logits cross"
            " between ranks"
        )
    return lines


def shortfall(rank: int, names: Sequence[str], error: DoesNotFit) -> DoesNotFit:
    """A rank's DoesNotFit, saying which rank and stage."""
    return DoesNotFit(
        f"rank {rank} (stage {list_names(list(names))}): {error}",
        shortfall=error.shortfall,
        suggestions=error.suggestions,
    )


# --- one plan over several ranks ------------------------------------------------------


@dataclass(frozen=True)
class Stages:
    """A plan over several ranks: one Plan per rank, each with its Stage."""

    plans: tuple[Plan, ...]
    lines: tuple[str, ...]  # the stage lines of the explanation

    @property
    def ranks(self) -> int:
        return len(self.plans)

    @property
    def max_context(self) -> int:
        return min(p.max_context for p in self.plans)

    def explain(self) -> str:
        """The stages, what crosses between them, then each rank's own explanation."""
        first = self.plans[0]
        head = (
            f"plan for {first.model} over {self.ranks} ranks ({dtype_name(first.dtype)}, context"
            f" {first.options.context} x batch {first.options.batch}); longest context that"
            f" fits: {self.max_context}"
        )
        own = [f"rank {r}: {line}" for r, p in enumerate(self.plans) for line in p.reasons]
        return "\n".join((head, *self.lines, *own))

    def to_json(self) -> dict[str, Any]:
        """Every rank's plan (`devicemap plan --ranks N --json`, rank 0 under torchrun)."""
        return {
            "ranks": self.ranks,
            "model": self.plans[0].model,
            "max_context": self.max_context,
            "stages": [
                {"rank": r, "blocks": list(p.device_map), "plan": p.to_json()}
                for r, p in enumerate(self.plans)
            ],
            "explain": list(self.lines),
        }


def plan_ranks(skeleton: Skeleton, ranks: Sequence[RankBudgets], options: PlanOptions) -> Stages:
    """Cut the model into one contiguous stage per rank and plan each on its own budgets.

    Pure and deterministic: every rank computes the same Stages from the same inputs.
    DoesNotFit names the rank that cannot hold its stage."""
    missing = unpinned(options, skeleton)
    if missing:
        raise PlanError(
            f"pins name no module of {skeleton.source.name}: {', '.join(map(repr, missing))}"
        )
    owned = cut(skeleton, [capacity(r.sizes) for r in ranks], options)
    plans = []
    for r, budgets in enumerate(ranks):
        sub = sub_skeleton(skeleton, local_blocks(skeleton, owned, r))
        try:
            own = make_plan(
                sub,
                budgets.sizes,
                rank_options(options, sub),
                free_ram=budgets.free_ram,
                notes=budgets.notes,
            )
        except DoesNotFit as error:
            names = [skeleton.blocks[i].name for i in owned[r]]
            raise shortfall(r, names, with_margins(error, budgets)) from None
        plans.append(dataclasses.replace(own, stage=stage_of(skeleton, owned, r)))
    stage = plans[0].stage
    assert stage is not None
    return Stages(tuple(plans), tuple(stage_lines(skeleton, stage, plans)))
