"""Devices and memory budgets, normalised once at the boundary.

Inside devicemap a device is always a `Device` and a budget always an int of
bytes; nothing compares device strings or re-derives "the main device".
"""

from __future__ import annotations

import math
import os
import re
import reprlib
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal, TypeAlias

import psutil

from .errors import BadOption, BadSize, DuplicateDevice, UnknownDevice

if TYPE_CHECKING:  # torch is imported where a device is probed or a torch.device made:
    import torch  # parsing devices and sizes (the CLI's start) never needs it

Kind = Literal["cuda", "mps", "cpu", "disk"]
_KIND_RANK = {"cuda": 0, "mps": 1, "cpu": 2, "disk": 3}

SizeLike = int | str


@dataclass(frozen=True)
class Device:
    """One place that can hold weights: a GPU, the CPU RAM or the disk."""

    kind: Kind
    index: int = 0  # only meaningful for cuda

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else self.kind

    def __repr__(self) -> str:
        return f"Device({str(self)!r})"

    @property
    def is_gpu(self) -> bool:
        return self.kind in ("cuda", "mps")

    @property
    def map_value(self) -> int | str:
        """The value accelerate/transformers device maps use: 0 for cuda:0, else the name."""
        return self.index if self.kind == "cuda" else self.kind

    @property
    def sort_key(self) -> tuple[int, int]:
        """GPUs by index first, then mps, cpu, disk."""
        return (_KIND_RANK[self.kind], self.index)

    def torch(self) -> torch.device:
        """The torch device that tensors on this device live on (disk data is read to cpu)."""
        import torch

        if self.kind == "disk":
            return torch.device("cpu")
        return torch.device(str(self))


# a string, so that naming the alias does not import torch (annotations are never evaluated)
DeviceLike: TypeAlias = "int | str | torch.device | Device"

CPU = Device("cpu")
DISK = Device("disk")
MPS = Device("mps")

_DEVICE_RE = re.compile(r"^(?:(cuda|gpu)(?::(\d{1,6}))?|(\d{1,6})|(cpu|disk|meta|mps))$")


def parse_device(value: DeviceLike) -> Device:
    """Parse 0, "0", "cuda", "cuda:1", "cpu", "disk", "mps" or a torch.device."""
    if isinstance(value, Device):
        return value
    if isinstance(value, bool):
        raise UnknownDevice(f"device {value!r} is not a device; use 0, 'cuda:1', 'cpu' or 'disk'")
    if isinstance(value, int):
        if value < 0:
            raise UnknownDevice(f"device {value} is negative; GPU indices start at 0")
        return Device("cuda", value)
    torch = sys.modules.get("torch")  # without torch imported, nothing is a torch.device
    if torch is not None and isinstance(value, torch.device):
        value = str(value)
    if not isinstance(value, str):
        raise UnknownDevice(
            f"device {_shown(value)} is not a device; use 0, 'cuda:1', 'cpu' or 'disk'"
        )
    match = _DEVICE_RE.match(value.strip().lower())
    if match is None or match.group(4) == "meta":
        raise UnknownDevice(
            f"unknown device {_shown(value)}; use a GPU index (0), 'cuda:N', 'cpu', 'disk' or 'mps'"
        )
    if match.group(1):
        return Device("cuda", int(match.group(2) or 0))
    if match.group(3):
        return Device("cuda", int(match.group(3)))
    name = match.group(4)
    return MPS if name == "mps" else (CPU if name == "cpu" else DISK)


def parse_devices(values: Iterable[DeviceLike]) -> list[Device]:
    """Parse several devices; the same device twice is an error naming both spellings."""
    seen: dict[Device, DeviceLike] = {}
    for value in values:
        device = parse_device(value)
        if device in seen:
            raise DuplicateDevice(
                f"device {value!r} and {seen[device]!r} are both {device}; give each device once"
            )
        seen[device] = value
    return list(seen)


_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*|%)\s*$")
_MAX_SIZE = 2**64  # bytes (16 EiB): beyond any machine's memory or disk, so a typo


