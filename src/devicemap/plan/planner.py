"""The planner: a pure function from (skeleton, budgets, options) to a Plan.

No device calls in here: budgets arrive as bytes, so planning for hardware this
machine does not have is the same code path as planning for the one it has.

Placement (place.py) picks a storage device for every block; this module checks the
options, accounts each device's memory exactly for the placement (Plan.devices,
max_context), explains it, and saves and loads plans as JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from ..devices import CPU, DISK, MPS, Device, DeviceLike, SizeLike, format_size, parse_device
from ..errors import (
    BadOption,
    DevicemapError,
    DoesNotFit,
    PinError,
    PlanError,
    PlanMismatch,
)
from ..model.config import dtype_name
from ..model.skeleton import Block, Skeleton, build_skeleton
from .options import Logits, OffloadExec, PlanOptions, Strategy
from .place import (
    Layout,
    Placement,
    is_media,
    list_names,
    media_bytes,
    pin_covers,
    place,
    summarise,
)
from .shortfall import does_not_fit, largest
from .stage import Stage, stage_from_json

PLAN_FORMAT = 1  # bump when the JSON layout changes
DEFAULT_CONTEXT = 4096  # tokens, when neither the caller nor a short model says otherwise
_UNKNOWN_MAX_POSITIONS = 1 << 24  # cap for max_context when the config gives none


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
    expert_cache: int = 0  # the GPU's pool of routed-expert slots (PlanOptions.expert_cache)

    @property
    def used(self) -> int:
        return (
            self.weights + self.kv_cache + self.workspace + self.logits + self.staging
            + self.expert_cache
        )  # fmt: skip

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
    # disk blocks streamed through the page cache (read each token, dropped once run) so
    # the other disk blocks stay resident: the disk tier's cache policy (page_cache option)
    streamed: tuple[str, ...] = ()
    # one rank's part of a plan over several ranks (plan/stages.py); None: one process
    stage: Stage | None = None

    def explain(self) -> str:
        """Why each device holds what it holds, what did not fit where, pins and ties."""
        head = (
            f"plan for {self.model} ({dtype_name(self.dtype)}, context {self.options.context}"
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
        same = self.model == skeleton.source.name and self.dtype == skeleton.dtype
        if theirs != self.fingerprint and same:  # "made for x (bf16), not for x (bf16)"
            raise PlanMismatch(
                f"this plan was made for {self.model} as its config was then, or the plan"
                " file was edited (its fingerprint does not match the model's config and"
                " dtype now); make a new plan with `devicemap plan` for this model"
            )
        if theirs != self.fingerprint:
            raise PlanMismatch(
                f"this plan was made for {self.model} ({dtype_name(self.dtype)}), not for"
                f" {skeleton.source.name} ({dtype_name(skeleton.dtype)}): their configs or dtypes"
                " differ; make a new plan with `devicemap plan` for this model"
            )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: the saved format, also what `devicemap plan --json` prints."""
        return {
            "format": PLAN_FORMAT,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "dtype": dtype_name(self.dtype),
            "options": _options_to_json(self.options),
            "device_map": dict(self.device_map),
            "exec_map": dict(self.exec_map),
            "devices": [_usage_to_json(u) for u in self.devices],
            "max_context": self.max_context,
            "order": self.order,
            "reasons": list(self.reasons),
            "streamed": list(self.streamed),
            **({"stage": self.stage.to_json()} if self.stage is not None else {}),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON, atomically (a temp file renamed over `path`): PlanError, and
        nothing written, when `path` is a directory or its directory is missing or unwritable."""
        path = Path(path)
        if path.is_dir():
            raise PlanError(
                f"cannot save the plan to {path}: it is a directory; give a file name, such as"
                f" {path / 'plan.json'}"
            )
        _refuse_to_replace(path)
        if not path.parent.exists():
            raise PlanError(
                f"cannot save the plan to {path}: the directory {path.parent} does not exist;"
                " create it first, or give a path in an existing directory"
            )
        text = json.dumps(self.to_json(), indent=2) + "\n"
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        except OSError as exc:
            raise _not_saved(path, exc) from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
            os.replace(tmp, path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise _not_saved(path, exc) from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan written by `save` (or printed by `devicemap plan --json`)."""
        name = os.fspath(path)
        try:
            st = os.stat(path)
            if stat.S_ISREG(st.st_mode) and st.st_size > _PLAN_BYTES:
                raise PlanError(
                    f"plan file {name!r} is {st.st_size} bytes, more than any plan; give the"
                    " JSON file `devicemap plan --save` wrote"
                )
            if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
                raise PlanError(
                    f"plan file {name!r} is not a regular file (a device, FIFO or socket);"
                    " give the JSON file `devicemap plan --save` wrote"
                )
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PlanError(f"plan file {name!r} does not exist") from None
        except IsADirectoryError:
            raise PlanError(
                f"plan file {name!r} is a directory; give the JSON file `devicemap plan --save`"
                " wrote"
            ) from None
        except OSError as exc:
            raise PlanError(f"plan file {name!r} cannot be read ({exc.strerror or exc})") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise PlanError(
                f"plan file {name!r} is not JSON ({exc}); write it with Plan.save"
                " or `devicemap plan --save`"
            ) from None
        return plan_from_json(data, source=name)

    def _device_list(self) -> str:
        return ", ".join(str(u.device) for u in self.devices)


def _refuse_to_replace(path: Path) -> None:
    """PlanError unless `path` is free or holds a plan: saving never replaces a device node,
    a FIFO, or a file that is not a plan (a model's config.json or a weight shard)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _not_saved(path, exc) from None
    if stat.S_ISLNK(st.st_mode):
        return  # the link is replaced by the plan; its target is left alone
    if not stat.S_ISREG(st.st_mode):
        raise PlanError(
            f"cannot save the plan to {path}: it is not a regular file (a device, FIFO or"
            " socket); give the path of a .json file"
        )
    if st.st_size and not _is_plan_file(path):
        raise PlanError(
            f"cannot save the plan to {path}: that file exists and is not a devicemap plan"
            " (it could be a model's own file); give another path, or delete it first"
        )


def _is_plan_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(_PLAN_BYTES + 1)
        data = json.loads(head) if len(head) <= _PLAN_BYTES else None
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "format" in data and "device_map" in data


_PLAN_BYTES = 64 << 20  # the largest plan file read (thousands of blocks take a few MB)


def _not_saved(path: Path, error: OSError) -> PlanError:
    return PlanError(
        f"cannot save the plan to {path} ({error.strerror or error}); nothing was written:"
        " give a path in a directory you can write to"
    )


def plan_fingerprint(skeleton: Skeleton) -> str:
    """sha256 of the skeleton's config fingerprint and the dtype the weights will have."""
    return hashlib.sha256((skeleton.fingerprint + str(skeleton.dtype)).encode()).hexdigest()


def plan_from_json(data: Any, *, source: str = "<json>") -> Plan:
    """Rebuild a Plan from `Plan.to_json()` output; wrong versions are PlanMismatch, and
    PlanError names every field that is missing or not what the format says, all at once."""
    if not isinstance(data, dict) or "format" not in data:
        raise PlanError(f"{source} is not a devicemap plan (no 'format' key)")
    if not _is_int(data["format"]) or data["format"] != PLAN_FORMAT:
        raise PlanMismatch(
            f"{source} is plan format {data['format']!r}, this devicemap reads format"
            f" {PLAN_FORMAT}; make the plan again with this version"
        )
    read = _PlanFields()
    model, fingerprint = read.get(data, "model", _TEXT), read.get(data, "fingerprint", _TEXT)
    dtype = read.get(data, "dtype", _DTYPE)
    options = read.get(data, "options", _OBJECT)
    options = None if options is None else _options_from_json(read, options)
    device_map, exec_map = read.device_map(data, "device_map"), read.device_map(data, "exec_map")
    devices = read.get(data, "devices", _ENTRIES) or []
    usages = [_usage_from_json(read, u, f"devices[{i}]") for i, u in enumerate(devices)]
    max_context = read.get(data, "max_context", _POSITIVE)
    order = read.get(data, "order", _one_of(("forward", "registration")))
    reasons = read.get(data, "reasons", _TEXTS)
    streamed = read.get(data, "streamed", _TEXTS, default=[])  # none in older plans
    stage = None if data.get("stage") is None else stage_from_json(data["stage"], source)
    if read.problems or options is None:  # None: noted as a problem
        raise PlanError(
            f"{source} is a damaged plan file: {'; '.join(read.problems)}. Make it again with"
            " `devicemap plan --save`"
        )
    return Plan(
        model=model,
        fingerprint=fingerprint,
        dtype=_parse_dtype(dtype),
        options=options,
        device_map=device_map,
        exec_map=exec_map,
        devices=tuple(u for u in usages if u is not None),  # none is: no problems
        max_context=max_context,
        order=order,
        reasons=tuple(reasons),
        streamed=tuple(streamed),
        stage=stage,
    )


_Check = tuple[Callable[[Any], bool], str]  # a test of a JSON value, and what it must be
_MISSING = object()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_device(value: Any) -> bool:
    try:
        parse_device(value)
    except DevicemapError:
        return False
    return True


def _is_dtype(value: Any) -> bool:
    return isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype)


