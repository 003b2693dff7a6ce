"""Devices and memory budgets, normalised once at the boundary.

Inside devicemap a device is always a `Device` and a budget always an int of
bytes; nothing compares device strings or re-derives "the main device".
"""

from __future__ import annotations

import os
import re
import reprlib
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import psutil
import torch

from .errors import BadSize, DuplicateDevice, UnknownDevice

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
        if self.kind == "disk":
            return torch.device("cpu")
        return torch.device(str(self))


DeviceLike = int | str | torch.device | Device

CPU = Device("cpu")
DISK = Device("disk")

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
    if isinstance(value, torch.device):
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
    return Device("mps") if name == "mps" else (CPU if name == "cpu" else DISK)


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

    @property
    def gpus(self) -> list[Device]:
        return sorted((d for d in self.free if d.is_gpu), key=lambda d: d.sort_key)


def inventory(*, offload_dir: str | os.PathLike[str] | None = None) -> Inventory:
    """Free memory now: each GPU (memory held by other processes counts), RAM, disk.

    RAM is what this process may still use: its memory cgroup's limit counts (a container
    or a systemd slice allows less than the machine has).
    """
    free: dict[Device, int] = {}
    total: dict[Device, int] = {}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free_bytes, total_bytes = torch.cuda.mem_get_info(index)
            free[Device("cuda", index)], total[Device("cuda", index)] = free_bytes, total_bytes
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        # mps shares the unified memory with the CPU
        free[Device("mps")], total[Device("mps")] = cpu_memory()
    free[CPU], total[CPU] = cpu_memory()
    disk = shutil.disk_usage(_existing_parent(offload_dir or os.getcwd()))
    free[DISK], total[DISK] = disk.free, disk.total
    return Inventory(free=free, total=total)


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
    """GPUs to use: all (None), the first N (an int), or the listed ids, among `inv`'s."""
    available = inv.gpus
    if gpus is None:
        return available
    if isinstance(gpus, bool):
        raise UnknownDevice(f"gpus={gpus!r}: give a number of GPUs or a list of GPU ids")
    if isinstance(gpus, int):
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


def resolve_budgets(
    max_memory: Mapping[DeviceLike, SizeLike] | None,
    *,
    inv: Inventory | None = None,
    gpus: int | Iterable[DeviceLike] | None = None,
) -> dict[Device, int]:
    """Budgets in bytes per device, in placement order (GPUs, mps, cpu, disk).

    With `max_memory`, exactly the devices it names are used (devices this machine
    does not have are fine: that is what-if planning), and percentages are of what
    is free now; `gpus` then keeps only those of its GPUs (the first N, or the
    listed ids). Without it, every selected GPU, the CPU RAM and the disk get what
    is free now.
    """
    if max_memory is None:
        inv = inv or inventory()
        devices = [*select_gpus(inv, gpus), CPU, DISK]
        budgets = {d: inv.free.get(d, 0) for d in devices}
    else:
        keys = parse_devices(max_memory.keys())
        if any(isinstance(v, str) and v.strip().endswith("%") for v in max_memory.values()):
            inv = inv or inventory()
        budgets = {}
        for device, value in zip(keys, max_memory.values(), strict=True):
            free = inv.free.get(device) if inv is not None else None
            budgets[device] = parse_size(value, free=free)
        if gpus is not None:  # keep only the selected ones among the budgeted GPUs
            budgeted = Inventory(free=budgets, total=budgets)
            chosen = select_gpus(budgeted, gpus, where="--max-memory")
            budgets = {d: b for d, b in budgets.items() if not d.is_gpu or d in chosen}
    return dict(sorted(budgets.items(), key=lambda item: item[0].sort_key))