def parse_size(value: SizeLike, *, free: int | None = None) -> int:
    """Bytes from 123, "16GiB" (binary), "16GB" (decimal), "512MiB" or "85%" of `free`."""
    if isinstance(value, bool):
        raise BadSize(f"memory size {value!r} is not a size; use bytes, '16GiB' or '85%'")
    if isinstance(value, int):
        if value < 0:
            raise BadSize(
                f"memory size {_shown(value)} is negative; give a size of 0 or more bytes"
            )
        return _at_most_max(value, value)
    if not isinstance(value, str):
        raise BadSize(f"memory size {_shown(value)} is not a size; use bytes, '16GiB' or '85%'")
    match = _SIZE_RE.match(value)
    if match is None:
        raise BadSize(
            f"memory size {_shown(value)} is not understood; write a non-negative number and a"
            " unit, like '16GiB', '16GB', '512MiB', '1024' (bytes) or '85%'"
        )
    number, unit = float(match.group(1)), match.group(2).lower()  # 400 digits: inf, no error
    if unit == "%":
        if not 0 < number <= 100:
            raise BadSize(
                f"memory size {_shown(value)}: a percentage must be above 0 and at most 100"
            )
        if free is None:
            raise BadSize(
                f"memory size {_shown(value)} is a percentage, but how much is free on that device"
                " is unknown; give an absolute size such as '16GiB'"
            )
        return int(free * number / 100)
    if unit not in _UNITS and unit != "":
        raise BadSize(
            f"memory size {_shown(value)} has an unknown unit {_shown(match.group(2))};"
            " use B, KB, MB, GB, TB (decimal) or KiB, MiB, GiB, TiB (binary)"
        )
    return _at_most_max(value, number * _UNITS.get(unit, 1))


def _at_most_max(value: SizeLike, nbytes: int | float) -> int:
    """`nbytes` as an int, or BadSize naming `value` when it is absurdly large (or infinite)."""
    if nbytes > _MAX_SIZE:  # also inf, before int() could overflow
        raise BadSize(
            f"memory size {_shown(value)} is more than 16 EiB, larger than any machine's memory"
            " or disk; give a size such as '16GiB'"
        )
    return int(nbytes)


def _shown(value: object) -> str:
    """A value for a message, clipped: a 400-digit size is shown by its ends, not in full."""
    if isinstance(value, int) and value.bit_length() > 14_000:  # repr() refuses > 4300 digits
        return f"<an integer of {value.bit_length()} bits>"
    return reprlib.repr(value)


def format_size(nbytes: int | float) -> str:
    """'1.50 GiB', '512.0 MiB', '-2.00 GiB': binary units, three significant-ish digits."""
    sign, value = ("-" if nbytes < 0 else ""), abs(float(nbytes))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Inventory:
    """What is free right now on each device of this machine, in bytes."""

    free: Mapping[Device, int]
    total: Mapping[Device, int]
    notes: tuple[str, ...] = ()  # how a shared pool was split (mps and cpu: one RAM)

    @property
    def gpus(self) -> list[Device]:
        return sorted((d for d in self.free if d.is_gpu), key=lambda d: d.sort_key)


def inventory(*, offload_dir: str | os.PathLike[str] | None = None) -> Inventory:
    """Free memory now: each GPU (memory held by other processes counts), RAM, disk.

    RAM is what this process may still use: its memory cgroup's limit counts (a container
    or a systemd slice allows less than the machine has). On Apple silicon the GPU (mps)
    and the CPU share one RAM, counted once: mps gets the share Metal lets the GPU use
    (`mps_share`), as far as it is free, and cpu the rest of what is free.
    """
    import torch

    free: dict[Device, int] = {}
    total: dict[Device, int] = {}
    notes: tuple[str, ...] = ()
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free_bytes, total_bytes = torch.cuda.mem_get_info(index)
            free[Device("cuda", index)], total[Device("cuda", index)] = free_bytes, total_bytes
        free[CPU], total[CPU] = cpu_memory()
    elif present(MPS):
        ram_free, ram_total = cpu_memory()
        share, source = mps_share(ram_total)
        free[MPS] = max(0, min(share - _mps_allocated(), ram_free))  # bytes
        free[CPU], total[MPS], total[CPU] = ram_free - free[MPS], share, ram_total - share
        notes = (
            f"mps: {format_size(free[MPS])} free of the {format_size(share)} of unified memory"
            f" the GPU may use ({source}); cpu: the other {format_size(free[CPU])} of the"
            f" {format_size(ram_free)} of RAM free now (mps and cpu share it: counted once)",
        )
    else:
        free[CPU], total[CPU] = cpu_memory()
    disk = shutil.disk_usage(_existing_parent(offload_dir or os.getcwd()))
    free[DISK], total[DISK] = disk.free, disk.total
    return Inventory(free=free, total=total, notes=notes)