def _one_of(choices: tuple[str, ...]) -> _Check:
    return (lambda v: isinstance(v, str) and v in choices), "one of " + ", ".join(choices)


# what each field of a plan's JSON must be (JSON's Infinity and NaN are no whole numbers)
_TEXT: _Check = (lambda v: isinstance(v, str)), "a string"
_TEXTS: _Check = (
    (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v)),
    "a list of strings",
)
_OBJECT: _Check = (lambda v: isinstance(v, dict)), "an object"
_ENTRIES: _Check = (lambda v: isinstance(v, list) and bool(v)), "a list of the devices' entries"
_COUNT: _Check = (lambda v: _is_int(v) and v >= 0), "a whole number >= 0"
_POSITIVE: _Check = (lambda v: _is_int(v) and v >= 1), "a whole number >= 1"
_OPTIONAL_POSITIVE: _Check = (lambda v: v is None or _POSITIVE[0](v)), "null or a whole number >= 1"
_OPTIONAL_COUNT: _Check = (lambda v: v is None or _COUNT[0](v)), "null or a whole number >= 0"
_DEVICE: _Check = _is_device, "a device (0, 'cuda:1', 'cpu', 'disk' or 'mps')"
_DTYPE: _Check = _is_dtype, "a torch dtype name ('bfloat16', 'float32', ...)"


