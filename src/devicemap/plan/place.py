"""Placement: which device stores each block, walking the blocks once in execution order.

O(blocks x devices) per pass, a constant number of passes. Cost model, per device, in bytes:

    weights   blocks *stored* there
    kv_cache  sum over attention blocks *executing* there of
              kv_bytes_per_token x min(context, window) x batch, plus the recurrent
              state of Mamba / RWKV / linear-attention blocks x batch (constant in context)
    workspace largest act_bytes_per_token executing there x prefill x batch, or a vision
              tower's / audio encoder's over its patches x images (or frames) x batch
    logits    logits_bytes_per_token x batch x (1 token, or every prefill token with
              logits="all") on the LM head's execution device. generate() passes
              logits_to_keep=1, so the prefill computes the last token's logits only;
              a plain `model(input_ids)` over a long prompt computes all of them
              (128k vocab x 8k tokens x 4 B = 4 GiB), so plan with logits="all" for that
    staging   on a GPU that executes cpu/disk-stored blocks: 2 x the largest such
              block (double buffer: one block computes while the next arrives)

Disk holds weights only; blocks stored on cpu/disk keep their KV and workspace
on their execution device. Tied blocks form one unit that goes to one device; pins
fix a unit's device. A loose tensor (a parameter or buffer directly on a module that holds
blocks) joins its anchor block's unit but is kept on that unit's execution device, where
the code using it runs (a few KiB: BART's final_logits_bias, BLIP-2's query_tokens).
The host (where cpu/disk-stored blocks execute) reserves their
runtime memory up front; `_refine` narrows that reserve over a few passes.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..devices import CPU, Device
from ..errors import PinError
from ..model.skeleton import Block, Skeleton, connected_groups
from .options import PlanOptions

_PASSES = 3  # reserve refinements before the always-valid pessimistic pass


@dataclass(frozen=True)
class Placement:
    """Where each block is stored, and the layout and fill pass that put it there."""

    layout: Layout
    fill: Fill  # fill.ok: every block has a device and every budget holds
    stored: list[Device]  # storage device per block position (complete when fill.ok)


def place(skeleton: Skeleton, budgets: Mapping[Device, int], options: PlanOptions) -> Placement:
    """Store every block on a device of `budgets`, walked in their order.

    Check `fill.ok`: when it is false, `shortfall.does_not_fit` says why and what would fit.
    """
    lay = _layout(skeleton, budgets, options)
    fill = _refine(lay)
    return Placement(lay, fill, _stored(lay, fill))


# --- pins ---------------------------------------------------------------------


def _resolve_pins(
    skeleton: Skeleton, budgets: Mapping[Device, int], options: PlanOptions
) -> dict[int, tuple[str, Device]]:
    """Block position -> (pin prefix, device); every bad pin is reported at once."""
    bad: list[str] = []
    pinned: dict[int, tuple[str, Device]] = {}
    for prefix, device in options.pins.items():
        hits = [i for i, b in enumerate(skeleton.blocks) if pin_covers(prefix, b)]
        if not hits:
            bad.append(
                f"{prefix!r} is no module of {skeleton.source.name}{_close(prefix, skeleton)}"
            )
        elif device not in budgets:
            bad.append(
                f"{prefix!r} -> {device}: {device} has no budget; give it one or pin elsewhere"
            )
        for i in hits:  # the longest (most specific) pin wins
            if i not in pinned or len(prefix) > len(pinned[i][0]):
                pinned[i] = (prefix, device)
    if bad:
        raise PinError("bad pin(s): " + "; ".join(bad))
    return pinned


def pin_covers(prefix: str, block: Block) -> bool:
    """The pin names this block, a module holding it, or a module inside it; a pin with
    * or ? is a glob over module names ("model.layers.*.mlp.experts")."""
    if _GLOB.search(prefix):
        return _glob_covers(prefix, block)
    if block.name == prefix or block.name.startswith(prefix + ".") or prefix == "":
        return True
    return prefix.startswith(block.name + ".") and any(
        p == prefix or p.startswith(prefix + ".") for p in block.params
    )


_GLOB = re.compile(r"[*?\[]")


def _glob_covers(pattern: str, block: Block) -> bool:
    """A glob matching the block, a module holding it, or one inside it (a `*` stops at dots)."""
    regex = _glob_regex(pattern)
    parts = block.name.split(".")
    if any(regex.fullmatch(".".join(parts[:end])) for end in range(1, len(parts) + 1)):
        return True
    inside = {p.rsplit(".", 1)[0] for p in block.params}  # modules inside the block
    return any(regex.fullmatch(m) for m in inside if m.startswith(block.name + "."))


@functools.lru_cache(maxsize=64)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    for char in pattern:
        out += {"*": r"[^.]*", "?": r"[^.]"}.get(char, re.escape(char))
    return re.compile(out)


def _close(prefix: str, skeleton: Skeleton) -> str:
    names = {b.name for b in skeleton.blocks}
    names |= {n.rsplit(".", 1)[0] for n in names if "." in n}
    close = difflib.get_close_matches(prefix, sorted(names), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""


# --- units: a block with the blocks tied to it --------------------------------


@dataclass(frozen=True)
class _Unit:
    """Blocks that must share a device (a tied group, or one block), costed at the options."""

    blocks: tuple[int, ...]  # block positions, leader (first in execution order) first
    weights: int  # bytes stored on the unit's device
    resident: int  # bytes of its loose tensors, kept on its execution device
    kv: int  # bytes at context x batch
    act: int  # largest act_bytes_per_token of its text blocks
    media: int  # bytes: workspace of its vision / audio blocks for the planned images x batch
    stage: int  # largest block, bytes (the staging buffer it needs when streamed)
    logits: int  # bytes, when the output block is in it
    experts: bool = False  # an MoE layer's routed experts: off the GPUs, computed on the CPU


def _units(skeleton: Skeleton, options: PlanOptions) -> list[_Unit]:
    position = {b.name: i for i, b in enumerate(skeleton.blocks)}
    pairs: list[tuple[int, int]] = []
    for group in skeleton.tied:
        members = [position[name] for name in group if name in position]
        pairs += [(members[0], i) for i in members[1:]]
    for i, block in enumerate(skeleton.blocks):
        if block.anchor is not None and block.anchor in position:
            pairs.append((position[block.anchor], i))
    dense: dict[str, int] = {}  # an MoE layer's dense pieces (attention, norms, router): one unit
    for i, block in enumerate(skeleton.blocks):
        if block.layer is not None and not block.experts and not block.loose:
            pairs.append((dense.setdefault(block.layer, i), i))
    groups = connected_groups(pairs, range(len(skeleton.blocks)))  # each led by its first block
    return [_unit(skeleton, members, options) for members in groups]


def _unit(skeleton: Skeleton, members: list[int], options: PlanOptions) -> _Unit:
    blocks = [skeleton.blocks[i] for i in members]
    output = any(b.name == skeleton.output_block for b in blocks)
    return _Unit(
        blocks=tuple(members),
        weights=sum(b.nbytes for b in blocks if not b.loose),
        resident=sum(b.nbytes for b in blocks if b.loose),
        kv=sum(kv_bytes(b, options.context, options.batch) for b in blocks),
        act=max((b.act_bytes_per_token for b in blocks if not is_media(b)), default=0),
        media=max((media_bytes(b, options) for b in blocks), default=0),
        stage=max((b.nbytes for b in blocks if not b.loose), default=0),
        logits=skeleton.logits_bytes_per_token * options.logits_tokens() * options.batch
        if output
        else 0,
        experts=all(b.experts or b.loose for b in blocks) and any(b.experts for b in blocks),
    )


def is_media(block: Block) -> bool:
    """A block of a vision tower or audio encoder: it works on image patches / audio frames."""
    return block.image_tokens != 0 or block.audio_tokens > 0


def media_bytes(block: Block, options: PlanOptions) -> int:
    """Workspace of a vision / audio block: its activations over every patch of the planned
    images (all crops) or every frame of one audio clip, per sequence x batch."""
    tokens = max(block.image_tokens, 0) * options.images + block.audio_tokens
    return block.act_bytes_per_token * tokens * options.batch


def kv_bytes(block: Block, context: int, batch: int) -> int:
    """Cache of one block: K/V of `context` tokens (a sliding window caches at most
    `kv_window`) plus its recurrent state, per sequence."""
    tokens = context if block.kv_window is None else min(context, block.kv_window)
    return (block.kv_bytes_per_token * tokens + block.state_bytes) * batch


# --- loads: what a device must hold while the plan is being built --------------


@dataclass
class _Load:
    weights: int = 0
    kv: int = 0
    act: int = 0  # bytes per token per sequence, largest executing here
    media: int = 0  # bytes, largest vision / audio workspace executing here
    stage: int = 0  # largest block streamed in to execute here
    logits: int = 0

    def workspace(self, tokens: int) -> int:
        """Text and image/audio blocks never run at once: the larger of the two."""
        return max(self.act * tokens, self.media)

    def total(self, tokens: int) -> int:
        """Bytes, with `tokens` = prefill x batch."""
        return self.weights + self.kv + self.workspace(tokens) + self.logits + 2 * self.stage

    def run(self, unit: _Unit, *, streamed: bool) -> None:
        """Charge the runtime memory of `unit` executing here (its loose tensors too)."""
        self.weights += unit.resident
        self.kv += unit.kv
        self.act = max(self.act, unit.act)
        self.media = max(self.media, unit.media)
        self.logits += unit.logits
        if streamed:
            self.stage = max(self.stage, unit.stage)

    def with_unit(self, unit: _Unit, tokens: int) -> int:
        """total() if `unit` were stored and executed here."""
        workspace = max(max(self.act, unit.act) * tokens, self.media, unit.media)
        own = unit.weights + unit.resident + unit.kv + unit.logits
        return self.total(tokens) - self.workspace(tokens) + own + workspace


@dataclass(frozen=True)
class Layout:
    """Everything the fill passes read; built once per make_plan, O(blocks)."""

    skeleton: Skeleton
    budgets: Mapping[Device, int]
    options: PlanOptions
    units: list[_Unit]
    fixed: dict[int, Device]  # unit -> pinned device
    free: list[int]  # unpinned units, execution order
    devices: list[Device]
    gpus: list[Device]
    host: Device  # where cpu/disk-stored blocks execute
    tokens: int  # prefill x batch
    suffix: list[_Load]  # suffix[k]: runtime of free units k.. executing on the host
    expert_host: Device  # where cpu/disk-stored routed experts execute: the CPU if it has a budget

    def remote(self, device: Device, experts: bool = False) -> bool:
        """Stored here, executed on the host (streamed or paged in)."""
        return not device.is_gpu and device != (self.expert_host if experts else self.host)

    def exec_device(self, stored: Device, experts: bool = False) -> Device:
        """Where a block stored on `stored` runs: a GPU runs its own; cpu/disk-stored blocks run
        on the host, routed experts on the CPU (only hidden states cross, never the experts)."""
        if stored.is_gpu:
            return stored
        return self.expert_host if experts else self.host


def _layout(skeleton: Skeleton, budgets: Mapping[Device, int], options: PlanOptions) -> Layout:
    units = _units(skeleton, options)
    fixed = _fixed_devices(skeleton, units, _resolve_pins(skeleton, budgets, options))
    devices = list(budgets)
    gpus = [d for d in devices if d.is_gpu]
    host = gpus[0] if gpus and (options.offload_exec == "gpu" or CPU not in budgets) else CPU
    # dense parts and every other block first (they and the KV cache take the GPUs first),
    # then the routed experts of as many layers as fit, in execution order
    unpinned = [u for u in range(len(units)) if u not in fixed]
    free = [u for u in unpinned if not units[u].experts] + [u for u in unpinned if units[u].experts]
    suffix = [_Load() for _ in range(len(free) + 1)]
    for k in range(len(free) - 1, -1, -1):
        suffix[k] = dataclasses.replace(suffix[k + 1])
        if not units[free[k]].experts:  # experts off the GPUs run on the CPU: charged there
            suffix[k].run(units[free[k]], streamed=host.is_gpu)
    tokens = options.prefill_tokens() * options.batch
    expert_host = CPU if CPU in budgets else host
    return Layout(
        skeleton,
        budgets,
        options,
        units,
        fixed,
        free,
        devices,
        gpus,
        host,
        tokens,
        suffix,
        expert_host,
    )


def _fixed_devices(
    skeleton: Skeleton, units: list[_Unit], pinned: dict[int, tuple[str, Device]]
) -> dict[int, Device]:
    fixed: dict[int, Device] = {}
    for index, unit in enumerate(units):
        pins = {pinned[i] for i in unit.blocks if i in pinned}
        devices = {device for _, device in pins}
        if len(devices) > 1:
            names = ", ".join(skeleton.blocks[i].name for i in unit.blocks)
            detail = ", ".join(
                f"{prefix!r} -> {device}" for prefix, device in sorted(pins, key=str)
            )
            raise PinError(
                f"tied blocks ({names}) share weights but are pinned to different devices"
                f" ({detail}); pin them to one device"
            )
        if devices:
            fixed[index] = devices.pop()
    return fixed


# --- the fill pass ------------------------------------------------------------


@dataclass
class Fill:
    where: list[Device]  # device per free unit placed so far
    moves: list[tuple[int, Device, str]]  # (free position, device left, why)
    loads: dict[Device, _Load]
    failed: int | None = None  # free position that fit nowhere
    over: list[Device] = field(default_factory=list)  # devices whose fixed load is too big

    @property
    def ok(self) -> bool:
        return self.failed is None and not self.over

    def start_remote(self, lay: Layout) -> int:
        """k: the first free unit stored on a remote device (len(free) if none); routed experts,
        which run on the CPU and need no reserve on the host, do not count."""
        return next(
            (
                k
                for k, d in enumerate(self.where)
                if lay.remote(d) and not lay.units[lay.free[k]].experts
            ),
            len(self.where),
        )


def _fixed_loads(lay: Layout) -> dict[Device, _Load]:
    loads = {d: _Load() for d in lay.devices}
    for index, device in lay.fixed.items():
        unit = lay.units[index]
        loads[device].weights += unit.weights
        runs_on = lay.exec_device(device, unit.experts)
        loads[runs_on].run(unit, streamed=device != runs_on and runs_on.is_gpu)
    return loads


def _fill(lay: Layout, assumed: int, targets: Sequence[float]) -> Fill:
    """Walk free units in order onto devices in order, never going back.

    `assumed`: free units from here on are taken to be remote, and their runtime
    memory is reserved on the host up front. `targets[g]`: GPU g takes units while
    the GPU-placed free weight (counted at each unit's midpoint) stays within it.
    """
    loads = _fixed_loads(lay)
    host = loads[lay.host]
    reserve = lay.suffix[assumed]
    host.kv, host.logits = host.kv + reserve.kv, host.logits + reserve.logits
    host.act, host.stage = max(host.act, reserve.act), max(host.stage, reserve.stage)
    host.media = max(host.media, reserve.media)
    host.weights += reserve.weights  # the loose tensors of units assumed remote
    fill = Fill(where=[], moves=[], loads=loads)
    di, gpu_weight = 0, 0
    for pos, index in enumerate(lay.free):
        unit = lay.units[index]
        while di < len(lay.devices):
            why = _refusal(lay, loads, lay.devices[di], unit, 2 * gpu_weight, targets)
            if why is None:
                break
            fill.moves.append((pos, lay.devices[di], why))
            di += 1
        if di == len(lay.devices):
            fill.failed = pos
            return fill
        device = lay.devices[di]
        _charge(lay, loads, unit, device)
        fill.where.append(device)
        gpu_weight += unit.weights if device.is_gpu else 0
    fill.over = [d for d in lay.devices if loads[d].total(lay.tokens) > lay.budgets[d]]
    return fill


def _refusal(
    lay: Layout, loads: dict[Device, _Load], device: Device, unit: _Unit, twice_gpu: int,
    targets: Sequence[float],
) -> str | None:  # fmt: skip
    """Why `unit` cannot go on `device` now ('share' or 'room'), or None if it can."""
    budget, load = lay.budgets[device], loads[device]
    if device.is_gpu:
        g = lay.gpus.index(device)
        if g < len(lay.gpus) - 1 and twice_gpu + unit.weights > 2 * targets[g]:
            return "share"
    if lay.remote(device, unit.experts):
        return "room" if load.total(lay.tokens) + unit.weights > budget else None
    return "room" if load.with_unit(unit, lay.tokens) > budget else None


def _charge(lay: Layout, loads: dict[Device, _Load], unit: _Unit, device: Device) -> None:
    loads[device].weights += unit.weights
    if not lay.remote(device, unit.experts):  # remote units' runtime: the host's reserve
        loads[device].run(unit, streamed=False)
    elif unit.experts:  # routed experts on disk run on the CPU, read in place
        loads[lay.expert_host].run(unit, streamed=False)


# --- strategies -------------------------------------------------------------


def _refine(lay: Layout) -> Fill:
    """Refine the host's reserve until the units assumed remote cover the real ones."""
    assumed = len(lay.free)
    for _ in range(_PASSES):
        fill = _strategy_pass(lay, assumed)
        if not fill.ok or fill.start_remote(lay) >= assumed:
            return fill
        assumed = fill.start_remote(lay)
    return _strategy_pass(lay, 0)  # everything reserved: valid whatever ends up remote


def _strategy_pass(lay: Layout, assumed: int) -> Fill:
    unlimited = [math.inf] * len(lay.gpus)
    seq = _fill(lay, assumed, unlimited)
    if not seq.ok or lay.options.strategy == "sequential" or len(lay.gpus) < 2:
        return seq
    k = seq.start_remote(lay)
    on_gpus = sum(lay.units[lay.free[p]].weights for p, d in enumerate(seq.where) if d.is_gpu)
    if lay.options.strategy == "balanced":
        candidates = [_shares(lay, lay.gpus, on_gpus, 0)]
    else:
        first = _prefix_weight(lay, _low0_start(lay, seq))
        rest = _shares(lay, lay.gpus[1:], on_gpus - first, first)
        candidates = [[first, *rest], [first, *unlimited[1:]]]
    for targets in candidates:
        alt = _fill(lay, assumed, targets)
        if alt.ok and alt.start_remote(lay) >= k:
            return alt
    return seq  # balancing would push more off the GPUs: they are full anyway


def _shares(lay: Layout, gpus: list[Device], free_weight: int, base: float) -> list[float]:
    """Cumulative free-weight targets giving each GPU a share in proportion to its budget."""
    fixed = _fixed_loads(lay)
    pinned = [fixed[g].weights for g in gpus]
    total_budget = sum(lay.budgets[g] for g in gpus) or 1
    total = free_weight + sum(pinned)
    targets, cumulative = [], base
    for g, pin in zip(gpus, pinned, strict=True):
        cumulative += max(0.0, total * lay.budgets[g] / total_budget - pin)
        targets.append(cumulative)
    return targets


def _low0_start(lay: Layout, seq: Fill) -> int:
    """Fewest leading free units GPU 0 must take: fill GPUs N..1 backwards from the end."""
    loads = _fixed_loads(lay)
    g = len(lay.gpus) - 1
    for pos in range(seq.start_remote(lay) - 1, -1, -1):
        unit = lay.units[lay.free[pos]]
        while g > 0 and loads[lay.gpus[g]].with_unit(unit, lay.tokens) > lay.budgets[lay.gpus[g]]:
            g -= 1
        if g == 0:
            return pos + 1
        _charge(lay, loads, unit, lay.gpus[g])
    return 0


def _prefix_weight(lay: Layout, count: int) -> int:
    return sum(lay.units[i].weights for i in lay.free[:count])


def _stored(lay: Layout, fill: Fill) -> list[Device]:
    """Storage device per block position."""
    stored: list[Device] = [CPU] * len(lay.skeleton.blocks)
    placed = {**lay.fixed, **{lay.free[pos]: d for pos, d in enumerate(fill.where)}}
    for index, device in placed.items():
        for i in lay.units[index].blocks:
            loose = lay.skeleton.blocks[i].loose
            unit = lay.units[index]
            stored[i] = lay.exec_device(device, unit.experts) if loose else device
    return stored


# --- block names in messages ----------------------------------------------------


def list_names(names: Sequence[str]) -> str:
    """Block names for a message, runs compressed: "model.layers.0-3, lm_head" ("" if none)."""
    return ", ".join(compress_names(names))


_NUMBERED = re.compile(r"^(.*\.)(\d+)(\.\S+| \(.*\))?$")


def compress_names(names: Sequence[str]) -> list[str]:
    """["model.layers.0", "model.layers.1", "lm_head"] -> ["model.layers.0-1", "lm_head"];
    the same piece of consecutive layers too: "model.layers.3-9.mlp.experts"."""
    out: list[str] = []
    run: tuple[str, int, int, str] | None = None  # (stem, first, last, suffix)
    for name in names:
        match = _NUMBERED.match(name)
        suffix = (match.group(3) or "") if match else ""
        if (
            match
            and run
            and (run[0], run[3]) == (match.group(1), suffix)
            and int(match.group(2)) == run[2] + 1
        ):
            run = (run[0], run[1], run[2] + 1, suffix)
            continue
        if run:
            out.append(_run_name(run))
        run = (match.group(1), int(match.group(2)), int(match.group(2)), suffix) if match else None
        if not match:
            out.append(name)
    if run:
        out.append(_run_name(run))
    return out


_PIECE = re.compile(r"^(.*\.\d+)\.")  # "model.layers.3.mlp.experts" -> "model.layers.3"


def summarise(every: Sequence[str], names: Sequence[str]) -> list[str]:
    """Block names for people: the pieces of an MoE layer that are all in `names` shown as
    their layer, its pieces but the routed experts as "<layer> (dense)"; then runs
    compressed. `every`: all block names of the plan, in order."""
    held = set(names)
    pieces: dict[str, list[str]] = {}
    for name in every:
        match = _PIECE.match(name)
        if match:
            pieces.setdefault(match.group(1), []).append(name)
    shown: list[str] = []
    done: set[str] = set()
    for name in names:
        match = _PIECE.match(name)
        layer = match.group(1) if match else None
        if layer is None or layer in done:
            if layer is None:
                shown.append(name)
            continue
        done.add(layer)
        mine = pieces[layer]
        dense = [n for n in mine if not n.endswith(".experts")]
        if all(n in held for n in mine):
            shown.append(layer)
        elif dense and len(dense) < len(mine) and all(n in held for n in dense):
            shown.append(f"{layer} (dense)")
            shown += [n for n in mine if n not in dense and n in held]
        else:
            shown += [n for n in mine if n in held]
    return compress_names(shown)


def _run_name(run: tuple[str, int, int, str]) -> str:
    stem, first, last, suffix = run
    return f"{stem}{first}{suffix}" if first == last else f"{stem}{first}-{last}{suffix}"