# --- Apple unified memory ------------------------------------------------------

_MPS_SMALL = 36 * 2**30  # bytes of RAM up to which macOS lets the GPU wire 2/3 of it, 3/4 above


def mps_share(ram_total: int) -> tuple[int, str]:
    """(bytes, where the figure comes from) of the unified memory the mps GPU may use.

    Metal's own figure when torch has it: `torch.mps.recommended_max_memory()`, the
    device's recommendedMaxWorkingSetSize (what the GPU can use without hurting the
    system; torch's allocator counts its limits from it). Without it, macOS's default
    GPU wired-memory limit (sysctl iogpu.wired_limit_mb=0): about 2/3 of the RAM on a
    Mac with up to 36 GiB, 3/4 above (64 GiB: 48 GiB; 128 GiB: 96 GiB).
    """
    import torch

    recommended = getattr(getattr(torch, "mps", None), "recommended_max_memory", None)
    if recommended is not None:
        try:
            nbytes = int(recommended())
        except (RuntimeError, OSError, ValueError, TypeError):
            nbytes = 0
        if nbytes > 0:
            return min(nbytes, ram_total), "Metal's recommended working set"
    share = ram_total * 2 // 3 if ram_total <= _MPS_SMALL else ram_total * 3 // 4
    what = "2/3" if ram_total <= _MPS_SMALL else "3/4"
    return share, f"{what} of the RAM, macOS's default GPU wired-memory limit"


def _mps_allocated() -> int:
    """Bytes Metal holds for this process already (they count against the GPU's share)."""
    import torch

    allocated = getattr(getattr(torch, "mps", None), "driver_allocated_memory", None)
    try:
        return max(0, int(allocated())) if allocated is not None else 0
    except (RuntimeError, OSError, ValueError, TypeError):
        return 0


# --- RAM as cgroups see it -----------------------------------------------------

_PROC_CGROUP = Path("/proc/self/cgroup")  # this process's cgroup in each hierarchy
_CGROUP_ROOT = Path("/sys/fs/cgroup")  # v2 mounts here; v1 mounts each controller below it
_NO_LIMIT = 2**62  # bytes: cgroup v1 writes "no limit" as 2**63 - one page


def cpu_memory(
    *, proc_cgroup: Path = _PROC_CGROUP, cgroup_root: Path = _CGROUP_ROOT
) -> tuple[int, int]:
    """(free, total) bytes of RAM for this process: psutil's figures, lowered to what its
    memory cgroup and each cgroup above it still allow (limit - usage + reclaimable cache).

    Reads cgroup v2 (memory.max, memory.high, memory.current) or, where the memory
    controller is mounted as v1 (/sys/fs/cgroup/memory/<path>), memory.limit_in_bytes and
    memory.usage_in_bytes; inactive file pages in memory.stat count as free, as psutil's
    `available` counts them. Any file missing or unreadable: that level sets no limit.
    """
    ram = psutil.virtual_memory()
    free, total = int(ram.available), int(ram.total)
    for limit, room in _cgroup_rooms(proc_cgroup, cgroup_root):
        free, total = min(free, room), min(total, limit)
    return free, total