class _PlanFields:
    """Reads a plan's JSON field by field: each field that is missing or fails its check is
    noted by its path ("options.context", "devices[1].weights") and reading goes on, so one
    error names them all."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def get(
        self, data: dict[str, Any], key: str, check: _Check, *, path: str = "",
        default: Any = _MISSING,
    ) -> Any:  # fmt: skip
        """data[key] if it passes `check`, else None (noted); `default` if it is absent."""
        if key not in data:
            if default is _MISSING:
                self.problems.append(f"{path}{key} is missing")
                return None
            return default
        test, expected = check
        if test(data[key]):
            return data[key]
        self.problems.append(f"{path}{key} is {_shown(data[key])}, not {expected}")
        return None

    def device_map(self, data: dict[str, Any], key: str, *, path: str = "") -> dict[str, Any]:
        """A {module prefix: device} map, each device checked."""
        mapping = self.get(data, key, _OBJECT, path=path) or {}
        for name in mapping:
            self.get(mapping, name, _DEVICE, path=f"{path}{key}.")
        return dict(mapping)


def _shown(value: Any) -> str:
    """A JSON value as the file has it, cut to 40 characters."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
        "images": options.images,
        "expert_cache": options.expert_cache,
        "page_cache": options.page_cache,
    }


def _options_from_json(read: _PlanFields, data: dict[str, Any]) -> PlanOptions:
    def get(key: str, check: _Check, **default: Any) -> Any:
        return read.get(data, key, check, path="options.", **default)

    pins = read.device_map(data, "pins", path="options.")
    return PlanOptions(
        context=get("context", _POSITIVE),
        batch=get("batch", _POSITIVE),
        prefill=get("prefill", _OPTIONAL_POSITIVE),
        strategy=get("strategy", _one_of(get_args(Strategy))),
        pins={prefix: parse_device(dev) for prefix, dev in pins.items() if _is_device(dev)},
        offload_exec=get("offload_exec", _one_of(get_args(OffloadExec))),
        logits=get("logits", _one_of(get_args(Logits))),
        # plans saved before images or the expert cache were planned: none
        images=get("images", _COUNT, default=0),
        expert_cache=get("expert_cache", _COUNT, default=0),
        page_cache=get("page_cache", _OPTIONAL_COUNT, default=None),
    )


_USAGE_BYTES = ("budget", "weights", "kv_cache", "workspace", "logits", "staging")  # the fields
_USAGE_OPTIONAL = ("expert_cache",)  # fields added since: 0 in plans saved before


def _usage_to_json(usage: DeviceUsage) -> dict[str, Any]:
    names = (*_USAGE_BYTES, *_USAGE_OPTIONAL, "used", "free")  # totals too, for JSON readers
    return {"device": str(usage.device), **{name: getattr(usage, name) for name in names}}


def _usage_from_json(read: _PlanFields, data: Any, where: str) -> DeviceUsage | None:
    """One device's entry of "devices" (None, noted, when it is not an object)."""
    if not isinstance(data, dict):
        read.problems.append(f"{where} is {_shown(data)}, not an object")
        return None
    path = f"{where}."
    device = read.get(data, "device", _DEVICE, path=path)
    sizes = {name: read.get(data, name, _COUNT, path=path) for name in _USAGE_BYTES}
    for name in _USAGE_OPTIONAL:
        sizes[name] = read.get(data, name, _COUNT, path=path, default=0)
    return DeviceUsage(device=CPU if device is None else parse_device(device), **sizes)


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
    images: int | None = None,
    expert_cache: int = 0,
    page_cache: SizeLike | None = None,
    gpu_memory_fraction: float | None = None,
    gpu_margin: SizeLike | None = None,
) -> Plan:
    """Plan where every part of `model` goes (a path, config.json, hub id or Skeleton).

    `gpu_memory_fraction`: the share (0 < F <= 1) of each GPU's free memory to budget, for
    the GPUs `max_memory` does not name. `gpu_margin`: what a CUDA GPU whose budget is
    measured (free now, a percentage, or the fraction) keeps free at least, for the CUDA
    context, kernels and allocator that nothing else counts (a size, or a percentage of the
    GPU's memory; 0: none); default 512 MiB + 5% of the GPU's memory. Sizes in bytes
    (`{0: "20GiB"}`) are taken as they are.

    `images`: images per prompt the vision tower's workspace is planned for (default: 1 for
    a model with a vision tower that says its image size, else 0). `expert_cache`: slots per
    GPU for routed experts stored off the GPUs, copied in least-recently-used (0: none).
    `page_cache`: how much of the disk tier may stay in the page cache (the rest is streamed
    through it); default: what this machine's RAM (cgroup limits included) has free beyond
    what the plan puts on the cpu, less a tenth."""
    # every argument, as given (plan_inputs takes exactly plan's)
    skeleton, here, options = plan_inputs(**locals())
    try:
        return make_plan(skeleton, here.sizes, options, free_ram=here.free_ram, notes=here.notes)
    except DoesNotFit as exc:
        raise with_margins(exc, here) from None


