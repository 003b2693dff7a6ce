"""The planner: a pure function from (skeleton, budgets, options) to a Plan.

No device calls in here: budgets arrive as bytes, so planning for hardware this
machine does not have is the same code path as planning for the one it has.

Placement walks the blocks once in execution order (O(blocks x devices) per pass,
a constant number of passes). Cost model, per device, in bytes:

    weights   blocks *stored* there
    kv_cache  sum over attention blocks *executing* there of
              kv_bytes_per_token x min(context, window) x batch
    workspace largest act_bytes_per_token executing there x prefill x batch
    logits    logits_bytes_per_token x batch x (1 token, or every prefill token with
              logits="all") on the LM head's execution device. generate() passes
              logits_to_keep=1, so the prefill computes the last token's logits only;
              a plain `model(input_ids)` over a long prompt computes all of them
              (128k vocab x 8k tokens x 4 B = 4 GiB), so plan with logits="all" for that
    staging   on a GPU that executes cpu/disk-stored blocks: 2 x the largest such
              block (double buffer: one block computes while the next arrives)

Disk holds weights only; blocks stored on cpu/disk keep their KV and workspace
on their execution device.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from .devices import CPU, DISK, Device, DeviceLike, SizeLike, format_size, parse_device
from .errors import DevicemapError, DoesNotFit, PinError, PlanError, PlanMismatch
from .skeleton import Block, Skeleton, build_skeleton

Strategy = Literal["sequential", "balanced", "balanced_low_0"]
OffloadExec = Literal["gpu", "cpu"]
Logits = Literal["last", "all"]
PLAN_FORMAT = 1  # bump when the JSON layout changes
DEFAULT_CONTEXT = 4096  # tokens, when neither the caller nor a short model says otherwise
_UNKNOWN_MAX_POSITIONS = 1 << 24  # cap for max_context when the config gives none
_PASSES = 3  # reserve refinements before the always-valid pessimistic pass
_GIB = 2**30


@dataclass(frozen=True)
class PlanOptions:
    context: int  # tokens per sequence the KV cache must hold (prompt + reply)
    batch: int = 1  # sequences generated together
    prefill: int | None = None  # tokens in one prefill step; None = context
    strategy: Strategy = "balanced"
    pins: Mapping[str, Device] = field(default_factory=dict)  # module prefix -> device
    offload_exec: OffloadExec = "gpu"  # where cpu/disk-stored blocks run: first GPU, or CPU
    logits: Logits = "last"  # logits kept per prefill: the last token's (generate) or all

    def logits_tokens(self, context: int | None = None) -> int:
        """Tokens per sequence whose logits exist at once."""
        return 1 if self.logits == "last" else self.prefill_tokens(context)

    def prefill_tokens(self, context: int | None = None) -> int:
        """Tokens in the largest forward step: the prefill, never longer than the context."""
        context = self.context if context is None else context
        return context if self.prefill is None else min(self.prefill, context)


@dataclass(frozen=True)
class DeviceUsage:
    """Bytes on one device under a plan."""

    device: Device
    budget: int
    weights: int  # blocks stored here
    kv_cache: int  # KV of the attention layers that execute here
    workspace: int  # activations of the largest block executing here, at the prefill length
    logits: int  # fp32 logits, on the LM head's execution device
    staging: int  # buffers that receive offloaded blocks streamed in to execute here

    @property
    def used(self) -> int:
        return self.weights + self.kv_cache + self.workspace + self.logits + self.staging

    @property
    def free(self) -> int:
        return self.budget - self.used


@dataclass(frozen=True)
class Plan:
    model: str  # the model's name or path, for messages
    fingerprint: str  # sha256 of config + dtype: a plan is only valid for its model
    dtype: torch.dtype
    options: PlanOptions
    device_map: dict[str, int | str]  # accelerate format: block -> 0 | "cpu" | "disk" | "mps"
    exec_map: dict[str, int | str]  # block -> where it executes (cpu/disk blocks: a GPU or cpu)
    devices: tuple[DeviceUsage, ...]  # placement order
    max_context: int  # the longest context this placement can hold at this batch
    order: Literal["forward", "registration"]
    reasons: tuple[str, ...]  # explanation lines, see explain()

    def explain(self) -> str:
        """Why each device holds what it holds, what did not fit where, pins and ties."""
        head = (
            f"plan for {self.model} ({_dtype_name(self.dtype)}, context {self.options.context}"
            f" x batch {self.options.batch}, {self.options.strategy}); longest context that"
            f" fits: {self.max_context}"
        )
        return "\n".join((head, *self.reasons))

    def usage(self, device: DeviceLike) -> DeviceUsage:
        """The breakdown for one device of this plan."""
        wanted = parse_device(device)
        for usage in self.devices:
            if usage.device == wanted:
                return usage
        raise PlanError(f"device {wanted} has no budget in this plan ({self._device_list()})")

    def check(self, skeleton: Skeleton) -> None:
        """Raise PlanMismatch unless this plan was made for `skeleton` at its dtype."""
        theirs = plan_fingerprint(skeleton)
        if theirs != self.fingerprint:
            raise PlanMismatch(
                f"this plan was made for {self.model} ({_dtype_name(self.dtype)}), not for"
                f" {skeleton.source.name} ({_dtype_name(skeleton.dtype)}): their configs or dtypes"
                " differ; make a new plan with `devicemap plan` for this model"
            )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: the saved format, also what `devicemap plan --json` prints."""
        return {
            "format": PLAN_FORMAT,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "dtype": _dtype_name(self.dtype),
            "options": _options_to_json(self.options),
            "device_map": dict(self.device_map),
            "exec_map": dict(self.exec_map),
            "devices": [_usage_to_json(u) for u in self.devices],
            "max_context": self.max_context,
            "order": self.order,
            "reasons": list(self.reasons),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON, atomically (a temp file renamed over `path`)."""
        path = Path(path)
        text = json.dumps(self.to_json(), indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan written by `save` (or printed by `devicemap plan --json`)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PlanError(f"plan file {os.fspath(path)!r} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(
                f"plan file {os.fspath(path)!r} is not JSON ({exc}); write it with Plan.save"
                " or `devicemap plan --save`"
            ) from None
        return plan_from_json(data, source=os.fspath(path))

    def _device_list(self) -> str:
        return ", ".join(str(u.device) for u in self.devices)


def plan_fingerprint(skeleton: Skeleton) -> str:
    """sha256 of the skeleton's config fingerprint and the dtype the weights will have."""
    return hashlib.sha256((skeleton.fingerprint + str(skeleton.dtype)).encode()).hexdigest()


def plan_from_json(data: Any, *, source: str = "<json>") -> Plan:
    """Rebuild a Plan from `Plan.to_json()` output; wrong versions are PlanMismatch."""
    if not isinstance(data, dict) or "format" not in data:
        raise PlanError(f"{source} is not a devicemap plan (no 'format' key)")
    if data["format"] != PLAN_FORMAT:
        raise PlanMismatch(
            f"{source} is plan format {data['format']!r}, this devicemap reads format"
            f" {PLAN_FORMAT}; make the plan again with this version"
        )
    try:
        return Plan(
            model=str(data["model"]),
            fingerprint=str(data["fingerprint"]),
            dtype=_parse_dtype(data["dtype"]),
            options=_options_from_json(data["options"]),
            device_map=dict(data["device_map"]),
            exec_map=dict(data["exec_map"]),
            devices=tuple(_usage_from_json(u) for u in data["devices"]),
            max_context=int(data["max_context"]),
            order=data["order"],
            reasons=tuple(data["reasons"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError, DevicemapError) as exc:
        raise PlanError(f"{source} is a damaged plan file ({type(exc).__name__}: {exc})") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _options_to_json(options: PlanOptions) -> dict[str, Any]:
    return {
        "context": options.context,
        "batch": options.batch,
        "prefill": options.prefill,
        "strategy": options.strategy,
        "pins": {prefix: str(device) for prefix, device in options.pins.items()},
        "offload_exec": options.offload_exec,
        "logits": options.logits,
    }


def _options_from_json(data: dict[str, Any]) -> PlanOptions:
    return PlanOptions(
        context=int(data["context"]),
        batch=int(data["batch"]),
        prefill=None if data["prefill"] is None else int(data["prefill"]),
        strategy=data["strategy"],
        pins={prefix: parse_device(dev) for prefix, dev in data["pins"].items()},
        offload_exec=data["offload_exec"],
        logits=data["logits"],
    )


def _usage_to_json(usage: DeviceUsage) -> dict[str, Any]:
    fields = ("budget", "weights", "kv_cache", "workspace", "logits", "staging", "used", "free")
    return {"device": str(usage.device), **{name: getattr(usage, name) for name in fields}}


def _usage_from_json(data: dict[str, Any]) -> DeviceUsage:
    return DeviceUsage(
        device=parse_device(data["device"]),
        **{k: int(data[k]) for k in ("budget", "weights", "kv_cache", "workspace")},
        **{k: int(data[k]) for k in ("logits", "staging")},
    )


# --- the public wrapper -----------------------------------------------------


def plan(
    model: Any,
    *,
    max_memory: Mapping[DeviceLike, SizeLike] | None = None,
    gpus: int | list[DeviceLike] | None = None,
    context: int | None = None,
    batch: int = 1,
    dtype: torch.dtype | str | None = None,
    strategy: Strategy = "balanced",
    pins: Mapping[str, DeviceLike] | None = None,
    offload_exec: OffloadExec = "gpu",
    no_split: tuple[str, ...] = (),
    trust_remote_code: bool = False,
    logits: Logits = "last",
) -> Plan:
    """Plan where every part of `model` goes (a path, config.json, hub id or Skeleton)."""
    from .devices import resolve_budgets  # the only part that may look at this machine

    skeleton = _skeleton_of(model, dtype, no_split, trust_remote_code)
    budgets = resolve_budgets(max_memory, gpus=gpus)
    options = PlanOptions(
        context=default_context(skeleton) if context is None else context,
        batch=batch,
        strategy=strategy,
        pins=parse_pins(pins or {}),
        offload_exec=offload_exec,
        logits=logits,
    )
    return make_plan(skeleton, budgets, options)


def default_context(skeleton: Skeleton) -> int:
    """The context planned for when none is given: 4096 tokens, or less for a short model."""
    return min(skeleton.max_positions or DEFAULT_CONTEXT, DEFAULT_CONTEXT)


def parse_pins(pins: Mapping[str, DeviceLike]) -> dict[str, Device]:
    """{module prefix: device}; every unreadable device is reported at once."""
    parsed: dict[str, Device] = {}
    bad: list[str] = []
    for prefix, value in pins.items():
        try:
            parsed[prefix] = parse_device(value)
        except DevicemapError as exc:
            bad.append(f"{prefix}={value!r}: {exc}")
    if bad:
        raise PinError("bad pin device(s): " + "; ".join(bad))
    return parsed


def _skeleton_of(
    model: Any, dtype: torch.dtype | str | None, no_split: tuple[str, ...], trust: bool
) -> Skeleton:
    if not isinstance(model, Skeleton):
        return build_skeleton(model, dtype=dtype, no_split=no_split, trust_remote_code=trust)
    if dtype is not None and _parse_dtype_arg(dtype) != model.dtype:
        raise PlanError(
            f"the skeleton of {model.source.name} is already built at"
            f" {_dtype_name(model.dtype)}; build it with build_skeleton(dtype={dtype!r})"
            " instead of passing dtype= to plan()"
        )
    return model


def _parse_dtype_arg(dtype: torch.dtype | str) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else _parse_dtype(dtype)


# --- validation ---------------------------------------------------------------


def _check_options(skeleton: Skeleton, budgets: Mapping[Device, int], options: PlanOptions) -> None:
    problems = [
        f"{name} must be a positive number of tokens/sequences, not {value!r}"
        for name, value in (("context", options.context), ("batch", options.batch))
        if not isinstance(value, int) or value < 1
    ]
    if options.prefill is not None and options.prefill < 1:
        problems.append(f"prefill must be a positive number of tokens, not {options.prefill!r}")
    if options.strategy not in get_args(Strategy):
        problems.append(
            f"unknown strategy {options.strategy!r}; use {', '.join(get_args(Strategy))}"
        )
    if options.logits not in get_args(Logits):
        problems.append(f"unknown logits {options.logits!r}; use 'last' (generate) or 'all'")
    if options.offload_exec not in get_args(OffloadExec):
        problems.append(f"unknown offload_exec {options.offload_exec!r}; use 'gpu' or 'cpu'")
    if not budgets:
        problems.append("no device has a budget; give max_memory such as {0: '16GiB', 'cpu': ...}")
    if budgets and not any(d.is_gpu or d == CPU for d in budgets):
        problems.append("only disk has a budget, and nothing can execute on disk; add cpu or a GPU")
    limit = skeleton.max_positions
    if limit is not None and isinstance(options.context, int) and options.context > limit:
        problems.append(
            f"context {options.context} is longer than {skeleton.source.name} supports"
            f" ({limit} positions); plan for a context of {limit} or less"
        )
    if problems:
        raise PlanError("; ".join(problems))


def _resolve_pins(
    skeleton: Skeleton, budgets: Mapping[Device, int], options: PlanOptions
) -> dict[int, tuple[str, Device]]:
    """Block position -> (pin prefix, device); every bad pin is reported at once."""
    bad: list[str] = []
    pinned: dict[int, tuple[str, Device]] = {}
    for prefix, device in options.pins.items():
        hits = [i for i, b in enumerate(skeleton.blocks) if _pin_covers(prefix, b)]
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


def _pin_covers(prefix: str, block: Block) -> bool:
    """The pin names this block, a module holding it, or a module inside it."""
    if block.name == prefix or block.name.startswith(prefix + ".") or prefix == "":
        return True
    return prefix.startswith(block.name + ".") and any(
        p == prefix or p.startswith(prefix + ".") for p in block.params
    )


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
    weights: int  # bytes
    kv: int  # bytes at context x batch
    act: int  # largest act_bytes_per_token
    stage: int  # largest block, bytes (the staging buffer it needs when streamed)
    logits: int  # bytes, when the output block is in it


def _units(skeleton: Skeleton, options: PlanOptions) -> list[_Unit]:
    position = {b.name: i for i, b in enumerate(skeleton.blocks)}
    parent = list(range(len(skeleton.blocks)))  # union-find over tied blocks

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for group in skeleton.tied:
        members = [position[name] for name in group if name in position]
        for i in members[1:]:
            a, b = root(members[0]), root(i)
            parent[max(a, b)] = min(a, b)  # the root is the group's first block
    groups: dict[int, list[int]] = {}
    for i in range(len(parent)):
        groups.setdefault(root(i), []).append(i)
    return [_unit(skeleton, members, options) for members in groups.values()]


def _unit(skeleton: Skeleton, members: list[int], options: PlanOptions) -> _Unit:
    blocks = [skeleton.blocks[i] for i in members]
    output = any(b.name == skeleton.output_block for b in blocks)
    return _Unit(
        blocks=tuple(members),
        weights=sum(b.nbytes for b in blocks),
        kv=sum(_kv_bytes(b, options.context, options.batch) for b in blocks),
        act=max(b.act_bytes_per_token for b in blocks),
        stage=max(b.nbytes for b in blocks),
        logits=skeleton.logits_bytes_per_token * options.logits_tokens() * options.batch
        if output
        else 0,
    )


def _kv_bytes(block: Block, context: int, batch: int) -> int:
    """KV cache of one block: a sliding window caches at most `kv_window` tokens."""
    tokens = context if block.kv_window is None else min(context, block.kv_window)
    return block.kv_bytes_per_token * tokens * batch


# --- loads: what a device must hold while the plan is being built --------------


@dataclass
class _Load:
    weights: int = 0
    kv: int = 0
    act: int = 0  # bytes per token per sequence, largest executing here
    stage: int = 0  # largest block streamed in to execute here
    logits: int = 0

    def total(self, tokens: int) -> int:
        """Bytes, with `tokens` = prefill x batch."""
        return self.weights + self.kv + self.act * tokens + self.logits + 2 * self.stage

    def run(self, unit: _Unit, *, streamed: bool) -> None:
        """Charge the runtime memory of `unit` executing here."""
        self.kv += unit.kv
        self.act = max(self.act, unit.act)
        self.logits += unit.logits
        if streamed:
            self.stage = max(self.stage, unit.stage)

    def with_unit(self, unit: _Unit, tokens: int) -> int:
        """total() if `unit` were stored and executed here."""
        act = max(self.act, unit.act) * tokens
        return self.total(tokens) - self.act * tokens + unit.weights + unit.kv + act + unit.logits


@dataclass(frozen=True)
class _Layout:
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

    def remote(self, device: Device) -> bool:
        """Stored here, executed on the host (streamed or paged in)."""
        return not device.is_gpu and device != self.host

    def exec_device(self, stored: Device) -> Device:
        return stored if stored.is_gpu else self.host


def _layout(skeleton: Skeleton, budgets: Mapping[Device, int], options: PlanOptions) -> _Layout:
    units = _units(skeleton, options)
    fixed = _fixed_devices(skeleton, units, _resolve_pins(skeleton, budgets, options))
    devices = list(budgets)
    gpus = [d for d in devices if d.is_gpu]
    host = gpus[0] if gpus and (options.offload_exec == "gpu" or CPU not in budgets) else CPU
    free = [u for u in range(len(units)) if u not in fixed]
    suffix = [_Load() for _ in range(len(free) + 1)]
    for k in range(len(free) - 1, -1, -1):
        suffix[k] = dataclasses.replace(suffix[k + 1])
        suffix[k].run(units[free[k]], streamed=host.is_gpu)
    tokens = options.prefill_tokens() * options.batch
    return _Layout(
        skeleton, budgets, options, units, fixed, free, devices, gpus, host, tokens, suffix
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
class _Fill:
    where: list[Device]  # device per free unit placed so far
    moves: list[tuple[int, Device, str]]  # (free position, device left, why)
    loads: dict[Device, _Load]
    failed: int | None = None  # free position that fit nowhere
    over: list[Device] = field(default_factory=list)  # devices whose fixed load is too big

    @property
    def ok(self) -> bool:
        return self.failed is None and not self.over

    def start_remote(self, lay: _Layout) -> int:
        """k: the first free unit stored on a remote device (len(free) if none)."""
        return next((k for k, d in enumerate(self.where) if lay.remote(d)), len(self.where))


def _fixed_loads(lay: _Layout) -> dict[Device, _Load]:
    loads = {d: _Load() for d in lay.devices}
    for index, device in lay.fixed.items():
        unit = lay.units[index]
        loads[device].weights += unit.weights
        runs_on = lay.exec_device(device)
        loads[runs_on].run(unit, streamed=device != runs_on and runs_on.is_gpu)
    return loads


def _fill(lay: _Layout, assumed: int, targets: Sequence[float]) -> _Fill:
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
    fill = _Fill(where=[], moves=[], loads=loads)
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
    lay: _Layout, loads: dict[Device, _Load], device: Device, unit: _Unit, twice_gpu: int,
    targets: Sequence[float],
) -> str | None:  # fmt: skip
    """Why `unit` cannot go on `device` now ('share' or 'room'), or None if it can."""
    budget, load = lay.budgets[device], loads[device]
    if device.is_gpu:
        g = lay.gpus.index(device)
        if g < len(lay.gpus) - 1 and twice_gpu + unit.weights > 2 * targets[g]:
            return "share"
    if lay.remote(device):
        return "room" if load.total(lay.tokens) + unit.weights > budget else None
    return "room" if load.with_unit(unit, lay.tokens) > budget else None


def _charge(lay: _Layout, loads: dict[Device, _Load], unit: _Unit, device: Device) -> None:
    loads[device].weights += unit.weights
    if not lay.remote(device):  # remote units' runtime is in the host's up-front reserve
        loads[device].run(unit, streamed=False)


# --- strategies -------------------------------------------------------------


def _place(lay: _Layout) -> _Fill:
    """Refine the host's reserve until the units assumed remote cover the real ones."""
    assumed = len(lay.free)
    for _ in range(_PASSES):
        fill = _strategy_pass(lay, assumed)
        if not fill.ok or fill.start_remote(lay) >= assumed:
            return fill
        assumed = fill.start_remote(lay)
    return _strategy_pass(lay, 0)  # everything reserved: valid whatever ends up remote


def _strategy_pass(lay: _Layout, assumed: int) -> _Fill:
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


def _shares(lay: _Layout, gpus: list[Device], free_weight: int, base: float) -> list[float]:
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


def _low0_start(lay: _Layout, seq: _Fill) -> int:
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


def _prefix_weight(lay: _Layout, count: int) -> int:
    return sum(lay.units[i].weights for i in lay.free[:count])


# --- make_plan: place, then account exactly ----------------------------------


def make_plan(skeleton: Skeleton, budgets: Mapping[Device, int], options: PlanOptions) -> Plan:
    """Place every block; pure: same input -> same plan, linear in the number of blocks."""
    _check_options(skeleton, budgets, options)
    budgets = dict(sorted(budgets.items(), key=lambda item: item[0].sort_key))
    lay = _layout(skeleton, budgets, options)
    fill = _place(lay)
    if not fill.ok:
        raise _does_not_fit(lay, fill)
    stored = _stored(lay, fill)
    tallies = _tallies(lay, stored)
    devices = tuple(tallies[d].usage(d, budgets[d], options, options.context) for d in budgets)
    for usage in devices:  # the fill's loads bound these from above
        assert usage.used <= usage.budget, f"planner exceeded the budget of {usage.device}"
    blocks = skeleton.blocks
    return Plan(
        model=skeleton.source.name,
        fingerprint=plan_fingerprint(skeleton),
        dtype=skeleton.dtype,
        options=options,
        device_map={b.name: stored[i].map_value for i, b in enumerate(blocks)},
        exec_map={b.name: lay.exec_device(stored[i]).map_value for i, b in enumerate(blocks)},
        devices=devices,
        max_context=_max_context(lay, tallies),
        order=skeleton.order,
        reasons=_reasons(lay, fill, stored, devices),
    )


def _stored(lay: _Layout, fill: _Fill) -> list[Device]:
    """Storage device per block position."""
    stored: list[Device] = [CPU] * len(lay.skeleton.blocks)
    placed = {**lay.fixed, **{lay.free[pos]: d for pos, d in enumerate(fill.where)}}
    for index, device in placed.items():
        for i in lay.units[index].blocks:
            stored[i] = device
    return stored


@dataclass
class _Tally:
    """Per device, per-token rates, so usage can be evaluated at any context."""

    weights: int = 0
    kv_full: int = 0  # KV bytes per token per sequence, layers without a window
    kv_windowed: dict[int, int] = field(default_factory=dict)  # window -> bytes per token
    kv_layers: int = 0
    act: int = 0  # largest act bytes per token per sequence
    logits: int = 0  # logits bytes per token per sequence
    stage: int = 0  # largest block streamed in

    def usage(self, device: Device, budget: int, opts: PlanOptions, context: int) -> DeviceUsage:
        tokens = opts.prefill_tokens(context) * opts.batch
        windowed = sum(rate * min(context, w) for w, rate in self.kv_windowed.items())
        return DeviceUsage(
            device=device,
            budget=budget,
            weights=self.weights,
            kv_cache=(self.kv_full * context + windowed) * opts.batch,
            workspace=self.act * tokens,
            logits=self.logits * opts.logits_tokens(context) * opts.batch,
            staging=2 * self.stage,
        )


def _tallies(lay: _Layout, stored: list[Device]) -> dict[Device, _Tally]:
    tallies = {d: _Tally() for d in lay.devices}
    output = lay.skeleton.output_block
    for block, device in zip(lay.skeleton.blocks, stored, strict=True):
        where = lay.exec_device(device)
        tally = tallies[where]
        tallies[device].weights += block.nbytes
        if block.kv_window is None:
            tally.kv_full += block.kv_bytes_per_token
        else:
            rate = tally.kv_windowed.get(block.kv_window, 0) + block.kv_bytes_per_token
            tally.kv_windowed[block.kv_window] = rate
        tally.kv_layers += block.kv_bytes_per_token > 0
        tally.act = max(tally.act, block.act_bytes_per_token)
        tally.logits += lay.skeleton.logits_bytes_per_token if block.name == output else 0
        if where != device and where.is_gpu:
            tally.stage = max(tally.stage, block.nbytes)
    return tallies


def _max_context(lay: _Layout, tallies: dict[Device, _Tally]) -> int:
    """Longest context this placement holds at this batch on every device (binary search)."""

    def fits(context: int) -> bool:
        return all(
            tallies[d].usage(d, lay.budgets[d], lay.options, context).free >= 0 for d in lay.devices
        )

    low = lay.options.context  # fits: the placement was made for it
    high = lay.skeleton.max_positions or _UNKNOWN_MAX_POSITIONS
    if fits(high):
        return max(high, low)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


# --- explanation --------------------------------------------------------------


def _reasons(
    lay: _Layout, fill: _Fill, stored: list[Device], devices: tuple[DeviceUsage, ...]
) -> tuple[str, ...]:
    blocks = lay.skeleton.blocks
    lines = [_device_line(lay, usage, stored) for usage in devices]
    for pos, device, why in fill.moves:
        unit = lay.units[lay.free[pos]]
        name = ", ".join(compress_names([blocks[i].name for i in unit.blocks]))
        if why == "share":
            lines.append(f"{device} reached its {lay.options.strategy} share before {name}")
        else:
            lines.append(
                f"{name} ({format_size(unit.weights)}) did not fit in what {device} had left"
                " after the blocks before it and its runtime reserves: moved on"
            )
    lines += _remote_lines(lay, stored)
    lines += _pin_lines(lay, stored)
    for unit in lay.units:
        if len(unit.blocks) > 1:
            names = ", ".join(blocks[i].name for i in unit.blocks)
            lines.append(f"tied: {names} share weights, so all are on {stored[unit.blocks[0]]}")
    return tuple(lines)


def _device_line(lay: _Layout, usage: DeviceUsage, stored: list[Device]) -> str:
    names = [b.name for b, d in zip(lay.skeleton.blocks, stored, strict=True) if d == usage.device]
    held = ", ".join(compress_names(names)) if names else "no blocks"
    parts = [f"{usage.device}: {held} ({format_size(usage.weights)} weights)"]
    if usage.kv_cache:
        layers = sum(
            1 for b, d in zip(lay.skeleton.blocks, stored, strict=True)
            if lay.exec_device(d) == usage.device and b.kv_bytes_per_token
        )  # fmt: skip
        parts.append(
            f"KV {format_size(usage.kv_cache)} for {layers} layers x {lay.options.context}"
            f" tokens x batch {lay.options.batch}"
        )
    for label, value in (("workspace", usage.workspace), ("logits", usage.logits)):
        if value:
            parts.append(f"{label} {format_size(value)}")
    if usage.staging:
        parts.append(f"staging {format_size(usage.staging)} for blocks streamed in")
    return (
        " + ".join(parts) + f"; budget {format_size(usage.budget)}, free {format_size(usage.free)}"
    )


def _remote_lines(lay: _Layout, stored: list[Device]) -> list[str]:
    lines = []
    for device in lay.devices:
        if device.is_gpu or device == lay.host:
            continue
        names = [b.name for b, d in zip(lay.skeleton.blocks, stored, strict=True) if d == device]
        if names:
            how = "streamed in" if lay.host.is_gpu else "read in place"
            lines.append(
                f"{', '.join(compress_names(names))} stored on {device} execute on {lay.host}"
                f" ({how}); their KV cache and workspace are counted on {lay.host}"
            )
    return lines


def _pin_lines(lay: _Layout, stored: list[Device]) -> list[str]:
    lines = []
    for prefix, device in lay.options.pins.items():
        names = [
            b.name for b, d in zip(lay.skeleton.blocks, stored, strict=True)
            if _pin_covers(prefix, b) and d == device
        ]  # fmt: skip
        lines.append(
            f"pin {prefix} -> {device}: {', '.join(compress_names(names)) or 'overridden'}"
        )
    return lines


_NUMBERED = re.compile(r"^(.*\.)(\d+)$")


def compress_names(names: Sequence[str]) -> list[str]:
    """["model.layers.0", "model.layers.1", "lm_head"] -> ["model.layers.0-1", "lm_head"]."""
    out: list[str] = []
    run: tuple[str, int, int] | None = None  # (stem, first, last)
    for name in names:
        match = _NUMBERED.match(name)
        if match and run and run[0] == match.group(1) and int(match.group(2)) == run[2] + 1:
            run = (run[0], run[1], run[2] + 1)
            continue
        if run:
            out.append(_run_name(run))
        run = (match.group(1), int(match.group(2)), int(match.group(2))) if match else None
        if not match:
            out.append(name)
    if run:
        out.append(_run_name(run))
    return out


def _run_name(run: tuple[str, int, int]) -> str:
    stem, first, last = run
    return f"{stem}{first}" if first == last else f"{stem}{first}-{last}"


# --- when it does not fit -------------------------------------------------------


def _does_not_fit(lay: _Layout, fill: _Fill) -> DoesNotFit:
    sk, opts = lay.skeleton, lay.options
    weights = sum(b.nbytes for b in sk.blocks)
    kv = sum(_kv_bytes(b, opts.context, opts.batch) for b in sk.blocks)
    workspace = max((b.act_bytes_per_token for b in sk.blocks), default=0) * lay.tokens
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
        name = ", ".join(compress_names([sk.blocks[i].name for i in unit.blocks]))
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
            f"{device} must hold {format_size(load.total(lay.tokens))} (weights pinned there"
            f" {format_size(load.weights)}, KV cache {format_size(load.kv)}, workspace"
            f" {format_size(load.act * lay.tokens)}, logits {format_size(load.logits)}, staging"
            f" {format_size(2 * load.stage)}) but its budget is"
            f" {format_size(lay.budgets[device])}: {format_size(short)} short"
        )
    suggestions = _suggestions(lay)
    advice = "; or ".join(suggestions) if suggestions else "give the devices larger budgets"
    return DoesNotFit(
        f"{sk.source.name} does not fit: {what}. To make it fit: {advice}",
        shortfall=short,
        suggestions=suggestions,
    )


def _fits(skeleton: Skeleton, budgets: Mapping[Device, int], options: PlanOptions) -> _Fill | None:
    fill = _place(_layout(skeleton, dict(budgets), options))
    return fill if fill.ok else None


def _suggestions(lay: _Layout) -> tuple[str, ...]:
    """Changes that were checked to make the plan fit, each on its own."""
    sk, budgets, opts = lay.skeleton, dict(lay.budgets), lay.options
    found: list[str] = []
    half = _rescaled(sk, torch.bfloat16)
    if half is not None and _fits(half, budgets, opts):
        found.append(
            f"--dtype bfloat16 instead of {_dtype_name(sk.dtype)} (weights"
            f" {format_size(sum(b.nbytes for b in half.blocks))})"
        )
    context = _largest(1, opts.context - 1, lambda c: _fits(sk, budgets, _at(opts, context=c)))
    if context:
        found.append(f"--context {context} instead of {opts.context}")
    batch = _largest(1, opts.batch - 1, lambda b: _fits(sk, budgets, _at(opts, batch=b)))
    if batch:
        found.append(f"--batch {batch} instead of {opts.batch}")
    cpu_exec = _at(opts, offload_exec="cpu")
    if lay.host.is_gpu and CPU in budgets and _fits(sk, budgets, cpu_exec):
        found.append("--offload-exec cpu (run offloaded blocks on the CPU)")
    found += _memory_suggestions(lay)
    return tuple(found)


def _memory_suggestions(lay: _Layout) -> list[str]:
    sk, budgets, opts = lay.skeleton, dict(lay.budgets), lay.options
    found: list[str] = []
    weights = sum(b.nbytes for b in sk.blocks)
    if DISK not in budgets:
        fill = _fits(sk, {**budgets, DISK: weights}, opts)
        if fill is not None:
            on_disk = fill.loads[DISK].weights
            found.append(f"add --max-memory disk={_ceil_gib(on_disk)}GiB")
    base = budgets.get(CPU, 0)
    top = base + weights + sum(b.kv_bytes_per_token for b in sk.blocks) * opts.context * opts.batch
    top += sum(b.act_bytes_per_token for b in sk.blocks[:1]) * lay.tokens + 2 * _GIB
    gib = _largest_false(
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
            act_bytes_per_token=b.act_bytes_per_token * new // old,
        )
        for b in skeleton.blocks
    )
    return dataclasses.replace(skeleton, blocks=blocks, dtype=dtype)


def _at(options: PlanOptions, **changes: Any) -> PlanOptions:
    return dataclasses.replace(options, **changes)


def _largest(low: int, high: int, ok: Callable[[int], object]) -> int | None:
    """Largest n in [low, high] with ok(n), for ok monotone (true below some n); None if none."""
    if high < low or not ok(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if ok(middle) else (low, middle - 1)
    return low


def _largest_false(low: int, high: int, ok: Callable[[int], object]) -> int | None:
    """Smallest n in [low, high] with ok(n), for ok monotone (false below some n)."""
    if high < low or not ok(high):
        return None
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if ok(middle) else (middle + 1, high)
    return low


def _ceil_gib(nbytes: int) -> int:
    return max(1, -(-nbytes // _GIB))