def _cgroup_rooms(proc_cgroup: Path, cgroup_root: Path) -> list[tuple[int, int]]:
    """(limit, room) bytes of each limited memory cgroup from this process's up to the root."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:  # not Linux, or no /proc
        return []
    groups = [line.split(":", 2) for line in lines if line.count(":") >= 2]
    for _, controllers, path in groups:  # v1: "4:memory:/docker/abc"
        if "memory" in controllers.split(","):
            levels = _ancestors(cgroup_root / "memory", path)
            return [room for d in levels if (room := _v1_room(d)) is not None]
    for hierarchy, controllers, path in groups:  # v2: "0::/user.slice/app.scope"
        if hierarchy == "0" and controllers == "":
            levels = _ancestors(cgroup_root, path)
            return [room for d in levels if (room := _v2_room(d)) is not None]
    return []


def _ancestors(mount: Path, path: str) -> list[Path]:
    """`path`'s directory under the mount, then each parent up to the mount itself.

    In a container the mount may show only its own cgroup as the root, so the deeper
    directories of `path` do not exist there: their files are simply not found.
    """
    parts = [p for p in PurePosixPath(path).parts if p not in ("/", ".", "..")]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_room(directory: Path) -> tuple[int, int] | None:
    """(limit, room) of one cgroup v2 directory, None when it sets no limit.

    memory.high counts as a limit too: past it the kernel throttles the cgroup and reclaims
    its memory hard, which for weights in RAM is as bad as running out.
    """
    limits = [_read_bytes(directory / name) for name in ("memory.max", "memory.high")]
    known = [limit for limit in limits if limit is not None]
    if not known:
        return None
    usage = _read_bytes(directory / "memory.current") or 0
    return _room(min(known), usage, _stat_bytes(directory / "memory.stat", ("inactive_file",)))


def _v1_room(directory: Path) -> tuple[int, int] | None:
    """(limit, room) of one cgroup v1 memory directory, None when it sets no limit."""
    limit = _read_bytes(directory / "memory.limit_in_bytes")
    if limit is None or limit >= _NO_LIMIT:
        return None
    usage = _read_bytes(directory / "memory.usage_in_bytes") or 0
    names = ("total_inactive_file", "inactive_file")  # total_: with the child cgroups'
    return _room(limit, usage, _stat_bytes(directory / "memory.stat", names))


def _room(limit: int, usage: int, reclaimable: int) -> tuple[int, int]:
    """(limit, what is left under it): usage less the cache the kernel can drop, clamped."""
    return limit, max(0, min(limit, limit - usage + reclaimable))


def _read_bytes(file: Path) -> int | None:
    """A cgroup file's one number; None for "max", a missing file or anything unexpected."""
    try:
        return _count(file.read_text().strip())
    except OSError:
        return None


def _stat_bytes(file: Path, names: tuple[str, ...]) -> int:
    """The first of `names` found in a memory.stat file ("name value" lines), else 0."""
    try:
        lines = file.read_text().splitlines()
    except OSError:
        return 0
    found = dict(line.split(maxsplit=1) for line in lines if len(line.split()) == 2)
    counts = [_count(found.get(name, "")) for name in names]
    return next((n for n in counts if n is not None), 0)


def _count(text: str) -> int | None:
    """Plain ASCII digits of at most 20 (a u64) as an int, else None."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 20 else None


def present(device: Device) -> bool:
    """Whether this machine has `device` (cpu and disk: always)."""
    if device.kind not in ("cuda", "mps"):
        return True
    import torch

    if device.kind == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if device.kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        return mps is not None and bool(mps.is_available())
    return True


def _existing_parent(path: str | os.PathLike[str]) -> str:
    path = os.path.abspath(os.fspath(path))
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def select_gpus(
    inv: Inventory, gpus: int | Iterable[DeviceLike] | None, *, where: str = "this machine"
) -> list[Device]:
    """GPUs to use: all (None), the first N by index (an int), or the listed ids, among
    `inv`'s."""
    available = inv.gpus  # sorted: cuda:0, cuda:1, ..., then mps
    if gpus is None:
        return available
    if isinstance(gpus, bool):
        raise UnknownDevice(f"gpus={gpus!r}: give a number of GPUs or a list of GPU ids")
    if isinstance(gpus, int):
        if gpus < 0:
            raise UnknownDevice(
                f"--gpus {gpus} is negative; give how many GPUs to use (0 or more), or their ids"
            )
        if gpus > len(available):
            raise UnknownDevice(
                f"--gpus {gpus} asks for more GPUs than {where} has ({len(available)});"
                " to plan for GPUs you do not have, give --max-memory for each"
            )
        return available[:gpus]
    chosen = parse_devices(gpus)
    missing = [str(d) for d in chosen if d not in inv.free]
    if missing:
        raise UnknownDevice(
            f"GPU(s) {', '.join(missing)} not found in {where} (it has"
            f" {', '.join(map(str, available)) or 'none'}); to plan for GPUs you do not have,"
            " give --max-memory for each"
        )
    return chosen


# --- budgets ---------------------------------------------------------------------