@dataclass(frozen=True)
class RankBudgets:
    """What one machine (one rank of several) has: bytes per device, its free RAM (sets the
    page cache of a disk tier; None: not measured), how the budgets were measured (the
    explanation's first lines) and what each measured GPU keeps free."""

    sizes: Mapping[Device, int]
    free_ram: int | None = None
    notes: tuple[str, ...] = ()
    kept: Mapping[Device, int] = field(default_factory=dict)


def with_margins(error: DoesNotFit, here: RankBudgets) -> DoesNotFit:
    """`error`, saying what the measured GPUs' budgets keep free (the margin can be lowered)."""
    if not here.kept:
        return error
    kept = ", ".join(f"{d} {format_size(n)}" for d, n in here.kept.items())
    return DoesNotFit(
        f"{error}. (The budgets keep {kept} free for the CUDA context, kernels and"
        " allocator: --gpu-margin, 0 to keep none)",
        shortfall=error.shortfall,
        suggestions=error.suggestions,
    )


def plan_inputs(
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
    images: int | None = None,
    expert_cache: int = 0,
    page_cache: SizeLike | None = None,
    gpu_memory_fraction: float | None = None,
    gpu_margin: SizeLike | None = None,
) -> tuple[Skeleton, RankBudgets, PlanOptions]:
    """What `plan` plans from (the same arguments): the skeleton, this machine's budgets
    (measured where `max_memory` does not give them) and the options. Several ranks
    exchange their budgets and call plan/stages.plan_ranks with them."""
    from ..devices import cpu_memory, measure_budgets, parse_size  # this machine, only here

    skeleton = _skeleton_of(model, dtype, no_split, trust_remote_code)
    measured = measure_budgets(
        max_memory, gpus=gpus, gpu_margin=gpu_margin, gpu_memory_fraction=gpu_memory_fraction
    )
    budgets = measured.sizes
    cache: int | None = None
    free_ram: int | None = None
    if page_cache is not None:
        cache = parse_size(page_cache)
    elif DISK in budgets:
        free_ram = cpu_memory()[0]
        if max_memory is not None:
            _warn_past_ram(budgets, free_ram)
    options = PlanOptions(
        context=default_context(skeleton) if context is None else context,
        batch=batch,
        strategy=strategy,
        pins=parse_pins(pins or {}),
        offload_exec=offload_exec,
        logits=logits,
        images=default_images(skeleton) if images is None else images,
        expert_cache=expert_cache,
        page_cache=cache,
    )
    here = RankBudgets(budgets, free_ram, measured.notes, measured.kept)
    return skeleton, here, options


class MemoryWarning(UserWarning):
    """A budget larger than the memory this process may really use."""


def _warn_past_ram(budgets: Mapping[Device, int], free: int) -> None:
    """MemoryWarning when the budgets held in this machine's RAM exceed what is free: the
    cpu budget, and on Apple silicon the mps one too (one unified memory for both)."""
    from ..devices import present  # this machine, only here

    held = [d for d in (MPS, CPU) if d in budgets and (d == CPU or present(d))]
    total = sum(budgets[d] for d in held)
    if total <= free:
        return
    if len(held) == 1:
        what, fix = f"the {held[0]} budget ({format_size(total)}) is", f"--max-memory {held[0]}="
        fix += " at most that"
    else:
        what = f"the {' and '.join(map(str, held))} budgets, one RAM, total {format_size(total)},"
        fix = "--max-memory mps= and cpu= that add up to at most that"
    warnings.warn(
        f"{what} more than this process may use now ({format_size(free)} free, cgroup limits"
        f" included): loading may swap or be killed; give {fix}",
        MemoryWarning,
        stacklevel=4,  # plan()'s caller
    )


def default_images(skeleton: Skeleton) -> int:
    """1 image per prompt for a model with a sized vision tower, else 0."""
    sizes = {b.image_tokens for b in skeleton.blocks if b.image_tokens}
    return 1 if sizes and -1 not in sizes else 0


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
            f" {dtype_name(model.dtype)}; build it with build_skeleton(dtype={dtype!r})"
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
    if not isinstance(options.images, int) or options.images < 0:
        problems.append(f"images must be 0 or more per prompt, not {options.images!r}")
    if not isinstance(options.expert_cache, int) or options.expert_cache < 0:
        problems.append(f"expert_cache must be 0 or more slots, not {options.expert_cache!r}")
    unsized = [b.name for b in skeleton.blocks if b.image_tokens < 0]
    if unsized and isinstance(options.images, int) and options.images > 0:
        problems.append(
            f"the vision tower ({list_names(unsized)}) does not say how large its images are:"
            " its config has no image_size and no preprocessor_config.json gives max_pixels or"
            " size, so its workspace for an image cannot be counted. Add image_size to the"
            " vision config, or plan with images=0 (--images 0) and leave room yourself"
        )
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