# What a CUDA GPU needs beyond what the plan counts, kept free of every budget measured from
# its free memory. mem_get_info already excludes the context of the process that measured,
# but not what the first forwards add: kernel modules loaded lazily (CUDA_MODULE_LOADING=
# LAZY: the context grows by a few hundred MiB as cuBLAS, cuBLASLt and attention kernels are
# first used), cuBLAS workspaces (one per stream: devicemap streams weights on a side
# stream), a context of its own when the plan is used by another process while the
# measuring one still runs, and the caching allocator's rounding and fragmentation, which
# grow with the memory in use. 512 MiB + 5% of the GPU's memory: 1.7 GiB of a 24 GiB card,
# 4.5 GiB of an 80 GiB one; llama.cpp's --fit keeps 1 GiB per GPU, vLLM 10% of the GPU
# (gpu_memory_utilization 0.9, and it profiles a forward first).
GPU_CONTEXT_MARGIN = 512 * 2**20  # bytes
GPU_SLACK = 0.05  # of the GPU's total memory


def gpu_margin_bytes(total: int, margin: SizeLike | None = None) -> int:
    """Bytes kept free on a CUDA GPU of `total` bytes whose budget is measured: `margin`
    (a size, or a percentage of `total`; 0: none), by default 512 MiB + 5% of `total`."""
    if margin is None:
        return GPU_CONTEXT_MARGIN + int(total * GPU_SLACK)
    try:
        return parse_size(margin, free=total)
    except BadSize as exc:
        raise BadSize(f"--gpu-margin: {exc} (or 0 to keep nothing free)") from None


def check_gpu_fraction(fraction: object) -> float | None:
    """`gpu_memory_fraction` as a float in (0, 1], or BadOption naming it and the fix."""
    if fraction is None:
        return None
    number = fraction if isinstance(fraction, int | float) and not isinstance(fraction, bool) else 0
    if not (math.isfinite(number) and 0 < number <= 1):
        raise BadOption(
            f"--gpu-memory-fraction {_shown(fraction)} is not a fraction of a GPU's free memory:"
            " give a number above 0 and at most 1, such as 0.85 (85% of what is free on each"
            " GPU)",
            options=("gpu_memory_fraction",),
        )
    return float(number)


@dataclass(frozen=True)
class Budgets:
    """Bytes per device in placement order, and how each measured budget was derived."""

    sizes: dict[Device, int]
    notes: tuple[str, ...] = ()  # margins kept free, fractions, unified memory split
    kept: Mapping[Device, int] = field(default_factory=dict)  # bytes the margin cost each GPU


def resolve_budgets(
    max_memory: Mapping[DeviceLike, SizeLike] | None,
    *,
    inv: Inventory | None = None,
    gpus: int | Iterable[DeviceLike] | None = None,
    gpu_margin: SizeLike | None = None,
    gpu_memory_fraction: float | None = None,
) -> dict[Device, int]:
    """Budgets in bytes per device, in placement order (GPUs, mps, cpu, disk): see
    `measure_budgets`, which also says how each measured one was derived."""
    return measure_budgets(
        max_memory,
        inv=inv,
        gpus=gpus,
        gpu_margin=gpu_margin,
        gpu_memory_fraction=gpu_memory_fraction,
    ).sizes


def measure_budgets(
    max_memory: Mapping[DeviceLike, SizeLike] | None,
    *,
    inv: Inventory | None = None,
    gpus: int | Iterable[DeviceLike] | None = None,
    gpu_margin: SizeLike | None = None,
    gpu_memory_fraction: float | None = None,
) -> Budgets:
    """Budgets in bytes per device, in placement order (GPUs, mps, cpu, disk).

    With `max_memory`, exactly the devices it names are used (devices this machine
    does not have are fine: that is what-if planning), and percentages are of what
    is free now; `gpus` then keeps only those of its GPUs (the first N, or the
    listed ids). Without it, every selected GPU, the CPU RAM and the disk get what
    is free now.

    `gpu_memory_fraction` F: every GPU of this machine (those `gpus` selects) gets F of
    what is free on it, beside the devices `max_memory` names; a GPU it names keeps
    its own budget. A CUDA GPU whose budget is measured (free now, a percentage of it,
    or F of it) keeps at least `gpu_margin` free (default 512 MiB + 5% of its memory,
    see GPU_CONTEXT_MARGIN); a size in bytes (0=20GiB) is taken as it is.
    """
    fraction = check_gpu_fraction(gpu_memory_fraction)
    if gpu_margin is not None:
        gpu_margin_bytes(100, gpu_margin)  # a bad size fails with or without GPUs
    given = {} if max_memory is None else _given(max_memory)
    if max_memory is None or fraction is not None or any(map(_is_percent, given.values())):
        inv = inv or inventory()
    devices = _budgeted(given, inv, gpus, everything=max_memory is None, machine=fraction)
    sizes: dict[Device, int] = {}
    notes: list[str] = []
    kept: dict[Device, int] = {}
    for device in devices:
        value = given.get(device)
        if value is not None and not _is_percent(value):
            sizes[device] = parse_size(value)  # the user said so
            continue
        assert inv is not None  # probed: a measured budget
        sizes[device], note = _measured(device, value, inv, fraction, gpu_margin)
        if note is not None:
            notes.append(note[0])
            kept.update({device: note[1]} if note[1] else {})
    if inv is not None and any(d.kind == "mps" and d not in given for d in sizes):
        notes.extend(inv.notes)
    ordered = dict(sorted(sizes.items(), key=lambda item: item[0].sort_key))
    return Budgets(sizes=ordered, notes=tuple(notes), kept=kept)