# --- make_plan: place, then account exactly ----------------------------------


def make_plan(
    skeleton: Skeleton,
    budgets: Mapping[Device, int],
    options: PlanOptions,
    *,
    free_ram: int | None = None,
    notes: Sequence[str] = (),
) -> Plan:
    """Place every block; pure: same input -> same plan, linear in the number of blocks.

    `free_ram`: the RAM free on this machine (bytes), which sets the page cache when
    `options.page_cache` is None: what the plan's cpu tier leaves of it, less a tenth (the
    cpu budget is a cap, often far above what the plan puts there). `notes`: how the
    budgets were measured (margins kept free, fractions), the explanation's first lines."""
    _check_options(skeleton, budgets, options)
    budgets = dict(sorted(budgets.items(), key=lambda item: item[0].sort_key))
    options, unified = _unified_offload(budgets, options)
    pool = expert_pool(skeleton, budgets, options)
    placed = place(skeleton, {d: b - pool.get(d, 0) for d, b in budgets.items()}, options)
    if pool and placed.fill.ok and not _experts_off_gpu(placed.layout, placed.stored):
        pool = {}  # every expert fits on the GPUs: no pool needed, and its room is free
        placed = place(skeleton, budgets, options)
    _check_mps_host(placed)
    if not placed.fill.ok:
        raise does_not_fit(placed)
    lay, stored = placed.layout, placed.stored
    tallies = _tallies(lay, stored)
    devices = tuple(
        dataclasses.replace(
            tallies[d].usage(d, budgets[d] - pool.get(d, 0), options, options.context),
            budget=budgets[d],
            expert_cache=pool.get(d, 0),
        )
        for d in budgets
    )
    for usage in devices:  # the fill's loads bound these from above
        assert usage.used <= usage.budget, f"planner exceeded the budget of {usage.device}"
    blocks = skeleton.blocks
    on_disk = [b for b, d in zip(blocks, stored, strict=True) if d == DISK and b.nbytes]
    if options.page_cache is None and free_ram is not None:
        on_cpu = sum(u.used for u in devices if u.device == CPU)
        options = dataclasses.replace(options, page_cache=max(0, int(free_ram * 0.9) - on_cpu))
    streamed = disk_split(on_disk, options.page_cache)
    return Plan(
        model=skeleton.source.name,
        fingerprint=plan_fingerprint(skeleton),
        dtype=skeleton.dtype,
        options=options,
        device_map={b.name: stored[i].map_value for i, b in enumerate(blocks)},
        exec_map={
            b.name: lay.exec_device(stored[i], b.experts).map_value for i, b in enumerate(blocks)
        },
        devices=devices,
        max_context=_max_context(lay, tallies),
        order=skeleton.order,
        reasons=(
            *notes,
            *_quantized_line(skeleton),
            *_reasons(placed, devices, tallies),
            *(unified if any(not d.is_gpu for d in stored) else ()),
            *_disk_lines(on_disk, streamed, options),
        ),
        streamed=streamed,
    )


def _unified_offload(
    budgets: Mapping[Device, int], options: PlanOptions
) -> tuple[PlanOptions, tuple[str, ...]]:
    """With mps the only GPU, cpu/disk-stored blocks execute on the CPU (offload_exec='cpu'),
    and the line that says why. mps and the CPU share one RAM: streaming a block to mps would
    copy it from RAM into RAM before every forward (a read and a write of its bytes, for no
    faster memory), which dispatch does not do (it streams to CUDA GPUs only); the CPU reads
    the block where it is, once. Not measured on a Mac: copies per forward to mps may win
    where the GPU's compute outweighs them (a long prefill), which would need measuring."""
    gpus = [d for d in budgets if d.is_gpu]
    if not gpus or any(d.kind != "mps" for d in gpus) or CPU not in budgets:
        return options, ()
    line = (
        "blocks stored on cpu or disk execute on cpu, not mps: mps shares the CPU's RAM, so"
        " copying them to it each forward would only add copies (devicemap streams weights"
        " to CUDA GPUs only)"
    )
    if options.offload_exec == "gpu":
        line += "; --offload-exec gpu applies to CUDA GPUs"
    return dataclasses.replace(options, offload_exec="cpu"), (line,)


def _check_mps_host(placed: Placement) -> None:
    """PlanError when mps would run blocks stored on disk (a plan with mps and disk but no
    cpu budget): dispatch cannot stream weights to mps, and on the CPU, where they would run,
    their KV cache and workspace need a budget. Checked before "does not fit", whose advice
    (reserves counted on mps) would not apply."""
    lay = placed.layout
    if lay.host.kind != "mps" or DISK not in lay.budgets:
        return
    blocks = lay.skeleton.blocks
    off = [b.name for b, d in zip(blocks, placed.stored, strict=True) if d == DISK]
    if placed.fill.ok and not off:
        return  # everything fits on mps: the disk budget goes unused
    what = (
        f"{list_names(off)} would be stored on disk"
        if placed.fill.ok
        else f"{lay.skeleton.source.name} does not fit on mps alone"
    )
    raise PlanError(
        f"{what}, but blocks stored off mps run on the CPU (devicemap does not stream weights"
        " to mps, which shares the CPU's RAM), and the CPU has no budget for their KV cache and"
        " workspace: add --max-memory cpu=SIZE"
    )


def disk_split(on_disk: Sequence[Block], page_cache: int | None) -> tuple[str, ...]:
    """The disk blocks to stream through the page cache so that the others stay resident in
    `page_cache` bytes: none when all fit (or no limit is set), else the fewest blocks,
    spread evenly through execution order (the reads of each overlap the compute of the
    resident blocks before it). The window of blocks on their way takes room too: three
    of the largest disk blocks, at least 64 MiB more than one."""
    if page_cache is None or not on_disk:
        return ()
    total = sum(b.nbytes for b in on_disk)
    largest = max(b.nbytes for b in on_disk)
    window = max(3 * largest, largest + (64 << 20))
    if total + window <= page_cache:
        return ()
    room = page_cache - window
    count = len(on_disk)
    for stream in range(1, count + 1):
        chosen = {int((j + 0.5) * count / stream) for j in range(stream)}
        if sum(b.nbytes for i, b in enumerate(on_disk) if i not in chosen) <= room:
            return tuple(b.name for i, b in enumerate(on_disk) if i in chosen)
    return tuple(b.name for b in on_disk)  # pragma: no cover - stream == count always fits


def _quantized_line(skeleton: Skeleton) -> tuple[str, ...]:
    """What a plan of a quantized checkpoint means: the unquantized model's sizes."""
    quantization = getattr(skeleton.config, "quantization_config", None)
    if not quantization:
        return ()
    get = quantization.get if isinstance(quantization, dict) else None
    method = get("quant_method", None) if get else getattr(quantization, "quant_method", None)
    return (
        f"the checkpoint is {method or 'quantized'} (quantization_config): planned as"
        f" {dtype_name(skeleton.dtype)} weights, the unquantized model; devicemap cannot load"
        " quantized tensors yet (use the unquantized release)",
    )


def _disk_lines(
    on_disk: Sequence[Block], streamed: tuple[str, ...], options: PlanOptions
) -> list[str]:
    """'disk: 14 blocks resident (8.4 GiB of the 12 GiB page cache), 12 streamed ...'."""
    if not on_disk or options.page_cache is None:
        return []
    gone = set(streamed)
    kept = [b for b in on_disk if b.name not in gone]
    cache = format_size(options.page_cache)
    if not gone:
        return [
            f"disk: all {len(on_disk)} blocks stay in the page cache"
            f" ({format_size(sum(b.nbytes for b in kept))} of {cache})"
        ]
    read = sum(b.nbytes for b in on_disk if b.name in gone)
    return [
        f"disk: {len(kept)} blocks resident ({format_size(sum(b.nbytes for b in kept))} of the"
        f" {cache} page cache), {len(gone)} streamed ({format_size(read)} read per token,"
        " dropped from the page cache once they have run, so the resident ones stay):"
        f" {list_names(sorted(gone, key=[b.name for b in on_disk].index))}"
    ]


def expert_pool(
    skeleton: Skeleton, budgets: Mapping[Device, int], options: PlanOptions
) -> dict[Device, int]:
    """Bytes of the expert cache on each GPU: `options.expert_cache` slots of the largest
    routed expert; none without GPUs or routed experts."""
    slot = max((b.expert_bytes for b in skeleton.blocks if b.experts), default=0)
    if not options.expert_cache or not slot:
        return {}
    size = options.expert_cache * _slot_bytes(slot)
    pool = {d: size for d in budgets if d.kind == "cuda"}  # the cache copies in on CUDA only
    for device, nbytes in pool.items():
        if nbytes > budgets[device]:
            fit = budgets[device] // _slot_bytes(slot)
            raise BadOption(
                f"an expert cache of {options.expert_cache} slots x {format_size(slot)} needs"
                f" {format_size(nbytes)} on {device}, whose budget is"
                f" {format_size(budgets[device])}; use --expert-cache {fit} or fewer"
            )
    return pool


def _slot_bytes(expert: int) -> int:
    """A slot: one expert's tensors, each at a 256-byte offset (a few tensors per expert)."""
    return expert + 8 * 256


def _experts_off_gpu(lay: Layout, stored: list[Device]) -> bool:
    blocks = lay.skeleton.blocks
    return any(b.experts and not d.is_gpu for b, d in zip(blocks, stored, strict=True))