def _measured(
    device: Device,
    value: SizeLike | None,
    inv: Inventory,
    fraction: float | None,
    margin: SizeLike | None,
) -> tuple[int, tuple[str, int] | None]:
    """(budget, (note, bytes the margin took) for a CUDA GPU) from what is free on `device`:
    a percentage `value` of it, `fraction` of it for a GPU, else all of it."""
    free = inv.free.get(device)
    if value is not None:
        share, how = parse_size(value, free=free), f"{str(value).strip()} of it"
    elif device.is_gpu and fraction is not None:
        share, how = int((free or 0) * fraction), f"--gpu-memory-fraction {fraction:g}"
    else:
        share, how = free or 0, ""
    if device.kind != "cuda" or free is None:
        return share, None
    total = inv.total.get(device, free)
    budget, note = _keep_margin(device, free, share, how, total, margin)
    return budget, (note, share - budget)


def _given(max_memory: Mapping[DeviceLike, SizeLike]) -> dict[Device, SizeLike]:
    keys = parse_devices(max_memory.keys())
    return dict(zip(keys, max_memory.values(), strict=True))


def _is_percent(value: SizeLike) -> bool:
    return isinstance(value, str) and value.strip().endswith("%")


def _budgeted(
    given: Mapping[Device, SizeLike],
    inv: Inventory | None,
    gpus: int | Iterable[DeviceLike] | None,
    *,
    everything: bool,
    machine: float | None,
) -> list[Device]:
    """The devices that get a budget: all of this machine's (none given), the ones named
    and, with a GPU fraction, this machine's GPUs too; `gpus` selects among the GPUs."""
    if everything:
        assert inv is not None
        return [*select_gpus(inv, gpus), CPU, DISK]
    if machine is not None:  # the machine's GPUs and the named ones: --gpus picks among them
        assert inv is not None
        candidates = {d: 0 for d in (*inv.gpus, *(d for d in given if d.is_gpu))}
        named = any(d.is_gpu for d in given)
        where = "this machine and --max-memory" if named else "this machine"
        chosen = select_gpus(Inventory(free=candidates, total=candidates), gpus, where=where)
        return [*chosen, *(d for d in given if not d.is_gpu)]
    if gpus is None:
        return list(given)
    budgeted = {d: 0 for d in given}  # keep only the selected ones among the budgeted GPUs
    chosen = select_gpus(Inventory(free=budgeted, total=budgeted), gpus, where="--max-memory")
    return [d for d in given if not d.is_gpu or d in chosen]


def _keep_margin(
    device: Device, free: int, share: int, how: str, total: int, margin: SizeLike | None
) -> tuple[int, str]:
    """(budget, note): `share` of the `free` bytes, keeping at least the margin free."""
    keep = gpu_margin_bytes(total, margin)
    budget = max(0, min(share, free - keep))
    head = f"{device}: {format_size(free)} free now"
    if not keep:
        what = f" ({how})" if how else ""
        return budget, f"{head}, budget {format_size(budget)}{what}, no --gpu-margin kept free"
    if not how:
        return budget, (
            f"{head}, {format_size(keep)} kept free for the CUDA context, kernels and allocator"
            f" (--gpu-margin): budget {format_size(budget)}"
        )
    if budget == share:
        return budget, (
            f"{head}, budget {format_size(budget)} ({how}), leaving {format_size(free - budget)}"
            f" free (at least the {format_size(keep)} --gpu-margin)"
        )
    return budget, (
        f"{head}, budget {format_size(budget)}: {how} would be {format_size(share)}, but"
        f" {format_size(keep)} is kept free for the CUDA context, kernels and allocator"
        " (--gpu-margin)"
    )