@dataclass
class _Tally:
    """Per device, per-token rates, so usage can be evaluated at any context."""

    weights: int = 0
    kv_full: int = 0  # KV bytes per token per sequence, layers without a window
    kv_windowed: dict[int, int] = field(default_factory=dict)  # window -> bytes per token
    kv_layers: int = 0
    state: int = 0  # recurrent state bytes per sequence, whatever the context
    act: int = 0  # largest act bytes per token per sequence
    media: int = 0  # largest vision / audio workspace, bytes (images and batch counted)
    logits: int = 0  # logits bytes per token per sequence
    stage: int = 0  # largest block streamed in

    def usage(self, device: Device, budget: int, opts: PlanOptions, context: int) -> DeviceUsage:
        tokens = opts.prefill_tokens(context) * opts.batch
        windowed = sum(rate * min(context, w) for w, rate in self.kv_windowed.items())
        return DeviceUsage(
            device=device,
            budget=budget,
            weights=self.weights,
            kv_cache=(self.kv_full * context + windowed + self.state) * opts.batch,
            workspace=max(self.act * tokens, self.media),
            logits=self.logits * opts.logits_tokens(context) * opts.batch,
            staging=2 * self.stage,
        )


def _tallies(lay: Layout, stored: list[Device]) -> dict[Device, _Tally]:
    tallies = {d: _Tally() for d in lay.devices}
    output = lay.skeleton.output_block
    for block, device in zip(lay.skeleton.blocks, stored, strict=True):
        where = lay.exec_device(device, block.experts)
        tally = tallies[where]
        tallies[device].weights += block.nbytes
        if block.kv_window is None:
            tally.kv_full += block.kv_bytes_per_token
        else:
            rate = tally.kv_windowed.get(block.kv_window, 0) + block.kv_bytes_per_token
            tally.kv_windowed[block.kv_window] = rate
        tally.kv_layers += block.kv_bytes_per_token > 0 or block.state_bytes > 0
        tally.state += block.state_bytes
        if is_media(block):
            tally.media = max(tally.media, media_bytes(block, lay.options))
        else:
            tally.act = max(tally.act, block.act_bytes_per_token)
        tally.logits += lay.skeleton.logits_bytes_per_token if block.name == output else 0
        if where != device and where.is_gpu:
            tally.stage = max(tally.stage, block.nbytes)
    return tallies


def _max_context(lay: Layout, tallies: dict[Device, _Tally]) -> int:
    """Longest context this placement holds at this batch on every device (binary search)."""

    def fits(context: int) -> bool:
        return all(
            tallies[d].usage(d, lay.budgets[d], lay.options, context).free >= 0 for d in lay.devices
        )

    low = lay.options.context  # fits: the placement was made for it
    high = lay.skeleton.max_positions or _UNKNOWN_MAX_POSITIONS
    if fits(high):
        return max(high, low)
    longest = largest(low, high, fits)
    assert longest is not None, "the placement was made for its own context"
    return longest


# --- explanation --------------------------------------------------------------


def _reasons(
    placed: Placement, devices: tuple[DeviceUsage, ...], tallies: dict[Device, _Tally]
) -> tuple[str, ...]:
    lay, stored = placed.layout, placed.stored
    blocks = lay.skeleton.blocks
    lines = [_device_line(lay, usage, stored, tallies[usage.device].kv_layers) for usage in devices]
    for pos, device, why in placed.fill.moves:
        unit = lay.units[lay.free[pos]]
        name = list_names([blocks[i].name for i in unit.blocks])
        if why == "share":
            lines.append(f"{device} reached its {lay.options.strategy} share before {name}")
        else:
            lines.append(
                f"{name} ({format_size(unit.weights)}) did not fit in what {device} had left"
                " after the blocks before it and its runtime reserves: moved on"
            )
    lines += _media_lines(lay, stored)
    if lay.skeleton.whole_moe:
        kinds = ", ".join(lay.skeleton.whole_moe)
        lines.append(
            f"routed experts ({kinds}) are not computed through transformers' experts"
            " interface, which devicemap computes expert by expert: their layers are placed"
            " whole, every expert with its layer"
        )
    lines += _remote_lines(lay, stored)
    lines += _pin_lines(lay, stored)
    position = {b.name: i for i, b in enumerate(blocks)}
    for group in lay.skeleton.tied:
        names = ", ".join(group)
        where = stored[position[group[0]]]
        lines.append(f"tied: {names} share weights, so all are on {where}")
    for block, device in zip(blocks, stored, strict=True):
        if block.anchor is not None:
            lines.append(
                f"{block.name} ({format_size(block.nbytes)}) is a tensor the model uses next to"
                f" {block.anchor}: kept on {device}, where {block.anchor} runs"
            )
    return tuple(lines)


def _media_lines(lay: Layout, stored: list[Device]) -> list[str]:
    """How the vision tower's / audio encoder's workspace was counted."""
    opts, lines = lay.options, []
    pairs = list(zip(lay.skeleton.blocks, stored, strict=True))
    vision = [(b, d) for b, d in pairs if b.image_tokens]
    audio = [(b, d) for b, d in pairs if b.audio_tokens]
    if vision and any(b.image_tokens < 0 for b, _ in vision):
        names = list_names([b.name for b, _ in vision])
        lines.append(f"vision tower {names}: image size unknown, no workspace counted for images")
    elif vision:
        block, device = max(vision, key=lambda bd: media_bytes(bd[0], opts))
        what = f"{block.image_tokens} patches per image x {opts.images}"
        lines.append(_media_line("vision tower", vision, block, device, lay, what))
    if audio:
        block, device = max(audio, key=lambda bd: media_bytes(bd[0], opts))
        what = f"{block.audio_tokens} frames per clip"
        lines.append(_media_line("audio encoder", audio, block, device, lay, what))
    return lines


def _media_line(
    kind: str, blocks: list[tuple[Block, Device]], widest: Block, device: Device, lay: Layout,
    what: str,
) -> str:  # fmt: skip
    names = list_names([b.name for b, _ in blocks])
    return (
        f"{kind} {names}: workspace {format_size(media_bytes(widest, lay.options))} on"
        f" {lay.exec_device(device)} ({what} x batch {lay.options.batch}, at"
        f" {format_size(widest.act_bytes_per_token)} per token)"
    )


def _device_line(lay: Layout, usage: DeviceUsage, stored: list[Device], kv_layers: int) -> str:
    every = [b.name for b in lay.skeleton.blocks]
    held = ", ".join(summarise(every, _held(lay, stored, usage.device)))
    held = held or "no blocks"
    parts = [f"{usage.device}: {held} ({format_size(usage.weights)} weights)"]
    if usage.kv_cache:
        parts.append(
            f"KV {format_size(usage.kv_cache)} for {kv_layers} layers x {lay.options.context}"
            f" tokens x batch {lay.options.batch}"
        )
    for label, value in (("workspace", usage.workspace), ("logits", usage.logits)):
        if value:
            parts.append(f"{label} {format_size(value)}")
    if usage.staging:
        parts.append(f"staging {format_size(usage.staging)} for blocks streamed in")
    if usage.expert_cache:
        slots = lay.options.expert_cache
        parts.append(
            f"expert cache {format_size(usage.expert_cache)} ({slots} slots, filled"
            " least-recently-used with routed experts stored off the GPUs)"
        )
    return (
        " + ".join(parts) + f"; budget {format_size(usage.budget)}, free {format_size(usage.free)}"
    )


def _held(lay: Layout, stored: list[Device], device: Device) -> list[str]:
    """Names of the blocks stored on `device`, in execution order."""
    return [b.name for b, d in zip(lay.skeleton.blocks, stored, strict=True) if d == device]


def _remote_lines(lay: Layout, stored: list[Device]) -> list[str]:
    lines = []
    for device in lay.devices:
        if device.is_gpu or device == lay.host:
            continue
        names = [n for n in _held(lay, stored, device) if not _experts(lay, n)]
        if names:
            how = "streamed in" if lay.host.is_gpu else "read in place"
            lines.append(
                f"{list_names(names)} stored on {device} execute on {lay.host}"
                f" ({how}); their KV cache and workspace are counted on {lay.host}"
            )
    return lines + _expert_lines(lay, stored)


def _experts(lay: Layout, name: str) -> bool:
    return any(b.experts for b in lay.skeleton.blocks if b.name == name)


def _expert_lines(lay: Layout, stored: list[Device]) -> list[str]:
    """'routed experts of layers 0-17 on cuda:0; of layers 18-47 on cpu, computed on cpu'."""
    placed: dict[Device, list[str]] = {}
    for block, device in zip(lay.skeleton.blocks, stored, strict=True):
        if block.experts and block.layer is not None:
            placed.setdefault(device, []).append(block.layer)
    if not placed:
        return []
    parts = []
    for device in lay.devices:
        if device in placed:
            where = lay.exec_device(device, experts=True)
            how = "" if where == device else f", computed on {where} (read in place)"
            parts.append(f"of {_layers(placed[device])} on {device}{how}")
    line = "routed experts " + "; ".join(parts)
    return [line + ": dense parts (attention, norms, router) and KV cache are placed first"]


def _layers(names: list[str]) -> str:
    """["model.layers.0", "model.layers.1", "model.layers.5"] -> "layers 0-1, 5"."""
    compressed = list_names(names)
    return compressed.replace("model.layers.", "layers ", 1).replace(", model.layers.", ", ")


def _pin_lines(lay: Layout, stored: list[Device]) -> list[str]:
    lines = []
    for prefix, device in lay.options.pins.items():
        names = [
            b.name for b, d in zip(lay.skeleton.blocks, stored, strict=True)
            if pin_covers(prefix, b) and d == device
        ]  # fmt: skip
        lines.append(f"pin {prefix} -> {device}: {list_names(names) or 'overridden'}")
    return lines
